"""`edge-agent quarantine list|show|release|purge`: the privacy officer's review of
quarantined instances, through the running daemon (which holds the keys and audits
each action with the officer's Unix user).  Thin: parse, ask the daemon, print."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.options import ConfigOpt, JsonOpt, SocketOpt, age, ask, echo_json
from provisioning.options import fail as _fail

app = typer.Typer(help="Privacy officer: review quarantined instances.", no_args_is_help=True)
IdArg = Annotated[int, typer.Argument(help="the id from 'edge-agent quarantine list'")]


@app.command("list")
def q_list(config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Quarantined instances, oldest first: id, pseudonymous study/instance refs, rule
    code, age (privacy role; audited).  No patient data is shown."""
    data = ask("quarantine.list", {}, config, socket, timeout=120.0)
    if as_json:
        echo_json(data)
        return
    items = data.get("items", [])
    typer.echo(f"{len(items)} quarantined instance(s); unreleased ones are purged after "
               f"{data.get('retention_days')} days")
    for i in items:
        typer.echo(f"  #{i['id']:<5} study {i['study']} instance {i['instance']}  "
                   f"{i['code']}  {age(float(i['age_s']))} old  "
                   f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(float(i['at'])))})")
    rules = data.get("rules", [])
    if rules:
        typer.echo("pixel-clean rules ([[deid.pixel_clean]]) for 'release --rule N':")
        for r in rules:
            typer.echo(f"  {r['rule']}: {r['manufacturer']} / {r['model']} "
                       f"{r['rows']}x{r['columns']}")


@app.command("show")
def q_show(
    item: IdArg,
    out: Annotated[Path | None, typer.Option(
        "--out", help="PNG to write (default ./quarantine-ID.png); never overwritten")] = None,
    config: ConfigOpt = None, socket: SocketOpt = None,
) -> None:
    """Render the instance's pixels (first frame) to a PNG readable by you only (0600),
    to look at on this box (privacy role; audited).  The image may show PHI: delete it
    when done and do not copy it off the box."""
    path = out or Path(f"quarantine-{item}.png")
    if path.exists():
        raise _fail(f"{path} exists; give another --out or remove it first")
    data = ask("quarantine.show", {"id": item}, config, socket, timeout=120.0)
    png = base64.b64decode(str(data.get("png", "")))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(png)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror}") from None
    typer.echo(f"wrote {path} (0600; it may show patient data: delete it when done)")


@app.command("release")
def q_release(
    item: IdArg,
    rule: Annotated[int | None, typer.Option(
        "--rule", help="black out the regions of this [[deid.pixel_clean]] rule (number "
                       "from 'quarantine list'); it must match the device and size")] = None,
    attest_clean: Annotated[bool, typer.Option(
        "--attest-clean", help="you looked at the pixels ('quarantine show') and attest "
                               "they carry no identifying text; recorded with your name")] = False,
    config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False,
) -> None:
    """Send the instance on through de-identification and inference so a result comes
    out, then crypto-shred it (privacy role; audited)."""
    args: dict[str, Any] = {"id": item, "attest_clean": attest_clean}
    if rule is not None:
        args["rule"] = rule
    data = ask("quarantine.release", args, config, socket, timeout=120.0)
    if as_json:
        echo_json(data)
        return
    typer.echo(f"released #{item} ({data.get('how')}): result {data.get('event_id')} "
               f"({data.get('status')}) queued; the quarantined copy was purged")


@app.command("purge")
def q_purge(item: IdArg, config: ConfigOpt = None, socket: SocketOpt = None) -> None:
    """Crypto-shred the instance: its data key is deleted, then its file (privacy role;
    audited).  It cannot be recovered."""
    ask("quarantine.purge", {"id": item}, config, socket, timeout=120.0)
    typer.echo(f"purged #{item}: its key is deleted and it cannot be recovered")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="quarantine")
