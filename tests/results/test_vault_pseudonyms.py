"""[deid] pseudonyms = "vault" through the running daemon: the published codes are
random (not the keyed HMAC of the original), consistent per patient across studies,
restarts and a KEK rotation, and the map on disk names no original value."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from agent.crypto import load_key_file
from agent.deid import Deidentifier, DeidSettings
from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, set_config, storescu
from tests.helpers.results import PATIENT_ID, PATIENT_NAME, original_study

pytestmark = [pytest.mark.peer("storescu")]


def _send(box: Box, ops: Subscriber, files: list[Path], n: int) -> dict[str, object]:
    daemon = Daemon(box)
    daemon.start()
    try:
        assert storescu(box.dicom_port, files).returncode == 0
        msgs = ops.wait("results", n, timeout=180)
    finally:
        daemon.stop()
    data = msgs[n - 1].json()["data"]
    assert isinstance(data, dict)
    return data


def test_vault_codes_are_random_consistent_and_survive_rotation(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    set_config(box, "deid", "pseudonyms", '"vault"')
    first = original_study(tmp_path / "a", seed=5)
    second = original_study(tmp_path / "b", seed=6)
    third = original_study(tmp_path / "c", seed=7)

    a = _send(box, ops, list(first.files), 1)
    b = _send(box, ops, list(second.files), 2)
    assert "pseudonyms: vault" in a["deidentification"]["method"]  # type: ignore[index]
    # One patient, one code; two studies, two codes.
    assert a["study"]["patient_ref"] == b["study"]["patient_ref"]  # type: ignore[index]
    assert a["study"]["ref"] != b["study"]["ref"]  # type: ignore[index]

    # Not the keyed derivation of the original (what "keyed" mode would publish).
    key = load_key_file(box.root / "keys" / "pseudonym.key", purpose="pseudonym")
    keyed = Deidentifier(DeidSettings(), key).deidentify(pydicom.dcmread(first.files[0]))
    assert a["study"]["patient_ref"] != keyed.patient_ref  # type: ignore[index]
    assert a["study"]["ref"] != keyed.study_ref  # type: ignore[index]

    vault = box.state / "deid" / "vault.db"
    assert vault.stat().st_mode & 0o777 == 0o600
    raw = b"".join(p.read_bytes() for p in vault.parent.iterdir() if p.is_file())
    for value in (PATIENT_ID, PATIENT_NAME, first.study_uid, str(a["study"]["patient_ref"])):
        assert value.encode() not in raw

    # A KEK rotation re-wraps the map: the same patient keeps the same code.
    rotated = subprocess.run([*EDGE_AGENT, "keys", "rotate", "--config", str(box.config)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rotated.returncode == 0, rotated.stderr
    c = _send(box, ops, list(third.files), 3)
    assert c["study"]["patient_ref"] == a["study"]["patient_ref"]  # type: ignore[index]

    # Crypto-shredding the map (daemon stopped, admin, confirmed) ends the linkage:
    # the same patient gets a new code from then on.
    unconfirmed = subprocess.run([*EDGE_AGENT, "keys", "shred-vault", "--config",
                                  str(box.config)], cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    shred = subprocess.run([*EDGE_AGENT, "keys", "shred-vault", "--yes", "--config",
                            str(box.config)], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert shred.returncode == 0, shred.stderr
    assert "pseudonym vault shredded" in shred.stdout
    fourth = original_study(tmp_path / "d", seed=8)
    d = _send(box, ops, list(fourth.files), 4)
    assert d["study"]["patient_ref"] != a["study"]["patient_ref"]  # type: ignore[index]
