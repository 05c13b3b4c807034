"""Where a C-STORE data set streams to: an ``InstanceSink`` per instance.

Owns: the sink (P-DATA fragments in, a sealed inbox write out, with the header
read from the first bytes and the bounds on size and inflation enforced while
it streams), the Part 10 file meta it writes first (``MetaFields``), and the
transfer syntaxes the node accepts.  Memory per instance: at most
``HEADER_WINDOW`` bytes held before the inbox write opens.  May import
agent.store.inbox, agent.pixelbound, agent.dicom.header and agent.dicom.status.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_dataset

from agent import pixelbound
from agent.dicom.header import Header, parse_header
from agent.dicom.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    Refused,
)
from agent.errors import OutOfResources, StorageError
from agent.store.inbox import Inbox, PendingWrite

log = logging.getLogger(__name__)

DEFLATED = "1.2.840.10008.1.2.1.99"
# What a modality may propose.  Deflate is accepted because modalities use it;
# its inflation is bounded while it streams in (see InstanceSink).
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    DEFLATED,  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# Pixel Data as its bytes (deflate: inflated, and bounded as such while it streams).
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", DEFLATED,
                             "1.2.840.10008.1.2.2"})


# The header elements we need (StudyInstanceUID, SOP class, pixel geometry)
# all precede (0028,0100); a data set that puts more than this many bytes
# before them is refused rather than buffered.
HEADER_WINDOW = 8 << 20
_FIRST_PARSE = 64 << 10
_CAPACITY_EVERY = 64 << 20
_INFLATE_STEP = 1 << 20
# Processing a deflated instance holds about three copies of its inflated data set
# (pydicom inflates it into a buffer of its own and reads every value out of it;
# measured 3.1x for 200 MiB, 3.3x for 1 GiB): its inflated size counts this often
# against [study] max_process_instance_bytes.
DEFLATE_PROCESSING_COPIES = 4
PREAMBLE = b"\0" * 128 + b"DICM"


# -- streaming sink --------------------------------------------------------------------


class InstanceSink:
    """One C-STORE data set, written fragment by fragment as P-DATA arrives.

    The DIMSE layer calls ``write`` with the Part 10 preamble, ``write_meta``,
    then ``write`` for every data set fragment, ``finish`` at the last one and
    ``close`` in any case.  ``write`` runs in the association's thread and never
    raises: a failure switches the sink to discarding, and ``finish`` raises the
    recorded ``Refused`` (the C-STORE status).
    """

    def __init__(self, inbox: Inbox, max_bytes: int) -> None:
        self._inbox = inbox
        self._max = max_bytes
        # What processing may hold of one instance: a bound on what the data set
        # expands to (inflated deflate, declared decoded pixels), refused here,
        # before Success, rather than acknowledged and then never processable.
        self._max_expanded = min(max_bytes, inbox.study_settings.max_process_instance_bytes)
        self._raw = bytearray()  # Part 10 bytes held until the inbox write opens
        self._meta_end = 0
        self._ts: str | None = None
        self._sop_uid: str | None = None  # from the C-STORE request, when given as a value
        self._inflater: Any = None
        self._plain = bytearray()  # inflated head of a deflated data set
        self._inflated = 0
        self._received = 0
        self._next_parse = _FIRST_PARSE
        self._next_capacity = _CAPACITY_EVERY
        self.header: Header | None = None
        self.pending: PendingWrite | None = None
        self.failure: Refused | None = None
        self._lock = threading.Lock()

    # what the DIMSE layer calls ---------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            if self.failure is None:
                try:
                    self._write(data)
                except Refused as exc:
                    self._fail(exc)
                except OutOfResources as exc:
                    self._fail(Refused(STATUS_OUT_OF_RESOURCES, str(exc).splitlines()[0]))
                except (StorageError, OSError) as exc:
                    self._fail(Refused(STATUS_OUT_OF_RESOURCES, f"storage failed ({exc})"))
                except Exception as exc:  # noqa: BLE001 - runs in the association's thread
                    log.exception("streaming an instance failed")
                    self._fail(Refused(STATUS_PROCESSING_FAILURE,
                                       f"internal error ({type(exc).__name__})"))
        return len(data)

    def write_meta(self, meta: MetaFields) -> None:
        """The file meta group, from the request's fields (no parse back needed)."""
        encoded = meta.encode()
        with self._lock:
            if self.failure is None and self._ts is None and bytes(self._raw) == PREAMBLE:
                self._raw += encoded
                self._received += len(encoded)
                self._ts = meta.transfer_syntax
                self._sop_uid = meta.sop_instance_uid.strip() or None
                self._meta_end = len(self._raw)
                if self._ts == DEFLATED:
                    self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return
        self.write(encoded)  # anything unexpected goes the general, checking way

    def flush(self) -> None:
        # Durability is established once, at commit; per-fragment flushes would
        # only cost syscalls.
        return None

    def close(self) -> None:
        with self._lock:
            if self.failure is None:
                # A write after close (an association torn down mid-stream) must
                # not open a new inbox file.
                self.failure = Refused(STATUS_PROCESSING_FAILURE, "association ended")
            self._drop()

    # internals -------------------------------------------------------------------------

    def _fail(self, exc: Refused) -> None:
        self.failure = exc
        self._drop()

    def _drop(self) -> None:
        if self.pending is not None:
            self.pending.abort()
            self.pending = None
        self._raw = bytearray()
        self._plain = bytearray()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._received += n
        if self._received > self._max:
            raise Refused(STATUS_OUT_OF_RESOURCES, "instance larger than max_instance_bytes")
        if self.pending is not None:
            self.pending.write(data)
            if self._inflater is not None:
                self._inflate(bytes(data), keep=False)
            if self._received >= self._next_capacity:
                self._next_capacity += _CAPACITY_EVERY
                self._inbox.check_capacity(_CAPACITY_EVERY)
            return
        before = len(self._raw)
        self._raw += data
        if self._ts is None:
            if not self._read_meta():
                return
            before = self._meta_end
        if self._inflater is not None and len(self._raw) > before:
            self._inflate(bytes(self._raw[max(before, self._meta_end):]), keep=True)
        if self._dataset_len() >= self._next_parse:
            self._try_header(complete=False)

    def _dataset_len(self) -> int:
        if self._inflater is not None:
            return len(self._plain)
        return max(0, len(self._raw) - self._meta_end)

    def _dataset_prefix(self) -> memoryview:
        if self._inflater is not None:
            return memoryview(self._plain)
        return memoryview(self._raw)[self._meta_end:]

    def _read_meta(self) -> bool:
        """Find the transfer syntax in a file meta group written as bytes."""
        if len(self._raw) < 144:
            return False
        if bytes(self._raw[128:132]) != b"DICM" or bytes(self._raw[132:138]) != b"\x02\x00\x00\x00UL":
            raise Refused(STATUS_PROCESSING_FAILURE, "unexpected file meta from the DIMSE layer")
        group_len = int.from_bytes(self._raw[140:144], "little")
        end = 144 + group_len
        if len(self._raw) < end:
            return False
        meta = read_dataset(io.BytesIO(bytes(self._raw[132:end])), False, True)
        self._ts = str(meta.TransferSyntaxUID)
        self._meta_end = end
        if self._ts == DEFLATED:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return True

    def _inflate(self, data: bytes, *, keep: bool) -> None:
        """Count (and keep the head of) the inflated stream, never unbounded."""
        d = self._inflater
        buf = data
        while True:
            try:
                out = d.decompress(buf, _INFLATE_STEP)
            except zlib.error:
                raise Refused(STATUS_CANNOT_UNDERSTAND, "corrupt deflated data set") from None
            self._inflated += len(out)
            if self._inflated * DEFLATE_PROCESSING_COPIES > self._max_expanded:
                raise Refused(STATUS_OUT_OF_RESOURCES,
                              f"deflated data set inflates beyond "
                              f"{self._max_expanded // DEFLATE_PROCESSING_COPIES // 2**20} MiB "
                              f"(processing holds {DEFLATE_PROCESSING_COPIES} copies of it; "
                              f"[study] max_process_instance_bytes)")
            if keep and len(self._plain) < HEADER_WINDOW:
                self._plain += out[: HEADER_WINDOW - len(self._plain)]
            buf = d.unconsumed_tail
            if not buf and len(out) < _INFLATE_STEP:
                return

    def _try_header(self, *, complete: bool) -> None:
        assert self._ts is not None
        header = parse_header(self._dataset_prefix(), self._ts, complete=complete)
        if header is None:
            if self._dataset_len() >= HEADER_WINDOW:
                raise Refused(STATUS_CANNOT_UNDERSTAND,
                              "StudyInstanceUID not within the first 8 MiB of the data set")
            self._next_parse = max(self._next_parse * 4, self._dataset_len() + 1)
            return
        self._accept_header(header)

    def _accept_header(self, header: Header) -> None:
        # Native pixel data is on the wire byte for byte (and a shorter Pixel Data
        # than declared is refused by the decoders): only max_instance_bytes
        # applies, and an instance over the processing bound is stored but not
        # processed (as documented).  Encapsulated pixel data can declare any size
        # from a few bytes: it is held to what processing may decode.
        bound = self._max if self._ts in NATIVE_SYNTAXES else self._max_expanded
        if header.declared_pixel_bytes > bound:
            raise Refused(STATUS_OUT_OF_RESOURCES,
                          f"declared pixel size {header.declared_pixel_bytes // 2**20} MiB exceeds "
                          f"{bound // 2**20} MiB ([dicom] max_instance_bytes, "
                          f"[study] max_process_instance_bytes for compressed pixel data)")
        self.header = header
        self.pending = self._inbox.begin(header.study_uid, sop_uid=self._sop_uid)
        self.pending.write(self._raw)
        self._raw = bytearray()
        self._plain = bytearray()

    def finish(self) -> tuple[PendingWrite, Header, str]:
        """The complete instance, ready to commit; raises Refused."""
        with self._lock:
            if self.failure is not None:
                raise self.failure
            try:
                if self._ts is None:
                    raise Refused(STATUS_CANNOT_UNDERSTAND, "empty data set")
                if self.pending is None:
                    header = parse_header(self._dataset_prefix(), self._ts, complete=True)
                    assert header is not None
                    self._accept_header(header)
                if self._inflater is not None and not self._inflater.eof:
                    raise Refused(STATUS_CANNOT_UNDERSTAND, "deflated data set is truncated")
                assert self.header is not None
                encoded = self._received - self._meta_end
                if (self._ts == pixelbound.RLE_LOSSLESS
                        and not pixelbound.rle_possible(self.header.declared_pixel_bytes, encoded)):
                    raise Refused(STATUS_CANNOT_UNDERSTAND,
                                  f"{encoded} bytes of RLE data cannot decode to the "
                                  f"{self.header.declared_pixel_bytes} bytes its pixel "
                                  f"description declares")
            except Refused as exc:
                self._fail(exc)
                raise
            assert self.pending is not None and self.header is not None
            pending, self.pending = self.pending, None
            return pending, self.header, self._ts



# -- file meta ------------------------------------------------------------------------
#
# Before the data set, the sink gets the Part 10 file meta group the stored file
# starts with, encoded directly (Explicit VR Little Endian, PS3.10 7.1) rather than
# built as a pydicom FileMetaDataset (which validates every value: a tenth of the
# receiving CPU of a 0.5 MB CT instance), with the transfer syntax handed over as
# a value.


@dataclass(frozen=True)
class MetaFields:
    """The file meta group of a received instance (PS3.10 7.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str
    implementation_version: str

    def encode(self) -> bytes:
        """(0002,0000) .. (0002,0013) in Explicit VR Little Endian, padded per PS3.5."""
        body = (_meta_element(0x0001, b"OB", b"\x00\x01")
                + _meta_element(0x0002, b"UI", _pad(self.sop_class_uid, b"\0"))
                + _meta_element(0x0003, b"UI", _pad(self.sop_instance_uid, b"\0"))
                + _meta_element(0x0010, b"UI", _pad(self.transfer_syntax, b"\0"))
                + _meta_element(0x0012, b"UI", _pad(self.implementation_uid, b"\0"))
                + _meta_element(0x0013, b"SH", _pad(self.implementation_version, b" ")))
        return _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("latin-1", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # long form: 2 reserved bytes, 4-byte length
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

