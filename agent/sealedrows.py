"""Sealed rows in SQLite stores: what the outbox (agent/uplink/outbox.py) and the
results delivery queue (agent/results/queue.py) share.

Both keep rows sealed with AES-256-GCM under data keys the box KEK wraps, each row's
identity bound as associated data (a row cannot be moved under another id), in a
SQLite database committed with ``synchronous=FULL``.  They differ in where the data
key lives:

* ``StoreKey``: one data key for the whole store, wrapped in its ``meta`` table (the
  outbox: many small rows, opened at line rate with one cipher set up once);
* ``RowKeys``: a data key per row, wrapped in the row itself (the delivery queue:
  deleting a final row's key crypto-shreds that copy of the PHI it held).

Rotating the KEK re-wraps data keys only (``rewrap``), never re-encrypts rows, and
``kek_ids`` tells which KEKs still wrap something.  ``transaction`` and ``translate``
are the two stores' write discipline: ``BEGIN IMMEDIATE`` ... ``COMMIT``, a rollback
on any failure, SQLite's errors as ours (a full disk is OutOfResources).

May import: agent.crypto, agent.errors (shared below the stage packages: agent.uplink
and agent.results both use it, and neither may import the other's store).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.crypto import KeyEncryptionKey, Unsealer, load_or_create_data_key, random_key, seal
from agent.errors import OutOfResources, StorageError


def translate(exc: sqlite3.Error, store: str, what: str, kept: str) -> StorageError:
    """SQLite's error as ours: a full disk is OutOfResources (DICOM 0xA700), with a hint
    that says ``kept`` (what the operator does not lose meanwhile)."""
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "is full" in text:
        return OutOfResources(f"{store}: {what}: the state volume is full",
                              hint=f"free space on the state volume; {kept}")
    return StorageError(f"{store}: {what}: {text}",
                        hint="check the state volume; 'edge-agent doctor' reports its health")


@contextmanager
def transaction(db: sqlite3.Connection, lock: threading.RLock,
                fail: Callable[[sqlite3.Error, str], StorageError], what: str,
                on_rollback: Callable[[], None] | None = None,
                ) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction under ``lock``; rolled back on any failure
    (then ``on_rollback``, for state kept in memory alongside), SQLite's errors raised
    as ``fail(exc, what)``."""
    with lock:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise fail(exc, what) from None
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the failed COMMIT may already have rolled back
            if on_rollback is not None:
                on_rollback()
            if isinstance(exc, sqlite3.Error):
                raise fail(exc, what) from None
            raise


class StoreKey:
    """One data key for a whole store, wrapped by the KEK in the store's ``meta`` table
    (created on first use)."""

    def __init__(self, db: sqlite3.Connection, kek: KeyEncryptionKey,
                 name: str = "data_key") -> None:
        self._name = name
        self._key = load_or_create_data_key(db, kek, name)
        # AES-GCM set up once: per call it was half the cost of opening a 2 kB row.
        self._unsealer = Unsealer(self._key)

    def seal(self, body: bytes, aad: bytes) -> bytes:
        return seal(self._key, body, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The row's plaintext; CryptoError when it fails authentication."""
        return self._unsealer.unseal(blob, aad)

    def rewrap(self, db: sqlite3.Connection, new: KeyEncryptionKey) -> None:
        """Wrap the data key under ``new`` (inside the caller's transaction)."""
        db.execute("UPDATE meta SET v=? WHERE k=?", (new.wrap(self._key), self._name))

    def kek_id(self, db: sqlite3.Connection) -> str:
        """The id of the KEK that wraps the data key now."""
        row = db.execute("SELECT v FROM meta WHERE k=?", (self._name,)).fetchone()
        return bytes(row[0])[:16].decode("ascii", "replace")


class RowKeys:
    """A data key per row, wrapped by the KEK and stored in the row's ``key_column``."""

    def __init__(self, kek: KeyEncryptionKey, table: str, id_column: str,
                 key_column: str) -> None:
        self.kek = kek
        self._table, self._id, self._col = table, id_column, key_column

    def seal(self, body: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """(wrapped key, sealed body) of a new row."""
        key = random_key()
        return self.kek.wrap(key), seal(key, body, aad)

    def open(self, wrapped: bytes, blob: bytes, aad: bytes) -> bytes:
        """The row's plaintext; CryptoError when its key or body fails authentication."""
        return Unsealer(self.kek.unwrap(wrapped)).unseal(blob, aad)

    def rewrap(self, db: sqlite3.Connection, old: KeyEncryptionKey,
               new: KeyEncryptionKey) -> int:
        """Re-wrap every row's key from ``old`` to ``new`` (inside the caller's
        transaction); returns how many.  Rows whose key is gone (shredded) are skipped.
        New rows are wrapped under ``new`` once the caller sets ``kek`` after the commit."""
        rows = db.execute(f"SELECT {self._id}, {self._col} FROM {self._table} "
                          f"WHERE {self._col} IS NOT NULL").fetchall()
        db.executemany(f"UPDATE {self._table} SET {self._col}=? WHERE {self._id}=?",
                       [(new.wrap(old.unwrap(bytes(w))), i) for i, w in rows])
        return len(rows)

    def kek_ids(self, db: sqlite3.Connection) -> set[str]:
        """The ids of the KEKs that wrap some row's key."""
        rows = db.execute(f"SELECT {self._col} FROM {self._table} "
                          f"WHERE {self._col} IS NOT NULL").fetchall()
        return {bytes(r[0])[:16].decode("ascii", "replace") for r in rows}
