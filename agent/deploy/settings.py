"""[deploy] in agent.toml: who must approve a deployment, and what this box allows.

May import: nothing of agent/ (agent/config.py imports this module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABEL_RE_TEXT = "key=value with letters, digits, '.', '_' or '-'"


@dataclass(frozen=True)
class DeploySettings:
    enabled: bool = True
    # Roles whose approval every document needs, each by a distinct pinned key.
    required_roles: tuple[str, ...] = ("publisher", "clinical")
    # role -> Ed25519 public keys (PEM) pinned for that role.
    approver_keys: tuple[tuple[str, tuple[Path, ...]], ...] = ()
    # This box's labels for label-selector targets ("ring=canary").
    labels: tuple[tuple[str, str], ...] = ()
    # Sensitive agent.toml keys a document that declares them may change here.
    allow_sensitive: tuple[str, ...] = ()
    # Bounds of one deployment's downloads: total package bytes, and free disk that
    # must remain after them.
    max_package_bytes: int = 512 * 1024**2
    disk_reserve_bytes: int = 1024**3
    # A download that makes no progress for this long asks again for its next chunks.
    request_timeout_seconds: float = 10.0

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def _label(v: Any) -> tuple[str, str] | None:
    if not isinstance(v, str) or v.count("=") != 1:
        return None
    k, _, val = v.partition("=")
    ok = all(c.isalnum() or c in "._-" for c in k + val) and k and val
    return (k, val) if ok else None


def parse(r: Any) -> DeploySettings:
    """Read [deploy] through agent.config's reader (which collects every problem)."""
    base: Path = r.base
    roles = r.get("deploy.required_roles", list, ["publisher", "clinical"])
    keys_raw = r.get("deploy.approver_keys", dict, {})
    approver: list[tuple[str, tuple[Path, ...]]] = []
    for role in sorted(keys_raw if isinstance(keys_raw, dict) else {}):
        paths = r.get(f"deploy.approver_keys.{role}", list, [])
        resolved = []
        for p in paths:
            if not isinstance(p, str):
                r.problems.append(f"[deploy.approver_keys.{role}] entries must be file paths")
                continue
            q = Path(os.path.expandvars(p))
            q = q if q.is_absolute() else base / q
            if not q.is_file():
                r.problems.append(f"[deploy.approver_keys.{role}] {q} does not exist; fix: "
                                  "put the approver's Ed25519 public key (PEM) there")
            resolved.append(q)
        approver.append((role, tuple(resolved)))
    labels = []
    for v in r.get("deploy.labels", list, []):
        lab = _label(v)
        if lab is None:
            r.problems.append(f"[deploy.labels] {v!r} is not {LABEL_RE_TEXT}")
        else:
            labels.append(lab)
    return DeploySettings(
        enabled=r.get("deploy.enabled", bool, True),
        required_roles=tuple(str(x) for x in roles if isinstance(x, str)),
        approver_keys=tuple(approver),
        labels=tuple(labels),
        allow_sensitive=tuple(str(x) for x in r.get("deploy.allow_sensitive", list, [])
                              if isinstance(x, str)),
        max_package_bytes=r.get("deploy.max_package_bytes", int, 512 * 1024**2,
                                check=lambda v: None if v > 0 else "must be positive"),
        disk_reserve_bytes=r.get("deploy.disk_reserve_bytes", int, 1024**3,
                                 check=lambda v: None if v >= 0 else "must be 0 or more"),
        request_timeout_seconds=r.get("deploy.request_timeout_seconds", float, 10.0,
                                      check=lambda v: None if v > 0 else "must be positive"),
    )
