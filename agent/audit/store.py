"""The audit store: SQLite (WAL, synchronous FULL), one sealed row per event.

Each record is AES-256-GCM sealed under the data key of its UTC day; the day
keys are kept only wrapped by the box KEK, so destroying one crypto-shreds a
whole day.  Records are hash-chained over their *ciphertext*, so the chain and
the checkpoints can be verified even for days whose key is gone, and any
change to a stored byte (or to a row's seq/day/time) breaks the chain.

The associated data binds each ciphertext to its seq and day, so moving rows
between positions or days fails authentication as well as the chain.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.crypto import KeyEncryptionKey, random_key, seal, unseal
from agent.errors import AuditError, CryptoError
from agent.fileperm import private_db

from .checkpoint import Checkpoint

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS day_keys(
    day TEXT PRIMARY KEY,
    wrapped BLOB,              -- NULL once crypto-shredded
    created_us INTEGER NOT NULL,
    shredded_us INTEGER
);
CREATE TABLE IF NOT EXISTS records(
    seq INTEGER PRIMARY KEY,
    day TEXT NOT NULL,
    ts_us INTEGER NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL,
    ct BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ts ON records(ts_us);
CREATE TABLE IF NOT EXISTS checkpoints(
    number INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
"""

ZERO_HASH = bytes(32)


@dataclass(frozen=True)
class Row:
    seq: int
    day: str
    ts_us: int
    prev: bytes
    hash: bytes
    ct: bytes


def day_of(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1e6, UTC).strftime("%Y-%m-%d")


def iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1e6, UTC).isoformat(timespec="microseconds")


def genesis_prev(genesis_public: bytes, box: str) -> bytes:
    """The chain's anchor binds it to this box's pinned genesis key."""
    return hashlib.sha256(b"edge-agent audit genesis\x00" + genesis_public + box.encode()).digest()


def record_hash(seq: int, day: str, ts_us: int, prev: bytes, ct: bytes) -> bytes:
    h = hashlib.sha256(b"edge-agent audit record\x00")
    h.update(struct.pack(">QQ", seq, ts_us))
    h.update(day.encode("ascii", "replace").ljust(10)[:10])
    h.update(prev)
    h.update(ct)
    return h.digest()


def record_aad(seq: int, day: str) -> bytes:
    return b"edge-agent audit\x00" + struct.pack(">Q", seq) + day.encode("ascii", "replace")


def connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        if not db_path.exists():
            raise AuditError(f"audit database {db_path} does not exist",
                             hint="check [box] state_dir in the config; the daemon creates it")
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(private_db(db_path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged record survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        # Shredding must really erase wrapped keys, not leave them in free pages.
        conn.execute("PRAGMA secure_delete=ON")
        conn.executescript(SCHEMA)
    return conn


class Store:
    """Row-level access; callers serialise use (AuditLog holds a lock)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._day_keys: dict[str, bytes] = {}

    # -- meta ---------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def floor(self) -> tuple[int, bytes]:
        """Everything up to floor_seq was crypto-shredded; floor_hash anchors what follows."""
        seq = self.meta("floor_seq")
        h = self.meta("floor_hash")
        return (int(seq), bytes.fromhex(h)) if seq is not None and h is not None else (0, ZERO_HASH)

    # -- day keys -----------------------------------------------------------
    def day_key(self, day: str, kek: KeyEncryptionKey, *, create: bool) -> bytes | None:
        cached = self._day_keys.get(day)
        if cached is not None:
            return cached
        row = self.conn.execute(
            "SELECT wrapped, shredded_us FROM day_keys WHERE day=?", (day,)).fetchone()
        if row is None:
            if not create:
                return None
            key = random_key()
            self.conn.execute(
                "INSERT INTO day_keys(day, wrapped, created_us) VALUES(?, ?, ?)",
                (day, kek.wrap(key), _now_us()))
        elif row[0] is None:
            if create:
                raise AuditError(f"audit day {day} was crypto-shredded; it cannot take new records")
            return None
        else:
            key = kek.unwrap(bytes(row[0]))
        self._day_keys[day] = key
        return key

    def forget_cached_keys(self) -> None:
        self._day_keys.clear()

    def day_rows(self) -> list[tuple[str, bytes | None, int | None]]:
        return [(str(d), None if w is None else bytes(w), s) for d, w, s in self.conn.execute(
            "SELECT day, wrapped, shredded_us FROM day_keys ORDER BY day")]

    # -- records ------------------------------------------------------------
    def head(self) -> tuple[int, bytes] | None:
        row = self.conn.execute(
            "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def insert(self, row: Row) -> None:
        self.conn.execute(
            "INSERT INTO records(seq, day, ts_us, prev, hash, ct) VALUES(?,?,?,?,?,?)",
            (row.seq, row.day, row.ts_us, row.prev, row.hash, row.ct))

    def rows(self, first: int = 0, last: int | None = None) -> Iterator[Row]:
        sql = "SELECT seq, day, ts_us, prev, hash, ct FROM records WHERE seq >= ?"
        args: list[Any] = [first]
        if last is not None:
            sql += " AND seq <= ?"
            args.append(last)
        cur = self.conn.execute(sql + " ORDER BY seq", args)
        for r in cur:
            yield Row(int(r[0]), str(r[1]), int(r[2]), bytes(r[3]), bytes(r[4]), bytes(r[5]))

    def rows_between(self, since_us: int, until_us: int) -> Iterator[Row]:
        cur = self.conn.execute(
            "SELECT seq, day, ts_us, prev, hash, ct FROM records "
            "WHERE ts_us >= ? AND ts_us < ? ORDER BY seq", (since_us, until_us))
        for r in cur:
            yield Row(int(r[0]), str(r[1]), int(r[2]), bytes(r[3]), bytes(r[4]), bytes(r[5]))

    def last_rows(self, n: int) -> list[Row]:
        cur = self.conn.execute(
            "SELECT seq, day, ts_us, prev, hash, ct FROM records ORDER BY seq DESC LIMIT ?", (n,))
        out = [Row(int(r[0]), str(r[1]), int(r[2]), bytes(r[3]), bytes(r[4]), bytes(r[5]))
               for r in cur]
        return out[::-1]

    def stored_bytes(self) -> int:
        row = self.conn.execute("SELECT COALESCE(SUM(LENGTH(ct)) + COUNT(*) * 100, 0) "
                                "FROM records").fetchone()
        return int(row[0])

    # -- checkpoints ----------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(int(n), bytes(b), bytes(s)) for n, b, s in self.conn.execute(
            "SELECT number, body, signature FROM checkpoints ORDER BY number")]

    def last_checkpoint(self) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT number, body, signature FROM checkpoints ORDER BY number DESC LIMIT 1"
        ).fetchone()
        return None if row is None else Checkpoint(int(row[0]), bytes(row[1]), bytes(row[2]))

    def insert_checkpoint(self, cp: Checkpoint, seq: int) -> None:
        self.conn.execute(
            "INSERT INTO checkpoints(number, seq, body, signature) VALUES(?,?,?,?)",
            (cp.number, seq, cp.body, cp.signature))

    def unpublished(self) -> list[Checkpoint]:
        return [Checkpoint(int(n), bytes(b), bytes(s)) for n, b, s in self.conn.execute(
            "SELECT number, body, signature FROM checkpoints WHERE published=0 ORDER BY number")]

    def mark_published(self, number: int) -> None:
        self.conn.execute("UPDATE checkpoints SET published=1 WHERE number=?", (number,))


def seal_record(key: bytes, seq: int, day: str, plain: dict[str, object]) -> bytes:
    data = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return seal(key, data.encode("utf-8"), record_aad(seq, day))


def open_record(key: bytes, row: Row) -> dict[str, Any]:
    try:
        plain = unseal(key, row.ct, record_aad(row.seq, row.day))
    except CryptoError:
        raise AuditError(
            f"record seq {row.seq} (day {row.day}) failed decryption: tampered, moved to "
            "another position or day, or sealed under another day's key") from None
    data = json.loads(plain)
    if not isinstance(data, dict):
        raise AuditError(f"record seq {row.seq} does not hold a JSON object")
    return data


def decrypt_rows(store: Store, kek: KeyEncryptionKey,
                 rows: Sequence[Row] | Iterator[Row]) -> Iterator[tuple[Row, dict[str, Any]]]:
    """Yield decrypted records; rows whose day was shredded are skipped."""
    for row in rows:
        key = store.day_key(row.day, kek, create=False)
        if key is None:
            continue
        yield row, open_record(key, row)


def _now_us() -> int:
    import time
    return time.time_ns() // 1000
