"""`edge-agent doctor`: is this box ready, and if not, what exactly to do.

Every check yields PASS, WARN or FAIL with a one-line fix.  Checks never raise:
an unexpected error in one becomes that check's FAIL, so a single broken piece
never hides the state of the others.  Exit status is the worst result:
0 all PASS, 1 some WARN, 2 any FAIL.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import shutil
import socket
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509

from agent.config import Config
from agent.errors import AccessDenied, ConfigError, EdgeAgentError

Status = Literal["PASS", "WARN", "FAIL"]
_RANK = {"PASS": 0, "WARN": 1, "FAIL": 2}
EARLIEST_SANE = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def worst(self) -> Status:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default="PASS")

    @property
    def exit_code(self) -> int:
        return _RANK[self.worst]


def _ok(name: str, msg: str) -> Check:
    return Check(name, "PASS", msg)


def _warn(name: str, msg: str, fix: str) -> Check:
    return Check(name, "WARN", msg, fix)


def _fail(name: str, msg: str, fix: str) -> Check:
    return Check(name, "FAIL", msg, fix)


def _first_line(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, EdgeAgentError):
        text = str(exc.args[0]) if exc.args else str(exc)
        return text.splitlines()[0], exc.hint or ""
    return f"{type(exc).__name__}: {exc}", ""


# -- individual checks ----------------------------------------------------------------

def check_keys(cfg: Config) -> Iterator[Check]:
    from agent.crypto import load_key_file

    for purpose, path in (("key-encryption", cfg.keys.kek), ("pseudonym", cfg.keys.pseudonym),
                          ("audit signing", cfg.keys.audit_signing)):
        try:
            load_key_file(path, purpose=purpose)
        except EdgeAgentError as exc:
            msg, fix = _first_line(exc)
            yield _fail("keys", msg, fix or "re-run 'edge-agent provision init'")
            continue
        yield _ok("keys", f"{purpose} key readable (32 bytes)")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def check_permissions(cfg: Config) -> Iterator[Check]:
    from agent import fileperm

    name = "permissions"
    state = cfg.state_dir
    if not state.exists():
        yield _fail(name, f"state dir {state} does not exist",
                    "run 'edge-agent provision init' (or StateDirectory= creates it under systemd)")
        return
    owner = state.stat().st_uid
    # The same test 'edge-agent run' refuses to start on (agent/fileperm.py).
    folders = fileperm.open_folders(cfg)
    for f in folders:
        yield _fail(name, f.message, f.fix)
    if not any(f.what == "state dir" for f in folders):
        yield _ok(name, f"state dir {state} is private (mode {_mode(state):o})")
    bad = 0
    for _cred, path in fileperm.secret_files(cfg):
        try:
            st = path.stat()
        except OSError as exc:
            bad += 1
            yield _fail(name, f"{path}: {exc.strerror}", "re-run provisioning or fix the path")
            continue
        if stat.S_IMODE(st.st_mode) & 0o077:
            bad += 1
            yield _fail(name, f"secret {path} is readable by group/others "
                              f"(mode {stat.S_IMODE(st.st_mode):o})", f"chmod 600 {path}")
        elif st.st_uid != owner:
            bad += 1
            yield _warn(name, f"secret {path} is owned by uid {st.st_uid}, not by the state "
                              f"dir owner uid {owner}", f"chown {owner} {path}")
    if not bad:
        yield _ok(name, "secret files are 0600 and owned by the service user")
    try:
        cmode = _mode(cfg.path)
    except OSError:
        return
    if cmode & 0o022:
        yield _fail(name, f"config {cfg.path} is writable by group/others (mode {cmode:o})",
                    f"chmod 640 {cfg.path}")


def check_certificate(cfg: Config) -> Iterator[Check]:
    from agent.identity import certificates as identity

    name = "certificate"
    try:
        cert_pem, ca_pem = cfg.mqtt.cert.read_bytes(), cfg.mqtt.ca.read_bytes()
    except OSError as exc:
        which = "cert" if exc.filename == str(cfg.mqtt.cert) else "ca"
        yield _fail(name, f"[mqtt] {which} {exc.filename}: {exc.strerror}",
                    "install the device certificate: 'edge-agent provision install-cert "
                    "--cert CERT.pem --ca CA.pem'")
        return
    try:
        key = identity.load_device_key(cfg.mqtt.key)
        info = identity.check_certificate(
            cert_pem, ca_pem, key, site=cfg.site, device=cfg.device,
            cert_name=f"[mqtt] cert {cfg.mqtt.cert}", ca_name=f"[mqtt] ca {cfg.mqtt.ca}",
            key_name=f"[mqtt] key {cfg.mqtt.key}")
    except EdgeAgentError as exc:
        msg, fix = _first_line(exc)
        yield _fail(name, msg, fix or "re-issue the certificate and run 'provision install-cert'")
        return
    if info.days_left < identity.WARN_DAYS:
        yield _warn(name, f"chain OK but only {info.days_left:.0f} days left "
                          f"(until {info.not_after:%Y-%m-%d})",
                    "run 'edge-agent provision rotate-cert' and install the new certificate")
    else:
        yield _ok(name, f"chain OK, clientAuth, {info.days_left:.0f} days left "
                        f"(until {info.not_after:%Y-%m-%d})")


def check_clock(cfg: Config) -> Iterator[Check]:
    now = datetime.now(UTC)
    name = "clock"
    floor = EARLIEST_SANE
    with contextlib.suppress(OSError, ValueError):
        for c in x509.load_pem_x509_certificates(cfg.mqtt.ca.read_bytes()):
            floor = max(floor, c.not_valid_before_utc)
    if now < floor:
        yield _fail(name, f"system time {now:%Y-%m-%d %H:%M} UTC is before {floor:%Y-%m-%d}; "
                          "TLS and audit timestamps will be wrong",
                    "enable time sync: timedatectl set-ntp true (check the NTP server)")
        return
    synced = Path("/run/systemd/timesync/synchronized").exists()
    yield _ok(name, f"system time {now:%Y-%m-%d %H:%M} UTC is plausible"
                    + (" (NTP synchronised)" if synced else ""))


def _daemon_alive(cfg: Config) -> bool:
    from agent.ops import control

    try:
        control.request(cfg.control.socket, "whoami", timeout=3.0)
    except EdgeAgentError:
        return False
    return True


def check_dicom_port(cfg: Config) -> Iterator[Check]:
    name = "dicom-port"
    host, port = cfg.dicom.host, cfg.dicom.port
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                if _daemon_alive(cfg):
                    yield _ok(name, f"{host}:{port} is in use by the running edge-agent")
                else:
                    yield _fail(name, f"{host}:{port} is in use by another program",
                                f"find it with 'ss -ltnp sport = :{port}' and stop it, or change "
                                "[dicom] port")
            elif exc.errno == errno.EACCES:
                yield _fail(name, f"not allowed to bind {host}:{port} (port below 1024)",
                            "use a port >= 1024, or install the low-port drop-in that grants "
                            "CAP_NET_BIND_SERVICE")
            else:
                yield _fail(name, f"cannot bind {host}:{port}: {exc.strerror}",
                            "check [dicom] host is an address of this machine")
            return
    yield _ok(name, f"{host}:{port} is free to bind")


def _daemon_link(cfg: Config) -> Check | None:
    """The running daemon's own broker link; None when no daemon answers.

    The broker gives the box's certificate exactly one session (it binds the client id to
    the certificate name), so a probe with that certificate would take the daemon's
    session over: while the daemon runs, its link is the one to report."""
    from agent.ops import control

    if not _daemon_alive(cfg):
        return None
    name = "broker"
    try:
        link = control.request(cfg.control.socket, "status", timeout=5.0)["mqtt"]
    except AccessDenied:
        return _warn(name, "not probed: the running daemon holds the box's MQTT session and "
                           "you may not read its status",
                     "run doctor as root or a member of the edge-agent group, or see "
                     "'edge-agent status'")
    except (EdgeAgentError, KeyError, TypeError) as exc:
        return _warn(name, f"not probed: the running daemon holds the box's MQTT session and "
                           f"did not report it ({_first_line(exc)[0]})",
                     "see 'edge-agent status' and journalctl -u edge-agent")
    broker = link.get("broker") or f"{cfg.mqtt.host}:{cfg.mqtt.port}"
    if link.get("connected"):
        return _ok(name, f"the running daemon is connected to {broker} with mutual TLS (MQTT 5), "
                         f"{link.get('published', 0)} published")
    return _fail(name, f"the running daemon is not connected to {broker}: "
                       f"{link.get('last_error') or 'no reason reported yet'}",
                 f"check [mqtt] host/port ({cfg.mqtt.host}:{cfg.mqtt.port}), the firewall, and "
                 "that the broker trusts the fleet CA (docs/fleet.md, 'When a box cannot reach "
                 "the broker')")


def check_broker(cfg: Config, timeout: float) -> Iterator[Check]:
    name = "broker"
    running = _daemon_link(cfg)
    if running is not None:
        yield running
        return
    mqtt_tls = importlib.import_module("agent.uplink.mqtt_tls")
    probe: Callable[..., tuple[bool, str]] | None = getattr(mqtt_tls, "probe", None)
    if probe is None:
        yield _warn(name, "this build has no MQTT probe", "upgrade edge-agent")
        return
    ok, why = probe(cfg, timeout=timeout)
    if ok:
        yield _ok(name, why)
    else:
        yield _fail(name, why, f"check [mqtt] host/port ({cfg.mqtt.host}:{cfg.mqtt.port}), the "
                               "firewall, and that the broker trusts the fleet CA")


def check_atna(cfg: Config) -> Iterator[Check]:
    """The hospital's audit repository, when [atna] is enabled: a real mutual-TLS connect."""
    if not cfg.atna.enabled:
        return
    from agent.audit.atna import probe

    ok, why, fix = probe(cfg)
    if ok:
        yield _ok("atna", why)
    else:
        yield _fail("atna", why, fix or "check [atna] host/port, the firewall and the "
                    "collector's log (docs/audit.md, 'To the hospital's audit repository')")


def check_results(cfg: Config) -> Iterator[Check]:
    """Each [[results.destinations]] PACS: a real association and C-ECHO."""
    if not cfg.results.enabled:
        return
    from agent.results.probe import probe

    for dest in cfg.results.destinations:
        ok, why, fix = probe(cfg, dest)
        yield _ok("results", why) if ok else _fail("results", why, fix)


def check_models(cfg: Config) -> Iterator[Check]:
    from agent.infer.providers import choose
    from agent.infer.registry import Registry
    from agent.infer.signing import load_public_keys

    choice = choose(cfg.infer.providers)
    warning = choice.warning()
    if warning:
        yield _warn("providers", warning,
                    "install the onnxruntime build with that provider (onnxruntime-gpu for "
                    "CUDA/TensorRT) and its drivers, or remove it from [infer] providers")
    else:
        yield _ok("providers", f"onnxruntime execution providers: {', '.join(choice.use)}")
    name = "models"
    reg = Registry(cfg.models.dir, cfg.state_dir / "models-state",
                   publisher_keys=load_public_keys(cfg.models.publisher_keys),
                   environment=cfg.environment)
    names = reg.names()
    if not names:
        yield _warn(name, f"no models installed in {cfg.models.dir}; results will say "
                          "no_applicable_model", "edge-agent models install PACKAGE_DIR")
        return
    for n in names:
        version = reg.active_version(n)
        if version is None:
            continue
        try:
            v = reg.package(n, version).verification
        except EdgeAgentError as exc:
            msg, fix = _first_line(exc)
            yield _fail(name, f"{n} {version}: {msg}", fix or "re-install the package")
            continue
        if v.ok:
            yield _ok(name, f"{n} {version} verified (signature and sha256)")
        elif cfg.environment == "production":
            yield _fail(name, f"{n} {version}: {v.status} ({v.detail}); it will not be loaded",
                        "re-install from the publisher or pin its key ([models] publisher_keys)")
        else:
            yield _warn(name, f"{n} {version}: {v.status} ({v.detail}); allowed in development",
                        "use signed packages before production")


def check_disk(cfg: Config) -> Iterator[Check]:
    name = "disk"
    try:
        free = shutil.disk_usage(cfg.state_dir).free
    except OSError as exc:
        yield _fail(name, f"cannot stat {cfg.state_dir}: {exc.strerror}", "create the state dir")
        return
    need = cfg.inbox.min_free_bytes
    gib = free / 1024**3
    if free < need:
        yield _fail(name, f"{gib:.1f} GiB free under {cfg.state_dir}, below the "
                          f"{need / 1024**3:.1f} GiB reserve: new studies are refused (0xA700)",
                    "free space or lower [inbox] min_free_bytes")
    elif free < 2 * need:
        yield _warn(name, f"{gib:.1f} GiB free, close to the {need / 1024**3:.1f} GiB reserve",
                    "free space before the box starts refusing studies")
    else:
        yield _ok(name, f"{gib:.1f} GiB free under {cfg.state_dir}")


def _ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def check_spool(cfg: Config) -> Iterator[Check]:
    from agent.crypto import KeyEncryptionKey

    name = "spool"
    kek = KeyEncryptionKey.from_file(cfg.keys.kek)
    stores = {
        "outbox": (cfg.state_dir / "outbox" / "outbox.db", "SELECT v FROM meta WHERE k='data_key'"),
        "quarantine": (cfg.state_dir / "quarantine" / "index.db",
                       "SELECT v FROM meta WHERE k='data_key'"),
        "inbox": (cfg.state_dir / "inbox" / "index.db",
                  "SELECT wrapped_key FROM studies WHERE wrapped_key IS NOT NULL"),
    }
    for store, (db, sql) in stores.items():
        if not db.exists():
            yield _ok(name, f"{store}: not created yet")
            continue
        try:
            conn = _ro(db)
            try:
                rows = conn.execute(sql).fetchall()
            finally:
                conn.close()
            for (wrapped,) in rows:
                kek.unwrap(bytes(wrapped))
        except sqlite3.Error as exc:
            yield _fail(name, f"{store} database {db} unreadable ({exc})",
                        "stop the daemon, keep a copy, and restore it from backup")
            continue
        except EdgeAgentError as exc:
            msg, fix = _first_line(exc)
            yield _fail(name, f"{store}: {msg}", fix or "restore the matching KEK")
            continue
        yield _ok(name, f"{store}: {len(rows)} data key(s) unwrap with this box's KEK")


def check_audit(cfg: Config) -> Iterator[Check]:
    from agent.audit import verify
    from agent.audit.anchor import path_for
    from agent.crypto import KeyEncryptionKey

    db = cfg.state_dir / "audit" / "audit.db"
    if not db.exists() and not path_for(db).exists():
        yield _warn("audit", "no audit log yet (the daemon creates it on first start)",
                    "start the daemon: systemctl start edge-agent")
        return
    rep = verify(db, KeyEncryptionKey.from_file(cfg.keys.kek),
                 signing_key_path=cfg.keys.audit_signing)
    if rep.ok:
        yield _ok("audit", rep.summary())
    elif not rep.verifiable and db.exists():
        # A log that replaced a lost one: known and alerted; the earlier history is
        # judged against what central ops holds (docs/runbooks.md).
        yield _warn("audit", f"{rep.summary()}: {rep.problems[0]}",
                    "follow docs/runbooks.md, 'The audit log went missing'")
    else:
        yield _fail("audit", f"{rep.summary()}: {rep.problems[0]}",
                    "preserve the box as evidence and follow docs/runbooks.md (incident response)")


def check_daemon(cfg: Config) -> Iterator[Check]:
    if _daemon_alive(cfg):
        yield _ok("daemon", f"running; control socket {cfg.control.socket} answers")
    else:
        yield _warn("daemon", "not running (no answer on the control socket)",
                    "systemctl start edge-agent; see journalctl -u edge-agent")


# -- runner ---------------------------------------------------------------------------

def run(config_path: Path | None = None, *, broker_timeout: float = 10.0,
        skip: frozenset[str] = frozenset()) -> Report:
    """Run every check; configuration problems stop the checks that need a config."""
    from agent import config as cfgmod

    checks: list[Check] = []
    try:
        cfg = cfgmod.load(config_path)
    except ConfigError as exc:
        where = exc.path or "config"
        for p in exc.problems:
            checks.append(_fail("config", f"{where}: {p}", "edit the file (docs/configuration.md)"))
        return Report(tuple(checks))
    checks.append(_ok("config", f"{cfg.path} is valid"))
    steps: list[tuple[str, Callable[[], Iterator[Check]]]] = [
        ("keys", lambda: check_keys(cfg)),
        ("permissions", lambda: check_permissions(cfg)),
        ("certificate", lambda: check_certificate(cfg)),
        ("clock", lambda: check_clock(cfg)),
        ("dicom-port", lambda: check_dicom_port(cfg)),
        ("broker", lambda: check_broker(cfg, broker_timeout)),
        ("atna", lambda: check_atna(cfg)),
        ("results", lambda: check_results(cfg)),
        ("models", lambda: check_models(cfg)),
        ("disk", lambda: check_disk(cfg)),
        ("spool", lambda: check_spool(cfg)),
        ("audit", lambda: check_audit(cfg)),
        ("daemon", lambda: check_daemon(cfg)),
    ]
    for name, step in steps:
        if name in skip:
            continue
        try:
            checks.extend(step())
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            msg, fix = _first_line(exc)
            checks.append(_fail(name, f"check could not run: {msg}",
                                fix or "run as root or the edge-agent user"))
    return Report(tuple(checks))


def render(report: Report) -> str:
    lines = []
    for c in report.checks:
        lines.append(f"{c.status:<4}  {c.name:<12} {c.message}")
        if c.fix and c.status != "PASS":
            lines.append(f"      {'':<12} fix: {c.fix}")
    counts = {s: sum(c.status == s for c in report.checks) for s in ("PASS", "WARN", "FAIL")}
    lines.append(f"\n{counts['PASS']} passed, {counts['WARN']} warning(s), {counts['FAIL']} "
                 f"failure(s): {report.worst}")
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, object]:
    return {"worst": report.worst, "exit_code": report.exit_code,
            "checks": [{"name": c.name, "status": c.status, "message": c.message, "fix": c.fix}
                       for c in report.checks]}


__all__ = ["Check", "Report", "as_json", "render", "run"]
