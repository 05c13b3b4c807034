"""The DICOM node's interface, and the node that receives in the daemon's process.

Owns: ``DicomNode`` (what the daemon and the control socket use: start, stop,
counters, receipts, workers alive, supervision), implemented by ``LocalNode``
(here: listeners, an accept thread, one thread per connection) and by
agent.dicom.pool.ReceivePool (connections handed to worker processes); and
``serve_connection``, which both run for one connection: the TLS handshake
within the ACSE timeout, then the acceptor.  May import agent.config,
agent.store.inbox, agent.ops.liveness and agent.dicom.*.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Hashable
from typing import Protocol

from agent.config import DicomSettings
from agent.dicom import transport as tp
from agent.dicom.acceptor import Acceptor, AcceptorSettings, Owner
from agent.dicom.admission import AuditFn, PeerLimiter, PeerLimits
from agent.dicom.commitment import CommitmentReports, ReportFn
from agent.dicom.dimse import HandlerRegistry, default_registry
from agent.dicom.negotiation import VERIFICATION, storage_sop_classes
from agent.dicom.scp import ReceiptDrainer, ReceiptLog, ReceiveCounters, StoreDecisions
from agent.dicom.services import register_completion, report_retries
from agent.ops.liveness import Stage
from agent.store.inbox import Inbox, StoreReceipt

log = logging.getLogger(__name__)

# How long ``stop`` lets open associations finish before their connections are closed.
STOP_GRACE = 10.0


class DicomNode(Protocol):
    """The DICOM node as the daemon sees it, whichever process receives."""

    limiter: PeerLimiter
    beats: bool  # supervised by its liveness stage (see ``supervise``)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def counters(self) -> ReceiveCounters: ...

    @property
    def workers_alive(self) -> int: ...

    def drain_receipts(self, *, idle: bool = False) -> int: ...

    def supervise(self, stage: Stage, silent_after: float) -> None:
        """Beat ``stage`` while serving; replace a part silent for ``silent_after`` s."""
        ...


def peer_limits(s: DicomSettings) -> PeerLimits:
    return PeerLimits(
        max_connections_per_peer=s.max_associations_per_peer + 2,
        max_connections=s.max_associations * 2,
        associations_per_minute_per_peer=s.associations_per_minute_per_peer,
    )


def tls_context(s: DicomSettings) -> ssl.SSLContext | None:
    tls = s.tls
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None and tls.ca is not None
    return tp.server_context(tls.cert, tls.key, tls.ca,
                             require_client_cert=tls.require_client_cert)


def acceptor_settings(s: DicomSettings) -> AcceptorSettings:
    return AcceptorSettings(ae_title=s.ae_title, max_pdu=s.max_pdu, artim=s.acse_timeout,
                            pdu_timeout=s.pdu_timeout, idle_timeout=s.network_timeout)


OFFERED = storage_sop_classes() | {VERIFICATION}


def serve_connection(conn: socket.socket, address: tuple[str, int], tls: ssl.SSLContext | None,
                     settings: AcceptorSettings, owner: Owner, registry: HandlerRegistry) -> None:
    """Serve one accepted connection to its end in the calling thread (never raises)."""
    try:
        sock: socket.socket = conn
        subject = None
        if tls is not None:
            try:
                sock = tp.tls_handshake(tls, conn, settings.artim)
            except tp.HandshakeFailed as exc:
                owner.refused_connection(address[0], str(exc))
                return
            subject = tp.peer_subject(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = tp.PduChannel(sock, max_pdata=settings.max_pdu, pdu_timeout=settings.pdu_timeout)
        Acceptor(channel, address, settings, owner, registry, OFFERED, subject=subject,
                 tls=tls is not None).run()
    except Exception:  # noqa: BLE001 - one connection's failure is its own
        log.exception("serving a DICOM connection from %s failed", address[0])
        tp.close_quietly(conn)


class LocalNode:
    """Receives in this process: listeners, admission at accept, one thread per connection."""

    beats = False

    def __init__(
        self,
        settings: DicomSettings,
        inbox: Inbox,
        *,
        audit: AuditFn,
        on_stored: Callable[[StoreReceipt], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
        receipts: ReceiptLog | None = None,
        hold: Callable[[], str | None] | None = None,
        registry: HandlerRegistry | None = None,
        on_commitment: ReportFn | None = None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        """``receipts``: the audit records of stored instances are journaled in
        the inbox and moved there in batches (agent.dicom.scp.ReceiptDrainer).
        ``on_commitment``: where Storage Commitment reports go (the results
        delivery); without it the node does not take Storage Commitment reports.
        ``wake``: an MPPS or a commitment request may have completed a study."""
        self.s = settings
        self.limiter = PeerLimiter(peer_limits(settings))
        self.decisions = StoreDecisions(
            settings, inbox, audit=audit, limiter=self.limiter, on_stored=on_stored,
            accepting=accepting, journal_receipts=receipts is not None,
            on_associated=self._associated, hold=hold)
        self.drainer = ReceiptDrainer(inbox, receipts) if receipts is not None else None
        self.registry = registry or default_registry()
        if on_commitment is not None:
            CommitmentReports(on_commitment, audit).register(self.registry)
        register_completion(self.registry, settings, inbox.completion, audit, wake)
        self.retries = report_retries(settings, inbox.completion, audit)
        self._acceptor = acceptor_settings(settings)
        self._tls = tls_context(settings)
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._conns: dict[Hashable, socket.socket] = {}
        self._conns_lock = threading.Lock()
        self._idle = threading.Condition(self._conns_lock)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- DicomNode ---------------------------------------------------------------

    @property
    def counters(self) -> ReceiveCounters:
        return self.decisions.snapshot()

    @property
    def workers_alive(self) -> int:
        return 0

    def supervise(self, stage: Stage, silent_after: float) -> None:
        return None  # its threads are watched by the daemon (liveness probe)

    def drain_receipts(self, *, idle: bool = False) -> int:
        assert self.drainer is not None
        return self.drainer.drain(idle=idle)

    def start(self) -> None:
        if self.drainer is not None:
            self.drainer.start()
        self.retries.start()  # before listening: what a previous run owed is due now
        tls = self.s.tls
        try:
            if not tls.enabled or tls.plain_listener:
                self._listeners.append((tp.listen(self.s.host, self.s.port), False))
                log.info("DICOM listening on %s:%d as %s", self.s.host, self.s.port,
                         self.s.ae_title)
            if tls.enabled:
                self._listeners.append((tp.listen(self.s.host, tls.port), True))
                log.info("DICOM TLS listening on %s:%d (client certificate %s)", self.s.host,
                         tls.port, "required" if tls.require_client_cert else "optional")
        except Exception:
            self._close_listeners()
            self.retries.stop()
            if self.drainer is not None:
                self.drainer.stop()
            raise
        for sock, is_tls in self._listeners:
            self._sel.register(sock, selectors.EVENT_READ, is_tls)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listeners; let open associations finish (bounded), then close them."""
        self._stop.set()
        self.retries.stop()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._close_listeners()
        deadline = time.monotonic() + STOP_GRACE
        with self._idle:
            while self._conns and time.monotonic() < deadline:
                self._idle.wait(0.1)
            for dup in self._conns.values():  # their readers see the end of the stream
                with contextlib.suppress(OSError):
                    dup.shutdown(socket.SHUT_RDWR)
            while self._conns and time.monotonic() < deadline + 5:
                self._idle.wait(0.1)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.drainer is not None:
            self.drainer.stop()

    # -- accepting ---------------------------------------------------------------

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        self._listeners = []

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for key, _ in self._sel.select(timeout=1.0):
                    if key.data is None:
                        continue  # woken to stop
                    self._accept(key.fileobj, bool(key.data))  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - the accept loop must outlive any one failure
                if self._stop.is_set():
                    return
                log.exception("DICOM accept loop cycle failed")
                self._stop.wait(0.5)

    def _accept(self, lsock: socket.socket, tls: bool) -> None:
        for _ in range(64):  # drain a burst of connections
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            address = (str(addr[0]), int(addr[1]))
            admitted = self.limiter.admit(address[0], address)
            if not admitted.ok:
                tp.close_quietly(conn)
                self.decisions.refused_connection(address[0],
                                                  "too many open connections from this peer")
                continue
            if admitted.evict is not None:
                self._evict(*admitted.evict)
            conn.setblocking(True)
            with self._conns_lock:
                self._conns[address] = conn.dup()
            threading.Thread(target=self._serve, args=(conn, address, tls),
                             name="dicom-association", daemon=True).start()

    def _serve(self, conn: socket.socket, address: tuple[str, int], tls: bool) -> None:
        try:
            serve_connection(conn, address, self._tls if tls else None, self._acceptor,
                             self.decisions, self.registry)
        finally:
            self.limiter.release(address[0], address)
            with self._idle:
                dup = self._conns.pop(address, None)
                self._idle.notify_all()
            if dup is not None:
                dup.close()

    def _associated(self, addr: str, port: int) -> None:
        self.limiter.associated(addr, (addr, port))

    def _evict(self, peer: str, key: Hashable) -> None:
        """Close a connection whose slot went to another peer (see agent.dicom.admission)."""
        with self._conns_lock:
            dup = self._conns.get(key)
        if dup is not None:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)  # its reader sees the end of the stream
        self.decisions.refused_connection(
            peer, "connection closed to give its slot to another peer (fair share)")
