# ruff: noqa: E402 - the imports below follow PIXEL_BACKENDS on purpose
"""A receive worker process (see agent.dicom.pool): runs the acceptor on each
connection the daemon hands it, one thread per connection, with the same store
decisions as the in-process node; the association bounds are asked of the
daemon (a ``Verdict``), which sees every worker's associations.

    python -m agent.dicom.worker CHANNEL_FD PARENT_PID

Started by the daemon only.  Everything it needs arrives over the channel; it
exits when the channel closes (the daemon stopped or died) and is killed with
the daemon by ``PR_SET_PDEATHSIG``.  May import agent.store.inbox, agent.logs and
agent.dicom.*.
"""

from __future__ import annotations

import sys

# A receive worker never decodes pixels, but importing pydicom (which pynetdicom's
# PDU classes need) imports its optional pixel back-ends with it: numpy, Pillow,
# pylibjpeg and the codecs, about 20 MiB of a worker's memory and a fifth of its
# start-up CPU.  Marked absent (the import system's documented ``None`` entry) when
# this module runs as the worker process, before anything imports pydicom, which
# then treats them as not installed.  Never when merely imported (the daemon needs
# numpy).  tests/receive/test_receive_workers.py checks a running worker for it.
PIXEL_BACKENDS = ("numpy", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls",
                  "gdcm", "pyjpegls")
if __name__ == "__main__":
    for _name in PIXEL_BACKENDS:
        sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping

from pydicom import config as pydicom_config

from agent import logs
from agent.dicom.admission import PeerLimiter, PeerLimits, Verdict
from agent.dicom.commitment import CommitmentReports
from agent.dicom.dimse import default_registry
from agent.dicom.node import acceptor_settings, serve_connection, tls_context
from agent.dicom.pool import Handoff, WorkerInit, recv_msg, send_msg
from agent.dicom.scp import ReceiveCounters, StoreDecisions
from agent.dicom.services import register_completion
from agent.errors import EdgeAgentError
from agent.store.inbox import Inbox

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
COUNTERS_EVERY = 0.2
COUNTERS_HEARTBEAT = 5.0
_FIELDS = tuple(f for f in dataclasses.fields(ReceiveCounters) if f.name != "by_peer")
ADMISSION_TIMEOUT = 10.0


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the daemon dies, however it dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the closed channel still stops us, a little later
    if os.getppid() != parent_pid:
        os._exit(0)  # the daemon died before prctl took effect


class Worker:
    def __init__(self, chan: socket.socket, init: WorkerInit) -> None:
        self.chan = chan
        self.init = init
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._asked: dict[int, tuple[threading.Event, Verdict | None]] = {}
        self._conn_ids: dict[tuple[str, int], int] = {}
        # A duplicate of each connection's socket, to close it when the daemon
        # gives its slot to another peer (the original may become an SSLSocket).
        self._socks: dict[int, socket.socket] = {}
        self._ended_ids: set[int] = set()
        self._accepting = True
        self.inbox = Inbox(init.inbox_root, init.kek, init.pseudonym_key, init.inbox, init.study,
                           worker=init.index)
        # Connections arrive counted against the peer limits by the daemon.
        self.decisions = StoreDecisions(
            init.dicom, self.inbox, audit=self._audit,
            limiter=PeerLimiter(PeerLimits(1 << 30, 1 << 30, 1 << 30)),
            accepting=lambda: self._accepting, journal_receipts=True,
            admission=self._admission, on_ended=self._ended)
        self.registry = default_registry()
        # Storage Commitment reports go to the daemon's results delivery over this
        # channel, answered like an admission question (the PACS waits for the RSP,
        # and its report is only taken once the daemon has it).
        self._reports: dict[int, tuple[threading.Event, bool]] = {}
        self._report_seq = 0
        if init.commitment:
            CommitmentReports(self._relay_commitment, self._audit).register(self.registry)
        # MPPS and commitment requests write the shared index; the daemon's assembler
        # is woken over the channel (agent.dicom.pool, "wake").
        register_completion(self.registry, init.dicom, self.inbox.completion, self._audit,
                            lambda: self._send(("wake",)))
        self.settings = acceptor_settings(init.dicom)
        self.tls = tls_context(init.dicom)

    # -- StoreDecisions hooks ----------------------------------------------------------

    def _audit(self, event: str, *, outcome: str = "success", user: str | None = None,
               source: str | None = None, details: Mapping[str, object] | None = None,
               phi: Mapping[str, str] | None = None) -> None:
        # Receive events carry no PHI (pseudonymous references only), and the
        # journal has no sealed-PHI column: refuse rather than drop it silently.
        if phi:
            raise ValueError("receive workers do not journal PHI-bearing audit records")
        entry: dict[str, object] = {"event": event, "outcome": outcome, "source": source,
                                    "details": dict(details or {})}
        if user is not None:
            entry["user"] = user
        self.inbox.journal(entry)

    def _admission(self, addr: str, port: int) -> Verdict:
        """Ask the daemon, which sees every worker's associations (runs in the
        association's thread; the answer comes back through ``run``)."""
        with self._lock:
            cid = self._conn_ids.get((addr, port))
            if cid is None:
                return Verdict(False, None)
            done = threading.Event()
            self._asked[cid] = (done, None)
        self._send(("admit", cid))
        answered = done.wait(ADMISSION_TIMEOUT)
        with self._lock:
            _, verdict = self._asked.pop(cid, (done, None))
        if not answered or verdict is None:
            log.error("no admission answer from the daemon in %.0f s", ADMISSION_TIMEOUT)
            return Verdict(False, None)
        return verdict

    def _relay_commitment(self, tx: str, ok: list[str], failed: list[str]) -> bool:
        """Hand a Storage Commitment report to the daemon; whether it took it."""
        with self._lock:
            self._report_seq += 1
            token = self._report_seq
            done = threading.Event()
            self._reports[token] = (done, False)
        self._send(("commitment", token, tx, ok, failed))
        answered = done.wait(ADMISSION_TIMEOUT)
        with self._lock:
            _, taken = self._reports.pop(token, (done, False))
        if not answered:
            log.error("no answer from the daemon to a storage commitment report in %.0f s",
                      ADMISSION_TIMEOUT)
        return answered and taken

    def _ended(self, addr: str, port: int) -> None:
        """The association ended (released, aborted, rejected): its slot is free
        although the connection may linger a moment."""
        with self._lock:
            cid = self._conn_ids.get((addr, port))
            if cid is None or cid in self._ended_ids:
                return
            self._ended_ids.add(cid)
        self._send(("ended", cid))

    def _done(self, key: tuple[str, int]) -> None:
        with self._lock:
            cid = self._conn_ids.pop(key, None)
            self._ended_ids.discard(cid or 0)
            dup = self._socks.pop(cid, None) if cid is not None else None
        if dup is not None:
            dup.close()
        if cid is not None:
            self._send(("closed", cid))

    def _send(self, msg: object) -> None:
        with self._send_lock:
            try:
                send_msg(self.chan, msg)
            except OSError:
                os._exit(0)  # the daemon is gone: nothing here may outlive it

    # -- loop ------------------------------------------------------------------------

    def _report(self) -> None:
        # Sent when they changed (an idle worker then costs the daemon nothing),
        # and at least every COUNTERS_HEARTBEAT seconds.
        last: dict[str, object] | None = None
        sent = 0.0
        while True:
            time.sleep(COUNTERS_EVERY)
            now = self._counters()
            if now != last or time.monotonic() - sent >= COUNTERS_HEARTBEAT:
                self._send(("counters", now))
                last, sent = now, time.monotonic()

    def _counters(self) -> dict[str, object]:
        c = self.decisions.snapshot()
        out: dict[str, object] = {f.name: getattr(c, f.name) for f in _FIELDS}
        out["by_peer"] = dict(c.by_peer)
        return out

    def run(self) -> int:
        threading.Thread(target=self._report, name="counters", daemon=True).start()
        self._send(("ready",))  # the daemon listens once every worker said so
        while True:
            got = recv_msg(self.chan)
            if got is None:
                os._exit(0)  # the daemon closed the channel or died
            msg, fds = got
            if not isinstance(msg, tuple) or not msg:
                for fd in fds:
                    os.close(fd)
                continue
            if msg[0] == "conn" and fds:
                self._take(msg[1], fds[0])
                for fd in fds[1:]:
                    os.close(fd)
            elif msg[0] == "verdict":
                with self._lock:
                    asked = self._asked.get(int(msg[1]))
                    if asked is not None and isinstance(msg[2], Verdict):
                        self._asked[int(msg[1])] = (asked[0], msg[2])
                        asked[0].set()
            elif msg[0] == "committed" and len(msg) == 3:
                with self._lock:
                    waiting = self._reports.get(int(msg[1]))
                    if waiting is not None:
                        self._reports[int(msg[1])] = (waiting[0], msg[2] is True)
                        waiting[0].set()
                for fd in fds:
                    os.close(fd)
            elif msg[0] == "evict":
                self._evict(int(msg[1]))
                for fd in fds:
                    os.close(fd)
            elif msg[0] == "stop":
                for fd in fds:
                    os.close(fd)
                return self._stop(float(msg[1]))

    def _take(self, h: Handoff, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        if (h.tls and self.tls is None) or not self._accepting:
            sock.close()
            self._send(("closed", h.conn_id))
            return
        with self._lock:
            self._conn_ids[h.address] = h.conn_id
            self._socks[h.conn_id] = sock.dup()
        threading.Thread(target=self._serve, args=(sock, h.address, h.tls),
                         name="dicom-association", daemon=True).start()

    def _serve(self, sock: socket.socket, address: tuple[str, int], tls: bool) -> None:
        try:
            serve_connection(sock, address, self.tls if tls else None, self.settings,
                             self.decisions, self.registry)
        finally:
            self._done(address)

    def _evict(self, cid: int) -> None:
        with self._lock:
            dup = self._socks.get(cid)
        if dup is not None:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_RDWR)  # its reader sees the end of the stream

    def _stop(self, timeout: float) -> int:
        """No new associations; let open ones finish for up to ``timeout`` seconds."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.decisions.snapshot().active == 0:
                break
            time.sleep(0.05)
        self._send(("counters", self._counters()))
        self.inbox.close()
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m agent.dicom.worker CHANNEL_FD PARENT_PID (started by the daemon)",
              file=sys.stderr)
        return 2
    die_with_parent(int(argv[2]))
    # SIGTERM/SIGINT go to the daemon, which stops us over the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chan = socket.socket(fileno=int(argv[1]))
    got = recv_msg(chan)
    if got is None or not isinstance(got[0], tuple) or got[0][0] != "init":
        return 2
    init = got[0][1]
    assert isinstance(init, WorkerInit)
    logs.setup(init.log_level, process=f"recv-w{init.index}")
    # pydicom here only routes (header fields, DIMSE command sets); its value
    # checks would only warn, and cost a regex per value. The daemon, which
    # de-identifies, keeps them.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        worker = Worker(chan, init)
    except EdgeAgentError as exc:  # e.g. the TLS certificate cannot be loaded
        log.error("receive worker %d cannot start: %s", init.index, exc)
        return 2
    code = worker.run()
    # Association threads are daemon threads: the ones still open after the
    # grace period end with the process, unacknowledged (never half-committed).
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
