"""A package download in progress: chunks appended in order to a part file, fsynced.

Resumable by construction: the part file holds chunks 0..n-1, each checked
against the signed list of chunk hashes before it is written, and fsynced
before the next is asked for.  After a crash the part file is re-read chunk by
chunk against the same list and cut back to the last good chunk (a torn
write at kill -9 loses at most the chunk being written).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.deploy.document import PackageRef


class ChunkError(Exception):
    """A chunk that does not belong where it claims to (its hash, index or size)."""


class Download:
    def __init__(self, folder: Path, ref: PackageRef) -> None:
        self.ref = ref
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / f"{ref.sha256}.part"
        self.done_path = folder / f"{ref.sha256}.tar"
        self.have = self._recover()

    @property
    def total(self) -> int:
        return len(self.ref.chunks)

    @property
    def complete(self) -> bool:
        return self.done_path.exists() or self.have >= self.total

    def _recover(self) -> int:
        """How many leading chunks of the part file match the signed hashes; cuts the rest."""
        if self.done_path.exists():
            return self.total
        if not self.path.exists():
            return 0
        good = 0
        with self.path.open("rb") as fh:
            for want in self.ref.chunks:
                data = fh.read(self.ref.chunk_size)
                if not data or hashlib.sha256(data).hexdigest() != want:
                    break
                good += 1
        size = min(self.ref.size, good * self.ref.chunk_size)
        if self.path.stat().st_size != size:
            with self.path.open("r+b") as fh:
                fh.truncate(size)
                os.fsync(fh.fileno())
        return good

    def expected_size(self, index: int) -> int:
        return min(self.ref.chunk_size, self.ref.size - index * self.ref.chunk_size)

    def accept(self, index: int, data: bytes) -> bool:
        """Write chunk ``index`` if it is the next one; False for a duplicate or a gap.

        Raises ChunkError when its bytes do not match the signed hash of that index.
        """
        if index < 0 or index >= self.total:
            raise ChunkError(f"chunk index {index} outside 0..{self.total - 1}")
        if len(data) != self.expected_size(index):
            raise ChunkError(f"chunk {index} has {len(data)} bytes, expected "
                             f"{self.expected_size(index)}")
        if hashlib.sha256(data).hexdigest() != self.ref.chunks[index]:
            raise ChunkError(f"chunk {index} does not match its signed sha256")
        if index != self.have:
            return False
        with self.path.open("ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.have += 1
        return True

    def finish(self) -> Path:
        """The whole archive, its sha256 checked; raises ChunkError when it differs."""
        if self.done_path.exists():
            return self.done_path
        h = hashlib.sha256()
        with self.path.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        if h.hexdigest() != self.ref.sha256 or self.path.stat().st_size != self.ref.size:
            self.path.unlink(missing_ok=True)
            self.have = 0
            raise ChunkError(f"package {self.ref.name} {self.ref.version}: the assembled "
                             "archive does not match its signed sha256")
        os.replace(self.path, self.done_path)
        return self.done_path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.done_path.unlink(missing_ok=True)
