"""Receipt audit records journaled in the inbox's index transaction, then moved to
the real audit log exactly once (also across a crash between the two)."""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLog, records_between, verify
from agent.config import AuditSettings, InboxSettings, StudySettings
from agent.crypto import KeyEncryptionKey, random_key, write_secret_file
from agent.dicom.scp import ReceiptDrainer
from agent.store.inbox import Inbox, StoreReceipt
from tests.helpers.receive import ct_files, dcmtk, node, wait_for

ALL_TIME = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


class Box:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.kek = KeyEncryptionKey(random_key())
        self.pkey = random_key()
        self.signing = root / "keys" / "audit_signing.key"
        write_secret_file(self.signing, os.urandom(32).hex().encode())
        self.db = root / "audit" / "audit.db"

    def inbox(self) -> Inbox:
        return Inbox(self.root / "inbox", self.kek, self.pkey,
                     InboxSettings(max_bytes=1 << 30, min_free_bytes=0),
                     StudySettings(quiet_seconds=3600))

    def audit(self) -> AuditLog:
        return AuditLog(self.db, self.kek, self.signing,
                        AuditSettings(checkpoint_every=4, checkpoint_seconds=3600),
                        box="site/dev")

    def records(self, event: str) -> list[dict[str, Any]]:
        return [r for r in records_between(self.db, self.kek, *ALL_TIME) if r["event"] == event]


def _describe(receipt: StoreReceipt) -> dict[str, object]:
    event = {"stored": "instance.received", "duplicate": "instance.duplicate",
             "conflict": "instance.conflict"}[receipt.outcome]
    return {"event": event, "source": "10.0.0.9",
            "details": {"instance": receipt.instance.instance_key[:12], "bytes": receipt.instance.size}}


def _store(ib: Inbox, sop: str, data: bytes) -> StoreReceipt:
    w = ib.begin("1.2.840.99.1")
    w.write(data)
    return ib.commit(w, sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="ts",
                     calling_ae="MOD", peer="10.0.0.9", audit=_describe)


def test_journaled_receipts_survive_a_crash_and_reach_the_audit_log_once(tmp_path: Path) -> None:
    box = Box(tmp_path)
    ib = box.inbox()
    receipts = [_store(ib, "1.2.3.1", b"a" * 100), _store(ib, "1.2.3.2", b"b" * 200),
                _store(ib, "1.2.3.1", b"a" * 100)]
    assert [r.outcome for r in receipts] == ["stored", "stored", "duplicate"]
    ib._db.close()  # kill -9: nothing was drained
    ib = box.inbox()
    batch = ib.pending_receipts()
    assert [e["event"] for _, _, e in batch] == [
        "instance.received", "instance.received", "instance.duplicate"]
    log = box.audit()
    upto = log.ingest("inbox", batch[:2])
    # Crash after the audit commit, before the inbox forgot them: delivered again.
    assert log.ingest("inbox", batch) == batch[-1][0] == upto + 1
    assert log.ingest("inbox", batch) == upto + 1
    ib.drop_receipts(upto + 1, now=True)
    assert ib.pending_receipts() == []
    log.close()
    ib.close()
    got = box.records("instance.received")
    assert [r["details"]["bytes"] for r in got] == [100, 200]
    assert all(r["source"] == "10.0.0.9" and r["outcome"] == "success" for r in got)
    assert len(box.records("instance.duplicate")) == 1
    assert verify(box.db, box.kek, box.db.parent / "genesis.pub").ok


def test_the_drain_delete_rides_on_the_next_index_transaction(tmp_path: Path) -> None:
    box = Box(tmp_path)
    ib = box.inbox()
    _store(ib, "1.2.3.1", b"x")
    first = ib.pending_receipts()
    ib.drop_receipts(first[-1][0])  # not now: nothing deleted yet, but not offered again
    assert ib.pending_receipts() == []
    assert ib._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 1
    _store(ib, "1.2.3.2", b"y")
    ids = [r[0] for r in ib._db.execute("SELECT id FROM receipts")]
    assert ids == [first[-1][0] + 1]
    ib.close()


def test_scp_with_receipts_audits_every_stored_instance(tmp_path: Path) -> None:
    box = Box(tmp_path)
    log = box.audit()
    files = ct_files(tmp_path / "ct", 6)
    with node(tmp_path / "n", max_pdu=1 << 20, receipts=log) as n:
        r = dcmtk("storescu", "-aet", "MOD", "-aec", "EDGE_AGENT", "127.0.0.1", str(n.port),
                  *map(str, files))
        assert r.returncode == 0, r.stderr
        r = dcmtk("storescu", "-aet", "MOD", "-aec", "EDGE_AGENT", "127.0.0.1", str(n.port),
                  str(files[0]))
        assert r.returncode == 0, r.stderr
        assert n.stored() == 6
        # Synchronous audit calls are kept for the association, not for the receipts.
        assert n.audited("instance.received") == []
        wait_for(lambda: len(box.records("instance.received")) == 6, 20, "receipts drained")
    # stop() drained and deleted everything but the newest row (it keeps the numbering).
    assert len(box.records("instance.duplicate")) == 1
    log.close()
    db = sqlite3.connect(tmp_path / "n" / "inbox" / "index.db")  # the node's own index
    try:
        assert db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 1
    finally:
        db.close()


def test_receipts_after_an_idle_drain_are_still_moved(tmp_path: Path) -> None:
    """An idle drain deletes what the audit log holds; the numbering must not restart
    below the drained mark, or every later receipt would be skipped."""
    box = Box(tmp_path)
    log = box.audit()
    ib = box.inbox()
    drainer = ReceiptDrainer(ib, log)
    _store(ib, "1.2.3.1", b"x")
    _store(ib, "1.2.3.2", b"y")
    assert drainer.drain(idle=True) == 2
    assert drainer.drain(idle=True) == 0
    _store(ib, "1.2.3.3", b"z")
    assert drainer.drain(idle=True) == 1
    ib.close()
    ib = box.inbox()  # a restart re-offers the kept row; the audit log dedupes it
    ReceiptDrainer(ib, log).drain(idle=True)
    _store(ib, "1.2.3.4", b"w")
    ReceiptDrainer(ib, log).drain(idle=True)
    ib.close()
    log.close()
    assert [r["details"]["bytes"] for r in box.records("instance.received")] == [1, 1, 1, 1]


@pytest.mark.parametrize("assocs", [1, 3])
def test_many_instances_over_concurrent_associations_all_indexed(tmp_path: Path,
                                                                 assocs: int) -> None:
    files = ct_files(tmp_path / "ct", 12)
    with node(tmp_path / "n", max_pdu=1 << 20) as n:
        groups = [files[i::assocs] for i in range(assocs)]
        results: list[int] = []

        def send(g: list[Path]) -> None:
            results.append(dcmtk("storescu", "-aet", "MOD", "-aec", "EDGE_AGENT", "127.0.0.1",
                                 str(n.port), *map(str, g)).returncode)

        threads = [threading.Thread(target=send, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [0] * assocs
        assert n.stored() == 12
        assert len(n.audited("instance.received")) == 12


def test_kill9_after_acks_every_acked_instance_has_one_receipt_record(
        tmp_path: Path, box: Any, broker: Any) -> None:
    # Real daemon, real kill -9 right after the last Success: the receipts were
    # only journaled in the inbox then; the next start moves them, exactly once.
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from agent.config import load
    from tests.helpers import Daemon, set_config

    set_config(box, "study", "quiet_seconds", "600")
    files = ct_files(tmp_path / "ct", 8)
    d = Daemon(box)
    d.start()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    d.kill9()
    assert statuses == [0] * 8
    assoc.abort()
    d = Daemon(box)
    d.start()
    assert d.stop() == 0
    cfg = load(box.config)
    kek = KeyEncryptionKey.from_file(cfg.keys.kek)
    db = cfg.state_dir / "audit" / "audit.db"
    got = [r for r in records_between(db, kek, *ALL_TIME) if r["event"] == "instance.received"]
    assert len(got) == 8
    assert len({r["details"]["instance"] for r in got}) == 8
    assert verify(db, kek, db.parent / "genesis.pub").ok
