"""Installed model packages, their verification, and which version is active.

Layout: ``<models_dir>/<name>/<version>/{model.onnx, manifest.toml,
manifest.toml.sig, MODEL_CARD.md}``.  Active-version choices live in
``<state_dir>/models/active.json`` (outside the package tree, so a read-only
shipped ``models/`` works); a model without an explicit choice runs its
highest version.  Every switch is an atomic replace of that file, keeps the
previous version on a stack for rollback, and is appended to
``<state_dir>/models/changes.jsonl`` and passed to the audit callback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from agent.crypto import fsync_dir
from agent.errors import ModelError
from agent.infer.manifest import Manifest, parse_manifest
from agent.infer.signing import SIG_SUFFIX, PublisherKey, Verification, verify_package

log = logging.getLogger(__name__)

Environment = Literal["production", "development"]
AuditFn = Callable[[str, dict[str, object]], None]

MANIFEST = "manifest.toml"
MODEL_CARD = "MODEL_CARD.md"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric-aware ordering: 1.10.0 > 1.9.2; text parts sort after numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+]", version))


@dataclass(frozen=True)
class ModelPackage:
    name: str
    version: str
    path: Path
    manifest: Manifest
    verification: Verification

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def safe_audit(audit: AuditFn | None, event: str, details: dict[str, object]) -> None:
    """The audit callback must never break inference or a CLI command."""
    if audit is None:
        return
    try:
        audit(event, details)
    except Exception:  # a broken audit sink is reported, never propagated
        log.exception("audit callback failed for %s", event)


def _member(package: Path, name: str, what: str) -> Path:
    """A file of the package, refused when its name or a symlink leads out of the package.

    A package is one flat folder.  Without this, a manifest saying ``file =
    "../../../etc/passwd"`` (or a model.onnx symlinked there) would have ``models install``
    copy that file into the models dir, and a development box, which accepts unsigned
    packages, would not stop it.
    """
    pure = PurePosixPath(name)
    where = package / MANIFEST
    fix = ("a package is one folder holding model.onnx, manifest.toml, its .sig and "
           "MODEL_CARD.md as regular files; get the package again from its publisher")
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise ModelError(f"{where}: {what} {name!r} points outside the package {package}",
                         hint=fix)
    if len(pure.parts) != 1 or name in ("", "."):
        raise ModelError(f"{where}: {what} {name!r} must be a file name in the package "
                         f"folder {package}", hint=fix)
    member = package / name
    real = member.resolve()
    if not real.is_relative_to(package.resolve()):
        raise ModelError(f"{member}: {what} is a symlink to {real}, outside the package",
                         hint=fix)
    return member


def read_package(path: Path, keys: tuple[PublisherKey, ...]) -> ModelPackage:
    """Parse and verify a package directory; raises ModelError if unreadable."""
    manifest_path = _member(path, MANIFEST, "the manifest")
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is not a model package: {MANIFEST} is missing",
                         hint="a package holds model.onnx, manifest.toml, its .sig and "
                              "MODEL_CARD.md") from exc
    manifest = parse_manifest(raw, source=str(manifest_path))
    for field, value in (("name", manifest.name), ("version", manifest.version)):
        if not _NAME_RE.match(value):
            raise ModelError(f"{manifest_path}: {field} {value!r} is not a safe directory name")
    model = _member(path, manifest.model_file, "model.file")
    sig = _member(path, MANIFEST + SIG_SUFFIX, "the signature")
    _member(path, MODEL_CARD, "the model card")
    verification = verify_package(raw, sig, model, manifest.sha256, keys)
    return ModelPackage(manifest.name, manifest.version, path, manifest, verification)


def enforce(pkg: ModelPackage, environment: Environment, audit: AuditFn | None) -> None:
    """Production refuses anything not verified; development warns and goes on."""
    v = pkg.verification
    if v.ok:
        return
    details: dict[str, object] = {"model": pkg.name, "version": pkg.version,
                                  "status": v.status, "detail": v.detail, "sha256": v.sha256,
                                  "environment": environment}
    if environment == "production":
        safe_audit(audit, "model.refused", details)
        raise ModelError(
            f"model {pkg.name} {pkg.version} refused: {v.status.replace('_', ' ')} ({v.detail})",
            hint={
                "unsigned": "install the package together with its manifest.toml.sig",
                "unpinned_key": "pin the publisher's public key (publisher_keys in config / "
                                "--publisher-key) if you trust it",
                "bad_signature": "the manifest was changed after signing: re-install the "
                                 "package from the publisher",
                "tampered_model": "model.onnx differs from the signed hash: re-install the "
                                  "package from the publisher",
            }.get(v.status),
        )
    safe_audit(audit, "model.unverified_allowed", details)
    log.warning("model %s %s is not verified (%s: %s); allowed because environment is "
                "development", pkg.name, pkg.version, v.status, v.detail)


class Registry:
    def __init__(self, models_dir: Path, state_dir: Path, *,
                 publisher_keys: tuple[PublisherKey, ...] = (),
                 environment: Environment = "development",
                 audit: AuditFn | None = None) -> None:
        self.models_dir = models_dir
        self.state_dir = state_dir
        self.keys = publisher_keys
        self.environment = environment
        self.audit = audit
        self._state_path = state_dir / "models" / "active.json"

    # -- discovery -------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        base = self.models_dir / name
        if not base.is_dir():
            return []
        found = [p.name for p in base.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()]
        return sorted(found, key=version_key)

    def package(self, name: str, version: str) -> ModelPackage:
        path = self.models_dir / name / version
        if not path.is_dir():
            have = ", ".join(self.versions(name)) or "none"
            raise ModelError(f"model {name} {version} is not installed (installed: {have})",
                             hint="run 'edge-agent models list', or install it first")
        pkg = read_package(path, self.keys)
        if (pkg.name, pkg.version) != (name, version):
            raise ModelError(f"{path} holds {pkg.name} {pkg.version} according to its manifest",
                             hint="re-install the package with 'edge-agent models install'")
        return pkg

    # -- active versions -------------------------------------------------------
    def _load_state(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ModelError(f"{self._state_path} is corrupt ({exc})",
                             hint="delete it to fall back to the highest installed versions, "
                                  "then re-activate") from exc
        models = data.get("models", {}) if isinstance(data, dict) else {}
        return models if isinstance(models, dict) else {}

    def _save_state(self, models: dict[str, dict[str, object]]) -> None:
        folder = self._state_path.parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".active.")
        with os.fdopen(fd, "w") as fh:
            json.dump({"models": models}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._state_path)  # the switch is atomic: old or new, never half
        fsync_dir(folder)

    def _record(self, event: str, details: dict[str, object]) -> None:
        folder = self._state_path.parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (folder / "changes.jsonl").open("a") as fh:
            fh.write(json.dumps({"time": time.time(), "event": event, **details},
                                sort_keys=True) + "\n")
        safe_audit(self.audit, event, details)

    def active_version(self, name: str) -> str | None:
        entry = self._load_state().get(name, {})
        chosen = entry.get("active") if isinstance(entry, dict) else None
        versions = self.versions(name)
        if isinstance(chosen, str) and chosen in versions:
            return chosen
        if isinstance(chosen, str):
            log.warning("active version %s of model %s is not installed; using the highest",
                        chosen, name)
        return versions[-1] if versions else None

    def previous_versions(self, name: str) -> list[str]:
        entry = self._load_state().get(name, {})
        history = entry.get("history", []) if isinstance(entry, dict) else []
        return [v for v in history if isinstance(v, str)] if isinstance(history, list) else []

    def active_packages(self) -> list[ModelPackage]:
        """Active, policy-checked packages; refused or broken ones are audited and skipped."""
        packages = []
        for name in self.names():
            version = self.active_version(name)
            if version is None:
                continue
            try:
                pkg = self.package(name, version)
                enforce(pkg, self.environment, self.audit)
            except ModelError as exc:
                log.error("model %s %s not loaded: %s", name, version, exc)
                safe_audit(self.audit, "model.not_loaded",
                           {"model": name, "version": version, "reason": str(exc)})
                continue
            packages.append(pkg)
        return packages

    # -- changes ---------------------------------------------------------------
    def activate(self, name: str, version: str) -> str | None:
        """Make ``version`` active; returns the version it replaced."""
        pkg = self.package(name, version)
        enforce(pkg, self.environment, self.audit)
        current = self.active_version(name)
        state = self._load_state()
        history = self.previous_versions(name)
        if current is not None and current != version:
            history = [v for v in history if v != current] + [current]
        state[name] = {"active": version, "history": history[-10:]}
        self._save_state(state)
        self._record("model.activated", {"model": name, "version": version,
                                         "previous": current, "sha256": pkg.verification.sha256,
                                         "verification": pkg.verification.status})
        return current

    def rollback(self, name: str) -> str:
        """Re-activate the version that was active before the last switch."""
        current = self.active_version(name)
        history = [v for v in self.previous_versions(name) if v in self.versions(name)]
        if not history:
            raise ModelError(f"model {name} has no previous version to roll back to",
                             hint="activate a specific version with 'edge-agent models "
                                  "activate NAME VERSION'")
        target = history[-1]
        pkg = self.package(name, target)
        enforce(pkg, self.environment, self.audit)
        state = self._load_state()
        state[name] = {"active": target, "history": history[:-1]}
        self._save_state(state)
        self._record("model.rolled_back", {"model": name, "version": target,
                                           "previous": current,
                                           "sha256": pkg.verification.sha256})
        return target

    def install(self, source: Path) -> ModelPackage:
        """Copy a package into models_dir (atomic rename); does not change the active choice
        unless the model had none (then the highest version runs, as always)."""
        pkg = read_package(source, self.keys)
        enforce(pkg, self.environment, self.audit)
        target = self.models_dir / pkg.name / pkg.version
        if target.exists():
            existing = read_package(target, self.keys)
            if existing.verification.sha256 == pkg.verification.sha256:
                return existing
            raise ModelError(f"model {pkg.name} {pkg.version} is already installed with a "
                             "different model file",
                             hint="publishers must bump the version for a new model file")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{pkg.version}."))
        try:
            # read_package checked each of these names stays inside the package.
            for name in (pkg.manifest.model_file, MANIFEST, MANIFEST + SIG_SUFFIX, MODEL_CARD):
                src = source / name
                if src.exists():
                    shutil.copy2(src, staging / name)
            copied = read_package(staging, self.keys)
            if copied.verification.status != pkg.verification.status:
                raise ModelError("the package changed while it was being copied",
                                 hint="retry the install")
            for f in staging.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(staging, target)
            fsync_dir(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        installed = read_package(target, self.keys)
        self._record("model.installed", {"model": pkg.name, "version": pkg.version,
                                         "sha256": installed.verification.sha256,
                                         "verification": installed.verification.status})
        return installed
