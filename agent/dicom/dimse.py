"""DIMSE messages on the P-DATA stream of one association (PS3.7, PS3.8 Annex E).

Owns: the P-DATA-TF and command set codec, and ``DimseLayer``, which turns the
presentation data values of an association into messages, one operation at a
time (we negotiate no asynchronous operations window):

* C-STORE-RQ: the data set fragments are streamed, as they arrive, into the
  sink the store service opens (the encrypted inbox); the store service
  decides the status once the last fragment is in; the C-STORE-RSP follows;
* any other request: looked up in a ``HandlerRegistry`` by command field and
  the abstract syntax of its presentation context (C-ECHO is registered by
  default); its command and its small data set (decoded with pydicom) go to
  the handler, which returns a status and an optional reply data set.  This is
  where Storage Commitment (N-ACTION/N-EVENT-REPORT: agent.dicom.commitment and
  agent.dicom.commitment_scp) and MPPS (N-CREATE/N-SET: agent.dicom.mpps) are
  added.  A request without a handler is answered 0x0211 (unrecognised
  operation) once its data set is in;
* a handler's reply may carry an ``EventReport``: a request the node sends on the
  same association right after the response (Storage Commitment's
  N-EVENT-REPORT).  Its response is matched by Message ID; when the association
  ends before the peer answered it (the peer released at once, or went away),
  its ``undelivered`` callback runs (the report then goes on a new association);
* whatever cannot be framed as a response (a malformed PDV, a command set that
  cannot be read, a response although we sent no request, a fragment out of
  order, a response to nothing we sent) is a ``Breach``: the acceptor aborts the
  association.

Handlers never raise into the acceptor (a failure is answered 0x0110).
May import pydicom, agent.dicom.negotiation and agent.dicom.status.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from agent.dicom.negotiation import VERIFICATION, Accepted
from agent.dicom.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_UNRECOGNISED_OPERATION,
)

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
N_EVENT_REPORT_RQ = 0x0100
N_SET_RQ = 0x0120
N_ACTION_RQ = 0x0130
N_CREATE_RQ = 0x0140
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101
# A command set is a few hundred bytes; a data set for a registered handler is a
# small identifier or action information.  Larger ones are not buffered.
MAX_COMMAND_SET = 64 << 10
MAX_SMALL_DATA_SET = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"

_ITEM = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_PDU = struct.Struct(">BBL")
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class Breach(Exception):
    """The peer broke the DIMSE protocol in a way no response can answer."""


# -- codec --------------------------------------------------------------------------------


def iter_pdvs(pdu: memoryview) -> Iterator[tuple[int, int, int, int]] | None:
    """(context ID, control header, data start, data end) of each PDV of a P-DATA-TF.

    None when the PDU is not a well-formed P-DATA-TF (PS3.8 9.3.5): its items
    must fill it exactly and each must carry at least the two header bytes.
    """
    if len(pdu) < 6 or pdu[0] != P_DATA_TF:
        return None
    end = 6 + _PDU.unpack_from(pdu, 0)[2]
    if end != len(pdu) or end == 6:
        return None
    out = []
    pos = 6
    while pos < end:
        if end - pos < 6:
            return None
        length, cid, mch = _ITEM.unpack_from(pdu, pos)
        if length < 2 or pos + 4 + length > end or mch & 0xFC:
            return None
        out.append((cid, mch, pos + 6, pos + 4 + length))
        pos += 4 + length
    return iter(out)


def decode_command(data: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of a command set (group 0000, Implicit VR Little Endian) by
    element number; None when it is not one."""
    buf = bytes(data)
    found: dict[int, bytes] = {}
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < 8:
            return None
        group, elem, length = _ELEMENT.unpack_from(buf, pos)
        pos += 8
        if group != 0x0000 or length == 0xFFFFFFFF or pos + length > end:
            return None
        found[elem] = buf[pos:pos + length]
        pos += length
    return found


def command_us(found: Mapping[int, bytes], elem: int) -> int | None:
    raw = found.get(elem)
    if raw is None or len(raw) != 2:
        return None
    return int(_US.unpack(raw)[0])


def command_uid(found: Mapping[int, bytes], elem: int) -> str:
    """A UI value as pydicom reads it and the SCP then strips it ("" when absent or
    not ASCII)."""
    raw = found.get(elem)
    if raw is None:
        return ""
    try:
        return raw.decode("ascii").rstrip("\0").strip()
    except UnicodeDecodeError:
        return ""


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ command set that serving it needs."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    has_data_set: bool


def decode_store_rq(context_id: int, data: bytes | memoryview) -> StoreRequest | None:
    """A C-STORE-RQ from its command set; None for anything else."""
    found = decode_command(data)
    if found is None:
        return None
    cmd, message_id, data_set_type = (command_us(found, 0x0100), command_us(found, 0x0110),
                                      command_us(found, 0x0800))
    sop_class, sop_instance = command_uid(found, 0x0002), command_uid(found, 0x1000)
    if (cmd != C_STORE_RQ or message_id is None or data_set_type is None or not sop_class
            or not sop_instance):
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance,
                        data_set_type != NO_DATA_SET)


def _text(tag: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", errors="replace")
    if len(raw) % 2:
        raw += pad
    return _ELEMENT.pack(0, tag, len(raw)) + raw


def encode_response(command_field: int, message_id: int, status: int, *,
                    sop_class: str | None = None, sop_instance: str | None = None,
                    has_data_set: bool = False, error_comment: str | None = None,
                    error_id: int | None = None, action_type: int | None = None) -> bytes:
    """A response command set (PS3.7 9.3, 10.3), elements in tag order."""
    parts = []
    if sop_class:
        parts.append(_text(0x0002, sop_class, b"\0"))
    parts += [
        _ELEMENT.pack(0, 0x0100, 2) + _US.pack(command_field),
        _ELEMENT.pack(0, 0x0120, 2) + _US.pack(message_id),
        _ELEMENT.pack(0, 0x0800, 2) + _US.pack(0x0001 if has_data_set else NO_DATA_SET),
        _ELEMENT.pack(0, 0x0900, 2) + _US.pack(status),
    ]
    if error_comment:
        parts.append(_text(0x0902, error_comment[:64], b" "))
    if error_id is not None:
        parts.append(_ELEMENT.pack(0, 0x0903, 2) + _US.pack(error_id))
    if sop_instance:
        parts.append(_text(0x1000, sop_instance, b"\0"))
    if action_type is not None:
        parts.append(_ELEMENT.pack(0, 0x1008, 2) + _US.pack(action_type))
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body


def encode_event_report_rq(message_id: int, sop_class: str, sop_instance: str,
                           event_type: int, *, has_data_set: bool) -> bytes:
    """An N-EVENT-REPORT-RQ command set (PS3.7 10.3.1.1), elements in tag order."""
    body = b"".join([
        _text(0x0002, sop_class, b"\0"),
        _ELEMENT.pack(0, 0x0100, 2) + _US.pack(N_EVENT_REPORT_RQ),
        _ELEMENT.pack(0, 0x0110, 2) + _US.pack(message_id),
        _ELEMENT.pack(0, 0x0800, 2) + _US.pack(0x0001 if has_data_set else NO_DATA_SET),
        _text(0x1000, sop_instance, b"\0"),
        _ELEMENT.pack(0, 0x1002, 2) + _US.pack(event_type),
    ])
    return _ELEMENT.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body


def encode_store_rsp(req: StoreRequest, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), as pynetdicom encodes it."""
    return encode_response(C_STORE_RQ | RESPONSE_BIT, req.message_id, status,
                           sop_class=req.sop_class, sop_instance=req.sop_instance)


def fragment_pdus(context_id: int, data: bytes, peer_max_pdu: int, *, command: bool) -> list[bytes]:
    """P-DATA-TF PDUs carrying a command set or a data set, fragmented to the
    peer's maximum PDU length (0: unlimited)."""
    size = len(data) if peer_max_pdu == 0 else max(1, peer_max_pdu - 6)
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    out = []
    flag = 0x01 if command else 0x00
    for n, chunk in enumerate(chunks):
        mch = flag | (0x02 if n == len(chunks) - 1 else 0x00)
        item = _ITEM.pack(len(chunk) + 2, context_id, mch) + chunk
        out.append(_PDU.pack(P_DATA_TF, 0, len(item)) + item)
    return out


def command_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> list[bytes]:
    return fragment_pdus(context_id, command, peer_max_pdu, command=True)


def decode_data_set(raw: bytes, transfer_syntax: str) -> Dataset:
    """A small data set in its context's transfer syntax, by pydicom."""
    if transfer_syntax == DEFLATED:
        raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, MAX_SMALL_DATA_SET * 8)
        transfer_syntax = "1.2.840.10008.1.2.1"
    ts = UID(transfer_syntax)
    return read_dataset(io.BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian)


def encode_data_set(ds: Dataset, transfer_syntax: str) -> bytes:
    """A reply data set in its context's transfer syntax (deflate: explicit VR,
    then deflated)."""
    ts = UID(transfer_syntax if transfer_syntax != DEFLATED else "1.2.840.10008.1.2.1")
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    write_dataset(buf, ds)
    out = buf.getvalue()
    if transfer_syntax == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = c.compress(out) + c.flush()
    return out


# -- the registry of other services ----------------------------------------------------------


@dataclass(frozen=True)
class DimseRequest:
    """A request for a registered handler: its command elements and data set."""

    command_field: int
    message_id: int
    context: Accepted
    command: Mapping[int, bytes]
    data_set: Dataset | None
    calling_ae: str
    peer: str


@dataclass(frozen=True)
class EventReport:
    """A request the node sends on the association right after a response."""

    sop_class: str
    sop_instance: str
    event_type: int
    data_set: Dataset
    # The association ended before the peer answered it (never raises).
    undelivered: Callable[[], None]
    # The peer answered it with this status (never raises).
    answered: Callable[[int], None]


@dataclass(frozen=True)
class DimseReply:
    status: int
    data_set: Dataset | None = None
    error_comment: str | None = None
    sop_instance: str | None = None  # Affected SOP Instance UID of the response
    error_id: int | None = None  # Error ID (0000,0903), e.g. 0xA710 of an MPPS (PS3.4 F.7.2.2)
    follow_up: EventReport | None = None


MessageHandler = Callable[[DimseRequest], DimseReply]


class HandlerRegistry:
    """Handlers of DIMSE requests other than C-STORE, by (command field, abstract
    syntax of the presentation context).  Its abstract syntaxes are offered at
    negotiation."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[int, str], MessageHandler] = {}

    def register(self, command_field: int, sop_class: str, handler: MessageHandler) -> None:
        self._handlers[(command_field, sop_class)] = handler

    def find(self, command_field: int, sop_class: str) -> MessageHandler | None:
        return self._handlers.get((command_field, sop_class))

    def sop_classes(self) -> frozenset[str]:
        return frozenset(sop for _, sop in self._handlers)

    def requestor_scp_classes(self) -> frozenset[str]:
        """The classes whose requests come from their SCP (N-EVENT-REPORT): the
        requestor must be granted the SCP role for them at negotiation."""
        return frozenset(sop for cmd, sop in self._handlers if cmd == N_EVENT_REPORT_RQ)

    def requestor_either_classes(self) -> frozenset[str]:
        """Classes served in both roles (Storage Commitment: a modality's N-ACTION as
        its SCU, a PACS's N-EVENT-REPORT as its SCP): the requestor may take either."""
        scp = self.requestor_scp_classes()
        return frozenset(sop for cmd, sop in self._handlers
                         if sop in scp and cmd != N_EVENT_REPORT_RQ)


def may_send(cx: Accepted, command_field: int) -> bool:
    """Whether the peer's negotiated role on ``cx`` lets it send this request.

    PS3.7 D.3.3.4: role selection fixes who is SCU and who SCP of the class on the
    association; the SCP of a class sends its N-EVENT-REPORTs (PS3.7 10.1.1), the
    SCU every other request.  A request its role does not allow is answered 0x0211
    (PS3.7 Annex C: "Unrecognized Operation", an operation that is not one of those
    agreed between the DIMSE-service-users; it is among the statuses of every
    N-service, e.g. 10.1.1.1.8), as one we do not serve at all: the message itself
    is well formed, so it gets a response rather than an abort, and it never
    reaches a handler (a modality that is only SCU of Storage Commitment cannot
    feed our own commitment SCU a forged report)."""
    return cx.peer_scp if command_field == N_EVENT_REPORT_RQ else cx.peer_scu


def roles_of(cx: Accepted) -> str:
    return "/".join(r for r, on in (("SCU", cx.peer_scu), ("SCP", cx.peer_scp)) if on) or "none"


def echo(_req: DimseRequest) -> DimseReply:
    """C-ECHO (PS3.4 A.4): Success."""
    return DimseReply(STATUS_SUCCESS)


def default_registry() -> HandlerRegistry:
    reg = HandlerRegistry()
    reg.register(C_ECHO_RQ, VERIFICATION, echo)
    return reg


# -- one association's messages --------------------------------------------------------------


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class StoreService(Protocol):
    """What the store decisions provide for one association."""

    calling_ae: str
    peer: str

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> Sink:
        """A sink that has the Part 10 preamble and file meta already."""
        ...

    def finish(self, sink: Sink, sop_class: str, sop_instance: str) -> int:
        """Commit the streamed instance; the C-STORE status (never raises)."""
        ...

    def refused(self, status: int, why: str) -> int:
        """Count and audit a C-STORE answered with a failure before any data was
        kept; returns ``status``."""
        ...

    def aborted(self, why: str) -> None:
        """A C-STORE cut short by the end of the association."""
        ...


@dataclass
class _Incoming:
    """The data set of the message in progress."""

    context: Accepted
    command_field: int
    message_id: int
    command: dict[int, bytes]
    store: StoreRequest | None = None
    sink: Sink | None = None  # C-STORE streamed into the inbox
    refusal: tuple[int, str] | None = None  # C-STORE answered with a failure, data dropped
    small: bytearray | None = None  # a registered handler's data set
    overflow: bool = False
    received: int = field(default=0)
    response: bool = False  # the peer's response to our request: its data set is dropped


class DimseLayer:
    """The DIMSE messages of one association, served in its thread.

    ``receive`` takes each P-DATA-TF PDU (valid only during the call; what is
    kept is copied) and sends the responses through ``send``; it raises Breach
    when the association must be aborted.
    """

    def __init__(self, accepted: Mapping[int, Accepted], store: StoreService,
                 registry: HandlerRegistry, send: Callable[[list[bytes]], None],
                 peer_max_pdu: int) -> None:
        self._accepted = accepted
        self._store = store
        self._registry = registry
        self._send = send
        self._peer_max = peer_max_pdu
        self._command = bytearray()
        self._command_cid: int | None = None
        self._data: _Incoming | None = None
        self.served = 0
        self._next_id = 0
        self._pending: dict[int, EventReport] = {}  # our requests by Message ID

    @property
    def busy(self) -> bool:
        """A message is in progress (its command or data set not complete)."""
        return self._data is not None or self._command_cid is not None

    def receive(self, pdu: memoryview) -> None:
        pdvs = iter_pdvs(pdu)
        if pdvs is None:
            raise Breach("malformed P-DATA-TF PDU")
        items = list(pdvs)
        for cid, _, _, _ in items:
            if cid not in self._accepted:
                raise Breach(f"P-DATA-TF on presentation context {cid}, which was not accepted")
        for cid, mch, start, end in items:
            if mch & 0x01:
                self._command_fragment(cid, mch, pdu[start:end])
            else:
                self._data_fragment(cid, mch, pdu[start:end])

    def finished(self) -> None:
        """The association is over: requests of ours it never answered are undelivered."""
        pending, self._pending = self._pending, {}
        for report in pending.values():
            try:
                report.undelivered()
            except Exception:  # noqa: BLE001 - the callbacks never raise; be sure
                log.exception("handing on an undelivered event report failed")

    def interrupted(self, why: str) -> None:
        """The association ends under a message in progress: drop it (a C-STORE
        is recorded as aborted)."""
        msg, self._data = self._data, None
        self._command = bytearray()
        self._command_cid = None
        if msg is None:
            return
        if msg.sink is not None:
            msg.sink.close()
        if msg.store is not None:
            try:
                self._store.aborted(why)
            except Exception:  # noqa: BLE001 - bookkeeping must not stop the abort
                log.exception("recording an aborted C-STORE failed")

    # -- fragments -----------------------------------------------------------------------

    def _command_fragment(self, cid: int, mch: int, data: memoryview) -> None:
        if self._data is not None:
            raise Breach("C-STORE data set interrupted (command fragment or other "
                         "presentation context)" if self._data.store is not None
                         else "command fragment inside a data set")
        if self._command_cid is not None and cid != self._command_cid:
            raise Breach("command set continued on another presentation context")
        self._command_cid = cid
        self._command += data
        if len(self._command) > MAX_COMMAND_SET:
            raise Breach("command set larger than 64 KiB")
        if mch & 0x02:
            raw, self._command = bytes(self._command), bytearray()
            self._command_cid = None
            self._command_complete(self._accepted[cid], raw)

    def _data_fragment(self, cid: int, mch: int, data: memoryview) -> None:
        msg = self._data
        if msg is None:
            raise Breach("data set fragment without a command")
        if cid != msg.context.context_id:
            raise Breach("C-STORE data set interrupted (command fragment or other "
                         "presentation context)" if msg.store is not None
                         else "data set continued on another presentation context")
        msg.received += len(data)
        if msg.sink is not None:
            msg.sink.write(data)
        elif msg.small is not None and not msg.overflow:
            if len(msg.small) + len(data) > MAX_SMALL_DATA_SET:
                msg.overflow = True
                msg.small = bytearray()
            else:
                msg.small += data
        if mch & 0x02:
            self._data = None
            self._message_complete(msg)

    # -- messages --------------------------------------------------------------------------

    def _command_complete(self, cx: Accepted, raw: bytes) -> None:
        found = decode_command(raw)
        field_ = command_us(found, 0x0100) if found is not None else None
        if found is None or field_ is None:
            raise Breach("undecodable DIMSE command set")
        if field_ & RESPONSE_BIT:
            self._response(cx, field_, found)
            return
        if field_ == C_CANCEL_RQ:
            return  # one operation at a time: nothing is pending to cancel
        message_id = command_us(found, 0x0110)
        data_set_type = command_us(found, 0x0800)
        if message_id is None or data_set_type is None:
            raise Breach("DIMSE request without Message ID or Command Data Set Type")
        msg = _Incoming(cx, field_, message_id, found)
        if field_ == C_STORE_RQ:
            self._store_begins(msg, data_set_type != NO_DATA_SET)
        elif data_set_type != NO_DATA_SET:
            msg.small = bytearray()
        if data_set_type == NO_DATA_SET:
            self._message_complete(msg)
        else:
            self._data = msg

    def _response(self, cx: Accepted, field_: int, found: dict[int, bytes]) -> None:
        """The peer's answer to a request of ours (an N-EVENT-REPORT-RSP)."""
        to = command_us(found, 0x0120)
        report = self._pending.pop(to, None) if to is not None else None
        if report is None or field_ != N_EVENT_REPORT_RQ | RESPONSE_BIT:
            raise Breach(f"unexpected DIMSE response 0x{field_:04X} to message {to}")
        status = command_us(found, 0x0900)
        try:
            report.answered(0xFFFF if status is None else status)
        except Exception:  # noqa: BLE001 - the callbacks never raise; be sure
            log.exception("recording an event report's answer failed")
        if command_us(found, 0x0800) not in (None, NO_DATA_SET):
            self._data = _Incoming(cx, field_, to or 0, found, response=True)

    def _send_report(self, cx: Accepted, report: EventReport) -> None:
        self._next_id = self._next_id % 0xFFFF + 1
        try:
            data = encode_data_set(report.data_set, cx.transfer_syntax)
        except Exception:  # noqa: BLE001 - a data set we cannot encode: report elsewhere
            log.exception("encoding an event report failed")
            report.undelivered()
            return
        self._pending[self._next_id] = report
        self._send(command_pdus(cx.context_id, encode_event_report_rq(
            self._next_id, report.sop_class, report.sop_instance, report.event_type,
            has_data_set=True), self._peer_max)
            + fragment_pdus(cx.context_id, data, self._peer_max, command=False))

    def _store_begins(self, msg: _Incoming, has_data_set: bool) -> None:
        cx = msg.context
        sop_class, sop_instance = command_uid(msg.command, 0x0002), command_uid(msg.command,
                                                                               0x1000)
        msg.store = StoreRequest(cx.context_id, msg.message_id, sop_class, sop_instance,
                                 has_data_set)
        if not has_data_set:
            msg.refusal = (STATUS_CANNOT_UNDERSTAND, "C-STORE request without a data set")
        elif not may_send(cx, C_STORE_RQ):
            msg.refusal = (STATUS_UNRECOGNISED_OPERATION,
                           "C-STORE on a context where the peer negotiated no SCU role")
        elif sop_class != cx.abstract_syntax:
            # PS3.7 9.1.1.1.9: the SOP class must be the context's abstract syntax (an MR
            # instance on a context accepted for CT only is not stored).
            msg.refusal = (STATUS_SOP_CLASS_NOT_SUPPORTED,
                           f"SOP class {sop_class or '(none)'} was not accepted on "
                           f"presentation context {cx.context_id}")
        else:
            msg.sink = self._store.begin(sop_class, sop_instance, cx.transfer_syntax)

    def _message_complete(self, msg: _Incoming) -> None:
        if msg.response:
            return
        if msg.store is not None:
            req = msg.store
            if msg.sink is not None:
                try:
                    status = self._store.finish(msg.sink, req.sop_class, req.sop_instance)
                finally:
                    msg.sink.close()
            else:
                assert msg.refusal is not None
                status = self._store.refused(*msg.refusal)
            self._send(command_pdus(req.context_id, encode_store_rsp(req, status),
                                    self._peer_max))
            self.served += 1
            return
        reply = self._dispatch(msg)
        cx = msg.context
        sop_class = command_uid(msg.command, 0x0002) or command_uid(msg.command, 0x0003)
        action = command_us(msg.command, 0x1008) if msg.command_field == N_ACTION_RQ else None
        data = None
        if reply.data_set is not None:
            try:
                data = encode_data_set(reply.data_set, cx.transfer_syntax)
            except Exception:  # noqa: BLE001 - a handler's data set we cannot encode
                log.exception("encoding the reply data set of 0x%04X failed", msg.command_field)
                reply = DimseReply(STATUS_PROCESSING_FAILURE, error_comment="reply not encodable")
        out = command_pdus(cx.context_id, encode_response(
            msg.command_field | RESPONSE_BIT, msg.message_id, reply.status, sop_class=sop_class,
            sop_instance=(reply.sop_instance or command_uid(msg.command, 0x1000)
                          or command_uid(msg.command, 0x1001) or None),
            has_data_set=data is not None, error_comment=reply.error_comment,
            error_id=reply.error_id, action_type=action), self._peer_max)
        if data is not None:
            out += fragment_pdus(cx.context_id, data, self._peer_max, command=False)
        self._send(out)
        self.served += 1
        if reply.follow_up is not None:
            self._send_report(cx, reply.follow_up)

    def _dispatch(self, msg: _Incoming) -> DimseReply:
        if not may_send(msg.context, msg.command_field):
            log.warning("peer %s (%s) sent DIMSE operation 0x%04X on %s, which its negotiated "
                        "role (%s) may not send: answered 0x0211", self._store.peer,
                        self._store.calling_ae, msg.command_field, msg.context.abstract_syntax,
                        roles_of(msg.context))
            return DimseReply(STATUS_UNRECOGNISED_OPERATION,
                              error_comment="operation not allowed in the negotiated role")
        handler = self._registry.find(msg.command_field, msg.context.abstract_syntax)
        if handler is None:
            log.warning("peer %s (%s) asked for DIMSE operation 0x%04X on %s, which this node "
                        "does not provide: answered 0x0211", self._store.peer,
                        self._store.calling_ae, msg.command_field, msg.context.abstract_syntax)
            return DimseReply(STATUS_UNRECOGNISED_OPERATION)
        if msg.overflow:
            return DimseReply(STATUS_OUT_OF_RESOURCES, error_comment="data set too large")
        try:
            ds = (decode_data_set(bytes(msg.small), msg.context.transfer_syntax)
                  if msg.small is not None else None)
        except Exception:  # noqa: BLE001 - pydicom raises many kinds on bad input
            return DimseReply(STATUS_PROCESSING_FAILURE, error_comment="data set not decodable")
        try:
            return handler(DimseRequest(msg.command_field, msg.message_id, msg.context,
                                        msg.command, ds, self._store.calling_ae,
                                        self._store.peer))
        except Exception:  # noqa: BLE001 - handlers never raise into the acceptor
            log.exception("DIMSE handler for 0x%04X failed", msg.command_field)
            return DimseReply(STATUS_PROCESSING_FAILURE)
