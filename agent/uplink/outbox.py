"""The encrypted outbox: store-and-forward for everything that leaves the box.

Messages are sealed (AES-256-GCM, one data key wrapped by the box KEK) and
committed with ``synchronous=FULL`` before anyone tries to publish them; they
are deleted only after the broker's PUBACK.  The CloudEvents ``id`` is unique,
so re-enqueueing the same result after a crash is a no-op (exactly one result
per study version), and consumers dedupe redeliveries on it.  ``seq`` comes
from AUTOINCREMENT, so it is never reused and the publisher's walk in ``seq``
order is the delivery order.

Budgets, in the order they bite:

* telemetry is coalesced when its backlog grows (more than ``TELEMETRY_MAX``
  samples or more than ``TELEMETRY_SHARE`` of the byte budget): every other
  older sample is dropped, so a multi-day outage keeps a sample of the whole
  outage at a coarser resolution, the newest sample always kept;
* over the byte budget the oldest telemetry goes first;
* results and audit are never dropped: if they alone would exceed the budget,
  or the volume is down to its free-space reserve, ``enqueue`` raises
  ``OutOfResources`` and the caller keeps its source (the study stays in the
  inbox, the audit checkpoint stays in the audit log) until space frees.

The reserve exists because SQLite needs a little disk to *delete*: a WAL
append per acknowledgement.  If enqueues could eat the last byte, a full disk
would also stop the drain that would free it.

Acknowledgements are batched (up to ``ACK_BATCH`` or ``ACK_FLUSH_S``) and
committed with ``synchronous=NORMAL``: a crash or power cut may forget the
last few deletions, which only means those messages are delivered again with
the same id (allowed: at least once).  Until flushed, acknowledged rows are
hidden from ``peek`` and ``stats``.  That takes the per-message fsync out of
the drain, which then runs at network speed.  Every enqueue commits with
``FULL``, which also makes earlier deletions durable.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from agent.crypto import KeyEncryptionKey
from agent.errors import EdgeAgentError, OutOfResources, StorageError
from agent.fileperm import private_db
from agent.sealedrows import StoreKey, transaction, translate
from agent.types import Channel, OutboxMessage, PhiFingerprint

TELEMETRY_MAX = 2000  # samples kept before coalescing (1.4 days at the 60 s default)
TELEMETRY_SHARE = 0.10  # of max_bytes
DEFAULT_MIN_FREE = 16 * 2**20
WAL_PAGES = 1024  # 4 MiB with the default reserve
ACK_BATCH = 256
ACK_FLUSH_S = 0.2
PEEKED_MAX = 4096  # sizes of peeked rows kept for their acks
GUARD_CACHE = 64  # decoded guard headers kept: the messages of one study share theirs

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


def _translate(exc: sqlite3.Error, what: str) -> StorageError:
    """SQLite's errors as ours: a full disk is OutOfResources (DICOM 0xA700)."""
    return translate(exc, "outbox", what, "queued messages are kept")


class Outbox:
    def __init__(self, path: Path, kek: KeyEncryptionKey, max_bytes: int,
                 *, min_free_bytes: int = DEFAULT_MIN_FREE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.coalesced = 0  # telemetry samples dropped to keep the backlog bounded
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._kek = kek
        self._acked: dict[int, tuple[int, str]] = {}  # seq -> (size, channel), not yet deleted
        self._acked_at = time.monotonic()
        self._listeners: list[Callable[[], None]] = []
        # The sealed guard header of a study's messages, decoded once: the same
        # PhiFingerprint object, whose compiled matcher the egress guard caches.
        self._guards: dict[bytes, PhiFingerprint] = {}
        # (size, channel) of rows handed out by peek, so that their ack needs no look-up;
        # a row deleted otherwise (coalesced, dropped, blocked) leaves it at once.
        self._peeked: dict[int, tuple[int, str]] = {}
        try:
            self._db = sqlite3.connect(private_db(path), check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # A bounded WAL: checkpoints restart it from its beginning, so a long
            # drain on a nearly full volume reuses the same bytes instead of growing.
            # At most a quarter of the free-space reserve, so the WAL alone can
            # never eat the room that deletions need.
            wal_pages = max(16, min(WAL_PAGES, min_free_bytes // 4096 // 4))
            self._db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            self._db.execute(f"PRAGMA journal_size_limit={wal_pages * 4096}")
            # Rows are AES-GCM ciphertext: zero-filling freed pages (the build's
            # default) buys nothing and doubles the writes of a drain.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._db.executescript(_SCHEMA)
            # One data key for the outbox (agent/sealedrows.py); each row's event id is
            # its associated data.
            self._key = StoreKey(self._db, kek)
            self._bytes, self._tel_n, self._tel_bytes, self._n = self._totals()
        except sqlite3.Error as exc:
            raise _translate(exc, f"cannot open {path}") from None

    def _totals(self) -> tuple[int, int, int, int]:
        """Bytes, telemetry count and bytes, and depth (the count ``stats`` reports
        without a scan of a long backlog), acknowledged rows not counted."""
        count, total = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size),0) FROM messages").fetchone()
        n, b = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size),0) FROM messages WHERE channel='telemetry'"
        ).fetchone()
        # Acknowledged rows awaiting their batched delete no longer count.
        tel = [size for size, ch in self._acked.values() if ch == "telemetry"]
        total = int(total) - sum(size for size, _ in self._acked.values())
        return total, int(n) - len(tel), int(b) - sum(tel), int(count) - len(self._acked)

    # -- sealing --------------------------------------------------------------

    def _pack(self, payload: bytes, guard: PhiFingerprint, event_id: str) -> bytes:
        doc = json.dumps({"g": sorted(guard.values)}).encode()
        body = len(doc).to_bytes(4, "big") + doc + payload
        # The event id is bound as associated data: a row cannot be moved under another id.
        return self._key.seal(body, event_id.encode())

    def _unpack(self, blob: bytes, event_id: str) -> tuple[bytes, PhiFingerprint]:
        body = self._key.open(blob, event_id.encode())
        n = int.from_bytes(body[:4], "big")
        header = body[4:4 + n]
        guard = self._guards.get(header)
        if guard is None:
            guard = PhiFingerprint(frozenset(json.loads(header)["g"]))
            if len(self._guards) >= GUARD_CACHE:
                self._guards.clear()
            self._guards[header] = guard
        return body[4 + n:], guard

    def _tx(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        # In-memory totals may have moved inside a failed transaction: counted again.
        return transaction(self._db, self._lock, _translate, what, self._recount)

    def _recount(self) -> None:
        self._bytes, self._tel_n, self._tel_bytes, self._n = self._totals()

    # -- enqueue --------------------------------------------------------------

    def _check_disk(self, channel: Channel, need: int) -> None:
        free = shutil.disk_usage(self.path.parent).free
        if free - need < self.min_free_bytes:
            raise OutOfResources(
                f"outbox: {free // 2**20} MiB free on the state volume, reserve is "
                f"{self.min_free_bytes // 2**20} MiB ({channel} not queued)",
                hint="free space on the state volume; queued messages are kept and drained",
            )

    def has_room(self, channel: Channel, need: int) -> bool:
        """Whether ``enqueue`` of ``need`` bytes on ``channel`` would succeed now.

        The same rules as enqueue: the disk reserve, and the byte budget after
        the telemetry that enqueue would drop to make room for results/audit.
        """
        try:
            self._check_disk(channel, need)
        except OutOfResources:
            return False
        with self._lock:
            if self._bytes + need <= self.max_bytes:
                return True
            if channel == "telemetry":
                return False
            return self._bytes - sum(z for _, z in self._droppable_telemetry(self._db)) \
                + need <= self.max_bytes

    def enqueue(self, channel: Channel, event_id: str, payload: bytes,
                guard: PhiFingerprint = PhiFingerprint()) -> bool:
        """Durably add a message; False when this id was already enqueued (or
        a telemetry sample had to be dropped under pressure).

        Raises OutOfResources when a result/audit message does not fit.
        """
        return self.enqueue_many(channel, [(event_id, payload, guard)]) == 1

    def enqueue_many(self, channel: Channel,
                     items: Iterable[tuple[str, bytes, PhiFingerprint]]) -> int:
        """Add several messages in one durable transaction (all or none); returns
        how many were new."""
        blobs = [(eid, self._pack(payload, guard, eid)) for eid, payload, guard in items]
        need = sum(len(b) for _, b in blobs)
        if not blobs:
            return 0
        try:
            self._check_disk(channel, need)
        except OutOfResources:
            if channel == "telemetry":
                return 0  # a telemetry sample is not worth the last megabytes
            raise
        added = 0
        with self._tx("enqueue") as db:
            if self._bytes + need > self.max_bytes:
                self._drop_telemetry(db, need)
                if self._bytes + need > self.max_bytes:
                    if channel == "telemetry":
                        return 0  # under pressure the newest sample is dropped too
                    raise OutOfResources(
                        f"outbox is full ({self._bytes // 2**20} MiB of "
                        f"{self.max_bytes // 2**20} MiB budget)",
                        hint="restore the broker connection or raise [outbox] max_bytes",
                    )
            now = time.time()
            for eid, blob in blobs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO messages (event_id, channel, body, size, created_at) "
                    "VALUES (?,?,?,?,?)", (eid, channel, blob, len(blob), now))
                if cur.rowcount == 1:
                    added += 1
                    self._n += 1
                    self._bytes += len(blob)
                    if channel == "telemetry":
                        self._tel_n += 1
                        self._tel_bytes += len(blob)
            if channel == "telemetry" and (
                    self._tel_n > TELEMETRY_MAX
                    or self._tel_bytes > TELEMETRY_SHARE * self.max_bytes):
                self._coalesce_telemetry(db)
        if added:
            with self._changed:
                self._changed.notify_all()
            for wake in self._listeners:
                wake()
        return added

    def on_enqueue(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (cheap, never raising) after every enqueue that added a message:
        the publisher's loop waits on it instead of polling."""
        self._listeners.append(wake)

    def _delete_rows(self, db: sqlite3.Connection, rows: list[tuple[int, int]]) -> None:
        db.executemany("DELETE FROM messages WHERE seq=?", [(s,) for s, _ in rows])
        for s, _ in rows:
            self._peeked.pop(s, None)
        freed = sum(size for _, size in rows)
        self._bytes -= freed
        self._n -= len(rows)
        self._tel_n -= len(rows)
        self._tel_bytes -= freed
        self.coalesced += len(rows)

    def _coalesce_telemetry(self, db: sqlite3.Connection) -> None:
        # Halve the resolution of the older samples instead of cutting off the
        # start of the outage: ops still sees the whole period, coarser.
        rows = [(int(s), int(z)) for s, z in db.execute(
            "SELECT seq, size FROM messages WHERE channel='telemetry' ORDER BY seq")
            if int(s) not in self._acked]
        self._delete_rows(db, rows[:-1][1::2])

    def _droppable_telemetry(self, db: sqlite3.Connection) -> list[tuple[int, int]]:
        """(seq, size) of telemetry that may go to make room: all but the newest."""
        return [(int(s), int(z)) for s, z in db.execute(
            "SELECT seq, size FROM messages WHERE channel='telemetry' ORDER BY seq")
            if int(s) not in self._acked][:-1]

    def _drop_telemetry(self, db: sqlite3.Connection, need: int) -> None:
        # Over the byte budget: oldest telemetry first, the newest sample kept.
        rows = self._droppable_telemetry(db)
        doomed: list[tuple[int, int]] = []
        over = self._bytes + need - self.max_bytes
        for seq, size in rows:
            if over <= 0:
                break
            doomed.append((seq, size))
            over -= size
        self._delete_rows(db, doomed)

    # -- drain ----------------------------------------------------------------

    def peek(self, after_seq: int = 0, limit: int = 64) -> list[OutboxMessage]:
        """The oldest messages with seq > after_seq, decrypted, in order.

        A row that fails authentication is moved to ``blocked`` (never
        published) rather than stalling every message behind it.
        """
        try:
            with self._lock:
                self._maybe_flush_acks()
                hidden = sum(1 for s in self._acked if s > after_seq)
                rows = self._db.execute(
                    "SELECT seq, event_id, channel, body, created_at FROM messages "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit + hidden)).fetchall()
                rows = [r for r in rows if int(r[0]) not in self._acked][:limit]
                # Noted while the lock holds, so a delete that follows finds the note
                # (the size column is len(body)).
                if len(self._peeked) > PEEKED_MAX:
                    self._peeked.clear()  # leftovers of dropped sessions: looked up instead
                self._peeked.update((int(r[0]), (len(r[3]), str(r[2]))) for r in rows)
        except sqlite3.Error as exc:
            raise _translate(exc, "read") from None
        out: list[OutboxMessage] = []
        for seq, eid, ch, blob, created in rows:
            try:
                payload, guard = self._unpack(bytes(blob), eid)
            except (EdgeAgentError, ValueError, KeyError) as exc:
                self.block(int(seq), f"outbox record failed authentication: {type(exc).__name__}")
                continue
            out.append(OutboxMessage(int(seq), eid, ch, payload, float(created), guard))
        return out

    def ack(self, seq: int) -> None:
        """An acknowledged message: hidden now, deleted with the next batch
        (see the module doc on durability)."""
        self.ack_many([seq])

    def ack_many(self, seqs: Iterable[int]) -> None:
        """``ack`` for several messages (the PUBACKs one network read brought): one
        look-up for all of them; deleted with the next batch."""
        with self._lock:
            todo = sorted({s for s in seqs if s not in self._acked})
            if not todo:
                return
            rows = [(s, *self._peeked.pop(s)) for s in todo if s in self._peeked]
            known = {r[0] for r in rows}
            todo = [s for s in todo if s not in known]
            try:
                for i in range(0, len(todo), 500):  # SQLite's bound-parameter limit
                    part = todo[i:i + 500]
                    rows += self._db.execute(
                        "SELECT seq, size, channel FROM messages WHERE seq IN "
                        f"({','.join('?' * len(part))})", part).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "ack") from None
            if rows and not self._acked:
                self._acked_at = time.monotonic()
            for seq, size, channel in rows:
                self._acked[int(seq)] = (int(size), str(channel))
                self._n -= 1
                self._bytes -= int(size)
                if channel == "telemetry":
                    self._tel_n -= 1
                    self._tel_bytes -= int(size)
            if len(self._acked) >= ACK_BATCH:
                self.flush_acks()

    def _maybe_flush_acks(self) -> None:
        if self._acked and time.monotonic() - self._acked_at >= ACK_FLUSH_S:
            self.flush_acks()

    def flush_acks(self) -> None:
        """Delete the acknowledged rows now.  On failure they stay hidden and
        are retried with the next batch (and redelivered if we crash first)."""
        with self._lock:
            if not self._acked:
                return
            seqs = [(s,) for s in self._acked]
            try:
                try:
                    self._delete_acked(seqs)
                except sqlite3.OperationalError:
                    # Disk full: a truncating checkpoint gives the WAL's bytes back
                    # to the volume; then the delete fits.
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._delete_acked(seqs)
            except sqlite3.Error as exc:
                raise _translate(exc, "ack") from None
            self._acked.clear()

    def _delete_acked(self, seqs: list[tuple[int]]) -> None:
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM messages WHERE seq=?", seqs)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def block(self, seq: int, reason: str) -> None:
        """Move a message to the blocked table (kept encrypted, never published)."""
        if seq in self._acked:
            return
        with self._tx("block") as db:
            self._peeked.pop(seq, None)
            row = db.execute(
                "SELECT event_id, channel, body, size FROM messages WHERE seq=?", (seq,)
            ).fetchone()
            if row is not None:
                db.execute("INSERT OR REPLACE INTO blocked VALUES (?,?,?,?,?,?)",
                           (seq, row[0], row[1], row[2], reason, time.time()))
                db.execute("DELETE FROM messages WHERE seq=?", (seq,))
                self._n -= 1
                self._bytes -= int(row[3])
                if row[1] == "telemetry":
                    self._tel_n -= 1
                    self._tel_bytes -= int(row[3])

    def wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def stats(self) -> dict[str, float]:
        with self._lock:
            self._maybe_flush_acks()
            # Depth is counted in memory and the oldest message is the first in seq
            # order (enqueue order): a COUNT and a MIN over a backlog of 100,000 rows
            # read the whole table, with the lock held, while the drain waited.
            n = self._n
            row = self._db.execute(
                "SELECT created_at FROM messages ORDER BY seq LIMIT 1").fetchone()
            oldest = row[0] if row else None
            blocked = self._db.execute("SELECT COUNT(*) FROM blocked").fetchone()[0]
            return {
                "depth": int(n),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "telemetry_depth": self._tel_n,
                "telemetry_coalesced": self.coalesced,
                "oldest_age_s": max(0.0, time.time() - float(oldest)) if oldest else 0.0,
                "blocked": int(blocked),
            }

    # -- keys -----------------------------------------------------------------

    def rewrap(self, new: KeyEncryptionKey) -> None:
        """Re-wrap the outbox data key under ``new`` (the data is not re-encrypted)."""
        with self._tx("rewrap") as db:
            self._key.rewrap(db, new)
        self._kek = new

    def wrapped_by(self) -> str:
        """The id of the KEK that currently wraps the outbox data key."""
        with self._lock:
            return self._key.kek_id(self._db)

    def close(self) -> None:
        with self._lock:
            try:
                self.flush_acks()
            except StorageError:
                pass  # not deleted: delivered once more after the restart, same id
            self._db.close()
