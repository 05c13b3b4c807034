"""The inbox index: one SQLite database of study versions, instances and receipts.

WAL and ``synchronous=NORMAL``: a commit is atomic and survives the process (kill
-9), but a power cut may take the newest commits back.  That is safe for
instance rows because every instance file carries its own row (agent.store.record)
and a file the index lost is indexed again at start (agent.store.reconcile): the
DICOM node acknowledges an instance once its file is fdatasynced and its row
committed, one fsync.  What cannot be rebuilt from the files is made durable
explicitly with ``sync`` (one fdatasync of the WAL, which holds every earlier
commit too): a new study version (its wrapped data key), a study marked done
before its files go, re-wrapped keys, and the receipt journal before its records
are moved to the audit log (whose ingested mark must never run ahead of the
index).  The receive
worker processes commit into the same database; between processes a blocking
``flock`` on ``index.lock`` hands the index over as soon as it is free (SQLite's own
busy wait sleeps a millisecond or more per retry).

The index is also the study assembly state, so a restart resumes exactly where the
previous process stopped.  May import: agent.crypto (fsync_dir), agent.fileperm.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.crypto import fsync_dir
from agent.fileperm import private_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_key TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,            -- open | complete | done
    wrapped_key BLOB,               -- NULL once shredded
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    n_bytes INTEGER NOT NULL DEFAULT 0,
    completion TEXT,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_key, version)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    instance_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,  -- of the plaintext; '' until a repeated SOP Instance UID needs it
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    flag TEXT,                      -- NULL | conflict
    series_key TEXT NOT NULL DEFAULT ''  -- keyed hash of the Series Instance UID, or ''
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_id);
CREATE INDEX IF NOT EXISTS instances_key ON instances(instance_key);
-- Audit records of acknowledged instances, committed in the instance's own index
-- transaction (one fsync makes both durable) and moved to the audit log in batches.
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    entry TEXT NOT NULL             -- JSON: event, outcome, source, details (no PHI values)
);
"""


class Index:
    """The index connection, its in-process lock and its cross-process lock."""

    def __init__(self, root: Path, *, shared: bool) -> None:
        """``shared``: receive worker processes commit into this index too."""
        self.root = root
        # Re-entrant: the inbox's open-version cache is guarded by the same lock and
        # is updated inside transactions.
        self.lock = threading.RLock()
        self.shared = False
        self._xlock: int | None = None
        self.db = sqlite3.connect(private_db(root / "index.db"), check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self.db.execute("PRAGMA busy_timeout=60000")  # worker processes share the index
        self.db.executescript(SCHEMA)
        self._upgrade()
        self._dir_synced = False
        if shared:
            self.share()

    def _upgrade(self) -> None:
        """Columns added since an older inbox was created (its rows keep the default:
        an instance indexed before series were kept belongs to no known series)."""
        cols = {str(r[1]) for r in self.db.execute("PRAGMA table_info(instances)")}
        if "series_key" not in cols:
            try:
                self.db.execute(
                    "ALTER TABLE instances ADD COLUMN series_key TEXT NOT NULL DEFAULT ''")
            except sqlite3.OperationalError:
                pass  # another process added it a moment ago ("duplicate column")

    def share(self) -> None:
        """From now on other processes commit too: take the index lock for every transaction."""
        self.shared = True
        if self._xlock is None:
            self._xlock = os.open(self.root / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                  0o600)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), committed on exit, rolled back on error."""
        with self.lock:
            # Between processes, SQLite's own busy wait sleeps 1 ms or more per
            # retry; a blocking flock hands the index over as soon as it is free.
            if self._xlock is not None:
                fcntl.flock(self._xlock, fcntl.LOCK_EX)
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            finally:
                if self._xlock is not None:
                    fcntl.flock(self._xlock, fcntl.LOCK_UN)

    def sync(self) -> None:
        """Make every commit so far durable (any process's: the WAL is one file).

        One fdatasync of the WAL, what ``synchronous=FULL`` pays at every commit.
        SQLite itself syncs the WAL before a checkpoint copies it into the
        database, and the database after, so the WAL holds every commit that is
        not yet durable in the database file."""
        wal = self.root / "index.db-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # No WAL (nothing written since the last connection closed it): the
            # database file holds everything, made durable by that checkpoint.
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if not self._dir_synced:
            # The WAL may be new (created by this process's first write): its
            # directory entry must be durable for the synced frames to count.
            fsync_dir(self.root)
            self._dir_synced = True

    def pending_bytes(self) -> int:
        """Bytes held by studies not yet processed (open or complete)."""
        with self.lock:
            row = self.db.execute(  # by the state index: done studies pile up over the years
                "SELECT COALESCE(SUM(n_bytes),0) FROM studies WHERE state IN ('open', 'complete')"
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self.lock:
            self.db.close()
            if self._xlock is not None:
                os.close(self._xlock)
                self._xlock = None
