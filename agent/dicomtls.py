"""The DICOM transport: listener, DICOM TLS (PS3.15 Annex B, BCP 195) and PDU bounds.

pynetdicom's stock server has three weaknesses for a box facing a hospital
network, addressed here:

* it performs the TLS handshake inside the accept loop with no timeout, so one
  peer that connects and never sends a ClientHello stops every later
  connection.  ``EdgeAssociationServer`` accepts plain sockets and does the
  handshake in the connection's own thread, bounded by the ACSE timeout;
* it admits any number of connections per peer before the first PDU is read;
  here every connection is counted per peer address at ``accept``;
* it reads a PDU of whatever length the peer announces (up to 4 GiB) into
  memory.  ``install_pdu_guard`` replaces the PDU reader with one that
  refuses a P-DATA-TF longer than the maximum length we negotiated, and any
  other PDU longer than ``MAX_CONTROL_PDU``, before reading its body: the peer
  gets an A-ABORT and the connection is closed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from agent.errors import ConfigError, TransportError
from agent.ratelimit import PeerLimiter

log = logging.getLogger("edge_agent.receive")

# A-ASSOCIATE-RQ/AC with every storage SOP class and all our transfer syntaxes
# stays far below this; release/abort PDUs are 4 bytes.
MAX_CONTROL_PDU = 1 << 20
P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value)
# A-ABORT-RQ, source: service provider (2), reason: invalid PDU parameter (6).
ABORT_INVALID_PARAMETER = bytes([0x07, 0x00]) + struct.pack(">L", 4) + bytes([0, 0, 2, 6])

# BCP 195 (RFC 9325) recommended suites for TLS 1.2; TLS 1.3 suites are all fine.
_BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)

Rejector = Callable[[str, str], None]


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


class EdgeRequestHandler(RequestHandler):
    """Runs the association to its end in the connection's thread.

    pynetdicom's handler starts the association thread and returns at once;
    waiting for it lets the server count a connection until it really closes.
    """

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()


class SharedContexts(list[Any]):
    """The server's supported presentation contexts, handed to every association
    without pynetdicom's per-association ``deepcopy`` (11 ms for our 170 storage
    contexts x 13 transfer syntaxes, per association).  Negotiation only reads
    the acceptor's contexts (it builds new ones for its results), and the node
    replaces the list on the acceptor before negotiation anyway."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class EdgeAssociationServer(ThreadedAssociationServer):
    """Threaded server that admits connections per peer and handshakes TLS lazily."""

    daemon_threads = True
    # Attributes set by ``configure`` (pynetdicom builds the instance itself).
    edge_limiter: PeerLimiter
    edge_tls: ssl.SSLContext | None
    edge_handshake_timeout: float
    edge_on_refused: Rejector
    edge_owner: object

    def configure(self, *, limiter: PeerLimiter, tls: ssl.SSLContext | None,
                  handshake_timeout: float, on_refused: Rejector, owner: object) -> None:
        self.edge_limiter = limiter
        self.edge_tls = tls
        self.edge_handshake_timeout = handshake_timeout
        self.edge_on_refused = on_refused
        self.edge_owner = owner
        self.RequestHandlerClass = EdgeRequestHandler
        self.contexts = SharedContexts(self.contexts)


    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Never handshake here: this runs in the single accept thread.
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        if self.edge_limiter.open_connection(peer):
            return True
        self.edge_on_refused(peer, "too many open connections from this peer")
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        try:
            if self.edge_tls is not None:
                request = self._handshake(request, peer)
                if request is None:
                    return
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().process_request_thread(request, client_address)
        finally:
            self.edge_limiter.close_connection(peer)

    def _handshake(self, raw: socket.socket, peer: str) -> ssl.SSLSocket | None:
        assert self.edge_tls is not None
        raw.settimeout(self.edge_handshake_timeout)
        try:
            tls = self.edge_tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.edge_on_refused(peer, f"TLS handshake failed ({reason})")
            _close(raw)
            return None
        tls.settimeout(None)
        return tls


def listen_error(host: str, port: int, exc: OSError) -> TransportError:
    """A DICOM port we cannot listen on, said the way an operator can act on it."""
    return TransportError(
        f"cannot listen for DICOM on {host}:{port}: {exc.strerror or exc}",
        hint="another service (storescp, Orthanc, a second edge-agent) may hold the port: "
             "stop it or change [dicom] port / [dicom.tls] port; ports below 1024 need the "
             "low-port systemd drop-in")


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- PDU bound ---------------------------------------------------------------------

_installed = threading.Lock()
_guard_on = False


def install_pdu_guard() -> None:
    """Replace pynetdicom's PDU reader (process wide, idempotent)."""
    global _guard_on
    with _installed:
        if not _guard_on:
            DULServiceProvider._read_pdu_data = _read_pdu_bounded  # type: ignore[method-assign]
            _guard_on = True


def _local_max(dul: DULServiceProvider) -> int:
    assoc = dul.assoc
    own = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return int(own.maximum_length or 0)


def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False when the peer closed first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return False
        got += k
    return True


def abort_transport(assoc_sock: Any) -> None:
    """A-ABORT (provider, invalid parameter) and close, bypassing the state machine:
    what follows on the stream is not to be read.  pynetdicom sees the close (Evt17)."""
    raw = getattr(assoc_sock, "socket", None)
    if raw is not None:
        try:
            raw.sendall(ABORT_INVALID_PARAMETER)
        except OSError:
            pass
    assoc_sock.close()


def _rx_buffer(dul: DULServiceProvider, size: int) -> bytearray:
    buf: bytearray | None = getattr(dul, "_edge_rx", None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(dul, "_edge_rx", buf)  # noqa: B010 - pynetdicom object
    return buf


def _read_pdu_bounded(self: DULServiceProvider) -> None:
    """Read one PDU, refusing oversized ones before their body is read.

    Events as in pynetdicom: Evt17 transport closed, Evt19 invalid PDU,
    otherwise the event of the decoded PDU type.
    """
    assoc_sock = self.socket
    raw = getattr(assoc_sock, "socket", None)
    if assoc_sock is None or raw is None:
        self.event_queue.put("Evt17")
        return
    head = bytearray(6)
    try:
        ok = _recv_into(raw, memoryview(head))
    except (OSError, TimeoutError):
        ok = False
    if not ok:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, length = struct.unpack(">BBL", head)
    limit = _local_max(self) if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
    if pdu_type == P_DATA_TF and limit == 0:
        limit = 1 << 26  # "unlimited" was negotiated: still refuse absurd lengths
    if pdu_type not in _KNOWN_PDU_TYPES or length > limit:
        # Not DICOM, or a length we will not buffer: abort and close at once
        # rather than let the state machine read the rest of the stream.
        if pdu_type not in _KNOWN_PDU_TYPES:
            log.warning("peer sent an unknown PDU type 0x%02X; aborting", pdu_type)
        else:
            log.warning("peer sent a PDU of %d bytes, over the %d allowed; aborting",
                        length, limit)
        abort_transport(assoc_sock)
        return
    # Our associations serve C-STOREs from the PDU stream (agent/dimsestream.py),
    # which copies what it keeps: their P-DATA PDUs are read into one buffer per
    # connection instead of a fresh one each (a fresh 0.5-1 MiB block is a fresh
    # mapping, paid in page faults).
    direct = getattr(self.assoc, "_edge_pdata", None) if pdu_type == P_DATA_TF else None
    pdu_bytes = _rx_buffer(self, 6 + length) if direct is not None else bytearray(6 + length)
    pdu_view = memoryview(pdu_bytes)[:6 + length]
    pdu_view[:6] = head
    try:
        ok = _recv_into(raw, pdu_view[6:])
    except (OSError, TimeoutError):
        ok = False
    if not ok:
        log.warning("connection closed or timed out inside a PDU")
        self.event_queue.put("Evt17")
        return
    if direct is not None:
        if direct.take(self, pdu_view):
            return
        pdu_bytes = bytearray(pdu_view)  # pynetdicom keeps it: its own copy
    try:
        pdu, event = self._decode_pdu(pdu_bytes)
    except Exception:  # noqa: BLE001 - any decoding failure is an invalid PDU
        log.warning("peer sent an undecodable PDU; aborting")
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
