"""The ``edge-agent`` command. Commands stay thin: parse, call agent/, print.

Every operator error is an ``EdgeAgentError`` printed as "what is wrong" plus
"fix:"; no traceback reaches a biomed engineer's terminal.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from agent import __version__
from agent.errors import EdgeAgentError
from provisioning.options import ConfigOpt, fail

app = typer.Typer(
    name="edge-agent",
    help="Hospital imaging edge box: receive DICOM, de-identify, infer, report over mTLS MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
provision_app = typer.Typer(help="Set up a box's identity, keys and config.", no_args_is_help=True)
fleet_app = typer.Typer(help="Central ops: watch the fleet, roll out signed deployments.",
                        no_args_is_help=True)
app.add_typer(provision_app, name="provision")
app.add_typer(fleet_app, name="fleet")

@app.command()
def version() -> None:
    """Print the edge-agent version."""
    typer.echo(__version__)


@app.command()
def run(
    config: ConfigOpt = None,
    burst: Annotated[bool, typer.Option(help="Process what is on disk, drain the outbox, exit.")] = False,
) -> None:
    """Run the daemon (systemd Type=notify)."""
    from agent import config as cfgmod
    from agent import fileperm, logs, pixelbound
    from agent.daemon import Daemon, RunOptions

    try:
        cfg = cfgmod.load(config)
        fileperm.require_private_folders(cfg)
        logs.setup(cfg.log_level)
        pixelbound.configure(cfg.study.max_process_instance_bytes)
        daemon = Daemon(cfg, RunOptions(burst=burst))
        code = daemon.run()
    except EdgeAgentError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


@provision_app.command("dev")
def provision_dev(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Folder for the dev box.")],
    dicom_port: Annotated[int, typer.Option("--dicom-port")] = 11112,
    mqtt_port: Annotated[int, typer.Option("--mqtt-port")] = 8883,
    models_dir: Annotated[Path | None, typer.Option("--models-dir")] = None,
    ae: Annotated[list[str] | None, typer.Option("--allow-ae", help="Extra calling AE title.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Create (idempotently) a throwaway development box with a local mTLS broker config."""
    from agent.ops.devbox import provision_dev as make

    try:
        box = make(state_dir, dicom_port=dicom_port, mqtt_port=mqtt_port, models_dir=models_dir,
                   extra_ae=tuple(ae or ()))
    except (EdgeAgentError, OSError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(box.as_json()))
    else:
        typer.echo(f"dev box ready in {box.root}\n  config: {box.config}\n"
                   f"  broker: mosquitto -c {box.mosquitto_conf}\n"
                   f"  DICOM:  {box.ae_title} on 127.0.0.1:{box.dicom_port}")


@fleet_app.command("watch")
def fleet_watch(
    config: Annotated[Path, typer.Option("--config", "-c", help="ops.toml with [mqtt] settings.")],
    once: Annotated[bool, typer.Option(help="Collect for --wait seconds, print, exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to collect in --once mode.")] = 3.0,
    share_group: Annotated[str | None, typer.Option(help="MQTT 5 shared-subscription group.")] = None,
) -> None:
    """Live table of every box under the prefix (status, health, backlog, certs, models)."""
    from fleet.settings import load_ops
    from fleet.view import FleetView

    try:
        s = load_ops(config)
        if share_group:
            s = s.with_share_group(share_group)
        view = FleetView(s)
        view.start()
    except (EdgeAgentError, OSError) as exc:
        raise fail(str(exc)) from None
    try:
        if not view.connected.wait(10):
            raise fail(view.error or "could not connect to the broker within 10 s")
        if once:
            time.sleep(wait)
            if as_json:
                typer.echo(json.dumps(view.snapshot(), indent=2))
                # stdout stays the list of rows; what was rejected goes to the operator
                for line in view.rejection_report():
                    typer.echo(line, err=True)
            else:
                typer.echo(view.table())
            return
        while True:
            sys.stdout.write("\x1b[2J\x1b[H" + view.table() + "\n")
            sys.stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        view.stop()


@fleet_app.command("exporter")
def fleet_exporter(
    config: Annotated[Path, typer.Option("--config", "-c", help="ops.toml with [mqtt] settings.")],
    listen: Annotated[str, typer.Option(help="host:port of the /metrics endpoint.")]
        = "127.0.0.1:9464",
    share_group: Annotated[str | None, typer.Option(
        help="MQTT 5 shared-subscription group: exporters in one group split the fleet.")]
        = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve the fleet's presence, telemetry and audit anchors as Prometheus metrics."""
    import signal
    import threading

    from agent import logs
    from fleet.exporter import serve
    from fleet.settings import load_ops

    stop = threading.Event()
    try:
        logs.setup(log_level.upper())
        s = load_ops(config)
        if share_group:
            s = s.with_share_group(share_group)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve(s, listen, stop)
    except (EdgeAgentError, OSError) as exc:
        raise fail(str(exc)) from None
    except ValueError as exc:  # an unknown log level
        raise fail(f"--log-level: {exc}") from None


# Command groups owned by their own modules; each exposes register(app).
for _mod in ("deid_cmd", "models_cmd", "audit_cmd", "ops_cmd", "results_cmd",
             "quarantine_cmd", "review_cmd", "fleet_cmd"):
    try:
        _m = importlib.import_module(f"provisioning.{_mod}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"provisioning.{_mod}":
            raise
        continue
    _m.register(app)


def main() -> None:
    from agent.fileperm import restrict_umask

    # Everything the CLI and the daemon create is private unless a module gives a file
    # an explicit mode (certificates, CSRs, the config): systemd sets UMask=0077 for the
    # service, a shell usually gives 0022.
    restrict_umask()
    app()


if __name__ == "__main__":
    main()
