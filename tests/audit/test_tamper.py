"""Tampering with the stored audit log is detected and located precisely."""

from __future__ import annotations

import os
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import agent.audit.log as audit_log_module
from agent.audit import AuditLog, anchor, verify
from agent.audit.checkpoint import canonical
from tests.helpers.audit import BOX, AuditBox, fill

DAY = 86_400_000_000


def _raw(ab: AuditBox) -> sqlite3.Connection:
    return sqlite3.connect(ab.db, isolation_level=None)


def _written(ab: AuditBox, n: int = 12) -> None:
    log = ab.open()
    fill(log, n)
    log.checkpoint()
    log.close()


def _problems(ab: AuditBox, *, published: bool = False) -> list[str]:
    report = verify(ab.db, ab.kek, ab.genesis, ab.published if published else (),
                    signing_key_path=ab.signing)
    assert report.ok is (not report.problems)
    return report.problems


def test_untouched_log_verifies(ab: AuditBox) -> None:
    _written(ab, 12)
    report = verify(ab.db, ab.kek, ab.genesis, ab.published, signing_key_path=ab.signing)
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (12, 1, 12)
    assert report.checkpoints == 3  # every 5 records, plus the forced one


def test_flipped_byte_names_the_record(ab: AuditBox) -> None:
    _written(ab)
    with _raw(ab) as db:
        ct = bytearray(db.execute("SELECT ct FROM records WHERE seq=7").fetchone()[0])
        ct[20] ^= 0x01
        db.execute("UPDATE records SET ct=? WHERE seq=7", (bytes(ct),))
    problems = _problems(ab)
    assert any(p.startswith("record seq 7 ") and "modified" in p for p in problems), problems
    assert any("record seq 7 " in p and "failed decryption" in p for p in problems), problems
    assert all("seq 7" in p for p in problems), problems


def test_rehashed_record_breaks_the_link_and_the_checkpoint(ab: AuditBox) -> None:
    """An attacker with the KEK re-seals and re-hashes a record: the chain still points at it."""
    _written(ab)
    with _raw(ab) as db:
        db.execute("UPDATE records SET hash=? WHERE seq=3", (os.urandom(32),))
    problems = _problems(ab)
    assert any(p.startswith("record seq 3 ") and "modified" in p for p in problems)
    assert any(p.startswith("record seq 4: does not link to seq 3") for p in problems), problems


def test_deleted_record_is_a_gap(ab: AuditBox) -> None:
    _written(ab)
    with _raw(ab) as db:
        db.execute("DELETE FROM records WHERE seq=4")
    problems = _problems(ab)
    assert "records seq 4..4 are missing (deleted)" in problems
    # The checkpoint over seq 5 still matches: only the gap is reported.
    assert len(problems) == 1, problems


def test_reordered_records(ab: AuditBox) -> None:
    _written(ab)
    with _raw(ab) as db:
        a = db.execute("SELECT day, ts_us, prev, hash, ct FROM records WHERE seq=3").fetchone()
        b = db.execute("SELECT day, ts_us, prev, hash, ct FROM records WHERE seq=4").fetchone()
        db.execute("UPDATE records SET day=?, ts_us=?, prev=?, hash=?, ct=? WHERE seq=3", b)
        db.execute("UPDATE records SET day=?, ts_us=?, prev=?, hash=?, ct=? WHERE seq=4", a)
    problems = _problems(ab)
    assert any(p.startswith("record seq 3: does not link") for p in problems), problems
    assert any(p.startswith("record seq 4: does not link") for p in problems), problems
    assert any(p.startswith("record seq 3 ") and "modified" in p for p in problems), problems


def test_truncated_tail_below_a_checkpoint(ab: AuditBox) -> None:
    _written(ab)
    with _raw(ab) as db:
        db.execute("DELETE FROM records WHERE seq > 8")
    problems = _problems(ab)
    assert any("covers records through seq 10 but the log ends at seq 8: records 9..10 were "
               "truncated" in p for p in problems), problems
    assert any("checkpoint 2 covers records through seq 12 but the log ends at seq 8" in p
               for p in problems), problems


def test_truncated_tail_with_its_checkpoints(ab: AuditBox) -> None:
    """Removing records and the checkpoints over them: caught by the published
    checkpoints, and by the evolved signing key."""
    _written(ab)
    with _raw(ab) as db:
        db.execute("DELETE FROM records WHERE seq > 5")
        db.execute("DELETE FROM checkpoints WHERE number > 0")
    local = _problems(ab)
    assert local[0] == ("the audit signing key has evolved past checkpoint 0: later "
                        "checkpoints were removed (or the key file was replaced)")
    # The anchor outside the database remembers the newest checkpoint as well.
    assert len(local) == 2 and local[1].startswith("the anchor records checkpoint 2 (seq 12, ")
    assert local[1].endswith("but the database ends at checkpoint 0: checkpoints were removed "
                             "or the database was rolled back")
    report = verify(ab.db, ab.kek, ab.genesis, ab.published)
    assert not report.ok
    assert any(p.startswith("published checkpoint 2 (seq 12) is missing locally: local "
                            "checkpoints end at 0") for p in report.problems), report.problems
    assert any("records 6..12 were truncated" in p for p in report.problems), report.problems


def test_modified_checkpoint(ab: AuditBox) -> None:
    _written(ab)
    with _raw(ab) as db:
        body = db.execute("SELECT body FROM checkpoints WHERE number=1").fetchone()[0]
        db.execute("UPDATE checkpoints SET body=? WHERE number=1",
                   (body.replace(b'"seq":10', b'"seq":9'),))
    problems = _problems(ab)
    # Only the modified checkpoint is blamed, not its successor that still links to the original.
    assert problems == ["checkpoint 1: signature is invalid (checkpoint modified or replaced)"]


def test_replaced_checkpoint_signed_by_another_key(ab: AuditBox) -> None:
    _written(ab)
    rogue = Ed25519PrivateKey.generate()
    rogue_pub = rogue.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with _raw(ab) as db:
        import json
        fields = json.loads(db.execute("SELECT body FROM checkpoints WHERE number=1").fetchone()[0])
        fields["public_key"] = rogue_pub.hex()
        fields["head"] = "00" * 32
        body = canonical(fields)
        db.execute("UPDATE checkpoints SET body=?, signature=? WHERE number=1",
                   (body, rogue.sign(body)))
    problems = _problems(ab)
    assert any(p.startswith("checkpoint 1: signed with key " + rogue_pub.hex()[:16])
               and "replaced or forged" in p for p in problems), problems
    report = verify(ab.db, ab.kek, ab.genesis, ab.published)
    assert "checkpoint 1 differs from the one published (local checkpoint replaced)" in \
        report.problems


def _days(ab: AuditBox, monkeypatch: pytest.MonkeyPatch, n: int) -> dict[str, list[int]]:
    """Write ``n`` records spread over several UTC days; return seqs per day."""
    ticks = iter(range(1_790_000_000_000_000, 1_800_000_000_000_000, DAY // 4))
    monkeypatch.setattr(audit_log_module, "_now_us", lambda: next(ticks))
    _written(ab, n)
    out: dict[str, list[int]] = {}
    with _raw(ab) as db:
        for seq, day in db.execute("SELECT seq, day FROM records ORDER BY seq"):
            out.setdefault(day, []).append(seq)
    assert len(out) >= 3
    return out


def test_swapped_days(ab: AuditBox, monkeypatch: pytest.MonkeyPatch) -> None:
    days = _days(ab, monkeypatch, 12)
    d1, d2 = sorted(days)[:2]
    with _raw(ab) as db:
        db.execute("UPDATE records SET day=CASE day WHEN ? THEN ? WHEN ? THEN ? END "
                   "WHERE day IN (?, ?)", (d1, d2, d2, d1, d1, d2))
    problems = _problems(ab)
    for seq in days[d1] + days[d2]:
        assert any(p.startswith(f"record seq {seq} (day ") and "modified" in p
                   for p in problems), (seq, problems)
    assert any(f"day {d1} comes after day {d2}" in p for p in problems), problems


def test_swapped_day_keys(ab: AuditBox, monkeypatch: pytest.MonkeyPatch) -> None:
    days = _days(ab, monkeypatch, 12)
    d1, d2 = sorted(days)[:2]
    with _raw(ab) as db:
        w1 = db.execute("SELECT wrapped FROM day_keys WHERE day=?", (d1,)).fetchone()[0]
        w2 = db.execute("SELECT wrapped FROM day_keys WHERE day=?", (d2,)).fetchone()[0]
        db.execute("UPDATE day_keys SET wrapped=? WHERE day=?", (w2, d1))
        db.execute("UPDATE day_keys SET wrapped=? WHERE day=?", (w1, d2))
    problems = _problems(ab)
    assert problems == [f"record seq {s} (day {d}) failed decryption: tampered, moved to "
                        "another position or day, or sealed under another day's key"
                        for d in (d1, d2) for s in days[d]]


def test_recreated_log_is_caught_by_the_pinned_key(ab: AuditBox) -> None:
    _written(ab, 6)
    genesis = ab.genesis
    ab.db.unlink()
    for extra in ab.db.parent.glob("audit.db-*"):
        extra.unlink()
    log = AuditLog(ab.db, ab.kek, ab.signing, ab.logs[0].settings, box=BOX)
    fill(log, 3)
    log.close()
    report = verify(ab.db, ab.kek, genesis)
    assert any(p.startswith("the genesis key pinned in the database") and "re-created" in p
               for p in report.problems), report.problems


def test_root_with_the_kek_rewrites_history(ab: AuditBox) -> None:
    """The strongest local attacker: re-seals a record with the real day key, re-hashes the
    chain, drops the checkpoints and plants a fresh signing seed.  The local log is then
    self-consistent, but the evolved key and the published checkpoints give it away."""
    from agent.audit.store import Row, Store, connect, open_record, record_hash, seal_record

    _written(ab, 12)
    conn = connect(ab.db)
    store = Store(conn)
    rows = list(store.rows())
    key = store.day_key(rows[2].day, ab.kek, create=False)
    assert key is not None
    forged = open_record(key, rows[2])
    forged["phi"] = {"patient_id": "SOMEONE-ELSE"}
    prev = rows[1].hash
    conn.execute("BEGIN")
    for row in rows[2:]:
        ct = seal_record(key, row.seq, row.day, forged) if row.seq == 3 else row.ct
        h = record_hash(row.seq, row.day, row.ts_us, prev, ct)
        conn.execute("DELETE FROM records WHERE seq=?", (row.seq,))
        store.insert(Row(row.seq, row.day, row.ts_us, prev, h, ct))
        prev = h
    conn.execute("DELETE FROM checkpoints")
    conn.execute("COMMIT")
    conn.close()
    # Without outside evidence only the chain of signing keys can tell (this attacker
    # also removes the anchor file, which would say that checkpoints existed).
    anchor.path_for(ab.db).unlink()
    ab.signing.write_text(os.urandom(32).hex())
    assert _problems(ab) == ["the audit signing key has evolved past the genesis key: later "
                             "checkpoints were removed (or the key file was replaced)"]
    report = verify(ab.db, ab.kek, ab.genesis, ab.published)
    assert any("published checkpoint 0 (seq 5) is missing locally" in p for p in report.problems)
    assert any(p.startswith("published checkpoint 0: record seq 5 no longer hashes to the "
                            "signed head") for p in report.problems), report.problems
