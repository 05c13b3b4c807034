"""The DICOM front door: a pynetdicom Storage SCP that acks only durable instances.

Every handler maps every failure to a standard DIMSE status and never raises
into pynetdicom.  Association requests are checked against the called AE title
and the allowlist (calling AE bound to peer address and, over DICOM TLS, to the
client certificate subject) before any data flows.  Nothing identifying is
logged: instances are referred to by keyed hashes.

Streaming.  pynetdicom assembles a C-STORE data set in memory, or, with
``STORE_RECV_CHUNKED_DATASET``, in a plaintext temporary file.  Neither is
acceptable (memory grows with the instance; PHI on disk in clear), so the
temporary file pynetdicom asks for is replaced, for our associations only, by
an ``InstanceSink``: P-DATA fragments are handed to it as they arrive; it reads
just the header elements it needs from the first bytes, opens a sealed
(AES-256-GCM) inbox write under the study's data key, and streams the rest
there.  The handler then only fsyncs and indexes.  Memory per association is
one PDU plus at most ``HEADER_WINDOW`` bytes, whatever the instance size.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom import association as _association_mod
from pynetdicom import dul as _dul_mod
from pynetdicom import fsm as _fsm_mod
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent import dimsefast, hookcheck, pixelbound
from agent.config import DicomSettings
from agent.dicomtls import (
    EdgeAssociationServer,
    _read_pdu_bounded,
    _receive_primitive_guarded,
    install_pdu_guard,
    listen_error,
    peer_subject,
    same_subject,
    server_context,
)
from agent.dimsestream import StoreStream
from agent.errors import OutOfResources, StorageError
from agent.ratelimit import AuditThrottle, PeerLimiter, PeerLimits, association_limit
from agent.store.inbox import Inbox, PendingWrite, StoreReceipt

log = logging.getLogger("edge_agent.receive")

# PHI must never reach pynetdicom's own log lines.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

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

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DATASET_MISMATCH = 0xA900
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

# The header elements we need (StudyInstanceUID, SOP class, pixel geometry)
# all precede (0028,0100); a data set that puts more than this many bytes
# before them is refused rather than buffered.
HEADER_WINDOW = 8 << 20
_FIRST_PARSE = 64 << 10
_CAPACITY_EVERY = 64 << 20
_STOP_AFTER = 0x00280100
_INFLATE_STEP = 1 << 20
# Processing a deflated instance holds about three copies of its inflated data set
# (pydicom inflates it into a buffer of its own and reads every value out of it;
# measured 3.1x for 200 MiB, 3.3x for 1 GiB): its inflated size counts this often
# against [study] max_process_instance_bytes.
DEFLATE_PROCESSING_COPIES = 4
_PREAMBLE = b"\0" * 128 + b"DICM"

AuditFn = Callable[..., None]
# How often journaled receipt records move from the inbox to the audit log.
RECEIPT_DRAIN_SECONDS = 0.25


class ReceiptLog(Protocol):
    """Where journaled receipt audit records go (``AuditLog.ingest``)."""

    def ingest(self, journal: str,
               records: Sequence[tuple[int, int, Mapping[str, object]]]) -> int: ...


@dataclass
class ReceiveCounters:
    associations_accepted: int = 0
    associations_rejected: int = 0
    connections_refused: int = 0
    rate_limited: int = 0
    tls_failures: int = 0
    instances_stored: int = 0
    instances_duplicate: int = 0
    instances_failed: int = 0
    out_of_resources: int = 0
    active: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)


def prefer_requestor_order(
    ours: list[PresentationContext], proposed: list[PresentationContext]
) -> list[PresentationContext]:
    """Our contexts with each transfer syntax list re-ordered by the requestor's preference.

    pynetdicom picks the first syntax of *our* list that the requestor proposed.
    A modality proposes the syntax its data is in first (often JPEG, with
    uncompressed fallbacks); choosing uncompressed instead would force it to
    transcode, which lossy data cannot do.  So its order wins.
    """
    wanted: dict[str, list[str]] = {}
    for cx in proposed:
        order = wanted.setdefault(str(cx.abstract_syntax), [])
        order += [str(t) for t in cx.transfer_syntax if str(t) not in order]
    out: list[PresentationContext] = []
    for cx in ours:
        pref = wanted.get(str(cx.abstract_syntax))
        if pref is None:
            out.append(cx)
            continue
        rank = {t: i for i, t in enumerate(pref)}
        # A copy with the list set directly: these UIDs are ours and were checked
        # when our contexts were built; pynetdicom's setter would re-validate
        # every one (12 ms for a storescu association proposing 120 contexts).
        pc = copy.copy(cx)
        pc._transfer_syntax = sorted(cx.transfer_syntax,
                                     key=lambda t: rank.get(str(t), len(rank)))
        out.append(pc)
    return out


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, with every syntax we decode."""
    out: list[PresentationContext] = []
    for cx in AllStoragePresentationContexts:
        pc = PresentationContext()
        pc.abstract_syntax = cx.abstract_syntax
        pc.transfer_syntax = list(TRANSFER_SYNTAXES)
        out.append(pc)
    return out


# -- header parsing ------------------------------------------------------------------


class Refused(Exception):
    """An instance we answer with a failure status (internal to this module)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    study_uid: str
    sop_class: str | None
    declared_pixel_bytes: int


def parse_header(prefix: bytes | memoryview, tsyntax: str, *, complete: bool) -> Header | None:
    """Read the few header elements we need from the first bytes of a data set.

    Returns None when ``prefix`` ends before them and more data may follow.
    Pixel data is never read; reading stops at (0028,0100).
    """
    if tsyntax != _BIG_ENDIAN:
        fast = _fast_header(memoryview(prefix), implicit=tsyntax == _IMPLICIT)
        if fast is not None:
            return fast
    return pydicom_header(prefix, tsyntax, complete=complete)


def pydicom_header(prefix: bytes | memoryview, tsyntax: str, *, complete: bool) -> Header | None:
    """``parse_header`` by pydicom alone: every case, the reference for the fast path."""
    ts = UID(tsyntax)
    stopped = False

    def stop(tag: BaseTag, _vr: str | None, _length: int) -> bool:
        nonlocal stopped
        if tag > _STOP_AFTER:
            stopped = True
            return True
        return False

    try:
        ds = read_dataset(io.BytesIO(prefix), ts.is_implicit_VR, ts.is_little_endian,
                          stop_when=stop)
        if not stopped and not complete:
            return None
        study = ds.get(0x0020000D)
        study_uid = str(study.value).strip() if study is not None and study.value else ""
        sop = ds.get(0x00080016)
        sop_class = str(sop.value).strip() if sop is not None and sop.value else None
        declared = _declared_pixel_bytes(ds)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad input
        if not complete and not stopped:
            return None
        raise Refused(STATUS_CANNOT_UNDERSTAND,
                      f"malformed data set ({type(exc).__name__})") from None
    if not study_uid or len(study_uid) > 64:
        if not stopped and not complete:
            return None
        raise Refused(STATUS_CANNOT_UNDERSTAND, "data set has no valid StudyInstanceUID")
    return Header(study_uid, sop_class, declared)


# -- the common case without pydicom ----------------------------------------------------
#
# Almost every instance is little endian with the header elements at defined
# lengths; walking them by hand costs a fraction of building a pydicom Dataset.
# Anything unusual (undefined lengths before (0028,0100), a VR other than the one
# expected, several values, non-ASCII, a short buffer, a missing or bad study UID)
# returns None and pydicom decides, so both paths give the same answer (a
# hypothesis test compares them).

_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"))
_WANTED = {0x00080016: b"UI", 0x0020000D: b"UI", 0x00280002: b"US", 0x00280008: b"IS",
           0x00280010: b"US", 0x00280011: b"US", 0x00280100: b"US"}
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from


def _fast_header(buf: memoryview, *, implicit: bool) -> Header | None:
    found: dict[int, bytes] = {}
    pos, n = 0, len(buf)
    # pydicom switches to explicit VR when an "implicit" data set's first element
    # looks explicit (two capital letters after the tag): leave that case to it.
    if implicit and n >= 6 and 0x40 < buf[4] < 0x5B and 0x40 < buf[5] < 0x5B:
        return None
    while True:
        if pos + 8 > n:
            return None  # ran out before (0028,0100): let pydicom say what it is
        group, elem = _UNPACK_TAG(buf, pos)
        tag = group << 16 | elem
        if tag > _STOP_AFTER:
            break
        if implicit:
            (length,) = _UNPACK_U32(buf, pos + 4)
            start = pos + 8
            vr = _WANTED.get(tag)
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    return None
                (length,) = _UNPACK_U32(buf, pos + 8)
                start = pos + 12
            elif vr in _SHORT_VRS:
                (length,) = _UNPACK_U16(buf, pos + 6)
                start = pos + 8
            else:
                return None
        if length == 0xFFFFFFFF:
            return None
        if tag in _WANTED:
            if vr != _WANTED[tag] or start + length > n:
                return None
            found[tag] = bytes(buf[start:start + length])
        elif tag == 0x00080005:
            if start + length > n or not _charset_ok(bytes(buf[start:start + length]), vr,
                                                     implicit):
                return None
        pos = start + length
    study = _text(found.get(0x0020000D))
    sop = _text(found.get(0x00080016))
    if not study or len(study) > 64 or (0x00080016 in found and sop is None):
        return None
    try:
        rows, cols = _us(found, 0x00280010), _us(found, 0x00280011)
        spp, bits = _us(found, 0x00280002), _us(found, 0x00280100)
        frames_text = _text(found.get(0x00280008)) if 0x00280008 in found else ""
    except ValueError:
        return None
    if frames_text is None or (frames_text and not frames_text.lstrip("+-").isdigit()):
        return None
    if rows is None or cols is None:
        declared = 0
    else:
        frames = int(frames_text) if frames_text else 1
        declared = pixelbound.geometry_bytes(rows, cols, spp or 1, bits or 8, frames)
    return Header(study, sop or None, declared)


def _charset_ok(raw: bytes, vr: bytes | None, implicit: bool) -> bool:
    """pydicom converts (0008,0005) while reading the header and may fail on it:
    run the same conversion, and let pydicom decide if it fails."""
    try:
        elem = RawDataElement(BaseTag(0x00080005), None if implicit or vr is None else vr.decode(),
                              len(raw), raw, 0, implicit, True)
        convert_encodings(convert_raw_data_element(elem).value)
    except Exception:  # noqa: BLE001 - whatever pydicom raises, it decides
        return False
    return True


def _text(raw: bytes | None) -> str | None:
    """A single ASCII value as pydicom would read it; None when pydicom must decide."""
    if raw is None:
        return ""
    if b"\\" in raw or not raw.isascii():
        return None
    return raw.decode("ascii").rstrip("\0 ").strip()


def _us(found: dict[int, bytes], tag: int) -> int | None:
    raw = found.get(tag)
    if raw is None or raw == b"":
        return None
    if len(raw) != 2:
        raise ValueError("not a single US value")
    return int(_UNPACK_U16(raw, 0)[0])


def _declared_pixel_bytes(ds: Dataset) -> int:
    """Decoded size the pixel description promises (what a decoder will allocate)."""
    rows, cols = ds.get(0x00280010), ds.get(0x00280011)
    if rows is None or cols is None or rows.value is None or cols.value is None:
        return 0
    spp = ds.get(0x00280002)
    bits = ds.get(0x00280100)
    frames = ds.get(0x00280008)
    n_frames = int(frames.value) if frames is not None and frames.value not in (None, "") else 1
    return pixelbound.geometry_bytes(
        int(rows.value), int(cols.value), int(spp.value if spp is not None and spp.value else 1),
        int(bits.value if bits is not None and bits.value else 8), n_frames)


# -- streaming sink --------------------------------------------------------------------


class InstanceSink:
    """The file-like pynetdicom writes a C-STORE data set into, fragment by fragment.

    pynetdicom calls ``write`` (first the Part 10 preamble and file meta, then
    the data set bytes), ``file.flush`` and finally ``close``.  ``write`` runs
    in the association's DUL thread and never raises: a failure switches the
    sink to discarding, and the C-STORE handler answers the recorded status.
    """

    def __init__(self, inbox: Inbox, max_bytes: int, name: str) -> None:
        self.name = name  # pynetdicom unlinks this after the handler: it never exists
        self.file = self
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

    # pynetdicom's file protocol ------------------------------------------------------

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
                except Exception as exc:  # noqa: BLE001 - runs in pynetdicom's DUL thread
                    log.exception("streaming an instance failed")
                    self._fail(Refused(STATUS_PROCESSING_FAILURE,
                                       f"internal error ({type(exc).__name__})"))
        return len(data)

    def write_meta(self, meta: MetaFields) -> None:
        """The file meta group, from pynetdicom's fields (no parse back needed)."""
        encoded = meta.encode()
        with self._lock:
            if self.failure is None and self._ts is None and bytes(self._raw) == _PREAMBLE:
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
        """Find the transfer syntax in the file meta pynetdicom wrote first."""
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


_real_named_temporary_file = getattr(dimse_messages, "NamedTemporaryFile")  # noqa: B009
_streaming_lock = threading.Lock()


def _sink_factory(*args: Any, **kwargs: Any) -> Any:
    """Stands in for NamedTemporaryFile inside pynetdicom's C-STORE decoding."""
    if _our_association():
        thread = threading.current_thread()
        assert isinstance(thread, DULServiceProvider)
        owner = getattr(thread.assoc._server, "edge_owner")  # noqa: B009 - set by configure
        return owner.new_sink(thread.assoc)
    return _real_named_temporary_file(*args, **kwargs)


# -- file meta for our sinks ------------------------------------------------------------
#
# Before the data set, pynetdicom writes a Part 10 file meta group into the file it
# got from NamedTemporaryFile: it builds a FileMetaDataset (validating every value)
# and writes it with pydicom's general writer, and the sink then parsed it back to
# learn the transfer syntax.  For a 0.5 MB CT instance that was a tenth of the
# receiving CPU.  For our sinks the same bytes are encoded directly (Explicit VR
# Little Endian, PS3.10 7.1) and the transfer syntax handed over as a value.

_real_create_file_meta = getattr(dimse_messages, "create_file_meta")  # noqa: B009
_real_write_file_meta_info = getattr(dimse_messages, "write_file_meta_info")  # noqa: B009


@dataclass(frozen=True)
class MetaFields:
    """What pynetdicom's ``create_file_meta`` would put in the file meta group."""

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


def _our_association() -> bool:
    thread = threading.current_thread()
    if not isinstance(thread, DULServiceProvider):
        return False
    owner = getattr(getattr(thread.assoc, "_server", None), "edge_owner", None)
    return isinstance(owner, StorageSCP)


def _create_file_meta(**kwargs: Any) -> Any:
    if _our_association():
        return MetaFields(
            str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]),
            str(kwargs["transfer_syntax"]),
            str(kwargs.get("implementation_uid", PYNETDICOM_IMPLEMENTATION_UID)),
            str(kwargs.get("implementation_version", PYNETDICOM_IMPLEMENTATION_VERSION)))
    return _real_create_file_meta(**kwargs)


def _write_file_meta_info(fp: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(meta, MetaFields):
        if isinstance(fp, InstanceSink):
            fp.write_meta(meta)
            return
        meta = _real_create_file_meta(  # not our sink after all: pynetdicom's own path
            sop_class_uid=UID(meta.sop_class_uid), sop_instance_uid=UID(meta.sop_instance_uid),
            transfer_syntax=UID(meta.transfer_syntax))
    _real_write_file_meta_info(fp, meta, *args, **kwargs)


def install_streaming() -> None:
    """Route C-STORE data sets of our associations into InstanceSinks, and put
    every other hook in place (idempotent); InstallError when one did not take."""
    with _streaming_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom creates the C-STORE temporary file and its file meta through
        # these module-level names.
        setattr(dimse_messages, "NamedTemporaryFile", _sink_factory)  # noqa: B010
        setattr(dimse_messages, "create_file_meta", _create_file_meta)  # noqa: B010
        setattr(dimse_messages, "write_file_meta_info", _write_file_meta_info)  # noqa: B010
        dimsefast.install()
        _install_wakeups()
    install_pdu_guard()
    hookcheck.verify(hooks())


def hooks() -> list[hookcheck.Hook]:
    """Every replacement the node makes in pynetdicom, and who must reach it."""
    decode_msg = dimse_messages.DIMSEMessage.decode_msg
    encode_msg = dimse_messages.DIMSEMessage.encode_msg
    Hook, is_ = hookcheck.Hook, hookcheck.is_
    return [
        Hook("C-STORE data set sink (else a plaintext temporary file)", dimse_messages,
             "NamedTemporaryFile", is_(_sink_factory), (decode_msg,), module_global=True),
        Hook("C-STORE data set sink", _config, "STORE_RECV_CHUNKED_DATASET", is_(True),
             (decode_msg,)),
        Hook("file meta of streamed instances", dimse_messages, "create_file_meta",
             is_(_create_file_meta), (decode_msg,), module_global=True),
        Hook("file meta of streamed instances", dimse_messages, "write_file_meta_info",
             is_(_write_file_meta_info), (decode_msg,), module_global=True),
        Hook("command set encoder", dimse_messages, "encode", is_(dimsefast._encode),
             (encode_msg,), module_global=True),
        Hook("PDU reader (length bounds, deadlines, context checks)", DULServiceProvider,
             "_read_pdu_data", is_(_read_pdu_bounded),
             (DULServiceProvider._is_transport_event,)),
        Hook("DIMSE decoding guard (an undecodable message aborts, no thread dies)",
             DIMSEServiceProvider, "receive_primitive", is_(_receive_primitive_guarded),
             (_fsm_mod.DT_2, _fsm_mod.AR_6)),
        Hook("DUL reactor wake-ups", _dul_mod, "time",
             lambda v: isinstance(v, _WakingTime), (DULServiceProvider.run_reactor,),
             module_global=True),
        Hook("DUL reactor wake-ups", _dul_mod, "queue",
             lambda v: isinstance(v, _QueueModule), (DULServiceProvider.__init__,),
             module_global=True),
        Hook("association reactor wake-ups", _association_mod, "time",
             lambda v: isinstance(v, _WakingTime), (Association._run_reactor,),
             module_global=True),
        Hook("DUL send wake-up", DULServiceProvider, "send_pdu", is_(_send_pdu_waking)),
        Hook("no identifiers in pynetdicom's log", _config, "LOG_REQUEST_IDENTIFIERS",
             is_(False)),
        Hook("no identifiers in pynetdicom's log", _config, "LOG_RESPONSE_IDENTIFIERS",
             is_(False)),
        Hook("no identifiers in pynetdicom's log", _config, "LOG_HANDLER_LEVEL",
             lambda v: v == "none"),
    ]


# -- reactor wake-ups ----------------------------------------------------------------
#
# pynetdicom's two reactors poll: the DUL thread sleeps 1 ms whenever a loop found
# nothing to do, and the association thread sleeps 1 ms before every look at the
# DIMSE queue.  One C-STORE crosses both several times, so up to ~3 ms of each
# round trip was spent asleep (a quarter of it for a 0.5 MB CT instance).  The
# ``time`` these modules see is replaced by one whose reactor sleeps end early when
# there is something to do: socket data or a primitive to send (DUL), a decoded
# message (association).  The DUL's timeout stays 1 ms, so every check it makes
# between sleeps (timers, kill flags) runs at least as often as before; the
# association thread's is lengthened, see ``_ASSOC_IDLE``.

_REACTOR_SLEEP = 0.001


class _WakingTime:
    """The ``time`` module, except that the reactors' idle sleep wakes on work."""

    def __init__(self) -> None:
        self._real = time

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if seconds == _REACTOR_SLEEP:
            thread = threading.current_thread()
            try:
                if isinstance(thread, DULServiceProvider):
                    if _dul_wait(thread, seconds):
                        return
                elif isinstance(thread, Association) and _serves_ours(thread):
                    _assoc_wait(thread, seconds)
                    return
            except (OSError, ValueError, AttributeError):
                pass  # a socket closing under us: fall back to the plain sleep
        self._real.sleep(seconds)


def _dul_wait(dul: DULServiceProvider, seconds: float) -> bool:
    """Sleep until socket data, a queued primitive or the timeout; False if not possible."""
    assoc_sock = dul.socket
    raw = getattr(assoc_sock, "socket", None)
    if raw is None or not getattr(assoc_sock, "_is_connected", False):
        return False
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True
    fd = getattr(dul, "_edge_wake_fd", None)
    if fd is None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(dul, os.close, fd)
        setattr(dul, "_edge_wake_fd", fd)  # noqa: B010 - pynetdicom object
    if dul.to_provider_queue.queue:
        return True
    ready, _, _ = select.select([raw, fd], [], [], seconds)
    if fd in ready:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
    return True


# The association thread also polls the DUL's to_user_queue (release and abort
# indications).  Once that queue wakes it too (``_WakingQueue``), the thread can
# sleep until there is work: with C-STOREs served in the DUL thread
# (dimsestream) it would otherwise spin a thousand times a second for nothing.
# What is left to notice by polling (a kill from another thread, a dead DUL
# thread) is noticed within this many seconds.
_ASSOC_IDLE = 0.05


class _WakingQueue(queue.Queue[Any]):
    """queue.Queue whose ``put`` also runs ``edge_wake`` (the association's waker)."""

    edge_wake: Callable[[], None] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        wake = self.edge_wake
        if wake is not None:
            wake()


class _QueueModule:
    """The ``queue`` module as pynetdicom's DUL sees it: its queues can wake."""

    Queue = _WakingQueue
    Empty = queue.Empty
    Full = queue.Full


def _serves_ours(assoc: Association) -> bool:
    """An acceptor of our SCP: nothing but its reactor takes from its DIMSE queue.

    (A requestor's user thread blocks in ``msg_queue.get``: a second waiter on
    that condition could take the one notification its response brings.)"""
    return assoc.is_acceptor and isinstance(
        getattr(getattr(assoc, "_server", None), "edge_owner", None), StorageSCP)


def _assoc_wait(assoc: Association, seconds: float) -> None:
    q = assoc.dimse.msg_queue
    user_q = assoc.dul.to_user_queue
    idle = seconds
    if isinstance(user_q, _WakingQueue):
        if user_q.edge_wake is None:
            def wake() -> None:
                with q.not_empty:
                    q.not_empty.notify_all()
            user_q.edge_wake = wake
        idle = _ASSOC_IDLE
    with q.not_empty:
        # Both checked under the lock ``wake`` takes: no wake-up falls between.
        if not q.queue and not user_q.queue:
            q.not_empty.wait(idle)


_real_send_pdu = DULServiceProvider.send_pdu


def _send_pdu_waking(self: DULServiceProvider, primitive: Any) -> None:
    _real_send_pdu(self, primitive)
    fd = getattr(self, "_edge_wake_fd", None)
    if fd is not None:
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass


def _install_wakeups() -> None:
    if not isinstance(getattr(_dul_mod, "time"), _WakingTime):  # noqa: B009
        clock = _WakingTime()
        setattr(_dul_mod, "time", clock)  # noqa: B010
        setattr(_dul_mod, "queue", _QueueModule())  # noqa: B010
        setattr(_association_mod, "time", clock)  # noqa: B010
        setattr(DULServiceProvider, "send_pdu", _send_pdu_waking)  # noqa: B010


# -- journaled receipt records -------------------------------------------------------


class ReceiptDrainer:
    """Moves audit records journaled in the inbox to the audit log, in batches.

    ``eager``: delete drained rows at once instead of folding the delete into
    the next instance's transaction (when other processes do the journaling).
    """

    def __init__(self, inbox: Inbox, receipts: ReceiptLog, *, eager: bool = False) -> None:
        self.inbox = inbox
        self.receipts = receipts
        self.eager = eager
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicom-receipts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self.wake.set()
            self._thread.join(timeout=30)
            self._thread = None

    def drain(self, *, idle: bool = False) -> int:
        """Move journaled records to the audit log; returns how many."""
        moved = 0
        while True:
            batch = self.inbox.pending_receipts(1000)
            if not batch:
                break
            upto = self.receipts.ingest("inbox", batch)
            self.inbox.drop_receipts(upto, now=self.eager)
            moved += len(batch)
            if len(batch) < 1000:
                break
        if idle or moved == 0:
            self.inbox.drop_receipts(0, now=True)
        return moved

    def _loop(self) -> None:
        # Leftovers of a crash are drained first (the audit log dedupes by id).
        failures = 0
        while True:
            stopping = self._stop.is_set()
            try:
                self.drain(idle=stopping)
                failures = 0
            except Exception:  # noqa: BLE001 - the journal keeps them; retried next round
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.exception("moving receipt records to the audit log failed (%d)", failures)
            if stopping:
                return
            self.wake.wait(RECEIPT_DRAIN_SECONDS)
            self.wake.clear()


@dataclass(frozen=True)
class Verdict:
    """What the main process decided about a connection's association request."""

    rate_ok: bool  # within the peer's associations-per-minute
    limit: str | None  # why the association bounds refuse it (agent.ratelimit), or None


Admission = Callable[[str, int], Verdict]


# -- the SCP -------------------------------------------------------------------------------


class StorageSCP:
    """Owns the pynetdicom AE and its listeners; hands durable instances to the inbox."""

    def __init__(
        self,
        settings: DicomSettings,
        inbox: Inbox,
        *,
        audit: AuditFn,
        on_stored: Callable[[StoreReceipt], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
        receipts: ReceiptLog | None = None,
        journal_receipts: bool = False,
        admission: Admission | None = None,
        on_ended: Callable[[str, int], None] | None = None,
        hold: Callable[[], str | None] | None = None,
    ) -> None:
        """``receipts``: when given, the audit record of each stored instance is
        journaled in the inbox's index transaction and moved to it in batches by
        a drainer thread, instead of a synchronous ``audit`` call (a third fsync)
        before Success.  ``journal_receipts`` journals them without draining
        (a receive worker: the main process drains).  ``admission`` replaces the
        per-peer rate and association-count checks, for a worker whose
        connections were counted by the main process at accept.  ``hold``: asked
        before an association and a C-STORE; a reason refuses them (0xA700), e.g.
        ``AuditLog.intake_hold`` while the audit trail cannot record."""
        self.s = settings
        self.hold = hold
        self.inbox = inbox
        self.audit = audit
        self.on_stored = on_stored or (lambda _r: None)
        self.accepting = accepting
        self.counters = ReceiveCounters()
        self._lock = threading.Lock()
        self._servers: list[EdgeAssociationServer] = []
        self._sink_seq = 0
        self.direct_stores = 0  # C-STOREs served by dimsestream (the rest: pynetdicom)
        self._refusals = AuditThrottle()
        self.journal_receipts = journal_receipts or receipts is not None
        self.drainer = ReceiptDrainer(inbox, receipts) if receipts is not None else None
        self.admission = admission
        self.on_ended = on_ended
        self.limiter = PeerLimiter(PeerLimits(
            max_connections_per_peer=settings.max_associations_per_peer + 2,
            max_connections=settings.max_associations * 2,
            associations_per_minute_per_peer=settings.associations_per_minute_per_peer,
        ))
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.max_pdu
        # pynetdicom counts every acceptor thread against its maximum, including
        # connections that have not sent an A-ASSOCIATE-RQ yet: a few half-open
        # connections would have every association refused.  The association
        # bounds are ours (_on_requested, agent/ratelimit.py, counted on accepted
        # associations), the connection bounds the listener's: this one never binds.
        ae.maximum_associations = 1 << 16
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        ae.require_called_aet = True
        ae.supported_contexts = storage_contexts()
        ae.add_supported_context(Verification)
        self.ae = ae
        install_streaming()

    # -- lifecycle ---------------------------------------------------------------

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    def start(self) -> None:
        if self.drainer is not None:
            self.drainer.start()
        handlers = self.handlers()
        tls = self.s.tls
        if not tls.enabled or tls.plain_listener:
            self._listen(self.s.port, None, handlers)
            log.info("DICOM listening on %s:%d as %s", self.s.host, self.s.port, self.s.ae_title)
        if tls.enabled:
            assert tls.cert is not None and tls.key is not None and tls.ca is not None
            ctx = server_context(tls.cert, tls.key, tls.ca,
                                 require_client_cert=tls.require_client_cert)
            self._listen(tls.port, ctx, handlers)
            log.info("DICOM TLS listening on %s:%d (client certificate %s)", self.s.host,
                     tls.port, "required" if tls.require_client_cert else "optional")

    def _listen(self, port: int, ctx: Any, handlers: list[Any]) -> None:
        try:
            server = self.ae.make_server((self.s.host, port), evt_handlers=handlers,
                                         server_class=EdgeAssociationServer)
        except OSError as exc:
            raise listen_error(self.s.host, port, exc) from None
        assert isinstance(server, EdgeAssociationServer)
        server.configure(limiter=self.limiter, tls=ctx, handshake_timeout=self.s.acse_timeout,
                         pdu_timeout=self.s.pdu_timeout, on_refused=self._refused_connection,
                         owner=self)
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"dicom-accept-{port}",
                         daemon=True).start()
        self._servers.append(server)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers = []
        if self.drainer is not None:
            self.drainer.stop()

    def drain_receipts(self, *, idle: bool = False) -> int:
        assert self.drainer is not None
        return self.drainer.drain(idle=idle)

    def new_sink(self, assoc: Any) -> InstanceSink:
        with self._lock:
            self._sink_seq += 1
            name = str(self.inbox.tmp / f"sink-{self._sink_seq}.none")
        sink = InstanceSink(self.inbox, self.s.max_instance_bytes, name)
        sinks = getattr(assoc, "_edge_sinks", None)
        if sinks is None:
            sinks = []
            setattr(assoc, "_edge_sinks", sinks)  # noqa: B010 - pynetdicom object, no slot
        # Keep only sinks still in flight; finished ones were closed by pynetdicom.
        sinks[:] = [s for s in sinks if s.pending is not None or s.header is None][-4:]
        sinks.append(sink)
        return sink

    # -- admission -------------------------------------------------------------------

    def _refused_connection(self, addr: str, why: str) -> None:
        """A connection closed before any association (limits, TLS): count and audit."""
        with self._lock:
            self.counters.connections_refused += 1
            if why.startswith("TLS"):
                self.counters.tls_failures += 1
        audit_refused(self.audit, self._refusals, addr, why)

    def _peer(self, event: evt.Event) -> tuple[str, str]:
        return _peer_of(event.assoc)

    def _served_direct(self) -> None:
        with self._lock:
            self.direct_stores += 1

    def _reject(self, event: evt.Event, result: int, source: int, diag: int, why: str) -> None:
        ae_title, addr = self._peer(event)
        with self._lock:
            self.counters.associations_rejected += 1
        # Audited before the peer hears of it: the record never trails the rejection.
        self.audit("association.rejected", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "reason": why,
                            "result": result, "source": source, "diagnostic": diag})
        log.warning("rejected association from %s (%s): %s", addr, ae_title, why)
        event.assoc.acse.send_reject(result, source, diag)
        event.assoc.is_rejected = True
        event.assoc.kill()

    def _allowed(self, ae_title: str, addr: str, event: evt.Event) -> bool:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        subject = peer_subject(sock)
        subject_text = subject.rfc4514_string() if subject is not None else None
        for rule in self.s.peers:
            wanted = rule.certificate_subject
            if wanted is not None and same_subject(wanted, subject):
                if rule.allows(ae_title, addr, wanted):
                    return True
            elif rule.allows(ae_title, addr, subject_text):
                return True
        return False

    def _on_requested(self, event: evt.Event) -> None:
        try:
            ae_title, addr = self._peer(event)
            prim = event.assoc.requestor.primitive
            called = str(prim.called_ae_title if prim is not None else "").strip()
            if called != self.s.ae_title:
                self._reject(event, 0x01, 0x01, 0x07, "called AE title not recognised")
                return
            if not self._allowed(ae_title, addr, event):
                self._reject(event, 0x01, 0x01, 0x03,
                             "calling AE title/address not allowed")
                return
            if not self.accepting():
                self._reject(event, 0x02, 0x03, 0x01, "not accepting (shutting down)")
                return
            held = self.hold() if self.hold is not None else None
            if held is not None:
                self._reject(event, 0x02, 0x03, 0x02, held)
                return
            port = int(event.assoc.requestor.port or 0)
            verdict = self.admission(addr, port) if self.admission is not None else None
            if not (verdict.rate_ok if verdict is not None
                    else self.limiter.allow_association(addr)):
                with self._lock:
                    self.counters.rate_limited += 1
                self._reject(event, 0x02, 0x03, 0x01, "association rate limit for this peer")
                return
            try:
                self.inbox.check_capacity()
            except OutOfResources as exc:
                with self._lock:
                    self.counters.out_of_resources += 1
                self._reject(event, 0x02, 0x03, 0x02,
                             f"out of resources: {str(exc).splitlines()[0]}")
                return
            with self._lock:
                per_peer = self.counters.by_peer.get(addr, 0)
                why = verdict.limit if verdict is not None else association_limit(
                    per_peer, self.counters.active, per_peer=self.s.max_associations_per_peer,
                    max_total=self.s.max_associations)
                if why is None:
                    self.counters.by_peer[addr] = per_peer + 1
                    self.counters.active += 1
                    self.counters.associations_accepted += 1
            if why is not None:
                self._reject(event, 0x02, 0x03, 0x02, why)
                return
            setattr(event.assoc, "_edge_counted", True)  # noqa: B010
            server = getattr(event.assoc, "_server", None)
            if isinstance(server, EdgeAssociationServer):
                server.edge_limiter.associated(addr, (addr, port))  # no longer evictable
            if self.s.fast_store:
                # C-STOREs of this association are served from its PDU stream
                # (agent/dimsestream.py); dicomtls's PDU reader calls it.
                assoc = event.assoc
                setattr(assoc, "_edge_pdata",  # noqa: B010 - pynetdicom object
                        StoreStream(_DirectStore(self, assoc), self._served_direct,
                                    lambda why: self._aborted(assoc, why)))
            if prim is not None and prim.presentation_context_definition_list:
                acceptor = event.assoc.acceptor
                acceptor.supported_contexts = prefer_requestor_order(
                    acceptor.supported_contexts, prim.presentation_context_definition_list)
            self.audit("association.accepted", source=addr, details={
                "calling_ae": ae_title, "tls": peer_subject(
                    getattr(getattr(event.assoc.dul, "socket", None), "socket", None)) is not None,
            })
        except Exception:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("association check failed; rejecting")
            try:
                event.assoc.acse.send_reject(0x02, 0x01, 0x01)
                event.assoc.is_rejected = True
            except Exception:  # noqa: BLE001
                pass

    def _on_closed(self, event: evt.Event) -> None:
        self.association_over(event.assoc)

    def association_over(self, assoc: Any) -> None:
        """Release what an association held (idempotent).  pynetdicom's close events
        call it, and so does the connection's handler once the association thread
        ended, whatever ended it (a thread that died of an exception fires no
        event, and its slot would stay taken for good)."""
        try:
            stream = getattr(assoc, "_edge_pdata", None)
            if isinstance(stream, StoreStream):
                stream.close()
            for sink in getattr(assoc, "_edge_sinks", ()):
                sink.close()
            if self.on_ended is not None:
                req = assoc.requestor
                self.on_ended(str(req.address), int(req.port or 0))
            with self._lock:
                if not getattr(assoc, "_edge_counted", False):
                    return
                setattr(assoc, "_edge_counted", False)  # noqa: B010
                _, addr = _peer_of(assoc)
                self.counters.active -= 1
                n = self.counters.by_peer.get(addr, 1) - 1
                if n <= 0:
                    self.counters.by_peer.pop(addr, None)
                else:
                    self.counters.by_peer[addr] = n
        except Exception:  # noqa: BLE001
            log.exception("association close bookkeeping failed")

    def connection_stalled(self, assoc: Any, why: str) -> None:
        """A PDU missed its deadline (dicomtls drops the connection)."""
        stream = getattr(assoc, "_edge_pdata", None)
        if isinstance(stream, StoreStream):
            stream.interrupted(why)  # a C-STORE in progress is audited as aborted
        if not getattr(assoc, "_edge_counted", False):
            self._refused_connection(str(assoc.requestor.address), why)

    def connection_evicted(self, peer: str, why: str) -> None:
        self._refused_connection(peer, why)

    # -- DIMSE -----------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        ae_title, addr = self._peer(event)
        sink = getattr(event.request, "_dataset_file", None)
        req: Any = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        context_class = str(getattr(event.context, "abstract_syntax", "") or "")
        if sop_class != context_class:
            # pynetdicom picks the service by the request's SOP class, not by the
            # context it came on: an MR instance on a context accepted for CT
            # only would be stored.  PS3.7 9.1.1.1.9: the SOP class must be the
            # context's abstract syntax.
            if isinstance(sink, InstanceSink):
                sink.close()
            return self._fail(STATUS_SOP_CLASS_NOT_SUPPORTED,
                              f"SOP class {sop_class or '(none)'} was not accepted on "
                              f"presentation context {event.context.context_id}", addr, ae_title)
        return self.store_streamed(sink, sop_class,
                                   str(req.AffectedSOPInstanceUID or "").strip(), ae_title, addr)

    def store_streamed(self, sink: object, sop_class: str, sop_uid: str, ae_title: str,
                       addr: str) -> int:
        """Commit an instance streamed into ``sink``; the C-STORE status (never raises).

        Shared by pynetdicom's C-STORE event and the direct path (dimsestream)."""
        try:
            if not isinstance(sink, InstanceSink):
                raise Refused(STATUS_PROCESSING_FAILURE, "data set was not streamed")
            if not sop_uid or len(sop_uid) > 64:
                raise Refused(STATUS_CANNOT_UNDERSTAND, "no valid Affected SOP Instance UID")
            pending, header, tsyntax = sink.finish()
            try:
                held = self.hold() if self.hold is not None else None
                if held is not None:
                    raise Refused(STATUS_OUT_OF_RESOURCES, held)
                if header.sop_class is not None and header.sop_class != sop_class:
                    raise Refused(STATUS_DATASET_MISMATCH,
                                  "data set SOP class differs from the C-STORE request")
                receipt = self.inbox.commit(
                    pending, sop_uid=sop_uid, sop_class=sop_class, transfer_syntax=tsyntax,
                    calling_ae=ae_title, peer=addr,
                    audit=_receipt_record(addr, ae_title) if self.journal_receipts else None)
            finally:
                pending.abort()
        except Refused as exc:
            if exc.status == STATUS_OUT_OF_RESOURCES:
                with self._lock:
                    self.counters.out_of_resources += 1
            return self._fail(exc.status, exc.reason, addr, ae_title)
        except OutOfResources as exc:
            with self._lock:
                self.counters.out_of_resources += 1
            return self._fail(STATUS_OUT_OF_RESOURCES, str(exc).splitlines()[0], addr, ae_title)
        except StorageError as exc:
            return self._fail(STATUS_OUT_OF_RESOURCES, f"storage failed: {exc}", addr, ae_title)
        except Exception as exc:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("C-STORE handler failed")
            return self._fail(STATUS_PROCESSING_FAILURE, f"internal error ({type(exc).__name__})",
                              addr, ae_title)
        ref = receipt.instance.instance_key[:12]
        with self._lock:
            if receipt.outcome == "duplicate":
                self.counters.instances_duplicate += 1
            else:
                self.counters.instances_stored += 1
        if not self.journal_receipts:
            rec = _receipt_record(addr, ae_title)(receipt)
            self.audit(rec["event"], source=addr, details=rec["details"])
        log.info("stored instance %s of study %s v%d (%s) from %s",
                 ref, receipt.instance.study_key[:12], receipt.study_version, receipt.outcome,
                 ae_title)
        try:
            self.on_stored(receipt)
        except Exception:  # noqa: BLE001
            log.exception("on_stored hook failed")
        return STATUS_SUCCESS

    def _aborted(self, assoc: Any, why: str) -> None:
        """A C-STORE cut short by the peer's protocol breach (the association is aborted)."""
        ae_title, addr = _peer_of(assoc)
        with self._lock:
            self.counters.instances_failed += 1
        self.audit("instance.received", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "status": "aborted",
                            "reason": f"association aborted: {why}"})

    def _fail(self, status: int, why: str, addr: str, ae_title: str) -> int:
        with self._lock:
            self.counters.instances_failed += 1
        self.audit("instance.received", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "status": f"0x{status:04X}", "reason": why})
        log.warning("C-STORE from %s (%s) answered 0x%04X: %s", addr, ae_title, status, why)
        return status


def _peer_of(assoc: Any) -> tuple[str, str]:
    """(calling AE title, address) of an association's requestor."""
    req = assoc.requestor
    # During EVT_REQUESTED pynetdicom has not copied the title from the
    # A-ASSOCIATE-RQ primitive yet, so read it from there.
    prim = req.primitive
    title = prim.calling_ae_title if prim is not None else req.ae_title
    return str(title).strip(), str(req.address)


class _DirectStore:
    """What dimsestream needs of the storage SCP, for one association."""

    def __init__(self, scp: StorageSCP, assoc: Any) -> None:
        self._scp = scp
        self._assoc = assoc

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> InstanceSink:
        sink = self._scp.new_sink(self._assoc)
        # The same Part 10 head pynetdicom writes before the data set.
        sink.write(_PREAMBLE)
        sink.write_meta(MetaFields(sop_class, sop_instance, transfer_syntax,
                                   PYNETDICOM_IMPLEMENTATION_UID,
                                   PYNETDICOM_IMPLEMENTATION_VERSION))
        return sink

    def finish(self, sink: object, sop_class: str, sop_instance: str) -> int:
        ae_title, addr = _peer_of(self._assoc)
        return self._scp.store_streamed(sink, sop_class, sop_instance, ae_title, addr)


def audit_refused(audit: AuditFn, throttle: AuditThrottle, peer: str, why: str) -> None:
    """Audit a connection refused before any association; log it throttled per peer.

    Every refusal goes to the audit log, which counts repeats into summary
    records (agent/audit/summary.py): throttling here lost them uncounted."""
    audit("association.rejected", outcome="minor_failure", source=peer,
          details={"reason": why})
    if throttle.due(peer, why):
        log.warning("refused connection from %s: %s", peer, why)


def _receipt_record(addr: str, ae_title: str) -> Callable[[StoreReceipt], dict[str, Any]]:
    """The audit record of a stored instance (pseudonymous references only)."""

    def build(receipt: StoreReceipt) -> dict[str, Any]:
        event = {"stored": "instance.received", "duplicate": "instance.duplicate",
                 "conflict": "instance.conflict"}[receipt.outcome]
        return {"event": event, "outcome": "success", "source": addr,
                "details": {"calling_ae": ae_title, "instance": receipt.instance.instance_key[:12],
                            "study": receipt.instance.study_key[:12],
                            "version": receipt.study_version, "bytes": receipt.instance.size}}

    return build
