"""Encryption at rest: a box key-encryption key (KEK) wraps per-scope data keys.

Every PHI-bearing byte on disk (inbox, quarantine, outbox, audit) is sealed with
AES-256-GCM under a random 256-bit data key.  Data keys are stored only wrapped
by the KEK (AES key wrap, RFC 3394) together with the KEK's id, so that:

* rotating the KEK re-wraps small data keys, never re-encrypts data;
* destroying a wrapped data key makes its data unrecoverable (crypto-shredding).

Large files are sealed in fixed-size chunks (STREAM construction): each chunk
has its own nonce derived from a random prefix and the chunk counter, and the
last chunk is flagged in the associated data, so truncation, reordering and
chunk swapping all fail authentication.  Memory stays bounded by the chunk size.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from agent.errors import CryptoError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
CHUNK_BYTES = 1 << 20
_STREAM_MAGIC = b"EAS1"
_PREFIX_BYTES = 7


def random_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_id(key: bytes) -> str:
    """A short public identifier of a key (never the key itself)."""
    return hashlib.sha256(b"edge-agent key id\x00" + key).hexdigest()[:16]


def load_key_file(path: Path, *, purpose: str) -> bytes:
    """Read a 32-byte secret stored raw or as hex; refuse loose permissions."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CryptoError(
            f"{purpose} key file {path} does not exist",
            hint="run 'edge-agent provision init' (or 'provision dev') to create the box keys",
        ) from None
    except PermissionError:
        raise CryptoError(
            f"{purpose} key file {path} is not readable by this user",
            hint="run as the edge-agent service user, or fix the file owner",
        ) from None
    if st.st_mode & 0o077:
        raise CryptoError(
            f"{purpose} key file {path} is readable by group or others "
            f"(mode {st.st_mode & 0o777:o})",
            hint=f"chmod 600 {path}",
        )
    text = raw.strip()
    key = raw
    if len(text) == 2 * KEY_BYTES:
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = raw
    if len(key) != KEY_BYTES:
        raise CryptoError(
            f"{purpose} key file {path} does not hold a 32-byte key",
            hint="restore it from backup or re-provision the box",
        )
    return key


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically and durably, created with ``mode`` from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_secret_file(path: Path, data: bytes) -> None:
    """Create a 0600 file atomically (never briefly world-readable)."""
    write_file_atomic(path, data, 0o600)


def load_or_create_data_key(db: sqlite3.Connection, kek: KeyEncryptionKey,
                            name: str = "data_key") -> bytes:
    """The store's data key from its ``meta`` table, created (wrapped) on first use."""
    row = db.execute("SELECT v FROM meta WHERE k=?", (name,)).fetchone()
    if row is not None:
        return kek.unwrap(bytes(row[0]))
    key = random_key()
    db.execute("INSERT INTO meta VALUES (?, ?)", (name, kek.wrap(key)))
    return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyEncryptionKey:
    """The box KEK. Its repr never shows key material.

    ``previous`` holds the KEK being rotated away from (``kek.key.old`` next to
    the KEK file) while ``edge-agent keys rotate`` is unfinished: unwrap then
    accepts both, wrap always uses the new one, so a crash mid-rotation loses
    nothing (see agent/identity/keyrotate.py).
    """

    key: bytes = field(repr=False)
    previous: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def id(self) -> str:
        return key_id(self.key)

    @classmethod
    def from_file(cls, path: Path) -> KeyEncryptionKey:
        key = load_key_file(path, purpose="key-encryption")
        old = path.with_name(path.name + ".old")
        if old.exists():
            prev = load_key_file(old, purpose="previous key-encryption")
            if prev != key:
                return cls(key, (prev,))
        return cls(key)

    def wrap(self, data_key: bytes) -> bytes:
        """Wrapped form: kek id (16 ascii) + RFC 3394 wrap."""
        return self.id.encode("ascii") + aes_key_wrap(self.key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        kid, body = wrapped[:16].decode("ascii", "replace"), wrapped[16:]
        kek = next((k for k in (self.key, *self.previous) if key_id(k) == kid), None)
        if kek is None:
            raise CryptoError(
                f"data key is wrapped by key-encryption key {kid}, not by this box's {self.id}",
                hint="restore the previous KEK or finish 'edge-agent keys rotate'",
            )
        try:
            return aes_key_unwrap(kek, body)
        except InvalidUnwrap:
            raise CryptoError("wrapped data key failed integrity check") from None


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-256-GCM: nonce || ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes = b"") -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("ciphertext is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise CryptoError("ciphertext failed authentication (tampered, truncated or wrong key)") from None


class Unsealer:
    """``unseal`` with one key, its cipher set up once: setting up AES-GCM per call was
    half the cost of opening a 2 kB outbox row."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise CryptoError("ciphertext is truncated")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CryptoError("ciphertext failed authentication (tampered, truncated or "
                              "wrong key)") from None


def _chunk_nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


class _Scratch:
    """Chunk-sized buffers handed from one StreamWriter to the next.

    A fresh 1 MiB buffer per instance is a fresh mapping (glibc serves blocks
    this large with mmap and unmaps them on free): its page faults and zeroing
    were a third of the kernel time of receiving a 0.5 MB CT instance.
    """

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


# Two buffers per writer; a process rarely has more than a few writers at once.
_SCRATCH = _Scratch(keep=8)
_RECORD_BYTES = 4 + CHUNK_BYTES + TAG_BYTES


class StreamWriter:
    """Seal a byte stream chunk by chunk into ``out`` (bounded memory).

    Format: magic(4) prefix(7) then for each chunk: len(4) nonce-implied ct+tag.
    ``aad`` binds the stream to its context (e.g. the study key and file name).
    """

    def __init__(self, key: bytes, out: BinaryIO, aad: bytes = b"") -> None:
        self._aead = AESGCM(key)
        self._out = out
        self._aad = aad
        self._prefix = os.urandom(_PREFIX_BYTES)
        # The pending chunk (the first ``_fill`` bytes) and one sealed record
        # (length, ciphertext, tag), both reused: a 10 MB instance would
        # otherwise be copied three more times on its way to the disk.
        self._buf = _SCRATCH.take(CHUNK_BYTES)
        self._fill = 0
        self._record = _SCRATCH.take(_RECORD_BYTES)
        self._counter = 0
        self._closed = False
        self.plain_bytes = 0
        out.write(_STREAM_MAGIC + self._prefix)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise CryptoError("write to a closed encrypted stream")
        n = len(data)
        self.plain_bytes += n
        view = memoryview(data).cast("B") if n else memoryview(b"")
        pos = 0
        if self._fill:
            take = min(n, CHUNK_BYTES - self._fill)
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            pos = take
            if self._fill < CHUNK_BYTES or pos == n:
                # A full buffer with nothing after it stays: it may be the last chunk.
                return n
            self._emit(memoryview(self._buf)[:CHUNK_BYTES], last=False)
            self._fill = 0
        # Whole chunks straight from the caller's buffer; the final chunk is only
        # known at close, so at least one byte always stays buffered.
        while n - pos > CHUNK_BYTES:
            self._emit(view[pos:pos + CHUNK_BYTES], last=False)
            pos += CHUNK_BYTES
        rest = n - pos
        self._buf[:rest] = view[pos:]  # same length: copied in place, never resized
        self._fill = rest
        return n

    def _emit(self, chunk: bytes | bytearray | memoryview, *, last: bool) -> None:
        nonce = _chunk_nonce(self._prefix, self._counter, last)
        size = len(chunk) + TAG_BYTES
        record = memoryview(self._record)
        struct.pack_into(">I", record, 0, size)
        self._aead.encrypt_into(nonce, chunk, self._aad + struct.pack(">I?", self._counter, last),
                                record[4:4 + size])
        self._out.write(record[:4 + size])
        self._counter += 1

    def close(self) -> None:
        if not self._closed:
            self._emit(memoryview(self._buf)[:self._fill], last=True)
            self._closed = True
            _SCRATCH.give(self._buf)
            _SCRATCH.give(self._record)
            self._buf = self._record = bytearray()


def iter_open_stream(key: bytes, src: BinaryIO, aad: bytes = b"") -> Iterator[bytes]:
    """Yield the plaintext chunks of a sealed stream, authenticating each."""
    head = src.read(4 + _PREFIX_BYTES)
    if len(head) != 4 + _PREFIX_BYTES or head[:4] != _STREAM_MAGIC:
        raise CryptoError("not an edge-agent encrypted file (bad header)")
    prefix = head[4:]
    aead = AESGCM(key)
    counter = 0
    while True:
        lenb = src.read(4)
        if len(lenb) != 4:
            raise CryptoError("encrypted file is truncated (missing final chunk)")
        (n,) = struct.unpack(">I", lenb)
        if n > CHUNK_BYTES + TAG_BYTES:
            raise CryptoError("encrypted file has an oversized chunk (corrupt)")
        ct = src.read(n)
        if len(ct) != n:
            raise CryptoError("encrypted file is truncated")
        for last in (False, True):
            try:
                plain = aead.decrypt(
                    _chunk_nonce(prefix, counter, last),
                    ct,
                    aad + struct.pack(">I?", counter, last),
                )
            except InvalidTag:
                continue
            yield plain
            if last:
                if src.read(1):
                    raise CryptoError("encrypted file has data after its final chunk")
                return
            break
        else:
            raise CryptoError(
                f"encrypted file chunk {counter} failed authentication (tampered or wrong key)"
            )
        counter += 1


def open_stream(key: bytes, src: BinaryIO, aad: bytes = b"") -> bytes:
    return b"".join(iter_open_stream(key, src, aad))


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        mac.update(struct.pack(">I", len(p)))
        mac.update(p)
    return mac.digest()
