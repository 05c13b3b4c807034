"""`edge-agent audit verify|export|tail`: thin CLI over agent.audit.

verify exits 0 only when the log is intact (1 when damaged or not verifiable,
2 on usage or config errors); export is restricted to root and the auditor group and is
itself recorded as an audit event before anything is written.
"""

from __future__ import annotations

import grp
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import config as cfgmod
from agent.audit import records_between, tail, verify, write_atna_xml, write_jsonl
from agent.audit.cli import CliEvent, db_path
from agent.config import Config
from agent.crypto import KeyEncryptionKey, load_key_file
from agent.errors import AccessDenied, AuditError, EdgeAgentError
from agent.ops import control
from provisioning.options import ConfigOpt, record
from provisioning.options import fail as _fail

audit_app = typer.Typer(help="Verify, export and read the audit trail.", no_args_is_help=True)

def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


@dataclass(frozen=True)
class _Ctx:
    cfg: Config
    kek: KeyEncryptionKey
    db: Path


def _load(config: Path | None) -> _Ctx:
    cfg = cfgmod.load(config)
    return _Ctx(cfg, KeyEncryptionKey.from_file(cfg.keys.kek), db_path(cfg))


def is_auditor(uid: int, gids: list[int], group: str) -> bool:
    """Root, or a member of the configured auditor group (primary or supplementary)."""
    if uid == 0:
        return True
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    return g.gr_gid in gids


def _record(ctx: _Ctx, event: str, *, outcome: str = "success",
            details: dict[str, object], phi: dict[str, str] | None = None) -> None:
    record(ctx.cfg, [CliEvent(event, details, outcome, phi)], kek=ctx.kek)


def _when(text: str, *, end: bool) -> datetime:
    try:
        if len(text) == 10:
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuditError(f"{text!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _read_published(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditError(f"{path} line {n} is not JSON ({exc.msg})",
                             hint="pass the audit messages as JSON lines, one per line") from None
        if isinstance(obj, dict):
            items.append(obj)
    return items


@audit_app.command("verify")
def verify_cmd(
    config: ConfigOpt = None,
    published: Annotated[Path | None, typer.Option(
        "--published", help="JSON lines of checkpoints received on edge/{site}/{device}/audit "
                            "(CloudEvents or their data)")] = None,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="genesis public key (hex) pinned outside the box")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
) -> None:
    """Check chain, encryption, signatures, gaps and truncation; exit 0 only when intact."""
    try:
        ctx = _load(config)
        items = _read_published(published) if published else []
        report = verify(ctx.db, ctx.kek, public_key, items,
                        signing_key_path=ctx.cfg.keys.audit_signing)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"ok": report.ok, "state": report.state,
                               "problems": report.problems,
                               "notes": report.notes, "records": report.records,
                               "checkpoints": report.checkpoints,
                               "first_seq": report.first_seq, "last_seq": report.last_seq,
                               "shredded_through": report.shredded_through}, indent=2))
    else:
        typer.echo(report.summary())
        for p in report.problems:
            typer.echo(f"  problem: {p}")
        for n in report.notes:
            typer.echo(f"  note: {n}")
    if not ctx.db.exists():
        # Recording would start a new log here; the daemon does that, loudly, at start.
        typer.echo("warning: not recorded in the audit log: its database is missing",
                   err=True)
        raise typer.Exit(1)
    try:
        _record(ctx, "cli.action", outcome="success" if report.ok else "minor_failure",
                details={"command": "audit.verify", "intact": report.ok,
                         "problems": len(report.problems)})
    except EdgeAgentError as exc:
        typer.echo(f"warning: {exc}", err=True)
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("export")
def export_cmd(
    since: Annotated[str, typer.Option(help="start, YYYY-MM-DD or ISO 8601 (UTC if no zone)")],
    until: Annotated[str, typer.Option(help="end, exclusive; a bare date includes that day")],
    config: ConfigOpt = None,
    patient: Annotated[str | None, typer.Option(help="only records about this patient ID")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or atna-xml")] = "jsonl",
    out: Annotated[Path | None, typer.Option(help="write here (0600) instead of stdout")] = None,
) -> None:
    """Export complete records (with PHI) for an investigation; auditors only, and audited."""
    if fmt not in ("jsonl", "atna-xml"):
        raise _fail(f"--format {fmt!r}: use jsonl or atna-xml")
    try:
        ctx = _load(config)
        group = ctx.cfg.control.auditor_group
        if not is_auditor(os.getuid(), os.getgroups(), group):
            _record(ctx, "audit.exported", outcome="serious_failure",
                    details={"format": fmt, "denied": True})
            raise AccessDenied(f"user {control.user_name(os.getuid())} may not export the audit trail",
                               hint=f"ask an administrator to add you to group {group}")
        start, end = _when(since, end=False), _when(until, end=True)
        if end <= start:
            raise AuditError("--until must be after --since")
        records = records_between(ctx.db, ctx.kek, start, end, patient)
        # Audited before the data leaves: an export that crashes half-way is still on record.
        _record(ctx, "audit.exported", details={
            "format": fmt, "records": len(records), "patient_filter": patient is not None,
            "since": start.isoformat(), "until": end.isoformat()},
            phi={"patient_id": patient} if patient else None)
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    writer = write_jsonl if fmt == "jsonl" else write_atna_xml
    if out is None:
        import sys
        writer(records, sys.stdout)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        n = writer(records, f)
    typer.echo(f"exported {n} record(s) to {out}", err=True)


@audit_app.command("tail")
def tail_cmd(
    config: ConfigOpt = None,
    n: Annotated[int, typer.Option("-n", help="how many of the latest records")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """The latest records, pseudonymised (no PHI): for operators."""
    try:
        ctx = _load(config)
        # Peer names as central ops sees them: keyed with the box's pseudonym key.
        rows = tail(ctx.db, ctx.kek, max(1, n),
                    load_key_file(ctx.cfg.keys.pseudonym, purpose="pseudonym"))
        _record(ctx, "cli.action", details={"command": "audit.tail", "records": len(rows)})
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    for r in rows:
        if as_json:
            typer.echo(json.dumps(r, sort_keys=True))
            continue
        who = r.get("user") or r.get("source") or "-"
        details = json.dumps(r.get("details"), sort_keys=True, separators=(",", ":"))
        typer.echo(f"{r['seq']:>8} {r['time']} {r['event']:<22} {r['event_id']} "
                   f"outcome={r['outcome']} {who} {details}")
