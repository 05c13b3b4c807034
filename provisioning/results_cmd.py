"""`edge-agent results preview`: the result objects of a study, as files for inspection.

They carry PHI (they are written into the original study): admins only, audited
before anything is written, files 0600.  Thin: agent.results does the work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from agent.errors import AccessDenied, EdgeAgentError
from agent.ops import control
from provisioning.options import fail as _fail

results_app = typer.Typer(help="Result objects for the original study (SR, GSPS, key image).",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(results_app, name="results")


@results_app.command("preview")
def preview(
    study: Annotated[str, typer.Argument(help="the study's ref from its result (or a unique "
                                              "prefix of at least 8 characters)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the DICOM files (created 0700)")],
    version: Annotated[int | None, typer.Option(help="study version (default: newest held)")]
    = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="agent.toml")] = None,
) -> None:
    """Build the SR, presentation state and key image of a processed study into --out."""
    from agent import config as cfgmod
    from agent.audit.cli import CliEvent, record_cli
    from agent.crypto import KeyEncryptionKey, load_key_file
    from agent.results.build import build_all, write_objects
    from agent.results.common import Issuer
    from agent.results.link import LinkStore

    try:
        cfg = cfgmod.load(config)
        caller = control.local_caller(cfg.control)
        user = control.user_name(os.getuid())
        kek = KeyEncryptionKey.from_file(cfg.keys.kek)
        try:
            control.require(caller, frozenset({control.ADMIN}), "results preview", cfg.control)
        except AccessDenied:
            record_cli(cfg, [CliEvent("results.exported", {"denied": True}, "serious_failure")],
                       user=user, kek=kek)
            raise
        db = cfg.state_dir / "results" / "links.db"
        if not db.exists():
            raise EdgeAgentError("this box holds no result links",
                                 hint="set [results] enabled = true; studies processed from "
                                      "then on can be previewed")
        links = LinkStore(db, kek)
        try:
            ref, ver = links.find(study, version)
            rec = links.get(ref, ver)
        finally:
            links.close()
        issuer = Issuer(cfg.site, cfg.device, load_key_file(cfg.keys.pseudonym, purpose="pseudonym"))
        objects, skipped = build_all(issuer, rec)
        # Audited before the PHI reaches the files: a crash half-way is still on record.
        record_cli(cfg, [CliEvent("results.exported", {
            "study": ref, "version": ver, "objects": [o.kind for o in objects]})],
            user=user, kek=kek)
        paths = write_objects(objects, ver, out)
    except AccessDenied as exc:
        raise _fail(exc, 3) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise _fail(f"cannot write to {out}: {exc.strerror}") from None
    for obj, path in zip(objects, paths, strict=True):
        typer.echo(f"{obj.kind:4} {path}")
    for reason in skipped:
        typer.echo(f"not made: {reason}", err=True)
    if not objects:
        raise typer.Exit(1)
