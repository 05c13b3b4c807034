"""What every ``edge-agent`` command shares: its options, loading the config, printing
an operator error, the admin check and recording a CLI action in the audit log.

One place, so that every command says an error the same way ("error: what is wrong"
plus "fix:", exit 2; a refused role exits 3; never a traceback), finds the control
socket the same way, and records who did what the same way (the Unix user, and the
sudo user behind root).

May import: typer, agent.config, agent.errors, agent.ops.control (socket default,
roles); agent.audit only inside ``record`` (reading a config must not open the log).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.config import Config, ControlSettings
from agent.errors import AccessDenied, ConfigError, EdgeAgentError
from agent.ops import control

if TYPE_CHECKING:
    from agent.audit.cli import CliEvent
    from agent.crypto import KeyEncryptionKey

# Exit status of a usage, config or operator error; of a role the caller lacks.
EXIT_ERROR = 2
EXIT_DENIED = 3

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="agent.toml (default /etc/edge-agent/agent.toml "
                                        "or $EDGE_AGENT_CONFIG)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SocketOpt = Annotated[
    Path | None,
    typer.Option("--socket", help="control socket (default: [control] socket from the config, "
                                  f"else {control.DEFAULT_SOCKET})"),
]


def fail(exc: EdgeAgentError | str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print an operator error (its fix included) and return the exit to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def load_config(config: Path | None) -> Config:
    from agent import config as cfgmod

    return cfgmod.load(config)


def socket_path(config: Path | None, socket: Path | None) -> Path:
    """--socket wins; else the config's; an operator who cannot read the config (0640
    root:edge-agent is typical) still reaches the default socket."""
    if socket is not None:
        return socket
    try:
        return load_config(config).control.socket
    except ConfigError:
        if config is not None:
            raise
        return control.DEFAULT_SOCKET


def ask(command: str, args: dict[str, Any], config: Path | None, socket: Path | None, *,
        timeout: float = 60.0) -> dict[str, Any]:
    """One control command to the running daemon (the socket found like every command
    finds it); an operator error (exit 2), or a refused role (exit 3), never a traceback."""
    try:
        return control.request(socket_path(config, socket), command, args, timeout=timeout)
    except AccessDenied as exc:
        raise fail(exc, EXIT_DENIED) from None
    except EdgeAgentError as exc:
        raise fail(exc) from None


def echo_json(data: object) -> None:
    """A command's ``--json`` output: the daemon's answer as it came."""
    typer.echo(json.dumps(data, indent=2))


def age(seconds: float) -> str:
    """How long something has waited, for a listing: minutes, hours or days."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def require_admin(cfg_control: ControlSettings, action: str) -> control.Caller:
    """The local caller, when it holds the admin role (root passes); AccessDenied otherwise."""
    caller = control.local_caller(cfg_control)
    control.require(caller, frozenset({control.ADMIN}), action, cfg_control)
    return caller


def record(cfg: Config, events: Sequence[CliEvent], *,
           kek: KeyEncryptionKey | None = None) -> None:
    """Record CLI actions in the box's audit log as the Unix user (and the sudo user
    behind root); AuditError when one could not be recorded."""
    from agent.audit.cli import record_cli

    record_cli(cfg, events, user=control.user_name(os.getuid()), kek=kek)


def record_quietly(cfg: Config, events: Sequence[CliEvent], what: str) -> None:
    """``record`` for an action that already happened: a failure to record it is a
    warning, not a reason to report the action itself as failed."""
    try:
        record(cfg, events)
    except EdgeAgentError as exc:
        typer.echo(f"warning: could not audit {what}: {exc}", err=True)
