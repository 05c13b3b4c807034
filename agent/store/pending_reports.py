"""Storage Commitment reports the box still owes a modality: sealed, durable, retried.

A report that could not go on the requesting association (the modality released
it at once, or refused the report there) goes on a new association to the AE's
``[[dicom.known_aes]]`` address (agent.dicom.commitment_scp).  Until it is
delivered it waits here, so that a modality that is down for a while, or a restart
(kill -9 included) of the box between the request and the report, does not lose
it: the row is added and made durable (one fdatasync of the index WAL; a report
cannot be rebuilt from anything else) before the first attempt.

The event information (Transaction UID, SOP Class and Instance UIDs: identifiers)
is sealed under a data key of its own, wrapped by the box KEK (agent.sealedrows
RowKeys), the AE title and the pseudonymous transaction reference bound as
associated data; deleting the row after delivery, or when it is given up, shreds
it.  ``next_at`` is when the row may be tried next: the process that attempts it
holds it that long (a receive worker's first attempt, the main process's retries),
and a failed attempt sets it to the backoff.  At start nothing holds a row (every
process of the previous run is gone): ``release_all`` makes them all due.

May import: agent.crypto, agent.sealedrows, agent.store.index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.crypto import KeyEncryptionKey
from agent.sealedrows import RowKeys
from agent.store.index import Index

SCHEMA = """
CREATE TABLE IF NOT EXISTS commitment_reports (
    id INTEGER PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    ref TEXT NOT NULL,              -- pseudonymous transaction reference (logs, audit)
    event_type INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,      -- the row's data key, wrapped by the KEK
    sealed BLOB NOT NULL,           -- the encoded event information, sealed under it
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,          -- not tried before (held by an attempt, or backoff)
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commitment_reports_next ON commitment_reports(next_at);
"""


@dataclass(frozen=True)
class PendingReport:
    id: int
    calling_ae: str
    ref: str
    event_type: int
    body: bytes  # the event information, encoded (Explicit VR Little Endian)
    created_at: float
    attempts: int  # failed attempts so far


def _aad(calling_ae: str, ref: str) -> bytes:
    return b"edge-agent commitment report v1\0" + calling_ae.encode() + b"\0" + ref.encode()


class PendingReports:
    """The table; every method is one short index transaction (or a read) and may
    raise sqlite3.Error or agent.errors.EdgeAgentError."""

    def __init__(self, index: Index, kek: KeyEncryptionKey) -> None:
        self._index = index
        self._keys = RowKeys(kek, "commitment_reports", "id", "wrapped_key")
        with index.lock:
            index.db.executescript(SCHEMA)

    def add(self, calling_ae: str, ref: str, event_type: int, body: bytes, hold: float) -> int:
        """Keep a report durably, held ``hold`` seconds by the caller's first attempt."""
        now = time.time()
        wrapped, sealed = self._keys.seal(body, _aad(calling_ae, ref))
        with self._index.tx() as db:
            rid = db.execute(
                "INSERT INTO commitment_reports (calling_ae, ref, event_type, wrapped_key, "
                "sealed, created_at, next_at) VALUES (?,?,?,?,?,?,?)",
                (calling_ae, ref, event_type, wrapped, sealed, now, now + hold)).lastrowid
        self._index.sync()  # nothing else could bring it back after a power cut
        return int(rid or 0)

    def next_at(self) -> float | None:
        """When the earliest report is due (a read: no transaction, no lock file)."""
        with self._index.lock:
            row = self._index.db.execute("SELECT MIN(next_at) FROM commitment_reports").fetchone()
        return float(row[0]) if row is not None and row[0] is not None else None

    def claim_due(self, hold: float, limit: int = 16) -> list[PendingReport]:
        """The reports due now, held ``hold`` seconds by the caller (opened)."""
        now = time.time()
        with self._index.tx() as db:
            rows = db.execute(
                "SELECT id, calling_ae, ref, event_type, wrapped_key, sealed, created_at, "
                "attempts FROM commitment_reports WHERE next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit)).fetchall()
            db.executemany("UPDATE commitment_reports SET next_at=? WHERE id=?",
                           [(now + hold, r[0]) for r in rows])
        return [PendingReport(int(r[0]), str(r[1]), str(r[2]), int(r[3]),
                              self._keys.open(bytes(r[4]), bytes(r[5]), _aad(str(r[1]), str(r[2]))),
                              float(r[6]), int(r[7])) for r in rows]

    def release_all(self) -> int:
        """At start: no process holds a report any more; every one is due now."""
        now = time.time()
        with self._index.tx() as db:
            return int(db.execute("UPDATE commitment_reports SET next_at=? WHERE next_at > ?",
                                  (now, now)).rowcount)

    def failed(self, rid: int, next_at: float) -> None:
        with self._index.tx() as db:
            db.execute("UPDATE commitment_reports SET attempts=attempts+1, next_at=? WHERE id=?",
                       (next_at, rid))

    def drop(self, rid: int) -> None:
        """Delivered, or given up: the row and its key go (the UIDs are shredded)."""
        with self._index.tx() as db:
            db.execute("DELETE FROM commitment_reports WHERE id=?", (rid,))

    def count(self) -> int:
        with self._index.lock:
            return int(self._index.db.execute(
                "SELECT COUNT(*) FROM commitment_reports").fetchone()[0])

    def rewrap(self, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
        """Re-wrap every row's key (key rotation); new rows are wrapped by ``new``."""
        with self._index.tx() as db:
            n = self._keys.rewrap(db, old, new)
        self._keys.kek = new
        return n
