"""Through the real entry points: a modality sends a study to the running daemon with
[results] enabled; the result published over MQTT stays PHI-free, and
`edge-agent results preview` writes an SR, GSPS and key image that land in the
original study.  With [results] off (the default) nothing is linked."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, audit_events, set_config, storescu
from tests.helpers.results import (
    ACCESSION,
    DCIODVFY,
    PATIENT_ID,
    PATIENT_NAME,
    original_study,
    uids_in,
)

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None or DCIODVFY is None,
                                reason="DCMTK storescu / dciodvfy not installed")


def _preview(box: Box, ref: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, "results", "preview", ref, "--out", str(out),
                           "--config", str(box.config)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_enabled_box_links_the_study_and_previews_objects_in_it(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    set_config(box, "results", "enabled", "true")
    daemon = Daemon(box)
    daemon.start()
    try:
        originals = original_study(tmp_path / "study")
        proc = storescu(box.dicom_port, list(originals.files))
        assert proc.returncode == 0, proc.stderr
        (msg,) = ops.wait("results", 1, timeout=120)
    finally:
        daemon.stop()
    event = msg.json()
    data = event["data"]
    assert data["status"] == "ok" and data["models"][0]["name"] == "lesion-demo"
    assert "sources" not in data["models"][0]  # box-local, not published
    blob = msg.payload.decode()
    for value in (PATIENT_NAME, PATIENT_ID, ACCESSION, originals.study_uid, *originals.sop_uids):
        assert value not in blob
    ref = str(data["study"]["ref"])

    out = tmp_path / "preview"
    done = _preview(box, ref[:16], out)
    assert done.returncode == 0, done.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["gsps-v1-lesion-demo.dcm", "sc-v1-lesion-demo.dcm",
                                       "sr-v1.dcm"]
    assert out.stat().st_mode & 0o777 == 0o700
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600
        check = subprocess.run([DCIODVFY or "dciodvfy", str(f)], capture_output=True, text=True)
        assert not [ln for ln in (check.stdout + check.stderr).splitlines()
                    if ln.startswith("Error")], f.name
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == originals.study_uid and ds.PatientID == PATIENT_ID
        assert str(ds.PatientName) == PATIENT_NAME
    sr = pydicom.dcmread(out / "sr-v1.dcm")
    referenced = uids_in(str(sr.CurrentRequestedProcedureEvidenceSequence))
    assert set(originals.sop_uids) <= referenced

    # Audited: the link when written (pseudonymous details), the export with its user.
    events = audit_events(box)
    written = [e for e in events if e["event"] == "results.link_written"]
    assert written and written[0]["details"]["study"] == ref
    exported = [e for e in events if e["event"] == "results.exported"]
    assert exported and exported[-1]["details"]["objects"] == ["sr", "gsps", "sc"]
    assert exported[-1]["user"]
    for e in written + exported:
        text = json.dumps(e["details"])
        assert PATIENT_NAME not in text and PATIENT_ID not in text
    # The daemon's log names no original value either.
    log = daemon.log_text()
    for value in (PATIENT_NAME, PATIENT_ID, originals.study_uid):
        assert value not in log

    # A KEK rotation re-wraps the link: it stays readable under the new key alone.
    rotated = subprocess.run([*EDGE_AGENT, "keys", "rotate", "--config", str(box.config)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rotated.returncode == 0, rotated.stderr
    assert not list((box.root / "keys").glob("*.old"))
    again = _preview(box, ref, tmp_path / "after-rotation")
    assert again.returncode == 0, again.stderr
    assert (pydicom.dcmread(tmp_path / "after-rotation" / "sr-v1.dcm").SOPInstanceUID
            == sr.SOPInstanceUID)  # the same object, the same UID


def test_default_box_keeps_no_link(tmp_path: Path, box: Box, broker: object,
                                   ops: Subscriber) -> None:
    daemon = Daemon(box)
    daemon.start()
    try:
        originals = original_study(tmp_path / "study")
        assert storescu(box.dicom_port, list(originals.files)).returncode == 0
        (msg,) = ops.wait("results", 1, timeout=120)
    finally:
        daemon.stop()
    assert not (box.state / "results").exists()
    done = _preview(box, str(msg.json()["data"]["study"]["ref"]), tmp_path / "out")
    assert done.returncode == 2
    assert "holds no result links" in done.stderr and "[results] enabled" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
