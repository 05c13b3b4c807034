"""Manifest validation and the preprocessing it drives."""

from __future__ import annotations

import numpy as np
import pytest
from infer_helpers import DEMO

from agent.errors import ModelError
from agent.infer import load_manifest, parse_manifest
from agent.infer.preprocess import ImageInput, preprocess, resize, to_unit


def test_demo_manifest_parses() -> None:
    m = load_manifest(DEMO / "manifest.toml")
    assert m.name == "lesion-demo" and m.decision.positive_label == "lesion"
    assert m.preprocessing.resize == (64, 64)
    assert set(m.drift.subgroup_attributes) <= set(m.attributes)


def test_every_problem_is_reported_at_once() -> None:
    text = (DEMO / "manifest.toml").read_text()
    text = text.replace('positive_label = "lesion"', 'positive_label = "tumour"')
    text = text.replace("channels = 1", "channels = 2")
    text = text.replace('activation = "softmax"', 'activation = "relu"')
    text = text.replace('subgroup_attributes = ["Modality"]', 'subgroup_attributes = ["PatientID"]')
    with pytest.raises(ModelError) as err:
        parse_manifest(text.encode())
    message = str(err.value)
    assert "4 manifest problem(s)" in message
    for needle in ("tumour", "channels", "activation", "PatientID"):
        assert needle in message
    assert "fix:" in message


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
