"""Helpers for the audit tests: a real KEK, a real signing seed file, real SQLite."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from agent.audit import AuditLog
from agent.config import AuditSettings
from agent.crypto import KeyEncryptionKey, write_secret_file

BOX = "st-marys/ct-edge-01"



class AuditBox:
    """One box's audit files, and a way to open its AuditLog."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "audit" / "audit.db"
        self.kek = KeyEncryptionKey(os.urandom(32))
        self.signing = root / "keys" / "audit_signing.key"
        write_secret_file(self.signing, os.urandom(32).hex().encode())
        self.published: list[dict[str, object]] = []
        self.logs: list[AuditLog] = []

    def open(self, settings: AuditSettings | None = None, *, publish: bool = True,
             kek: KeyEncryptionKey | None = None) -> AuditLog:
        log = AuditLog(self.db, kek or self.kek, self.signing,
                       settings or AuditSettings(checkpoint_every=5, checkpoint_seconds=3600),
                       box=BOX, publish=self.published.append if publish else None)
        self.logs.append(log)
        return log

    @property
    def genesis(self) -> bytes:
        return bytes.fromhex((self.db.parent / "genesis.pub").read_text())

Fill = Callable[[AuditLog, int], None]


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record("instance.received", source=f"CT{i % 3}@10.0.0.{i % 7}",
                   details={"study": f"s{i:04x}", "instance": f"i{i:06x}", "bytes": 1000 + i},
                   phi={"patient_id": f"PID-{i:05d}", "patient_name": f"Doe^Jane{i}"})
