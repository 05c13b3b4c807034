"""Self-describing inbox files: one fsync per instance, and the start-up
reconciliation of the files and the index (agent/store/record.py, reconcile.py).

Through the real daemon: a kill -9 between an instance file made durable and its
index commit (the ``hang:inbox_index`` test hook), an index row whose file is
gone, and an inbox whose files were written by the previous version (no record
of their own).  With the Inbox itself: what a power cut that takes index commits
back leaves behind (rows lost, files kept), partial and repeated files."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.config import InboxSettings, StudySettings
from agent.crypto import KeyEncryptionKey, random_key
from agent.store.inbox import Inbox
from agent.store.reconcile import DROPPED, RECOVERED
from agent.store.record import read_trailer
from tests.helpers import Box, Broker, Daemon, Subscriber, audit_events, set_config, wait_for
from tests.helpers.receive import ct_files

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


# -- through the daemon ---------------------------------------------------------------


def _send(port: int, ae_title: str, files: list[Path], statuses: list[int]) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    for f in files:
        try:
            status = assoc.send_c_store(pydicom.dcmread(f))
        except RuntimeError:  # the association went away under us (the kill)
            return
        if not status:
            return
        statuses.append(int(status.Status))
    if assoc.is_established:
        assoc.release()


def _index(box: Box) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{box.state / 'inbox' / 'index.db'}?mode=ro", uri=True)


def _written(box: Box) -> list[Path]:
    """The inbox's instance files that hold something (slots are pre-created empty)."""
    return sorted(p for p in (box.state / "inbox" / "files").rglob("*.enc")
                  if p.stat().st_size > 0)


def _result(ops: Subscriber, n: int = 1) -> list[dict[str, Any]]:
    return [m.json()["data"]["study"] for m in ops.wait("results", n, timeout=90)]


def test_kill9_between_the_durable_file_and_its_index_commit_loses_nothing(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber,
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(box, "dicom", "workers", "1")  # the hook is armed in the daemon's process
    set_config(box, "study", "quiet_seconds", "0.5")
    files = ct_files(tmp_path / "ct", 1)
    monkeypatch.setenv("EDGE_AGENT_TEST_MODE", "1")
    monkeypatch.setenv("EDGE_AGENT_TEST_FAULTS", "hang:inbox_index")
    d = Daemon(box)
    d.start()
    statuses: list[int] = []
    sender = threading.Thread(target=_send, args=(box.dicom_port, box.ae_title, files, statuses))
    sender.start()
    wait_for(lambda: "stage inbox_index hangs now" in d.log_text(), 60, "the hook to hang")
    # The file (instance and its own record) is durable, the index does not know it.
    written = _written(box)
    assert len(written) == 1
    with _index(box) as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    # Nothing readable of the instance is on disk: no patient name, no UID.
    raw = written[0].read_bytes()
    ds = pydicom.dcmread(files[0])
    assert str(ds.PatientName).encode() not in raw
    assert ds.SOPInstanceUID.encode() not in raw and ds.StudyInstanceUID.encode() not in raw
    d.kill9()
    sender.join(60)
    assert statuses == []  # never acknowledged, yet it may have been: it must not be lost
    monkeypatch.delenv("EDGE_AGENT_TEST_FAULTS")
    d = Daemon(box)
    d.start()
    try:
        study = _result(ops)[0]
        assert study["instances_received"] == 1 and study["instances_processed"] == 1
        assert "indexed again from their own records" in d.log_text()
        received = [e for e in audit_events(box) if e["event"] == "instance.received"]
        assert [e["details"].get("recovered") for e in received] == [RECOVERED]
    finally:
        assert d.stop() == 0


def test_an_index_row_whose_file_is_gone_is_dropped_and_audited(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "dicom", "workers", "1")
    set_config(box, "study", "quiet_seconds", "600")
    files = ct_files(tmp_path / "ct", 3)
    d = Daemon(box)
    d.start()
    statuses: list[int] = []
    _send(box.dicom_port, box.ae_title, files, statuses)
    assert statuses == [0, 0, 0]
    assert d.stop() == 0
    with _index(box) as db:
        rel = db.execute("SELECT file FROM instances ORDER BY id LIMIT 1").fetchone()[0]
    (box.state / "inbox" / rel).unlink()  # lost (a disk fault, an operator's rm)
    set_config(box, "study", "quiet_seconds", "0.5")
    d = Daemon(box)
    d.start()
    try:
        study = _result(ops)[0]
        assert study["instances_received"] == 2 and study["instances_processed"] == 2
        assert "is indexed but its file is missing" in d.log_text()
        alerts = [e for e in audit_events(box) if e["event"] == "security.alert"
                  and e["details"].get("reason") == DROPPED]
        assert len(alerts) == 1 and alerts[0]["outcome"] == 8  # serious failure (ATNA)
    finally:
        assert d.stop() == 0
    with _index(box) as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


def test_an_inbox_written_by_the_previous_version_is_still_read(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "dicom", "workers", "1")
    set_config(box, "study", "quiet_seconds", "600")
    files = ct_files(tmp_path / "ct", 3)
    d = Daemon(box)
    d.start()
    statuses: list[int] = []
    _send(box.dicom_port, box.ae_title, files, statuses)
    assert statuses == [0, 0, 0]
    assert d.stop() == 0
    # The previous version wrote the sealed stream only: cut each record off, which
    # leaves exactly that format (the stream's bytes are unchanged).
    for p in _written(box):
        with open(p, "r+b") as fh:
            trailer = read_trailer(fh)
            assert trailer is not None
            fh.truncate(trailer.stream_length)
        with open(p, "rb") as fh:
            assert read_trailer(fh) is None
    set_config(box, "study", "quiet_seconds", "0.5")
    d = Daemon(box)
    d.start()
    try:
        study = _result(ops)[0]
        assert study["instances_received"] == 3 and study["instances_processed"] == 3
        assert "3 pending instance file(s) were written by an earlier version" in d.log_text()
        assert "missing" not in d.log_text()
    finally:
        assert d.stop() == 0


# -- the Inbox: what a power cut leaves --------------------------------------------------


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.kek = KeyEncryptionKey(random_key())
        self.pkey = random_key()

    def open(self) -> Inbox:
        return Inbox(self.root, self.kek, self.pkey,
                     InboxSettings(max_bytes=1 << 30, min_free_bytes=0),
                     StudySettings(quiet_seconds=3600))

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.root / "index.db", isolation_level=None)


def _put(ib: Inbox, study: str, sop: str, data: bytes, series: str = "") -> Path:
    w = ib.begin(study)
    w.write(data)
    r = ib.commit(w, sop_uid=sop, sop_class=SOP_CLASS, transfer_syntax="1.2.840.10008.1.2.1",
                  calling_ae="MOD", peer="10.0.0.9", audit=lambda _r: {"event": "instance.received"},
                  series_uid=series)
    return r.instance.path


def _series_keys(db: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in db.execute("SELECT series_key FROM instances ORDER BY id")]


def _journal(db: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in db.execute("SELECT entry FROM receipts ORDER BY id")]


def test_rows_a_power_cut_took_back_are_rebuilt_from_the_files(tmp_path: Path) -> None:
    s = Store(tmp_path / "inbox")
    ib = s.open()
    blobs = [os.urandom(3000 + i) for i in range(3)]
    series = ["1.2.3.100", "1.2.3.200", "1.2.3.200"]  # a localizer and an axial series
    for i, b in enumerate(blobs):
        _put(ib, "1.2.3", f"1.2.3.{i}", b, series[i])
    want = ib.study(ib._db.execute("SELECT id FROM studies").fetchone()[0])
    want_series = _series_keys(ib._db)
    # Keyed hashes, never the UIDs (the series trigger counts distinct ones).
    assert want_series == [ib.series_key(u) for u in series] and not set(want_series) & set(series)
    assert len(set(want_series)) == 2
    ib.close()
    # What the rolled-back commits leave: the version (made durable before its
    # first instance), no instance rows, no receipts, no counts.
    with s.db() as db:
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM receipts")
        db.execute("UPDATE studies SET n_instances=0, n_bytes=0")
    ib = s.open()
    got = ib.study(want.study_id)
    assert [i.instance_key for i in got.instances] == [i.instance_key for i in want.instances]
    assert [(i.path, i.size, i.calling_ae, i.peer, i.received_at) for i in got.instances] == [
        (i.path, i.size, i.calling_ae, i.peer, i.received_at) for i in want.instances]
    assert [ib.read(got, i)[-len(b):] for i, b in zip(got.instances, blobs, strict=True)] == blobs
    assert _series_keys(ib._db) == want_series  # from the sealed records
    assert ib.counts()["pending_bytes"] == sum(i.size for i in want.instances)
    records = _journal(ib._db)
    assert len(records) == 3 and all(RECOVERED in r for r in records)
    ib.close()
    # A second start finds nothing more to do.
    ib = s.open()
    assert len(ib.study(want.study_id).instances) == 3 and len(_journal(ib._db)) == 3
    ib.close()


def test_partial_repeated_and_foreign_files_are_emptied_not_indexed(tmp_path: Path) -> None:
    s = Store(tmp_path / "inbox")
    ib = s.open()
    kept = _put(ib, "1.2.3", "1.2.3.1", os.urandom(5000))
    cut = _put(ib, "1.2.3", "1.2.3.2", os.urandom(5000))
    ib.close()
    slots = tmp_path / "inbox" / "files" / "slots"
    spare = sorted(p for p in slots.glob("*.enc") if p.stat().st_size == 0)
    shutil.copyfile(kept, spare[0])  # the same instance again (a re-send, row not kept)
    foreign = Store(tmp_path / "other")  # sealed under another box's keys
    fib = foreign.open()
    shutil.copyfile(_put(fib, "1.2.3", "1.2.3.9", os.urandom(5000)), spare[1])
    fib.close()
    with s.db() as db:
        db.execute("DELETE FROM instances WHERE file=?", (str(cut.relative_to(s.root)),))
    with open(cut, "r+b") as fh:  # and that one was cut short: never complete, never acked
        fh.truncate(os.path.getsize(cut) // 2)
    ib = s.open()
    study = ib.study(ib._db.execute("SELECT id FROM studies").fetchone()[0])
    assert [i.path for i in study.instances] == [kept]
    assert cut.stat().st_size == 0 and spare[0].stat().st_size == 0
    assert spare[1].stat().st_size == 0
    assert not any(RECOVERED in r for r in _journal(ib._db))
    ib.close()


def test_a_row_without_its_file_is_dropped_and_journaled(tmp_path: Path) -> None:
    s = Store(tmp_path / "inbox")
    ib = s.open()
    gone = _put(ib, "1.2.3", "1.2.3.1", os.urandom(2000))
    _put(ib, "1.2.3", "1.2.3.2", os.urandom(2000))
    ib.close()
    gone.unlink()
    ib = s.open()
    study = ib.study(ib._db.execute("SELECT id FROM studies").fetchone()[0])
    assert len(study.instances) == 1 and gone not in [i.path for i in study.instances]
    assert ib._db.execute("SELECT n_instances FROM studies").fetchone()[0] == 1
    alerts = [r for r in _journal(ib._db) if "security.alert" in r]
    assert len(alerts) == 1 and DROPPED in alerts[0]
    ib.close()
