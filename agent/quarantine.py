"""Quarantine: instances that must not go on (possible burned-in text, corrupt).

They are kept sealed (AES-256-GCM under a quarantine data key wrapped by the
KEK) with the reason, for a human to review; they are never published.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from agent.crypto import KeyEncryptionKey, fsync_dir, load_or_create_data_key, seal
from agent.fileperm import open_private, private_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    study_key TEXT NOT NULL,
    instance_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    file TEXT NOT NULL,
    at REAL NOT NULL,
    UNIQUE (study_key, instance_key, reason)
);
"""


class Quarantine:
    def __init__(self, root: Path, kek: KeyEncryptionKey) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(private_db(root / "index.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._key = load_or_create_data_key(self._db, kek)
        self._kek = kek

    def put(self, study_key: str, instance_key: str, data: bytes, reason: str) -> None:
        name = f"{study_key[:16]}-{instance_key[:16]}.enc"
        path = self.root / name
        tmp = path.with_suffix(".tmp")
        with open_private(tmp) as fh:
            fh.write(seal(self._key, data, name.encode()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO items (study_key, instance_key, reason, file, at) "
                "VALUES (?,?,?,?,?)", (study_key, instance_key, reason, name, time.time()))

    def list(self) -> list[dict[str, object]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_key, instance_key, reason, at FROM items ORDER BY id").fetchall()
        return [{"study": r[0][:12], "instance": r[1][:12], "reason": r[2], "at": r[3]} for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def rewrap(self, new: KeyEncryptionKey) -> None:
        with self._lock:
            self._db.execute("UPDATE meta SET v=? WHERE k='data_key'", (new.wrap(self._key),))

    def close(self) -> None:
        with self._lock:
            self._db.close()
