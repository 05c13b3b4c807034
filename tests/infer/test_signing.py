"""Signature refusal in production, warn-and-allow in development."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from agent.errors import ModelError
from agent.infer import InferenceEngine, InferenceSettings, Registry, load_public_keys
from agent.infer.registry import enforce
from tests.helpers.infer import DEMO, DEV_PUB, PREVIOUS, Events, PackageMaker

CASES = ["unsigned", "tampered_model", "tampered_manifest", "unpinned_key"]
EXPECTED_STATUS = {"unsigned": "unsigned", "tampered_model": "tampered_model",
                   "tampered_manifest": "bad_signature", "unpinned_key": "unpinned_key"}


def _break(models: Path, how: str, other_key: Path) -> tuple[Path, ...]:
    """Damage the installed demo package; returns the keys to pin."""
    pkg = models / "lesion-demo" / DEMO.name
    if how == "unsigned":
        (pkg / "manifest.toml.sig").unlink()
    elif how == "tampered_model":
        # A realistic tamper: a still-valid model with one weight nudged.
        model = onnx.load(str(pkg / "model.onnx"))
        bias = model.graph.initializer[-1]
        values = numpy_helper.to_array(bias).copy()
        values[0] += 0.5
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        onnx.save(model, str(pkg / "model.onnx"))
    elif how == "tampered_manifest":
        text = (pkg / "manifest.toml").read_text()
        (pkg / "manifest.toml").write_text(text.replace("threshold = ", "threshold = 0.0#"))
    elif how == "unpinned_key":
        return (other_key,)  # signed by the dev key, which this box does not pin
    return (DEV_PUB,)


@pytest.mark.parametrize("shipped", [DEMO, PREVIOUS], ids=lambda p: p.name)
def test_shipped_demo_packages_verify_with_the_dev_key(shipped: Path) -> None:
    reg = Registry(shipped.parents[1], Path("/nonexistent-state"),
                   publisher_keys=load_public_keys((DEV_PUB,)), environment="production")
    pkg = reg.package("lesion-demo", shipped.name)
    assert pkg.verification.status == "verified"
    assert pkg.verification.sha256 == pkg.manifest.sha256


@pytest.mark.parametrize("how", CASES)
def test_production_refuses_with_clear_error_and_audit(
        how: str, demo_models: Path, tmp_path: Path, events: Events,
        publisher: tuple[Path, Path]) -> None:
    keys = _break(demo_models, how, publisher[1])
    reg = Registry(demo_models, tmp_path / "state", publisher_keys=load_public_keys(keys),
                   environment="production", audit=events)
    pkg = reg.package("lesion-demo", DEMO.name)
    assert pkg.verification.status == EXPECTED_STATUS[how]
    with pytest.raises(ModelError) as err:
        enforce(pkg, "production", events)
    message = str(err.value)
    assert "refused" in message and "fix:" in message
    assert events.named("model.refused")[0]["status"] == EXPECTED_STATUS[how]

    engine = InferenceEngine(InferenceSettings(demo_models, tmp_path / "state",
                                               environment="production", publisher_keys=keys),
                             audit=events)
    assert engine.active_models() == []
    assert events.named("model.not_loaded"), "a refused model must be audited at startup"
    engine.close()


@pytest.mark.parametrize("how", CASES)
def test_development_allows_with_warning_and_audit(
        how: str, demo_models: Path, tmp_path: Path, events: Events,
        publisher: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    keys = _break(demo_models, how, publisher[1])
    with caplog.at_level(logging.WARNING, logger="agent.infer.registry"):
        engine = InferenceEngine(InferenceSettings(demo_models, tmp_path / "state",
                                                   environment="development",
                                                   publisher_keys=keys), audit=events)
    models = engine.active_models()
    engine.close()
    # The tampered manifest still parses (threshold 0.0): loadable, but unverified.
    assert [m["verification"] for m in models] == [EXPECTED_STATUS[how]]
    assert events.named("model.unverified_allowed")
    assert any("not verified" in r.getMessage() for r in caplog.records)


def test_install_refuses_unsigned_package_in_production(
        tmp_path: Path, make_package: PackageMaker, publisher: tuple[Path, Path],
        events: Events) -> None:
    src = make_package("2.0.0", sign=False)
    reg = Registry(tmp_path / "models", tmp_path / "state",
                   publisher_keys=load_public_keys((publisher[1],)), environment="production",
                   audit=events)
    with pytest.raises(ModelError, match="unsigned"):
        reg.install(src)
    assert not (tmp_path / "models" / "lesion-demo" / "2.0.0").exists()
    assert events.named("model.refused")


def test_signature_file_garbage_is_reported_not_raised(demo_models: Path, tmp_path: Path) -> None:
    sig = demo_models / "lesion-demo" / DEMO.name / "manifest.toml.sig"
    sig.write_text("ed25519 abc not-base64!!\n")
    reg = Registry(demo_models, tmp_path / "s", publisher_keys=load_public_keys((DEV_PUB,)))
    assert reg.package("lesion-demo", DEMO.name).verification.status in ("bad_signature",
                                                                         "unpinned_key")
    shutil.rmtree(demo_models / "lesion-demo" / DEMO.name)
    assert reg.versions("lesion-demo") == []
