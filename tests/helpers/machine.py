"""A Debian root booted with systemd as PID 1, the way the package runs on a box.

`systemd-nspawn --register=no --keep-unit -b -D ROOT` boots the root's own systemd
(252 on bookworm) as PID 1 of a new PID, mount, IPC and UTS namespace.  There is no
systemd on the host to register with (hence --register=no, --keep-unit), so there is
no `machinectl shell` or `systemd-run --machine` either: commands reach the container
with `nsenter -t PID1 -a`, i.e. in the namespaces of the container's PID 1, as root of
the container, and talk to its systemd over its own private bus socket.

The container shares the host's network namespace (no --private-network): the daemon
inside reaches a broker on the host's loopback the way a box reaches central ops,
storescu on the host reaches the daemon's DICOM port, and nothing has to bridge or
forward.  Everything the test controls from outside (broker, subscriber, the DICOM
sender) thus stays outside the sandbox being tested.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.helpers.debroot import CLEAN_ENV


class KernelRefused(RuntimeError):
    """systemd-nspawn exited before the container's systemd ran (namespaces, cgroups)."""


class Machine:
    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0  # the container's PID 1 as the host sees it

    def boot(self, timeout: float = 180) -> None:
        with open(self.log, "wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--console=pipe",
                 "-b", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.nspawn.poll() is not None:
                raise KernelRefused(self.log.read_text(errors="replace")[-2000:])
            kids = psutil.Process(self.nspawn.pid).children()
            if kids and kids[0].name() == "systemd":
                self.pid1 = kids[0].pid
            elif time.monotonic() > deadline:
                raise TimeoutError(f"no systemd in the container after {timeout} s:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            else:
                time.sleep(0.1)
        # Startup finished (every unit of the default target ran): running, or degraded
        # when some unit of the minimal root failed; either is a booted system.  Until
        # systemd has set up its bus socket, systemctl cannot ask it: try again.
        while True:
            p = self.run("systemctl is-system-running --wait", check=False,
                         timeout=max(10.0, deadline - time.monotonic()))
            state = p.stdout.strip()
            if state in ("running", "degraded"):
                return
            if state not in ("", "offline", "initializing", "starting") \
                    or time.monotonic() > deadline:
                failed = self.run("systemctl --failed --no-pager", check=False).stdout
                raise RuntimeError(f"the container did not boot: {state} {p.stderr}\n{failed}")
            time.sleep(0.2)

    def command(self, script: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-a", *CLEAN_ENV, "sh", "-c", script]

    def run(self, script: str, *, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A shell script as root inside the container (its namespaces, its systemd)."""
        p = subprocess.run(self.command(script), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"in the container: {script}\nexit {p.returncode}\n"
                                 f"{(p.stdout + p.stderr)[-4000:]}")
        return p

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show {unit} -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def mark(self) -> str:
        """Now, on the container's clock (the host's), for ``journal``."""
        return self.run("date +%s.%N").stdout.strip()

    def journal(self, since: str, *args: str) -> str:
        """The journal since ``mark()`` (message text only), filtered by ``args``.
        By time, not by cursor: journalctl 252 with --after-cursor and -u/-p matches
        left out entries it shows with --since."""
        return self.run(f"journalctl --no-pager -o cat --since=@{since} {' '.join(args)}",
                        check=False).stdout

    def poweroff(self, timeout: float = 90) -> None:
        """Shut the container down the way a machine shuts down (SIGTERM to nspawn
        asks its systemd to power off); what is still there after ``timeout`` is killed
        (killing PID 1 ends every process of the container's PID namespace)."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.pid1 and psutil.pid_exists(self.pid1):
                    psutil.Process(self.pid1).kill()
                self.nspawn.wait(30)
        self.nspawn = None
