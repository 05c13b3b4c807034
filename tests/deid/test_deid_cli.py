"""`deid` and `reidentify` commands, registered into a Typer app as the CLI root does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
import typer
from typer.testing import CliRunner

from agent.crypto import write_secret_file
from agent.ops.devbox import provision_dev
from provisioning import deid_cmd
from tests.helpers import deid_canary as dc
from tests.helpers.deid import KEY, Recipient, sample_path


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()
    deid_cmd.register(root)
    return root


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "SMITH_JOHN"  # a PHI folder name must not reach OUT
    src.mkdir(parents=True)
    for i in range(2):
        (src / f"canary{i}.dcm").write_bytes(dc.to_bytes(dc.build(i).dataset))
    shutil.copy(sample_path("US1_UNCR.dcm"), src / "us.dcm")
    (src / "notes.txt").write_text("not dicom")
    return tmp_path / "in"


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_deid_without_config_warns_and_summarises(app: typer.Typer, inbox: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["deid", str(inbox), str(out)])
    assert result.exit_code == 1, result.output  # the text file failed
    assert "fresh random pseudonym key" in result.output
    assert "de-identified: 2" in result.output
    assert "quarantined: 1" in result.output and "modality US, SC" in result.output
    assert "failed: 1" in result.output and "notes.txt" in result.output
    files = _outputs(out)
    assert len(files) == 2  # never the quarantined one
    for f in files:
        assert "SMITH" not in str(f.relative_to(out))
        assert f.name.startswith("2.25.")
        assert dc.leaks(dc.build(0), f.read_bytes()) == []


def test_deid_with_config_uses_box_key_and_encrypts(
    app: typer.Typer, inbox: Path, tmp_path: Path, recipient: Recipient
) -> None:
    # A real box config (the daemon's own loader reads it), switched to encrypt.
    box = provision_dev(tmp_path / "etc")
    cfg_dir = box.root
    write_secret_file(cfg_dir / "keys" / "pseudonym.key", KEY.hex().encode())
    shutil.copy(recipient.cert_path, cfg_dir / "reid.pem")
    cfg = box.config
    text = cfg.read_text()
    assert '[deid]\nmode = "strip"\noptions = []\n' in text
    cfg.write_text(text.replace(
        '[deid]\nmode = "strip"\noptions = []\n',
        '[deid]\nmode = "encrypt"\noptions = ["retain_longitudinal_modified_dates"]\n'
        'recipients = ["reid.pem"]\n'))
    runs = []
    for name in ("out1", "out2"):
        result = CliRunner().invoke(app, ["deid", str(inbox), str(tmp_path / name), "--config", str(cfg)])
        assert "random pseudonym key" not in result.output
        assert "encrypt; options: retain_longitudinal_modified_dates" in result.output
        runs.append([p.relative_to(tmp_path / name) for p in _outputs(tmp_path / name)])
    assert runs[0] == runs[1]  # the box key makes the same names on every run
    back = tmp_path / "back"
    result = CliRunner().invoke(
        app, ["reidentify", str(tmp_path / "out1"), str(back), "--key", str(recipient.key_path)]
    )
    assert result.exit_code == 0, result.output
    assert "re-identified: 2" in result.output
    restored = [pydicom.dcmread(p) for p in _outputs(back)]
    assert {r.PatientID for r in restored} == {dc.PATIENT_ID}
    assert {r.PatientIdentityRemoved for r in restored} == {"NO"}


def test_cli_options_and_bad_settings(app: typer.Typer, inbox: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["deid", str(inbox), str(tmp_path / "o"), "--mode", "encrypt", "--option", "bogus"]
    )
    assert result.exit_code == 2
    assert "unknown deid option(s) bogus" in result.output
    assert "needs at least one recipient" in result.output
    result = CliRunner().invoke(app, ["deid", str(inbox), str(tmp_path / "o2"), "--option", "retain_uids"])
    assert "options: retain_uids" in result.output
