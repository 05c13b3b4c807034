"""The encrypted outbox: store-and-forward for everything that leaves the box.

Messages are sealed (AES-256-GCM, one data key wrapped by the box KEK) and
committed with ``synchronous=FULL`` before anyone tries to publish them; they
are deleted only after the broker's PUBACK.  The CloudEvents ``id`` is unique,
so re-enqueueing the same result after a crash is a no-op (exactly one result
per study version), and consumers dedupe redeliveries on it.

Results and audit are never dropped.  When the byte budget is exceeded the
oldest telemetry is coalesced away first; if results/audit alone exceed the
budget, enqueue raises OutOfResources and the caller keeps the study pending.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from agent.crypto import KeyEncryptionKey, random_key, seal, unseal
from agent.errors import OutOfResources, StorageError
from agent.types import Channel, OutboxMessage, PhiFingerprint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_channel ON messages(channel, seq);
CREATE TABLE IF NOT EXISTS blocked (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    blocked_at REAL NOT NULL
);
"""


class Outbox:
    def __init__(self, path: Path, kek: KeyEncryptionKey, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._kek = kek
        self.max_bytes = max_bytes
        row = self._db.execute("SELECT v FROM meta WHERE k='data_key'").fetchone()
        if row is None:
            self._key = random_key()
            self._db.execute("INSERT INTO meta VALUES ('data_key', ?)", (kek.wrap(self._key),))
        else:
            self._key = kek.unwrap(bytes(row[0]))
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size),0) FROM messages").fetchone()[0])
        self._changed = threading.Condition(self._lock)

    def _pack(self, payload: bytes, guard: PhiFingerprint, event_id: str) -> bytes:
        doc = json.dumps({"g": sorted(guard.values)}).encode()
        body = len(doc).to_bytes(4, "big") + doc + payload
        return seal(self._key, body, event_id.encode())

    def _unpack(self, blob: bytes, event_id: str) -> tuple[bytes, PhiFingerprint]:
        body = unseal(self._key, blob, event_id.encode())
        n = int.from_bytes(body[:4], "big")
        guard = PhiFingerprint(frozenset(json.loads(body[4:4 + n])["g"]))
        return body[4 + n:], guard

    def enqueue(self, channel: Channel, event_id: str, payload: bytes,
                guard: PhiFingerprint = PhiFingerprint()) -> bool:
        """Durably add a message; False when this id was already enqueued."""
        blob = self._pack(payload, guard, event_id)
        with self._lock:
            if self._bytes + len(blob) > self.max_bytes:
                self._coalesce_telemetry(len(blob))
                if self._bytes + len(blob) > self.max_bytes and channel != "telemetry":
                    raise OutOfResources(
                        f"outbox is full ({self._bytes // 2**20} MiB of "
                        f"{self.max_bytes // 2**20} MiB)",
                        hint="restore the broker connection or raise [outbox] max_bytes",
                    )
                if self._bytes + len(blob) > self.max_bytes:
                    return False  # telemetry under pressure: drop the newest sample
            cur = self._db.execute(
                "INSERT OR IGNORE INTO messages (event_id, channel, body, size, created_at) "
                "VALUES (?,?,?,?,?)",
                (event_id, channel, blob, len(blob), time.time()),
            )
            added = cur.rowcount == 1
            if added:
                self._bytes += len(blob)
                self._changed.notify_all()
            return added

    def _coalesce_telemetry(self, need: int) -> None:
        # Keep the newest telemetry sample; older ones only describe the past.
        rows = self._db.execute(
            "SELECT seq, size FROM messages WHERE channel='telemetry' ORDER BY seq"
        ).fetchall()
        for seq, size in rows[:-1]:
            if self._bytes + need <= self.max_bytes:
                break
            self._db.execute("DELETE FROM messages WHERE seq=?", (seq,))
            self._bytes -= int(size)

    def peek(self, after_seq: int = 0, limit: int = 64) -> list[OutboxMessage]:
        """The oldest messages with seq > after_seq, decrypted, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, channel, body, created_at FROM messages "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        out: list[OutboxMessage] = []
        for seq, eid, ch, blob, created in rows:
            try:
                payload, guard = self._unpack(bytes(blob), eid)
            except Exception as exc:  # noqa: BLE001 - a damaged row must not stop the queue
                self.block(int(seq), f"outbox record failed authentication: {exc}")
                continue
            out.append(OutboxMessage(int(seq), eid, ch, payload, float(created), guard))
        return out

    def ack(self, seq: int) -> None:
        with self._lock:
            row = self._db.execute("SELECT size FROM messages WHERE seq=?", (seq,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM messages WHERE seq=?", (seq,))
                self._bytes -= int(row[0])

    def block(self, seq: int, reason: str) -> None:
        """Move a message to the blocked table (kept encrypted, never published)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT event_id, channel, body, size FROM messages WHERE seq=?", (seq,)
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO blocked VALUES (?,?,?,?,?,?)",
                        (seq, row[0], row[1], row[2], reason, time.time()),
                    )
                    self._db.execute("DELETE FROM messages WHERE seq=?", (seq,))
                    self._bytes -= int(row[3])
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StorageError(f"outbox: cannot block message: {exc}") from exc

    def wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def stats(self) -> dict[str, float]:
        with self._lock:
            n, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM messages").fetchone()
            blocked = self._db.execute("SELECT COUNT(*) FROM blocked").fetchone()[0]
        return {
            "depth": int(n),
            "bytes": self._bytes,
            "oldest_age_s": (time.time() - float(oldest)) if oldest else 0.0,
            "blocked": int(blocked),
        }

    def rewrap(self, new: KeyEncryptionKey) -> None:
        with self._lock:
            self._db.execute("UPDATE meta SET v=? WHERE k='data_key'", (new.wrap(self._key),))
            self._kek = new

    def close(self) -> None:
        with self._lock:
            self._db.close()
