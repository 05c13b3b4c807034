"""A scripted DICOM peer that misbehaves on purpose, in the spirit of pynetdicom's
tests/parrot.py: a test lists the PDUs to send (raw bytes, built here by hand)
and reads back what the node answers on the wire, PDU by PDU.

Only the misbehaving side is scripted; the node under test is the real one.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF = 0x04
RELEASE_RQ, RELEASE_RP = 0x05, 0x06
ABORT = 0x07
CLOSED, RESET, SILENT = -1, -2, -3

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

Context = tuple[int, str, Sequence[str]]
CT_AND_ECHO: tuple[Context, ...] = ((1, CT, (EXPLICIT_LE,)), (3, VERIFICATION, (IMPLICIT_LE,)))


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def role_selection(sop_class: str, scu: int, scp: int) -> bytes:
    uid = sop_class.encode()
    return item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu, scp]))


def user_identity(username: str, password: str = "", *, positive_response: bool = True) -> bytes:
    """User Identity Negotiation (PS3.7 D.3.3.7), type 2: username and passcode."""
    u, p = username.encode(), password.encode()
    return item(0x58, bytes([2, int(positive_response)]) + struct.pack(">H", len(u)) + u
                + struct.pack(">H", len(p)) + p)


def async_window(invoked: int, performed: int) -> bytes:
    return item(0x53, struct.pack(">HH", invoked, performed))


def associate_rq(called: str, calling: str = "PARROT",
                 contexts: Sequence[Context] = CT_AND_ECHO, *, max_pdu: int = 65536,
                 extra_user_items: bytes = b"", version: int = 1,
                 app_context: str = "1.2.840.10008.3.1.1.1") -> bytes:
    pcs = b"".join(
        item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract.encode())
             + b"".join(item(0x40, ts.encode()) for ts in syntaxes))
        for cid, abstract, syntaxes in contexts)
    user = item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.1")
                + extra_user_items)
    body = (struct.pack(">HH", version, 0) + called.ljust(16).encode()
            + calling.ljust(16).encode() + b"\0" * 32 + item(0x10, app_context.encode())
            + pcs + user)
    return pdu(ASSOCIATE_RQ, body)


def associate_ac_like() -> bytes:
    """An A-ASSOCIATE-AC as a requestor would never send one (an acceptor's PDU)."""
    body = struct.pack(">HH", 1, 0) + b" " * 32 + b"\0" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1")
    return pdu(ASSOCIATE_AC, body)


def associate_rj() -> bytes:
    return pdu(ASSOCIATE_RJ, bytes([0, 1, 1, 1]))


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\0" * 4)


def release_rp() -> bytes:
    return pdu(RELEASE_RP, b"\0" * 4)


def abort(source: int = 0, reason: int = 0) -> bytes:
    return pdu(ABORT, bytes([0, 0, source, reason]))


def pdv(cid: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cid, mch) + data


def pdata(*items: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(items))


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def command(field: int, message_id: int, sop_class: str, *, has_data: bool,
            sop_instance: str | None = None, extra: bytes = b"") -> bytes:
    """A DIMSE request command set (Implicit VR Little Endian, elements in tag order)."""
    body = (_element(0x0002, _ui(sop_class)) + _element(0x0100, struct.pack("<H", field))
            + _element(0x0110, struct.pack("<H", message_id)) + extra
            + _element(0x0700, struct.pack("<H", 0))
            + _element(0x0800, struct.pack("<H", 0x0000 if has_data else 0x0101)))
    if sop_instance is not None:
        body += _element(0x1000, _ui(sop_instance))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def store_rq(message_id: int, sop_instance: str, sop_class: str = CT) -> bytes:
    return command(0x0001, message_id, sop_class, has_data=True, sop_instance=sop_instance)


def echo_rq(message_id: int) -> bytes:
    return command(0x0030, message_id, VERIFICATION, has_data=False)


def find_rq(message_id: int, sop_class: str = STUDY_ROOT_FIND) -> bytes:
    return command(0x0020, message_id, sop_class, has_data=True)


def move_rq(message_id: int, sop_class: str = STUDY_ROOT_MOVE) -> bytes:
    dest = b"ELSEWHERE".ljust(16)
    return command(0x0021, message_id, sop_class, has_data=True,
                   extra=_element(0x0600, dest))


def query_identifier() -> bytes:
    """A small Implicit VR identifier: QueryRetrieveLevel = STUDY, StudyInstanceUID empty."""
    return (struct.pack("<HHI", 0x0008, 0x0052, 6) + b"STUDY "
            + struct.pack("<HHI", 0x0020, 0x000D, 0))


@dataclass(frozen=True)
class Reply:
    """One PDU read from the node, or how the stream ended (CLOSED, RESET, SILENT)."""

    kind: int
    body: bytes = b""

    @property
    def abort_source_reason(self) -> tuple[int, int]:
        assert self.kind == ABORT, self
        return self.body[2], self.body[3]

    def user_items(self) -> dict[int, list[bytes]]:
        """Sub-items of the User Information item of an A-ASSOCIATE-AC."""
        assert self.kind == ASSOCIATE_AC, self
        out: dict[int, list[bytes]] = {}
        for kind, value in _items(self.body[68:]):
            if kind == 0x50:
                for sub, sv in _items(value):
                    out.setdefault(sub, []).append(sv)
        return out

    def context_results(self) -> dict[int, int]:
        """Presentation context ID -> result of an A-ASSOCIATE-AC."""
        assert self.kind == ASSOCIATE_AC, self
        return {v[0]: v[2] for k, v in _items(self.body[68:]) if k == 0x21}

    def dimse(self) -> dict[int, bytes]:
        """Command elements of a P-DATA-TF holding one whole command PDV."""
        assert self.kind == P_DATA_TF, self
        cmd = self.body[6:]
        found: dict[int, bytes] = {}
        pos = 0
        while pos + 8 <= len(cmd):
            _g, e, n = struct.unpack_from("<HHI", cmd, pos)
            found[e] = cmd[pos + 8:pos + 8 + n]
            pos += 8 + n
        return found

    def command_and_status(self) -> tuple[int, int]:
        found = self.dimse()
        return struct.unpack("<H", found[0x0100])[0], struct.unpack("<H", found[0x0900])[0]


def _items(buf: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(buf):
        kind, _, n = struct.unpack_from(">BBH", buf, pos)
        yield kind, buf[pos + 4:pos + 4 + n]
        pos += 4 + n


class Parrot:
    """One connection to the node; ``send`` what the script says, ``read`` what came back."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 30,
                 ssl_ctx: ssl.SSLContext | None = None) -> None:
        s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0),
                                     timeout=timeout)
        self.sock: socket.socket = (ssl_ctx.wrap_socket(s, server_hostname="localhost")
                                    if ssl_ctx is not None else s)

    def __enter__(self) -> Parrot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *chunks: bytes) -> None:
        """Send; a node that closed meanwhile is what ``read`` will report."""
        try:
            for chunk in chunks:
                self.sock.sendall(chunk)
        except OSError:
            pass

    def read(self, timeout: float | None = None) -> Reply:
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            head = self._exactly(6)
            if head is None:
                return Reply(CLOSED)
            kind, _, n = struct.unpack(">BBL", head)
            body = self._exactly(n)
            return Reply(kind, body) if body is not None else Reply(CLOSED)
        except (ConnectionResetError, BrokenPipeError):
            return Reply(RESET)
        except (TimeoutError, ssl.SSLError):
            return Reply(SILENT)

    def _exactly(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    def associate(self, called: str, **kw: object) -> Reply:
        self.send(associate_rq(called, **kw))  # type: ignore[arg-type]
        reply = self.read()
        assert reply.kind == ASSOCIATE_AC, f"association not accepted: {reply}"
        return reply

    def ended(self, timeout: float = 30) -> bool:
        """Read to the end of the stream (PDUs may come first); False if still open."""
        while True:
            r = self.read(timeout)
            if r.kind in (CLOSED, RESET):
                return True
            if r.kind == SILENT:
                return False

    def aborted(self, timeout: float = 30) -> Reply:
        """The next PDU must be an A-ABORT (or the reset that may overtake it), and
        the connection must then close; the A-ABORT (or RESET) is returned."""
        r = self.read(timeout)
        assert r.kind in (ABORT, RESET), f"expected an A-ABORT, got {r}"
        if r.kind == ABORT:
            assert self.ended(timeout), "the connection stayed open after the A-ABORT"
        return r
