"""Knowing when a study is complete instead of waiting out the quiet period: the real
daemon as MPPS SCP and Storage Commitment SCP (pynetdicom plays the modality, DCMTK
storescu sends the images), and per-sender completion rules.  Every test sets a quiet
period of an hour: a result that arrives came from the trigger under test."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from agent.audit.events import OUTCOMES
from tests.helpers import Box, Broker, Daemon, Subscriber, audit_events, set_config, storescu
from tests.helpers.completion import (
    MODALITY_AE,
    Modality,
    ReportListener,
    completions,
    mpps_create_ds,
    mpps_final_ds,
    refs_of,
)
from tests.helpers.receive import ct_files
from tests.helpers.waiting import free_port, wait_for

pytestmark = pytest.mark.peer("storescu")


def add_table(box: Box, text: str) -> None:
    with box.config.open("a") as f:
        f.write("\n" + text.strip() + "\n")


@pytest.fixture(params=[1, 2], ids=["in-process", "workers"])
def started(request: pytest.FixtureRequest, box: Box, broker: Broker) -> Iterator[
        tuple[Daemon, Subscriber]]:
    set_config(box, "dicom", "workers", str(request.param))
    set_config(box, "study", "quiet_seconds", "3600")
    set_config(box, "study", "max_age_seconds", "7200")
    ops = Subscriber(box).start()
    d = Daemon(box)
    d.start()
    yield d, ops
    ops.stop()
    if d.proc is not None:
        d.stop()


def events(box: Box, name: str, n: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        got = [e for e in audit_events(box) if e.get("event") == name]
        return got if len(got) >= n else None
    return list(wait_for(found, 30, f"{n} audit record(s) {name}", step=0.5))


def no_uids(text: str, files: list[Path]) -> None:
    for _, uid in refs_of(files):
        assert uid not in text



def _study_completes_as(tmp_path: Path, box: Box, n: int, completion: str) -> None:
    """Run the daemon, send ``n`` CT instances with storescu (calling AE STORESCU) and
    check that one result of ``n`` instances arrives and that the study completed by
    ``completion`` (the reason kept in the index)."""
    ops = Subscriber(box).start()
    d = Daemon(box)
    d.start()
    try:
        files = ct_files(tmp_path / "ct", n)
        assert storescu(box.dicom_port, files, aec=box.ae_title).returncode == 0
        assert ops.wait("results", 1, timeout=90)[0].json()["data"]["study"][
            "instances_received"] == n
        assert completions(box.state) == [completion]
    finally:
        ops.stop()
        d.stop()

def test_mpps_completed_completes_the_study_at_once(
        tmp_path: Path, box: Box, started: tuple[Daemon, Subscriber]) -> None:
    d, ops = started
    study = str(generate_uid())
    files = ct_files(tmp_path / "ct", 3, study_uid=study)
    mpps = str(generate_uid())
    m = Modality(box.dicom_port, box.ae_title)
    try:
        assert m.n_create(mpps_create_ds(study), mpps).Status == 0x0000
        sent = storescu(box.dicom_port, files, aec=box.ae_title)  # DCMTK, unchanged
        assert sent.returncode == 0, sent.stderr
        assert m.n_set(mpps_final_ds("COMPLETED", files), mpps).Status == 0x0000
    finally:
        m.release()
    got = ops.wait("results", 1, timeout=90)[0].json()["data"]["study"]
    assert got["instances_received"] == 3
    assert completions(box.state) == ["mpps"]
    created, updated = events(box, "mpps.n_create")[0], events(box, "mpps.n_set")[0]
    assert created["details"]["status"] == "0x0000"
    assert updated["details"]["state"] == "COMPLETED" and updated["details"]["instances"] == 3
    no_uids(json.dumps([created, updated]) + d.log_text(), files)


def test_mpps_discontinued_processes_what_was_acquired(
        tmp_path: Path, box: Box, started: tuple[Daemon, Subscriber]) -> None:
    _, ops = started
    study = str(generate_uid())
    files = ct_files(tmp_path / "ct", 3, study_uid=study)
    mpps = str(generate_uid())
    m = Modality(box.dicom_port, box.ae_title)
    try:
        assert m.n_create(mpps_create_ds(study), mpps).Status == 0x0000
        # Stopped after two images; the N-SET arrives before the images do.
        final = mpps_final_ds("DISCONTINUED", files[:2], reason="110514")
        assert m.n_set(final, mpps).Status == 0x0000
    finally:
        m.release()
    sent = storescu(box.dicom_port, files[:2], aec=box.ae_title)
    assert sent.returncode == 0, sent.stderr
    got = ops.wait("results", 1, timeout=90)[0].json()["data"]["study"]
    assert got["instances_received"] == 2
    assert completions(box.state) == ["mpps_discontinued"]
    assert events(box, "mpps.n_set")[0]["details"]["reason_code"] == "DCM:110514"


def test_storage_commitment_reports_on_the_same_association_and_completes(
        tmp_path: Path, box: Box, started: tuple[Daemon, Subscriber]) -> None:
    _, ops = started
    files = ct_files(tmp_path / "ct", 3)
    sent = storescu(box.dicom_port, files, aec=box.ae_title)
    assert sent.returncode == 0, sent.stderr
    refs = refs_of(files)
    unknown = (refs[0][0], str(generate_uid()))
    conflict = (str(MRImageStorage), refs[2][1])  # held, but as CT
    m = Modality(box.dicom_port, box.ae_title)
    try:
        tx, status = m.commit([refs[0], refs[1], conflict, unknown])
        assert status.Status == 0x0000
        assert m.got_report.wait(30), "no N-EVENT-REPORT on the association"
    finally:
        m.release()
    report = m.reports[0]
    assert m.report_types == [2]  # some failed
    assert str(report.TransactionUID) == tx
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == {
        refs[0][1], refs[1][1]}
    assert {(str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
            for i in report.FailedSOPSequence} == {(refs[2][1], 0x0119), (unknown[1], 0x0112)}
    got = ops.wait("results", 1, timeout=90)[0].json()["data"]["study"]
    assert got["instances_received"] == 3
    assert completions(box.state) == ["commitment"]
    req = events(box, "commitment.request")[0]["details"]
    assert (req["committed"], req["failed"], req["conflicts"]) == (2, 2, 1)
    assert events(box, "commitment.report_sent")[0]["details"]["association"] == "same"


def test_commitment_report_goes_to_the_known_ae_when_refused_on_the_association(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "3600")
    port = free_port()
    add_table(box, f"""
[[dicom.known_aes]]
ae_title = "{MODALITY_AE}"
host = "127.0.0.1"
port = {port}
""")
    listener = ReportListener(port)
    d = Daemon(box)
    d.start()
    try:
        files = ct_files(tmp_path / "ct", 2)
        assert storescu(box.dicom_port, files, aec=box.ae_title).returncode == 0
        # It refuses the report on this association (it takes reports on its own SCP).
        m = Modality(box.dicom_port, box.ae_title, report_status=0x0110)
        tx, status = m.commit(refs_of(files))
        assert m.got_report.wait(30), "no N-EVENT-REPORT on the association"
        m.release()
        assert status.Status == 0x0000
        assert listener.got.wait(30), "no report on a new association"
        assert str(listener.reports[0].TransactionUID) == tx
        assert len(listener.reports[0].ReferencedSOPSequence) == 2
        sent = events(box, "commitment.report_sent")[0]["details"]
        assert sent["association"] == "new" and sent["status"] == "0x0000"
    finally:
        listener.stop()
        d.stop()


def test_commitment_report_to_an_unknown_ae_is_audited_not_sent(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    d = Daemon(box)
    d.start()
    try:
        files = ct_files(tmp_path / "ct", 1)
        assert storescu(box.dicom_port, files, aec=box.ae_title).returncode == 0
        m = Modality(box.dicom_port, box.ae_title, report_status=0x0110)
        _, status = m.commit(refs_of(files))
        assert m.got_report.wait(30), "no N-EVENT-REPORT on the association"
        m.release()
        assert status.Status == 0x0000
        why = events(box, "commitment.report_undeliverable")[0]
        assert why["outcome"] == OUTCOMES["serious_failure"]
        assert why["details"]["why"] == "unknown_ae"
        assert "[[dicom.known_aes]]" in d.log_text()
    finally:
        d.stop()


def _kept_reports(box: Box) -> list[tuple[int, bytes]]:
    """(attempts, sealed event information) of the commitment reports the box owes."""
    db = sqlite3.connect(f"file:{box.state / 'inbox' / 'index.db'}?mode=ro", uri=True)
    try:
        return [(int(r[0]), bytes(r[1])) for r in db.execute(
            "SELECT attempts, sealed FROM commitment_reports")]
    except sqlite3.OperationalError:  # no such table (yet)
        return []
    finally:
        db.close()


def _owe_a_report(tmp_path: Path, box: Box, d: Daemon) -> tuple[str, list[Path]]:
    """A commitment request whose report the modality refuses on the association,
    while its own SCP is down: the box keeps the report after a failed attempt."""
    files = ct_files(tmp_path / "ct", 2)
    assert storescu(box.dicom_port, files, aec=box.ae_title).returncode == 0
    m = Modality(box.dicom_port, box.ae_title, report_status=0x0110)
    tx, status = m.commit(refs_of(files))
    assert m.got_report.wait(30), "no N-EVENT-REPORT on the association"
    m.release()
    assert status.Status == 0x0000
    kept = wait_for(lambda: [r for r in _kept_reports(box) if r[0] >= 1] or None, 60,
                    "a kept report after a failed attempt", step=0.2)
    # Sealed: neither the Transaction UID nor an instance UID is readable in the index.
    assert all(tx.encode() not in blob for _, blob in kept)
    for _, uid in refs_of(files):
        assert all(uid.encode() not in blob for _, blob in kept)
    return tx, files


def _known_ae(box: Box, port: int, **dicom: str) -> None:
    for key, value in dicom.items():
        set_config(box, "dicom", key, value)
    add_table(box, f"""
[[dicom.known_aes]]
ae_title = "{MODALITY_AE}"
host = "127.0.0.1"
port = {port}
""")


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "workers"])
def test_an_undelivered_commitment_report_is_retried_until_the_modality_is_up(
        tmp_path: Path, box: Box, broker: Broker, workers: int) -> None:
    set_config(box, "dicom", "workers", str(workers))
    set_config(box, "study", "quiet_seconds", "3600")
    port = free_port()
    _known_ae(box, port, commitment_report_retry_seconds="1",
              commitment_report_timeout="5")
    d = Daemon(box)
    d.start()
    listener: ReportListener | None = None
    try:
        tx, files = _owe_a_report(tmp_path, box, d)
        listener = ReportListener(port)  # the modality's SCP comes up
        assert listener.got.wait(60), "the kept report was not sent again"
        assert str(listener.reports[0].TransactionUID) == tx
        assert len(listener.reports[0].ReferencedSOPSequence) == len(files)
        sent = events(box, "commitment.report_sent")[0]["details"]
        assert sent["association"] == "new" and sent["attempts"] >= 2
        wait_for(lambda: not _kept_reports(box), 30, "the delivered report forgotten")
        assert not [e for e in audit_events(box) if e["event"] == "commitment.report_undeliverable"]
    finally:
        if listener is not None:
            listener.stop()
        d.stop()


def test_a_commitment_report_owed_at_a_kill9_is_sent_after_the_restart(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "3600")
    port = free_port()
    # Retries far apart: only the restart can send it within the test.
    _known_ae(box, port, commitment_report_retry_seconds="3000",
              commitment_report_timeout="5")
    d = Daemon(box)
    d.start()
    tx, _ = _owe_a_report(tmp_path, box, d)
    d.kill9()
    listener = ReportListener(port)
    d = Daemon(box)
    d.start()
    try:
        assert listener.got.wait(60), "the report owed before the kill -9 was not sent"
        assert str(listener.reports[0].TransactionUID) == tx
        wait_for(lambda: not _kept_reports(box), 30, "the delivered report forgotten")
    finally:
        listener.stop()
        d.stop()


def test_a_commitment_report_never_delivered_is_given_up_and_audited(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "3600")
    _known_ae(box, free_port(), commitment_report_retry_seconds="0.5",
              commitment_report_max_age_seconds="3", commitment_report_timeout="2")
    d = Daemon(box)
    d.start()
    try:
        _owe_a_report(tmp_path, box, d)
        why = events(box, "commitment.report_undeliverable")[0]
        assert why["outcome"] == OUTCOMES["serious_failure"]
        assert why["details"]["why"] == "expired" and why["details"]["attempts"] >= 2
        wait_for(lambda: not _kept_reports(box), 30, "the given-up report forgotten")
    finally:
        d.stop()


def test_malformed_mpps_gets_standard_statuses_is_audited_and_the_box_keeps_working(
        tmp_path: Path, box: Box, daemon: Daemon, ops: Subscriber) -> None:
    study = str(generate_uid())
    mpps = str(generate_uid())
    files = ct_files(tmp_path / "ct", 1, study_uid=study)
    m = Modality(box.dicom_port, box.ae_title)
    try:
        assert m.n_set(mpps_final_ds("COMPLETED", files), str(generate_uid())).Status == 0x0112
        missing = m.n_create(mpps_create_ds(study, drop=("Modality",)), str(generate_uid()))
        assert missing.Status == 0x0120
        assert m.n_create(mpps_create_ds(study, status="COMPLETED"), None).Status == 0x0106
        assert m.n_create(mpps_create_ds(study), mpps).Status == 0x0000
        assert m.n_create(mpps_create_ds(study), mpps).Status == 0x0111
        bad = mpps_final_ds("COMPLETED", files)
        bad.PerformedProcedureStepStatus = "FINISHED"
        assert m.n_set(bad, mpps).Status == 0x0106
        assert m.n_set(mpps_final_ds("DISCONTINUED", files), mpps).Status == 0x0000
        again = m.n_set(mpps_final_ds("COMPLETED", files), mpps)  # no way back from final
        assert again.Status == 0x0110
        assert again.ErrorComment == "Performed Procedure Step Object may no longer be updated"
        assert int(again.ErrorID) == 0xA710
        # A Storage Commitment request that references nothing.
        _, status = m.commit([])
        assert status.Status == 0x0115
    finally:
        m.release()
    refused = [e for e in events(box, "mpps.n_set", 4) if e["outcome"] == OUTCOMES["minor_failure"]]
    assert {e["details"]["status"] for e in refused} == {"0x0112", "0x0106", "0x0110"}
    assert {e["details"]["status"] for e in events(box, "mpps.n_create", 4)} >= {
        "0x0120", "0x0106", "0x0111"}
    # The daemon keeps serving: DCMTK storescu, unchanged, and the study still completes
    # (the DISCONTINUED step above listed this instance).
    assert storescu(box.dicom_port, files, aec=box.ae_title).returncode == 0
    assert ops.wait("results", 1, timeout=90)[0].json()["data"]["study"][
        "instances_received"] == 1


def test_expected_instance_count_rule_completes_a_study_without_mpps(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "3600")
    add_table(box, """
[[study.completion]]
calling_ae = "STORESCU"
modality = "CT"
expected_instances = 3
""")
    _study_completes_as(tmp_path, box, 3, "expected_count")


def test_series_rule_completes_a_ct_study_once_its_second_series_went_quiet(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    """A CT scanner sends a localizer series, pauses while the technologist plans the
    scan, then the axial series: ``expected_series = 2`` completes the study a short
    series quiet period after the axial series, not after the localizer (the pause
    between the series is longer than that period), and not an hour later."""
    set_config(box, "study", "quiet_seconds", "3600")
    add_table(box, """
[[study.completion]]
calling_ae = "STORESCU"
modality = "CT"
expected_series = 2
series_quiet_seconds = 1
""")
    ops = Subscriber(box).start()
    d = Daemon(box)
    d.start()
    try:
        study = str(generate_uid())
        localizer = ct_files(tmp_path / "loc", 1, study_uid=study, tag="loc")
        axial = ct_files(tmp_path / "ax", 3, study_uid=study, tag="ax")
        assert storescu(box.dicom_port, localizer, aec=box.ae_title).returncode == 0
        # Longer than the series quiet period: one series alone must not complete it
        # (it would, and the result would hold one instance, if series were not counted).
        time.sleep(3)
        assert storescu(box.dicom_port, axial, aec=box.ae_title).returncode == 0
        got = ops.wait("results", 1, timeout=90)[0].json()["data"]["study"]
        assert got["instances_received"] == 4
        assert completions(box.state) == ["expected_series"]
    finally:
        ops.stop()
        d.stop()


def test_a_bad_completion_rule_is_an_operator_error(box: Box) -> None:
    from agent.config import load
    from agent.errors import ConfigError

    add_table(box, """
[[study.completion]]
calling_ae = "CT1"
modality = "computed tomography"
expected_instances = -3
""")
    with pytest.raises(ConfigError) as err:
        load(box.config)
    text = str(err.value)
    assert "[study.completion[0].modality]" in text and "such as \"CT\"" in text
    assert "[study.completion[0].expected_instances] = -3" in text


def test_rules_match_on_modality_and_a_rule_quiet_period_replaces_the_global_one(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    """The MR rule would close the CT study at its first instance: it must not match;
    the sender's rule shortens the hour-long global quiet period to a second."""
    set_config(box, "study", "quiet_seconds", "3600")
    add_table(box, """
[[study.completion]]
modality = "MR"
expected_instances = 1

[[study.completion]]
calling_ae = "STORESCU"
quiet_seconds = 1.0
""")
    _study_completes_as(tmp_path, box, 3, "quiet")
