"""The audit trail against an attacker who wants it silent, flooded or replaced,
through the running daemon, a real mutual-TLS broker and the CLI.

* an identifier-shaped calling AE title must not hold back a signed checkpoint;
* a flood of refusals becomes counted summary records, and volume never shreds
  records younger than ``[audit] min_retention_days``;
* a deleted audit database is not replaced quietly, a truncated one gets a report;
* a store that cannot write holds intake (0xA700, with the reason) instead of
  dropping records, and any loss is counted and audited.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

import agent.audit.log as audit_log_module
from agent import config as cfgmod
from agent.audit import AuditLog, records_between
from agent.crypto import KeyEncryptionKey
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config, wait_for
from tests.helpers.dicom import make_instance
from tests.helpers.receive import rejected as was_rejected

DAY_US = 86_400_000_000
SUSPICIOUS_AE = ("123-45-6789", "1.2.3.4.5.6")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _records(box: Box) -> list[dict[str, Any]]:
    cfg = cfgmod.load(box.config)
    return records_between(cfg.state_dir / "audit" / "audit.db",
                           KeyEncryptionKey.from_file(cfg.keys.kek),
                           datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def _associate(box: Box, aet: str, ae: AE | None = None) -> Any:
    if ae is None:
        ae = AE(ae_title=aet)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)


def _audit_messages(ops: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in ops.on("audit")]


def _checkpoints(ops: Subscriber) -> list[dict[str, Any]]:
    return [m["data"]["checkpoint"]["body"] for m in _audit_messages(ops)
            if "checkpoint" in m["data"]]


def _published_events(ops: Subscriber) -> list[dict[str, Any]]:
    return [e for m in _audit_messages(ops) for e in m["data"].get("events", [])]


# -- 1. anchor suppression ----------------------------------------------------------


def test_identifier_shaped_ae_titles_cannot_hold_back_a_checkpoint(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber) -> None:
    d = Daemon(box)
    d.start()
    for aet in SUSPICIOUS_AE:
        assert was_rejected(_associate(box, aet)), aet
    ok = _associate(box, "PYNETDICOM")
    assert ok.is_established
    ok.release()
    assert d.stop() == 0
    last = _records(box)[-1]["seq"]
    # The checkpoint signed at stop covers every record, the rejections included.
    wait_for(lambda: any(c["seq"] == last for c in _checkpoints(ops)), 30,
             f"a published checkpoint covering seq {last}")
    # No raw peer string leaves the box, in any message on any topic.
    for m in ops.messages:
        for aet in SUSPICIOUS_AE:
            assert aet not in m.payload.decode("utf-8", "replace"), (m.topic, aet)
    # The projection of the rejections was published too (pseudonymised), not blocked.
    wait_for(lambda: [e for e in _published_events(ops) if e["seq"] == last], 30,
             "the events of the last checkpoint")
    rejected = [e for e in _published_events(ops) if e["event"] == "association.rejected"]
    # The second refusal of the same peer and reason is counted into a summary.
    assert sum(e["details"]["repeated"] if e["details"].get("summary") else 1
               for e in rejected) == len(SUSPICIOUS_AE), rejected
    for e in rejected:
        assert str(e["source"]).startswith("peer:"), e
        if not e["details"].get("summary"):
            assert str(e["details"]["calling_ae"]).startswith("ae:"), e
    with sqlite3.connect(box.state / "outbox" / "outbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM blocked").fetchone()[0] == 0
    # Central ops can check the box against what it received.
    published = tmp_path / "published.jsonl"
    published.write_text("".join(m.payload.decode() + "\n" for m in ops.on("audit")))
    res = _cli("audit", "verify", "--config", str(box.config), "--published", str(published),
               "--public-key", str(box.state / "audit" / "genesis.pub"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checked against" in res.stdout


# -- 2. evidence flushing -------------------------------------------------------------


def test_a_refusal_flood_becomes_counted_summary_records(box: Box, broker: Broker) -> None:
    d = Daemon(box)
    d.start()
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    flood = 150
    for _ in range(flood):
        # Refused by the allowlist (or, on a loaded machine, by the per-peer connection
        # cap before any association): either way refused, and audited.
        assert not _associate(box, "INTRUDER", ae).is_established
    assert d.stop() == 0
    rejected = [r for r in _records(box) if r["event"] == "association.rejected"]
    # Bounded: per (peer, reason) one record when it starts refusing, one summary per window.
    assert 2 <= len(rejected) <= 8, [(r["details"]["reason"], r["details"].get("repeated"))
                                      for r in rejected]
    counted = sum(int(r["details"]["repeated"]) if r["details"].get("summary") else 1
                  for r in rejected)
    assert counted == flood, [(r["details"]["reason"], r["details"].get("repeated"))
                              for r in rejected]
    summaries = [r for r in rejected if r["details"].get("summary")]
    assert any(s["details"]["reason"] == "calling AE title/address not allowed"
               for s in summaries), summaries
    for s in summaries:
        assert s["details"]["first_time"] <= s["details"]["last_time"]
        assert s["source"] == "127.0.0.1"


def test_volume_never_shreds_records_younger_than_the_minimum(
        box: Box, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    set_config(box, "audit", "max_bytes", "1")  # far over budget from the first record
    set_config(box, "telemetry", "interval_seconds", "0.5")  # retention runs at the first tick
    cfg = cfgmod.load(box.config)
    now = datetime.now(UTC)
    # Records of 20, 10 and 3 days ago: all younger than the default minimum (90 days).
    stamps = iter(int((now - timedelta(days=age)).timestamp() * 1e6) + i
                  for age in (20, 10, 3) for i in range(4))
    with monkeypatch.context() as m:
        m.setattr(audit_log_module, "_now_us", lambda: next(stamps))
        log = AuditLog(cfg.state_dir / "audit" / "audit.db", KeyEncryptionKey.from_file(cfg.keys.kek),
                       cfg.keys.audit_signing, cfg.audit, box=f"{cfg.site}/{cfg.device}")
        for i in range(11):
            log.record("instance.received", source="10.1.1.1",
                       details={"study": f"s{i}", "instance": f"i{i}"})
        log.checkpoint()
        log.close()
    old = {r["seq"] for r in _records(box)}
    assert len(old) == 11
    d = Daemon(box)
    d.start()
    wait_for(lambda: [r for r in _records(box)
                      if r["event"] in ("audit.retention", "audit.over_budget")], 60,
             "the retention run")
    assert d.stop() == 0
    recs = _records(box)
    assert old <= {r["seq"] for r in recs}, "volume shredded records younger than the minimum"
    assert not [r for r in recs if r["event"] == "audit.retention"]
    alert = next(r for r in recs if r["event"] == "audit.over_budget")
    assert alert["outcome"] == "serious_failure"
    assert alert["details"]["min_retention_days"] == 90


# -- 3. a deleted or truncated database ----------------------------------------------------


def test_a_deleted_audit_log_is_not_replaced_quietly(tmp_path: Path, box: Box, broker: Broker,
                                                     ops: Subscriber) -> None:
    d = Daemon(box)
    d.start()
    assert d.stop() == 0
    wait_for(lambda: _checkpoints(ops), 30, "a checkpoint of the first log")
    old_genesis = (box.state / "audit" / "genesis.pub").read_text().strip()
    old_published = tmp_path / "old.jsonl"
    old_published.write_text("".join(m.payload.decode() + "\n" for m in ops.on("audit")))
    shutil.rmtree(box.state / "audit")

    d = Daemon(box)
    d.start()
    status = _cli("status", "--config", str(box.config), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["audit"]["log_replaced"] == 1
    assert d.stop() == 0
    assert "audit log is missing" in d.log_text()
    new_genesis = (box.state / "audit" / "genesis.pub").read_text().strip()
    assert new_genesis != old_genesis
    replaced = [r for r in _records(box) if r["event"] == "audit.log_replaced"]
    assert len(replaced) == 1
    assert replaced[0]["details"]["previous_genesis_public_key"] == old_genesis
    assert replaced[0]["outcome"] == "major_failure"

    plain = _cli("audit", "verify", "--config", str(box.config))
    assert plain.returncode == 1, plain.stdout
    assert "NOT VERIFIABLE" in plain.stdout and old_genesis[:16] in plain.stdout
    against_old = _cli("audit", "verify", "--config", str(box.config), "--published",
                       str(old_published))
    assert against_old.returncode == 1 and "re-created" in against_old.stdout
    pinned = tmp_path / "new-genesis.hex"
    pinned.write_text(new_genesis + "\n")
    acknowledged = _cli("audit", "verify", "--config", str(box.config), "--public-key",
                        str(pinned))
    assert acknowledged.returncode == 0, acknowledged.stdout
    assert "replaced" in acknowledged.stdout


def test_a_truncated_audit_database_gets_a_report_not_a_traceback(box: Box,
                                                                   broker: Broker) -> None:
    d = Daemon(box)
    d.start()
    assert d.stop() == 0
    db = box.state / "audit" / "audit.db"
    assert not Path(str(db) + "-wal").exists() or Path(str(db) + "-wal").stat().st_size == 0
    os.truncate(db, db.stat().st_size // 2)
    res = _cli("audit", "verify", "--config", str(box.config))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "damaged" in res.stdout
    exp = _cli("audit", "export", "--config", str(box.config), "--since", "2000-01-01",
               "--until", "2100-01-01")
    assert exp.returncode == 2 and "Traceback" not in exp.stdout + exp.stderr
    assert "damaged" in exp.stderr
    d = Daemon(box)
    d.start(wait=False)
    assert d.proc is not None
    rc = d.proc.wait(60)
    d.proc = None
    assert rc != 0
    assert "Traceback" not in d.log_text()
    assert "damaged" in d.log_text()


# -- 4. a store that cannot write --------------------------------------------------------


@contextmanager
def _small_fs(where: Path) -> Iterator[None]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(where)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def _store_one(box: Box) -> tuple[int | None, bool]:
    """(status of one C-STORE or None, whether the association was established)."""
    ds = make_instance()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    if not assoc.is_established:
        return None, False
    status = assoc.send_c_store(ds)
    assoc.release()
    return (int(status.Status) if status else None), True


def test_a_store_that_cannot_write_holds_intake_instead_of_dropping(
        box: Box, broker: Broker) -> None:
    set_config(box, "dicom", "workers", "1")
    audit_dir = box.state / "audit"
    with _small_fs(audit_dir):
        d = Daemon(box)
        d.start()
        try:
            filler = _fill(audit_dir)
            refused: list[int | None] = []
            for _ in range(3):
                status, established = _store_one(box)
                refused.append(status if established else -1)
            # Held: the association is refused (transient) or the C-STORE answers 0xA700.
            assert all(s in (0xA700, -1) for s in refused), refused
            assert 0xA700 in refused or -1 in refused
            assert "audit trail cannot record" in d.log_text()
            filler.unlink()
            wait_for(lambda: _store_one(box)[0] == 0x0000, 60, "intake to resume")
        finally:
            assert d.stop() == 0
        res = _cli("audit", "verify", "--config", str(box.config))
        assert res.returncode == 0, res.stdout
        recs = _records(box)
    # Nothing was dropped: the refused attempts are on record, in order, and no loss.
    held = [r for r in recs if r["event"] in ("instance.received", "association.rejected")
            and r["outcome"] != "success"]
    assert held, [r["event"] for r in recs]
    assert not [r for r in recs if r["event"] == "audit.events_lost"]


def test_events_beyond_the_queue_are_counted_alerted_and_recorded(
        box: Box, broker: Broker) -> None:
    set_config(box, "dicom", "workers", "1")
    set_config(box, "audit", "max_queue", "1")
    audit_dir = box.state / "audit"
    with _small_fs(audit_dir):
        d = Daemon(box)
        d.start()
        try:
            filler = _fill(audit_dir)
            for _ in range(3):  # the 1st record fails and waits; later ones find the queue full
                _store_one(box)
            status = json.loads(_cli("status", "--config", str(box.config), "--json").stdout)
            lost = status["audit"]["lost"]
            assert lost >= 1 and status["audit"]["held"] == 1, status["audit"]
            assert "SECURITY: audit events are being lost" in d.log_text()
            filler.unlink()
            wait_for(lambda: _store_one(box)[0] == 0x0000, 60, "intake to resume")
        finally:
            assert d.stop() == 0
        res = _cli("audit", "verify", "--config", str(box.config))
        assert res.returncode == 0, res.stdout
        recs = _records(box)
    # The gap is in the chain: what was kept, then how many could not be.
    gap = [r for r in recs if r["event"] == "audit.events_lost"]
    # (a refusal may still have found the queue full between the status call and recovery)
    assert len(gap) == 1 and gap[0]["details"]["count"] >= lost, gap
    assert gap[0]["outcome"] == "major_failure"
    assert recs.index(gap[0]) > next(i for i, r in enumerate(recs)
                                     if r["event"] == "association.accepted")
