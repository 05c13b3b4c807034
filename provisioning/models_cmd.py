"""`edge-agent models list|verify|install|activate|rollback`.

Thin: resolve where models and their state live (explicit options win over
the config file), then call agent.infer.registry.  Every change is written to
the registry's change log (and the audit callback once the audit log is wired
in); the running daemon picks up a new active version when restarted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

from agent.errors import ConfigError, EdgeAgentError
from agent.infer.registry import Environment, ModelPackage, Registry, enforce
from agent.infer.signing import load_public_keys

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
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@dataclass(frozen=True)
class _Where:
    models_dir: Path
    state_dir: Path
    keys: tuple[Path, ...]
    environment: Environment


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
    )


def _registry(where: _Where) -> Registry:
    return Registry(where.models_dir, where.state_dir,
                    publisher_keys=load_public_keys(where.keys), environment=where.environment)


def _fail(exc: EdgeAgentError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


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


@models_app.command()
def install(path: Annotated[Path, typer.Argument(help="package directory (holds manifest.toml)")],
            config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
            state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
            environment: EnvOpt = None) -> None:
    """Verify a package and copy it into the models directory (atomically)."""
    try:
        reg = _registry(_resolve(config, models_dir, state_dir, publisher_key, environment))
        pkg = reg.install(path)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    typer.echo(f"installed {pkg.name} {pkg.version} ({pkg.verification.status}); "
               f"active version is now {reg.active_version(pkg.name)}. "
               f"Use 'edge-agent models activate {pkg.name} {pkg.version}' to pin it, then "
               "restart the daemon.")


@models_app.command()
def activate(name: str, version: str, config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
             state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
             environment: EnvOpt = None) -> None:
    """Make VERSION the active version of NAME (the previous one is kept for rollback)."""
    try:
        reg = _registry(_resolve(config, models_dir, state_dir, publisher_key, environment))
        previous = reg.activate(name, version)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {previous or 'none'} -> {version}; restart the daemon to load it")


@models_app.command()
def rollback(name: str, config: ConfigOpt = None, models_dir: ModelsDirOpt = None,
             state_dir: StateDirOpt = None, publisher_key: KeyOpt = None,
             environment: EnvOpt = None) -> None:
    """Go back to the version that was active before the last switch."""
    try:
        reg = _registry(_resolve(config, models_dir, state_dir, publisher_key, environment))
        before = reg.active_version(name)
        target = reg.rollback(name)
    except EdgeAgentError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {before} -> {target} (rolled back); restart the daemon to load it")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


__all__ = ["enforce", "register"]
