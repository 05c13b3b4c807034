"""The outbox on its own, against real SQLite, real AES-GCM and a real full filesystem."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.crypto import KeyEncryptionKey, random_key
from agent.errors import CryptoError, OutOfResources, StorageError
from agent.types import PhiFingerprint
from agent.uplink.outbox import TELEMETRY_MAX, Outbox

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kek() -> KeyEncryptionKey:
    return KeyEncryptionKey(random_key())


def result(i: int, size: int = 200) -> tuple[str, bytes]:
    return f"result-{i}", json.dumps({"id": f"result-{i}", "pad": "x" * size}).encode()


def test_order_stable_ids_dedupe_and_ack_survive_reopen(tmp_path: Path,
                                                         kek: KeyEncryptionKey) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db, kek, 10 * 2**20)
    for i in range(6):
        assert ob.enqueue("results", *result(i))
    assert ob.enqueue("results", *result(3)) is False  # same id after a crash: no second copy
    msgs = ob.peek(0, 100)
    assert [m.event_id for m in msgs] == [f"result-{i}" for i in range(6)]
    ob.ack(msgs[0].seq)
    ob.ack(msgs[2].seq)
    ob.close()

    ob = Outbox(db, kek, 10 * 2**20)
    left = ob.peek(0, 100)
    assert [m.event_id for m in left] == ["result-1", "result-3", "result-4", "result-5"]
    assert left[0].payload == result(1)[1]
    # A new message after the reopen sorts after the old ones (seq never reused).
    ob.enqueue("results", *result(99))
    assert ob.peek(left[-1].seq, 10)[0].event_id == "result-99"
    assert ob.stats()["depth"] == 5
    ob.close()


def test_guard_values_are_sealed_and_returned(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    ob = Outbox(tmp_path / "o.db", kek, 2**20)
    ob.enqueue("results", "r", b"{}", PhiFingerprint(frozenset({"Canary^Guard"})))
    assert ob.peek()[0].guard.values == frozenset({"Canary^Guard"})
    ob.close()
    assert b"Canary" not in (tmp_path / "o.db").read_bytes()
    wal = tmp_path / "o.db-wal"
    assert not wal.exists() or b"Canary" not in wal.read_bytes()


def test_results_and_audit_are_never_dropped_telemetry_goes_first(
        tmp_path: Path, kek: KeyEncryptionKey) -> None:
    ob = Outbox(tmp_path / "o.db", kek, 40_000, min_free_bytes=0)
    for i in range(30):
        ob.enqueue("telemetry", f"t{i}", b"t" * 600)
    accepted = []
    with pytest.raises(OutOfResources) as err:
        for i in range(1000):
            eid, body = result(i, 900)
            ob.enqueue("results" if i % 2 else "audit", eid, body)
            accepted.append(eid)
    assert "raise [outbox] max_bytes" in str(err.value)
    msgs = ob.peek(0, 10_000)
    kept = [m.event_id for m in msgs if m.channel != "telemetry"]
    assert kept == accepted  # every accepted result/audit message is still there, in order
    tel = [m.event_id for m in msgs if m.channel == "telemetry"]
    assert tel == ["t29"]  # the newest sample survives
    assert ob.stats()["bytes"] <= 40_000
    # Telemetry under pressure is refused quietly (False), never an exception.
    assert ob.enqueue("telemetry", "t-late", b"t" * 600) is False
    # Draining frees room for results again.
    for m in msgs[:5]:
        ob.ack(m.seq)
    ob.enqueue("results", *result(5000, 900))
    ob.close()


def test_has_room_answers_as_enqueue_would(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    ob = Outbox(tmp_path / "o.db", kek, 40_000, min_free_bytes=0)
    for i in range(60):
        ob.enqueue("telemetry", f"t{i}", b"t" * 600)
    # A budget mostly full of telemetry still has room for a result: enqueue
    # would drop old samples for it.
    assert ob.has_room("results", 2_000)
    eid, body = result(0, 900)
    assert ob.enqueue("results", eid, body)
    accepted = 1
    while ob.has_room("results", 2_000):
        eid, body = result(accepted, 900)
        ob.enqueue("results", eid, body)  # never raises while has_room says yes
        accepted += 1
    assert not ob.has_room("results", 40_000)
    with pytest.raises(OutOfResources):
        for i in range(accepted, accepted + 5):
            ob.enqueue("results", *result(i, 900))
    for m in ob.peek(0, 10)[:5]:
        ob.ack(m.seq)
    assert ob.has_room("results", 2_000)
    ob.close()


def test_telemetry_backlog_is_coalesced_keeping_first_and_newest(
        tmp_path: Path, kek: KeyEncryptionKey) -> None:
    ob = Outbox(tmp_path / "o.db", kek, 2**30)
    ob.enqueue("results", *result(0))
    n = TELEMETRY_MAX + 500
    for start in range(0, n, 250):
        ob.enqueue_many("telemetry", [(f"t{i:05d}", b"{}", PhiFingerprint())
                                      for i in range(start, min(n, start + 250))])
    ids = [m.event_id for m in ob.peek(0, 100_000)]
    tel = [i for i in ids if i.startswith("t")]
    assert "result-0" in ids
    assert len(tel) <= TELEMETRY_MAX
    assert tel[0] == "t00000" and tel[-1] == f"t{n - 1:05d}"
    assert tel == sorted(tel)
    st = ob.stats()
    assert st["telemetry_depth"] == len(tel)
    assert st["telemetry_coalesced"] == n - len(tel)
    ob.close()


def test_tampered_row_is_blocked_and_does_not_stall_the_queue(
        tmp_path: Path, kek: KeyEncryptionKey) -> None:
    db = tmp_path / "o.db"
    ob = Outbox(db, kek, 2**20)
    for i in range(3):
        ob.enqueue("results", *result(i))
    raw = sqlite3.connect(db)
    body = bytearray(raw.execute("SELECT body FROM messages WHERE event_id='result-1'").fetchone()[0])
    body[-3] ^= 0x40
    raw.execute("UPDATE messages SET body=? WHERE event_id='result-1'", (bytes(body),))
    raw.commit()
    raw.close()
    assert [m.event_id for m in ob.peek()] == ["result-0", "result-2"]
    assert ob.stats()["blocked"] == 1
    ob.close()


def test_rewrap_and_a_half_rotated_kek(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    db = tmp_path / "o.db"
    ob = Outbox(db, kek, 2**20)
    ob.enqueue("results", *result(1))
    ob.close()
    new = KeyEncryptionKey(random_key())
    with pytest.raises(CryptoError):
        Outbox(db, new, 2**20)
    ring = KeyEncryptionKey(new.key, (kek.key,))
    ob = Outbox(db, ring, 2**20)  # mid-rotation: still wrapped by the old KEK, opens
    ob.rewrap(new)
    assert ob.wrapped_by() == new.id
    ob.close()
    ob = Outbox(db, new, 2**20)
    assert ob.peek()[0].event_id == "result-1"
    ob.close()


_WRITER = """
import sys
from pathlib import Path
from agent.crypto import KeyEncryptionKey
from agent.uplink.outbox import Outbox
ob = Outbox(Path(sys.argv[1]), KeyEncryptionKey(bytes.fromhex(sys.argv[2])), 2**30)
i = 0
while True:
    ob.enqueue("results", f"r{i}", b"x" * 500)
    print(i, flush=True)
    i += 1
"""


def test_kill9_during_enqueue_loses_nothing_committed(tmp_path: Path,
                                                      kek: KeyEncryptionKey) -> None:
    db = tmp_path / "o.db"
    for _round in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), kek.key.hex()],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        acked = []
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 40:
                break
        proc.kill()
        proc.wait()
        ob = Outbox(db, kek, 2**30)
        have = {m.event_id for m in ob.peek(0, 1_000_000)}
        assert {f"r{i}" for i in acked} <= have
        ob.close()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); "
                    "the byte-budget test covers the logic")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_real_full_filesystem_reserve_then_drain(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    with tmpfs(tmp_path / "vol", "4m") as vol:
        ob = Outbox(vol / "o.db", kek, 2**30, min_free_bytes=1024 * 1024)
        accepted = []
        with pytest.raises(OutOfResources) as err:
            for i in range(10_000):
                ob.enqueue("results", *result(i, 4000))
                accepted.append(f"result-{i}")
        assert "state volume" in str(err.value)
        assert len(accepted) > 50
        # The reserve keeps the drain working on the full volume.
        msgs = ob.peek(0, 100_000)
        assert [m.event_id for m in msgs] == accepted
        for m in msgs:
            ob.ack(m.seq)
        assert ob.stats()["depth"] == 0
        ob.close()


def test_real_full_filesystem_without_reserve_is_out_of_resources(
        tmp_path: Path, kek: KeyEncryptionKey) -> None:
    with tmpfs(tmp_path / "vol", "1m") as vol:
        ob = Outbox(vol / "o.db", kek, 2**30, min_free_bytes=0)
        accepted = []
        with pytest.raises(StorageError) as err:
            for i in range(10_000):
                ob.enqueue("results", *result(i, 4000))
                accepted.append(f"result-{i}")
        # SQLite's "database or disk is full" arrives as our OutOfResources, not sqlite3.Error.
        assert isinstance(err.value, OutOfResources), err.value
        ob.close()
        # Everything committed before the disk filled is intact; a telemetry sample is
        # refused quietly rather than raising.
        ob = Outbox(vol / "o.db", kek, 2**30, min_free_bytes=0) if _room(vol) else None
        if ob is not None:
            assert [m.event_id for m in ob.peek(0, 100_000)] == accepted
            ob.close()
        raw = sqlite3.connect(f"file:{vol / 'o.db'}?mode=ro", uri=True)
        ids = [r[0] for r in raw.execute("SELECT event_id FROM messages ORDER BY seq")]
        raw.close()
        assert ids == accepted


def _room(vol: Path) -> bool:
    return os.statvfs(vol).f_bavail > 0


_ACK_THEN_DIE = """
import os, sys
from pathlib import Path
from agent.crypto import KeyEncryptionKey
from agent.uplink.outbox import Outbox
ob = Outbox(Path(sys.argv[1]), KeyEncryptionKey(bytes.fromhex(sys.argv[2])), 2**30)
msgs = ob.peek(0, 100)
ob.ack(msgs[0].seq)
ob.flush_acks()
ob.ack(msgs[1].seq)
assert [m.event_id for m in ob.peek(0, 100)][:1] == ["result-2"]
assert ob.stats()["depth"] == 3
os._exit(0)  # no close: the batched delete of result-1 never happens
"""


def test_batched_acks_hide_at_once_and_a_crash_only_redelivers(
        tmp_path: Path, kek: KeyEncryptionKey) -> None:
    db = tmp_path / "o.db"
    ob = Outbox(db, kek, 2**20)
    for i in range(5):
        ob.enqueue("results", *result(i))
    ob.close()
    proc = subprocess.run([sys.executable, "-c", _ACK_THEN_DIE, str(db), kek.key.hex()],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ob = Outbox(db, kek, 2**20)
    # result-0's delete was flushed; result-1's was not: delivered again, same id.
    assert [m.event_id for m in ob.peek(0, 100)] == [f"result-{i}" for i in range(1, 5)]
    ob.close()


def test_depth_counted_in_memory_matches_the_table(tmp_path: Path,
                                                   kek: KeyEncryptionKey) -> None:
    """stats() counts the depth in memory (no scan of a long backlog): after every kind
    of change it must equal what the table holds, minus what is acknowledged."""
    db = tmp_path / "o.db"
    ob = Outbox(db, kek, 60_000, min_free_bytes=0)

    def check() -> None:
        with sqlite3.connect(db) as c:
            seqs = {s for (s,) in c.execute("SELECT seq FROM messages")}
        assert ob.stats()["depth"] == len(seqs - set(ob._acked))

    for i in range(40):
        ob.enqueue("telemetry", f"t{i}", b"t" * 600)  # over budget: old samples dropped
        check()
    assert ob.enqueue("results", *result(1)) and not ob.enqueue("results", *result(1))
    check()
    ob.enqueue_many("audit", [(f"a{i}", b"{}", PhiFingerprint()) for i in range(10)])
    check()
    with pytest.raises(OutOfResources):  # a failed transaction rolls the count back too
        ob.enqueue_many("results", [(f"big{i}", b"x" * 5000, PhiFingerprint())
                                    for i in range(20)])
    check()
    msgs = ob.peek(0, 1000)
    ob.ack_many([m.seq for m in msgs[:7]] + [msgs[0].seq])  # a repeat counts once
    check()
    ob.ack(msgs[7].seq)
    ob.block(msgs[8].seq, "test")
    ob.block(msgs[0].seq, "acknowledged already: not blocked")
    check()
    ob.flush_acks()
    check()
    depth = ob.stats()["depth"]
    assert depth == len(msgs) - 9
    ob.close()
    ob = Outbox(db, kek, 60_000, min_free_bytes=0)
    assert ob.stats()["depth"] == depth
    # Telemetry handed out by peek, then dropped for room while in flight, then its
    # PUBACK: counted once, as is a peeked message blocked before its PUBACK.
    for i in range(5):
        ob.enqueue("telemetry", f"early{i}", b"t" * 600)
    flying = [m for m in ob.peek(0, 1000) if m.channel == "telemetry"][:-1]
    assert flying
    for i in range(100):
        ob.enqueue("telemetry", f"late{i}", b"t" * 600)
    check()
    with sqlite3.connect(db) as c:  # some were dropped while in flight
        marks = ",".join("?" * len(flying))
        left = c.execute(f"SELECT COUNT(*) FROM messages WHERE seq IN ({marks})",
                         [m.seq for m in flying]).fetchone()[0]
    assert left < len(flying)
    ob.ack_many([m.seq for m in flying])
    check()
    other = [m for m in ob.peek(0, 1000) if m.channel != "telemetry"]
    ob.block(other[0].seq, "test")
    ob.ack(other[0].seq)
    check()
    ob.close()
