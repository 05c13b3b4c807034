"""The delivery queue: result objects waiting for a PACS, durable and encrypted.

One row per (destination, object).  The object's Part 10 bytes carry PHI (the
original patient and study modules), so each row is sealed under its own random
data key wrapped by the box KEK, the row's identity bound as associated data;
a row that reaches a final state (done, dead) has its key and body deleted
(``secure_delete`` zeroes the pages), which crypto-shreds that copy.

Crash safety is the outbox's (agent/uplink/outbox.py): SQLite in WAL mode with
``synchronous=FULL``; a study's objects for every destination are queued in one
transaction, and a row leaves ``pending`` only after the destination answered.
A kill -9 between the destination's answer and our commit sends that object
again, with the same SOP Instance UID (the UIDs are keyed derivations, see
agent/results/common.py): the PACS sees a duplicate, never a second copy.

States::

    pending --C-STORE Success--> done                (release_after = success)
    pending --C-STORE Success--> awaiting --report--> done  (storage commitment)
    awaiting --commitment failed--> pending          (sent again)
    pending/awaiting --older than dead_letter_hours, or refused for good--> dead

The plan table remembers which study versions were turned into rows, so
planning after a restart never queues a version twice, and whether the final
delivery summary was published.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from agent.crypto import KeyEncryptionKey
from agent.errors import EdgeAgentError, StorageError
from agent.fileperm import open_private_db
from agent.sealedrows import RowKeys, transaction, translate

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    study_ref TEXT NOT NULL,
    version INTEGER NOT NULL,
    objects INTEGER NOT NULL,       -- rows queued for this version (all destinations)
    planned_at REAL NOT NULL,
    finished_at REAL,               -- every row final
    reported INTEGER NOT NULL DEFAULT 0,  -- the delivery summary is in the outbox
    released INTEGER NOT NULL DEFAULT 0,  -- the link was released
    PRIMARY KEY (study_ref, version)
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    study_ref TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    sop_uid TEXT NOT NULL,          -- a keyed result UID: not an original identifier
    state TEXT NOT NULL,            -- pending | awaiting | done | dead
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    done_at REAL,
    transaction_uid TEXT,           -- storage commitment request (awaiting)
    requested_at REAL,
    last_status INTEGER,            -- DIMSE status of the last answer
    last_error TEXT,                -- our own words, never the peer's text
    wrapped_key BLOB,               -- NULL once final (shredded)
    body BLOB,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS items_due ON items(destination, state, next_at);
CREATE INDEX IF NOT EXISTS items_tx ON items(transaction_uid);
CREATE INDEX IF NOT EXISTS items_study ON items(study_ref, version);
"""

FINAL = ("done", "dead")


@dataclass(frozen=True)
class QueuedObject:
    """What the planner hands in: one object for one destination."""

    destination: str
    study_ref: str
    version: int
    kind: str
    model: str
    sop_class: str
    sop_uid: str
    data: bytes = field(repr=False)  # Part 10 bytes (PHI)


@dataclass(frozen=True)
class Item:
    """A queued row as the sender sees it; ``data`` only when decrypted for a send."""

    id: int
    destination: str
    study_ref: str
    version: int
    kind: str
    model: str
    sop_class: str
    sop_uid: str
    state: str
    attempts: int
    created_at: float
    transaction_uid: str | None = None
    data: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class DestinationStats:
    depth: int  # rows not final (pending + awaiting)
    pending: int
    awaiting: int
    dead: int
    done: int
    oldest_age_s: float
    last_status: int | None
    last_error: str


def _aad(destination: str, sop_uid: str) -> bytes:
    return f"results-queue\x00{destination}\x00{sop_uid}".encode()


def _translate(exc: sqlite3.Error, what: str) -> StorageError:
    return translate(exc, "results queue", what, "queued results are kept")


class DeliveryQueue:
    """``state/results/delivery.db``."""

    def __init__(self, path: Path, kek: KeyEncryptionKey) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        # A data key per row (agent/sealedrows.py): deleting a final row's key shreds it.
        self._keys = RowKeys(kek, "items", "id", "wrapped_key")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        try:
            # A final row's key is deleted: secure_delete zeroes its freed pages.
            self._db = open_private_db(path, _SCHEMA)
        except sqlite3.Error as exc:
            raise _translate(exc, f"cannot open {path}") from None

    def __repr__(self) -> str:
        return f"DeliveryQueue({self.path})"

    def _tx(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock, _translate, what)

    # -- plan -------------------------------------------------------------------------

    def planned(self, study_ref: str, version: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM plans WHERE study_ref=? AND version=?",
                                    (study_ref, version)).fetchone() is not None

    def plan(self, study_ref: str, version: int, objects: Iterable[QueuedObject],
             now: float | None = None) -> int:
        """Queue every object of one study version in one durable transaction; a
        version already planned is left alone (0).  Returns the rows added."""
        now = time.time() if now is None else now
        sealed = [(o, *self._keys.seal(o.data, _aad(o.destination, o.sop_uid)))
                  for o in objects]
        added = 0
        with self._tx("plan") as db:
            if db.execute("SELECT 1 FROM plans WHERE study_ref=? AND version=?",
                          (study_ref, version)).fetchone():
                return 0
            for o, wrapped, body in sealed:
                cur = db.execute(
                    "INSERT OR IGNORE INTO items (destination, study_ref, version, kind, model, "
                    "sop_class, sop_uid, state, next_at, created_at, wrapped_key, body) "
                    "VALUES (?,?,?,?,?,?,?,'pending',?,?,?,?)",
                    (o.destination, o.study_ref, o.version, o.kind, o.model, o.sop_class,
                     o.sop_uid, now, now, wrapped, body))
                added += cur.rowcount
            db.execute("INSERT INTO plans (study_ref, version, objects, planned_at, finished_at) "
                       "VALUES (?,?,?,?,?)", (study_ref, version, added, now,
                                              None if added else now))
        if added:
            with self._changed:
                self._changed.notify_all()
        return added

    # -- send -------------------------------------------------------------------------

    def due(self, destination: str, now: float | None = None, limit: int = 64) -> list[Item]:
        """Pending rows of ``destination`` whose time has come, decrypted, oldest first.
        A row that fails authentication is dead-lettered, never sent."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, destination, study_ref, version, kind, model, sop_class, sop_uid, "
                "state, attempts, created_at, transaction_uid, wrapped_key, body FROM items "
                "WHERE destination=? AND state='pending' AND next_at<=? ORDER BY id LIMIT ?",
                (destination, now, limit)).fetchall()
        out: list[Item] = []
        for r in rows:
            try:
                data = self._keys.open(bytes(r[12]), bytes(r[13]), _aad(r[1], r[7]))
            except (EdgeAgentError, ValueError, TypeError) as exc:
                log.error("results queue row %d failed authentication (%s): dead-lettered",
                          r[0], type(exc).__name__)
                self.dead(int(r[0]), None, "queue record failed authentication")
                continue
            out.append(Item(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], r[8],
                            int(r[9]), float(r[10]), r[11], data))
        return out

    def next_due(self, destination: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM items WHERE destination=? AND "
                                   "state='pending'", (destination,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def stored(self, item_id: int, status: int, *, commitment: bool,
               now: float | None = None) -> None:
        """The destination stored the object (Success or a Warning)."""
        now = time.time() if now is None else now
        with self._tx("stored") as db:
            if commitment:
                db.execute("UPDATE items SET state='awaiting', sent_at=?, last_status=?, "
                           "last_error=NULL, attempts=attempts+1, transaction_uid=NULL, "
                           "requested_at=NULL WHERE id=? AND state='pending'",
                           (now, status, item_id))
            else:
                self._final(db, [item_id], "done", now, status, None)

    def retry(self, item_id: int, status: int | None, error: str, at: float) -> None:
        """Not stored this time: try again at ``at``."""
        with self._tx("retry") as db:
            db.execute("UPDATE items SET next_at=?, last_status=?, last_error=?, "
                       "attempts=attempts+1 WHERE id=? AND state='pending'",
                       (at, status, error, item_id))

    def defer(self, destination: str, error: str, at: float, status: int | None = None) -> int:
        """The destination could not be reached: every pending row waits until ``at``."""
        with self._tx("defer") as db:
            cur = db.execute("UPDATE items SET next_at=MAX(next_at, ?), last_error=?, "
                             "last_status=? WHERE destination=? AND state='pending'",
                             (at, error, status, destination))
            return int(cur.rowcount)

    def dead(self, item_id: int, status: int | None, error: str,
             now: float | None = None) -> None:
        with self._tx("dead-letter") as db:
            self._final(db, [item_id], "dead", time.time() if now is None else now, status,
                        error)

    def _final(self, db: sqlite3.Connection, ids: list[int], state: str, now: float,
               status: int | None, error: str | None) -> None:
        for i in ids:
            db.execute("UPDATE items SET state=?, done_at=?, last_status=COALESCE(?, "
                       "last_status), last_error=?, wrapped_key=NULL, body=NULL WHERE id=? "
                       "AND state NOT IN ('done','dead')", (state, now, status, error, i))

    def expire(self, max_age_s: float, now: float | None = None) -> list[Item]:
        """Dead-letter every row not final and older than ``max_age_s``."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, destination, study_ref, version, kind, model, sop_class, sop_uid, "
                "state, attempts, created_at FROM items WHERE state IN ('pending','awaiting') "
                "AND created_at<=?", (now - max_age_s,)).fetchall()
        items = [Item(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], r[8],
                      int(r[9]), float(r[10])) for r in rows]
        if items:
            with self._tx("expire") as db:
                for it in items:
                    self._final(db, [it.id], "dead", now, None,
                                f"not confirmed within the dead-letter age (was {it.state})")
        return items

    # -- storage commitment -------------------------------------------------------------

    def to_commit(self, destination: str, timeout_s: float,
                  now: float | None = None) -> list[Item]:
        """Stored rows that need a commitment request: never asked, or unanswered for
        longer than ``timeout_s``."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT id, destination, study_ref, version, kind, model, sop_class, sop_uid, "
                "state, attempts, created_at, transaction_uid FROM items WHERE destination=? "
                "AND state='awaiting' AND (requested_at IS NULL OR requested_at<=?) "
                "ORDER BY id LIMIT 500", (destination, now - timeout_s)).fetchall()
        return [Item(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], r[8],
                     int(r[9]), float(r[10]), r[11]) for r in rows]

    def requested(self, ids: list[int], transaction_uid: str, now: float | None = None) -> None:
        """Durably note the transaction before the N-ACTION goes out: a report that
        arrives at once (even on another association) finds it."""
        now = time.time() if now is None else now
        with self._tx("commitment request") as db:
            db.executemany("UPDATE items SET transaction_uid=?, requested_at=? WHERE id=? AND "
                           "state='awaiting'", [(transaction_uid, now, i) for i in ids])

    def request_failed(self, transaction_uid: str, error: str, status: int | None) -> None:
        """The N-ACTION was not accepted: ask again on the next round."""
        with self._tx("commitment request failed") as db:
            db.execute("UPDATE items SET requested_at=NULL, last_error=?, last_status=? WHERE "
                       "transaction_uid=? AND state='awaiting'", (error, status, transaction_uid))

    def committed(self, transaction_uid: str, success_uids: Iterable[str],
                  failed_uids: Iterable[str], now: float | None = None,
                  ) -> tuple[list[Item], list[Item]]:
        """A storage commitment report: committed rows are done, failed ones go back
        to pending (sent again).  Returns (done, failed); unknown UIDs are ignored."""
        now = time.time() if now is None else now
        ok, bad = set(success_uids), set(failed_uids)
        with self._tx("commitment result") as db:
            rows = db.execute(
                "SELECT id, destination, study_ref, version, kind, model, sop_class, sop_uid, "
                "state, attempts, created_at, transaction_uid FROM items WHERE "
                "transaction_uid=? AND state='awaiting'", (transaction_uid,)).fetchall()
            items = [Item(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], r[8],
                          int(r[9]), float(r[10]), r[11]) for r in rows]
            done = [it for it in items if it.sop_uid in ok]
            failed = [it for it in items if it.sop_uid in bad and it.sop_uid not in ok]
            self._final(db, [it.id for it in done], "done", now, None, None)
            db.executemany("UPDATE items SET state='pending', next_at=?, transaction_uid=NULL, "
                           "requested_at=NULL, last_error=? WHERE id=?",
                           [(now, "storage commitment failed", it.id) for it in failed])
        if failed:
            with self._changed:
                self._changed.notify_all()
        return done, failed

    def has_transaction(self, transaction_uid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM items WHERE transaction_uid=? LIMIT 1",
                                    (transaction_uid,)).fetchone() is not None

    # -- completion ---------------------------------------------------------------------

    def finished(self, now: float | None = None) -> list[tuple[str, int]]:
        """Plans whose every row is final but not yet reported, (study_ref, version)."""
        now = time.time() if now is None else now
        with self._tx("finish") as db:
            rows = db.execute(
                "SELECT p.study_ref, p.version FROM plans p WHERE p.reported=0 AND NOT EXISTS "
                "(SELECT 1 FROM items i WHERE i.study_ref=p.study_ref AND i.version=p.version "
                "AND i.state NOT IN ('done','dead'))").fetchall()
            db.executemany("UPDATE plans SET finished_at=COALESCE(finished_at, ?) WHERE "
                           "study_ref=? AND version=?", [(now, a, b) for a, b in rows])
        return [(str(a), int(b)) for a, b in rows]

    def summary(self, study_ref: str, version: int) -> dict[str, dict[str, int]]:
        """Per destination, how many objects of one study version are in each state."""
        with self._lock:
            rows = self._db.execute("SELECT destination, state, COUNT(*) FROM items WHERE "
                                    "study_ref=? AND version=? GROUP BY destination, state",
                                    (study_ref, version)).fetchall()
        out: dict[str, dict[str, int]] = {}
        for dest, state, n in rows:
            out.setdefault(str(dest), {})[str(state)] = int(n)
        return out

    def mark_reported(self, study_ref: str, version: int, released: bool) -> None:
        with self._tx("report") as db:
            db.execute("UPDATE plans SET reported=1, released=? WHERE study_ref=? AND "
                       "version=?", (int(released), study_ref, version))

    # -- telemetry ------------------------------------------------------------------------

    def stats(self, destinations: Iterable[str], now: float | None = None,
              ) -> dict[str, DestinationStats]:
        now = time.time() if now is None else now
        out: dict[str, DestinationStats] = {}
        with self._lock:
            for d in destinations:
                counts = dict(self._db.execute(
                    "SELECT state, COUNT(*) FROM items WHERE destination=? GROUP BY state",
                    (d,)).fetchall())
                oldest = self._db.execute(
                    "SELECT MIN(created_at) FROM items WHERE destination=? AND state IN "
                    "('pending','awaiting')", (d,)).fetchone()[0]
                last = self._db.execute(
                    "SELECT last_status, last_error FROM items WHERE destination=? AND "
                    "(last_status IS NOT NULL OR last_error IS NOT NULL) ORDER BY "
                    "COALESCE(done_at, sent_at, next_at) DESC, id DESC LIMIT 1",
                    (d,)).fetchone()
                pending, awaiting = int(counts.get("pending", 0)), int(counts.get("awaiting", 0))
                out[d] = DestinationStats(
                    depth=pending + awaiting, pending=pending, awaiting=awaiting,
                    dead=int(counts.get("dead", 0)), done=int(counts.get("done", 0)),
                    oldest_age_s=max(0.0, now - float(oldest)) if oldest else 0.0,
                    last_status=int(last[0]) if last and last[0] is not None else None,
                    last_error=str(last[1]) if last and last[1] else "")
        return out

    def wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- keys ---------------------------------------------------------------------------

    def rewrap(self, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
        with self._tx("rewrap") as db:
            n = self._keys.rewrap(db, old, new)
        self._keys.kek = new
        return n

    def wrapped_by(self) -> set[str]:
        with self._lock:
            return self._keys.kek_ids(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()
