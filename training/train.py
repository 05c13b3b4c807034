"""Train, export, evaluate and package the demo lesion model — deterministically.

    .venv/bin/python -m training.train [--out models/lesion-demo/1.0.0]
                                       [--key training/.keys/dev-publisher.pem]

PyTorch is a dev-only dependency used here; the runtime only needs onnxruntime.
The ONNX graph is written by hand from the trained weights (a dozen standard
operators), which keeps the exported file byte-for-byte reproducible and free
of exporter-version quirks.  Held-out metrics are computed by onnxruntime on
the exported file itself, through the runtime's own preprocessing, so the model
card describes the artifact that ships.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from agent.infer.manifest import Preprocessing
from agent.infer.preprocess import ImageInput, preprocess
from training.synth import (
    CT_IMAGE_STORAGE,
    DX_PRESENTATION_STORAGE,
    NOISES,
    SCANNERS,
    SIZES,
    SynthCase,
    make_case,
)

NAME = "lesion-demo"
VERSION = "1.0.0"
TRAIN_SEED, VAL_SEED, TEST_SEED = 1001, 2002, 3003
INPUT = 64
WIDTHS = (8, 16, 32, 32)
PRE = Preprocessing(
    rescale=True,
    voi="window",
    windows={"CT": (-500.0, 1400.0)},  # lung window: nodules stand out against air
    percentile=(1.0, 99.0),
    invert_monochrome1=True,
    resize=(INPUT, INPUT),
    mean=0.5,
    std=0.25,
    channels=1,
)
OUTPUT_EDGES = [round(0.1 * i, 1) for i in range(11)]


class LesionNet(nn.Module):
    """Four 3x3 conv blocks and a global max pool: a lesion anywhere lights it up."""

    def __init__(self) -> None:
        super().__init__()
        chans = (1, *WIDTHS)
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)
                                   for i in range(len(WIDTHS)))
        self.fc = nn.Linear(WIDTHS[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i < len(self.convs) - 1:
                x = torch.max_pool2d(x, 2)
        x = torch.amax(x, dim=(2, 3))
        return self.fc(x)  # type: ignore[no-any-return]


def tensors(seed: int, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64],
                                         list[SynthCase], npt.NDArray[np.float32]]:
    xs = np.empty((n, 1, INPUT, INPUT), dtype=np.float32)
    ys = np.empty(n, dtype=np.int64)
    means = np.empty(n, dtype=np.float32)
    cases = []
    for i in range(n):
        case = make_case(seed, i)
        tensor, unit = preprocess(ImageInput(case.stored, case.attrs), PRE)
        xs[i], ys[i], means[i] = tensor, int(case.lesion), float(unit.mean())
        cases.append(SynthCase(case.kind, case.scanner, case.noise, case.size, case.lesion,
                               case.stored[:0], {}, None))  # keep labels, drop pixels
    return xs, ys, cases, means


def export_onnx(model: LesionNet, path: Path) -> None:
    nodes, inits = [], []
    cur = "image"
    for i, conv in enumerate(model.convs):
        assert isinstance(conv, nn.Conv2d)
        w = numpy_helper.from_array(conv.weight.detach().numpy().astype(np.float32), f"conv{i}.w")
        b = numpy_helper.from_array(conv.bias.detach().numpy().astype(np.float32), f"conv{i}.b")  # type: ignore[union-attr,unused-ignore]
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [cur, w.name, b.name], [f"c{i}"],
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        cur = f"r{i}"
        if i < len(model.convs) - 1:
            nodes.append(helper.make_node("MaxPool", [cur], [f"p{i}"], kernel_shape=[2, 2],
                                          strides=[2, 2]))
            cur = f"p{i}"
    nodes.append(helper.make_node("GlobalMaxPool", [cur], ["gmp"]))
    nodes.append(helper.make_node("Flatten", ["gmp"], ["flat"], axis=1))
    fw = numpy_helper.from_array(model.fc.weight.detach().numpy().astype(np.float32), "fc.w")
    fb = numpy_helper.from_array(model.fc.bias.detach().numpy().astype(np.float32), "fc.b")
    inits += [fw, fb]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, INPUT, INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edge-agent training/train.py")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(f"models/{NAME}/{VERSION}"))
    ap.add_argument("--key", type=Path, help="Ed25519 private key (PEM) to sign the manifest")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--val", type=int, default=1200)
    ap.add_argument("--test", type=int, default=2400)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)  # fixed: CPU reductions may reorder with the thread count
    t0 = time.time()
    xtr, ytr, _, _ = tensors(TRAIN_SEED, args.train)
    xva, yva, _, _ = tensors(VAL_SEED, args.val)
    xte, yte, cte, mte = tensors(TEST_SEED, args.test)
    print(f"data: {time.time() - t0:.1f}s")

    model = LesionNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), 64):
            idx = perm[start : start + 64]
            xb = xt[idx]
            # Flip augmentation: lesions may sit anywhere, and test-time
            # augmentation uses the same flips for the uncertainty figure.
            flips = int(torch.randint(0, 4, (1,), generator=gen).item())
            if flips & 1:
                xb = torch.flip(xb, dims=[3])
            if flips & 2:
                xb = torch.flip(xb, dims=[2])
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        print(f"epoch {epoch}: loss {total / len(xt):.4f} ({time.time() - t0:.0f}s)")
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    export_onnx(model, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(xte[:8])).numpy()
    got = sess.run(["logits"], {"image": xte[:8]})[0]
    assert np.allclose(ref, got, atol=1e-4), "ONNX export does not match the torch model"

    def scores(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.concatenate([softmax_pos(sess.run(["logits"], {"image": x[i : i + 256]})[0])
                               for i in range(0, len(x), 256)])

    sva, ste = scores(xva), scores(xte)
    # Threshold from a separate validation set (Youden's J), never the test set.
    grid = np.linspace(0.05, 0.95, 91)
    j = np.array([metrics(sva, yva, t)["sensitivity"] + metrics(sva, yva, t)["specificity"]
                  for t in grid])
    # A confident model has a plateau of near-equal J; of those thresholds take
    # the one closest to 0.5, so the review band stays in the uncertain middle.
    near = np.flatnonzero(j >= j.max() - 0.01)
    threshold = float(round(grid[near[np.argmin(np.abs(grid[near] - 0.5))]], 2))
    overall = metrics(ste, yte, threshold)
    groups: dict[str, dict[str, float]] = {}
    for field, values in (("kind", ("ct", "radiograph")), ("scanner", SCANNERS),
                          ("noise", NOISES), ("size", SIZES)):
        for v in values:
            mask = np.array([getattr(c, field) == v for c in cte])
            groups[f"{field}={v}"] = metrics(ste[mask], yte[mask], threshold)
    input_edges = [0.0, *np.quantile(mte, np.linspace(0.1, 0.9, 9)).round(4).tolist(), 1.0]
    input_ref = np.histogram(mte, bins=input_edges)[0] / len(mte)
    output_ref = np.histogram(ste, bins=OUTPUT_EDGES)[0] / len(ste)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    params = sum(p.numel() for p in model.parameters())
    write_manifest(args.out / "manifest.toml", sha, threshold, input_edges, input_ref.tolist(),
                   output_ref.tolist())
    results = {"threshold": threshold, "overall": overall, "subgroups": groups,
               "params": params, "onnx_bytes": onnx_path.stat().st_size,
               "train": args.train, "val": args.val, "test": args.test, "epochs": args.epochs}
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    write_card(args.out / "MODEL_CARD.md", results, sha)
    if args.key:
        from training.sign import sign_package

        sign_package(args.out, args.key)
    print(json.dumps({"threshold": threshold, "overall": overall}, indent=1))
    print(f"done in {time.time() - t0:.0f}s")


def _fl(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def write_manifest(path: Path, sha: str, threshold: float, input_edges: list[float],
                   input_ref: list[float], output_ref: list[float]) -> None:
    low, high = max(0.0, round(threshold - 0.15, 2)), min(1.0, round(threshold + 0.15, 2))
    text = f"""# Signed model manifest: edit only at the source (training/train.py), then re-sign.
schema = 1
name = "{NAME}"
version = "{VERSION}"
description = "Round lesion detector for chest CT slices and radiographs (synthetic demo)"
intended_use = "Demonstration of the edge-agent pipeline only. Not for clinical use."
publisher = "edge-agent development (demo key)"

[model]
file = "model.onnx"
sha256 = "{sha}"
input = "image"
output = "logits"

[applies_to]
modalities = ["CT", "CR", "DX"]
body_parts = ["CHEST", "LUNG", "THORAX"]
sop_classes = ["{CT_IMAGE_STORAGE}", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1", "{DX_PRESENTATION_STORAGE}"]
min_images = 1
max_images = 64

[inputs]
# Minimum necessary: pixels plus these technical attributes, nothing else.
attributes = ["Modality", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]

[preprocessing]
rescale = true
voi = "window"
percentile = [1.0, 99.0]
invert_monochrome1 = true
resize = [{INPUT}, {INPUT}]
mean = {PRE.mean}
std = {PRE.std}
channels = 1

[preprocessing.windows]
CT = [-500.0, 1400.0]

[decision]
labels = ["no_lesion", "lesion"]
activation = "softmax"
positive_label = "lesion"
positive_finding = "round lesion suspected"
negative_finding = "no lesion found"
threshold = {threshold}
review_band = [{low}, {high}]
max_uncertainty = 0.15
review_if_positive = true
aggregation = "max"

[uncertainty]
method = "tta_flip"

[explanation]
method = "occlusion"
patch = 12
stride = 4
keep_fraction = 0.5

[drift]
input_edges = {_fl(input_edges)}
input_reference = {_fl(input_ref)}
output_edges = {_fl(OUTPUT_EDGES)}
output_reference = {_fl(output_ref)}
subgroup_attributes = ["Modality"]
"""
    path.write_text(text)


def write_card(path: Path, r: dict[str, Any], sha: str) -> None:
    def row(name: str, m: dict[str, float]) -> str:
        return (f"| {name} | {int(m['n'])} | {m['auc']:.3f} | {m['sensitivity']:.3f} | "
                f"{m['specificity']:.3f} |")

    rows = "\n".join(row(k, v) for k, v in r["subgroups"].items())
    path.write_text(f"""# Model card: {NAME} {VERSION}

**Demonstration model. Not for clinical use.** It was trained only on synthetic
phantoms and has never seen a real patient image.

## Intended use
Shows the edge-agent inference pipeline end to end: signed packages,
preprocessing from a manifest, uncertainty, needs-review flags, occlusion
explanations and drift monitoring. Output: probability that a chest CT slice or
chest radiograph contains a round lesion (a nodule-like blob), aggregated to the
study by the maximum over images.

## Signature
Signed with the **dev publisher key** (`models/dev-publisher.pub`). This key is a
demo key whose private half lives only on developer machines
(`training/.keys/`, never committed); production boxes must pin their real
publisher keys instead, and will then refuse this package.

## Model
- Architecture: 4 conv 3x3 layers ({", ".join(map(str, WIDTHS))} channels, ReLU, 2x2 max
  pooling), global max pool, linear 2-way; {r["params"]} parameters; ONNX opset
  17, {r["onnx_bytes"]} bytes; sha256 `{sha}`.
- Input: one 64x64 channel; rescale slope/intercept applied, CT lung window
  (C -500, W 1400), radiographs by their own window or 1-99 % percentiles,
  MONOCHROME1 inverted, area-resized, normalised (x - 0.5) / 0.25.

## Data (all synthetic, `training/synth.py`)
CT-slice-like phantoms (128x128, HU with rescale) and radiograph-like phantoms
(160x192, 12-bit, MONOCHROME1 on scanner C), half with a planted round lesion
(CT: 3.5-7 px radius, -120..60 HU; radiograph: Gaussian blob sigma 2.5-4.5 px),
vessel/rib distractors, three simulated scanners (blur, noise texture, intensity
offsets, storage conventions), two noise levels, three patient sizes.
Training {r["train"]} images (seed {TRAIN_SEED}), threshold selection {r["val"]}
(seed {VAL_SEED}, Youden's J), held-out test {r["test"]} (seed {TEST_SEED}).
{r["epochs"]} epochs, Adam, deterministic on CPU (`torch.use_deterministic_algorithms`).
Reproduce: `.venv/bin/python -m training.train --key training/.keys/dev-publisher.pem`.

## Held-out metrics (per image, threshold {r["threshold"]})
| subgroup | n | AUC | sensitivity | specificity |
|---|---|---|---|---|
{row("overall", r["overall"])}
{rows}

## Limitations
Synthetic phantoms are far simpler than anatomy; performance on real images is
unknown and expected to be poor. Small, faint radiograph lesions under high
noise are the weakest subgroup. Results are flagged for review when positive,
near the threshold, or when test-time-augmentation spread exceeds 0.15.
""")


if __name__ == "__main__":
    main()
