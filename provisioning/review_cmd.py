"""`edge-agent review list|show|submit`: the local reviewer's verdicts on flagged results,
and `edge-agent models performance NAME`: what the verdicts say about a model.

Through the running daemon (it holds the keys; it audits each action with the
reviewer's Unix user).  Thin: parse, ask the daemon, print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.errors import EdgeAgentError
from provisioning.options import ConfigOpt, JsonOpt, SocketOpt, age, ask, echo_json
from provisioning.options import fail as _fail

app = typer.Typer(help="Reviewer: give verdicts on flagged results.", no_args_is_help=True)
ResultArg = Annotated[str, typer.Argument(help="the result id from 'edge-agent review list'")]
VERDICTS = ("agreed", "disagreed", "indeterminate")


@app.command("list")
def r_list(config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Flagged results waiting for a verdict, oldest first, with why they were flagged
    and the model's explanation (reviewer role)."""
    data = ask("review.list", {}, config, socket)
    if as_json:
        echo_json(data)
        return
    items = data.get("items", [])
    b = data.get("backlog", {})
    typer.echo(f"{len(items)} result(s) wait for review; {b.get('overdue', 0)} overdue "
               f"(escalated after {age(float(b.get('escalate_after_s', 0)))})")
    for i in items:
        typer.echo(f"  {i['result_id']}  {i['model']} {i['version']}  {i['finding']} "
                   f"(confidence {i['confidence']:.2f})  {age(float(i['age_s']))} old")
        for reason in i.get("reasons", []):
            typer.echo(f"      flagged: {reason}")
        if i.get("explanation"):
            typer.echo(f"      explanation: {i['explanation']}")


@app.command("show")
def r_show(result: ResultArg, config: ConfigOpt = None, socket: SocketOpt = None,
           as_json: JsonOpt = False) -> None:
    """Everything the box kept of one result (reviewer role; audited).  It includes the
    subgroup attributes (age band, sex, scanner): read it on this box only."""
    data = ask("review.show", {"result_id": result}, config, socket)
    if as_json:
        echo_json(data)
        return
    typer.echo(f"result {data['result_id']}")
    for m in data.get("models", []):
        typer.echo(f"  model {m['model']} {m['version']}: {m['finding']} "
                   f"(confidence {m['confidence']:.2f}, uncertainty {m['uncertainty']:.3f})")
        typer.echo(f"    probabilities: {json.dumps(m.get('labels', {}))}")
        for reason in m.get("reasons", []):
            typer.echo(f"    flagged: {reason}")
        if m.get("explanation"):
            typer.echo(f"    explanation: {m['explanation']}")
        if m.get("subgroup"):
            typer.echo("    subgroup: " + ", ".join(f"{k}={v}" for k, v in m["subgroup"].items()))
        v = m.get("verdict")
        typer.echo("    verdict: " + ("none yet" if v is None else
                                       f"{v['verdict']} by {v['reviewer']} ({v['via']})"
                                       + (f", corrected to {v['corrected_label']}"
                                          if v.get("corrected_label") else "")))


@app.command("submit")
def r_submit(
    result: ResultArg,
    verdict: Annotated[str, typer.Argument(help="agreed, disagreed or indeterminate")],
    model: Annotated[str | None, typer.Option(
        "--model", help="the model judged (needed when the result has several)")] = None,
    corrected_label: Annotated[str | None, typer.Option(
        "--label", help="with disagreed: the label that is right (one of the model's labels)")]
        = None,
    note: Annotated[str | None, typer.Option(
        "--note", help="free text kept on this box only (never published)")] = None,
    config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False,
) -> None:
    """Give your verdict on a result (reviewer role; audited with your user name).  The
    first verdict on a result is final."""
    if verdict not in VERDICTS:
        raise _fail(f"verdict must be one of {', '.join(VERDICTS)}")
    args: dict[str, Any] = {"result_id": result, "verdict": verdict}
    for key, value in (("model", model), ("corrected_label", corrected_label), ("note", note)):
        if value is not None:
            args[key] = value
    data = ask("review.submit", args, config, socket)
    if as_json:
        echo_json(data)
        return
    typer.echo(f"verdict {verdict} on result {data.get('result_id')} ({data.get('model')} "
               f"{data.get('version')}) recorded")


def models_performance(
    name: Annotated[str, typer.Argument(help="the model's name")],
    markdown: Annotated[Path | None, typer.Option(
        "--markdown", help="also write the table as a model-card appendix (markdown) to this "
                           "file; never overwritten")] = None,
    config: ConfigOpt = None, socket: SocketOpt = None, as_json: JsonOpt = False,
) -> None:
    """Measured performance per model version and subgroup from reviewers' verdicts:
    sensitivity, specificity, PPV, NPV and agreement with Wilson 95 % intervals
    (subgroups below k merged or suppressed), and the alerts on them."""
    from agent.review.performance import METRICS
    from agent.review.performance import markdown as to_markdown

    data = ask("models.performance", {"model": name}, config, socket)
    if markdown is not None:
        try:
            fd = os.open(markdown, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(to_markdown(data, name) + "\n")
        except FileExistsError:
            raise _fail(f"{markdown} exists; give another --markdown or remove it first") from None
        except OSError as exc:
            raise _fail(f"cannot write {markdown}: {exc.strerror}") from None
    if as_json:
        echo_json(data)
        return
    models = data.get("models", [])
    if not models:
        typer.echo(f"no verdicts on {name} yet")
    for m in models:
        head = f"{name} {m['version']}, last {m['window_days']} days"
        if m.get("suppressed"):
            typer.echo(f"{head}: fewer than {data.get('k')} verdicts (suppressed)")
            continue
        typer.echo(f"{head}: {m['overall']['verdicts']} verdicts")
        typer.echo(f"  {'subgroup':24} {'n':>5} " + " ".join(f"{x:>22}" for x in METRICS))
        for label, cell in [("all", m["overall"])] + [
                (f"{s['attribute']}={s['value']}", s) for s in m["subgroups"]]:
            vals = []
            for x in METRICS:
                p = cell[x]
                vals.append(f"{'-':>22}" if p["value"] is None else
                            f"{p['value']:.2f} [{p['ci95'][0]:.2f},{p['ci95'][1]:.2f}] n={p['n']:<3}"
                            .rjust(22))
            typer.echo(f"  {label[:24]:24} {cell['verdicts']:>5} " + " ".join(vals))
        if m.get("suppressed_subgroups"):
            typer.echo(f"  ({m['suppressed_subgroups']} subgroup cell(s) below k suppressed)")
    for a in data.get("alerts", []):
        typer.echo(f"ALERT {a['version']} {a['subgroup']} ({a['window_days']} d): {a['metric']} "
                   f"{a['kind']} 95% CI {a['ci95']}"
                   + (f" < {a['threshold']}" if a.get("threshold") is not None else "")
                   + (f" vs rest {a['rest']}" if a.get("rest") is not None else ""))
    if markdown is not None:
        typer.echo(f"wrote {markdown}")


fleet_review = typer.Typer(help="Central ops: flagged results of a box, and verdicts on them "
                                "with a reviewer certificate.", no_args_is_help=True)
OpsConfig = Annotated[Path, typer.Option("--config", "-c", help="ops.toml ([mqtt]; [reviewer] "
                                                                  "cert and key for submit)")]
BoxOpt = Annotated[str, typer.Option("--box", help="site/device of the box")]
WatchCert = Annotated[Path | None, typer.Option(
    "--watch-cert", help="read with this certificate instead of ops.toml's (the broker gives "
                         "each certificate one session: use another ops identity beside "
                         "'fleet watch')")]
WatchKey = Annotated[Path | None, typer.Option("--watch-key", help="its key")]


def _ops(config: Path, cert: Path | None, key: Path | None) -> Any:
    from fleet.settings import load_ops

    try:
        s = load_ops(config)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if (cert is None) != (key is None):
        raise _fail("give both --watch-cert and --watch-key, or neither")
    return s.with_identity(cert, key) if cert is not None and key is not None else s


def _default_cache(box: str) -> Path:
    return Path.home() / ".cache" / "edge-agent" / f"review-{box.replace('/', '-')}.json"


CacheOpt = Annotated[Path | None, typer.Option(
    help="file that keeps flagged results seen earlier (results are not retained by the "
         "broker); default ~/.cache/edge-agent/review-SITE-DEVICE.json")]


@fleet_review.command("list")
def fleet_review_list(
    config: OpsConfig, box: BoxOpt,
    wait: Annotated[float, typer.Option(help="seconds to listen for new results")] = 10.0,
    until: Annotated[int | None, typer.Option(
        help="stop listening once this many flagged results are known")] = None,
    cache: CacheOpt = None,
    watch_cert: WatchCert = None, watch_key: WatchKey = None, as_json: JsonOpt = False,
) -> None:
    """Flagged results of a box that have no verdict yet (de-identified: the result as
    published), oldest first."""
    from fleet.review import collect

    s = _ops(config, watch_cert, watch_key)
    path = cache or _default_cache(box)
    try:
        items = collect(s, box, wait=wait, until=until, cache=path,
                        on_ready=lambda: typer.echo(f"listening for results of {box}", err=True))
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        echo_json(items)
        return
    typer.echo(f"{len(items)} flagged result(s) of {box} without a verdict")
    for i in items:
        for m in i["models"]:
            typer.echo(f"  {i['result_id']}  {i['time']}  {m['name']} {m['version']}: "
                       f"{m['finding']} ({m['confidence']})")
            for r in m.get("reasons") or []:
                typer.echo(f"      flagged: {r}")
            if m.get("explanation"):
                typer.echo(f"      explanation: {m['explanation']}")


@fleet_review.command("submit")
def fleet_review_submit(
    config: OpsConfig, box: BoxOpt,
    result: Annotated[str, typer.Argument(help="the result's CloudEvents id")],
    verdict: Annotated[str, typer.Argument(help="agreed, disagreed or indeterminate")],
    model: Annotated[str | None, typer.Option("--model", help="the model judged")] = None,
    corrected_label: Annotated[str | None, typer.Option("--label", help="with disagreed: the "
                                                                        "right label")] = None,
    note: Annotated[str | None, typer.Option("--note", help="free text, kept on the box only")]
        = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="reviewer certificate (default: "
                                                             "ops.toml [reviewer] cert)")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="its key")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="reviewer name, checked against the certificate's CN (the box takes "
                       "the reviewer's identity from the certificate)")] = None,
    wait_ack: Annotated[float, typer.Option(help="seconds to wait for the box's "
                                                 "acknowledgement (0: do not wait)")] = 30.0,
    cache: CacheOpt = None,
    watch_cert: WatchCert = None, watch_key: WatchKey = None, as_json: JsonOpt = False,
) -> None:
    """Send a verdict with a reviewer certificate and show the box's acknowledgement.
    Exit 0 accepted, 1 not accepted by the box (or no acknowledgement), 2 refused by the
    broker or an error."""
    from fleet.review import load_reviewer, submit

    if verdict not in VERDICTS:
        raise _fail(f"verdict must be one of {', '.join(VERDICTS)}")
    s = _ops(config, watch_cert, watch_key)
    try:
        who = load_reviewer(config, cert, key, name)
        out = submit(s, who, box, result, verdict, model=model,
                     corrected_label=corrected_label, note=note, wait_ack=wait_ack,
                     cache=cache or _default_cache(box))
    except (EdgeAgentError, OSError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        echo_json(out)
    ack = out.get("ack")
    if not as_json:
        if wait_ack <= 0:
            typer.echo(f"verdict {out['verdict_id']} published (not waiting for the box)")
        elif ack is None:
            typer.echo(f"verdict {out['verdict_id']} published; no acknowledgement from the box "
                       f"within {wait_ack:.0f} s (it is delivered when the box reconnects)")
        else:
            typer.echo(f"verdict {out['verdict_id']}: {ack['outcome']}"
                       + (f" ({ack['code']})" if ack.get("code") else ""))
    if wait_ack > 0 and (ack is None or ack.get("outcome") != "accepted"):
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="review")
    # The root's own 'fleet' group (not an import of provisioning.cli: run as
    # 'python -m provisioning.cli' that would be a second copy of the module).
    for group in root.registered_groups:
        if group.name == "fleet" and group.typer_instance is not None:
            group.typer_instance.add_typer(fleet_review, name="review")
