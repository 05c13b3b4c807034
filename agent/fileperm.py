"""Private files and folders: the umask, 0600 stores, and the state-dir check.

Under systemd the unit's ``UMask=0077`` and ``StateDirectoryMode=0700`` keep
everything the daemon writes private.  Run by hand (a dev box, a support
session, a container without systemd) the inherited umask is usually 0022, and
sqlite creates its database, ``-wal`` and ``-shm`` files with 0644: encrypted
rows, but wrapped data keys and study metadata readable by every local user.
So the CLI sets a 0077 umask itself, and every store is created 0600
explicitly, whatever the umask, before sqlite writes a byte.

A state or key folder open to group/others is refused at ``edge-agent run``
(the same test ``edge-agent doctor`` reports as FAIL): a private file in an
open folder can still be replaced or listed, and the next file created there
by another tool may not be private at all.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from agent.config import Config
from agent.errors import OutOfResources, StorageError
from agent.identity import credentials

PRIVATE_UMASK = 0o077
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def restrict_umask() -> int:
    """Files and folders we create are ours alone; returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def _tighten(path: Path, fd: int | None = None) -> None:
    """chmod 600 a file that is open to group/others (one we created, or an older one)."""
    st = os.fstat(fd) if fd is not None else path.stat()
    if not stat.S_IMODE(st.st_mode) & 0o077:
        return
    try:
        if fd is not None:
            os.fchmod(fd, 0o600)
        else:
            path.chmod(0o600)
    except PermissionError:
        raise StorageError(f"{path} is readable by group/others (mode "
                           f"{stat.S_IMODE(st.st_mode):o}) and this user cannot change it",
                           hint=f"chmod 600 {path} (as its owner or root)") from None


def private_db(path: Path) -> Path:
    """Create a sqlite database file 0600 (or tighten an existing one) before sqlite opens it.

    sqlite creates its ``-wal``/``-shm`` side files with the main file's mode, so
    a private main file keeps them private too; side files left by an older
    version are tightened here as well.  A zero-length file is a valid empty
    database to sqlite.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutOfResources(f"cannot create {path}: the state volume is full",
                                 hint="free space on the state volume") from None
        raise StorageError(f"cannot open {path}: {exc.strerror}",
                           hint="run as the edge-agent service user (the owner of the state "
                                "dir); 'edge-agent doctor' checks the permissions") from None
    try:
        _tighten(path, fd)
    finally:
        os.close(fd)
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            _tighten(side)
        except FileNotFoundError:
            continue
    return path


def open_private_db(path: Path, schema: str) -> sqlite3.Connection:
    """An encrypted store's sqlite database, as every store opens it: the file made 0600
    first (``private_db``), autocommit (the store opens its own ``BEGIN IMMEDIATE``),
    WAL with ``synchronous=FULL`` (a committed row survives a power cut),
    ``secure_delete=ON`` (a deleted wrapped key's pages are zeroed, so shredding it
    leaves no copy behind), then ``schema``.  sqlite3.Error propagates: each store says
    in its own words which store failed."""
    db = sqlite3.connect(private_db(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA secure_delete=ON")
    db.executescript(schema)
    return db


def open_private(path: Path) -> BinaryIO:
    """``open(path, "wb")``, but the file is 0600 from its first byte (a leftover is
    truncated and tightened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


# -- the folder check shared by 'edge-agent run' and 'edge-agent doctor' -------------

@dataclass(frozen=True)
class OpenFolder:
    """A folder holding PHI or secrets that group/others can enter or list."""

    what: str  # "state dir", "key dir"
    path: Path
    mode: int

    @property
    def message(self) -> str:
        return f"{self.what} {self.path} is open to group/others (mode {self.mode:o})"

    @property
    def fix(self) -> str:
        return f"chmod 700 {self.path}"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def secret_files(cfg: Config) -> list[tuple[str, Path]]:
    """The box's secret files, as (credential name, path); systemd credentials left out
    (systemd owns that folder and its modes)."""
    src = credentials.sources(cfg)
    secrets = [("kek", cfg.keys.kek), ("pseudonym", cfg.keys.pseudonym),
               ("audit_signing", cfg.keys.audit_signing), ("mqtt_key", cfg.mqtt.key)]
    return [(name, path) for name, path in secrets if src.get(name) != "credential"]


def open_folders(cfg: Config) -> list[OpenFolder]:
    """The state dir and every folder holding a key file, when group/others can get in.

    A folder that does not exist yet is not reported here: the daemon creates the
    state dir 0700, and a missing key is reported by the key loader itself.
    """
    found: list[OpenFolder] = []
    seen: set[Path] = set()
    folders = [("state dir", cfg.state_dir)]
    folders += [("key dir", path.parent) for _, path in secret_files(cfg)]
    for what, folder in folders:
        try:
            real = folder.resolve()
            mode = _mode(real)
        except OSError:
            continue
        if real in seen:
            continue
        seen.add(real)
        if mode & 0o077:
            found.append(OpenFolder(what, real, mode))
    return found


def require_private_folders(cfg: Config) -> None:
    """Refuse to start on a state or key folder that group/others can enter."""
    bad = open_folders(cfg)
    if bad:
        raise StorageError(
            "refusing to start: " + "; ".join(b.message for b in bad),
            hint=" && ".join(b.fix for b in bad)
            + " (as the folder's owner or root), then start again; 'edge-agent doctor' "
              "checks every permission")


__all__ = ["OpenFolder", "open_folders", "open_private", "private_db",
           "require_private_folders", "restrict_umask", "secret_files"]
