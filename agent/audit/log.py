"""AuditLog: the one object the daemon and the CLI write audit events through.

``record`` never raises: an audit failure must not take the pipeline down, so
it is logged (without the event's values), counted in ``errors`` and the
event is kept in a bounded in-memory backlog that is written, in order, as
soon as the store accepts writes again (a full disk, for instance).

Several processes may hold an AuditLog on the same database (the daemon and a
CLI export).  Each append re-reads the chain head inside an IMMEDIATE
transaction, and each checkpoint holds an exclusive file lock across "sign,
commit, evolve the key", so two writers never fork the chain or the ratchet.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from agent.config import AuditSettings
from agent.crypto import KeyEncryptionKey
from agent.errors import AuditError, EdgeAgentError

from . import events
from .checkpoint import Checkpoint, Ratchet, build_body
from .projection import project
from .retention import day_sizes, expired_days, shred
from .store import (
    ZERO_HASH,
    Row,
    Store,
    connect,
    day_of,
    decrypt_rows,
    genesis_prev,
    iso,
    record_hash,
    seal_record,
)

log = logging.getLogger("edge_agent.audit")

MAX_BACKLOG = 10_000
RECORD_VERSION = 1

Publisher = Callable[[dict[str, object]], None]


def _now_us() -> int:
    return time.time_ns() // 1000


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


def _mapping(v: object) -> Mapping[str, object] | None:
    return {str(k): x for k, x in v.items()} if isinstance(v, Mapping) else None


class AuditLog:
    """Encrypted, hash-chained, checkpoint-signed audit log (thread-safe)."""

    def __init__(self, db_path: Path, kek: KeyEncryptionKey, signing_key_path: Path,
                 settings: AuditSettings, *, box: str,
                 publish: Publisher | None = None) -> None:
        self.db_path = db_path
        self.box = box
        self.settings = settings
        self.errors = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._kek = kek
        self._publish = publish
        self._lock = threading.RLock()
        self._backlog: deque[tuple[int, int, dict[str, object]]] = deque()  # (qid, ts, entry)
        self._qid = 0
        # Guards only the backlog deque, so threads can queue while another one is
        # committing; the next commit then takes them all (group commit: one fsync).
        self._queue_lock = threading.Lock()
        self._lock_path = db_path.with_name(db_path.name + ".lock")
        self._conn = connect(db_path)
        self._store = Store(self._conn)
        self._ratchet = Ratchet.load(signing_key_path)
        with self._file_lock():
            self._genesis = self._pin_genesis()
            last = self._store.last_checkpoint()
            expected = (bytes.fromhex(str(last.fields["next_public_key"])) if last
                        else self._genesis)
            if not self._ratchet.catch_up(expected):
                raise AuditError(
                    f"audit signing key {signing_key_path} does not continue the checkpoint "
                    f"chain of {db_path}",
                    hint="restore the signing key that belongs to this audit database; "
                         "run 'edge-agent audit verify' to check the log",
                )
        self._since_checkpoint = self._count_since(last)
        self._last_checkpoint_at = time.monotonic()
        self._publish_pending()

    # -- public API ---------------------------------------------------------
    def record(self, event: str, *, outcome: str = "success", user: str | None = None,
               source: str | None = None, details: Mapping[str, object] | None = None,
               phi: Mapping[str, str] | None = None) -> None:
        """Append one event; never raises (failures are logged and counted)."""
        try:
            entry = self._entry(event, outcome, user, source, details, phi)
            with self._queue_lock:
                if len(self._backlog) >= MAX_BACKLOG:
                    self._backlog.popleft()
                    self.dropped += 1
                self._qid += 1
                self._backlog.append((self._qid, _now_us(), entry))
            with self._lock:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - the pipeline must survive any audit failure
            self._failed("record", exc)
            return
        if self._since_checkpoint >= self.settings.checkpoint_every:
            self.maybe_checkpoint()  # re-checks under the lock: one checkpoint per batch

    def ingest(self, journal: str,
               records: Sequence[tuple[int, int, Mapping[str, object]]]) -> int:
        """Append records another durable journal holds, exactly once; returns the last id in.

        ``records`` are (id, ts_us, entry) with increasing ids, entry holding
        ``event`` and optionally ``outcome``, ``user``, ``source``, ``details``
        (the inbox journals receipt records in the instance's own transaction).
        The highest id appended is stored in the same transaction as the records,
        so a journal re-delivered after a crash is not appended twice.  Raises
        (the caller keeps the journal and retries).
        """
        key = f"ingested:{journal}"
        with self._lock:
            self._flush()
            with self._transaction():
                done = int(self._store.meta(key) or 0)
                fresh = [(rid, ts, e) for rid, ts, e in records if rid > done]
                if not fresh:
                    return done
                self._append([(ts, self._entry(
                    str(e["event"]), str(e.get("outcome", "success")),
                    _opt_str(e.get("user")), _opt_str(e.get("source")),
                    _mapping(e.get("details")), None)) for _, ts, e in fresh])
                last = fresh[-1][0]
                self._store.set_meta(key, str(last))
            self._since_checkpoint += len(fresh)
        if self._since_checkpoint >= self.settings.checkpoint_every:
            self.maybe_checkpoint()
        return last

    def checkpoint(self) -> None:
        """Sign a checkpoint now (the daemon calls this at stop); never raises."""
        try:
            with self._lock:
                self._flush()
                self._checkpoint()
        except Exception as exc:  # noqa: BLE001 - never raises into the daemon
            self._failed("checkpoint", exc)

    def maybe_checkpoint(self) -> None:
        """Checkpoint if N records or T seconds have passed since the last one."""
        try:
            with self._lock:
                self._flush()
                due = self._since_checkpoint >= self.settings.checkpoint_every or (
                    self._since_checkpoint > 0
                    and time.monotonic() - self._last_checkpoint_at
                    >= self.settings.checkpoint_seconds)
                if due:
                    self._checkpoint()
                else:
                    self._publish_pending()
        except Exception as exc:  # noqa: BLE001 - never raises into the daemon
            self._failed("checkpoint", exc)

    def apply_retention(self, now: datetime | None = None) -> None:
        """Crypto-shred expired days (and oldest days over the byte budget); never raises."""
        try:
            with self._lock:
                self._flush()
                self._retention(now or datetime.now(UTC))
        except Exception as exc:  # noqa: BLE001 - never raises into the daemon
            self._failed("retention", exc)

    def rewrap(self, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
        """Re-wrap every live per-day data key from ``old`` to ``new``; returns how many.

        Raises AuditError when a key is wrapped by neither (nothing is changed then).
        """
        with self._lock:
            self._flush()
            count = 0
            with self._transaction():
                for day, wrapped, _ in self._store.day_rows():
                    if wrapped is None:
                        continue
                    if wrapped[:16].decode("ascii", "replace") == new.id:
                        continue
                    try:
                        key = old.unwrap(wrapped)
                    except EdgeAgentError as exc:
                        raise AuditError(f"audit day {day}: {exc.args[0]}") from None
                    self._conn.execute("UPDATE day_keys SET wrapped=? WHERE day=?",
                                       (new.wrap(key), day))
                    count += 1
            self._kek = new
            self._store.forget_cached_keys()
            return count

    def close(self) -> None:
        with self._lock:
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - never raises into the daemon
                self._failed("close", exc)
            self._conn.close()

    def stats(self) -> dict[str, int]:
        """Counters for telemetry (no values from the records)."""
        with self._lock:
            return {"errors": self.errors, "dropped": self.dropped,
                    "backlog": len(self._backlog), "unsigned": self._since_checkpoint}

    @property
    def genesis_public_key(self) -> bytes:
        return self._genesis

    # -- internals ------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        # The exception text comes from sqlite/os/our own errors, never from event values.
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        log.error("audit %s failed (%d errors so far, %d events waiting): %s",
                  what, self.errors, len(self._backlog), self.last_error)

    def _entry(self, event: str, outcome: str, user: str | None, source: str | None,
               details: Mapping[str, object] | None,
               phi: Mapping[str, str] | None) -> dict[str, object]:
        kind = events.kind_of(event)
        entry: dict[str, object] = {
            "v": RECORD_VERSION,
            "box": self.box,
            "event": event,
            "event_id": kind.event_id.code,
            "event_type": kind.type_code.code if kind.type_code else None,
            "action": kind.action,
            "outcome": outcome,
            "outcome_code": events.outcome_code(outcome),
            "user": user,
            "source": source,
            # Round-trip through JSON now so a bad value fails here, not inside the transaction.
            "details": json.loads(json.dumps(dict(details or {}), default=str)),
            "phi": {str(k): str(v) for k, v in (phi or {}).items()},
        }
        return entry

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            # COMMIT inside the try: a full disk can fail the commit itself.
            self._conn.execute("COMMIT")
        except BaseException:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            # A day key created inside the rolled-back transaction must not stay cached.
            self._store.forget_cached_keys()
            raise

    def _pin_genesis(self) -> bytes:
        pinned = self._store.meta("genesis_public_key")
        if pinned is not None:
            box = self._store.meta("box")
            if box != self.box:
                raise AuditError(f"audit database {self.db_path} belongs to box {box!r}, "
                                 f"not {self.box!r}")
            return bytes.fromhex(pinned)
        with self._transaction():
            has_rows = self._conn.execute(
                "SELECT (SELECT COUNT(*) FROM records) + (SELECT COUNT(*) FROM checkpoints)"
            ).fetchone()[0]
            if has_rows:
                raise AuditError(f"audit database {self.db_path} has records but no pinned "
                                 "genesis key: it was tampered with",
                                 hint="run 'edge-agent audit verify' and investigate")
            genesis = self._ratchet.public
            self._store.set_meta("format", str(RECORD_VERSION))
            self._store.set_meta("box", self.box)
            self._store.set_meta("genesis_public_key", genesis.hex())
            self._store.set_meta("created", iso(_now_us()))
        # A copy outside the database, for operators to pin elsewhere (it is public).
        pub = self.db_path.with_name("genesis.pub")
        pub.write_text(genesis.hex() + "\n")
        return genesis

    def _count_since(self, last: Checkpoint | None) -> int:
        since = int(last.fields["seq"]) if last else 0
        row = self._conn.execute("SELECT COUNT(*) FROM records WHERE seq > ?",
                                 (since,)).fetchone()
        return int(row[0])

    def _chain_head(self) -> tuple[int, bytes, str | None]:
        """Last seq, its hash and day (read inside a transaction: another process may append)."""
        row = self._conn.execute(
            "SELECT seq, hash, day FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return int(row[0]), bytes(row[1]), str(row[2])
        floor_seq, floor_hash = self._store.floor()
        if floor_seq:
            return floor_seq, floor_hash, None
        return 0, genesis_prev(self._genesis, self.box), None

    def _flush(self) -> None:
        """Write every queued event in one transaction (caller holds self._lock)."""
        with self._queue_lock:
            batch = list(self._backlog)
        if not batch:
            return
        with self._transaction():
            self._append([(ts, entry) for _, ts, entry in batch])
        last = batch[-1][0]
        with self._queue_lock:
            # By id, not count: an overflow may have dropped queued items meanwhile.
            while self._backlog and self._backlog[0][0] <= last:
                self._backlog.popleft()
        self._since_checkpoint += len(batch)

    def _append(self, batch: list[tuple[int, dict[str, object]]]) -> None:
        seq, prev, last_day = self._chain_head()
        for ts_us, entry in batch:
            seq += 1
            day = day_of(ts_us)
            # Days never go backwards along the chain (clock steps), so shredding the
            # oldest days always removes a prefix of the chain.
            if last_day is not None and day < last_day:
                day = last_day
            last_day = day
            key = self._store.day_key(day, self._kek, create=True)
            assert key is not None
            plain = dict(entry, seq=seq, time=iso(ts_us))
            ct = seal_record(key, seq, day, plain)
            digest = record_hash(seq, day, ts_us, prev, ct)
            self._store.insert(Row(seq, day, ts_us, prev, digest, ct))
            prev = digest

    def _checkpoint(self) -> None:
        with self._file_lock():
            with self._transaction():
                last = self._store.last_checkpoint()
                expected = (bytes.fromhex(str(last.fields["next_public_key"])) if last
                            else self._genesis)
                # Another process may have checkpointed (and evolved the key file) since.
                self._ratchet = Ratchet.load(self._ratchet.path)
                if not self._ratchet.catch_up(expected):
                    raise AuditError("audit signing key does not continue the checkpoint chain",
                                     hint="run 'edge-agent audit verify'")
                seq, head, _ = self._chain_head()
                floor_seq, floor_hash = self._store.floor()
                number = last.number + 1 if last else 0
                body = build_body(
                    number=number, box=self.box, epoch_public=self._ratchet.public,
                    next_public=self._ratchet.next_public, genesis=self._genesis,
                    seq=seq, head=head,
                    first_seq=(int(last.fields["seq"]) + 1) if last else 1,
                    prev_hash=last.hash if last else ZERO_HASH,
                    floor_seq=floor_seq, floor_hash=floor_hash, time=iso(_now_us()))
                cp = Checkpoint(number, body, self._ratchet.sign(body))
                self._store.insert_checkpoint(cp, seq)
            # Only after the commit: a crash in between leaves the file one epoch
            # behind, which catch_up() repairs; evolving first could strand the chain.
            self._ratchet.advance()
        self._since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._publish_pending()

    def _publish_pending(self) -> None:
        if self._publish is None:
            return
        for cp in self._store.unpublished():
            data = self._published_data(cp)
            try:
                self._publish(data)
            except Exception as exc:  # noqa: BLE001 - a publisher failure is retried next time
                self._failed(f"publish of checkpoint {cp.number}", exc)
                return
            self._store.mark_published(cp.number)

    def _published_data(self, cp: Checkpoint) -> dict[str, object]:
        f = cp.fields
        first, last = int(str(f["first_seq"])), int(str(f["seq"]))
        rows = list(self._store.rows(first, last))
        projected = [project(rec) for _, rec in decrypt_rows(self._store, self._kek, rows)]
        return {"box": self.box, "checkpoint": cp.to_json(), "events": projected}

    def _retention(self, now: datetime) -> None:
        with self._transaction():
            live = [d for d, w, _ in self._store.day_rows() if w is not None]
            days = expired_days(
                live, today=now.astimezone(UTC).date(),
                retention_days=self.settings.retention_days,
                stored_bytes=self._store.stored_bytes(), max_bytes=self.settings.max_bytes,
                day_bytes=day_sizes(self._store))
            if not days:
                return
            result = shred(self._store, days, _now_us())
            attest = (_now_us(), self._entry(
                "audit.retention", "success", None, None,
                {"days": list(result.days), "records": result.records,
                 "floor_seq": result.floor_seq, "floor_hash": result.floor_hash.hex(),
                 "retention_days": self.settings.retention_days,
                 "max_bytes": self.settings.max_bytes},
                None))
            # Same transaction: the shredding and the record attesting it land together.
            self._append([attest])
        self._since_checkpoint += 1
        try:
            # Push the zeroed pages out of the WAL so no stale copy of a wrapped key lingers.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            self._failed("retention wal checkpoint", exc)
        self._checkpoint()
