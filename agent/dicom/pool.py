"""Receive worker processes: concurrent associations on every core.

Owns the main-process half of receiving in worker processes (a ``DicomNode``).
Python runs one thread at a time per process, and receiving a C-STORE is
mostly Python, so one process tops out at one core however many modalities
send at once.  With ``[dicom] workers = N > 1`` the daemon keeps the listening
sockets and the admission decisions, and hands each accepted connection to one
of N worker processes (agent.dicom.worker), which run the acceptor on it
exactly as the in-process node does and commit into the same inbox index
(SQLite in WAL mode serialises their transactions).

What stays in the main process, so that it holds across workers:

* the listening sockets and ``accept``;
* the connection bounds (per peer and in total), counted at ``accept``;
* the association bounds (rate and concurrent associations per peer, total):
  at A-ASSOCIATE-RQ, once the called AE title and the allowlist passed, the
  worker asks and gets a ``Verdict`` back (a round trip over a local socket),
  so it rejects with the same PS3.8 reasons, in the same order, as the
  in-process node;
* the audit log (one writer keeps the hash chain): workers journal their
  records in the inbox, and the main process moves them over
  (``ReceiptDrainer``);
* assembly and processing.

The listeners open once every worker has said it is ready (imported and set up,
``READY_TIMEOUT`` at most): a worker takes about half a second of CPU to start,
and a connection handed to one that is still importing waits for it.  So the
daemon's port (and its systemd READY=1) means it receives at full speed.

Connections go to a ready worker with the fewest open ones (one that is still
starting, e.g. after a restart, only when none is ready).  A worker dies with
the daemon (``PR_SET_PDEATHSIG``), and a worker that exits is restarted; so is
one that has sent nothing (not even its counters heartbeat, every 5 s) for the
stage deadline (``[watchdog] stage_deadline_seconds``, at least 15 s): it is
hung, and killing it costs only its own associations.  Their
open associations are lost, which their peers see as an aborted association
(nothing unacknowledged was promised).  Each worker writes instance files in
its own slot directory; the main process cleans them at start, before any
worker runs.

Channel: one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair per worker, pickled
tuples (both ends are this program), connections passed with ``SCM_RIGHTS``.
May import agent.config, agent.crypto, agent.store.inbox, agent.ops.liveness and
agent.dicom.{admission, scp, services, transport}.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import DicomSettings, InboxSettings, StudySettings
from agent.crypto import KeyEncryptionKey
from agent.dicom import transport as tp
from agent.dicom.admission import (
    AuditFn,
    AuditThrottle,
    PeerLimiter,
    PeerLimits,
    Verdict,
    association_limit,
    audit_refused,
)
from agent.dicom.commitment import ReportLaterFn
from agent.dicom.scp import ReceiptDrainer, ReceiptLog, ReceiveCounters
from agent.dicom.services import report_retries
from agent.ops.liveness import Stage
from agent.store.inbox import Inbox, StoreReceipt

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
_RESTART_BACKOFF = (0.2, 1.0, 5.0)
# A worker reports at least every 5 s (worker.COUNTERS_HEARTBEAT); silence is
# judged over three of those at least, so a busy machine does not look hung.
_SILENT_FLOOR = 15.0
# How long ``start`` waits for the workers to be ready before it listens anyway.
READY_TIMEOUT = 30.0
_COUNTER_FIELDS = tuple(f.name for f in dataclasses.fields(ReceiveCounters) if f.name != "by_peer")


@dataclass(frozen=True)
class WorkerInit:
    """Everything a worker needs; sent over its channel (never on disk or argv)."""

    index: int
    dicom: DicomSettings
    inbox_root: Path
    inbox: InboxSettings
    study: StudySettings
    kek: KeyEncryptionKey
    pseudonym_key: bytes
    log_level: str
    commitment: bool = False  # relay Storage Commitment reports to the daemon


@dataclass(frozen=True)
class Handoff:
    """An accepted connection on its way to a worker (the socket travels alongside)."""

    conn_id: int
    address: tuple[str, int]
    tls: bool


def send_msg(chan: socket.socket, msg: object, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(msg)
    if fds:
        socket.send_fds(chan, [data], list(fds))
    else:
        chan.send(data)


def recv_msg(chan: socket.socket) -> tuple[object, list[int]] | None:
    """One message and the descriptors that came with it; None at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    # Both ends are this program over a private socket pair: pickle is not
    # exposed to anything a peer on the network controls.
    return pickle.loads(data), fds  # noqa: S301


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    chan: socket.socket
    open: int = 0
    ready: bool = False  # imported and set up: it sent ("ready",)
    counters: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    heard_at: float = field(default_factory=time.monotonic)


class ReceivePool:
    """The main-process half: listeners, admission, hand-off, supervision
    (agent.dicom.node.DicomNode)."""

    beats = True

    def __init__(
        self,
        settings: DicomSettings,
        inbox: Inbox,
        init: Callable[[int], WorkerInit],
        *,
        audit: AuditFn,
        on_stored: Callable[[StoreReceipt | None], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
        receipts: ReceiptLog | None = None,
        on_commitment: ReportLaterFn | None = None,
    ) -> None:
        """``on_commitment``: where the Storage Commitment reports a worker
        receives are relayed to (see agent.dicom.worker); it answers later, from
        its own thread, and the dispatcher passes the answer back to the worker."""
        self.s = settings
        self.on_commitment = on_commitment
        self.inbox = inbox
        inbox.share_with_workers()
        self._init = init
        self.audit = audit
        self.on_stored = on_stored or (lambda _r: None)
        self.accepting = accepting
        self.drainer = ReceiptDrainer(inbox, receipts, eager=True) if receipts is not None else None
        # Workers make the first attempt of a commitment report; retries (and what a
        # previous run owed) are sent from here, one loop for the whole daemon.
        self.retries = report_retries(settings, inbox.completion, audit)
        self.limiter = PeerLimiter(PeerLimits(
            max_connections_per_peer=settings.max_associations_per_peer + 2,
            max_connections=settings.max_associations * 2,
            associations_per_minute_per_peer=settings.associations_per_minute_per_peer,
        ))
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * settings.workers
        self._restarts = [0] * settings.workers
        self._restart_at = [0.0] * settings.workers
        self._conns: dict[int, tuple[_Worker, str, bool]] = {}
        self._by_peer: dict[str, int] = {}
        self._next_conn = 0
        self._own = ReceiveCounters()
        self._retired: dict[str, int] = dict.fromkeys(_COUNTER_FIELDS, 0)
        self._stored_seen = 0
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._sel = selectors.DefaultSelector()
        # Answers to relayed commitment reports, from the delivery's thread: the
        # dispatcher sends them (it alone writes to the channels), woken by _wake_w.
        self._answers: collections.deque[tuple[_Worker, object, bool]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full pipe already means a wake is pending
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._refusals = AuditThrottle()
        # Set by the daemon before start: the dispatcher beats its liveness stage, and a
        # worker silent for this long is replaced (agent/ops/liveness.py).
        self.stage: Stage | None = None
        self.silent_after = 120.0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.drainer is not None:
            self.drainer.start()
        self.retries.start()  # before any worker runs: nothing holds a kept report now
        # Spawned from the calling (main) thread: PR_SET_PDEATHSIG follows the
        # thread that created the child, and this one lives as long as the daemon.
        # Before listening: a connection that comes in finds its worker starting.
        for i in range(self.s.workers):
            self._spawn(i)
        self._await_ready(time.monotonic() + READY_TIMEOUT)
        tls = self.s.tls
        if not tls.enabled or tls.plain_listener:
            self._listen(self.s.port, tls=False)
        if tls.enabled:
            self._listen(tls.port, tls=True)
        self._thread = threading.Thread(target=self._loop, name="dicom-dispatch", daemon=True)
        self._thread.start()
        log.info("DICOM listening on %s:%d as %s with %d receive workers", self.s.host,
                 self.s.port, self.s.ae_title, self.s.workers)

    def _await_ready(self, deadline: float) -> None:
        """Read the workers' channels here (the dispatcher does not run yet) until
        each is ready or gone, or ``deadline``; a worker that exits is restarted
        later by the dispatcher, as always."""
        while time.monotonic() < deadline:
            waiting = [w for w in self._workers if w is not None and not w.ready]
            if not waiting:
                return
            left = max(0.0, deadline - time.monotonic())
            for key, _ in self._sel.select(timeout=min(0.25, left)):
                kind, obj = key.data
                if kind == "worker":
                    self._from_worker(obj)
            for w in waiting:
                if self._workers[w.index] is w and w.proc.poll() is not None:
                    self._worker_gone(w)
        slow = [w.index for w in self._workers if w is not None and not w.ready]
        if slow:
            log.warning("receive worker(s) %s not ready after %.0f s; listening anyway (their "
                        "connections wait until they are)", slow, READY_TIMEOUT)

    def _listen(self, port: int, *, tls: bool) -> None:
        sock = tp.listen(self.s.host, port)
        self._listeners.append((sock, tls))
        self._sel.register(sock, selectors.EVENT_READ, ("listen", tls))

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listeners, let open associations finish (bounded), stop workers.

        The dispatcher keeps running meanwhile: workers still report closed
        connections and counters while their associations finish.  It owns the
        worker list, so it is also the one that retires the exited workers."""
        self._stopping.set()
        self.retries.stop()
        deadline = time.monotonic() + timeout + 2
        while self._listeners and self._thread is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # the dispatcher closes them between two selects
        for w in [x for x in self._workers if x is not None]:
            with contextlib.suppress(OSError):
                send_msg(w.chan, ("stop", timeout))
        if self._thread is None:  # never dispatched (a listener failed): wait for them here
            for w in [x for x in self._workers if x is not None]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(max(0.1, deadline - time.monotonic()))
        while (self._thread is not None and any(w is not None for w in self._workers)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        for w in [x for x in self._workers if x is not None and x.proc.poll() is None]:
            log.warning("receive worker %d did not stop in time: killing it", w.index)
            w.proc.kill()
        while (self._thread is not None and any(w is not None for w in self._workers)
               and time.monotonic() < deadline + 5):
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for w in [x for x in self._workers if x is not None]:  # dispatcher gone: retire here
            w.proc.wait()
            self._collect(w)
            w.chan.close()
        self._workers = [None] * len(self._workers)
        self._close_listeners()
        self._answers.clear()  # their workers are gone
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        if self.drainer is not None:
            self.drainer.stop()

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        self._listeners = []

    def supervise(self, stage: Stage, silent_after: float) -> None:
        """Set before start: the dispatcher beats ``stage``, and a worker silent for
        ``silent_after`` seconds is replaced (agent/ops/liveness.py)."""
        self.stage = stage
        self.silent_after = silent_after

    def drain_receipts(self, *, idle: bool = False) -> int:
        assert self.drainer is not None
        return self.drainer.drain(idle=idle)

    # -- counters ---------------------------------------------------------------

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self._workers if w is not None and w.proc.poll() is None)

    @property
    def counters(self) -> ReceiveCounters:
        with self._lock:
            total = dict(self._retired)
            by_peer: dict[str, int] = {}
            for w in self._workers:
                if w is None:
                    continue
                for k in _COUNTER_FIELDS:
                    total[k] += int(w.counters.get(k, 0))
                for peer, n in w.counters.get("by_peer", {}).items():
                    by_peer[peer] = by_peer.get(peer, 0) + int(n)
            own = self._own
            total["connections_refused"] += own.connections_refused
            total["tls_failures"] += own.tls_failures
        return ReceiveCounters(**{k: total[k] for k in _COUNTER_FIELDS}, by_peer=by_peer)

    def _collect(self, w: _Worker) -> None:
        """Keep a stopped worker's totals (its process is gone, its counts stay)."""
        with self._lock:
            for k in _COUNTER_FIELDS:
                if k != "active":
                    self._retired[k] += int(w.counters.get(k, 0))
            w.counters = {}

    # -- workers ----------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.dicom.worker", str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                # The directory that holds the agent package (the repository or
                # site-packages): with -m it becomes sys.path[0]. Not agent/ itself,
                # where agent/types.py would shadow the standard library's types.
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        finally:
            child.close()
        # A worker that cannot take a message for this long is hung: the send
        # fails and the worker is replaced, rather than the dispatcher waiting.
        parent.settimeout(5.0)
        w = _Worker(index, proc, parent)
        send_msg(parent, ("init", self._init(index)))
        self._workers[index] = w
        self._sel.register(parent, selectors.EVENT_READ, ("worker", w))
        log.info("receive worker %d started (pid %d)", index, proc.pid)

    def _worker_gone(self, w: _Worker) -> None:
        if self._workers[w.index] is not w:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(w.chan)
        w.chan.close()
        code = w.proc.poll()
        if code is None:
            w.proc.kill()
            code = w.proc.wait()
        lost = [cid for cid, (owner, _, _) in self._conns.items() if owner is w]
        for cid in lost:
            self._release(cid)
        self._collect(w)
        self._workers[w.index] = None
        if self._stopping.is_set():
            return
        # A worker that keeps dying is restarted less eagerly.
        quick = time.monotonic() - w.started_at < 10
        self._restarts[w.index] = self._restarts[w.index] + 1 if quick else 0
        delay = _RESTART_BACKOFF[min(self._restarts[w.index], len(_RESTART_BACKOFF) - 1)]
        self._restart_at[w.index] = time.monotonic() + delay
        log.error("receive worker %d exited (status %s) with %d open association(s); "
                  "restarting in %.1f s", w.index, code, len(lost), delay)
        self.audit("dicom.worker_exited", outcome="serious_failure",
                   details={"worker": w.index, "status": code, "open_associations": len(lost)})

    def _restart_due(self) -> None:
        if self._stopping.is_set():
            return
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            if w is None and now >= self._restart_at[i]:
                try:
                    self._spawn(i)
                except OSError as exc:
                    log.error("cannot restart receive worker %d: %s", i, exc)
                    self._restart_at[i] = now + _RESTART_BACKOFF[-1]

    # -- dispatch ---------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._stopping.is_set() and self._listeners:
                    self._close_listeners()
                events = self._sel.select(timeout=0.05 if self._stopping.is_set() else 0.25)
                for key, _ in events:
                    kind, obj = key.data
                    if kind == "listen":
                        self._accept(key.fileobj, bool(obj))  # type: ignore[arg-type]
                    elif kind == "wake":
                        self._send_answers()
                    else:
                        self._from_worker(obj)
                if self.stage is not None:
                    self.stage.beat(doing="dispatching connections")
                for w in list(self._workers):
                    if w is not None and w.proc.poll() is not None:
                        self._worker_gone(w)
                self._replace_silent()
                self._restart_due()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one failure
                log.exception("receive dispatcher cycle failed")
                self._stop.wait(0.5)

    def _replace_silent(self) -> None:
        """Kill a worker that stopped talking (hung, or stopped); it is restarted
        like one that exited, and audited as such."""
        if self._stopping.is_set():
            return
        limit = max(self.silent_after, _SILENT_FLOOR)
        now = time.monotonic()
        for w in list(self._workers):
            if w is not None and now - w.heard_at > limit:
                log.error("receive worker %d (pid %d) sent nothing for %.0f s: it is hung; "
                          "killing and replacing it", w.index, w.proc.pid, now - w.heard_at)
                self._worker_gone(w)

    def _accept(self, lsock: socket.socket, tls: bool) -> None:
        for _ in range(64):  # drain a burst of connections, then look at workers again
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            with conn:
                self._admit(conn, (str(addr[0]), int(addr[1])), tls)

    def _admit(self, conn: socket.socket, addr: tuple[str, int], tls: bool) -> None:
        peer = addr[0]
        self._next_conn += 1
        cid = self._next_conn
        admitted = self.limiter.admit(peer, cid)
        if not admitted.ok:
            self._refused(peer, "too many open connections from this peer")
            return
        if admitted.evict is not None:
            self._evict(*admitted.evict)
        conn.setblocking(True)
        # The least busy ready worker; one that died since the last look is retired
        # and the next one takes the connection.
        for w in sorted((x for x in self._workers if x is not None),
                        key=lambda x: (not x.ready, x.open)):
            try:
                send_msg(w.chan, ("conn", Handoff(cid, addr, tls)), (conn.fileno(),))
            except OSError as exc:
                log.error("cannot hand a connection to receive worker %d: %s", w.index, exc)
                self._worker_gone(w)
                continue
            w.open += 1
            self._conns[cid] = (w, peer, False)
            return
        self.limiter.release(peer, cid)
        self._refused(peer, "receive workers restarting")

    def _evict(self, peer: str, cid: object) -> None:
        """Close a connection without an association whose slot went to another
        peer (fair share, see agent.dicom.admission); its worker reports it closed."""
        entry = self._conns.get(cid) if isinstance(cid, int) else None
        if entry is not None:
            with contextlib.suppress(OSError):
                send_msg(entry[0].chan, ("evict", cid))
        self._refused(peer, "connection closed to give its slot to another peer (fair share)")

    def _admit_association(self, w: _Worker, cid: int) -> None:
        """A worker asks, at A-ASSOCIATE-RQ, whether the peer's bounds allow one more."""
        entry = self._conns.get(cid)
        if entry is None or entry[0] is not w:
            verdict = Verdict(False, None)
        else:
            peer = entry[1]
            verdict = Verdict(
                rate_ok=self.limiter.allow_association(peer),
                limit=association_limit(
                    self._by_peer.get(peer, 0), sum(1 for _, _, n in self._conns.values() if n),
                    per_peer=self.s.max_associations_per_peer, max_total=self.s.max_associations),
            )
            if verdict.rate_ok and verdict.limit is None:
                self._conns[cid] = (w, peer, True)
                self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
                self.limiter.associated(peer, cid)  # no longer evictable
        with contextlib.suppress(OSError):
            send_msg(w.chan, ("verdict", cid, verdict))

    def _ended(self, cid: int) -> None:
        """The association is over: it stops counting against the association bounds."""
        entry = self._conns.get(cid)
        if entry is None or not entry[2]:
            return
        w, peer, _ = entry
        self._conns[cid] = (w, peer, False)
        n = self._by_peer.get(peer, 1) - 1
        if n <= 0:
            self._by_peer.pop(peer, None)
        else:
            self._by_peer[peer] = n

    def _release(self, cid: int) -> None:
        """The connection is closed: it stops counting against the connection bounds."""
        self._ended(cid)
        entry = self._conns.pop(cid, None)
        if entry is None:
            return
        w, peer, _ = entry
        w.open = max(0, w.open - 1)
        self.limiter.release(peer, cid)

    def _from_worker(self, w: _Worker) -> None:
        try:
            got = recv_msg(w.chan)
        except OSError:
            got = None
        if got is None:
            self._worker_gone(w)
            return
        w.heard_at = time.monotonic()
        msg, fds = got
        for fd in fds:
            os.close(fd)
        if not isinstance(msg, tuple) or not msg:
            return
        if msg[0] == "closed":
            self._release(int(msg[1]))
        elif msg[0] == "ready":
            w.ready = True
        elif msg[0] == "ended":
            self._ended(int(msg[1]))
        elif msg[0] == "admit":
            self._admit_association(w, int(msg[1]))
        elif msg[0] == "wake":  # an MPPS or commitment request: a study may be complete
            self.on_stored(None)
        elif msg[0] == "commitment" and len(msg) == 5:
            self._commitment(w, msg[1], msg[2], msg[3], msg[4])
        elif msg[0] == "counters":
            with self._lock:
                w.counters = dict(msg[1])
            now = self.counters
            stored = now.instances_stored + now.instances_duplicate
            if stored != self._stored_seen:
                self._stored_seen = stored
                self.on_stored(None)
                if self.drainer is not None:
                    self.drainer.wake.set()

    def _commitment(self, w: _Worker, token: object, tx: object, ok: object,
                    failed: object) -> None:
        """A worker relays a Storage Commitment report.  Handed on, not handled
        here: the delivery's database writes (fsync, a busy lock) would hold up
        every worker's admissions and close notices.  The answer comes back through
        ``_answer`` and goes to the worker from this thread."""
        def answer(taken: bool) -> None:
            self._answer(w, token, taken)

        if (self.on_commitment is not None and isinstance(tx, str) and isinstance(ok, list)
                and isinstance(failed, list)):
            self.on_commitment(tx, [str(u) for u in ok], [str(u) for u in failed], answer)
        else:
            answer(False)

    def _answer(self, w: _Worker, token: object, taken: bool) -> None:
        """From any thread: queue the answer and wake the dispatcher."""
        self._answers.append((w, token, taken))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _send_answers(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while self._answers:
            w, token, taken = self._answers.popleft()
            if self._workers[w.index] is w:  # a replaced worker's associations are gone
                with contextlib.suppress(OSError):
                    send_msg(w.chan, ("committed", token, taken))

    def _refused(self, peer: str, why: str) -> None:
        with self._lock:
            self._own.connections_refused += 1
        audit_refused(self.audit, self._refusals, peer, why)
