"""Train, export, evaluate and package the lesion segmentation model — deterministically.

    .venv/bin/python -m training.train_seg [--out models/available/lesion-seg/1.0.0]
                                           [--key training/.keys/dev-publisher.pem]

A small fully-convolutional network (a two-level U-Net) that outputs, for a chest CT
slice, the probability of every pixel of its 64x64 input grid being inside a lesion
(graph output ``mask``), and as its score the map's peak (``logits`` = [-s/2, s/2]
for the peak logit s, so softmax gives P(lesion) = the highest pixel probability).
Its manifest declares the mask (``[mask]``): the engine stretches the top image's map
back to the image's own grid (agent/infer/mask.py) and the box writes it into the
original study as DICOM SEG.

Data: the demo's CT phantoms (training/synth.py) with the planted lesion's pixels as
ground truth.  PyTorch is a dev-only dependency; the ONNX graph is written by hand
from the weights, as in training/train.py, so the file is byte-for-byte reproducible.
Held-out figures come from onnxruntime on the exported file through the runtime's own
preprocessing and its own mask-to-image step, at the image's grid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from agent.infer.mask import to_source
from agent.infer.preprocess import ImageInput, preprocess, resize
from training.evaluate import metrics, softmax_pos
from training.synth import CT_IMAGE_STORAGE, NOISES, SCANNERS, SIZES, make_case
from training.train import PRE

NAME = "lesion-seg"
VERSION = "1.0.0"
TRAIN_SEED, VAL_SEED, TEST_SEED = 5101, 5202, 5303
INPUT = PRE.resize[0]  # 64: the demo's lung-window preprocessing, unchanged
WIDTHS = (8, 16, 32)  # encoder levels at 64, 32 and 16 pixels
MASK_OUTPUT = "mask"
LABEL = "lesion"
OUTPUT_EDGES = [round(0.1 * i, 1) for i in range(11)]


class SegNet(nn.Module):
    """Encoder: two 3x3 convolutions per level, 2x2 max pooling between levels;
    decoder: nearest 2x upsampling, concatenation with the encoder level of the same
    size, one 3x3 convolution; a 1x1 convolution to the lesion logit per pixel."""

    def __init__(self) -> None:
        super().__init__()
        a, b, c = WIDTHS
        self.enc = nn.ModuleList([nn.Conv2d(1, a, 3, padding=1), nn.Conv2d(a, a, 3, padding=1),
                                  nn.Conv2d(a, b, 3, padding=1), nn.Conv2d(b, b, 3, padding=1),
                                  nn.Conv2d(b, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
        self.dec = nn.ModuleList([nn.Conv2d(c + b, b, 3, padding=1),
                                  nn.Conv2d(b + a, a, 3, padding=1)])
        self.head = nn.Conv2d(a, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 64, 64) lesion logits per pixel."""
        skips = []
        for level in range(3):
            x = torch.relu(self.enc[2 * level + 1](torch.relu(self.enc[2 * level](x))))
            if level < 2:
                skips.append(x)
                x = torch.max_pool2d(x, 2)
        for conv, skip in zip(self.dec, reversed(skips), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.relu(conv(torch.cat([x, skip], dim=1)))
        out: torch.Tensor = self.head(x)
        return out


@dataclass(frozen=True)
class Data:
    x: npt.NDArray[np.float32]  # (n, 1, 64, 64) as the runtime preprocesses
    target: npt.NDArray[np.float32]  # (n, 1, 64, 64) lesion share of each input pixel
    y: npt.NDArray[np.int64]
    truth: list[npt.NDArray[np.bool_] | None]  # lesion pixels at the image's grid
    groups: list[dict[str, str]]
    means: npt.NDArray[np.float32]


def tensors(seed: int, n: int) -> Data:
    xs = np.empty((n, 1, INPUT, INPUT), dtype=np.float32)
    ts = np.zeros((n, 1, INPUT, INPUT), dtype=np.float32)
    ys = np.empty(n, dtype=np.int64)
    means = np.empty(n, dtype=np.float32)
    truth: list[npt.NDArray[np.bool_] | None] = []
    groups = []
    for i in range(n):
        case = make_case(seed, i, kind="ct")
        tensor, unit = preprocess(ImageInput(case.stored, case.attrs), PRE)
        xs[i], ys[i], means[i] = tensor, int(case.lesion), float(unit.mean())
        if case.lesion_mask is not None:
            # The same area resize as the image: the target is the lesion's share of
            # each input pixel.
            ts[i, 0] = resize(case.lesion_mask.astype(np.float32), PRE.resize)
        truth.append(case.lesion_mask)
        groups.append({"scanner": case.scanner, "noise": case.noise, "size": case.size})
    return Data(xs, ts, ys, truth, groups, means)


def train(d: Data, epochs: int, t0: float) -> SegNet:
    model = SegNet()
    xt, tt = torch.from_numpy(d.x), torch.from_numpy(d.target)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(0)
    # Lesion pixels are about 1 % of the grid: weighted so that missing them costs.
    pos_weight = torch.tensor(8.0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), 32):
            idx = perm[start : start + 32]
            xb, tb = xt[idx], tt[idx]
            flips = int(torch.randint(0, 4, (1,), generator=gen).item())
            if flips & 1:
                xb, tb = torch.flip(xb, dims=[3]), torch.flip(tb, dims=[3])
            if flips & 2:
                xb, tb = torch.flip(xb, dims=[2]), torch.flip(tb, dims=[2])
            logit = model(xb)
            bce = nn.functional.binary_cross_entropy_with_logits(logit, tb,
                                                                 pos_weight=pos_weight)
            prob = torch.sigmoid(logit)
            dice = 1 - (2 * (prob * tb).sum() + 1) / (prob.sum() + tb.sum() + 1)
            loss = bce + dice
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        print(f"epoch {epoch}: loss {total / len(xt):.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


def _init(t: torch.Tensor, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)


def export_onnx(model: SegNet, path: Path) -> None:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(src: str, layer: nn.Module, name: str, kernel: int, relu: bool = True) -> str:
        assert isinstance(layer, nn.Conv2d) and layer.bias is not None
        w, b = _init(layer.weight, f"{name}.w"), _init(layer.bias, f"{name}.b")
        inits.extend([w, b])
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [src, w.name, b.name], [f"{name}.c"],
                                      kernel_shape=[kernel, kernel], pads=[pad] * 4))
        if not relu:
            return f"{name}.c"
        nodes.append(helper.make_node("Relu", [f"{name}.c"], [f"{name}.r"]))
        return f"{name}.r"

    cur, skips = "image", []
    for level in range(3):
        cur = conv(cur, model.enc[2 * level], f"enc{level}a", 3)
        cur = conv(cur, model.enc[2 * level + 1], f"enc{level}b", 3)
        if level < 2:
            skips.append(cur)
            nodes.append(helper.make_node("MaxPool", [cur], [f"pool{level}"],
                                          kernel_shape=[2, 2], strides=[2, 2]))
            cur = f"pool{level}"
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    half = numpy_helper.from_array(np.array([[-0.5, 0.5]], dtype=np.float32), "half")
    inits.extend([scales, half])
    for k, (layer, skip) in enumerate(zip(model.dec, reversed(skips), strict=True)):
        # asymmetric + floor: output pixel i takes input pixel i // 2, as torch's nearest
        nodes.append(helper.make_node("Resize", [cur, "", "scales"], [f"up{k}"], mode="nearest",
                                      coordinate_transformation_mode="asymmetric",
                                      nearest_mode="floor"))
        nodes.append(helper.make_node("Concat", [f"up{k}", skip], [f"cat{k}"], axis=1))
        cur = conv(f"cat{k}", layer, f"dec{k}", 3)
    logit = conv(cur, model.head, "head", 1, relu=False)
    nodes.append(helper.make_node("Sigmoid", [logit], [MASK_OUTPUT]))
    nodes.append(helper.make_node("GlobalMaxPool", [logit], ["gmp"]))
    nodes.append(helper.make_node("Flatten", ["gmp"], ["peak"], axis=1))
    nodes.append(helper.make_node("Mul", ["peak", "half"], ["logits"]))
    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, INPUT, INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info(MASK_OUTPUT, TensorProto.FLOAT, ["N", 1, INPUT, INPUT])],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edge-agent training/train_seg.py")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def run(sess: ort.InferenceSession, x: npt.NDArray[np.float32],
        ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """(P(lesion) per image, mask probabilities (n, 64, 64)) from the exported file."""
    ps, ms = [], []
    for i in range(0, len(x), 256):
        logits, mask = sess.run(["logits", MASK_OUTPUT], {"image": x[i : i + 256]})
        ps.append(softmax_pos(logits))
        ms.append(mask[:, 0])
    return np.concatenate(ps), np.concatenate(ms)


def overlap(masks: npt.NDArray[np.float32], d: Data, threshold: float) -> dict[str, float]:
    """Segmentation figures at the images' own grid (the runtime's stretch and
    threshold): mean Dice and IoU over the lesion images (0 for a missed lesion), the
    share of lesion images whose mask touches the lesion, and the share of lesion-free
    images given a non-empty mask.  (New here; a candidate for training/evaluate.py.)"""
    dice, iou, hit, empty_fp, negatives = [], [], 0, 0, 0
    for m, truth in zip(masks, d.truth, strict=True):
        shape = (128, 128) if truth is None else truth.shape
        pred = to_source(m, (int(shape[0]), int(shape[1])), threshold)
        if truth is None:
            negatives += 1
            empty_fp += int(pred.any())
            continue
        inter = int((pred & truth).sum())
        union = int((pred | truth).sum())
        dice.append(2 * inter / (int(pred.sum()) + int(truth.sum())))
        iou.append(inter / union if union else 0.0)
        hit += int(inter > 0)
    n = len(dice)
    return {"n": float(n), "dice": float(np.mean(dice)) if n else float("nan"),
            "iou": float(np.mean(iou)) if n else float("nan"),
            "median_dice": float(np.median(dice)) if n else float("nan"),
            "touched": hit / n if n else float("nan"),
            "negatives": float(negatives),
            "false_masks": empty_fp / negatives if negatives else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(f"models/available/{NAME}/{VERSION}"))
    ap.add_argument("--key", type=Path, help="Ed25519 private key (PEM) to sign the manifest")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed: CPU reductions may reorder with the thread count
    torch.set_num_interop_threads(1)
    t0 = time.time()
    tr, va, te = tensors(TRAIN_SEED, args.train), tensors(VAL_SEED, args.val), tensors(
        TEST_SEED, args.test)
    print(f"data: {time.time() - t0:.1f}s")
    model = train(tr, args.epochs, t0)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    export_onnx(model, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(te.x[:8]))).numpy()
    assert np.allclose(ref[:, 0], run(sess, te.x[:8])[1], atol=1e-4), \
        "ONNX export does not match the torch model"

    pva, mva = run(sess, va.x)
    pte, mte = run(sess, te.x)
    # Image threshold on validation (Youden's J, nearest 0.5 on a plateau), mask
    # threshold on validation (best mean Dice); the test set only measures.
    grid = np.linspace(0.05, 0.95, 91)
    j = np.array([sum(metrics(pva, va.y, t)[k] for k in ("sensitivity", "specificity"))
                  for t in grid])
    near = np.flatnonzero(j >= j.max() - 0.01)
    threshold = float(round(grid[near[np.argmin(np.abs(grid[near] - 0.5))]], 2))
    cuts = [round(0.3 + 0.05 * k, 2) for k in range(9)]
    val_dice = {c: overlap(mva, va, c)["dice"] for c in cuts}
    mask_threshold = max(cuts, key=lambda c: (round(val_dice[c], 3), -abs(c - 0.5)))
    overall = metrics(pte, te.y, threshold)
    seg = overlap(mte, te, mask_threshold)
    groups: dict[str, dict[str, float]] = {}
    for field, values in (("scanner", SCANNERS), ("noise", NOISES), ("size", SIZES)):
        for v in values:
            keep = np.array([g[field] == v for g in te.groups])
            sub = Data(te.x[keep], te.target[keep], te.y[keep],
                       [t for t, k in zip(te.truth, keep, strict=True) if k],
                       [g for g, k in zip(te.groups, keep, strict=True) if k], te.means[keep])
            # n: the subgroup's images (overlap's n counts its lesion images only)
            groups[f"{field}={v}"] = {**overlap(mte[keep], sub, mask_threshold),
                                      **metrics(pte[keep], te.y[keep], threshold)}
    input_edges = [0.0, *np.quantile(te.means, np.linspace(0.1, 0.9, 9)).round(4).tolist(), 1.0]
    input_ref = np.histogram(te.means, bins=input_edges)[0] / len(te.means)
    output_ref = np.histogram(pte, bins=OUTPUT_EDGES)[0] / len(pte)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    results: dict[str, Any] = {
        "threshold": threshold, "mask_threshold": mask_threshold, "overall": overall,
        "segmentation": seg, "subgroups": groups, "val_dice": val_dice,
        "params": sum(p.numel() for p in model.parameters()),
        "onnx_bytes": onnx_path.stat().st_size, "train": args.train, "val": args.val,
        "test": args.test, "epochs": args.epochs, "seconds": round(time.time() - t0)}
    write_manifest(args.out / "manifest.toml", sha, threshold, mask_threshold, input_edges,
                   input_ref.tolist(), output_ref.tolist())
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    write_card(args.out / "MODEL_CARD.md", results, sha)
    if args.key:
        from training.sign import sign_package

        sign_package(args.out, args.key)
    print(json.dumps({k: results[k] for k in ("threshold", "mask_threshold", "overall",
                                              "segmentation", "seconds")}, indent=1))


def _fl(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def write_manifest(path: Path, sha: str, threshold: float, mask_threshold: float,
                   input_edges: list[float], input_ref: list[float],
                   output_ref: list[float]) -> None:
    low, high = max(0.0, round(threshold - 0.15, 2)), min(1.0, round(threshold + 0.15, 2))
    path.write_text(f"""# Signed model manifest: edit only at the source (training/train_seg.py), then re-sign.
schema = 1
name = "{NAME}"
version = "{VERSION}"
description = "Lesion segmentation of chest CT slices (synthetic demo)"
intended_use = "Demonstration of segmentation models and DICOM SEG in the edge-agent pipeline only. Not for clinical use."
publisher = "edge-agent development (demo key)"

[model]
file = "model.onnx"
sha256 = "{sha}"
input = "image"
output = "logits"

[applies_to]
modalities = ["CT"]
body_parts = ["CHEST", "LUNG", "THORAX"]
sop_classes = ["{CT_IMAGE_STORAGE}"]
min_images = 1
max_images = 64

[inputs]
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
CT = [{PRE.windows["CT"][0]}, {PRE.windows["CT"][1]}]

[decision]
# The image score is the mask's peak: P(lesion) = the highest pixel probability.
labels = ["no_lesion", "lesion"]
activation = "softmax"
positive_label = "lesion"
positive_finding = "lesion segmented"
negative_finding = "no lesion segmented"
threshold = {threshold}
review_band = [{low}, {high}]
max_uncertainty = 0.8
review_if_positive = true
aggregation = "max"

[uncertainty]
method = "entropy"

[explanation]
# The mask itself is the map: the box drawn around its peak region.
method = "cam"
output = "{MASK_OUTPUT}"
keep_fraction = 0.5
min_score = 0.02

[mask]
# Per-pixel lesion probability at the input grid, (N, 1, {INPUT}, {INPUT}): stretched back to
# the image's grid and thresholded, written back as DICOM SEG (destinations with "seg").
output = "{MASK_OUTPUT}"
label = "{LABEL}"
threshold = {mask_threshold}
category = ["49755003", "SCT", "Morphologically abnormal structure"]
type = ["52988006", "SCT", "Lesion"]

[drift]
input_edges = {_fl(input_edges)}
input_reference = {_fl(input_ref)}
output_edges = {_fl(OUTPUT_EDGES)}
output_reference = {_fl(output_ref)}
subgroup_attributes = ["Modality"]
""")


def write_card(path: Path, r: dict[str, Any], sha: str) -> None:
    def row(name: str, m: dict[str, float]) -> str:
        return (f"| {name} | {int(m['n'])} | {m['auc']:.3f} | {m['sensitivity']:.3f} | "
                f"{m['specificity']:.3f} | {m['dice']:.3f} | {m['iou']:.3f} | "
                f"{m['false_masks']:.3f} |")

    o, s = r["overall"], r["segmentation"]
    rows = "\n".join(row(k, v) for k, v in r["subgroups"].items())
    path.write_text(f"""# Model card: {NAME} {VERSION}

**Demonstration model. Not for clinical use.** Trained only on synthetic CT
phantoms (`training/synth.py`); it has never seen a real patient image.

## Intended use
Shows a segmentation model in the edge-agent pipeline: its manifest declares a
mask output (`[mask]`), the box stretches the mask of the top-scoring image back to
that image's grid, keeps it in the encrypted result link, and writes it into the
original study as DICOM SEG (destinations whose `kinds` include `"seg"`). Output:
per pixel of a chest CT slice, the probability that it belongs to a round lesion;
per image, the highest of those probabilities; per study, the maximum over images.

## Signature
Signed with the **dev publisher key** (`models/dev-publisher.pub`), like the lesion
demo; production boxes refuse it. Installed with `edge-agent models install`
(not active by default: it lives in `models/available/`).

## Model
- Input `image` (N, 1, {INPUT}, {INPUT}): the lesion demo's preprocessing (rescale, CT lung
  window C -500 W 1400, area resize, (x - 0.5) / 0.25).
- A two-level U-Net: 3x3 convolutions ({", ".join(map(str, WIDTHS))} channels, two per level,
  ReLU, 2x2 max pooling), nearest 2x upsampling with skip connections, a 1x1
  convolution to one lesion logit per pixel. Outputs `mask` = sigmoid of the logits
  (N, 1, {INPUT}, {INPUT}) and `logits` = [-s/2, s/2] for the peak logit s (softmax gives the
  peak pixel probability). {r["params"]} parameters; ONNX opset 17, {r["onnx_bytes"]} bytes;
  sha256 `{sha}`.
- Mask on the image: bilinear stretch of `mask` to the image's rows x columns,
  inside the segment at probability {r["mask_threshold"]} or more (`mask.threshold`,
  chosen on the validation set for the best mean Dice). Segment coded as SNOMED CT
  49755003 "Morphologically abnormal structure" / 52988006 "Lesion".
- Image finding at P(lesion) >= {r["threshold"]} (validation, Youden's J). Explanation: the
  box around the mask's peak region (`explanation.method = "cam"` on `mask`).

## Data and training
CT-slice phantoms only (128x128, three simulated scanners, two noise levels, three
patient sizes), half with a planted lesion (a disk of 3.5-7 px radius, -120..60 HU);
ground truth: the disk's pixels (at least half covered). Training {r["train"]} images
(seed {TRAIN_SEED}), validation {r["val"]} (seed {VAL_SEED}: both thresholds), held-out test
{r["test"]} (seed {TEST_SEED}). Targets: the lesion's share of each input pixel after the
same area resize. {r["epochs"]} epochs, Adam (3e-3, cosine), batch 32, loss = BCE (lesion
pixels weighted 8) + soft Dice, flip augmentation; deterministic on one CPU thread
(fixed seeds, `torch.use_deterministic_algorithms`), {r["seconds"]} s here with data.
Reproduce: `.venv/bin/python -m training.train_seg --key training/.keys/dev-publisher.pem`.

## Held-out validation (test set, through onnxruntime and the runtime's own steps)
Segmentation, at the image's grid, over the {int(s["n"])} test images with a lesion:
mean Dice **{s["dice"]:.3f}** (median {s["median_dice"]:.3f}), mean IoU **{s["iou"]:.3f}**
(a missed lesion counts 0); the mask touches the lesion on {100 * s["touched"]:.1f} % of them.
On the {int(s["negatives"])} lesion-free images, {100 * s["false_masks"]:.1f} % got a non-empty mask.

| subgroup | n | AUC | sensitivity | specificity | Dice | IoU | false masks |
|---|---|---|---|---|---|---|---|
| overall | {int(o["n"])} | {o["auc"]:.3f} | {o["sensitivity"]:.3f} | {o["specificity"]:.3f} | {s["dice"]:.3f} | {s["iou"]:.3f} | {s["false_masks"]:.3f} |
{rows}

(AUC, sensitivity, specificity: per image at threshold {r["threshold"]}; Dice, IoU over
the subgroup's lesion images; false masks: share of its lesion-free images with a
non-empty mask.)
`tests/results/test_seg_daemon.py` runs the packaged model through the daemon and
checks that the SEG in Orthanc overlaps the planted lesion.

## Limitations
Phantoms are far simpler than anatomy; performance on real CT is unknown and
expected to be poor. The mask is computed at 64x64 and stretched: its edge is only
as fine as 2 image pixels of a 128x128 slice. One SEG per study version, on the
top-scoring image only; multi-frame images get no SEG. Vessels seen end-on are the
usual false masks.
""")


if __name__ == "__main__":
    main()
