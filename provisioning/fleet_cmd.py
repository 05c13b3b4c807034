"""``edge-agent fleet sign|deploy|deployments|rollback``: central ops and approvers.

Thin: every step is in fleet/deploy.py.  Approvers sign independently
(``fleet sign`` once per approver, each with their own key); ``fleet deploy``
can also add signatures (``--sign ROLE=KEY``) when one operator holds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.errors import EdgeAgentError

OpsOpt = Annotated[Path, typer.Option("--config", "-c", help="ops config ([mqtt]) with the "
                                                             "deployer certificate")]


def _fail(exc: EdgeAgentError | str) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _signatures(path: Path, signs: list[str], models: Path | None) -> dict[str, Any]:
    from fleet.deploy import sign_file

    if not signs:
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgeAgentError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(loaded, dict) or "document" not in loaded:
            raise EdgeAgentError(f"{path} is not signed",
                                 hint="sign it with 'edge-agent fleet sign' (once per "
                                      "approver) or pass --sign ROLE=KEY")
        return loaded
    current = path
    signed: dict[str, Any] = {}
    for s in signs:
        role, sep, key = s.partition("=")
        if not sep or not role or not key:
            raise EdgeAgentError(f"--sign {s!r} must be ROLE=KEYFILE, e.g. publisher=pub.key")
        signed = sign_file(current, role, Path(key), models=models)
        current = path.with_suffix(".signed.json")
        current.write_text(json.dumps(signed, indent=1, sort_keys=True))
    return signed


def fleet_sign(
    file: Annotated[Path, typer.Argument(help="deployment spec or signed document (JSON)")],
    role: Annotated[str, typer.Option(help="the approver's role, e.g. publisher or clinical")],
    key: Annotated[Path, typer.Option(help="the approver's Ed25519 private key (PEM)")],
    models: Annotated[Path | None, typer.Option(
        help="models tree (<name>/<version>/) to resolve a spec's packages from")] = None,
    signer: Annotated[str, typer.Option(help="the approver's name, recorded in the audit")] = "",
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="write here (default: in place)")] = None,
) -> None:
    """Add one approver's signature (builds the document from a spec first)."""
    from fleet.deploy import sign_file

    try:
        signed = sign_file(file, role, key, models=models, signer=signer)
        (output or file).write_text(json.dumps(signed, indent=1, sort_keys=True))
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None
    roles = ", ".join(s["role"] for s in signed["signatures"])
    typer.echo(f"signed {signed['document']['id']} revision {signed['document']['revision']} "
               f"as {role}; signatures now: {roles}")


def fleet_deploy(
    file: Annotated[Path, typer.Argument(help="signed deployment document (or a spec with "
                                              "--sign)")],
    config: OpsOpt,
    models: Annotated[Path, typer.Option(help="models tree holding the packages to serve")],
    sign: Annotated[list[str] | None, typer.Option(
        "--sign", help="ROLE=KEYFILE: add this approver's signature first (repeatable)")] = None,
    final_wait: Annotated[float | None, typer.Option(
        help="seconds to wait for boxes that were offline during their wave "
             "(default: until the document expires)")] = None,
) -> None:
    """Roll a signed deployment out: canary, then the waves, serving the packages."""
    from agent.deploy.document import DocumentError, parse
    from fleet.deploy import Rollout, collect, select_by_labels
    from fleet.settings import load_ops

    try:
        signed = _signatures(file, list(sign or []), models)
        ops = load_ops(config)
        try:
            dep = parse(signed)
        except DocumentError as exc:
            raise EdgeAgentError(str(exc), hint="fix the document and sign it again") from None
        labelled: tuple[str, ...] = ()
        if not dep.plan() and dep.labels:
            labelled = select_by_labels(collect(ops, 3.0, ("status",)), dep)
            typer.echo(f"label selector {dict(dep.labels)}: {', '.join(labelled) or 'no box'}")
        rollout = Rollout(ops, signed, models, echo=typer.echo, labelled=labelled)
        rollout.start()
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None
    try:
        outcome = rollout.run(final_wait=final_wait)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    finally:
        rollout.stop()
    for b in outcome.boxes.values():
        typer.echo(f"  {b.site}/{b.device}: {b.state}" + (f" ({b.detail})" if b.detail else ""))
    if not outcome.completed:
        typer.echo(f"rollout stopped: {outcome.stopped_reason}", err=True)
        raise typer.Exit(1)
    typer.echo(f"rollout of {rollout.dep.id} revision {rollout.dep.revision} completed")


def fleet_deployments(
    config: Annotated[Path, typer.Option("--config", "-c", help="ops config ([mqtt])")],
    deployment: Annotated[str | None, typer.Option("--id", help="only this deployment")] = None,
    wait: Annotated[float, typer.Option(help="seconds to collect retained job states")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Progress per wave and box, from the boxes' retained job states."""
    from fleet.deploy import collect, progress_rows
    from fleet.settings import load_ops

    try:
        rows = progress_rows(collect(load_ops(config), wait), deployment)
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'DEPLOYMENT':24} {'REV':>5} {'WAVE':8} {'BOX':28} {'STATE':12} DETAIL")
    for r in rows:
        typer.echo(f"{str(r['deployment'])[:24]:24} {r['revision']!s:>5} {r['wave']:8} "
                   f"{r['box'][:28]:28} {str(r['state']):12} {r['detail']}")


def fleet_rollback(
    deployment: Annotated[str, typer.Argument(help="the deployment id to undo")],
    config: OpsOpt,
    sign: Annotated[list[str], typer.Option(
        "--sign", help="ROLE=KEYFILE of each required approver (repeatable)")],
    revision: Annotated[int | None, typer.Option(
        help="revision of the rollback document (default: one above the highest seen)")] = None,
    observer: Annotated[Path | None, typer.Option(
        help="ops config used to read the job states (default: --config)")] = None,
    wait: Annotated[float, typer.Option(help="seconds to collect retained job states")] = 3.0,
) -> None:
    """Roll a deployment back on every box whose job state names it."""
    from agent.deploy.document import load_private_key
    from agent.deploy.document import sign as sign_doc
    from fleet.deploy import collect, publish_documents, rollback_document
    from fleet.settings import load_ops

    try:
        ops = load_ops(config)
        seen = collect(load_ops(observer) if observer else ops, wait, ("jobs", "status"))
        boxes: dict[str, list[str]] = {}
        highest = 0
        for (site, device, channel), d in seen.items():
            # The latest job state, or the deployment the retained status says is active
            # (a refused document later is the latest job but changed nothing).
            current = d.get("deployment") if channel == "status" else d
            if not isinstance(current, dict):
                continue
            rev = current.get("revision")
            if isinstance(rev, int) and not isinstance(rev, bool):
                highest = max(highest, rev)
            name = current.get("id") if channel == "status" else current.get("deployment")
            if (name == deployment and current.get("state") != "refused"
                    and device not in boxes.get(site, [])):
                boxes.setdefault(site, []).append(device)
        if not boxes:
            raise EdgeAgentError(f"no box reports deployment {deployment!r}",
                                 hint="check the id with 'edge-agent fleet deployments'")
        rev = revision or highest + 1
        for site, devices in sorted(boxes.items()):
            doc = rollback_document(deployment, site, devices, rev)
            sigs = []
            for s in sign:
                role, sep, key = s.partition("=")
                if not sep:
                    raise EdgeAgentError(f"--sign {s!r} must be ROLE=KEYFILE")
                sigs.append(sign_doc(doc, role, load_private_key(Path(key))))
            publish_documents(ops, site, devices, {"document": doc, "signatures": sigs})
            typer.echo(f"rollback of {deployment} (revision {rev}) sent to {site}: "
                       f"{', '.join(sorted(devices))}")
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    fleet = next((g.typer_instance for g in app.registered_groups
                  if g.name == "fleet" and g.typer_instance is not None), None)
    if fleet is None:
        fleet = typer.Typer(help="Central ops.", no_args_is_help=True)
        app.add_typer(fleet, name="fleet")
    fleet.command("sign")(fleet_sign)
    fleet.command("deploy")(fleet_deploy)
    fleet.command("deployments")(fleet_deployments)
    fleet.command("rollback")(fleet_rollback)
