"""Vault pseudonyms (``[deid] pseudonyms = "vault"``): random codes in an encrypted map.

With the default keyed mode (agent/deid/pseudonym.py) a published code is an HMAC
of the original identifier under the box key: stable and unlinkable without the
key, but *derived from* the identifier, which HIPAA 164.514(c) does not allow for a
re-identification code under the Safe Harbor method ("not derived from or related
to information about the individual").  In vault mode every code is random (UIDs
are UUID4s under 2.25, tokens random hex, the per-patient date shift a random
number) and kept consistent through this local map:

* the index of a row is an HMAC of (label, original) under the pseudonym key, so
  the file lists no original value and cannot be searched with a guessed one
  without the key;
* the code itself is sealed (AES-256-GCM) under the map's data key, wrapped by the
  box KEK; deleting that key (``shred``) makes every mapping unrecoverable
  (crypto-shredding): later studies of the same patient get new codes;
* a new mapping is committed with ``synchronous=FULL`` before it is used, so a code
  that reached a result is never handed out differently after a crash.

See docs/deid.md, "Pseudonyms: keyed or vault", for when a site picks which.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.crypto import (
    KeyEncryptionKey,
    hmac_sha256,
    load_or_create_data_key,
    seal,
    unseal,
)
from agent.deid.pseudonym import DATE_SHIFT_MIN_DAYS, DATE_SHIFT_SPAN_DAYS, Pseudonymizer
from agent.errors import EdgeAgentError, StorageError
from agent.fileperm import open_private_db

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS codes (
    lookup BLOB PRIMARY KEY,   -- HMAC(pseudonym key, label, original)
    code BLOB NOT NULL,        -- sealed random code
    created_at REAL NOT NULL DEFAULT (julianday('now'))
);
"""
_CACHE_MAX = 200_000
_UID_ROOT = "2.25."  # PS3.5 B.2: the decimal form of a (random) UUID


class PseudonymVault:
    """``state/deid/vault.db``: the encrypted map from originals to random codes."""

    def __init__(self, path: Path, kek: KeyEncryptionKey) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._kek = kek
        self._lock = threading.RLock()
        try:
            self._db = open_private_db(path, _SCHEMA)
            with self._tx():
                self._key = load_or_create_data_key(self._db, kek)
        except sqlite3.Error as exc:
            raise StorageError(f"pseudonym vault {path}: {exc}",
                               hint="check the state volume; 'edge-agent doctor' reports its "
                                    "health") from None

    def __repr__(self) -> str:
        return f"PseudonymVault({self.path})"

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction: committed on exit, rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def code(self, lookup: bytes, make: str) -> str:
        """The code stored under ``lookup``; ``make`` becomes it when there is none."""
        with self._lock:
            try:
                row = self._db.execute("SELECT code FROM codes WHERE lookup=?",
                                       (lookup,)).fetchone()
                if row is None:
                    self._db.execute("INSERT INTO codes (lookup, code) VALUES (?, ?)",
                                     (lookup, seal(self._key, make.encode(), lookup)))
                    return make
            except sqlite3.Error as exc:
                raise StorageError(f"pseudonym vault: {exc}",
                                   hint="check the state volume") from None
        return unseal(self._key, bytes(row[0]), lookup).decode()

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM codes").fetchone()[0])

    def shred(self) -> int:
        """Crypto-shred the whole map: its data key and every code are deleted."""
        with self._lock:
            n = self.count()
            with self._tx():
                self._db.execute("DELETE FROM codes")
                self._db.execute("DELETE FROM meta WHERE k='data_key'")
                self._key = load_or_create_data_key(self._db, self._kek)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def rewrap(self, new: KeyEncryptionKey) -> int:
        with self._lock:
            self._db.execute("UPDATE meta SET v=? WHERE k='data_key'", (new.wrap(self._key),))
        self._kek = new
        return 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


def shred_vault(state_dir: Path, kek: KeyEncryptionKey) -> int:
    """``edge-agent keys shred-vault``: with the daemon stopped, crypto-shred the map;
    returns how many codes it held."""
    from agent.identity.keyrotate import exclusive_state  # the CLI's path only

    path = state_dir / "deid" / "vault.db"
    if not path.exists():
        raise EdgeAgentError("this box has no pseudonym vault",
                             hint='it exists once [deid] pseudonyms = "vault" processed a study')
    with exclusive_state(state_dir):
        vault = PseudonymVault(path, kek)
        try:
            return vault.shred()
        finally:
            vault.close()


class VaultPseudonymizer(Pseudonymizer):
    """The Pseudonymizer interface with random codes from a ``PseudonymVault``."""

    kind = "vault"

    def __init__(self, key: bytes, vault: PseudonymVault) -> None:
        super().__init__(key)
        self._vault = vault
        self._cache: dict[bytes, str] = {}

    def __repr__(self) -> str:
        return "VaultPseudonymizer(<key hidden>)"

    def _code(self, label: str, original: str, make: str) -> str:
        lookup = hmac_sha256(self._key, b"vault", label.encode(),
                             original.encode("utf-8", "replace"))
        got = self._cache.get(lookup)
        if got is None:
            got = self._vault.code(lookup, make)
            if len(self._cache) > _CACHE_MAX:
                self._cache.clear()
            self._cache[lookup] = got
        return got

    def uid(self, original: str) -> str:
        return self._code("uid", original, _UID_ROOT + str(uuid.uuid4().int))

    def token(self, label: str, original: str, length: int = 16) -> str:
        return self._code(f"token:{label}:{length}", original,
                          secrets.token_hex((length + 1) // 2)[:length].upper())

    def date_offset_days(self, patient_identity: str) -> int:
        shift = DATE_SHIFT_MIN_DAYS + secrets.randbelow(DATE_SHIFT_SPAN_DAYS)
        return -int(self._code("date-shift", patient_identity, str(shift)))
