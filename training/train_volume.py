"""Train, export and package the CT volume demo model — deterministically.

    .venv/bin/python -m training.train_volume [--out models/available/ct-nodule-volume/1.0.0]
                                              [--key training/.keys/dev-publisher.pem]

A small 3-D network over a whole CT series resampled to a 32x64x64 grid by the
runtime's own code (agent/infer/resample.py, agent/infer/preprocess.py), trained
on the synthetic series of training/synth_volume.py: dense nodules (spheres)
among vessels (tubes) and soft tissue.  Same two-stage
recipe as the 2-D demo (training/train.py): features through a global max pool
and a linear layer first, then that layer becomes a 1x1x1 map head and the
score is the map's maximum, so the map explains the score.  PyTorch is a
dev-only dependency; the ONNX graph is written by hand.
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
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from agent.infer.manifest import Preprocessing
from agent.infer.preprocess import ImageInput, to_unit
from agent.infer.resample import assemble
from training.evaluate import (
    auc,
    card_row,
    metrics,
    preprocessing_toml,
    run_with_map,
    write_package,
    youden_threshold,
)
from training.export import deterministic, fold, write_onnx
from training.synth_volume import ATTRS, CT_IMAGE_STORAGE, FOV_MM, make_spec, series_slices

NAME = "ct-nodule-volume"
VERSION = "1.0.0"
TRAIN_SEED, VAL_SEED, TEST_SEED = 4101, 4202, 4303
DEPTH, INPUT = 32, 64
WIDTHS = (8, 16, 32)
POOLS = 1  # after the second convolution; the first has stride 2
CAM = "cam"
MIN_SLICES = 24
# A calcium window (C 400, W 800): air, lung, soft tissue and vessels all sit near 0 and a
# calcified nodule stands out.  In the lung window the body/air and lung/body edges are as
# strong as the nodule, every random feature's maximum lies on an edge, and the global max
# pool never passed a gradient through a nodule: training sat at chance.
WINDOW = (400.0, 800.0)
PRE = Preprocessing(rescale=True, voi="window", windows={"CT": WINDOW},
                    percentile=(1.0, 99.0), invert_monochrome1=True, resize=(INPUT, INPUT),
                    mean=0.5, std=0.25, channels=1)


class VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = (1, *WIDTHS)
        # The first convolution has stride 2: wide early layers at the grid's full
        # resolution cost too much CPU, and four narrow ones (4, 8, 16, 16 channels) never
        # left chance level here (too few random features to start from).
        self.convs = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], 3, padding=1,
                                             stride=2 if i == 0 else 1)
                                   for i in range(len(WIDTHS)))
        # Batch norm (folded into the convolutions at export): without it both stages sat
        # at chance for five epochs here, with or without He initialisation.
        self.norms = nn.ModuleList(nn.BatchNorm3d(c) for c in WIDTHS)
        self.fc = nn.Linear(WIDTHS[-1], 1)  # stage 1 only
        nn.init.zeros_(self.fc.weight)  # start at p = 0.5, not at a loss of 7
        self.head = nn.Conv3d(WIDTHS[-1], 1, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = torch.relu(norm(conv(x)))
            if i == 1:
                x = torch.max_pool3d(x, 2)
        return x

    def pooled_logit(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.amax(self.features(x), dim=(2, 3, 4)))[:, 0]
        return out

    def start_map_head(self) -> None:
        with torch.no_grad():
            self.head.weight.copy_(self.fc.weight.view_as(self.head.weight))
            assert self.head.bias is not None
            self.head.bias.copy_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(self.features(x))
        return torch.amax(cam, dim=(1, 2, 3, 4)), cam

    def shipped_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("fc."))


def grid(seed: int, index: int) -> tuple[npt.NDArray[np.float32], Any]:
    """One series through the runtime's resampling and preprocessing."""
    spec = make_spec(seed, index)
    slices = series_slices(spec, seed, index)
    unit = assemble(spec.slices, DEPTH, (INPUT, INPUT),
                    lambda _i: to_unit(ImageInput(next(slices), ATTRS), PRE))
    return (unit - np.float32(PRE.mean)) / np.float32(PRE.std), spec


def dataset(seed: int, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], list[Any]]:
    xs = np.empty((n, 1, DEPTH, INPUT, INPUT), dtype=np.float32)
    ys = np.empty(n, dtype=np.int64)
    specs = []
    for i in range(n):
        xs[i, 0], spec = grid(seed, i)
        ys[i] = int(spec.nodule is not None)
        specs.append(spec)
    return xs, ys, specs


def fit(model: VolumeNet, stage: int, xt: torch.Tensor, yt: torch.Tensor, epochs: int,
        lr: float, t0: float) -> None:
    params = [p for n, p in model.named_parameters()
              if not n.startswith("head." if stage == 1 else "fc.")]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(stage)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), 4):
            idx = perm[start : start + 4]
            xb = xt[idx]
            if int(torch.randint(0, 2, (1,), generator=gen).item()):
                xb = torch.flip(xb, dims=[4])  # left/right: nodules in either lung
            logit = model.pooled_logit(xb) if stage == 1 else model(xb)[0]
            loss = nn.functional.binary_cross_entropy_with_logits(logit, yt[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
        print(f"stage {stage} epoch {epoch}: loss {total / len(xt):.4f} ({time.time() - t0:.0f}s)",
              flush=True)


def export(model: VolumeNet, path: Path) -> None:
    nodes, inits = [], []
    cur = "volume"
    for i, (conv, norm) in enumerate(zip(model.convs, model.norms, strict=True)):
        assert isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)
        weight, bias = fold(conv, norm)
        w = numpy_helper.from_array(weight, f"conv{i}.w")
        b = numpy_helper.from_array(bias, f"conv{i}.b")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [cur, w.name, b.name], [f"c{i}"],
                                      kernel_shape=[3, 3, 3], pads=[1] * 6,
                                      strides=[2 if i == 0 else 1] * 3))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        cur = f"r{i}"
        if i == 1:
            nodes.append(helper.make_node("MaxPool", [cur], [f"p{i}"], kernel_shape=[2, 2, 2],
                                          strides=[2, 2, 2]))
            cur = f"p{i}"
    assert model.head.bias is not None
    hw = numpy_helper.from_array(model.head.weight.detach().numpy(), "head.w")
    hb = numpy_helper.from_array(model.head.bias.detach().numpy(), "head.b")
    half = numpy_helper.from_array(np.array([[-0.5, 0.5]], dtype=np.float32), "half")
    inits += [hw, hb, half]
    nodes.append(helper.make_node("Conv", [cur, "head.w", "head.b"], [CAM], kernel_shape=[1, 1, 1]))
    nodes.append(helper.make_node("GlobalMaxPool", [CAM], ["gmp"]))
    nodes.append(helper.make_node("Flatten", ["gmp"], ["peak"], axis=1))
    nodes.append(helper.make_node("Mul", ["peak", "half"], ["logits"]))
    d, m = DEPTH >> 2, INPUT >> 2
    graph = helper.make_graph(
        nodes, NAME,
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["N", 1, DEPTH, INPUT, INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info(CAM, TensorProto.FLOAT, ["N", 1, d, m, m])], inits)
    write_onnx(graph, "edge-agent training/train_volume.py", path)


def pointing(cams: npt.NDArray[np.float32], specs: list[Any]) -> float:
    """Share of nodule series whose map peaks within one map cell of the nodule."""
    hits = total = 0
    d, m = cams.shape[2], cams.shape[3]
    for cam, spec in zip(cams, specs, strict=True):
        if spec.nodule is None:
            continue
        total += 1
        kd, ky, kx = np.unravel_index(int(np.argmax(cam[0])), cam[0].shape)
        nx, ny, nz = spec.nodule.centre
        extent = spec.spacing * spec.slices  # the grid covers the slices' extent
        gz = (nz + spec.spacing / 2) / extent * d - 0.5
        gy = (ny + FOV_MM / 2) / FOV_MM * m - 0.5
        gx = (nx + FOV_MM / 2) / FOV_MM * m - 0.5
        hits += int(max(abs(kd - gz), abs(ky - gy), abs(kx - gx)) <= 1.0)
    return hits / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(f"models/available/{NAME}/{VERSION}"))
    ap.add_argument("--key", type=Path)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--val", type=int, default=80)
    ap.add_argument("--test", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--map-epochs", type=int, default=8)
    args = ap.parse_args()
    deterministic()
    t0 = time.time()
    xtr, ytr, _ = dataset(TRAIN_SEED, args.train)
    xva, yva, _ = dataset(VAL_SEED, args.val)
    xte, yte, ste = dataset(TEST_SEED, args.test)
    print(f"data: {time.time() - t0:.0f}s")
    model = VolumeNet()
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr).float()
    fit(model, 1, xt, yt, args.epochs, 3e-3, t0)
    model.start_map_head()
    fit(model, 2, xt, yt, args.map_epochs, 5e-4, t0)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    export(model, onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(xte[:4]))[0].numpy()
    got = sess.run(["logits"], {"volume": xte[:4]})[0]
    assert np.allclose(ref, got[:, 1] - got[:, 0], atol=1e-3), "ONNX export differs"

    sva, _ = run_with_map(sess, "volume", CAM, xva)
    threshold = youden_threshold(sva, yva)
    s_te, cams = run_with_map(sess, "volume", CAM, xte)
    overall = metrics(s_te, yte, threshold)
    point = pointing(cams, ste)
    slices = np.array([s.slices for s in ste])
    groups = {f"{lo}-{hi} slices": metrics(s_te[(slices >= lo) & (slices <= hi)],
                                           yte[(slices >= lo) & (slices <= hi)], threshold)
              for lo, hi in ((40, 79), (80, 120))}
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    results = {"threshold": threshold, "overall": overall, "subgroups": groups,
               "pointing": point, "params": model.shipped_parameters(),
               "onnx_bytes": onnx_path.stat().st_size, "train": args.train, "val": args.val,
               "test": args.test, "epochs": args.epochs, "map_epochs": args.map_epochs,
               "val_auc": auc(sva, yva), "seconds": round(time.time() - t0)}
    write_package(args.out, results, sha, args.key,
                  manifest=lambda path: write_manifest(path, sha, threshold), card=write_card)
    print(json.dumps(results, indent=1))


def write_manifest(path: Path, sha: str, threshold: float) -> None:
    low, high = max(0.0, round(threshold - 0.15, 2)), min(1.0, round(threshold + 0.15, 2))
    path.write_text(f"""# Signed model manifest: edit only at the source (training/train_volume.py), then re-sign.
schema = 1
name = "{NAME}"
version = "{VERSION}"
description = "Nodule detector over a whole chest CT series (3-D, synthetic demo)"
intended_use = "Demonstration of volume models in the edge-agent pipeline only. Not for clinical use."
publisher = "edge-agent development (demo key)"

[model]
file = "model.onnx"
sha256 = "{sha}"
input = "volume"
output = "logits"

[input]
# One series -> one (1, 1, {DEPTH}, {INPUT}, {INPUT}) grid: slices sorted along their normal,
# spacing checked, resampled slice by slice (agent/infer/volume.py, resample.py).
kind = "volume"
depth = {DEPTH}
spacing_tolerance = 0.1

[applies_to]
# CT series of at least {MIN_SLICES} slices (the largest applicable series of the study).
modalities = ["CT"]
body_parts = ["CHEST", "LUNG", "THORAX"]
sop_classes = ["{CT_IMAGE_STORAGE}"]
min_images = {MIN_SLICES}
max_images = 2000

[inputs]
attributes = ["Modality", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"]

{preprocessing_toml(PRE)}

[preprocessing.windows]
CT = [{WINDOW[0]}, {WINDOW[1]}]

[decision]
labels = ["no_nodule", "nodule"]
activation = "softmax"
positive_label = "nodule"
positive_finding = "pulmonary nodule suspected in the series"
negative_finding = "no nodule found in the series"
threshold = {threshold}
review_band = [{low}, {high}]
max_uncertainty = 0.8
review_if_positive = true
aggregation = "max"

[uncertainty]
method = "entropy"

[explanation]
method = "cam"
output = "{CAM}"
keep_fraction = 0.5
min_score = 0.02

[drift]
input_edges = [0, 0.2, 0.25, 0.3, 0.35, 0.4, 1]
input_reference = [0.1, 0.2, 0.2, 0.2, 0.2, 0.1]
output_edges = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1]
output_reference = [0.45, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.02, 0.45]
subgroup_attributes = ["Modality"]
""")


def write_card(path: Path, r: dict[str, Any], sha: str) -> None:
    rows = "\n".join(card_row(k, v) for k, v in r["subgroups"].items())
    path.write_text(f"""# Model card: {NAME} {VERSION}

**Demonstration model. Not for clinical use.** Trained only on synthetic
phantoms (`training/synth_volume.py`); it has never seen a real CT.

## Intended use
Shows a volume model in the edge-agent pipeline: a whole CT series, sorted by
ImagePositionPatient along the slice normal, spacing checked, resampled to the
model's {DEPTH}x{INPUT}x{INPUT} grid slice by slice (bounded memory), scored in one
run. Output: probability that the series contains a nodule (a sphere of 7-11 mm
radius in a lung, calcified: 500-1000 HU), among vessels (tubes of 2.5-5 mm radius, 30 HU)
and soft tissue.

## Signature
Meant to be signed with the **dev publisher key** (`models/dev-publisher.pub`),
like the lesion demo; production boxes refuse it.

## Model
- Applies to CT series of at least {MIN_SLICES} slices (`applies_to.min_images`),
  body part chest/lung/thorax or empty; the study's largest such series.
- Input `volume` (N, 1, {DEPTH}, {INPUT}, {INPUT}): a calcium window (C 400, W 800),
  (x - 0.5) / 0.25. Three 3x3x3 convolutions ({", ".join(map(str, WIDTHS))} channels, the first
  with stride 2, ReLU, 2x2x2 max pooling after the second; batch norm in training,
  folded into them in the export), a 1x1x1 convolution to a nodule-evidence
  map (output `{CAM}`, {DEPTH >> 2}x{INPUT >> 2}x{INPUT >> 2}), score = the map's maximum s;
  `logits` = [-s/2, s/2]. {r["params"]} parameters; ONNX opset 17, {r["onnx_bytes"]} bytes;
  sha256 `{sha}`.
- Explanation: the map's peak cell gives the slice (nearest source slice along
  the normal) and the in-plane box on it.

## Data and training
Synthetic series of 40-120 slices over 200-300 mm (spacing varies per series),
128x128 slices over a 320 mm field of view, HU noise 10-35, patient scale
0.8-1.05; half with a nodule. Training {r["train"]} series (seed {TRAIN_SEED}),
threshold on {r["val"]} validation series (seed {VAL_SEED}, Youden's J), held-out
test {r["test"]} series (seed {TEST_SEED}). Every series went through the runtime's own
resampling. {r["epochs"]} epochs through a global max pool and a linear layer, then
{r["map_epochs"]} through the map head (Adam, BCE, left/right flips); deterministic on one
CPU thread ({r["seconds"]} s here including data).
Reproduce: `.venv/bin/python -m training.train_volume --key training/.keys/dev-publisher.pem`.

## Held-out validation (per series, threshold {r["threshold"]})
| subgroup | n | AUC | sensitivity | specificity |
|---|---|---|---|---|
{card_row("overall", r["overall"])}
{rows}

A calcified nodule in a calcium window is an easy task: these figures show that
the series reaches the model intact (sorted, checked, resampled), not that the
model is good. Earlier runs with soft-tissue nodules in the lung window stayed
at chance within the few minutes of CPU this demo may take.
Validation-set AUC {r["val_auc"]:.3f}. Localisation on the held-out nodule
series: the map's peak lies within one map cell of the nodule centre in
{100 * r["pointing"]:.0f} % of them.
`tests/infer/test_volume_model.py` runs it through the daemon on a shuffled series.

## Limitations
Phantoms are far simpler than anatomy; performance on real CT is unknown and
expected to be poor. One finding per series (the map's peak). Series with
uneven or missing slices are refused with a reason code, not resampled.
""")


if __name__ == "__main__":
    main()
