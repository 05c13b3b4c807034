"""C-STORE requests served straight from the P-DATA stream, in the DUL thread.

Why: through pynetdicom, every C-STORE crosses its state machine, its DIMSE
decoder (the command set through pydicom, the data set through a temporary-file
protocol), a queue to the association thread, the service class and its event
dispatch, and the same way back for the response.  For a 0.5 MB CT instance
that machinery was more than half of the receiving CPU, and the thread
hand-offs cost context switches on top.

What is served here: on one of our established associations, a C-STORE-RQ whose
command set arrives whole in one PDV, on an accepted presentation context whose
abstract syntax is the request's SOP class, while pynetdicom has no message of
its own in progress.  Its data set fragments are streamed into the same
``InstanceSink`` the pynetdicom path uses, the same store routine decides the
status, and the C-STORE-RSP is encoded directly (byte-identical to pynetdicom's,
tested) and sent from this thread, which is the thread pynetdicom sends from.

Everything else stays with pynetdicom, unchanged: negotiation, release, abort,
timers, C-ECHO and anything unusual (a command set split over PDVs, a context
or SOP class that does not match, a message while pynetdicom is mid-message).
A PDU that holds the end of our message and the start of another is split and
the rest handed to pynetdicom as its own P-DATA-TF PDU.  A peer that breaks the
protocol inside a message we serve (a command fragment or another context
before the last data set fragment, a malformed PDV) gets an A-ABORT, as
pynetdicom would give it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dicomtls import P_DATA_TF, abort_transport

log = logging.getLogger("edge_agent.receive")

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101

_ITEM = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_PDU = struct.Struct(">BBL")
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
# DUL states in which a P-DATA-TF may be sent (PS3.8 9.2): data transfer, and
# awaiting the local release response after the peer's A-RELEASE-RQ.
_CAN_SEND_DATA = frozenset({"Sta6", "Sta8"})


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ command set that serving it needs."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    has_data_set: bool


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class Store(Protocol):
    """What the storage SCP provides for one association."""

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> Sink:
        """A sink that has the Part 10 preamble and file meta already."""
        ...

    def finish(self, sink: Sink, sop_class: str, sop_instance: str) -> int:
        """Commit the streamed instance; the C-STORE status (never raises)."""
        ...


# -- codec ------------------------------------------------------------------------------


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


def decode_store_rq(context_id: int, data: bytes | memoryview) -> StoreRequest | None:
    """A C-STORE-RQ from its Implicit VR Little Endian command set; None for anything else.

    Only what identifies a C-STORE-RQ beyond doubt is accepted; any other
    command, or an element this cannot read, leaves the message to pynetdicom.
    """
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
    try:
        field = _US.unpack(found[0x0100])[0]
        message_id = _US.unpack(found[0x0110])[0]
        data_set_type = _US.unpack(found[0x0800])[0]
        sop_class = _uid(found[0x0002])
        sop_instance = _uid(found[0x1000])
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != C_STORE_RQ or not sop_class or not sop_instance:
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance,
                        data_set_type != NO_DATA_SET)


def _uid(raw: bytes) -> str:
    # As pydicom reads a UI value and the SCP then strips it.
    return raw.decode("ascii").rstrip("\0").strip()


def _text(tag: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return _ELEMENT.pack(0, tag, len(raw)) + raw


def encode_store_rsp(req: StoreRequest, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), as pynetdicom encodes it."""
    body = b"".join((
        _text(0x0002, req.sop_class, b"\0"),
        _ELEMENT.pack(0, 0x0100, 2) + _US.pack(C_STORE_RSP),
        _ELEMENT.pack(0, 0x0120, 2) + _US.pack(req.message_id),
        _ELEMENT.pack(0, 0x0800, 2) + _US.pack(NO_DATA_SET),
        _ELEMENT.pack(0, 0x0900, 2) + _US.pack(status),
        _text(0x1000, req.sop_instance, b"\0"),
    ))
    return _ELEMENT.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body


def command_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying a command set, fragmented to the peer's maximum PDU."""
    size = len(command) if peer_max_pdu == 0 else max(1, peer_max_pdu - 6)
    chunks = [command[i:i + size] for i in range(0, len(command), size)] or [b""]
    out = []
    for n, chunk in enumerate(chunks):
        mch = 0x03 if n == len(chunks) - 1 else 0x01
        item = _ITEM.pack(len(chunk) + 2, context_id, mch) + chunk
        out.append(_PDU.pack(P_DATA_TF, 0, len(item)) + item)
    return out


# -- the per-association server ---------------------------------------------------------


@dataclass
class _Message:
    req: StoreRequest
    sink: Sink


class StoreStream:
    """Serves the C-STORE requests of one association as their PDUs arrive.

    ``take`` runs in pynetdicom's DUL thread for every P-DATA-TF PDU and never
    raises: True means the PDU was consumed here, False that pynetdicom should
    process it as usual.
    """

    def __init__(self, store: Store, on_served: Callable[[], None] = lambda: None,
                 on_abort: Callable[[str], None] = lambda _why: None) -> None:
        """``on_served`` after each response sent; ``on_abort(why)`` when a peer's
        protocol breach inside a served message aborts the association."""
        self._store = store
        self._msg: _Message | None = None
        self._on_served = on_served
        self._on_abort = on_abort

    def take(self, dul: Any, pdu: memoryview) -> bool:
        """``pdu`` is valid only during the call: whatever is kept is copied."""
        engaged = self._msg is not None
        try:
            return self._take(dul, pdu)
        except Exception:  # noqa: BLE001 - runs in pynetdicom's DUL thread
            log.exception("serving a C-STORE failed")
            if engaged or self._msg is not None:
                self._abort(dul, "internal error")
                return True
            return False

    def close(self) -> None:
        """The association ended: drop a message still in progress."""
        msg, self._msg = self._msg, None
        if msg is not None:
            msg.sink.close()

    def interrupted(self, why: str) -> None:
        """The transport is being aborted under us (a PDU missed its deadline, a
        PDV on a context that was not accepted): drop a message in progress and
        record it as aborted."""
        had_message = self._msg is not None
        self.close()
        if had_message:
            try:
                self._on_abort(why)
            except Exception:  # noqa: BLE001 - bookkeeping must not stop the abort
                log.exception("recording an aborted C-STORE failed")

    def _take(self, dul: Any, pdu: memoryview) -> bool:
        pdvs = iter_pdvs(pdu)
        if pdvs is None:
            if self._msg is None:
                return False  # pynetdicom reports a malformed PDU its own way
            self._abort(dul, "malformed P-DATA-TF PDU inside a C-STORE")
            return True
        first = True
        for cid, mch, start, end in pdvs:
            if self._msg is None:
                if not self._engage(dul, cid, mch, pdu[start:end]):
                    if first:
                        return False
                    self._hand_over(dul, pdu, start - 6)
                    return True
                first = False
                continue
            first = False
            msg = self._msg
            if mch & 0x01 or cid != msg.req.context_id:
                self._abort(dul, "C-STORE data set interrupted (command fragment or other "
                                 "presentation context)")
                return True
            msg.sink.write(pdu[start:end])
            if mch & 0x02:
                self._msg = None
                self._complete(dul, msg)
        return True

    def _engage(self, dul: Any, cid: int, mch: int, data: memoryview) -> bool:
        if mch != 0x03:
            return False
        assoc = dul.assoc
        # Only state this thread owns decides: the DUL's state machine is in data
        # transfer (Sta6) and has nothing queued, and the DIMSE decoder (fed from
        # this thread too) is between messages.  Association.is_established is
        # set by the association thread, which may not have run yet when a peer
        # sends its first C-STORE right after the A-ASSOCIATE-AC.
        if (dul.state_machine.current_state != "Sta6"
                or getattr(assoc, "_sent_release", False)
                or assoc.dimse.message is not None or not dul.event_queue.empty()):
            return False
        req = decode_store_rq(cid, data)
        if req is None or not req.has_data_set:
            return False
        cx = assoc._accepted_cx.get(cid)
        if cx is None or cx.abstract_syntax != req.sop_class or not cx.transfer_syntax:
            return False
        sink = self._store.begin(req.sop_class, req.sop_instance, str(cx.transfer_syntax[0]))
        self._msg = _Message(req, sink)
        return True

    def _complete(self, dul: Any, msg: _Message) -> None:
        try:
            status = self._store.finish(msg.sink, msg.req.sop_class, msg.req.sop_instance)
        finally:
            msg.sink.close()
        if dul.state_machine.current_state not in _CAN_SEND_DATA:
            return  # aborted or closed meanwhile: nothing to answer (as pynetdicom)
        peer_max = int(dul.assoc.requestor.maximum_length or 0)
        for out in command_pdus(msg.req.context_id, encode_store_rsp(msg.req, status), peer_max):
            dul.socket.send(out)
        self._on_served()

    def _hand_over(self, dul: Any, pdu: memoryview, rest: int) -> None:
        """Give the PDVs from offset ``rest`` on to pynetdicom as a PDU of their own."""
        items = bytes(pdu[rest:])
        pdu_obj, event = dul._decode_pdu(bytearray(_PDU.pack(P_DATA_TF, 0, len(items)) + items))
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu_obj)

    def _abort(self, dul: Any, why: str) -> None:
        log.warning("peer broke the DIMSE protocol (%s); aborting the association", why)
        self.interrupted(why)
        abort_transport(dul.socket)
