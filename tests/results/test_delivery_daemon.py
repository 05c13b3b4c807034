"""Results delivered into the hospital's PACS by the running daemon.

A modality sends a study to the daemon; its result objects arrive in the ORIGINAL
study in Orthanc (checked through Orthanc's REST API) and in DCMTK storescp as a
second destination, the link is released, and ops sees a `delivered_to` summary.
Meanwhile no MQTT message, log line or telemetry sample carries PHI (canary sweep).
A destination that is down comes back and gets everything, once per SOP Instance UID,
also across a kill -9 of the daemon in the middle of delivery."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Daemon,
    Subscriber,
    audit_events,
    free_port,
    set_config,
    storescu,
    wait_for,
)
from tests.helpers.delivery import StoreSCP, add_destination, enable_delivery
from tests.helpers.orthanc import Orthanc
from tests.helpers.results import (
    ACCESSION,
    BIRTH,
    PATIENT_ID,
    PATIENT_NAME,
    REFERRING,
    original_study,
)

pytestmark = [pytest.mark.peer("storescu", "storescp", "Orthanc")]


def _validator(name: str) -> Any:
    schema = json.loads((REPO / "docs" / "schemas" / name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _status(box: Box) -> dict[str, object]:
    out = subprocess.run([*EDGE_AGENT, "status", "--json", "--config", str(box.config)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _kinds(msgs: list[dict[str, object]], kind: str) -> list[dict[str, object]]:
    return [m for m in msgs if str(m.get("type", "")).startswith(f"org.edge-agent.{kind}.v")]


def test_results_reach_orthanc_and_storescp_in_the_original_study(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    originals = original_study(tmp_path / "study")
    pacs = Orthanc(tmp_path / "orthanc").start()
    scp = StoreSCP(tmp_path / "storescp").start()
    try:
        for f in originals.files:  # the PACS already holds the original study
            pacs.upload(f)
        (study_id,) = pacs.get("/studies")
        enable_delivery(box)
        set_config(box, "telemetry", "interval_seconds", "1")
        add_destination(box, "pacs", pacs.aet, pacs.dicom)
        add_destination(box, "archive", scp.aet, scp.port, kinds='["sr"]')
        daemon = Daemon(box)
        daemon.start()
        try:
            assert storescu(box.dicom_port, list(originals.files)).returncode == 0
            msgs = ops.wait("results", 2, timeout=180)
            status = _status(box)
        finally:
            daemon.stop()
    finally:
        scp.stop()
        try:
            stored = pacs.get(f"/studies/{study_id}/instances")
            tags = [pacs.get(f"/instances/{i['ID']}/simplified-tags") for i in stored]
        finally:
            pacs.stop()

    events = [m.json() for m in msgs]
    (result,) = _kinds(events, "result")
    (summary,) = _kinds(events, "result.delivery")
    data = result["data"]
    assert isinstance(data, dict)
    assert data["delivered_to"] == [{"destination": "pacs", "state": "queued"},
                                    {"destination": "archive", "state": "queued"}]
    sdata = summary["data"]
    assert isinstance(sdata, dict)
    assert sdata["study"] == {"ref": data["study"]["ref"], "version": 1}
    assert sdata["delivered_to"] == [
        {"destination": "pacs", "state": "confirmed", "objects": 3, "confirmed": 3},
        {"destination": "archive", "state": "confirmed", "objects": 1, "confirmed": 1}]

    # In the PACS: SR, GSPS and key image, in the original study, patient and UIDs.
    results = [t for t in tags if t["SOPInstanceUID"] not in originals.sop_uids]
    assert sorted(t["Modality"] for t in results) == ["OT", "PR", "SR"]
    for t in results:
        assert t["StudyInstanceUID"] == originals.study_uid
        assert t["PatientID"] == PATIENT_ID and t["PatientName"] == PATIENT_NAME
        assert t["AccessionNumber"] == ACCESSION
    # In the second destination: only the SR (its kinds), the same object.
    got = scp.received()
    assert [str(ds.Modality) for ds in got] == ["SR"]
    assert str(got[0].SOPInstanceUID) in {t["SOPInstanceUID"] for t in results}
    assert str(got[0].StudyInstanceUID) == originals.study_uid

    # Released: every destination confirmed, so the link was shredded (and audited).
    audit = audit_events(box, 2000)
    shredded = [e for e in audit if e["event"] == "results.link_shredded"]
    assert [e["details"]["reason"] for e in shredded] == ["released"]
    sent = [e for e in audit if e["event"] == "results.sent"]
    assert len(sent) == 4 and all(e["outcome"] in (0, "success") for e in sent)
    assert {e["details"]["destination"] for e in sent} == {"pacs", "archive"}
    assert all(e["event_id"] == "110104" for e in sent)
    assert {e["details"]["sop_instance_uid"] for e in sent} == {t["SOPInstanceUID"]
                                                                 for t in results}
    # Status: both destinations drained, nothing dead.
    rd = status["results_delivery"]
    assert isinstance(rd, dict)
    assert rd["pacs"]["depth"] == 0 and rd["pacs"]["confirmed"] == 3
    assert rd["archive"]["confirmed"] == 1 and rd["archive"]["dead_letter"] == 0

    # The messages keep their published shapes (docs/schemas/).
    for name, msgs_of in (("result", [result]), ("delivery", [summary])):
        check = _validator(f"{name}.schema.json")
        for ev in msgs_of:
            check.validate(ev["data"])
    telemetry_check = _validator("telemetry.schema.json")
    samples = [m.json() for m in ops.messages if m.topic.endswith("/telemetry")]
    for ev in samples:
        telemetry_check.validate(ev)
    assert any(ev["data"].get("results_delivery", {}).get("pacs") for ev in samples)

    # Canary sweep: PHI reached the PACS (above) and nowhere else.
    canaries = [PATIENT_NAME, PATIENT_ID, ACCESSION, BIRTH, REFERRING, originals.study_uid,
                *originals.sop_uids, *PATIENT_NAME.split("^")]
    every_message = b"\n".join(m.payload for m in ops.messages).decode()
    telemetry = [m for m in ops.messages if m.topic.endswith("/telemetry")]
    assert telemetry, "no telemetry sample was published"
    log = daemon.log_text()
    status_text = json.dumps(status)
    for value in canaries:
        assert value not in every_message, "PHI in an MQTT message"
        assert value not in log, "PHI in the daemon's log"
        assert value not in status_text, "PHI in the status"


def test_a_destination_down_then_back_gets_everything_once_per_uid_across_kill9(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    scp = StoreSCP(tmp_path / "storescp", port=free_port())  # not started: the PACS is down
    enable_delivery(box)
    add_destination(box, "archive", scp.aet, scp.port)
    daemon = Daemon(box)
    daemon.start()
    first = original_study(tmp_path / "s1", seed=5)
    second = original_study(tmp_path / "s2", seed=6)
    try:
        assert storescu(box.dicom_port, list(first.files)).returncode == 0
        ops.wait("results", 1, timeout=180)
        waiting = wait_for(lambda: (s := _status(box)["results_delivery"]["archive"])["depth"]
                           == 3 and s["last_error"] and s, 60, "the queue to hold 3 objects")
        assert waiting["confirmed"] == 0 and waiting["consecutive_failures"] >= 1
        # kill -9 while the objects wait: the queue is on disk.  A KEK rotation while
        # the box is down re-wraps the queued objects' keys.
        daemon.kill9()
        rotated = subprocess.run([*EDGE_AGENT, "keys", "rotate", "--config", str(box.config)],
                                 cwd=REPO, capture_output=True, text=True, timeout=300)
        assert rotated.returncode == 0, rotated.stderr
        assert "results_queue: 3" in rotated.stdout
        daemon = Daemon(box)
        daemon.start()
        assert storescu(box.dicom_port, list(second.files)).returncode == 0
        wait_for(lambda: _status(box)["results_delivery"]["archive"]["depth"] == 6, 180,
                 "both studies' objects to wait")
        # The PACS comes back; kill -9 the daemon as soon as the first object arrived,
        # in the middle of delivery.
        scp.start()
        wait_for(lambda: scp.received(), 120, "a first object at the destination")
        daemon.kill9()
        daemon = Daemon(box)
        daemon.start()
        wait_for(lambda: _status(box)["results_delivery"]["archive"]["confirmed"] == 6, 180,
                 "every object confirmed")
        wait_for(lambda: len(_kinds([m.json() for m in ops.on("results")],
                                    "result.delivery")) >= 2, 120, "two delivery summaries")
    finally:
        if daemon.proc is not None:
            daemon.stop()
        scp.stop()
    got = scp.received()
    uids = [str(ds.SOPInstanceUID) for ds in got]
    # Everything delivered: 3 objects per study, into each original study.
    by_study = {str(ds.StudyInstanceUID) for ds in got}
    assert by_study == {first.study_uid, second.study_uid}
    assert len(set(uids)) == 6
    # Nothing twice with different UIDs: a re-send (after kill -9) repeats a UID.
    per_kind = {(str(ds.StudyInstanceUID), str(ds.Modality)) for ds in got}
    assert len(per_kind) == 6
    summaries = _kinds([m.json() for m in ops.on("results")], "result.delivery")
    states = {s["data"]["study"]["ref"]: s["data"]["delivered_to"][0]["state"]  # type: ignore[index]
              for s in summaries}
    assert set(states.values()) == {"confirmed"} and len(states) == 2


def test_refusing_and_aborting_destinations(tmp_path: Path, box: Box, broker: object,
                                            ops: Subscriber) -> None:
    """0xA700 (out of resources) is retried until stored; 0xC000 (cannot understand) is
    dead-lettered at once, never re-sent, and keeps the link; an abort is retried."""
    from tests.helpers.delivery import ScriptedPeer

    busy = ScriptedPeer("BUSY", lambda n: 0xA700 if n < 2 else 0).start()
    broken = ScriptedPeer("BROKEN", lambda n: 0xC000).start()
    flaky = ScriptedPeer("FLAKY", lambda n: None if n == 0 else 0).start()
    enable_delivery(box)
    for name, peer in (("busy", busy), ("broken", broken), ("flaky", flaky)):
        add_destination(box, name, peer.aet, peer.port)
    daemon = Daemon(box)
    daemon.start()
    originals = original_study(tmp_path / "study")
    try:
        assert storescu(box.dicom_port, list(originals.files)).returncode == 0
        msgs = ops.wait("results", 2, timeout=180)
        status = _status(box)
    finally:
        daemon.stop()
        for p in (busy, broken, flaky):
            p.stop()
    (summary,) = _kinds([m.json() for m in msgs], "result.delivery")
    assert summary["data"]["delivered_to"] == [  # type: ignore[index]
        {"destination": "busy", "state": "confirmed", "objects": 3, "confirmed": 3},
        {"destination": "broken", "state": "dead-letter", "objects": 3, "confirmed": 0},
        {"destination": "flaky", "state": "confirmed", "objects": 3, "confirmed": 3}]
    # Retried with the same SOP Instance UIDs, stored once each.
    assert len(busy.requests) == 5 and set(busy.requests) == set(busy.stored)
    assert len(busy.stored) == 3
    assert len(flaky.requests) == 4 and set(flaky.requests) == set(flaky.stored)
    # Refused for good: each object asked once, never again.
    assert len(broken.requests) == 3 and len(set(broken.requests)) == 3
    rd = status["results_delivery"]
    assert isinstance(rd, dict)
    assert rd["broken"]["dead_letter"] == 3 and rd["broken"]["last_error_code"] == "0xC000"
    assert any("broken" in w and "dead-lettered" in w for w in status["warnings"])  # type: ignore[attr-defined]
    audit = audit_events(box, 2000)
    refused = [e for e in audit if e["event"] == "results.sent"
               and e["details"]["destination"] == "broken"]
    assert len(refused) == 3
    assert all(e["details"]["status"] == "0xC000" and e["details"]["result"] == "refused"
               for e in refused)
    retried = [e for e in audit if e["event"] == "results.sent"
               and e["details"]["destination"] == "busy" and e["details"]["result"] == "retry"]
    assert [e["details"]["status"] for e in retried] == ["0xA700", "0xA700"]
    # Not every destination confirmed: the link is kept (until its retention).
    assert not [e for e in audit if e["event"] == "results.link_shredded"]


def test_commitment_on_the_same_association_releases_only_committed_objects(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    """release_after = commitment: an object is confirmed by the report, not by its
    C-STORE Success; one the PACS reports as failed is sent again (same UID) and
    committed on the next request."""
    from tests.helpers.delivery import CommittingPeer, assert_first_refused_then_committed

    originals = original_study(tmp_path / "study")
    # Refuses commitment of the first object it will be asked about, once.
    peer = CommittingPeer("COMMITPACS", refuse_first=True)
    enable_delivery(box, commitment_wait_seconds="10")
    add_destination(box, "pacs", peer.aet, peer.port, storage_commitment="true")
    daemon = Daemon(box)
    daemon.start()
    try:
        peer.start()
        assert storescu(box.dicom_port, list(originals.files)).returncode == 0
        msgs = ops.wait("results", 2, timeout=180)
    finally:
        daemon.stop()
        peer.stop()
    (summary,) = _kinds([m.json() for m in msgs], "result.delivery")
    assert summary["data"]["delivered_to"] == [  # type: ignore[index]
        {"destination": "pacs", "state": "confirmed", "objects": 3, "confirmed": 3}]
    audit = audit_events(box, 2000)
    assert_first_refused_then_committed(peer, audit)
    shredded = [e for e in audit if e["event"] == "results.link_shredded"]
    assert [e["details"]["reason"] for e in shredded] == ["released"]
