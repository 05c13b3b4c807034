"""The systemd watchdog is fed only while every stage of the daemon is live.

The daemon runs as a subprocess under a real sd_notify listener (a Unix
datagram socket this test owns, NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID as
systemd sets them).  A test-only fault hook makes one stage hang forever; the
daemon must then stop sending WATCHDOG=1 (so systemd restarts it) and say which
stage is stuck in its log, `edge-agent status`, the systemd STATUS= line and
telemetry.  A receive worker that stops talking (SIGSTOP) is replaced by the
daemon itself, which keeps feeding the watchdog."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import psutil
import pytest
from pydicom.uid import generate_uid

from agent.ops import faults
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Subscriber, audit_events, set_config, wait_for
from tests.helpers.faults import SentStudy, send

# Short, so that a hang shows within the test; every loop beats far more often.
DEADLINE = 8
WATCHDOG_USEC = 2_000_000  # pings every 1 s while healthy


class Notify:
    """The systemd side of sd_notify: a datagram socket, read as systemd reads it
    (at once: its queue holds only ~10 datagrams), and what arrived on it."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ea-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.seen.append(msg)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def until(self, word: str, timeout: float = 60, since: int = 0) -> list[str]:
        """Messages from ``since`` up to the first one containing ``word``."""
        with self._cond:
            def found() -> bool:
                return any(word in m for m in self.seen[since:])
            if not self._cond.wait_for(found, timeout):
                raise TimeoutError(f"no {word!r} from the daemon in {timeout} s: {self.seen}")
            return list(self.seen[since:])

    def barrier(self) -> int:
        """A datagram of our own through the same queue: what the daemon sent before
        this call is before the returned index, whatever the reader's pace."""
        start = self.mark()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"TEST-BARRIER", self.path)
        got = self.until("TEST-BARRIER", since=start)
        return start + got.index("TEST-BARRIER") + 1

    def since(self, mark: int) -> list[str]:
        with self._cond:
            return list(self.seen[mark:])

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[Notify]:
    n = Notify()
    yield n
    n.close()


class Watched:
    """The daemon as systemd starts it: WATCHDOG_PID is its own pid (exec keeps it)."""

    def __init__(self, box: Box, notify: Notify, **env: str) -> None:
        self.box = box
        self.log = box.root / "watched.log"
        cmd = " ".join(shlex.quote(a) for a in [*EDGE_AGENT, "run", "--config",
                                                 str(box.config)])
        full = dict(os.environ, PYTHONUNBUFFERED="1", NOTIFY_SOCKET=notify.path,
                    WATCHDOG_USEC=str(WATCHDOG_USEC), **env)
        self.proc = subprocess.Popen(["sh", "-c", f"export WATCHDOG_PID=$$; exec {cmd}"],
                                     cwd=REPO, env=full, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))  # noqa: SIM115

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # what systemd ends up doing to a hung daemon
        self.proc.wait()


def status(box: Box) -> dict[str, Any] | None:
    p = subprocess.run([*EDGE_AGENT, "status", "--config", str(box.config), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    return json.loads(p.stdout) if p.returncode == 0 else None


def status_text(box: Box) -> str:
    p = subprocess.run([*EDGE_AGENT, "status", "--config", str(box.config)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def stuck(box: Box, stage: str) -> dict[str, Any] | None:
    s = status(box)
    return s if s is not None and stage in s["liveness"]["stuck"] else None


@pytest.fixture
def short_deadline(box: Box) -> Box:
    set_config(box, "watchdog", "stage_deadline_seconds", str(DEADLINE))
    return box


@pytest.mark.parametrize("stage", ["assembler", "publisher"])
def test_a_hung_stage_stops_the_watchdog_and_is_named(
        stage: str, short_deadline: Box, broker: Broker, ops: Subscriber,
        notify: Notify) -> None:
    box = short_deadline
    d = Watched(box, notify, EDGE_AGENT_TEST_MODE="1", EDGE_AGENT_TEST_FAULTS=f"hang:{stage}")
    try:
        notify.until("READY=1")
        notify.until("WATCHDOG=1")  # healthy: fed
        s = wait_for(lambda: status(box), 60, "status")
        assert {"assembler", "publisher", "receive", "telemetry", "control"} <= set(
            s["liveness"]["stages"])
        if stage == "assembler":  # it hangs when it starts on a study, so not yet
            assert s["liveness"]["stuck"] == [] and s["liveness"]["watchdog"] == "pinging"
            notify.until("WATCHDOG=1", since=notify.mark())  # still fed while nothing hangs
            assert send(box, SentStudy(generate_uid()), 2) == 2
        # (the publisher hangs on its first message: telemetry comes every 5 s)

        s = wait_for(lambda: stuck(box, stage), 120, f"status naming {stage} stuck")
        st = s["liveness"]["stages"][stage]
        assert st["stuck"] and "no progress or heartbeat" in st["reason"]
        assert any(w.startswith(f"stage {stage} is stuck") and "systemd restarts" in w
                   for w in s["warnings"]), s["warnings"]
        # Only the hung stage: the others keep beating.
        assert s["liveness"]["stuck"] == [stage], s["liveness"]
        s = wait_for(lambda: (x := status(box)) and x["liveness"]["watchdog"] == "withheld"
                     and x, 30, "the watchdog verdict")
        # "withheld" is recorded before a tick would ping: every earlier ping is already
        # in our socket.  From now on none may arrive (five ping intervals).
        mark = notify.barrier()
        time.sleep(5 * WATCHDOG_USEC / 1e6)
        later = notify.since(mark)
        assert not [m for m in later if "WATCHDOG=1" in m], later
        assert any(f"STATUS=stage {stage} stuck" in m for m in notify.since(0)), notify.seen
        text = status_text(box)
        assert f"STUCK: {stage}" in text and "WITHHELD" in text, text
        assert f"stage {stage} is stuck" in d.log_text()

        if stage == "assembler":  # ops hear of it at once (telemetry is sent on the change)
            schema = json.loads((REPO / "docs/schemas/telemetry.schema.json").read_text())

            def stuck_telemetry() -> dict[str, Any] | None:
                for m in reversed(ops.on("telemetry")):
                    ev = m.json()
                    if stage in ev["data"].get("liveness", {}).get("stuck", []):
                        return ev
                return None
            ev = wait_for(stuck_telemetry, 60, "telemetry naming the stuck stage")
            jsonschema.validate(ev, schema)
            assert ev["data"]["liveness"]["healthy"] is False
    finally:
        d.kill()


def worker_pids(daemon_pid: int) -> list[int]:
    kids = psutil.Process(daemon_pid).children()
    return [p.pid for p in kids if "agent.dicom.worker" in " ".join(p.cmdline())]


def test_a_silent_receive_worker_is_replaced_and_the_watchdog_stays_fed(
        short_deadline: Box, broker: Broker, notify: Notify) -> None:
    box = short_deadline
    d = Watched(box, notify)
    try:
        notify.until("READY=1")
        pids = wait_for(lambda: worker_pids(d.proc.pid), 60, "receive workers")
        if len(pids) < 2:
            pytest.skip("one core: the box receives in the daemon's own process")
        victim = pids[0]
        os.kill(victim, signal.SIGSTOP)  # alive, but silent: what a hung worker looks like

        def replaced() -> bool:
            return victim not in worker_pids(d.proc.pid) and len(worker_pids(d.proc.pid)) >= 2
        wait_for(replaced, 120, "the stopped worker replaced")
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
        assert "sent nothing for" in d.log_text() and "hung" in d.log_text()
        notify.until("WATCHDOG=1", timeout=30, since=notify.mark())  # the daemon: still fed
        s = wait_for(lambda: status(box), 60, "status")
        assert s["liveness"]["stuck"] == [], s["liveness"]
        exits = [e for e in audit_events(box) if e["event"] == "dicom.worker_exited"]
        assert any(e["details"].get("status") == -signal.SIGKILL for e in exits), exits
    finally:
        d.kill()


def test_fault_hooks_are_ignored_outside_test_mode_and_on_production_boxes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.FAULTS_VAR, "hang:assembler")
    monkeypatch.delenv(faults.MODE_VAR, raising=False)
    assert faults.configure("development") == frozenset()
    assert faults.FAULTS_VAR not in os.environ  # and no child process inherits it
    monkeypatch.setenv(faults.FAULTS_VAR, "hang:assembler")
    monkeypatch.setenv(faults.MODE_VAR, "1")
    assert faults.configure("production") == frozenset()
    assert faults.FAULTS_VAR not in os.environ and faults.MODE_VAR not in os.environ
    monkeypatch.setenv(faults.FAULTS_VAR, "hang:assembler,hang:nowhere")
    monkeypatch.setenv(faults.MODE_VAR, "1")
    try:
        assert faults.configure("development") == frozenset({"assembler"})
    finally:
        monkeypatch.delenv(faults.FAULTS_VAR)
        faults.configure("development")
