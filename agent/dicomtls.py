"""The DICOM transport: listener, DICOM TLS (PS3.15 Annex B, BCP 195) and PDU bounds.

pynetdicom's stock server has three weaknesses for a box facing a hospital
network, addressed here:

* it performs the TLS handshake inside the accept loop with no timeout, so one
  peer that connects and never sends a ClientHello stops every later
  connection.  ``EdgeAssociationServer`` accepts plain sockets and does the
  handshake in the connection's own thread, bounded by the ACSE timeout;
* it admits any number of connections per peer before the first PDU is read;
  here every connection is counted per peer address at ``accept``, with a
  fair share between addresses (``agent/ratelimit.py``);
* it reads a PDU of whatever length the peer announces (up to 4 GiB) into
  memory.  ``install_pdu_guard`` replaces the PDU reader with one that
  refuses a P-DATA-TF longer than the maximum length we negotiated, and any
  other PDU longer than ``MAX_CONTROL_PDU``, before reading its body: the peer
  gets an A-ABORT and the connection is closed;
* its PDU read blocks without a deadline once the first byte of a PDU is
  there: 30 bytes of an A-ASSOCIATE-RQ held a connection (and its thread)
  forever, since the ARTIM timer is only looked at between reads.  Here the
  rest of an A-ASSOCIATE-RQ must arrive before ARTIM expires (PS3.8 9.1.5),
  and any other PDU within ``[dicom] pdu_timeout`` of its first byte; sends
  are bounded by the same timeout.  A peer that misses it is dropped;
* a P-DATA-TF on a presentation context that was not accepted killed
  pynetdicom's DUL thread (a KeyError deep in its decoder) without any close
  event; here it is refused with an A-ABORT before pynetdicom sees it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Protocol, cast

from cryptography import x509
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
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
# A-ABORT-RQ, source: service provider (2), reason: invalid PDU parameter value (6).
ABORT_INVALID_PARAMETER = bytes([0x07, 0x00]) + struct.pack(">L", 4) + bytes([0, 0, 2, 6])
# A-ABORT-RQ, source: service provider (2), reason: not specified (0).
ABORT_NOT_SPECIFIED = bytes([0x07, 0x00]) + struct.pack(">L", 4) + bytes([0, 0, 2, 0])
# Used when an association is not ours (a requestor of this process).
DEFAULT_PDU_TIMEOUT = 60.0

# BCP 195 (RFC 9325) recommended suites for TLS 1.2; TLS 1.3 suites are all fine.
_BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)

Rejector = Callable[[str, str], None]


class ConnectionOwner(Protocol):
    """What the transport tells the storage SCP that owns its server."""

    def association_over(self, assoc: Any) -> None:
        """The association's thread has ended, however it ended (idempotent)."""

    def connection_stalled(self, assoc: Any, why: str) -> None:
        """A PDU missed its deadline; the connection is being dropped."""

    def connection_evicted(self, peer: str, why: str) -> None:
        """A connection without an association was closed to give its slot away."""


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
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            _settle(assoc)
            owner = getattr(self.server, "edge_owner", None)
            if owner is not None:
                owner.association_over(assoc)


def _settle(assoc: Any) -> None:
    """After the association thread: no DUL thread or socket outlives it.

    Normally both are gone already.  When pynetdicom's association thread died
    of an exception, its DUL may still run: close the transport under it (the
    reader wakes up, reaches Sta1 and exits) and wait a bounded time for it."""
    dul = getattr(assoc, "dul", None)
    if dul is None or not dul.is_alive():
        return
    sock = getattr(dul, "socket", None)
    if sock is not None:
        with contextlib.suppress(Exception):
            sock.close()
    dul.kill_dul()
    dul.join(timeout=5)


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
    edge_pdu_timeout: float
    edge_on_refused: Rejector
    edge_owner: ConnectionOwner
    # Each open connection by its client address, as a duplicate socket: a slot
    # given away to another peer is closed through it (the original object may
    # have been detached into an SSLSocket meanwhile).
    edge_conns: dict[Hashable, socket.socket]

    def configure(self, *, limiter: PeerLimiter, tls: ssl.SSLContext | None,
                  handshake_timeout: float, pdu_timeout: float, on_refused: Rejector,
                  owner: ConnectionOwner) -> None:
        self.edge_limiter = limiter
        self.edge_tls = tls
        self.edge_handshake_timeout = handshake_timeout
        self.edge_pdu_timeout = pdu_timeout
        self.edge_on_refused = on_refused
        self.edge_owner = owner
        self.edge_conns = {}
        self.edge_conns_lock = threading.Lock()
        self.RequestHandlerClass = EdgeRequestHandler
        self.contexts = SharedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Never handshake here: this runs in the single accept thread.
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        key = tuple(client_address)
        admitted = self.edge_limiter.admit(peer, key)
        if not admitted.ok:
            self.edge_on_refused(peer, "too many open connections from this peer")
            return False
        with self.edge_conns_lock:
            self.edge_conns[key] = request.dup()
        if admitted.evict is not None:
            self.evict(*admitted.evict)
        return True

    def evict(self, peer: str, key: Hashable) -> None:
        """Close a connection whose slot went to another peer (see ratelimit)."""
        with self.edge_conns_lock:
            dup = self.edge_conns.get(key)
        if dup is not None:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)  # its reader sees the end of the stream
        self.edge_owner.connection_evicted(peer, "connection closed to give its slot to "
                                                 "another peer (fair share)")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        key = tuple(client_address)
        try:
            if self.edge_tls is not None:
                request = self._handshake(request, peer)
                if request is None:
                    return
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The base timeout of every send and read; reads of a PDU are held to
            # its deadline on top (see _read_pdu_bounded).
            request.settimeout(self.edge_pdu_timeout)
            super().process_request_thread(request, client_address)
        finally:
            self.edge_limiter.release(peer, key)
            with self.edge_conns_lock:
                dup = self.edge_conns.pop(key, None)
            if dup is not None:
                dup.close()

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
    """Replace pynetdicom's PDU reader, and guard its DIMSE decoder (process wide,
    idempotent)."""
    global _guard_on
    with _installed:
        if not _guard_on:
            DULServiceProvider._read_pdu_data = _read_pdu_bounded  # type: ignore[method-assign]
            DIMSEServiceProvider.receive_primitive = (  # type: ignore[method-assign]
                _receive_primitive_guarded)
            _guard_on = True


_real_receive_primitive = DIMSEServiceProvider.receive_primitive


def _receive_primitive_guarded(self: DIMSEServiceProvider, primitive: Any) -> None:
    """pynetdicom's DIMSE decoding of a P-DATA primitive, which runs in the DUL
    thread: a command set it cannot read (no Command Field, a broken element)
    raised out of it and killed that thread.  The peer gets an A-ABORT instead."""
    try:
        _real_receive_primitive(self, primitive)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises on peer bytes
        self.message = None
        dul = self.dul
        log.warning("peer %s sent a DIMSE message that cannot be decoded (%s); aborting",
                    _peer(dul), type(exc).__name__)
        stream = getattr(dul.assoc, "_edge_pdata", None)
        if stream is not None:
            stream.interrupted("undecodable DIMSE message")
        abort_transport(dul.socket)


def _local_max(dul: DULServiceProvider) -> int:
    assoc = dul.assoc
    own = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return int(own.maximum_length or 0)


# A deadline is enforced to within this much: the socket's own timeout is only
# lowered (a syscall) when the deadline is nearer than that.
_DEADLINE_SLACK = 1.0
# DUL states whose PDU is bounded by the ARTIM timer: awaiting the A-ASSOCIATE-RQ
# (Sta2; and Sta1, where an acceptor's DUL reads the first PDU in the same loop
# that would process the connection event and start ARTIM), and awaiting the
# transport close after a release or abort (Sta13).
_ARTIM_STATES = frozenset({"Sta1", "Sta2", "Sta13"})
# Before an association: the transport is closed without an A-ABORT (PS3.8 AA-2).
_UNASSOCIATED_STATES = frozenset({"Sta1", "Sta2"})
# DUL states in which a P-DATA-TF is handed to the DIMSE layer.
_DATA_STATES = frozenset({"Sta6", "Sta7", "Sta8"})


class _Stalled(Exception):
    """A PDU did not arrive whole before its deadline."""


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> bool:
    """Fill ``view`` from the socket before ``deadline`` (monotonic); False when
    the peer closed first, _Stalled when the deadline passed."""
    got, n = 0, len(view)
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Stalled
        current = sock.gettimeout()
        if current is None or left < current - _DEADLINE_SLACK:
            sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            continue  # the socket's own timeout may be shorter than the deadline
        if k == 0:
            return False
        got += k
    return True


def _deadline(dul: DULServiceProvider) -> tuple[float, str]:
    """When the PDU now arriving must be complete, and which limit says so."""
    now = time.monotonic()
    if dul.state_machine.current_state in _ARTIM_STATES:
        artim = dul.artim_timer
        if artim.timeout is not None:
            return now + max(0.01, artim.remaining), "the ARTIM timer (acse_timeout)"
    server = getattr(dul.assoc, "_server", None)
    limit = getattr(server, "edge_pdu_timeout", None)
    if limit is None:
        limit = dul.assoc.network_timeout or DEFAULT_PDU_TIMEOUT
    return now + float(limit), "pdu_timeout"


def abort_transport(assoc_sock: Any, pdu: bytes = ABORT_INVALID_PARAMETER) -> None:
    """A-ABORT (provider, invalid parameter by default) and close, bypassing the
    state machine: what follows on the stream is not to be read.  pynetdicom sees
    the close (Evt17)."""
    raw = getattr(assoc_sock, "socket", None)
    if raw is not None:
        try:
            raw.sendall(pdu)
        except OSError:
            pass
    assoc_sock.close()


def _rx_buffer(dul: DULServiceProvider, size: int) -> bytearray:
    buf: bytearray | None = getattr(dul, "_edge_rx", None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(dul, "_edge_rx", buf)  # noqa: B010 - pynetdicom object
    return buf


def unaccepted_context(pdu: memoryview, accepted: Any) -> int | None:
    """The first presentation context ID of a P-DATA-TF that is not in
    ``accepted``; None when every PDV is on an accepted context or the PDU is
    malformed (reported on its own path)."""
    end = len(pdu)
    pos = 6
    while pos + 6 <= end:
        length = struct.unpack_from(">L", pdu, pos)[0]
        cid = pdu[pos + 4]
        if length < 2 or pos + 4 + length > end:
            return None
        if cid not in accepted:
            return int(cid)
        pos += 4 + length
    return None


def _peer(dul: DULServiceProvider) -> str:
    return str(getattr(dul.assoc.requestor, "address", "") or "?")


def _stalled(dul: DULServiceProvider, assoc_sock: Any, state: str, limit: str) -> None:
    """Drop a connection whose PDU missed its deadline.  Before an association
    (ARTIM, PS3.8 9.1.5 AA-2) the transport is just closed; inside one, the peer
    gets an A-ABORT first."""
    why = f"incomplete PDU when {limit} expired"
    log.warning("peer %s sent an %s; closing the connection", _peer(dul), why)
    owner = getattr(getattr(dul.assoc, "_server", None), "edge_owner", None)
    if owner is not None:
        try:
            owner.connection_stalled(dul.assoc, why)
        except Exception:  # noqa: BLE001 - bookkeeping must not keep the socket open
            log.exception("recording a stalled connection failed")
    if state in _UNASSOCIATED_STATES:
        assoc_sock.close()
    else:
        abort_transport(assoc_sock, ABORT_NOT_SPECIFIED)


def _read_pdu_bounded(self: DULServiceProvider) -> None:
    """Read one PDU, refusing oversized ones before their body is read, and
    dropping the connection when the PDU misses its deadline.

    Events as in pynetdicom: Evt17 transport closed, Evt19 invalid PDU,
    otherwise the event of the decoded PDU type.
    """
    assoc_sock = self.socket
    raw = getattr(assoc_sock, "socket", None)
    if assoc_sock is None or raw is None:
        self.event_queue.put("Evt17")
        return
    state = self.state_machine.current_state
    deadline, limit_name = _deadline(self)
    base = raw.gettimeout()
    try:
        _read_pdu_within(self, assoc_sock, raw, state, deadline)
    except _Stalled:
        _stalled(self, assoc_sock, state, limit_name)
    finally:
        if raw.gettimeout() != base:
            with contextlib.suppress(OSError):
                raw.settimeout(base)


def _read_pdu_within(self: DULServiceProvider, assoc_sock: Any, raw: socket.socket, state: str,
                     deadline: float) -> None:
    head = bytearray(6)
    try:
        ok = _recv_into(raw, memoryview(head), deadline)
    except OSError:
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
            log.warning("peer %s sent an unknown PDU type 0x%02X; aborting", _peer(self),
                        pdu_type)
        else:
            log.warning("peer %s sent a PDU of %d bytes, over the %d allowed; aborting",
                        _peer(self), length, limit)
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
        ok = _recv_into(raw, pdu_view[6:], deadline)
    except OSError:
        ok = False
    if not ok:
        log.warning("peer %s closed the connection inside a PDU", _peer(self))
        self.event_queue.put("Evt17")
        return
    if pdu_type == P_DATA_TF and state in _DATA_STATES:
        cid = unaccepted_context(pdu_view, self.assoc._accepted_cx)
        if cid is not None:
            # pynetdicom's decoder would die on it (KeyError) and take the
            # association's bookkeeping with it.
            why = f"P-DATA-TF on presentation context {cid}, which was not accepted"
            log.warning("peer %s sent a %s; aborting", _peer(self), why)
            if direct is not None:
                direct.interrupted(why)
            abort_transport(assoc_sock)
            return
    if direct is not None:
        if direct.take(self, pdu_view):
            return
        pdu_bytes = bytearray(pdu_view)  # pynetdicom keeps it: its own copy
    try:
        pdu, event = self._decode_pdu(pdu_bytes)
    except Exception:  # noqa: BLE001 - any decoding failure is an invalid PDU
        log.warning("peer %s sent an undecodable PDU; aborting", _peer(self))
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
