"""Held-out evaluation and packaging steps the trainers share (train.py, train_volume.py,
train_large.py): the figures a model card quotes, the threshold choice, scoring an
exported file with onnxruntime, and writing metrics, card and signature.

Everything here reads the exported ONNX file's outputs, not the torch model: the card
describes the artifact that ships.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.infer.manifest import Preprocessing


def softmax_pos(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)  # type: ignore[no-any-return]


def auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U with midranks for ties.
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def metrics(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64],
            threshold: float) -> dict[str, float]:
    pred = scores >= threshold
    tp = int((pred & (labels == 1)).sum())
    tn = int((~pred & (labels == 0)).sum())
    npos, nneg = int((labels == 1).sum()), int((labels == 0).sum())
    return {
        "n": float(len(labels)),
        "auc": auc(scores, labels),
        "sensitivity": tp / npos if npos else float("nan"),
        "specificity": tn / nneg if nneg else float("nan"),
    }


def youden_threshold(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    """The validation score that maximises sensitivity + specificity (Youden's J; the
    first of equals), kept within [0.05, 0.95], to three decimals."""
    cands = np.unique(np.round(scores, 4))

    def j(t: float) -> float:
        pred = scores >= t
        return float((pred & (labels == 1)).sum() / max(1, (labels == 1).sum())
                     + (~pred & (labels == 0)).sum() / max(1, (labels == 0).sum()))

    return round(min(max(float(max(cands, key=j)), 0.05), 0.95), 3)


def run_with_map(sess: ort.InferenceSession, input_name: str, cam: str,
                 x: npt.NDArray[np.float32], batch: int = 16,
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """P(positive) (sigmoid of the logit difference) and the evidence map of every input,
    from the exported file, ``batch`` inputs per run."""
    outs = [sess.run(["logits", cam], {input_name: x[i : i + batch]})
            for i in range(0, len(x), batch)]
    logits = np.concatenate([o[0] for o in outs]).astype(np.float64)
    return 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0]))), np.concatenate([o[1] for o in outs])


def preprocessing_toml(pre: Preprocessing) -> str:
    """The manifest's ``[preprocessing]`` table (without its windows) written from the
    very settings the trainer preprocessed with, so the two cannot drift apart."""
    def flag(v: bool) -> str:
        return "true" if v else "false"

    return (f"[preprocessing]\nrescale = {flag(pre.rescale)}\nvoi = \"{pre.voi}\"\n"
            f"percentile = [{pre.percentile[0]}, {pre.percentile[1]}]\n"
            f"invert_monochrome1 = {flag(pre.invert_monochrome1)}\n"
            f"resize = [{pre.resize[0]}, {pre.resize[1]}]\nmean = {pre.mean}\nstd = {pre.std}\n"
            f"channels = {pre.channels}")


def card_row(name: str, m: dict[str, float]) -> str:
    """One row of a model card's held-out table: subgroup | n | AUC | sens. | spec."""
    return (f"| {name} | {int(m['n'])} | {m['auc']:.3f} | {m['sensitivity']:.3f} | "
            f"{m['specificity']:.3f} |")


def write_package(out: Path, results: dict[str, Any], sha: str, key: Path | None, *,
                  manifest: Callable[[Path], None] | None,
                  card: Callable[[Path, dict[str, Any], str], None]) -> None:
    """metrics.json, then the manifest (when this step writes it), the model card, and
    the signature over the manifest when a publisher key is given."""
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if manifest is not None:
        manifest(out / "manifest.toml")
    card(out / "MODEL_CARD.md", results, sha)
    if key:
        from training.sign import sign_package

        sign_package(out, key)
