"""AuditLog: the one object the daemon and the CLI write audit events through.

``record`` never raises: an audit failure must not take the pipeline down, so
it is logged (without the event's values), counted in ``errors`` and the
event is kept in an in-memory backlog that is written, in order, as soon as
the store accepts writes again (a full disk, for instance).  While the store
cannot write, ``intake_hold`` says why, and the DICOM node refuses new work
(0xA700) rather than produce records that could not be kept.  The backlog is
bounded by ``[audit] max_queue``; it never drops what it holds: an event that
arrives when it is full is counted as lost, alerted, and the count is written
as an ``audit.events_lost`` record once the store works again.

Repeated refusals of one peer are summarised (``summary.py``), the published
form is split into checkpoint and event messages (``messages.py``), and an
anchor file outside the database notices a log that went missing
(``anchor.py``).

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

from . import anchor, events
from .checkpoint import Checkpoint, Ratchet, build_body
from .messages import checkpoint_message, event_messages
from .projection import PeerNames, project, unreadable
from .retention import day_sizes, expired_days, shred
from .store import (
    ZERO_HASH,
    Row,
    Store,
    connect,
    day_of,
    genesis_prev,
    iso,
    open_record,
    record_hash,
    seal_record,
)
from .summary import Summaries

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# While the store fails, intake_hold retries a write at most this often.
RETRY_SECONDS = 1.0

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
                 publish: Publisher | None = None, peer_key: bytes | None = None,
                 anchor_path: Path | None = None) -> None:
        """``peer_key``: the key of the published pseudonyms of peer strings (the
        box's pseudonym key; the KEK when not given).  ``anchor_path``: the anchor
        file, ``<state_dir>/audit-anchor.json`` by default."""
        self.db_path = db_path
        self.box = box
        self.settings = settings
        self.errors = 0
        self.lost = 0  # events that arrived while the backlog was full (never dropped silently)
        self.replaced = 0  # earlier logs of this box that went missing (from the anchor)
        self.over_budget = False
        self.last_error: str | None = None
        self._kek = kek
        self._publish = publish
        self._peers = PeerNames(peer_key if peer_key is not None else kek.key)
        self._anchor_path = anchor_path or anchor.path_for(db_path)
        self._summaries = Summaries(settings.summary_seconds)
        self._lock = threading.RLock()
        self._backlog: deque[tuple[int, int, dict[str, object]]] = deque()  # (qid, ts, entry)
        self._qid = 0
        self._lost_unrecorded = 0
        self._failing: str | None = None  # why the last write failed; None once one succeeds
        self._retry_at = 0.0
        # Guards only the backlog deque, so threads can queue while another one is
        # committing; the next commit then takes them all (group commit: one fsync).
        self._queue_lock = threading.Lock()
        # Set after every commit that appended records: readers of the log (the ATNA
        # sender) wake on it instead of polling; they clear it before they read.
        self.appended = threading.Event()
        self._lock_path = db_path.with_name(db_path.name + ".lock")
        existed = db_path.exists()
        try:
            self._conn = connect(db_path)
        except sqlite3.DatabaseError as exc:
            raise _damaged(db_path, exc) from None
        try:
            self._store = Store(self._conn)
            self._ratchet = Ratchet.load(signing_key_path)
            with self._file_lock():
                self._genesis, fresh = self._pin_genesis()
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
                lost_log, anchor_problem = self._check_anchor(existed, fresh, last)
            self._since_checkpoint = self._count_since(last)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise _damaged(db_path, exc) from None
        except BaseException:
            self._conn.close()
            raise
        self._last_checkpoint_at = time.monotonic()
        if lost_log is not None:
            # Loud, never quiet: the log, the new chain (published with the next
            # checkpoint) and the telemetry counter all say it.
            log.critical("the audit log is missing, replaced or rolled back (%s): the previous "
                         "log had %s; a new log was started and the event recorded in it. "
                         "See docs/runbooks.md, 'The audit log went missing'",
                         lost_log["why"], lost_log["previous"])
            self.record("audit.log_replaced", outcome="major_failure",
                        details={k: v for k, v in lost_log.items() if k != "previous"})
        if anchor_problem is not None:
            log.error("%s; it was rewritten from the database", anchor_problem)
            self.record("security.alert", outcome="serious_failure",
                        details={"what": "audit_anchor_unreadable"})
        self._publish_pending()

    # -- public API ---------------------------------------------------------
    def record(self, event: str, *, outcome: str = "success", user: str | None = None,
               source: str | None = None, details: Mapping[str, object] | None = None,
               phi: Mapping[str, str] | None = None) -> None:
        """Append one event; never raises (failures are logged and counted)."""
        try:
            entry = self._entry(event, outcome, user, source, details, phi)
            now = _now_us()
            if self._summaries.absorb(entry, now):
                return  # a repeated refusal: counted into the summary of its window
            with self._queue_lock:
                for ts, summary in self._summaries.take(now):
                    self._enqueue(ts, self._summary_entry(summary))
                self._enqueue(now, entry)
            with self._lock:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - the pipeline must survive any audit failure
            self._failed("record", exc)
            return
        if self._since_checkpoint >= self.settings.checkpoint_every:
            self.maybe_checkpoint()  # re-checks under the lock: one checkpoint per batch

    def intake_hold(self) -> str | None:
        """Why new DICOM work must be refused now, or None.

        The DICOM node asks before it takes an association or a C-STORE: while the
        store cannot write, every accepted instance would add records that may
        not be kept, so it answers 0xA700 with this reason instead.  Retries the
        write (at most every RETRY_SECONDS), so intake resumes on its own.
        """
        if self._failing is None:
            return None
        now = time.monotonic()
        if now >= self._retry_at and self._lock.acquire(blocking=False):
            self._retry_at = now + RETRY_SECONDS
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - still failing; _failing says why
                pass
            finally:
                self._lock.release()
        failing = self._failing
        return None if failing is None else f"audit trail cannot record: {failing}"

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
            # Counting repeats changes the summaries: undone if the write rolls back,
            # since the journal then delivers the same records again.
            summaries = self._summaries.snapshot()
            try:
                with self._transaction():
                    done = int(self._store.meta(key) or 0)
                    fresh = [(rid, ts, e) for rid, ts, e in records if rid > done]
                    if not fresh:
                        return done
                    batch = self._ingested(fresh)
                    self._append(batch)
                    last = fresh[-1][0]
                    self._store.set_meta(key, str(last))
            except Exception as exc:
                self._summaries.restore(summaries)
                self._failing = _why(exc)
                raise
            self._failing = None
            self._since_checkpoint += len(batch)
        self.appended.set()
        if self._since_checkpoint >= self.settings.checkpoint_every:
            self.maybe_checkpoint()
        return last

    def checkpoint(self) -> None:
        """Sign a checkpoint now (the daemon calls this at stop); never raises."""
        try:
            with self._lock:
                self._queue_summaries(everything=True)
                self._flush()
                self._checkpoint()
        except Exception as exc:  # noqa: BLE001 - never raises into the daemon
            self._failed("checkpoint", exc)

    def maybe_checkpoint(self) -> None:
        """Checkpoint if N records or T seconds have passed since the last one."""
        try:
            with self._lock:
                self._queue_summaries(everything=False)
                self._flush()
                due = self._since_checkpoint >= self.settings.checkpoint_every or (
                    self._since_checkpoint > 0
                    and time.monotonic() - self._last_checkpoint_at
                    >= self.settings.checkpoint_seconds)
                if due:
                    # The open refusal counts go into the chain before it is signed.
                    self._queue_summaries(everything=True)
                    self._flush()
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
                self._queue_summaries(everything=True)
                self._flush()
            except Exception as exc:  # noqa: BLE001 - never raises into the daemon
                self._failed("close", exc)
                with self._queue_lock:
                    left = len(self._backlog) + self._lost_unrecorded
                if left:
                    self.lost += len(self._backlog)
                    log.critical("SECURITY: %d audit event(s) could not be written before "
                                 "closing (%s); they are lost", left, self._failing)
            self._conn.close()

    def stats(self) -> dict[str, int]:
        """Counters for telemetry and status (no values from the records)."""
        with self._queue_lock:
            backlog = len(self._backlog)
        return {"errors": self.errors, "lost": self.lost, "backlog": backlog,
                "unsigned": self._since_checkpoint, "held": int(self._failing is not None),
                "log_replaced": self.replaced, "over_budget": int(self.over_budget),
                "refusals_summarised": self._summaries.absorbed}

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

    def _pin_genesis(self) -> tuple[bytes, bool]:
        """The genesis public key, and whether this database was created just now."""
        pinned = self._store.meta("genesis_public_key")
        if pinned is not None:
            box = self._store.meta("box")
            if box != self.box:
                raise AuditError(f"audit database {self.db_path} belongs to box {box!r}, "
                                 f"not {self.box!r}")
            return bytes.fromhex(pinned), False
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
        return genesis, True

    def _check_anchor(self, existed: bool, fresh: bool, last: Checkpoint | None
                      ) -> tuple[dict[str, object] | None, str | None]:
        """Compare the database with the anchor file; bring the anchor up to date.

        Returns (what was lost, for the audit.log_replaced record, or None; a
        problem with the anchor file itself, or None).  Caller holds the file lock.
        """
        problem: str | None = None
        try:
            prev = anchor.read(self._anchor_path)
        except AuditError as exc:
            prev, problem = None, str(exc.args[0])
        mine = self._genesis.hex()
        number = last.number if last else -1
        why: str | None = None
        if prev is not None:
            if prev.genesis != mine or prev.box != self.box:
                why = "missing" if fresh and not existed else "replaced"
            elif prev.checkpoint > number:
                why = "rolled_back"
        history = prev.replaced if prev is not None else ()
        lost: dict[str, object] | None = None
        if why is not None and prev is not None:
            lost = {"why": why, "previous": prev.describe(),
                    "previous_genesis_public_key": prev.genesis,
                    "previous_checkpoint": prev.checkpoint, "previous_seq": prev.seq,
                    "previous_checkpoint_time": prev.time, "previous_head": prev.head,
                    "genesis_public_key": mine, "detected": iso(_now_us())}
            history = (*history, {k: v for k, v in lost.items() if k != "previous"})
            # Kept inside the new database too: verify reports it for as long as this log lives.
            with self._transaction():
                earlier = json.loads(self._store.meta("predecessors") or "[]")
                earlier.append(history[-1])
                self._store.set_meta("predecessors", json.dumps(earlier, sort_keys=True))
        self.replaced = len(history)
        current = anchor.Anchor(
            box=self.box, genesis=mine, created=self._store.meta("created") or "",
            checkpoint=number, seq=int(last.fields["seq"]) if last else 0,
            head=last.hash.hex() if last else "", time=str(last.fields["time"]) if last else "",
            replaced=tuple(history))
        if current != prev:
            self._write_anchor(current)
        return lost, problem

    def _write_anchor(self, state: anchor.Anchor) -> None:
        try:
            anchor.write(self._anchor_path, state)
        except OSError as exc:
            # Not fatal: the chain and the published checkpoints still hold; say it loudly.
            log.error("cannot write the audit anchor %s (%s): a lost audit database would "
                      "not be noticed at the next start", self._anchor_path, exc.strerror)

    def _anchor_checkpoint(self, cp: Checkpoint) -> None:
        """Record the newest checkpoint in the anchor (caller holds the file lock)."""
        try:
            prev = anchor.read(self._anchor_path)
        except AuditError:
            prev = None
        if prev is not None and (prev.genesis != self._genesis.hex()
                                 or prev.checkpoint >= cp.number):
            return  # another log's anchor (decided at start) or already newer
        f = cp.fields
        base = prev or anchor.Anchor(box=self.box, genesis=self._genesis.hex(),
                                     created=self._store.meta("created") or "")
        self._write_anchor(base.with_checkpoint(cp.number, int(f["seq"]), cp.hash.hex(),
                                                str(f["time"])))

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
            lost = self._lost_unrecorded
        if not batch and not lost:
            return
        entries = [(ts, entry) for _, ts, entry in batch]
        if lost:
            # After what was kept (the lost events came later): the gap is in the chain.
            entries.append((_now_us(), self._entry(
                "audit.events_lost", "major_failure", None, None,
                {"count": lost, "reason": self._failing or "unknown"}, None)))
        try:
            with self._transaction():
                self._append(entries)
        except Exception as exc:
            self._failing = _why(exc)
            raise
        self._failing = None
        self.appended.set()
        with self._queue_lock:
            if batch:
                last = batch[-1][0]
                while self._backlog and self._backlog[0][0] <= last:
                    self._backlog.popleft()
            self._lost_unrecorded -= lost
        self._since_checkpoint += len(entries)

    def _enqueue(self, ts: int, entry: dict[str, object]) -> None:
        """Queue one event (caller holds the queue lock); never drops what is queued."""
        if len(self._backlog) >= self.settings.max_queue:
            self.lost += 1
            self._lost_unrecorded += 1
            if self.lost == 1 or self.lost % 1000 == 0:
                log.critical("SECURITY: audit events are being lost: the store cannot write "
                             "(%s) and %d events are already waiting; %d lost so far "
                             "(their count will be recorded)", self._failing or "unknown",
                             len(self._backlog), self.lost)
            return
        self._qid += 1
        self._backlog.append((self._qid, ts, entry))

    def _summary_entry(self, s: dict[str, object]) -> dict[str, object]:
        details = s.get("details")
        return self._entry(str(s["event"]), str(s["outcome"]), None, _opt_str(s.get("source")),
                           details if isinstance(details, Mapping) else None, None)

    def _queue_summaries(self, *, everything: bool) -> None:
        ready = self._summaries.take(_now_us(), everything=everything)
        if ready:
            with self._queue_lock:
                for ts, summary in ready:
                    self._enqueue(ts, self._summary_entry(summary))

    def _ingested(self, fresh: Sequence[tuple[int, int, Mapping[str, object]]]
                  ) -> list[tuple[int, dict[str, object]]]:
        """Entries of journaled records to append: repeated refusals are only counted."""
        out: list[tuple[int, dict[str, object]]] = []
        for _, ts, e in fresh:
            entry = self._entry(str(e["event"]), str(e.get("outcome", "success")),
                                _opt_str(e.get("user")), _opt_str(e.get("source")),
                                _mapping(e.get("details")), None)
            if self._summaries.absorb(entry, ts):
                continue
            out.extend((t, self._summary_entry(x)) for t, x in self._summaries.take(ts))
            out.append((ts, entry))
        return out

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
            self._anchor_checkpoint(cp)
        self._since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self._publish_pending()

    def _publish_pending(self) -> None:
        """Hand unpublished checkpoints to the publisher, each first, then its events.

        The checkpoint goes out on its own: nothing in its events can hold it back.
        """
        if self._publish is None:
            return
        for cp in self._store.unpublished():
            try:
                self._publish(checkpoint_message(self.box, cp))
                for part in event_messages(self.box, cp, self._projected(cp)):
                    self._publish(part)
            except Exception as exc:  # noqa: BLE001 - a publisher failure is retried next time
                self._failed(f"publish of checkpoint {cp.number}", exc)
                return
            self._store.mark_published(cp.number)

    def _projected(self, cp: Checkpoint) -> list[dict[str, object]]:
        """The projection of the records ``cp`` covers; one unreadable record is
        published as such, never allowed to stop the others."""
        f = cp.fields
        first, last = int(str(f["first_seq"])), int(str(f["seq"]))
        out: list[dict[str, object]] = []
        for row in self._store.rows(first, last):
            try:
                key = self._store.day_key(row.day, self._kek, create=False)
                if key is None:
                    continue  # crypto-shredded by retention since
                out.append(project(open_record(key, row), self._peers))
            except EdgeAgentError as exc:
                log.error("audit record seq %d cannot be projected for publishing: %s",
                          row.seq, exc.args[0])
                out.append(unreadable(row.seq, iso(row.ts_us)))
        return out

    def _retention(self, now: datetime) -> None:
        with self._transaction():
            live = [d for d, w, _ in self._store.day_rows() if w is not None]
            stored = self._store.stored_bytes()
            plan = expired_days(
                live, today=now.astimezone(UTC).date(),
                retention_days=self.settings.retention_days,
                min_retention_days=self.settings.min_retention_days,
                stored_bytes=stored, max_bytes=self.settings.max_bytes,
                day_bytes=day_sizes(self._store))
            self._over_budget(plan.over_budget, plan.remaining_bytes, live)
            if not plan.days:
                return
            result = shred(self._store, plan.days, _now_us())
            attest = (_now_us(), self._entry(
                "audit.retention", "success", None, None,
                {"days": list(result.days), "records": result.records,
                 "floor_seq": result.floor_seq, "floor_hash": result.floor_hash.hex(),
                 "retention_days": self.settings.retention_days,
                 "min_retention_days": self.settings.min_retention_days,
                 "max_bytes": self.settings.max_bytes},
                None))
            # Same transaction: the shredding and the record attesting it land together.
            self._append([attest])
        self.appended.set()
        self._since_checkpoint += 1
        try:
            # Push the zeroed pages out of the WAL so no stale copy of a wrapped key lingers.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            self._failed("retention wal checkpoint", exc)
        self._checkpoint()

    def _over_budget(self, over: bool, remaining: int, live: list[str]) -> None:
        """Over max_bytes with nothing old enough to shred: alert, keep everything
        (inside the retention transaction, so the alert is in the chain)."""
        self.over_budget = over
        if not over:
            return
        log.error("SECURITY: the audit store holds %d bytes, over [audit] max_bytes %d, but "
                  "no day is older than min_retention_days (%d): nothing was shredded. Raise "
                  "max_bytes or free the volume; look for a flood of events",
                  remaining, self.settings.max_bytes, self.settings.min_retention_days)
        self._append([(_now_us(), self._entry(
            "audit.over_budget", "serious_failure", None, None,
            {"stored_bytes": remaining, "max_bytes": self.settings.max_bytes,
             "min_retention_days": self.settings.min_retention_days,
             "oldest_day": min(live) if live else None}, None))])
        self._since_checkpoint += 1


def _why(exc: BaseException) -> str:
    # sqlite/os/our own errors: never event values.
    return f"{type(exc).__name__}: {exc}"


def _damaged(db_path: Path, exc: sqlite3.DatabaseError) -> AuditError:
    return AuditError(
        f"audit database {db_path} is damaged ({exc}): truncated, overwritten or not an "
        "audit database",
        hint="keep it as evidence: run 'edge-agent audit verify' for a report, then move the "
             "audit folder aside (do not delete it) and start again; see docs/runbooks.md, "
             "'The audit log went missing'")
