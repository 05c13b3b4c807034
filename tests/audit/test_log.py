"""AuditLog behaviour: crash safety, retention, re-wrap, concurrency, full disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

import agent.audit.log as audit_log_module
from agent.audit import CATALOGUE, AuditLog, kind_of, records_between, verify
from agent.config import AuditSettings
from agent.crypto import KeyEncryptionKey
from agent.errors import AuditError
from tests.helpers.audit import BOX, AuditBox, fill

DAY = 86_400_000_000
BASE = 1_790_000_000_000_000  # 2026-09-21
REPO = Path(__file__).resolve().parents[2]


def _clock(monkeypatch: pytest.MonkeyPatch, step: int = DAY // 4) -> None:
    ticks = iter(range(BASE, BASE + 1000 * DAY, step))
    monkeypatch.setattr(audit_log_module, "_now_us", lambda: next(ticks))


def test_catalogue_covers_every_daemon_event() -> None:
    names = ("association.accepted association.rejected instance.received instance.duplicate "
             "instance.conflict study.completed deid.applied instance.quarantined inference.done "
             "inference.failed model.refused model.changed message.published egress.blocked "
             "security.alert config.loaded cli.action key.rotated cert.changed audit.exported "
             "audit.retention audit.log_replaced audit.over_budget audit.events_lost "
             "results.link_written results.link_shredded results.sent results.committed "
             "commitment.report "
             "mpps.n_create mpps.n_set commitment.request commitment.report_sent "
             "commitment.report_undeliverable "
             "results.exported "
             "quarantine.viewed quarantine.released quarantine.purged "
             "review.verdict review.viewed review.escalated performance.alert "
             "daemon.started daemon.stopped").split()
    assert sorted(CATALOGUE) == sorted(names)
    assert kind_of("instance.received").event_id.code == "110104"
    assert kind_of("egress.blocked").event_id.code == "110113"
    assert kind_of("results.sent").event_id.code == "110104"
    assert kind_of("no.such.event").event_id.code == "110100"


def test_unknown_event_is_recorded_not_dropped(ab: AuditBox) -> None:
    log = ab.open()
    log.record("made.up", details={"x": 1})
    log.close()
    rec = records_between(ab.db, ab.kek, datetime(2000, 1, 1, tzinfo=UTC),
                          datetime(2100, 1, 1, tzinfo=UTC))
    assert [(r["event"], r["event_id"]) for r in rec] == [("made.up", "110100")]


def test_signing_key_evolves_and_forgets_the_past(ab: AuditBox) -> None:
    genesis_seed = ab.signing.read_bytes()
    log = ab.open()
    fill(log, 3)
    log.checkpoint()
    log.checkpoint()
    assert ab.signing.read_bytes() != genesis_seed
    assert ab.signing.stat().st_mode & 0o777 == 0o600
    log.close()
    # The db pins epoch 0's public key; the file now holds epoch 2's seed.
    assert verify(ab.db, ab.kek, ab.genesis, signing_key_path=ab.signing).ok


def test_foreign_signing_key_is_refused(ab: AuditBox) -> None:
    log = ab.open()
    fill(log, 6)
    log.close()
    ab.signing.write_text(os.urandom(32).hex())
    with pytest.raises(AuditError, match="does not continue the checkpoint chain"):
        ab.open()


def test_threads_and_two_writers_keep_one_chain(ab: AuditBox) -> None:
    first, second = ab.open(), ab.open(publish=False)

    def work(log: AuditLog, k: int) -> None:
        fill(log, 25, start=k * 100)
        log.maybe_checkpoint()

    threads = [threading.Thread(target=work, args=(first if k % 2 else second, k))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.checkpoint()
    first.checkpoint()
    assert first.errors == second.errors == 0
    first.close()
    second.close()
    report = verify(ab.db, ab.kek, ab.genesis, signing_key_path=ab.signing)
    assert report.ok, report.problems
    assert report.records == 100


WRITER = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from agent.audit import AuditLog
from agent.config import AuditSettings
from agent.crypto import KeyEncryptionKey
log = AuditLog(Path({db!r}), KeyEncryptionKey(bytes.fromhex({kek!r})), Path({sig!r}),
               AuditSettings(checkpoint_every=7, checkpoint_seconds=3600), box={box!r})
i = 0
while True:
    log.record("instance.received", details={{"n": i}}, phi={{"patient_id": "P%d" % i}})
    if log.errors:
        sys.exit(3)
    i += 1
    print(i, flush=True)
"""


def test_kill_9_loses_nothing_committed(ab: AuditBox) -> None:
    code = WRITER.format(repo=str(REPO), db=str(ab.db), kek=ab.kek.key.hex(),
                         sig=str(ab.signing), box=BOX)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 80:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    report = verify(ab.db, ab.kek, ab.genesis, signing_key_path=ab.signing)
    assert report.ok, report.problems
    assert report.records >= acknowledged
    # The next start continues the chain and the ratchet where the killed writer left them.
    log = ab.open()
    log.record("daemon.started")
    log.checkpoint()
    assert log.errors == 0, log.last_error
    log.close()
    report = verify(ab.db, ab.kek, ab.genesis, ab.published, signing_key_path=ab.signing)
    assert report.ok, report.problems
    assert report.records >= acknowledged + 1


def test_retention_crypto_shreds_and_verify_still_passes(
        ab: AuditBox, monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)
    log = ab.open(AuditSettings(checkpoint_every=5, checkpoint_seconds=3600, retention_days=2))
    fill(log, 20)  # ~5 days
    with sqlite3.connect(ab.db) as db:
        keys = dict(db.execute("SELECT day, wrapped FROM day_keys"))
    log.apply_retention(datetime.fromtimestamp((BASE + 6 * DAY) / 1e6, UTC))
    assert log.errors == 0, log.last_error
    log.close()
    with sqlite3.connect(ab.db) as db:
        live = dict(db.execute("SELECT day, wrapped FROM day_keys"))
    shredded = sorted(d for d, w in live.items() if w is None)
    assert shredded == sorted(keys)[:len(shredded)] and 1 <= len(shredded) < len(keys)
    # Crypto-shredding means the wrapped keys are really gone from the files.
    on_disk = b"".join(p.read_bytes() for p in ab.db.parent.glob("audit.db*"))
    for day in shredded:
        assert keys[day] not in on_disk
    report = verify(ab.db, ab.kek, ab.genesis, ab.published, signing_key_path=ab.signing)
    assert report.ok, report.problems
    assert report.shredded_through > 0
    assert report.first_seq == report.shredded_through + 1
    retention = [e for m in ab.published for e in m.get("events", [])  # type: ignore[attr-defined]
                 if e["event"] == "audit.retention"]
    assert retention and retention[0]["details"]["floor_seq"] == report.shredded_through


def test_byte_budget_shreds_oldest_days_but_never_today(
        ab: AuditBox, monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)
    log = ab.open(AuditSettings(checkpoint_every=50, checkpoint_seconds=3600, max_bytes=1,
                                min_retention_days=1))
    fill(log, 12)
    with sqlite3.connect(ab.db) as db:
        newest = db.execute("SELECT MAX(day) FROM records").fetchone()[0]
    # Every day is older than min_retention_days by then (volume may not take younger ones).
    log.apply_retention(datetime.fromtimestamp((BASE + 10 * DAY) / 1e6, UTC))
    with sqlite3.connect(ab.db) as db:
        days = list(db.execute("SELECT day, wrapped FROM day_keys ORDER BY day"))
    # Every day before the newest is shredded; the newest (and the retention record's) stay.
    assert len(days) >= 3
    assert all((w is None) == (d < newest) for d, w in days), days
    fill(log, 2, start=100)
    assert log.errors == 0, log.last_error
    log.close()
    report = verify(ab.db, ab.kek, ab.genesis, signing_key_path=ab.signing)
    assert report.ok, report.problems


def test_deletion_dressed_up_as_retention_is_caught(ab: AuditBox) -> None:
    log = ab.open()
    fill(log, 12)
    log.checkpoint()
    log.close()
    with sqlite3.connect(ab.db) as db:
        h = db.execute("SELECT hash FROM records WHERE seq=4").fetchone()[0]
        db.execute("DELETE FROM records WHERE seq <= 4")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('floor_seq', '4'), ('floor_hash', ?)",
                   (h.hex(),))
    report = verify(ab.db, ab.kek, ab.genesis)
    assert report.problems == ["records 1..4 are gone but no audit.retention record attests "
                               "that they were crypto-shredded (deleted outside retention)"]


def test_rewrap_moves_every_day_key_to_the_new_kek(
        ab: AuditBox, monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch)
    log = ab.open()
    fill(log, 10)
    new = KeyEncryptionKey(os.urandom(32))
    with sqlite3.connect(ab.db) as db:
        days = db.execute("SELECT COUNT(*) FROM day_keys").fetchone()[0]
    assert days >= 3
    assert log.rewrap(ab.kek, new) == days
    assert log.rewrap(ab.kek, new) == 0  # idempotent: already under the new key
    fill(log, 3, start=50)
    log.checkpoint()
    assert log.errors == 0, log.last_error
    log.close()
    assert verify(ab.db, new, ab.genesis).ok
    old = verify(ab.db, ab.kek, ab.genesis)
    assert not old.ok and all("cannot be unwrapped" in p for p in old.problems), old.problems
    with pytest.raises(AuditError, match="audit day"):
        ab.open(kek=new).rewrap(KeyEncryptionKey(os.urandom(32)), ab.kek)


def test_publish_failure_is_retried_at_the_next_checkpoint(ab: AuditBox) -> None:
    outbox: list[dict[str, object]] = []
    down = True

    def publish(data: dict[str, object]) -> None:
        if down:
            raise ConnectionError("outbox full")
        outbox.append(data)

    log = AuditLog(ab.db, ab.kek, ab.signing, AuditSettings(checkpoint_every=3), box=BOX,
                   publish=publish)
    fill(log, 7)
    assert log.errors == 2 and not outbox
    down = False
    log.checkpoint()
    log.close()
    # Each checkpoint on its own, then the events it covers in separate messages.
    assert [m["checkpoint"]["body"]["checkpoint"]  # type: ignore[index]
            for m in outbox if "checkpoint" in m] == [0, 1, 2]
    assert [m.get("covered_by") for m in outbox] == [None, 0, None, 1, None, 2]
    assert [e["seq"] for m in outbox for e in m.get("events", [])] == list(range(1, 8))  # type: ignore[attr-defined]


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_full_disk_never_raises_and_recovers(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        ab = AuditBox(tmp_path)
        ab.db = mnt / "audit" / "audit.db"
        log = ab.open(AuditSettings(checkpoint_every=1000))
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        written = 0
        for i in range(300):
            log.record("instance.received", details={"pad": "x" * 2000, "n": i})
            written += 1
            if log.errors:
                break
        assert log.errors >= 1 and log.stats()["backlog"] >= 1
        assert "disk" in (log.last_error or "").lower()
        filler.unlink()
        log.record("security.alert", details={"what": "disk-was-full"})
        assert log.stats()["backlog"] == 0
        log.checkpoint()
        log.close()
        report = verify(ab.db, ab.kek, ab.genesis)
        assert report.ok, report.problems
        assert report.records == written + 1  # nothing lost: the backlog was written in order
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_published_projection_matches_schema_and_has_no_phi(ab: AuditBox) -> None:
    import jsonschema  # a dev dependency (pyproject [dev]): never skipped

    from agent.uplink import cloudevents, egress

    schema = json.loads((REPO / "docs" / "schemas" / "audit.schema.json").read_text())
    log = ab.open()
    phi = {"patient_id": "MRN-884422", "patient_name": "Smith^Anna", "birth_date": "19610304"}
    log.record("deid.applied", details={"study": "9f2c1ab4", "profile": "PS3.15-E.1-1"}, phi=phi)
    # A careless caller puts PHI into details too: it must still not be published.
    log.record("instance.quarantined", outcome="minor_failure",
               details={"reason": "burned in text for Smith^Anna", "patient": "MRN-884422",
                        "nested": {"id": "x-MRN-884422-y"}, "nan": float("nan")}, phi=phi)
    log.record("cli.action", user="alice", details={"command": "audit.export"})
    # A peer picks its AE title: shaped like an identifier, it must neither leave the box
    # raw nor make the egress guard hold the message back.
    log.record("association.rejected", outcome="minor_failure", source="10.0.0.9",
               details={"calling_ae": "123-45-6789", "reason": "not-allowed",
                        "uid": "1.2.840.113619.2.55.3.1"})
    log.checkpoint()
    log.close()
    assert ab.published
    for data in ab.published:
        assert egress.check(json.dumps(data)) is None, data
        kind = "audit" if "checkpoint" in data else "audit.events"
        ev = cloudevents.envelope(kind=kind, source="urn:edge:" + BOX, data=data)
        jsonschema.validate(ev, schema, format_checker=jsonschema.FormatChecker())
        text = cloudevents.encode(ev).decode().casefold()
        for value in phi.values():
            assert value.casefold() not in text
    events = {e["event"]: e for m in ab.published for e in m.get("events", [])}  # type: ignore[attr-defined]
    assert events["instance.quarantined"]["details"]["reason"] == "[redacted]"
    assert events["deid.applied"]["details"] == {"study": "9f2c1ab4", "profile": "PS3.15-E.1-1"}
    assert events["cli.action"]["user"] == "alice"
    rejected = events["association.rejected"]
    assert str(rejected["source"]).startswith("peer:") and "10.0.0.9" not in str(rejected)
    assert str(rejected["details"]["calling_ae"]).startswith("ae:")
    assert rejected["details"]["uid"] == "[redacted]"
    assert rejected["details"]["reason"] == "not-allowed"


def test_catalogue_is_documented() -> None:
    doc = (REPO / "docs" / "audit.md").read_text()
    for name, kind in CATALOGUE.items():
        row = next((line for line in doc.splitlines()
                    if line.startswith("| ") and name in line.split("|")[1]), None)
        assert row is not None, f"{name} missing from docs/audit.md"
        assert kind.event_id.code in row and f"| {kind.action} |" in row, row


def test_time_based_checkpoint(ab: AuditBox) -> None:
    log = ab.open(AuditSettings(checkpoint_every=1000, checkpoint_seconds=1e-9))
    log.maybe_checkpoint()  # nothing recorded yet: nothing to sign
    assert not ab.published
    log.record("daemon.started")
    log.maybe_checkpoint()
    assert [m["checkpoint"]["body"]["seq"]  # type: ignore[index]
            for m in ab.published if "checkpoint" in m] == [1]


def test_record_survives_bad_input_and_a_closed_store(ab: AuditBox) -> None:
    log = ab.open()
    log.record("security.alert", details={"obj": object(), "when": datetime(2026, 1, 1)})
    assert log.errors == 0, log.last_error
    log.close()
    log.record("daemon.stopped")  # must not raise
    log.checkpoint()
    assert log.errors == 2


def test_summaries_count_every_refusal_with_bounded_records() -> None:
    from agent.audit.summary import Summaries

    s = Summaries(60.0, max_keys=3)
    written: list[dict[str, object]] = []
    t = BASE
    for _ in range(5):
        for peer in range(10):  # more peers than open windows
            t += 1
            e = {"event": "association.rejected", "outcome": "minor_failure",
                 "source": f"10.0.0.{peer}", "details": {"reason": "not allowed"}}
            if not s.absorb(e, t):
                written.append(e)
    # Past the window everything is summarised; the next refusal starts a new window.
    later = t + 61_000_000
    summaries = [x for _, x in s.take(later)]
    written += summaries
    assert len(written) <= 3 + 1 + 3 + 1  # firsts (3 keys + "many"), then their summaries
    counted = sum(int(x["details"]["repeated"]) if x["details"].get("summary")  # type: ignore[index,attr-defined]
                  else 1 for x in written)
    assert counted == 50
    assert any(x["details"].get("peers") == "many" for x in summaries)  # type: ignore[attr-defined]
    assert not s.take(later, everything=True)


def test_ingest_that_rolls_back_does_not_count_twice(ab: AuditBox) -> None:
    log = ab.open(AuditSettings(checkpoint_every=1000, checkpoint_seconds=3600))
    refusal = {"event": "association.rejected", "outcome": "minor_failure",
               "source": "10.9.9.9", "details": {"reason": "not allowed"}}
    batch = [(i, BASE + i, refusal) for i in range(1, 6)]
    # The write fails after the records were looked at (as a full disk fails an INSERT).
    with sqlite3.connect(ab.db, isolation_level=None) as other:
        other.execute("CREATE TRIGGER full BEFORE INSERT ON records "
                      "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    with pytest.raises(sqlite3.DatabaseError):
        log.ingest("inbox", batch)
    assert log.intake_hold() is not None
    with sqlite3.connect(ab.db, isolation_level=None) as other:
        other.execute("DROP TRIGGER full")
    assert log.ingest("inbox", batch) == 5  # delivered again by the journal
    log.close()
    rows = [r for r in records_between(ab.db, ab.kek, datetime(2000, 1, 1, tzinfo=UTC),
                                       datetime(2100, 1, 1, tzinfo=UTC))
            if r["event"] == "association.rejected"]
    assert [r["details"].get("repeated") for r in rows] == [None, 4]
