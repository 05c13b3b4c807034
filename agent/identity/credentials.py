"""Secrets from systemd credentials (``LoadCredentialEncrypted=``) instead of files.

Under systemd the unit decrypts the box secrets into ``$CREDENTIALS_DIRECTORY``
(a private, read-only, non-swappable ramfs that only the service can read).
When that variable is set, a key named in the config resolves to the credential
of the same *name* when one exists; otherwise the configured file is used, so a
box can move keys into credentials one at a time.

Credential names (the part before ``:`` in ``LoadCredentialEncrypted=``):

    kek         [keys] kek         spool / inbox / audit key-encryption key
    pseudonym   [keys] pseudonym   keyed pseudonyms and UIDs
    mqtt_key    [mqtt] key         the device's TLS private key
    atna_key    [atna] key_file    the client key towards the ATNA audit repository

The audit signing key is deliberately *not* a credential: it is a forward-secure
ratchet the daemon overwrites at every checkpoint (the old seed must be gone),
and a credential is read-only and would keep the genesis seed forever.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from agent.config import Config

ENV = "CREDENTIALS_DIRECTORY"

# credential name -> human description of the config key it replaces
NAMES: dict[str, str] = {
    "kek": "[keys] kek",
    "pseudonym": "[keys] pseudonym",
    "mqtt_key": "[mqtt] key",
    "atna_key": "[atna] key_file",
}


def directory() -> Path | None:
    """The credentials directory systemd gave this process, if any."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    p = Path(raw)
    return p if p.is_dir() else None


def resolve(name: str, configured: Path) -> Path:
    """The credential file for ``name`` when systemd provides one, else ``configured``."""
    d = directory()
    if d is None:
        return configured
    candidate = d / name
    return candidate if candidate.is_file() else configured


def apply(cfg: Config) -> Config:
    """Return ``cfg`` with key paths pointing at systemd credentials where they exist."""
    if directory() is None:
        return cfg
    keys = replace(cfg.keys, kek=resolve("kek", cfg.keys.kek),
                   pseudonym=resolve("pseudonym", cfg.keys.pseudonym))
    mqtt = replace(cfg.mqtt, key=resolve("mqtt_key", cfg.mqtt.key))
    atna = cfg.atna
    if atna.key_file is not None:
        atna = replace(atna, key_file=resolve("atna_key", atna.key_file))
    return replace(cfg, keys=keys, mqtt=mqtt, atna=atna)


def sources(cfg: Config) -> dict[str, str]:
    """Where each secret comes from ("credential" or "file"), for doctor and status."""
    d = directory()
    out: dict[str, str] = {}
    for name, path in (("kek", cfg.keys.kek), ("pseudonym", cfg.keys.pseudonym),
                       ("mqtt_key", cfg.mqtt.key)):
        out[name] = "credential" if d is not None and path.parent == d else "file"
    out["audit_signing"] = "file"
    if cfg.atna.enabled and cfg.atna.key_file is not None:
        out["atna_key"] = ("credential" if d is not None and cfg.atna.key_file.parent == d
                           else "file")
    return out
