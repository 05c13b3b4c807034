"""A test whose peer program is missing is skipped on a developer machine and fails
under CI (CI=true): a green CI run has really talked to DCMTK, dicom3tools, GDCM,
openssl, Orthanc, mosquitto and systemd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PEERS, REPO, find_peer

# A cheap test that declares a peer (dicom3tools' dciodvfy, which lives in /usr/bin).
TARGET = "tests/deid/test_deid_dciodvfy.py::test_no_new_errors_after_pixel_clean"


def run_without_peers(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # an empty folder: no peer program on the PATH
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           TARGET], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_peer_fails_under_ci(tmp_path: Path, ci: str) -> None:
    p = run_without_peers(tmp_path, ci)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 error" in p.stdout, p.stdout
    assert "test peer dciodvfy is missing" in p.stdout
    assert "apt-get install dicom3tools" in p.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_a_missing_peer_is_a_skip_on_a_developer_machine(tmp_path: Path, ci: str | None) -> None:
    p = run_without_peers(tmp_path, ci)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 skipped" in p.stdout
    assert "test peer dciodvfy is missing (apt-get install dicom3tools" in p.stdout


def test_every_declared_peer_is_known_and_a_typo_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown test peer"):
        find_peer("storscu")
    assert set(PEERS) >= {"storescu", "echoscu", "mosquitto", "Orthanc", "dciodvfy",
                          "gdcmanon", "openssl", "systemd-analyze"}
