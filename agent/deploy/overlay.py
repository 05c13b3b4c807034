"""Configuration changes an approved deployment made: an overlay on agent.toml.

agent.toml stays the operator's file (often read-only, a conffile of the Debian
package); what a deployment changes lives in ``<state_dir>/deploy/config-overlay.json``
and is merged into the TOML data when the config is loaded.  The merge re-checks
every key against the declared safe subset (and the box's own [deploy]
allow_sensitive, read from agent.toml, never from the overlay), so a tampered
overlay cannot reach keys, certificates or destinations.  ``logging.level``
takes effect at once; every other key at the next start of the daemon.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.deploy.configkeys import SAFE_CONFIG_KEYS, SENSITIVE_CONFIG_KEYS

FILE = "config-overlay.json"


def overlay_path(state_dir: Path) -> Path:
    return state_dir / "deploy" / FILE


def _state_dir(data: dict[str, Any], config_path: Path) -> Path:
    box = data.get("box")
    raw = box.get("state_dir") if isinstance(box, dict) else None
    p = Path(os.path.expandvars(raw)) if isinstance(raw, str) else Path("/var/lib/edge-agent")
    return p if p.is_absolute() else config_path.parent.resolve() / p


def read(state_dir: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(overlay_path(state_dir).read_text())
    except (OSError, ValueError):
        return {}
    values = loaded.get("values") if isinstance(loaded, dict) else None
    return dict(values) if isinstance(values, dict) else {}


def apply(data: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """The TOML data with the overlay's allowed values merged in."""
    values = read(_state_dir(data, config_path))
    if not values:
        return data
    deploy = data.get("deploy")
    allow = deploy.get("allow_sensitive", []) if isinstance(deploy, dict) else []
    out = copy.deepcopy(data)
    for key, value in values.items():
        if key not in SAFE_CONFIG_KEYS and not (key in SENSITIVE_CONFIG_KEYS
                                                and isinstance(allow, list) and key in allow):
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[leaf] = value
    return out


def write(state_dir: Path, values: dict[str, Any], *, deployment: str, revision: int) -> None:
    path = overlay_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".overlay.")
    with os.fdopen(fd, "w") as fh:
        json.dump({"values": values, "deployment": deployment, "revision": revision}, fh,
                  sort_keys=True, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
