"""The index record an instance file carries: inbox files that describe themselves.

Every instance file ends with its index row, sealed, so that the file alone is
enough to index it again: the index commit before a C-STORE Success then needs
no fsync of its own (see ``agent.store.reconcile`` and "Durability" in
docs/dicom-conformance.md).  Layout at the end of the file, after the sealed
instance stream (agent.crypto's chunked stream)::

    u16 n | ident (n bytes, JSON) | sealed record | u32 len(everything before) | "EAX1"

``ident`` names the study version whose data key sealed the file (the study key,
an HMAC pseudonym as the index stores it, and the version number); the record
itself (instance key, size, SOP class, transfer syntax, calling AE, peer address,
receive time, series key) is sealed under that data key with ``ident`` as associated data, so
it is authenticated and nothing of it is readable without the key.  Files written
before this existed end with the stream's last chunk: ``stream_length`` tells the
two apart by authenticating the record, never by the magic alone.

May import: agent.crypto, agent.errors.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from typing import BinaryIO

from agent.crypto import seal, unseal
from agent.errors import CryptoError

MAGIC = b"EAX1"
_FOOTER = struct.Struct(">I4s")
_AAD = b"edge-agent inbox index record v1\0"
# A record is a few hundred bytes; anything claiming more is not one.
_MAX_RECORD = 64 << 10


@dataclass(frozen=True)
class InstanceRecord:
    """What the index holds of one instance (pseudonymous keys only)."""

    study_key: str
    version: int
    instance_key: str
    size: int
    sop_class: str
    transfer_syntax: str
    calling_ae: str
    peer: str
    received_at: float
    # Keyed hash of the Series Instance UID ("" when the instance had none, and in
    # records written before series were kept: such files read as before).
    series_key: str = ""

    def seal(self, data_key: bytes) -> bytes:
        """The trailer to append after the sealed stream."""
        ident = json.dumps({"study_key": self.study_key, "version": self.version},
                           separators=(",", ":")).encode()
        body = {k: v for k, v in asdict(self).items() if k not in ("study_key", "version")}
        sealed = seal(data_key, json.dumps(body, separators=(",", ":")).encode(), _AAD + ident)
        blob = struct.pack(">H", len(ident)) + ident + sealed
        return blob + _FOOTER.pack(len(blob), MAGIC)


@dataclass(frozen=True)
class Trailer:
    """A file's trailer as found, not yet authenticated."""

    study_key: str
    version: int
    ident: bytes
    sealed: bytes
    stream_length: int  # bytes of the sealed stream before it

    def open(self, data_key: bytes) -> InstanceRecord | None:
        """The record, or None when it does not authenticate under ``data_key``."""
        try:
            body = json.loads(unseal(data_key, self.sealed, _AAD + self.ident))
            return InstanceRecord(
                study_key=self.study_key, version=self.version,
                instance_key=str(body["instance_key"]), size=int(body["size"]),
                sop_class=str(body["sop_class"]), transfer_syntax=str(body["transfer_syntax"]),
                calling_ae=str(body["calling_ae"]), peer=str(body["peer"]),
                received_at=float(body["received_at"]),
                series_key=str(body.get("series_key", "")))
        except (CryptoError, ValueError, KeyError, TypeError):
            return None


def read_trailer(fh: BinaryIO) -> Trailer | None:
    """The trailer at the end of an open file, if it has one (unauthenticated)."""
    size = os.fstat(fh.fileno()).st_size
    if size < _FOOTER.size + 2:
        return None
    fh.seek(size - _FOOTER.size)
    n, magic = _FOOTER.unpack(fh.read(_FOOTER.size))
    if magic != MAGIC or not 2 < n <= min(_MAX_RECORD, size - _FOOTER.size):
        return None
    fh.seek(size - _FOOTER.size - n)
    blob = fh.read(n)
    (m,) = struct.unpack(">H", blob[:2])
    try:
        ident = json.loads(blob[2:2 + m])
        study_key, version = str(ident["study_key"]), int(ident["version"])
    except (ValueError, KeyError, TypeError):
        return None
    return Trailer(study_key, version, blob[2:2 + m], blob[2 + m:], size - _FOOTER.size - n)


def stream_length(fh: BinaryIO, data_key: bytes) -> int:
    """How many bytes of the file are the sealed stream: all of a file written
    before records existed, all but the trailer of one that has an authentic one."""
    trailer = read_trailer(fh)
    if trailer is not None and trailer.open(data_key) is not None:
        return trailer.stream_length
    return os.fstat(fh.fileno()).st_size
