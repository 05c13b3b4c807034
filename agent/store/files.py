"""The inbox's instance files: sealed as they stream in, in pre-created slots.

Plaintext never touches the disk: every byte is sealed under its study version's
data key (agent.crypto's chunked stream) before it is written.  File names are
random, never derived from UIDs or dataset values, so nothing a peer sends can steer
a path.

Instance files are pre-created empty in batches ("slots") and written in place, so
acknowledging an instance costs one fdatasync of its file: the file ends with its
own index record (agent.store.record), the index commit needs no fsync of its own
(a file the index lost is indexed again at start, agent.store.reconcile), and the
directory fsync that a create needs is paid once per batch.  A slot neither
referenced by the index nor holding a complete, authentic instance never held an
acknowledged one: it is emptied and reused.

May import: agent.crypto, agent.errors, agent.fileperm, agent.store.record.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from agent.crypto import StreamWriter, fsync_dir, iter_open_stream
from agent.errors import CryptoError, StorageError
from agent.fileperm import open_private
from agent.store.record import stream_length

log = logging.getLogger(__name__)

# Start write-back of a large instance every this many bytes while it streams in,
# so the fdatasync before Success only has the tail left to flush.
EARLY_FLUSH_BYTES = 4 << 20


def _datasync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError:
        pass  # only an early start; finish() does the fdatasync that counts
    finally:
        os.close(fd)


class PendingWrite:
    """An instance being streamed into the inbox, sealed as it arrives.

    Nothing is acknowledged until ``Inbox.commit``; ``abort`` (idempotent)
    drops the partial file.  Partial files left by a crash are removed at the
    next start because they were never acknowledged.
    """

    def __init__(self, path: Path, study_key: str, study_id: int, version: int,
                 new_study: bool, data_key: bytes, wrapped_key: bytes, *,
                 on_abort: Callable[[PendingWrite], None]) -> None:
        """``on_abort``: gives the slot back (and drops a study version this write
        opened, now empty) when the write is dropped uncommitted."""
        self.path = path
        self.study_key = study_key
        self.study_id = study_id
        self.version = version
        self.new_study = new_study
        self.data_key = data_key
        # Identifies the study version this write is sealed for: row ids can be
        # reused once an empty version is deleted, wrapped keys (random) cannot.
        self.wrapped_key = wrapped_key
        self._digest: Any = None  # hashlib sha256 while streaming, for a known re-send
        self._fh: BinaryIO | None = open(path, "r+b")  # noqa: SIM115 - closed in finish/abort
        self._writer = StreamWriter(data_key, self._fh, study_key.encode())
        self._on_abort = on_abort
        self.committed = False
        self._flush_mark = 0
        self._flusher: threading.Thread | None = None

    @property
    def size(self) -> int:
        return self._writer.plain_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fh is None:
            raise StorageError("write to a closed inbox file")
        if self._digest is not None:
            self._digest.update(data)
        self._writer.write(data)
        if self._writer.plain_bytes - self._flush_mark >= EARLY_FLUSH_BYTES:
            self._flush_mark = self._writer.plain_bytes
            self._early_flush()

    def hash_content(self) -> None:
        """Digest the plaintext as it streams (before the first write)."""
        if self._writer.plain_bytes == 0:
            self._digest = hashlib.sha256()

    def content_digest(self) -> str | None:
        return self._digest.hexdigest() if self._digest is not None else None

    def _early_flush(self) -> None:
        """Let the disk work while the rest of the instance arrives (off this thread)."""
        if self._fh is None or (self._flusher is not None and self._flusher.is_alive()):
            return
        try:
            self._fh.flush()
            fd = os.dup(self._fh.fileno())
        except OSError:
            return  # the write path reports real errors; this is only a head start
        self._flusher = threading.Thread(target=_datasync_and_close, args=(fd,),
                                         name="inbox-early-flush", daemon=True)
        self._flusher.start()

    def finish(self, trailer: Callable[[int], bytes] | None = None) -> int:
        """Seal the last chunk, append ``trailer(size)`` (the file's own index
        record) and fdatasync; returns the plaintext size."""
        if self._fh is None:
            raise StorageError("inbox file was already closed")
        try:
            self._writer.close()
            if trailer is not None:
                self._fh.write(trailer(self._writer.plain_bytes))
            self._fh.flush()
            # fdatasync still flushes the file size; the inode times it skips are
            # not needed to read the instance back.
            os.fdatasync(self._fh.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write the inbox: {exc.strerror}") from None
        finally:
            self._fh.close()
            self._fh = None
        return self._writer.plain_bytes

    def abort(self) -> None:
        """Drop an uncommitted write (idempotent; no-op after commit)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self.committed:
            self.committed = True  # release once
            self._on_abort(self)


class Slots:
    """The pre-created instance files of one process (its own directory).

    Creating files (and the directory fsync that makes them durable) waits on the
    file system's journal, which the fdatasync of every acknowledged instance keeps
    busy: done in the association's thread, a batch held up the C-STORE that ran out
    of slots (up to a sixth of a receive worker's busy time on CT over four
    associations).  So the next batch is made by a short-lived thread of its own
    once fewer than ``LOW_WATER`` are left; a slot is handed out only after the
    directory fsync of its batch, as before.  ``take`` still creates a batch itself
    when none is left (the first one, or a refill that cannot keep up or failed).
    """

    BATCH = 32
    LOW_WATER = 16

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self.free: collections.deque[Path] = collections.deque()  # empty slots, ready
        self._refilling = False

    def recover(self, root: Path, slot_root: Path, used: set[str]) -> None:
        """At start, before any worker runs: empty and reuse every slot the index does not
        reference (``used``: paths relative to ``root``); it never held an ack."""
        for p in sorted(slot_root.iterdir()):
            if p.is_dir():
                # A receive worker's slots: whatever is not indexed was never
                # acknowledged.  Removed rather than recycled, because only this
                # process's own directory is recycled (no worker runs yet).
                for q in sorted(p.iterdir()):
                    if str(q.relative_to(root)) not in used:
                        q.unlink(missing_ok=True)
                continue
            if str(p.relative_to(root)) in used:
                continue
            if p.suffix != ".enc":
                p.unlink(missing_ok=True)
                continue
            if p.stat().st_size:
                os.truncate(p, 0)
            self.free.append(p)

    def take(self) -> Path:
        with self._lock:
            if not self.free:
                self.free.extend(self._create())
            path = self.free.popleft()
            refill = len(self.free) < self.LOW_WATER and not self._refilling
            self._refilling = self._refilling or refill
        if refill:
            threading.Thread(target=self._refill, name="inbox-slots", daemon=True).start()
        return path

    def _create(self) -> list[Path]:
        """A batch of empty slot files, durable in the directory before they are used."""
        made = []
        for _ in range(self.BATCH):
            p = self.folder / f"{os.urandom(8).hex()}.enc"
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            made.append(p)
        fsync_dir(self.folder)
        return made

    def _refill(self) -> None:
        made: list[Path] = []
        try:
            made = self._create()
        except OSError as exc:  # a full disk: ``take`` tries again, and reports it
            log.warning("cannot create inbox slots ahead of time: %s", exc)
        finally:
            with self._lock:
                self.free.extend(made)
                self._refilling = False

    def release(self, path: Path) -> None:
        """Empty a slot and make it available again (it never held an ack)."""
        try:
            os.truncate(path, 0)
        except FileNotFoundError:
            return
        with self._lock:
            self.free.append(path)


class _Prefix:
    """The first ``n`` bytes of an open file, read like the file (the sealed stream
    before an instance file's index record)."""

    def __init__(self, fh: BinaryIO, n: int) -> None:
        self._fh = fh
        self._left = n

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        data = self._fh.read(size)
        self._left -= len(data)
        return data


def iter_stream(fh: BinaryIO, key: bytes, aad: bytes) -> Iterator[bytes]:
    """The plaintext chunks of an instance file, with or without its index record."""
    n = stream_length(fh, key)
    fh.seek(0)
    # _Prefix has the one method iter_open_stream uses.
    return iter_open_stream(key, cast(BinaryIO, _Prefix(fh, n)), aad)


def open_sealed(path: Path, key: bytes, aad: bytes, what: str) -> Iterator[bytes]:
    """Decrypt a sealed file chunk by chunk (bounded memory, authenticated)."""
    try:
        with open(path, "rb") as fh:
            yield from iter_stream(fh, key, aad)
    except FileNotFoundError:
        raise StorageError(f"inbox file for {what} is missing") from None
    except CryptoError as exc:
        raise StorageError(f"inbox file for {what}: {exc}") from None


def file_digest(path: Path, key: bytes, aad: bytes) -> str:
    """sha256 of a sealed file's plaintext (authenticated while read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter_stream(fh, key, aad):
                h.update(chunk)
    except (OSError, CryptoError) as exc:
        raise StorageError(f"cannot read back an inbox file: {exc}") from None
    return h.hexdigest()


def reseal(path: Path, old: bytes, new: bytes, aad: bytes, trailer: bytes = b"") -> None:
    """Re-seal a file under another data key with a new index record ``trailer``,
    atomically (fsynced, then renamed)."""
    out = path.with_suffix(".rekey")
    with open(path, "rb") as src, open_private(out) as fh:
        w = StreamWriter(new, fh, aad)
        for chunk in iter_stream(src, old, aad):
            w.write(chunk)
        w.close()
        fh.write(trailer)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(out, path)
    fsync_dir(path.parent)
