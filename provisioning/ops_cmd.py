"""`edge-agent provision init|install-cert|rotate-cert`, `doctor`, `status`, `control`,
`keys rotate`.  Thin: parse, check the caller's role, call agent/, print."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.config import Config
from agent.errors import AccessDenied, EdgeAgentError
from agent.ops import control
from provisioning.options import ConfigOpt, JsonOpt, SocketOpt, record, record_quietly
from provisioning.options import fail as _fail
from provisioning.options import load_config as _load
from provisioning.options import require_admin as _require_admin
from provisioning.options import socket_path as _socket_path

keys_app = typer.Typer(help="Box key management.", no_args_is_help=True)
control_app = typer.Typer(help="Admin actions on the running daemon.", no_args_is_help=True)


def _audit(cfg: Config, event: str, *, outcome: str = "success",
           details: dict[str, object]) -> None:
    from agent.audit.cli import CliEvent

    record(cfg, [CliEvent(event, details, outcome)])


# -- status / control ---------------------------------------------------------------

def _print_status(s: dict[str, Any]) -> None:
    d, st, ob, q, m = s["dicom"], s["studies"], s["outbox"], s["quarantine"], s["mqtt"]
    days = s["certificates"]["mqtt_device"]["days_left"]
    lines = [
        f"edge-agent {s['agent_version']}  {s['site']}/{s['device']}  ({s['environment']})  "
        f"pid {s['pid']}  up {s['uptime_s']} s",
        f"intake:        {s['intake']}  DICOM {d['ae_title']} on {d['listen']}"
        + (f" ({d['receive_workers']} receive workers)" if d.get("receive_workers") else ""),
        f"associations:  {d['associations_active']} active, {d['associations_accepted']} accepted, "
        f"{d['associations_rejected']} rejected",
        f"studies:       {st.get('open', 0)} open, {st.get('complete', 0)} in flight, "
        f"{st['processed']} processed, {st['failed']} failed",
        f"outbox:        {ob['depth']} queued ({ob['bytes']} bytes, "
        f"oldest {ob['oldest_age_s']} s), "
        f"{ob['blocked']} blocked",
        f"quarantine:    {q['count']} instance(s)",
    ]
    lines += [f"  - study {i['study']} instance {i['instance']}: {i['reason']}" for i in q["items"]]
    rv = s.get("review") or {}
    if rv:
        lines.append(f"review:        {rv.get('waiting', 0)} flagged result(s) waiting, "
                     f"{rv.get('overdue', 0)} overdue (oldest {rv.get('oldest_age_s', 0)} s)")
    mqtt = "connected" if m["connected"] else "DISCONNECTED"
    lines.append(f"mqtt:          {mqtt} to {m['broker']}, {m['published']} published"
                 + (f", last error: {m['last_error']}" if m["last_error"] else ""))
    lines.append("certificate:   " + ("unreadable" if days is None else f"{days} days left"))
    atna = s.get("atna") or {}
    if atna.get("enabled"):
        link = "connected" if atna["connected"] else "DISCONNECTED"
        lines.append(f"atna:          {link} to {atna['collector']} ({atna['format']}), "
                     f"{atna['sent']} sent, {atna['backlog']} waiting"
                     + (f", last error: {atna['last_error']}" if atna["last_error"] else ""))
    for name, r in (s.get("results_delivery") or {}).items():
        code = f", last error {r['last_error_code']}" if r.get("last_error_code") else ""
        why = f" ({r['last_error']})" if r.get("last_error") and r.get("depth") else ""
        lines.append(f"pacs {name}:".ljust(15) + f"{r['depth']} queued "
                     f"({r['awaiting_commitment']} awaiting commitment, oldest "
                     f"{r['oldest_age_s']} s), {r['confirmed']} confirmed, "
                     f"{r['dead_letter']} dead-lettered{code}{why}")
    models = ", ".join(f"{x.get('name')} {x.get('version')}" for x in s["models"]) or "none"
    lines.append(f"models:        {models}")
    lines += _liveness_lines(s.get("liveness"))
    lines += [f"warning:       {w}" for w in s.get("warnings", [])]
    typer.echo("\n".join(lines))


def _liveness_lines(live: dict[str, Any] | None) -> list[str]:
    if not live:
        return []
    watchdog = {"pinging": "systemd watchdog fed",
                "withheld": "systemd watchdog WITHHELD: systemd restarts the daemon",
                "off": "no systemd watchdog"}.get(str(live.get("watchdog")), "")
    stuck = live.get("stuck") or []
    head = (f"stages:        STUCK: {', '.join(stuck)}" if stuck else
            f"stages:        all live ({', '.join(live.get('stages', {}))})")
    lines = [f"{head}; {watchdog}"]
    for name, st in live.get("stages", {}).items():
        if st.get("stuck"):
            lines.append(f"  - {name}: {st.get('reason')}")
    return lines


def status(config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Live state of the running daemon (over the local control socket)."""
    try:
        data = control.request(_socket_path(config, socket), "status")
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_status(data)


def _control(command: str, config: Path | None, socket: Path | None) -> dict[str, Any]:
    try:
        return control.request(_socket_path(config, socket), command)
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None


@control_app.command("pause")
def pause(config: ConfigOpt = None, socket: SocketOpt = None) -> None:
    """Stop accepting DICOM associations (admin; audited). Studies in flight finish."""
    _control("intake.pause", config, socket)
    typer.echo("intake paused: new associations are refused until 'edge-agent control resume'")


@control_app.command("resume")
def resume(config: ConfigOpt = None, socket: SocketOpt = None) -> None:
    """Accept DICOM associations again (admin; audited)."""
    _control("intake.resume", config, socket)
    typer.echo("intake open")


@control_app.command("checkpoint")
def checkpoint(config: ConfigOpt = None, socket: SocketOpt = None) -> None:
    """Sign an audit checkpoint now, before an export (auditor or admin; audited)."""
    data = _control("audit.checkpoint", config, socket)
    typer.echo(f"audit checkpoint signed ({data.get('records', '?')} records)")


@control_app.command("whoami")
def whoami(config: ConfigOpt = None, socket: SocketOpt = None) -> None:
    """Which roles the daemon grants you."""
    data = _control("whoami", config, socket)
    typer.echo(f"{data['user']}: {', '.join(data['roles']) or 'no role'}")


# -- keys -------------------------------------------------------------------------------

@keys_app.command("rotate")
def keys_rotate(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Rotate the box key-encryption key (admin; audited with your Unix user)."""
    try:
        cfg = _load(config)
        _require_admin(cfg.control, "rotate keys")
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    try:
        mod = importlib.import_module("agent.identity.keyrotate")
    except ModuleNotFoundError as exc:
        if exc.name != "agent.identity.keyrotate":
            raise
        raise _fail("key rotation is not available in this build "
                    "(agent.identity.keyrotate is missing)") from None
    try:
        result = mod.rotate_keys(cfg, user=control.user_name(os.getuid()))
    except EdgeAgentError as exc:
        _audit_quietly(cfg, {"command": "keys.rotate"}, outcome="serious_failure")
        raise _fail(exc) from None
    _audit_quietly(cfg, {"command": "keys.rotate"})
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else
               "\n".join(f"{k}: {v}" for k, v in dict(result).items()))


@keys_app.command("shred-vault")
def keys_shred_vault(
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="really shred it")] = False,
) -> None:
    """Crypto-shred the pseudonym vault ([deid] pseudonyms = "vault"): every mapping
    from an original to its code becomes unrecoverable; later studies get new codes.
    Admin; the daemon must be stopped; audited."""
    from agent.crypto import KeyEncryptionKey
    from agent.deid.vault import shred_vault

    try:
        cfg = _load(config)
        _require_admin(cfg.control, "shred the pseudonym vault")
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if not yes:
        raise _fail("shredding the pseudonym vault cannot be undone: the same patient gets "
                    "new codes from now on; run again with --yes")
    try:
        n = shred_vault(cfg.state_dir, KeyEncryptionKey.from_file(cfg.keys.kek))
    except EdgeAgentError as exc:
        _audit_quietly(cfg, {"command": "keys.shred-vault"}, outcome="serious_failure")
        raise _fail(exc) from None
    _audit_quietly(cfg, {"command": "keys.shred-vault", "codes": n})
    typer.echo(f"pseudonym vault shredded: {n} code(s) unrecoverable")


def _audit_quietly(cfg: Config, details: dict[str, object], outcome: str = "success") -> None:
    from agent.audit.cli import CliEvent

    record_quietly(cfg, [CliEvent("cli.action", details, outcome)], "the action")


# -- provision --------------------------------------------------------------------------

def provision_init(
    device_id: Annotated[str, typer.Option("--device-id", help="this box, e.g. ct-edge-01")],
    site: Annotated[str, typer.Option("--site", help="the hospital site, e.g. st-marys")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="keys, identity, spool")] = Path(
        "/var/lib/edge-agent"),
    config: Annotated[Path | None, typer.Option(
        "--config", "-c",
        help="where to write agent.toml (default <state-dir>/agent.toml)")] = None,
    mqtt_host: Annotated[str, typer.Option(
        "--mqtt-host", help="broker name in its certificate")] = "mqtt.example.org",
    mqtt_port: Annotated[int, typer.Option("--mqtt-port")] = 8883,
    dicom_port: Annotated[int, typer.Option("--dicom-port")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title")] = "EDGE_AGENT",
    control_socket: Annotated[Path, typer.Option("--control-socket")] = control.DEFAULT_SOCKET,
    overwrite_config: Annotated[bool, typer.Option("--overwrite-config")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the box keys, a device key and CSR for the fleet CA, and a config."""
    from agent.identity import certificates as identity

    try:
        r = identity.init(device_id, site, state_dir, config_path=config, mqtt_host=mqtt_host,
                          mqtt_port=mqtt_port, dicom_port=dicom_port, ae_title=ae_title,
                          control_socket=control_socket, overwrite_config=overwrite_config)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(f"{exc.filename}: {exc.strerror} (run as root to provision for the "
                    f"{identity.SERVICE_USER} user)") from None
    if as_json:
        typer.echo(json.dumps({"state_dir": str(r.state_dir), "config": str(r.config),
                               "csr": str(r.csr), "created": r.created, "kept": r.kept,
                               "owner": r.owner}))
        return
    for p in r.created:
        typer.echo(f"created {p}")
    for p in r.kept:
        typer.echo(f"kept    {p} (already existed; never overwritten)")
    typer.echo(f"owner:  {r.owner}\nconfig: {r.config}\n\nNext: send this CSR to your fleet CA "
               f"(CN {site}.{device_id}, clientAuth):\n  {r.csr}\nthen run: edge-agent provision "
               f"install-cert --cert CERT.pem --ca FLEET-CA.pem --config {r.config}")


def _write_error(exc: OSError) -> EdgeAgentError:
    return EdgeAgentError(f"cannot change {exc.filename}: {exc.strerror}",
                          hint="run as root (sudo edge-agent provision ...), which installs the "
                               "files for the edge-agent service user")


def _identity_ctx(config: Path | None) -> tuple[Config, Path]:
    from agent.identity import certificates as identity

    cfg = _load(config)
    _require_admin(cfg.control, "change the device identity")
    return cfg, identity.pki_dir(cfg.mqtt.cert)


def provision_install_cert(
    cert: Annotated[Path, typer.Option("--cert", help="certificate PEM from the fleet CA "
                                                      "(intermediates may follow the leaf)")],
    ca: Annotated[Path, typer.Option("--ca", help="fleet CA certificate(s) PEM")],
    config: ConfigOpt = None,
) -> None:
    """Check chain, key match, validity and clientAuth usage, then install (admin; audited)."""
    from agent.identity import certificates as identity

    loaded: Config | None = None
    try:
        loaded, pki = _identity_ctx(config)
        res = identity.install_certificate(pki, cert, ca, site=loaded.site, device=loaded.device)
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        if loaded is not None:  # a refused certificate is a security-relevant event too
            _audit_quietly(loaded, {"command": "provision.install-cert",
                                    "refused": str(exc).split("\n")[0]}, outcome="minor_failure")
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(_write_error(exc)) from None
    cfg = loaded
    info = res.info
    details: dict[str, object] = {
        "serial": info.serial, "fingerprint": info.fingerprint[:32],
        "not_after": info.not_after.isoformat(), "rotated": res.rotated,
        "previous_serial": res.previous_serial, "identity": res.identity}
    _audit_event(cfg, "cert.changed", details)
    _audit_quietly(cfg, {"command": "provision.install-cert", "serial": info.serial})
    typer.echo(f"installed certificate {info.subject} serial {info.serial}, valid until "
               f"{info.not_after:%Y-%m-%d} ({info.days_left:.0f} days)")
    for w in info.warnings:
        typer.echo(f"warning: {w}")
    if res.rotated:
        typer.echo("switched to the new identity; restart the daemon to use it: "
                   "systemctl restart edge-agent")


def provision_rotate_cert(
    config: ConfigOpt = None,
    new: Annotated[bool, typer.Option(
        "--new", help="discard a pending CSR and make another")] = False,
) -> None:
    """New device key + CSR beside the working identity; install-cert switches (admin; audited)."""
    from agent.identity import certificates as identity

    try:
        cfg, pki = _identity_ctx(config)
        res = identity.rotate(pki, site=cfg.site, device=cfg.device, new=new)
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(_write_error(exc)) from None
    if not res.reused:
        _audit_quietly(cfg, {"command": "provision.rotate-cert", "identity": res.identity})
    state = "existing pending" if res.reused else "new"
    typer.echo(f"{state} key and CSR ({res.identity}); the current identity keeps working.\n"
               f"Send to the fleet CA: {res.csr}\nthen: edge-agent provision install-cert "
               f"--cert CERT.pem --ca FLEET-CA.pem --config {cfg.path}")


def _audit_event(cfg: Config, event: str, details: dict[str, object]) -> None:
    from agent.audit.cli import CliEvent

    record_quietly(cfg, [CliEvent(event, details)], event)


def _provision_app(app: typer.Typer) -> typer.Typer:
    for g in app.registered_groups:
        if g.name == "provision" and g.typer_instance is not None:
            return g.typer_instance
    sub = typer.Typer(help="Set up a box's identity, keys and config.", no_args_is_help=True)
    app.add_typer(sub, name="provision")
    return sub


def doctor(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    broker_timeout: Annotated[float, typer.Option(help="seconds for the MQTT handshake")] = 10.0,
    skip: Annotated[list[str] | None, typer.Option(
        help="skip a check by name (repeatable)")] = None,
) -> None:
    """Check config, keys, permissions, certificate, clock, DICOM port, broker (real mTLS),
    ATNA audit repository (real mTLS, when configured), PACS destinations (C-ECHO),
    models, disk, spool and audit.
    Exit 0 all PASS, 1 worst WARN, 2 any FAIL."""
    from agent.ops import doctor as doc

    report = doc.run(config, broker_timeout=broker_timeout, skip=frozenset(skip or ()))
    typer.echo(json.dumps(doc.as_json(report), indent=2) if as_json else doc.render(report))
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
    prov = _provision_app(app)
    prov.command("init")(provision_init)
    prov.command("install-cert")(provision_install_cert)
    prov.command("rotate-cert")(provision_rotate_cert)
    app.command("status")(status)
    app.add_typer(keys_app, name="keys")
    app.add_typer(control_app, name="control")
