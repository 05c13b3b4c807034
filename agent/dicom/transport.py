"""The DICOM transport: listening sockets, DICOM TLS, and PDUs read and written
within deadlines.

Owns: the listener (``listen``), the BCP 195 server context and the TLS
handshake (done in the connection's own thread, bounded by the ACSE timeout, so
a peer that never sends a ClientHello stops nobody else), the client
certificate subject, and ``PduChannel``: one connection's PDUs, each refused
before its body is read when its length is over the bound, each required to
arrive whole within its deadline (ARTIM before an association, ``[dicom]
pdu_timeout`` inside one), sends bounded by the same timeout.  May import the
standard library, cryptography and agent.errors; nothing of pynetdicom.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from pathlib import Path

from cryptography import x509

from agent.errors import ConfigError, TransportError

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ASSOCIATE-RQ/AC with every storage SOP class and all our transfer syntaxes
# stays far below this; release/abort PDUs are 4 bytes.
MAX_CONTROL_PDU = 1 << 20
# A P-DATA-TF may exceed the maximum length we announced by this much (senders that
# count the PDU header in) before it is refused.
PDU_SLACK = 64

# A-ABORT sources and reasons (PS3.8 9.3.8).
SOURCE_USER = 0
SOURCE_PROVIDER = 2
REASON_NOT_SPECIFIED = 0
REASON_UNRECOGNIZED_PDU = 1
REASON_UNEXPECTED_PDU = 2
REASON_INVALID_PARAMETER = 6

_HEAD = struct.Struct(">BBL")

# BCP 195 (RFC 9325) recommended suites for TLS 1.2; TLS 1.3 suites are all fine.
_BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def server_context(cert: Path, key: Path, ca: Path, *, require_client_cert: bool) -> ssl.SSLContext:
    """A server context for the BCP 195 TLS Secure Transport Connection Profile."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"[dicom.tls] cannot load cert {cert}, key {key} or ca {ca}: {exc}"]
        ) from None
    return ctx


def peer_subject(sock: object) -> x509.Name | None:
    """The verified client certificate's subject, or None (plain TCP, no cert)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject


def same_subject(rule_subject: str, peer: x509.Name | None) -> bool:
    """Compare an RFC 4514 subject from the config with a certificate's subject."""
    if peer is None:
        return False
    try:
        wanted = x509.Name.from_rfc4514_string(rule_subject)
    except ValueError:
        return False
    return wanted.rfc4514_string() == peer.rfc4514_string()


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; TransportError an operator can act on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, exc) from None
    sock.setblocking(False)
    return sock


def listen_error(host: str, port: int, exc: OSError) -> TransportError:
    """A DICOM port we cannot listen on, said the way an operator can act on it."""
    return TransportError(
        f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}",
        hint="another service (storescp, Orthanc, a second edge-agent) may hold the port: "
             "stop it or change [dicom] port / [dicom.tls] port; ports below 1024 need the "
             "low-port systemd drop-in")


class HandshakeFailed(Exception):
    """The TLS handshake did not complete (the reason is the message)."""


def tls_handshake(ctx: ssl.SSLContext, raw: socket.socket, timeout: float) -> ssl.SSLSocket:
    """The server side of the handshake, bounded by ``timeout``; HandshakeFailed
    (the raw socket closed) when it fails or the peer stays silent."""
    raw.settimeout(timeout)
    try:
        return ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        close_quietly(raw)
        raise HandshakeFailed(f"TLS handshake failed ({reason})") from None


def close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# -- PDUs ---------------------------------------------------------------------------------


class PeerClosed(Exception):
    """The peer closed (or reset) the connection, possibly inside a PDU."""


class Stalled(Exception):
    """No PDU began before the idle deadline (``idle``), or a PDU did not arrive
    whole before its deadline."""

    def __init__(self, *, idle: bool) -> None:
        super().__init__("idle" if idle else "incomplete PDU")
        self.idle = idle


class Oversized(Exception):
    """A PDU announced a length over the bound for its type (its body is not read)."""

    def __init__(self, kind: int, length: int, limit: int) -> None:
        super().__init__(f"a PDU of {length} bytes, over the {limit} allowed")
        self.kind = kind
        self.length = length
        self.limit = limit


def abort_pdu(source: int, reason: int) -> bytes:
    return _HEAD.pack(A_ABORT, 0, 4) + bytes([0, 0, source, reason])


class PduChannel:
    """One connection's PDUs (plain or TLS), read into one buffer per connection.

    Not thread safe: the association's thread is its only user.
    """

    def __init__(self, sock: socket.socket, *, max_pdata: int, pdu_timeout: float) -> None:
        self.sock = sock
        self._pdu_timeout = pdu_timeout
        self._pdata_limit = max_pdata + PDU_SLACK
        self._head = bytearray(6)
        self._buf = bytearray(64 << 10)

    def read(self, first_byte_by: float, whole_by: float | None = None) -> tuple[int, memoryview]:
        """(PDU type, whole PDU) of the next PDU, valid until the next read.

        The PDU must begin before ``first_byte_by`` (monotonic) and end before
        ``whole_by``, or ``pdu_timeout`` after its first byte when that is None.
        Raises PeerClosed, Stalled or Oversized."""
        head = memoryview(self._head)
        got = self._recv_into(head, 0, first_byte_by, idle=True)
        deadline = whole_by if whole_by is not None else time.monotonic() + self._pdu_timeout
        self._recv_into(head, got, deadline, idle=False)
        kind, _, length = _HEAD.unpack(self._head)
        limit = self._pdata_limit if kind == P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            raise Oversized(kind, length, limit)
        size = 6 + length
        if len(self._buf) < size:
            self._buf = bytearray(max(size, 2 * len(self._buf)))
        view = memoryview(self._buf)[:size]
        view[:6] = self._head
        self._recv_into(view, 6, deadline, idle=False)
        return kind, view

    def _recv_into(self, view: memoryview, got: int, deadline: float, *, idle: bool) -> int:
        """Fill ``view`` from offset ``got``; with ``idle``, return after the first
        bytes arrived (the rest is read against the PDU's own deadline)."""
        n = len(view)
        sock = self.sock
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled(idle=idle and got == 0)
            sock.settimeout(left)
            try:
                k = sock.recv_into(view[got:], n - got)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                raise PeerClosed from None
            if k == 0:
                raise PeerClosed
            got += k
            if idle:
                return got
        return got

    def send(self, *pdus: bytes) -> None:
        """Send whole PDUs, bounded by ``pdu_timeout``; OSError when that fails."""
        self.sock.settimeout(self._pdu_timeout)
        for pdu in pdus:
            self.sock.sendall(pdu)

    def abort(self, source: int, reason: int) -> None:
        """A-ABORT and close: what follows on the stream is not read (beyond a
        short drain, so the A-ABORT is not overtaken by a reset)."""
        with contextlib.suppress(OSError):
            self.send(abort_pdu(source, reason))
        self.close(drain=0.5)

    def close(self, drain: float = 0.0) -> None:
        """Close; with ``drain``, first wait that long at most for the peer to close
        (reading and discarding at most 1 MiB)."""
        sock = self.sock
        if drain > 0 and not isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            self.await_close(time.monotonic() + drain)
        close_quietly(sock)

    def await_close(self, deadline: float) -> None:
        """Discard what the peer sends until it closes or ``deadline`` passes."""
        scratch = bytearray(16 << 10)
        budget = 1 << 20
        while budget > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.sock.settimeout(left)
                k = self.sock.recv_into(scratch)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return
            if k == 0:
                return
            budget -= k
