"""`edge-agent models list|verify|install|activate|rollback`.

Thin: resolve where models and their state live (explicit options win over
the config file), then call agent.infer.registry.  Every change is written to
the registry's change log.  With a config (explicit or the default one),
install/activate/rollback need the admin role (root passes), are recorded in
the box's audit log with the Unix user (``model.changed`` + ``cli.action``),
and activate/rollback ask a running daemon to reload its models over the
control socket (best effort: a stopped daemon loads them when it starts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

from agent.config import Config
from agent.errors import AccessDenied, ConfigError, EdgeAgentError
from agent.infer.registry import Environment, ModelPackage, Registry, enforce
from agent.infer.signing import load_public_keys
from agent.ops import control
from provisioning.options import JsonOpt, record
from provisioning.options import fail as _fail

ModelsDirOpt = Annotated[Path | None, typer.Option("--models-dir", help="installed model packages")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="model state (active versions); the daemon uses "
                                     "<box state_dir>/models-state"),
]
KeyOpt = Annotated[
    list[Path] | None,
    typer.Option("--publisher-key", help="pinned Ed25519 publisher public key (PEM); repeatable"),
]
EnvOpt = Annotated[str | None, typer.Option("--environment", help="production | development")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="agent.toml to take defaults from")
]


@dataclass(frozen=True)
class _Where:
    models_dir: Path
    state_dir: Path
    keys: tuple[Path, ...]
    environment: Environment
    cfg: Config | None = None  # set when a config was read: changes are then admin + audited


def _resolve(config: Path | None, models_dir: Path | None, state_dir: Path | None,
             keys: list[Path] | None, environment: str | None) -> _Where:
    cfg = None
    if config is not None or models_dir is None or state_dir is None:
        from agent import config as cfgmod

        try:
            cfg = cfgmod.load(config)
        except ConfigError as exc:
            if config is not None:
                raise
            raise ConfigError(
                [*exc.problems,
                 "without a readable config, pass --models-dir and --state-dir "
                 "(and --publisher-key / --environment)"], path=exc.path) from None
    env = environment or (cfg.environment if cfg else "production")
    if env not in ("production", "development"):
        raise ConfigError([f"--environment must be production or development, not {env!r}"])
    return _Where(
        models_dir=models_dir or (cfg.models.dir if cfg else Path()),
        state_dir=state_dir or (cfg.state_dir / "models-state" if cfg else Path()),
        keys=tuple(keys) if keys else (cfg.models.publisher_keys if cfg else ()),
        environment=cast(Literal["production", "development"], env),
        cfg=cfg,
    )


def _registry(where: _Where) -> Registry:
    return Registry(where.models_dir, where.state_dir,
                    publisher_keys=load_public_keys(where.keys), environment=where.environment)


def _describe(pkg: ModelPackage) -> dict[str, object]:
    v = pkg.verification
    return {"name": pkg.name, "version": pkg.version, "sha256": v.sha256,
            "verification": v.status, "detail": v.detail, "path": str(pkg.path)}


models_app = typer.Typer(help="Signed ONNX model packages: list, verify, install, switch.",
                         no_args_is_help=True)


@models_app.command("list")
def list_models(config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
                state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
                environment: EnvOpt = None, as_json: JsonOpt = False) -> None:
    """Installed models, which version is active, and whether each verifies."""
    try:
        reg = _registry(_resolve(config, models_dir, state_dir, publisher_key, environment))
        rows = []
        for name in reg.names():
            active = reg.active_version(name)
            previous = reg.previous_versions(name)
            for version in reg.versions(name):
                try:
                    row = _describe(reg.package(name, version))
                except EdgeAgentError as exc:
                    row = {"name": name, "version": version, "sha256": "",
                           "verification": "invalid", "detail": str(exc).splitlines()[0]}
                row["active"] = version == active
                row["rollback_target"] = bool(previous) and version == previous[-1]
                rows.append(row)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models installed in {reg.models_dir}")
        return
    for r in rows:
        mark = "*" if r["active"] else ("<" if r["rollback_target"] else " ")
        typer.echo(f"{mark} {r['name']:<20} {r['version']:<10} {r['verification']:<15} "
                   f"{str(r['sha256'])[:16]}")
    typer.echo("(* active, < rollback target)")


@models_app.command()
def verify(name: Annotated[str | None, typer.Argument()] = None,
           version: Annotated[str | None, typer.Argument()] = None,
           config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
           state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
           environment: EnvOpt = None) -> None:
    """Check signatures, pinned keys and model hashes; exit 1 if anything fails."""
    try:
        reg = _registry(_resolve(config, models_dir, state_dir, publisher_key, environment))
        targets = [(n, v) for n in ([name] if name else reg.names())
                   for v in ([version] if version else reg.versions(n))]
        if not targets:
            raise EdgeAgentError(f"nothing to verify in {reg.models_dir}",
                                 hint="check --models-dir or install a package first")
        bad = 0
        for n, v in targets:
            status: str
            try:
                pkg = reg.package(n, v)
                status, detail = pkg.verification.status, pkg.verification.detail
            except EdgeAgentError as exc:
                status, detail = "invalid", str(exc).splitlines()[0]
            bad += status != "verified"
            typer.echo(f"{'ok  ' if status == 'verified' else 'FAIL'} {n} {v}: {status} ({detail})")
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    if bad:
        typer.echo(f"{bad} package(s) failed verification; production boxes refuse them. "
                   "Fix: re-install from the publisher, or pin the publisher key.", err=True)
        raise typer.Exit(1)


def _require_admin(where: _Where) -> None:
    """Model changes decide what runs on patient images: admin only when a box config is in
    play (root passes).  Without one (a publisher's scratch dir) there is no box to guard."""
    if where.cfg is not None:
        ctl = where.cfg.control
        control.require(control.local_caller(ctl), frozenset({control.ADMIN}), "change models",
                        ctl)


def _audit(cfg: Config, action: str, *, outcome: str = "success",
           change: dict[str, object] | None = None, error: str | None = None) -> None:
    """Record the change in the box's audit log with the Unix user (and the sudo user)."""
    from agent.audit.cli import CliEvent
    from agent.identity.certificates import give_tree, owner_of

    events = []
    if change is not None:
        events.append(CliEvent("model.changed", {"action": action, **change}, outcome))
    cli: dict[str, object] = {"command": f"models.{action}"}
    if error is not None:
        cli["error"] = error
    events.append(CliEvent("cli.action", cli, outcome))
    try:
        record(cfg, events)
    finally:
        # Run as root for the service: the model state it just wrote stays the daemon's.
        models_state = cfg.state_dir / "models-state"
        if models_state.exists():
            give_tree(models_state, owner_of(cfg.state_dir))


def _audit_quietly(where: _Where, action: str, *, outcome: str = "success",
                   change: dict[str, object] | None = None, error: str | None = None) -> None:
    if where.cfg is None:
        return
    try:
        _audit(where.cfg, action, outcome=outcome, change=change, error=error)
    except EdgeAgentError as exc:
        typer.echo(f"warning: could not audit the model change: {exc}", err=True)


def _reload(where: _Where) -> str:
    """Ask a running daemon to load the new active set; never fails the command (the change
    itself is durable: a daemon that is down loads it when it starts)."""
    if where.cfg is None:
        return "restart the daemon to load it"
    try:
        data = control.request(where.cfg.control.socket, "models.reload", timeout=120.0)
    except AccessDenied as exc:
        return f"the running daemon refused to reload ({exc}); restart it to load the change"
    except EdgeAgentError as exc:
        first = str(exc).splitlines()[0]
        if "not running" in first:
            return "the daemon is not running; it loads the change when it starts"
        return (f"the running daemon did not switch ({first}); fix the package and activate "
                "again, or restart the daemon")
    loaded = ", ".join(f"{m.get('name')} {m.get('version')}"
                       for m in data.get("models", []) if isinstance(m, dict)) or "none"
    return f"the running daemon reloaded its models (now: {loaded})"


def _change(action: str, where: _Where,
            do: Callable[[Registry], tuple[str, str, str | None]]) -> tuple[Registry, str, str,
                                                                             str | None]:
    """Role check, change, audit: the shape every model change shares."""
    try:
        _require_admin(where)
    except AccessDenied as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    try:
        reg = _registry(where)
        name, version, previous = do(reg)
    except EdgeAgentError as exc:
        _audit_quietly(where, action, outcome="minor_failure",
                       error=str(exc).splitlines()[0][:200])
        raise _fail(exc) from None
    _audit_quietly(where, action, change={"name": name, "version": version,
                                          "previous": previous})
    return reg, name, version, previous


@models_app.command()
def install(path: Annotated[Path, typer.Argument(help="package directory (holds manifest.toml)")],
            config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
            state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
            environment: EnvOpt = None) -> None:
    """Verify a package and copy it into the models directory (admin; audited)."""
    try:
        where = _resolve(config, models_dir, state_dir, publisher_key, environment)
    except EdgeAgentError as exc:
        raise _fail(exc) from None

    def do(reg: Registry) -> tuple[str, str, str | None]:
        pkg = reg.install(path)
        return pkg.name, pkg.version, None

    reg, name, version, _ = _change("install", where, do)
    active = reg.active_version(name)
    typer.echo(f"installed {name} {version}; active version is now {active}. "
               f"Use 'edge-agent models activate {name} {version}' to pin it.")
    if active == version:
        typer.echo(_reload(where))


@models_app.command()
def activate(name: str, version: str, config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
             state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
             environment: EnvOpt = None) -> None:
    """Make VERSION the active version of NAME (admin; audited; a running daemon reloads)."""
    try:
        where = _resolve(config, models_dir, state_dir, publisher_key, environment)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    _, _, _, previous = _change("activate", where,
                                lambda reg: (name, version, reg.activate(name, version)))
    typer.echo(f"{name}: {previous or 'none'} -> {version}; {_reload(where)}")


@models_app.command()
def rollback(name: str, config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
             state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
             environment: EnvOpt = None) -> None:
    """Go back to the version active before the last switch (admin; audited; reloads)."""
    try:
        where = _resolve(config, models_dir, state_dir, publisher_key, environment)
    except EdgeAgentError as exc:
        raise _fail(exc) from None

    def do(reg: Registry) -> tuple[str, str, str | None]:
        before = reg.active_version(name)
        return name, reg.rollback(name), before

    _, _, target, before = _change("rollback", where, do)
    typer.echo(f"{name}: {before} -> {target} (rolled back); {_reload(where)}")


def register(app: typer.Typer) -> None:
    from provisioning.review_cmd import models_performance

    models_app.command("performance")(models_performance)
    app.add_typer(models_app, name="models")


__all__ = ["enforce", "register"]
