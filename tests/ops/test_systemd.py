"""The shipped systemd deployment: the unit verifies, scores <= 1.5 on
`systemd-analyze security --offline=true`, its sysusers/tmpfiles files create the
account and folders, and the daemon works under the unit's restrictions: W^X memory
(MemoryDenyWriteExecute), no_new_privs, keys only from $CREDENTIALS_DIRECTORY, and
the notify protocol (READY, WATCHDOG, STOPPING)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, Box, Broker, Subscriber, storescu, wait_port

UNIT_DIR = REPO / "systemd"
UNIT = UNIT_DIR / "edge-agent.service"
needs_systemd = pytest.mark.peer("systemd-analyze")


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def exposure(unit: Path) -> float:
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    return float(m.group(1))


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's console script."""
    exe = Path(sys.executable).parent / "edge-agent"
    d = tmp_path / "units"
    d.mkdir()
    text = UNIT.read_text().replace("/opt/edge-agent/.venv/bin/edge-agent", str(exe))
    (d / "edge-agent.service").write_text(text)
    return d / "edge-agent.service"


@needs_systemd
def test_unit_verifies(unit_copy: Path) -> None:
    p = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "edge-agent.service" not in p.stderr, p.stderr


@needs_systemd
def test_security_exposure_at_most_1_5_with_and_without_low_port_dropin(unit_copy: Path) -> None:
    assert exposure(UNIT) <= 1.5
    drop = [line for line in (UNIT_DIR / "edge-agent.service.d" / "low-port.conf.example")
            .read_text().splitlines() if line and not line.startswith(("#", "["))]
    merged = unit_copy.read_text().replace("[Install]", "\n".join(drop) + "\n\n[Install]")
    unit_copy.write_text(merged)
    assert exposure(unit_copy) <= 1.5


def test_unit_contract() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["WatchdogSec"] and s["NotifyAccess"] == ["main"]
    assert s["User"] == ["edge-agent"] and s["StateDirectory"] == ["edge-agent"]
    assert s["StateDirectoryMode"] == ["0700"] and s["UMask"] == ["0077"]
    creds = {v.split(":", 1)[0] for v in s["LoadCredentialEncrypted"]}
    assert creds == {"kek", "pseudonym"}
    # no capability at all in the base unit: DICOM listens on 11112
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "PrivateUsers" not in s  # it would hide operators' uids from SO_PEERCRED
    assert "ProcSubset" not in s  # telemetry reads /proc/meminfo and /proc/loadavg
    assert s["MemoryDenyWriteExecute"] == ["yes"]
    # a bound on memory (hostile input is bounded earlier; this is the backstop),
    # and decrypted PHI never goes to swap
    assert s["MemoryMax"] == ["4G"] and s["MemorySwapMax"] == ["0"]
    drop = unit_settings((UNIT_DIR / "edge-agent.service.d" / "low-port.conf.example").read_text())
    assert drop == {"CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
                    "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"]}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to chown in the image)")
@pytest.mark.peer("systemd-sysusers", "systemd-tmpfiles")
def test_sysusers_and_tmpfiles_create_account_and_private_folders(tmp_path: Path) -> None:
    root = tmp_path / "image"
    for sub in ("etc", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d"):
        (root / sub).mkdir(parents=True)
    shutil.copy(UNIT_DIR / "sysusers.d" / "edge-agent.conf", root / "usr/lib/sysusers.d")
    shutil.copy(UNIT_DIR / "tmpfiles.d" / "edge-agent.conf", root / "usr/lib/tmpfiles.d")
    p = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    passwd = (root / "etc/passwd").read_text()
    groups = (root / "etc/group").read_text()
    assert re.search(r"^edge-agent:x:(\d+):(\d+):.*:/usr/sbin/nologin$", passwd, re.M)
    for g in ("edge-agent", "edge-agent-admin", "edge-agent-audit", "edge-agent-privacy",
              "edge-agent-review"):
        assert re.search(rf"^{g}:x:\d+:", groups, re.M)
    uid = int(re.search(r"^edge-agent:x:(\d+):", passwd, re.M).group(1))  # type: ignore[union-attr]
    p = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    for d in ("var/lib/edge-agent", "var/lib/edge-agent/keys", "var/lib/edge-agent/pki"):
        st = (root / d).stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == uid
    assert stat.S_IMODE((root / "run/edge-agent").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc/edge-agent").stat().st_mode) == 0o750


# -- the daemon under the unit's restrictions ------------------------------------------

PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 66, 1

HARDENED = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("prctl failed")
print("mdwe", libc.prctl(66, 0, 0, 0, 0), file=sys.stderr, flush=True)
sys.argv = ["edge-agent", "run", "--config", sys.argv[1]]
from provisioning.cli import main
main()
"""


def mdwe_supported() -> bool:
    """PR_SET_MDWE (Linux >= 6.3) is what systemd uses for MemoryDenyWriteExecute."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    return os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="ea-notify-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(60)
    try:
        yield s, path
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def read_until(s: socket.socket, word: str) -> list[str]:
    seen: list[str] = []
    while True:
        msg = s.recv(4096).decode()
        seen.append(msg)
        if word in msg:
            return seen


@pytest.mark.peer("storescu")
def test_daemon_works_hardened_with_credentials_and_notify(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber,
        notify_socket: tuple[socket.socket, str]) -> None:
    if not mdwe_supported():
        # A kernel feature, not a package CI could install: a skip, not a failure.
        pytest.skip("kernel has no PR_SET_MDWE (Linux >= 6.3) to emulate MemoryDenyWriteExecute")
    from tests.test_e2e import make_study

    # keys only as systemd credentials: the configured key files are gone
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    for name in ("kek", "pseudonym"):
        src = box.root / "keys" / f"{name}.key"
        shutil.move(src, creds / name)
        (creds / name).chmod(0o400)
    sock, path = notify_socket
    env = dict(os.environ, PYTHONUNBUFFERED="1", CREDENTIALS_DIRECTORY=str(creds),
               NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    log = box.root / "hardened.log"
    proc = subprocess.Popen([sys.executable, "-c", HARDENED, str(box.config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        ready = read_until(sock, "READY=1")
        assert any("STATUS=listening" in m for m in ready)
        read_until(sock, "WATCHDOG=1")
        wait_port(box.dicom_port, timeout=60)
        files, _phi = make_study(tmp_path)
        sent = storescu(box.dicom_port, files)
        assert sent.returncode == 0, sent.stderr
        res = ops.wait("results", 1, timeout=90)
        assert res[0].json()["data"]["study"]["instances_received"] == 3
        proc.send_signal(signal.SIGTERM)
        read_until(sock, "STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "mdwe 1" in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
