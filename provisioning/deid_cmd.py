"""`edge-agent deid` and `edge-agent reidentify`: the daemon's engine on files.

Commands stay thin: argument and config handling here, everything else in
agent.deid.  Output files are named after the new UIDs, never after input
paths (folder names such as SMITH_JOHN/ are PHI too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydicom.errors import InvalidDicomError

from agent import pixelbound
from agent.config import load as load_config
from agent.crypto import load_key_file, random_key
from agent.deid import OPTIONS, Deidentifier, DeidSettings, PixelCleanRule, writer
from agent.deid.reidentify import reidentify
from agent.errors import ConfigError, EdgeAgentError
from provisioning.options import fail


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"recipient certificate {path}: {exc.strerror}"]) from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise ConfigError([f"recipient certificate {path} is not a PEM or DER certificate"]) from None


def _settings(
    config: Path | None, mode: str | None, recipients: list[Path], options: list[str]
) -> tuple[DeidSettings, bytes | None]:
    """CLI flags win over the box config; the box config is the daemon's own."""
    problems: list[str] = []
    key: bytes | None = None
    cfg_mode = "strip"
    cfg_options: list[str] = []
    cfg_recipients: list[Path] = []
    pixel_clean: tuple[PixelCleanRule, ...] = ()
    if config is not None:
        cfg = load_config(config)
        pixelbound.configure(cfg.study.max_process_instance_bytes)
        key = load_key_file(cfg.keys.pseudonym, purpose="pseudonym")
        cfg_mode = cfg.deid.mode
        cfg_options = sorted(cfg.deid.options)
        cfg_recipients = list(cfg.deid.recipients)
        pixel_clean = tuple(
            PixelCleanRule(r.manufacturer, r.model, r.rows, r.columns, r.rectangles)
            for r in cfg.deid.pixel_clean
        )
    chosen_mode = mode or cfg_mode
    opts = frozenset(options or cfg_options)
    certs: list[x509.Certificate] = []
    for p in recipients or cfg_recipients:
        try:
            certs.append(_load_cert(p))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if chosen_mode not in ("strip", "encrypt"):
        problems.append(f"mode {chosen_mode!r} is not 'strip' or 'encrypt'")
        chosen_mode = "strip"
    settings = DeidSettings(
        mode="encrypt" if chosen_mode == "encrypt" else "strip",
        options=opts,
        recipients=tuple(certs),
        pixel_clean=pixel_clean,
    )
    problems.extend(settings.problems())
    if problems:
        raise ConfigError(problems, path=str(config) if config else None)
    return settings, key


def deid(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder (recursive)", exists=True)],
    out: Annotated[Path, typer.Argument(help="folder for de-identified instances")],
    mode: Annotated[
        str | None, typer.Option("--mode", help="strip | encrypt (default: config, else strip)")
    ] = None,
    recipient: Annotated[
        list[Path] | None,
        typer.Option("--recipient", help="re-identification recipient certificate (encrypt)"),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help=f"Annex E option, repeatable: {', '.join(OPTIONS)}"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="agent.toml: use the box pseudonym key")
    ] = None,
) -> None:
    """De-identify DICOM files (PS3.15 Annex E); quarantined instances are never written."""
    try:
        settings, key = _settings(config, mode, recipient or [], option or [])
    except EdgeAgentError as exc:
        raise fail(exc) from None
    if key is None:
        typer.echo(
            "warning: no --config given: using a fresh random pseudonym key for this run; "
            "pseudonyms will not match the box's or any other run's",
            err=True,
        )
        key = random_key()
    engine = Deidentifier(settings, key)
    done = 0
    quarantined: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    for path in _files(src):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            failed.append((path, f"not readable as DICOM ({type(exc).__name__})"))
            continue
        try:
            outcome = engine.deidentify(ds)
        except EdgeAgentError as exc:
            failed.append((path, str(exc).splitlines()[0]))
            continue
        if outcome.dataset is None:
            quarantined.append((path, outcome.quarantine_reason or "quarantined"))
            continue
        target = out / outcome.study_ref / f"{writer.instance_uid(outcome.dataset)}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        writer.save(outcome.dataset, target)  # = save_as(enforce_file_format=True), faster
        done += 1
    typer.echo(f"method: {engine.describe()}")
    typer.echo(f"de-identified: {done}")
    typer.echo(f"quarantined: {len(quarantined)}")
    for path, reason in quarantined:
        typer.echo(f"  {path}: {reason}")
    typer.echo(f"failed: {len(failed)}")
    for path, reason in failed:
        typer.echo(f"  {path}: {reason}")
    if failed:
        raise typer.Exit(1)


def reidentify_cmd(
    src: Annotated[Path, typer.Argument(help="de-identified file or folder", exists=True)],
    out: Annotated[Path, typer.Argument(help="folder for re-identified instances")],
    key: Annotated[Path, typer.Option("--key", help="recipient RSA private key (PEM)")],
) -> None:
    """Restore original attributes from the Encrypted Attributes Sequence."""
    try:
        private_key = load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise fail(f"cannot load private key {key}: {exc}") from None
    done, failed = 0, 0
    for path in _files(src):
        rel = path.relative_to(src) if src.is_dir() else Path(path.name)
        try:
            ds = pydicom.dcmread(path)
            restored = reidentify(ds, private_key)
        except (InvalidDicomError, OSError, EOFError, ValueError, EdgeAgentError) as exc:
            typer.echo(f"  {path}: {str(exc).splitlines()[0]}", err=True)
            failed += 1
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        restored.save_as(target, enforce_file_format=True)
        done += 1
    typer.echo(f"re-identified: {done}")
    typer.echo(f"failed: {failed}")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("deid")(deid)
    app.command("reidentify")(reidentify_cmd)
