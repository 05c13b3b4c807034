"""Role-based access over the control socket with real, distinct Unix users.

The CLI runs in a child process that has dropped to each test user (setgroups,
setgid, setuid), so the daemon sees that user through SO_PEERCRED exactly as it
would see an operator's shell.  (The child forks instead of exec'ing a fresh
interpreter because this machine's Python lives under /root, which other users
cannot enter.)  Needs root to create the users; skipped otherwise."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.ops import control
from tests.helpers import Box, Broker, Daemon, set_config, wait_for
from tests.helpers.ops import cli

# Root is an environment, not a package: without it the test is skipped (CI runs as root).
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the "
                                 "operator/admin/auditor test users"),
              pytest.mark.peer("useradd", "groupadd")]


@dataclass(frozen=True)
class Users:
    tag: str
    groups: dict[str, str]  # role -> group name
    users: dict[str, str]   # role (or "nobody") -> user name


@pytest.fixture
def users() -> Iterator[Users]:
    tag = secrets.token_hex(3)
    roles = ("operator", "admin", "auditor", "privacy", "reviewer")
    groups = {r: f"eat-{r[:3]}-{tag}" for r in roles}
    names = {r: f"eat-u{r[:3]}-{tag}" for r in (*roles, "nobody")}
    try:
        for g in groups.values():
            subprocess.run(["groupadd", g], check=True)
        for role, u in names.items():
            extra = ["-G", groups[role]] if role in groups else []
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, u],
                           check=True)
        yield Users(tag, groups, names)
    finally:
        for u in names.values():
            subprocess.run(["userdel", u], capture_output=True)
        for g in groups.values():
            subprocess.run(["groupdel", g], capture_output=True)


def warm_imports() -> None:
    """Load lazily-imported modules (typer's parameter handling pulls in pydantic) while
    still root: the child, once another user, cannot read the interpreter's library."""
    from provisioning.cli import app

    missing = "/nonexistent/edge-agent.sock"
    for args in (["status", "--socket", missing], ["control", "whoami", "--socket", missing],
                 ["keys", "rotate", "--config", "/nonexistent/agent.toml"]):
        try:
            app(args, prog_name="edge-agent")
        except SystemExit:
            pass


def run_as(user: str, *args: str) -> tuple[int, str, str]:
    """Run the edge-agent CLI in a child process that is ``user`` (and only that user)."""
    from provisioning.cli import app  # imported before dropping privileges

    pw = pwd.getpwnam(user)
    gids = os.getgrouplist(user, pw.pw_gid)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # child: become the user, then run the real CLI entry point
        code = 70
        try:
            os.setgroups(gids)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            # pytest swapped sys.stdout/err for capture objects: write to our files instead
            sys.stdout = open(out.fileno(), "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(err.fileno(), "w", closefd=False)  # noqa: SIM115
            try:
                app(list(args), prog_name="edge-agent")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - report anything else to the parent via stderr
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


@pytest.fixture
def running(box: Box, broker: Broker, users: Users) -> Iterator[tuple[Box, Path, Path]]:
    # The socket's folder must be reachable by operators (like /run/edge-agent, 0755).
    sockdir = Path(tempfile.mkdtemp(prefix="ea-ctl-"))
    sockdir.chmod(0o755)
    sock = sockdir / "control.sock"
    set_config(box, "control", "socket", json.dumps(str(sock)))
    for role, g in users.groups.items():
        set_config(box, "control", f"{role}_group", json.dumps(g))
    d = Daemon(box)
    d.start()
    warm_imports()
    # A config copy operators can read (production: /etc/edge-agent/agent.toml 0640
    # root:edge-agent).
    shared = sockdir / "agent.toml"
    shared.write_text(box.config.read_text().replace('"state"', json.dumps(str(box.state)))
                      .replace('"keys/', json.dumps(str(box.root / "keys"))[:-1] + "/")
                      .replace('"pki/', json.dumps(str(box.pki))[:-1] + "/"))
    shared.chmod(0o644)
    try:
        yield box, sock, shared
    finally:
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_roles_are_enforced_by_peer_credentials(running: tuple[Box, Path, Path],
                                                users: Users) -> None:
    box, sock, shared = running
    u, g = users.users, users.groups

    rc, out, err = run_as(u["nobody"], "status", "--socket", str(sock))
    assert rc == 3 and "may not read the daemon status" in err, err
    assert "role" in err and g["operator"] in err  # names the role and the group to join

    rc, out, err = run_as(u["operator"], "status", "--socket", str(sock), "--json")
    assert rc == 0, err
    assert json.loads(out)["device"] == "dev-box"

    rc, out, err = run_as(u["operator"], "control", "pause", "--socket", str(sock))
    assert rc == 3 and "needs the admin role" in err and g["admin"] in err

    rc, out, err = run_as(u["auditor"], "control", "pause", "--socket", str(sock))
    assert rc == 3 and "needs the admin role" in err

    rc, out, err = run_as(u["admin"], "control", "pause", "--socket", str(sock))
    assert rc == 0, err
    rc, out, err = run_as(u["admin"], "control", "resume", "--socket", str(sock))
    assert rc == 0, err

    rc, out, err = run_as(u["operator"], "control", "checkpoint", "--socket", str(sock))
    assert rc == 3 and "needs the admin or auditor role" in err
    rc, out, err = run_as(u["auditor"], "control", "checkpoint", "--socket", str(sock))
    assert rc == 0, err

    rc, out, err = run_as(u["admin"], "control", "whoami", "--socket", str(sock))
    assert rc == 0 and "admin" in out and "operator" in out

    # The privacy officer's quarantine review is a role of its own: not admin's.
    rc, out, err = run_as(u["admin"], "quarantine", "list", "--socket", str(sock))
    assert rc == 3 and "needs the privacy role" in err and g["privacy"] in err, err
    rc, out, err = run_as(u["privacy"], "quarantine", "list", "--socket", str(sock))
    assert rc == 0 and "0 quarantined instance(s)" in out, err
    rc, out, err = run_as(u["privacy"], "control", "pause", "--socket", str(sock))
    assert rc == 3 and "needs the admin role" in err

    # Key rotation is checked in the CLI before any key is touched.
    rc, out, err = run_as(u["operator"], "keys", "rotate", "--config", str(shared))
    assert rc == 3 and "needs the admin role" in err and g["admin"] in err

    # Every admin action and every refusal is in the audit trail with the Unix user.
    tail = cli("audit", "tail", "--config", str(box.config), "--json", "-n", "200")
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    # outcomes are ATNA EventOutcomeIndicator codes: 0 success, 8 serious failure
    acts = [(r["user"], r["details"].get("command"), r["outcome"]) for r in rows
            if r["event"] == "cli.action"]
    assert (u["admin"], "control.intake.pause", 0) in acts
    assert (u["admin"], "control.intake.resume", 0) in acts
    assert (u["auditor"], "control.audit.checkpoint", 0) in acts
    assert (u["privacy"], "control.quarantine.list", 0) in acts
    denied = {(user, cmd) for user, cmd, outcome in acts if outcome == 8}
    assert {(u["nobody"], "control.status"), (u["operator"], "control.intake.pause"),
            (u["auditor"], "control.intake.pause"),
            (u["operator"], "control.audit.checkpoint"),
            (u["admin"], "control.quarantine.list")} <= denied
    assert grp.getgrnam(g["admin"]).gr_mem == [u["admin"]]


# -- the control socket under a local user's flood ----------------------------------------

def spawn_as(user: str, fn: Callable[..., None], *args: object) -> int:
    """Run ``fn(*args)`` in a child process that is ``user``; returns its pid."""
    pw = pwd.getpwnam(user)
    gids = os.getgrouplist(user, pw.pw_gid)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups(gids)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            fn(*args)
        except BaseException:  # noqa: BLE001 - the parent sees it in the report file
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    return pid


def _say(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def slow_loris(path: str, n: int, out: int) -> None:
    """Hold ``n`` connections, each sending one byte a second and never a whole request;
    a connection the daemon closes is reported and opened again at once."""
    conns: dict[int, socket.socket] = {}

    def connect(i: int) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        conns[i] = s

    for i in range(n):
        connect(i)
    _say(out, f"connected {n}")
    while True:
        for i, s in list(conns.items()):
            reply, closed = b"", False
            try:
                s.send(b" ")  # JSON allows leading blanks: the line never completes
            except OSError:
                closed = True
            try:
                reply = s.recv(4096)
                closed = closed or not reply
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            if closed or reply:
                _say(out, f"closed {i}: {reply.decode(errors='replace').strip()}")
                s.close()
                connect(i)
        time.sleep(1.0)


def ask_status(path: str, n: int, out: int) -> None:
    """``n`` status requests, one connection each, as fast as the daemon answers."""
    denied = 0
    for _ in range(n):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(b'{"command": "status", "args": {}}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        if json.loads(buf).get("needed_role"):
            denied += 1
    _say(out, f"denied {denied}")


def test_slow_clients_of_one_user_cannot_starve_status(running: tuple[Box, Path, Path],
                                                        users: Users, tmp_path: Path) -> None:
    _box, sock, _shared = running
    u = users.users
    report = tmp_path / "loris.txt"
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pid = spawn_as(u["operator"], slow_loris, str(sock), 10, fd)
    os.close(fd)
    try:
        wait_for(lambda: "connected 10" in report.read_text(), 60, "the slow clients")
        # Connections are accepted in order: ours come after the ten slow ones.
        for _ in range(3):
            p = cli("status", "--socket", str(sock), "--json")
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["device"] == "dev-box"
        rc, out, err = run_as(u["admin"], "status", "--socket", str(sock), "--json")
        assert rc == 0, err
        # The slow user got its share and no more, and a trickle does not extend a
        # request: the daemon cuts it at the deadline.
        def cut() -> str | None:
            t = report.read_text()
            return t if "request not complete" in t else None
        text = wait_for(cut, 90, "a slow request cut at its deadline")
        assert f"too many control connections from user {u['operator']}" in text, text
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_flood_of_refused_requests_is_audited_as_counted_records(
        running: tuple[Box, Path, Path], users: Users, tmp_path: Path) -> None:
    box, sock, _shared = running
    nobody = users.users["nobody"]
    report = tmp_path / "flood.txt"
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    began = time.monotonic()
    pid = spawn_as(nobody, ask_status, str(sock), 300, fd)
    os.close(fd)
    _, code = os.waitpid(pid, 0)
    windows = (time.monotonic() - began) / control.DENIAL_WINDOW
    assert os.waitstatus_to_exitcode(code) == 0
    assert report.read_text().strip() == "denied 300"

    def refusals() -> list[dict[str, Any]]:
        tail = cli("audit", "tail", "--config", str(box.config), "--json", "-n", "2000")
        rows = [json.loads(line) for line in tail.stdout.splitlines()]
        return [r for r in rows if r["event"] == "cli.action" and r["user"] == nobody
                and r["details"].get("command") == "control.status"]

    # The first refusal is recorded at once; the rest when their window closes.
    rows = wait_for(lambda: (r := refusals()) and sum(int(x["details"].get("count", 1))
                                                      for x in r) >= 300 and r,
                    120, "the refusals summed up in the audit trail")
    # one at once, then one per window the flood lasted (and the one it ended in)
    assert len(rows) <= 2 + windows, f"{len(rows)} audit records for one flood"
    assert sum(int(r["details"]["count"]) for r in rows) == 300
    assert all(r["outcome"] == 8 and r["details"]["denied"] is True for r in rows)
    assert rows[0]["details"]["count"] == 1
