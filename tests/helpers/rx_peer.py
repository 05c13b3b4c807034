"""A scripted DICOM peer over a raw socket, for peers that misbehave on purpose (in the
spirit of pynetdicom's tests/parrot.py): PDUs built by hand, so a test can send what
no well-behaved SCU would (half PDUs, unproposed contexts, a SOP class on another
class's context, control characters in an AE title)."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"

Context = tuple[int, str, Sequence[str]]  # (ID, abstract syntax, transfer syntaxes)


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str, calling: str | bytes = "MOD",
                 contexts: Sequence[Context] = ((1, CT, (EXPLICIT_LE,)),),
                 max_pdu: int = 65536) -> bytes:
    """An A-ASSOCIATE-RQ; ``calling`` as bytes goes on the wire unchecked."""
    raw_calling = calling if isinstance(calling, bytes) else calling.encode()
    pcs = b"".join(
        item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract.encode())
             + b"".join(item(0x40, ts.encode()) for ts in syntaxes))
        for cid, abstract, syntaxes in contexts)
    user = item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + raw_calling.ljust(16)[:16]
            + b"\0" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1") + pcs + user)
    return struct.pack(">BBL", 1, 0, len(body)) + body


def read_pdu(s: socket.socket) -> tuple[int, bytes]:
    """(type, body); -1 when the peer closed, -2 when it reset the connection."""
    try:
        head = _read_exactly(s, 6)
        if head is None:
            return -1, b""
        kind, _, n = struct.unpack(">BBL", head)
        body = _read_exactly(s, n)
        return (kind, body) if body is not None else (-1, b"")
    except ConnectionResetError:
        return -2, b""


def _read_exactly(s: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def closed_by_peer(s: socket.socket) -> bool:
    """Read until the node closes the connection (an A-ABORT may come first);
    False if it is still open when the socket's timeout expires."""
    try:
        while True:
            kind, _ = read_pdu(s)
            if kind < 0:
                return True
    except (TimeoutError, ssl.SSLError):
        return False
    except OSError:
        return True


def pdv(cid: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cid, mch) + data


def pdata(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBL", 4, 0, len(body)) + body


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1)."""
    body = (_element(0x0002, _ui(sop_class)) + _element(0x0100, struct.pack("<H", 0x0001))
            + _element(0x0110, struct.pack("<H", message_id))
            + _element(0x0700, struct.pack("<H", 0)) + _element(0x0800, struct.pack("<H", 0))
            + _element(0x1000, _ui(sop_instance)))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def response_status(body: bytes) -> tuple[int, int]:
    """(command field, status) of a response in one PDV (the body of its PDU)."""
    cmd = body[6:]
    found = {}
    pos = 0
    while pos < len(cmd):
        _g, e, n = struct.unpack_from("<HHI", cmd, pos)
        found[e] = cmd[pos + 8:pos + 8 + n]
        pos += 8 + n
    return struct.unpack("<H", found[0x0100])[0], struct.unpack("<H", found[0x0900])[0]


def dataset_bytes(ds: Dataset, *, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def connect(port: int, *, source: str = "127.0.0.1",
            ssl_ctx: ssl.SSLContext | None = None, timeout: float = 30) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0),
                                 timeout=timeout)
    if ssl_ctx is not None:
        s = ssl_ctx.wrap_socket(s, server_hostname="localhost")
    return s


def associate(port: int, called: str, *, calling: str = "PYNETDICOM", source: str = "127.0.0.1",
              contexts: Sequence[Context] = ((1, CT, (EXPLICIT_LE,)),),
              ssl_ctx: ssl.SSLContext | None = None) -> socket.socket:
    """A raw connection with an accepted association (asserts the A-ASSOCIATE-AC)."""
    s = connect(port, source=source, ssl_ctx=ssl_ctx)
    s.sendall(associate_rq(called, calling, contexts))
    kind, _ = read_pdu(s)
    assert kind == 0x02, f"association not accepted (PDU type {kind})"
    return s


def store(s: socket.socket, cid: int, sop_class: str, sop_instance: str, data: bytes,
          *, fragment: int = 16000, message_id: int = 1) -> tuple[int, int]:
    """Send one C-STORE on context ``cid``; (PDU type, status) of the answer, status
    -1 when the answer is not a response (an A-ABORT, a close)."""
    chunks = [data[i:i + fragment] for i in range(0, len(data), fragment)] or [b""]
    try:
        s.sendall(pdata(pdv(cid, 0x03, store_rq(message_id, sop_class, sop_instance))))
        for i, chunk in enumerate(chunks):
            s.sendall(pdata(pdv(cid, 0x02 if i == len(chunks) - 1 else 0x00, chunk)))
    except OSError:
        pass  # the node aborted while we were sending: its answer is read below
    kind, body = read_pdu(s)
    if kind != 0x04:
        return kind, -1
    return kind, response_status(body)[1]


def release(s: socket.socket) -> int:
    """A-RELEASE-RQ; the type of the answer (0x06 A-RELEASE-RP)."""
    s.sendall(b"\x05\x00" + struct.pack(">L", 4) + b"\0" * 4)
    return read_pdu(s)[0]
