"""Audit records of CLI actions (models, keys, provisioning, audit access).

The CLI runs outside the daemon, often as root through sudo: each action opens
the box's audit log, appends its records with the Unix user (and the sudo user
behind root), and hands any file SQLite created back to the owner of the state
directory, so that the service can still write its own log.  A record that
could not be written is an error, never a silent gap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.audit.log import AuditLog
from agent.config import Config
from agent.crypto import KeyEncryptionKey
from agent.errors import AuditError
from agent.identity.certificates import give, give_tree, owner_of


@dataclass(frozen=True)
class CliEvent:
    event: str
    details: Mapping[str, object]
    outcome: str = "success"
    phi: Mapping[str, str] | None = field(default=None, repr=False)


def db_path(cfg: Config) -> Path:
    return cfg.state_dir / "audit" / "audit.db"


def record_cli(cfg: Config, events: Sequence[CliEvent], *, user: str,
               kek: KeyEncryptionKey | None = None) -> None:
    """Append ``events`` to the box's audit log as ``user``; raise AuditError if any failed."""
    db = db_path(cfg)
    log = AuditLog(db, kek or KeyEncryptionKey.from_file(cfg.keys.kek), cfg.keys.audit_signing,
                   cfg.audit, box=f"{cfg.site}/{cfg.device}")
    sudo = os.environ.get("SUDO_USER")
    try:
        for e in events:
            details = dict(e.details, sudo_user=sudo) if sudo else dict(e.details)
            log.record(e.event, outcome=e.outcome, user=user, details=details, phi=e.phi)
        if log.errors:
            raise AuditError(f"could not record the audit event: {log.last_error}",
                             hint="check free space under the state dir and run "
                                  "'edge-agent audit verify'")
    finally:
        log.close()
        # Run as root for the service: the db, its -wal/-shm and a signing key
        # created just now must stay writable by the daemon.
        owner = owner_of(cfg.state_dir)
        give_tree(db.parent, owner)
        if cfg.keys.audit_signing.exists():
            give(cfg.keys.audit_signing, owner)
