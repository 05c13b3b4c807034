"""How well an explanation points at the planted lesion: IoU and pointing game.

    .venv/bin/python -m training.localize models/lesion-demo/1.1.0 [models/lesion-demo/1.0.0]
                                          [--n 2400] [--seed 3003]

For every synthetic case with a planted lesion, the package's explanation
region is computed the way the engine computes it (``agent.infer.engine.saliency``
on the tensor of the runtime's own preprocessing, the box mapped back with
``to_image_box``) and compared with the lesion's box on the stored image:

* IoU of the two boxes (0 when the explanation draws no box);
* pointing game: the saliency peak (the centre of its model-input pixel, in
  image pixels) lies inside the lesion's box;
* overlap: the two boxes share at least one pixel.

training/train.py writes these figures into the model card, CAM and occlusion
side by side on the same held-out cases; numpy + onnxruntime only.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.infer.engine import activate, map_channel, run_batch, saliency
from agent.infer.explain import to_image_box
from agent.infer.manifest import Explanation, Manifest, load_manifest
from agent.infer.preprocess import ImageInput, preprocess
from training.synth import make_case

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Planted:
    """A held-out case with a lesion: its model tensor and where the lesion is."""

    tensor: npt.NDArray[np.float32]  # (C, H, W) as the runtime preprocesses it
    shape: tuple[int, int]  # stored image rows, cols
    bbox: Box  # the lesion's box on the stored image (x, y, w, h)
    kind: str


def planted_cases(manifest: Manifest, seed: int, n: int) -> list[Planted]:
    """The cases with a lesion among ``make_case(seed, 0..n-1)``."""
    out = []
    for i in range(n):
        case = make_case(seed, i)
        if case.lesion_bbox is None:
            continue
        tensor, _ = preprocess(ImageInput(case.stored, case.attrs), manifest.preprocessing)
        out.append(Planted(tensor, (case.stored.shape[0], case.stored.shape[1]),
                           case.lesion_bbox, case.kind))
    return out


def iou(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = (max(0, min(ax + aw, bx + bw) - max(ax, bx))
             * max(0, min(ay + ah, by + bh) - max(ay, by)))
    return inter / float(aw * ah + bw * bh - inter)


def _inside(point: tuple[float, float], box: Box) -> bool:
    x, y, w, h = box
    return x <= point[0] < x + w and y <= point[1] < y + h


class Runner:
    """One onnxruntime session fetching the scores and (a cam package) the map."""

    def __init__(self, package: Path, manifest: Manifest) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(package / manifest.model_file), sess_options=opts,
                                         providers=["CPUExecutionProvider"])
        self.manifest = manifest
        dec = manifest.decision
        self.pos = dec.labels.index(dec.positive_label)
        names = {o.name for o in self.sess.get_outputs()}
        cam = manifest.explanation.output
        self.fetch = [manifest.output_name, *([cam] if cam and cam in names else [])]

    def run(self, x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64],
                                                       npt.NDArray[np.float32] | None]:
        """Positive probabilities and, when the model has one, its maps (N, h, w)."""
        probs, maps = [], []
        step = run_batch(x.shape[1:])
        for start in range(0, len(x), step):
            outs = self.sess.run(self.fetch, {self.manifest.input_name: x[start : start + step]})
            probs.append(activate(np.asarray(outs[0]), self.manifest.decision.activation))
            if len(outs) > 1:
                m = np.asarray(outs[1], dtype=np.float32)
                ch = map_channel(self.manifest, m.shape)
                maps.append(m if ch is None else m[:, ch])
        p = np.concatenate(probs)[:, self.pos]
        return p, (np.concatenate(maps) if maps else None)


def localize(runner: Runner, cases: Sequence[Planted],
             explanation: Explanation | None = None) -> dict[str, float]:
    """Mean IoU, pointing-game hit rate and overlap rate of the explanation over ``cases``
    (the manifest's own explanation settings unless ``explanation`` replaces them)."""
    manifest = runner.manifest
    if explanation is not None:
        manifest = replace(manifest, explanation=explanation)
    x = np.stack([c.tensor for c in cases])
    base, maps = runner.run(x)
    rows, cols = manifest.preprocessing.resize

    def score(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return runner.run(batch)[0]

    ious, hits, overlaps, boxed = [], [], [], 0
    for i, case in enumerate(cases):
        sal = saliency(manifest, case.tensor, float(base[i]), score,
                       None if maps is None else maps[i])
        if sal.bbox is None or sal.peak is None:
            ious.append(0.0)
            hits.append(False)
            overlaps.append(False)
            continue
        boxed += 1
        box = to_image_box(sal.bbox, (rows, cols), case.shape)
        sy, sx = case.shape[0] / rows, case.shape[1] / cols
        peak = ((sal.peak[0] + 0.5) * sx, (sal.peak[1] + 0.5) * sy)
        value = iou((box[0], box[1], box[2], box[3]), case.bbox)
        ious.append(value)
        hits.append(_inside(peak, case.bbox))
        overlaps.append(value > 0)
    n = len(cases)
    return {"n": float(n), "mean_iou": float(np.mean(ious)), "pointing": float(np.mean(hits)),
            "overlap": float(np.mean(overlaps)), "boxed": boxed / n}


def entropy_bits(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The engine's ``entropy`` uncertainty: binary entropy of the probability, in bits."""
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


def tta_spread(runner: Runner, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The engine's ``tta_flip`` uncertainty of a one-image study: std over 4 flips."""
    views = [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]
    probs = np.stack([runner.run(np.ascontiguousarray(v))[0] for v in views])
    return probs.std(axis=0)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("packages", type=Path, nargs="+")
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=3003)
    args = ap.parse_args()
    for package in args.packages:
        manifest = load_manifest(package / "manifest.toml")
        cases = planted_cases(manifest, args.seed, args.n)
        result = localize(Runner(package, manifest), cases)
        print(json.dumps({"package": str(package), "method": manifest.explanation.method,
                          **{k: (v if not math.isnan(v) else None) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
