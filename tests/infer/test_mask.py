"""Mask outputs: the manifest's [mask] declaration, the mask back on the image's grid,
its packed form, and the shipped segmentation model through the engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelError
from agent.infer import InferenceEngine, InferenceSettings
from agent.infer.manifest import DEFAULT_CATEGORY, DEFAULT_TYPE, MaskOutput, parse_manifest
from agent.infer.mask import to_source
from agent.types import SegMask
from tests.helpers.infer import DEV_PUB, REPO, Events, study
from training.synth import make_case

SEG_MODEL = REPO / "models" / "available" / "lesion-seg" / "1.0.0"
DEMO_MANIFEST = REPO / "models" / "lesion-demo" / "1.1.0" / "manifest.toml"
SEED = 7707  # not a training, validation or test seed of lesion-seg


def _with_mask(section: str) -> bytes:
    return DEMO_MANIFEST.read_bytes() + b"\n[mask]\n" + section.encode()


def test_mask_declaration_is_parsed_with_its_codes() -> None:
    spec = parse_manifest(_with_mask('output = "seg"\nlabel = "lesion"\nthreshold = 0.4\n'
                                     'category = ["49755003", "SCT", "Morphologically '
                                     'abnormal structure"]\ntype = ["52988006", "SCT", '
                                     '"Lesion"]\n')).mask
    assert spec == MaskOutput("seg", "lesion", 0.4, DEFAULT_CATEGORY, DEFAULT_TYPE)
    assert parse_manifest(_with_mask('output = "seg"\nlabel = "x"\n')).mask == MaskOutput(
        "seg", "x", 0.5)


@pytest.mark.parametrize(("section", "says"), [
    ('output = "seg"\nlabel = "lesion"\nthreshold = 1.5\n', "mask.threshold must be between"),
    ('output = "seg"\nlabel = "lesion"\ntype = ["52988006", "SCT"]\n',
     r"mask.type must be \[code value, coding scheme, meaning\]"),
    ('output = "seg"\nlabel = "lesion"\ncategory = "lesion"\n', "mask.category must be"),
    ('output = "seg"\nlabel = "lesion"\nkind = "mask"\n', "mask.kind is not a known key"),
    ('output = "logits"\nlabel = "lesion"\n', "must name the model output that holds the mask"),
    ('label = "lesion"\n', r"\[mask\] needs output"),
])
def test_a_bad_mask_declaration_is_refused_with_what_to_fix(section: str, says: str) -> None:
    with pytest.raises(ModelError, match=says) as err:
        parse_manifest(_with_mask(section))
    assert err.value.hint and "re-sign" in err.value.hint


def test_the_mask_is_stretched_back_to_the_image_grid() -> None:
    prob = np.zeros((4, 4), dtype=np.float32)
    prob[1, 2] = 1.0  # one map cell: 32x32 image pixels around (rows 32-63, cols 64-95)
    pixels = to_source(prob, (128, 128), 0.5)
    ys, xs = np.nonzero(pixels)
    assert 32 <= ys.min() and ys.max() <= 63 and 64 <= xs.min() and xs.max() <= 95
    assert to_source(prob, (300, 200), 0.5).shape == (300, 200)  # non-square, other size
    with pytest.raises(ModelError, match="not a finite 2-D map"):
        to_source(np.full((4, 4), np.nan, dtype=np.float32), (8, 8), 0.5)


def test_a_packed_mask_round_trips_and_refuses_wrong_bits() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((37, 51)) > 0.9
    seg = SegMask(0, 0, 37, 51, SegMask.pack(mask))
    assert np.array_equal(seg.pixels(), mask)
    assert "bits" not in repr(seg)
    with pytest.raises(ValueError, match="do not hold"):
        SegMask(0, 0, 38, 51, seg.bits).pixels()


def _engine(tmp_path: Path, events: Events) -> InferenceEngine:
    models = tmp_path / "models"
    shutil.copytree(SEG_MODEL, models / "lesion-seg" / "1.0.0")
    return InferenceEngine(InferenceSettings(models, tmp_path / "state",
                                             publisher_keys=(DEV_PUB,)), audit=events)


def test_the_shipped_seg_model_segments_the_planted_lesion(tmp_path: Path) -> None:
    events = Events()
    eng = _engine(tmp_path, events)
    try:
        assert [m["name"] for m in eng.active_models()] == ["lesion-seg"]
        assert eng.manifest_of("lesion-seg", "1.0.0").mask is not None  # type: ignore[union-attr]
        cases = [make_case(SEED, i, kind="ct", noise="low", lesion=i == 1) for i in range(3)]
        (out,), failures = eng.infer(study(cases))
        (neg,), _ = eng.infer(study([make_case(SEED, 9, kind="ct", noise="low",
                                               lesion=False)], "negative"))
    finally:
        eng.close()
    assert not failures
    assert out.finding == "lesion segmented" and out.mask is not None
    assert out.mask.index == 1 and (out.mask.rows, out.mask.cols) == (128, 128)
    truth = cases[1].lesion_mask
    assert truth is not None
    got = out.mask.pixels()
    dice = 2 * int((got & truth).sum()) / (int(got.sum()) + int(truth.sum()))
    assert dice > 0.5, dice
    assert out.explanation["mask"] == {"pixels": int(got.sum()),
                                       "area_fraction": round(int(got.sum()) / 128**2, 6)}
    # A negative study gets no mask (no SEG), and says so in numbers.
    assert neg.mask is None and neg.explanation["mask"] == {"pixels": 0, "area_fraction": 0.0}


def test_a_mask_output_of_the_wrong_shape_refuses_the_model_at_load(
        tmp_path: Path, publisher: tuple[Path, Path]) -> None:
    """Two channels where one map per image is expected: not loaded, with the shapes."""
    import onnx
    from onnx import helper

    from agent.infer.signing import file_sha256
    from training.sign import sign_package

    pkg = tmp_path / "models" / "lesion-seg" / "1.0.0"
    shutil.copytree(SEG_MODEL, pkg)
    (pkg / "manifest.toml.sig").unlink()
    proto = onnx.load(str(pkg / "model.onnx"))
    for node in proto.graph.node:
        node.output[:] = ["one" if o == "mask" else o for o in node.output]
    proto.graph.node.append(helper.make_node("Concat", ["one", "one"], ["mask"], axis=1))
    for o in proto.graph.output:
        if o.name == "mask":
            o.type.tensor_type.shape.dim[1].dim_value = 2
    (pkg / "model.onnx").write_bytes(proto.SerializeToString())
    text = (pkg / "manifest.toml").read_text()
    (pkg / "manifest.toml").write_text(text.replace(file_sha256(SEG_MODEL / "model.onnx"),
                                                    file_sha256(pkg / "model.onnx")))
    sign_package(pkg, publisher[0])
    events = Events()
    eng = InferenceEngine(InferenceSettings(tmp_path / "models", tmp_path / "state",
                                            publisher_keys=(publisher[1],)), audit=events)
    try:
        assert eng.active_models() == []
    finally:
        eng.close()
    (refused,) = events.named("model.not_loaded")
    assert "mask output 'mask' has shape [1, 2, 64, 64]" in str(refused["reason"])
