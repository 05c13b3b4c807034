"""Manifest validation and the preprocessing it drives."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import ModelError
from agent.infer import load_manifest, parse_manifest
from agent.infer.preprocess import ImageInput, preprocess, resize, to_unit
from tests.helpers.infer import DEMO


def test_demo_manifest_parses() -> None:
    m = load_manifest(DEMO / "manifest.toml")
    assert m.name == "lesion-demo" and m.decision.positive_label == "lesion"
    assert m.preprocessing.resize == (64, 64)
    assert set(m.drift.instance_subgroups) <= set(m.attributes)
    # Age band and sex: subgroups captured before de-identification, never model inputs.
    assert set(m.drift.subgroup_attributes) - set(m.drift.instance_subgroups) == {
        "PatientAge", "PatientSex"}
    assert not {"PatientAge", "PatientSex"} & set(m.attributes)


def test_every_problem_is_reported_at_once() -> None:
    text = (DEMO / "manifest.toml").read_text()
    text = text.replace('positive_label = "lesion"', 'positive_label = "tumour"')
    text = text.replace("channels = 1", "channels = 2")
    text = text.replace('activation = "softmax"', 'activation = "relu"')
    text = text.replace('subgroup_attributes = ["Modality", "PatientAge", "PatientSex"]',
                        'subgroup_attributes = ["PatientID", "PatientAge"]')
    with pytest.raises(ModelError) as err:
        parse_manifest(text.encode())
    message = str(err.value)
    assert "4 manifest problem(s)" in message
    for needle in ("tumour", "channels", "activation", "PatientID"):
        assert needle in message
    assert "fix:" in message


def _explanation(section: str) -> bytes:
    text = (DEMO / "manifest.toml").read_text()
    head, tail = text.split("[explanation]\n", 1)
    return (head + section + "\n" + tail[tail.index("\n["):]).encode()


def test_demo_explains_from_its_own_map() -> None:
    ex = load_manifest(DEMO / "manifest.toml").explanation
    assert ex.method == "cam" and ex.output == "cam" and 0 < ex.keep_fraction <= 1


@pytest.mark.parametrize(("section", "needles"), [
    ('[explanation]\nmethod = "cam"',
     ["explanation.output is missing: method 'cam' needs the name of the model output"]),
    ('[explanation]\nmethod = "cam"\noutput = "cam"\npatch = 12',
     ["explanation.patch does not apply to method 'cam' (only to occlusion)"]),
    ('[explanation]\nmethod = "occlusion"\noutput = "cam"',
     ["explanation.output does not apply to method 'occlusion' (only to cam)"]),
    ('[explanation]\nmethod = "gradcam"\noutput = "cam"',
     ["explanation.method must be one of ['cam', 'occlusion', 'none'], got 'gradcam'"]),
    ('[explanation]\nmethod = "cam"\noutput = "logits"',
     ["explanation.output 'logits' must name the model output that holds the map"]),
    ('[explanation]\nmethod = "cam"\noutput = "cam"\nkeep_fraction = 0\nmin_score = 1.5',
     ["keep_fraction must be in (0, 1]", "min_score must be in [0, 1)"]),
    ('[explanation]\nmethod = "occlusion"\npatch = 99\nstride = 0',
     ["patch and explanation.stride must be >= 1", "patch 99 is larger than the model input"]),
])
def test_explanation_section_is_checked_with_clear_errors(section: str,
                                                          needles: list[str]) -> None:
    with pytest.raises(ModelError) as err:
        parse_manifest(_explanation(section))
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert f"{len(needles)} manifest problem(s)" in message


def test_explanation_options_parse() -> None:
    occ = parse_manifest(_explanation('[explanation]\nmethod = "occlusion"\npatch = 12\n'
                                      'stride = 4\nkeep_fraction = 0.5')).explanation
    assert (occ.method, occ.patch, occ.stride, occ.output) == ("occlusion", 12, 4, "")
    none = parse_manifest(_explanation('[explanation]\nmethod = "none"')).explanation
    assert none.method == "none"


def test_not_toml_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="not valid UTF-8 TOML"):
        parse_manifest(b"name = ")


def test_monochrome1_is_inverted_and_rescale_applied() -> None:
    pre = load_manifest(DEMO / "manifest.toml").preprocessing
    ramp = np.tile(np.arange(0, 256, dtype=np.uint16), (64, 1))
    attrs = {"Modality": "DX", "PhotometricInterpretation": "MONOCHROME2"}
    mono2 = to_unit(ImageInput(ramp, attrs), pre)
    mono1 = to_unit(ImageInput(ramp, {**attrs, "PhotometricInterpretation": "MONOCHROME1"}), pre)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # CT: stored 0 with intercept -1024 is -1024 HU; the lung window (C -500,
    # W 1400) spans -1200..200 HU, so it maps to 176 / 1400.
    ct = to_unit(ImageInput(np.zeros((8, 8), np.uint16),
                            {"Modality": "CT", "RescaleSlope": 1.0, "RescaleIntercept": -1024.0}),
                 pre)
    assert float(ct.max()) == pytest.approx(176 / 1400)
    tensor, unit = preprocess(ImageInput(ramp, attrs), pre)
    assert tensor.shape == (1, 64, 64) and tensor.dtype == np.float32
    assert unit.shape == (64, 64)


def test_resize_keeps_a_small_bright_spot() -> None:
    img = np.zeros((128, 128), np.float32)
    img[60:64, 60:64] = 1.0  # 4x4 px: must survive 2x downscaling
    small = resize(img, (64, 64))
    assert small.max() == pytest.approx(1.0) and small.sum() == pytest.approx(4.0)
    assert resize(np.ones((100, 70), np.float32), (64, 64)).shape == (64, 64)
