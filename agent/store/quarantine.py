"""Quarantine: instances that must not go on (possible burned-in text, corrupt).

They are kept sealed (AES-256-GCM) with the reason, for a privacy officer to review
(agent/store/quarantine_review.py); they are never published.  Each item has a data key of
its own, wrapped by the KEK and stored in its index row: purging an item (officer's
``purge``, retention, or after a ``release``) deletes that row under
``secure_delete`` and so makes the sealed file unrecoverable even if a copy of it
survives (crypto-shredding); the file is unlinked too.  Items written before
per-item keys existed share the store's old data key; deleting their file is all
that can be done for them.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.crypto import (
    KeyEncryptionKey,
    fsync_dir,
    load_or_create_data_key,
    random_key,
    seal,
    unseal,
)
from agent.deid import burnedin
from agent.errors import StorageError
from agent.fileperm import open_private, open_private_db

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


def reason_code(reason: str) -> str:
    """The fixed vocabulary code of a stored reason (agent/uplink/vocabulary.py QUARANTINE)."""
    if reason.startswith("cannot de-identify"):
        return "not-deidentifiable"
    return burnedin.reason_code(reason)


@dataclass(frozen=True)
class Item:
    """One quarantined instance, as the privacy officer sees it: pseudonymous keys, the
    rule code and the time; never a value read from the instance."""

    id: int
    study_key: str
    instance_key: str
    code: str
    at: float

    def as_json(self, now: float) -> dict[str, object]:
        return {"id": self.id, "study": self.study_key[:12], "instance": self.instance_key[:12],
                "code": self.code, "at": round(self.at), "age_s": round(max(0.0, now - self.at))}


class Quarantine:
    def __init__(self, root: Path, kek: KeyEncryptionKey) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = open_private_db(root / "index.db", _SCHEMA)  # a purged key's bytes zeroed
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
        if "dkey" not in cols:  # per-item data keys (crypto-shredding one item)
            self._db.execute("ALTER TABLE items ADD COLUMN dkey BLOB")
        self._key = load_or_create_data_key(self._db, kek)
        self._kek = kek

    def put(self, study_key: str, instance_key: str, data: bytes, reason: str) -> None:
        name = f"{study_key[:16]}-{instance_key[:16]}.enc"
        path = self.root / name
        tmp = path.with_suffix(".tmp")
        key = random_key()
        with open_private(tmp) as fh:
            fh.write(seal(key, data, name.encode()))
            fh.flush()
            os.fsync(fh.fileno())
        with self._lock:
            # The key row first: a crash before the rename leaves a key without a file
            # (nothing to read), never a file whose key was lost.
            self._db.execute(
                "INSERT INTO items (study_key, instance_key, reason, file, at, dkey) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (study_key, instance_key, reason) "
                "DO UPDATE SET dkey=excluded.dkey, at=excluded.at",
                (study_key, instance_key, reason, name, time.time(), self._kek.wrap(key)))
        os.replace(tmp, path)
        fsync_dir(self.root)

    def items(self) -> list[Item]:
        """Oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_key, instance_key, reason, at FROM items ORDER BY at, id"
            ).fetchall()
        return [Item(int(r[0]), r[1], r[2], reason_code(r[3]), float(r[4])) for r in rows]

    def list(self) -> list[dict[str, object]]:
        return [{"study": i.study_key[:12], "instance": i.instance_key[:12],
                 "reason": i.code, "at": i.at} for i in self.items()]

    def get(self, item_id: int) -> Item:
        for item in self.items():
            if item.id == item_id:
                return item
        raise StorageError(f"no quarantined instance #{item_id}",
                           hint="see 'edge-agent quarantine list' for the ids")

    def read(self, item_id: int) -> bytes:
        """The instance's original bytes (PHI): only for the privacy officer's actions."""
        with self._lock:
            row = self._db.execute("SELECT file, dkey FROM items WHERE id=?",
                                   (item_id,)).fetchone()
        if row is None:
            raise StorageError(f"no quarantined instance #{item_id}",
                               hint="see 'edge-agent quarantine list' for the ids")
        name, wrapped = str(row[0]), row[1]
        key = self._kek.unwrap(bytes(wrapped)) if wrapped is not None else self._key
        try:
            blob = (self.root / name).read_bytes()
            return unseal(key, blob, name.encode())
        except (OSError, ValueError) as exc:
            raise StorageError(f"quarantined instance #{item_id} cannot be read "
                               f"({type(exc).__name__})",
                               hint="purge it with 'edge-agent quarantine purge'") from None

    def purge(self, item_id: int) -> bool:
        """Crypto-shred one item: its key row goes (zeroed), then its file."""
        with self._lock:
            row = self._db.execute("SELECT file FROM items WHERE id=?", (item_id,)).fetchone()
            if row is None:
                return False
            name = str(row[0])
            self._db.execute("DELETE FROM items WHERE id=?", (item_id,))
            others = self._db.execute("SELECT COUNT(*) FROM items WHERE file=?",
                                      (name,)).fetchone()[0]
        if not others:  # the same instance quarantined for two reasons shares a file
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
            fsync_dir(self.root)
        return True

    def expire(self, retention_days: int, now: float | None = None) -> builtins.list[Item]:  # ``list`` is a method here
        """Purge the items older than ``retention_days``; return what went."""
        cutoff = (now or time.time()) - retention_days * 86400.0
        gone = [i for i in self.items() if i.at < cutoff]
        for item in gone:
            self.purge(item.id)
        return gone

    def stats(self, now: float | None = None) -> dict[str, object]:
        """Backlog for telemetry and status: counts per rule code and the oldest age."""
        items = self.items()
        now = now or time.time()
        by_code: dict[str, int] = {}
        for i in items:
            by_code[i.code] = by_code.get(i.code, 0) + 1
        oldest = round(max(0.0, now - items[0].at), 1) if items else 0.0
        return {"count": len(items), "oldest_age_s": oldest, "by_code": by_code}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def rewrap(self, new: KeyEncryptionKey) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # all keys rewrapped, or none
            self._db.execute("UPDATE meta SET v=? WHERE k='data_key'", (new.wrap(self._key),))
            for item_id, wrapped in self._db.execute(
                    "SELECT id, dkey FROM items WHERE dkey IS NOT NULL").fetchall():
                self._db.execute("UPDATE items SET dkey=? WHERE id=?",
                                 (new.wrap(self._kek.unwrap(bytes(wrapped))), item_id))
            self._db.execute("COMMIT")
            self._kek = new

    def close(self) -> None:
        with self._lock:
            self._db.close()
