"""The receipt journal: audit records of acknowledged instances, kept in the index.

An instance's audit record is committed in the same index transaction as its row,
so an acknowledged instance never lacks its audit record and no second fsync is
paid for it (should a power cut take both back, the instance is indexed again
from its file at start, with an audit record of its own: agent.store.reconcile).  Receive worker processes cannot append to the hash-chained audit log
(one writer keeps the chain): their records go here too.  The main process moves
them to the audit log in batches (the receipt drainer) and tells the journal how
far it got; the delete of moved rows rides on the next index transaction.

May import: agent.types, agent.store.index.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from agent.store.index import Index
from agent.types import ReceivedInstance

StoreOutcome = Literal["stored", "duplicate", "conflict"]


@dataclass(frozen=True)
class StoreReceipt:
    outcome: StoreOutcome
    instance: ReceivedInstance
    study_version: int
    new_study: bool


# Builds the audit record of a receipt (event, outcome, source, details) inside
# the index transaction, once the outcome is known.
ReceiptAudit = Callable[[StoreReceipt], Mapping[str, object]]


class ReceiptJournal:
    def __init__(self, index: Index) -> None:
        self._index = index
        self._drained = 0  # ids <= this are in the audit log
        self._deleted = 0

    def add(self, db: sqlite3.Connection, audit: ReceiptAudit | None,
            receipt: StoreReceipt) -> None:
        """Journal a receipt's audit record inside the caller's index transaction."""
        if audit is None:
            return
        db.execute("INSERT INTO receipts (ts_us, entry) VALUES (?, ?)",
                   (time.time_ns() // 1000, json.dumps(dict(audit(receipt)), default=str)))
        self.delete_drained(db)

    def record(self, db: sqlite3.Connection, entry: Mapping[str, object]) -> None:
        """Journal one audit record inside the caller's index transaction."""
        db.execute("INSERT INTO receipts (ts_us, entry) VALUES (?, ?)",
                   (time.time_ns() // 1000, json.dumps(dict(entry), default=str)))

    def delete_drained(self, db: sqlite3.Connection) -> None:
        # Rides on a transaction that commits anyway: deleting what the audit log
        # already holds needs no fsync of its own (re-delivery is deduplicated).
        if self._drained > self._deleted:
            # The newest row always stays: SQLite numbers a row max(id) + 1, so an
            # emptied table would restart at 1, below the drained mark here and the
            # audit log's ingested mark, and those records would never be moved.
            db.execute("DELETE FROM receipts WHERE id <= ? AND id < (SELECT MAX(id) FROM receipts)",
                       (self._drained,))
            self._deleted = self._drained

    def journal(self, entry: Mapping[str, object]) -> None:
        """Journal one audit record (event, outcome, source, details) durably."""
        with self._index.tx() as db:
            db.execute("INSERT INTO receipts (ts_us, entry) VALUES (?, ?)",
                       (time.time_ns() // 1000, json.dumps(dict(entry), default=str)))
        self._index.sync()

    def pending(self, limit: int = 1000) -> list[tuple[int, int, dict[str, object]]]:
        """Journaled audit records not yet drained, oldest first: (id, ts_us, entry).

        They are made durable in the index first: the audit log remembers the
        highest id it took, and an index that a power cut took back would number
        new records below that mark (and they would never be moved)."""
        with self._index.lock:
            rows = self._index.db.execute(
                "SELECT id, ts_us, entry FROM receipts WHERE id > ? ORDER BY id LIMIT ?",
                (self._drained, limit)).fetchall()
        if rows:
            self._index.sync()
        return [(int(r[0]), int(r[1]), json.loads(r[2])) for r in rows]

    def drop(self, upto: int, *, now: bool = False) -> None:
        """Records up to ``upto`` are durable in the audit log: delete them.

        The delete is folded into the next index transaction unless ``now``
        (the drainer passes it when intake is idle or stopping).
        """
        with self._index.lock:
            self._drained = max(self._drained, upto)
            if not now or self._drained <= self._deleted:
                return
        with self._index.tx() as db:
            self.delete_drained(db)
