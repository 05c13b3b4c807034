"""Foundation, end to end through the public entry points: a modality sends a
study (DCMTK storescu and pynetdicom), central ops receives one de-identified
result over mutual-TLS MQTT, and no PHI of the study appears anywhere."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.helpers import Box, Daemon, Subscriber, storescu, wait_for
from tests.helpers.dicom import make_instance, write_instances
from tests.helpers.receive import rejected

PATIENT_NAME = "Canary^Zebulon^Quixote"
PATIENT_ID = "PID-7781-CANARY"
ACCESSION = "ACC-CANARY-991"
BIRTH = "19310417"


def make_study(tmp: Path, n: int = 3) -> tuple[list[Path], set[str]]:
    """A small CT study with planted identifiers; returns files and the PHI set."""
    study_uid, series_uid = generate_uid(), generate_uid()
    instances = [make_instance(PATIENT_NAME, study_uid, series_uid, PatientID=PATIENT_ID,
                               AccessionNumber=ACCESSION, PatientBirthDate=BIRTH,
                               InstanceNumber=i + 1) for i in range(n)]
    phi = {PATIENT_NAME, PATIENT_ID, ACCESSION, BIRTH, study_uid, series_uid,
           *(ds.SOPInstanceUID for ds in instances)}
    return write_instances(tmp, instances, stem="ct"), phi


def assert_no_phi(blob: str, phi: set[str]) -> None:
    for value in phi:
        assert value not in blob, "PHI value leaked"
    for part in PATIENT_NAME.split("^"):
        assert part not in blob


def results_for(ops: Subscriber) -> list[dict[str, object]]:
    return [m.json() for m in ops.on("results")]


@pytest.mark.peer("storescu")
def test_storescu_study_yields_one_deidentified_result(
    tmp_path: Path, box: Box, daemon: Daemon, ops: Subscriber
) -> None:
    files, phi = make_study(tmp_path)
    proc = storescu(box.dicom_port, files)
    assert proc.returncode == 0, proc.stderr

    res = ops.wait("results", 1, timeout=60)
    ev = res[0].json()
    assert ev["specversion"] == "1.0" and ev["type"] == "org.edge-agent.result.v1"
    data = ev["data"]
    assert data["study"]["instances_received"] == 3
    assert data["status"] in {"ok", "no_applicable_model"}
    assert str(data["study"]["ref"]).startswith("2.25.")
    for m in data["models"]:
        assert m["name"] and m["version"] and len(m["sha256"]) == 64

    # Retained birth status and telemetry arrive too.
    status = [m.json() for m in ops.on("status")]
    assert any(s["data"]["state"] == "online" for s in status)
    ops.wait("telemetry", 1, timeout=30)

    assert daemon.stop() == 0
    every_message = "\n".join(m.payload.decode() + m.topic for m in ops.messages)
    assert_no_phi(every_message, phi)
    assert_no_phi(daemon.log_text(), phi)
    # The graceful stop published the offline status (retained).
    wait_for(lambda: any(m.json()["data"]["state"] == "offline" for m in ops.on("status")),
             15, "offline status")
    assert len(results_for(ops)) == 1


def test_pynetdicom_study_and_echo(tmp_path: Path, box: Box, daemon: Daemon,
                                   ops: Subscriber) -> None:
    files, phi = make_study(tmp_path, n=2)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    for f in files:
        status = assoc.send_c_store(pydicom.dcmread(f))
        assert status.Status == 0x0000
    assoc.release()

    ev = ops.wait("results", 1, timeout=60)[0].json()
    assert ev["data"]["study"]["instances_received"] == 2
    assert_no_phi(json.dumps(ev), phi)


def test_unknown_calling_ae_is_rejected_and_audited(tmp_path: Path, box: Box,
                                                    daemon: Daemon) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    assert rejected(assoc)
    ae2 = AE(ae_title="PYNETDICOM")
    ae2.add_requested_context(CTImageStorage)
    assoc2 = ae2.associate("127.0.0.1", box.dicom_port, ae_title="WRONG_CALLED")
    assert rejected(assoc2)
    assert daemon.stop() == 0
    assert "calling AE title/address not allowed" in daemon.log_text()


def test_sigterm_keeps_open_study_and_restart_finishes_it(
    tmp_path: Path, box: Box, daemon: Daemon, ops: Subscriber
) -> None:
    from tests.helpers import set_config

    files, _ = make_study(tmp_path, n=2)
    daemon.stop()
    set_config(box, "study", "quiet_seconds", "600")
    daemon.start()
    assert storescu(box.dicom_port, files).returncode == 0
    assert daemon.stop(signal.SIGTERM) == 0
    assert results_for(ops) == []
    # The study is still open on disk; a burst run closes and publishes it.
    burst = Daemon(box, "--burst")
    burst.start()
    assert burst.proc is not None
    assert burst.proc.wait(120) == 0
    ev = ops.wait("results", 1, timeout=30)[0].json()
    assert ev["data"]["study"]["instances_received"] == 2


def test_config_errors_are_all_reported_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    bad = tmp_path / "agent.toml"
    bad.write_text('[box]\nsite = "bad/site"\ndevice = "d"\n[dicom]\nport = 70000\n'
                   '[study]\nquiet_secs = 3\n[deid]\nmode = "shred"\n')
    proc = subprocess.run([sys.executable, "-m", "provisioning.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    err = proc.stderr
    for needle in ("[box.site]", "[dicom.port]", "[study.quiet_secs]", "[deid.mode]",
                   "[keys.pseudonym] is required", "[mqtt.host] is required"):
        assert needle in err, err
    assert "Traceback" not in err
    assert re.search(r"\d+ configuration problem", err)
