"""Install, activate, rollback: atomic switches, history kept, every change recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer import Typer
from typer.testing import CliRunner

from agent.errors import ModelError
from agent.infer import InferenceEngine, InferenceSettings, Registry, load_public_keys
from provisioning.models_cmd import register
from tests.helpers.infer import Events, PackageMaker


@pytest.fixture
def registry(tmp_path: Path, publisher: tuple[Path, Path], events: Events) -> Registry:
    return Registry(tmp_path / "models", tmp_path / "state",
                    publisher_keys=load_public_keys((publisher[1],)),
                    environment="production", audit=events)


def test_highest_version_is_active_without_state(registry: Registry,
                                                  make_package: PackageMaker) -> None:
    registry.install(make_package("1.2.0"))
    registry.install(make_package("1.10.0"))
    assert registry.versions("lesion-demo") == ["1.2.0", "1.10.0"]  # numeric, not text order
    assert registry.active_version("lesion-demo") == "1.10.0"


def test_activate_then_rollback(registry: Registry, make_package: PackageMaker,
                                events: Events, tmp_path: Path,
                                publisher: tuple[Path, Path]) -> None:
    registry.install(make_package("1.0.0"))
    registry.install(make_package("1.1.0"))
    assert registry.activate("lesion-demo", "1.0.0") == "1.1.0"
    assert registry.active_version("lesion-demo") == "1.0.0"
    assert registry.activate("lesion-demo", "1.1.0") == "1.0.0"
    assert registry.rollback("lesion-demo") == "1.0.0"
    assert registry.active_version("lesion-demo") == "1.0.0"
    assert registry.rollback("lesion-demo") == "1.1.0"  # history: 1.1.0 was active before
    with pytest.raises(ModelError, match="no previous version"):
        registry.rollback("lesion-demo")

    kinds = [e for e, _ in events.items]
    assert kinds.count("model.installed") == 2
    assert kinds.count("model.activated") == 2 and kinds.count("model.rolled_back") == 2
    log = [json.loads(line) for line in
           (tmp_path / "state" / "models" / "changes.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log][-2:] == ["model.rolled_back", "model.rolled_back"]
    # No temp files left behind by the atomic state writes.
    assert sorted(p.name for p in (tmp_path / "state" / "models").iterdir()) == [
        "active.json", "changes.jsonl"]

    # The daemon's engine loads exactly the active version.
    engine = InferenceEngine(InferenceSettings(tmp_path / "models", tmp_path / "state",
                                               environment="production",
                                               publisher_keys=(publisher[1],)))
    assert [m["version"] for m in engine.active_models()] == ["1.1.0"]
    engine.close()


def test_activate_unknown_version_is_an_operator_error(registry: Registry,
                                                       make_package: PackageMaker) -> None:
    registry.install(make_package("1.0.0"))
    with pytest.raises(ModelError) as err:
        registry.activate("lesion-demo", "9.9.9")
    assert "installed: 1.0.0" in str(err.value) and "fix:" in str(err.value)


def test_reinstall_same_version_with_other_model_is_refused(
        registry: Registry, make_package: PackageMaker, tmp_path: Path) -> None:
    registry.install(make_package("1.0.0"))
    registry.install(make_package("1.0.0", where=tmp_path / "again"))  # identical: no-op
    other = make_package("1.0.0", where=tmp_path / "other",
                         onnx=(tmp_path / "models/lesion-demo/1.0.0/model.onnx").read_bytes()
                         + b"\x00")
    with pytest.raises(ModelError, match="bump the version"):
        registry.install(other)


def test_activation_refuses_a_package_tampered_after_install(
        registry: Registry, make_package: PackageMaker, tmp_path: Path) -> None:
    registry.install(make_package("1.0.0"))
    registry.install(make_package("1.1.0"))
    manifest = tmp_path / "models/lesion-demo/1.0.0/manifest.toml"
    manifest.write_text(manifest.read_text().replace("max_images = 64", "max_images = 65"))
    with pytest.raises(ModelError, match="refused"):
        registry.activate("lesion-demo", "1.0.0")
    assert registry.active_version("lesion-demo") == "1.1.0"


def test_cli_list_activate_rollback_verify(tmp_path: Path, make_package: PackageMaker,
                                           publisher: tuple[Path, Path]) -> None:
    app = Typer()
    register(app)
    runner = CliRunner()
    common = ["--models-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state"),
              "--publisher-key", str(publisher[1]), "--environment", "production"]
    for version in ("1.0.0", "2.0.0"):
        res = runner.invoke(app, ["models", "install", str(make_package(version)), *common])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["models", "activate", "lesion-demo", "1.0.0", *common])
    assert res.exit_code == 0 and "2.0.0 -> 1.0.0" in res.output
    res = runner.invoke(app, ["models", "list", "--json", *common])
    rows = {r["version"]: r for r in json.loads(res.output)}
    assert rows["1.0.0"]["active"] and rows["2.0.0"]["rollback_target"]
    assert {r["verification"] for r in rows.values()} == {"verified"}
    res = runner.invoke(app, ["models", "rollback", "lesion-demo", *common])
    assert res.exit_code == 0 and "1.0.0 -> 2.0.0" in res.output
    res = runner.invoke(app, ["models", "verify", *common])
    assert res.exit_code == 0 and res.output.count("ok ") == 2

    # Tamper one: verify now fails with exit 1 and says what to do.
    onnx_file = tmp_path / "models/lesion-demo/1.0.0/model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00")
    res = runner.invoke(app, ["models", "verify", *common])
    assert res.exit_code == 1 and "tampered_model" in res.output
    res = runner.invoke(app, ["models", "activate", "lesion-demo", "1.0.0", *common])
    assert res.exit_code == 2 and "refused" in res.output and "fix:" in res.output
