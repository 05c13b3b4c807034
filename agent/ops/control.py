"""The local control socket: live status and the admin actions that need the daemon.

Authorization is by the kernel, not by anything the client says: SO_PEERCRED
gives the connecting process's uid/gid, the user database turns that into a
user name and groups, and the groups named in ``[control]`` turn those into
roles (operator, admin, auditor, privacy,
reviewer).  root holds every role.  The socket file is
world-connectable on purpose: a refusal then names the role that is missing
instead of a bare "permission denied", and every refusal is audited.

Protocol: one JSON object per line each way.  Request
``{"command": "status", "args": {}}``; reply ``{"ok": true, "data": {...}}`` or
``{"ok": false, "error": "...", "needed_role": "admin"}``.

Because anyone may connect, a local user must not be able to starve the others:

* the whole request line must arrive within ``REQUEST_SECONDS`` of the connect
  (a deadline per request, not a timeout per read: one byte every few seconds
  would otherwise hold a slot forever);
* each Unix user (uid, from SO_PEERCRED at accept) holds at most
  ``MAX_CLIENTS_PER_USER`` connections at once, everybody together
  ``MAX_CLIENTS``; a connection over a bound is answered and closed at once;
* refusals (a missing role, a connection over the bound) are audited, but a
  flood of them is not an audit-log flood: the first refusal per user and
  command is recorded at once, the rest of the window as one record with a
  count (``DenialAudit``).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import os
import pwd
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import ControlSettings
from agent.errors import AccessDenied, EdgeAgentError
from agent.identity import credentials
from agent.ops.liveness import Liveness, Stage
from agent.uplink import telemetry

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = logging.getLogger(__name__)

OPERATOR, ADMIN, AUDITOR = "operator", "admin", "auditor"
PRIVACY, REVIEWER = "privacy", "reviewer"
ROLES = (OPERATOR, ADMIN, AUDITOR, PRIVACY, REVIEWER)
ANY_ROLE = frozenset(ROLES)
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32
MAX_CLIENTS_PER_USER = 4
REQUEST_SECONDS = 5.0  # the whole request, from accept to its newline
REPLY_SECONDS = 5.0  # the whole reply (sendall's timeout covers all of it)
DENIAL_WINDOW = 10.0  # seconds of refusals summed into one audit record
DEFAULT_SOCKET = Path("/run/edge-agent/control.sock")
CERT_WARN_DAYS = 30  # same horizon as doctor and install-cert

AuditFn = Callable[..., None]


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of the socket (or running this CLI)."""

    uid: int
    gid: int
    pid: int
    user: str
    roles: frozenset[str]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _group_names(gids: set[int]) -> set[str]:
    names: set[str] = set()
    for g in gids:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    return names


def roles_for(uid: int, gids: set[int], settings: ControlSettings,
              service_uid: int | None = None) -> frozenset[str]:
    """Map a uid and its groups to roles.  admin includes operator; auditor stands apart
    (separation of duties: reading the trail is not the same as running the box)."""
    if uid == 0:
        return ANY_ROLE
    names = _group_names(gids)
    roles: set[str] = set()
    if settings.admin_group in names:
        roles |= {ADMIN, OPERATOR}
    if settings.operator_group in names:
        roles.add(OPERATOR)
    if settings.auditor_group in names:
        roles.add(AUDITOR)
    # Neither implies the other nor admin: seeing quarantined pixels (PHI) and judging
    # results are separate duties from running the box.
    if settings.privacy_group in names:
        roles.add(PRIVACY)
    if settings.reviewer_group in names:
        roles.add(REVIEWER)
    if service_uid is not None and uid == service_uid:
        roles.add(OPERATOR)  # the service account may ask its own daemon for status
    return frozenset(roles)


def peer_caller(conn: socket.socket, settings: ControlSettings) -> Caller:
    """Identify a connected peer from SO_PEERCRED (kernel-supplied, unforgeable)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    name = user_name(uid)
    gids = {gid}
    # From the user database, not /proc/<pid>: under ProtectProc=invisible the daemon
    # cannot see other users' processes, and a pid can be reused after connect.
    with contextlib.suppress(KeyError, OSError):
        gids |= set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return Caller(uid, gid, pid, name, roles_for(uid, gids, settings, os.getuid()))


def local_caller(settings: ControlSettings) -> Caller:
    """The user running this CLI process, with its actual (possibly newgrp'd) groups."""
    uid, gid = os.getuid(), os.getgid()
    gids = {gid, *os.getgroups()}
    return Caller(uid, gid, os.getpid(), user_name(uid), roles_for(uid, gids, settings))


def role_group(settings: ControlSettings, role: str) -> str:
    return {OPERATOR: settings.operator_group, ADMIN: settings.admin_group,
            AUDITOR: settings.auditor_group, PRIVACY: settings.privacy_group,
            REVIEWER: settings.reviewer_group}[role]


def denial(caller: Caller, allowed: frozenset[str], action: str,
           settings: ControlSettings) -> AccessDenied:
    needed = sorted(allowed)
    role = needed[0] if len(needed) == 1 else " or ".join(needed)
    groups = ", ".join(role_group(settings, r) for r in needed)
    return AccessDenied(
        f"user {caller.user} may not {action}: it needs the {role} role",
        hint=f"ask an administrator to add {caller.user} to group {groups} "
             "(then log in again), or run it as root",
    )


def require(caller: Caller, allowed: frozenset[str], action: str,
            settings: ControlSettings) -> None:
    """Raise AccessDenied naming the needed role unless the caller holds one of ``allowed``."""
    if not caller.roles & allowed:
        raise denial(caller, allowed, action, settings)


# -- socket paths ---------------------------------------------------------------------

@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits sockaddr_un (108 bytes): long paths go through
    an O_PATH handle on the folder (/proc/self/fd/N/name), which the kernel resolves."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- server ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    allowed: frozenset[str]
    action: str  # words for a refusal: "user x may not <action>"
    run: Callable[[Caller, Mapping[str, Any]], dict[str, Any]]
    audited: bool = False  # admin actions are audited with the Unix user name


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid (SO_PEERCRED: fixed at connect, no user-database lookup)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


@functools.lru_cache(maxsize=256)
def _cached_user_name(uid: int) -> str:
    # On the accept path a flood of refusals must not become a flood of NSS lookups.
    return user_name(uid)


@dataclass
class _Window:
    started: float  # monotonic
    count: int  # refusals since the last record
    details: dict[str, object]


class DenialAudit:
    """Refusals in the audit trail without an audit-log flood.

    The first refusal of a (user, command) is recorded at once (count 1); more of
    them within ``window`` seconds are only counted, and recorded as one record
    with their count when the window ends (``flush``, called by the accept loop)
    or the server stops.  A flood that goes on yields one record per window.
    Bounded memory: past ``max_keys`` open windows all are written out at once.
    """

    def __init__(self, audit: AuditFn, window: float = DENIAL_WINDOW,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        self._audit = audit
        self.window = window
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Window] = {}

    def refused(self, user: str, command: str, details: Mapping[str, object]) -> None:
        now = self._clock()
        with self._lock:
            w = self._open.get((user, command))
            if w is not None:
                w.count += 1
                return
            spill = self._take(now, everything=True) if len(self._open) >= self._max else []
            self._open[(user, command)] = _Window(now, 0, dict(details))
        for item in spill:
            self._record(*item)
        self._record(user, command, dict(details), 1, None)

    def flush(self, *, force: bool = False) -> None:
        with self._lock:
            due = self._take(self._clock(), everything=force)
        for item in due:
            self._record(*item)

    def _take(self, now: float, *, everything: bool
              ) -> list[tuple[str, str, dict[str, object], int, float]]:
        out = []
        for key, w in list(self._open.items()):
            if not everything and now - w.started < self.window:
                continue
            if w.count:
                out.append((key[0], key[1], w.details, w.count, now - w.started))
            if w.count and not everything:
                self._open[key] = _Window(now, 0, w.details)  # still flooding: a new window
            else:
                del self._open[key]
        return out

    def _record(self, user: str, command: str, details: dict[str, object], count: int,
                span: float | None) -> None:
        extra: dict[str, object] = {"count": count}
        if span is not None:
            extra["window_s"] = round(span, 1)
        try:
            self._audit("cli.action", outcome="serious_failure", user=user,
                        details={"command": command, "denied": True, **details, **extra})
        except Exception:  # noqa: BLE001 - the audit log counts its own failures
            log.exception("could not audit a control refusal")


class ControlServer:
    """A Unix socket server thread; handlers never raise into the accept loop."""

    def __init__(self, settings: ControlSettings, commands: Mapping[str, Command],
                 audit: AuditFn, *, liveness: Liveness | None = None,
                 stage_deadline: float = 120.0) -> None:
        self.settings = settings
        self.path = settings.socket
        self.commands = dict(commands)
        self.commands.setdefault("whoami", Command(frozenset(), "ask who they are", _whoami))
        self._audit = audit
        self.denials = DenialAudit(audit)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open_by_uid: dict[int, int] = {}
        self._open_total = 0
        self._liveness = liveness
        self._stage_deadline = stage_deadline
        self._stage: Stage | None = None
        self.error: str | None = None

    def start(self) -> bool:
        """Bind and serve; on failure log, remember why, and let the daemon run without it."""
        try:
            self._sock = self._bind()
        except OSError as exc:
            self.error = f"control socket {self.path}: {exc.strerror or exc}"
            log.error("%s; 'edge-agent status' will not work", self.error)
            return False
        if self._liveness is not None:
            self._stage = self._liveness.stage("control", self._stage_deadline)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        return True

    def _bind(self) -> socket.socket:
        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if created:  # the 0077 umask filtered mkdir's mode; operators must reach the socket
            os.chmod(self.path.parent, 0o755)
        if self.path.is_socket():
            if _alive(self.path):
                raise OSError(98, "another edge-agent is already listening there")
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _sun_path(self.path) as addr:
                s.bind(addr)
            os.chmod(self.path, 0o666)  # see module docstring: peer credentials decide
            s.listen(16)
            s.settimeout(0.5)
        except OSError:
            s.close()
            raise
        return s

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._liveness is not None:
            self._liveness.remove("control")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.denials.flush(force=True)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            if self._stage is not None:
                self._stage.beat(doing="accepting control connections")
            self.denials.flush()
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("control socket accept failed: %s", exc)
                self._stop.wait(1.0)
                continue
            try:
                self._admit(conn, time.monotonic() + REQUEST_SECONDS)
            except Exception:  # noqa: BLE001 - one bad client must not stop the accept loop
                log.exception("control connection setup failed")
                conn.close()

    def _admit(self, conn: socket.socket, deadline: float) -> None:
        """Count the connection against its user's and the total bound, or refuse it."""
        uid = peer_uid(conn)
        with self._lock:
            mine = self._open_by_uid.get(uid, 0)
            over_user = mine >= MAX_CLIENTS_PER_USER
            over_all = self._open_total >= MAX_CLIENTS
            if not (over_user or over_all):
                self._open_by_uid[uid] = mine + 1
                self._open_total += 1
        if over_user or over_all:
            name = _cached_user_name(uid)
            if over_user:
                why = (f"too many control connections from user {name} "
                       f"({MAX_CLIENTS_PER_USER} open); close one or try again")
            else:
                why = f"too many control clients ({MAX_CLIENTS} open); try again"
            conn.settimeout(0.2)  # a short answer into the socket buffer, never a wait
            _send(conn, {"ok": False, "error": why})
            conn.close()
            self.denials.refused(name, "control.connect", {
                "reason": "per-user connection limit" if over_user else "connection limit"})
            return
        try:
            threading.Thread(target=self._client, args=(conn, uid, deadline),
                             name="control-client", daemon=True).start()
        except RuntimeError:  # no thread to be had: give the slot back
            self._release(uid)
            raise

    def _release(self, uid: int) -> None:
        with self._lock:
            n = self._open_by_uid.get(uid, 0) - 1
            if n <= 0:
                self._open_by_uid.pop(uid, None)
            else:
                self._open_by_uid[uid] = n
            self._open_total = max(0, self._open_total - 1)

    def _client(self, conn: socket.socket, uid: int, deadline: float) -> None:
        try:
            reply = self.handle(conn, deadline)
            conn.settimeout(REPLY_SECONDS)
            _send(conn, reply)
        except Exception:  # noqa: BLE001 - one bad client must not hurt the daemon
            log.exception("control client failed")
        finally:
            conn.close()
            self._release(uid)

    def handle(self, conn: socket.socket, deadline: float | None = None) -> dict[str, Any]:
        caller = peer_caller(conn, self.settings)
        try:
            req = _read_request(conn, deadline or time.monotonic() + REQUEST_SECONDS)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        name = req.get("command")
        args = req.get("args") or {}
        cmd = self.commands.get(name) if isinstance(name, str) else None
        if cmd is None or not isinstance(args, dict):
            return {"ok": False, "error": f"unknown command {name!r}; known: "
                                          f"{', '.join(sorted(self.commands))}"}
        if cmd.allowed and not caller.roles & cmd.allowed:
            err = denial(caller, cmd.allowed, cmd.action, self.settings)
            self.denials.refused(caller.user, f"control.{name}",
                                 {"needed_role": sorted(cmd.allowed)})
            return {"ok": False, "error": str(err), "needed_role": sorted(cmd.allowed)}
        try:
            data = cmd.run(caller, args)
        except EdgeAgentError as exc:
            if cmd.audited:
                self._audit("cli.action", outcome="minor_failure", user=caller.user,
                            details={"command": f"control.{name}"})
            return {"ok": False, "error": str(exc)}
        if cmd.audited:
            self._audit("cli.action", user=caller.user, details={"command": f"control.{name}"})
        return {"ok": True, "data": data}


def _whoami(caller: Caller, _args: Mapping[str, Any]) -> dict[str, Any]:
    return {"user": caller.user, "uid": caller.uid, "roles": sorted(caller.roles)}


def _read_request(conn: socket.socket, deadline: float) -> dict[str, Any]:
    """One request line, which must be complete by ``deadline`` (monotonic): the
    timeout of each read is what is left of it, so a trickle cannot extend it."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"request not complete within {REQUEST_SECONDS:.0f} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            raise ValueError(f"request not complete within {REQUEST_SECONDS:.0f} s") from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    try:
        req = json.loads(buf.split(b"\n", 1)[0] or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("request is not JSON") from None
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object with a command")
    return req


def _send(conn: socket.socket, obj: Mapping[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(obj, default=str).encode() + b"\n")


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            with _sun_path(path) as addr:
                s.connect(addr)
        except OSError:
            return False
    return True


# -- client ---------------------------------------------------------------------------

def request(path: Path, command: str, args: Mapping[str, Any] | None = None,
            timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the running daemon; raise EdgeAgentError/AccessDenied on refusal."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _sun_path(path) as addr:
                s.connect(addr)
            s.sendall(json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise EdgeAgentError(
                f"the edge-agent daemon is not running (no control socket at {path})",
                hint="start it with 'systemctl start edge-agent'; see 'journalctl -u edge-agent'",
            ) from None
        except PermissionError:
            raise AccessDenied(
                f"cannot reach the control socket {path} (its folder is not accessible)",
                hint="the folder must be searchable by operators (RuntimeDirectoryMode=0755)",
            ) from None
        except OSError as exc:
            raise EdgeAgentError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgeAgentError("the daemon sent no valid reply",
                             hint="see 'journalctl -u edge-agent'") from None
    if not isinstance(reply, dict):
        raise EdgeAgentError("the daemon sent no valid reply")
    if not reply.get("ok"):
        msg = str(reply.get("error", "refused"))
        if reply.get("needed_role"):
            head, _, fix = msg.partition("\n  fix: ")
            raise AccessDenied(head, hint=fix or None)
        raise EdgeAgentError(msg)
    data = reply.get("data")
    return dict(data) if isinstance(data, dict) else {}


# -- the daemon's commands ------------------------------------------------------------

def daemon_status(d: Daemon) -> dict[str, Any]:
    """Live state; pseudonymous keys only (quarantine shows keyed study/instance refs)."""
    cfg = d.cfg
    r = d.scp.counters
    ob = d.outbox.stats()
    st = d.publisher.state
    q = d.quarantine.list()
    days = telemetry.cert_days_left(cfg.mqtt.cert)
    warnings = []
    if days is None or days < CERT_WARN_DAYS:
        warnings.append("device certificate unreadable" if days is None else
                        f"device certificate expires in {days:.0f} days: "
                        "run 'edge-agent provision rotate-cert'")
    if not st.connected:
        warnings.append(f"MQTT disconnected: {st.last_error or 'connecting'}")
    if ob["blocked"]:
        warnings.append(f"{int(ob['blocked'])} outgoing message(s) blocked (see audit log)")
    atna = d.atna_status()
    if atna["enabled"] and not atna["connected"] and (atna["backlog"] or atna["last_error"]):
        warnings.append(f"ATNA collector {atna['collector']} not connected: "
                        f"{atna['last_error'] or 'connecting'}; {atna['backlog']} audit "
                        "record(s) wait in the audit log")
    delivery = d.delivery.stats() if d.delivery is not None else {}
    if d.delivery is not None:
        warnings.extend(d.delivery.warnings())
    review = d.review.backlog()
    if review["overdue"]:
        warnings.append(f"{review['overdue']} flagged result(s) waited longer than [review] "
                        f"escalate_after for a verdict: see 'edge-agent review list'")
    live = d.watchdog.as_json()
    for name, stage in live["stages"].items():
        if stage["stuck"]:
            then = ("systemd restarts the daemon (watchdog no longer fed)"
                    if live["watchdog"] != "off" else
                    "nothing restarts it: run the daemon under systemd, or restart it")
            warnings.append(f"stage {name} is stuck: {stage['reason']}; {then}")
    return {
        "agent_version": __version__,
        "site": cfg.site, "device": cfg.device, "environment": cfg.environment,
        "pid": os.getpid(), "uptime_s": round(time.time() - d.started_at),
        "intake": d.intake,
        "dicom": {
            "listen": f"{cfg.dicom.host}:{cfg.dicom.port}", "ae_title": cfg.dicom.ae_title,
            # 0: received in the daemon's own process
            "receive_workers": d.scp.workers_alive,
            "associations_active": r.active,
            "associations_accepted": r.associations_accepted,
            "associations_rejected": r.associations_rejected,
            "instances_received": r.instances_stored,
            "instances_failed": r.instances_failed,
        },
        "studies": {**d.inbox.counts(),
                    "processed": d.pipeline.counters["studies"],
                    "failed": d.pipeline.counters["failed_studies"]},
        "outbox": {"depth": int(ob["depth"]), "bytes": int(ob["bytes"]),
                   "oldest_age_s": round(ob["oldest_age_s"], 1), "blocked": int(ob["blocked"])},
        "quarantine": {"count": len(q), "items": q[-50:],
                       "oldest_age_s": d.quarantine.stats()["oldest_age_s"]},
        "mqtt": {"connected": st.connected, "since": round(st.since),
                 "last_error": st.last_error, "connects": st.connects,
                 "published": st.published, "refused": st.refused,
                 "tls_failures": st.tls_failures, "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}"},
        "certificates": {"mqtt_device": {"days_left": days, "path": str(cfg.mqtt.cert)}},
        "models": d.engine.active_models(),
        "audit": {**d.audit_log.stats(), "errors": d.audit_log.errors},
        "liveness": live,
        "atna": atna,
        "results_delivery": delivery,
        "review": review,
        "secrets": credentials.sources(cfg),
        "warnings": warnings,
    }


def daemon_commands(d: Daemon) -> dict[str, Command]:
    def status(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        return daemon_status(d)

    def pause(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        d.pause_intake()
        return {"intake": "paused"}

    def resume(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        d.resume_intake()
        return {"intake": "open"}

    def checkpoint(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        d.audit_log.checkpoint()
        return {"checkpointed": True, **d.audit_log.stats()}

    def models_reload(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        # Raises ModelError (old set kept) when the new set does not load.
        return {"reloaded": True, "models": d.engine.reload()}

    from agent.review.commands import review_commands

    return {
        **quarantine_commands(d),
        **review_commands(d),
        "status": Command(ANY_ROLE, "read the daemon status", status),
        "models.reload": Command(frozenset({ADMIN}), "reload models", models_reload,
                                 audited=True),
        "intake.pause": Command(frozenset({ADMIN}), "pause DICOM intake", pause, audited=True),
        "intake.resume": Command(frozenset({ADMIN}), "resume DICOM intake", resume, audited=True),
        "audit.checkpoint": Command(frozenset({AUDITOR, ADMIN}), "sign an audit checkpoint",
                                    checkpoint, audited=True),
    }


def _item_id(args: Mapping[str, Any]) -> int:
    raw = args.get("id")
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise EdgeAgentError("give the quarantined instance's id (a number from "
                             "'edge-agent quarantine list')")
    return raw


def quarantine_commands(d: Daemon) -> dict[str, Command]:
    """The privacy officer's commands; each audits what it did with the officer's name
    and the item's pseudonymous refs (never a value from the instance)."""
    import base64

    from agent.store import quarantine_review as qr

    privacy = frozenset({PRIVACY})

    def refs(item_id: int) -> dict[str, object]:
        try:
            i = d.quarantine.get(item_id)
        except EdgeAgentError:
            return {"id": item_id}
        return {"id": i.id, "study": i.study_key[:12], "instance": i.instance_key[:12],
                "code": i.code}

    def audited(event: str, c: Caller, item_id: int, fn: Callable[[], dict[str, Any]],
                extra: Mapping[str, object] | None = None) -> dict[str, Any]:
        before = refs(item_id)
        try:
            out = fn()
        except EdgeAgentError as exc:
            d.audit(event, outcome="minor_failure", user=c.user,
                    details={**before, **(extra or {}), "refused": str(exc).split("\n")[0]})
            raise
        d.audit(event, user=c.user, details={**before, **(extra or {}),
                                             **out.get("audit", {})})
        out.pop("audit", None)
        return out

    def q_list(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        now = time.time()
        return {"items": [i.as_json(now) for i in d.quarantine.items()],
                "retention_days": d.cfg.quarantine.retention_days,
                "rules": [{"rule": n, "manufacturer": r.manufacturer, "model": r.model,
                           "rows": r.rows, "columns": r.columns}
                          for n, r in enumerate(d.cfg.deid.pixel_clean, 1)]}

    def q_show(c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        item_id = _item_id(a)

        def run() -> dict[str, Any]:
            png = qr.render_png(d.quarantine.read(item_id))
            return {"png": base64.b64encode(png).decode(), **refs(item_id)}
        return audited("quarantine.viewed", c, item_id, run)

    def q_release(c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        item_id = _item_id(a)
        rule = a.get("rule")
        if rule is not None and (isinstance(rule, bool) or not isinstance(rule, int)):
            raise EdgeAgentError("--rule takes the number of a [[deid.pixel_clean]] rule")
        attest = bool(a.get("attest_clean"))
        how = {"attested_clean_by": c.user} if attest else {"rule": rule}

        def run() -> dict[str, Any]:
            r = qr.release(d, item_id, rule=rule, attest=attest)
            return {"released": r.item.id, "event_id": r.event_id, "status": r.status,
                    "how": r.how, "audit": {"event_id": r.event_id, "status": r.status}}
        out = audited("quarantine.released", c, item_id, run, how)
        d.audit("quarantine.purged", user=c.user, details={**how, "id": item_id,
                                                          "why": "released"})
        return out

    def q_purge(c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        item_id = _item_id(a)

        def run() -> dict[str, Any]:
            d.quarantine.get(item_id)  # a clear "no such id" before anything else
            d.quarantine.purge(item_id)
            return {"purged": item_id, "audit": {"why": "officer"}}
        return audited("quarantine.purged", c, item_id, run)

    return {
        "quarantine.list": Command(privacy, "list quarantined instances", q_list,
                                   audited=True),
        "quarantine.show": Command(privacy, "view a quarantined instance", q_show),
        "quarantine.release": Command(privacy, "release a quarantined instance", q_release),
        "quarantine.purge": Command(privacy, "purge a quarantined instance", q_purge),
    }
