"""The one path every CLI action is audited through (agent/audit/cli.py): the Unix
user and the sudo user behind root, several records in one go, PHI sealed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import config as cfgmod
from agent.audit import records_between, tail
from agent.audit.cli import CliEvent, db_path, record_cli
from agent.crypto import KeyEncryptionKey
from tests.helpers import Box


def test_cli_records_carry_user_sudo_user_and_seal_phi(box: Box,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfgmod.load(box.config)
    monkeypatch.setenv("SUDO_USER", "alice")
    record_cli(cfg, [CliEvent("model.changed", {"action": "install", "model": "m"}),
                     CliEvent("audit.exported", {"format": "jsonl"}, "success",
                              {"patient_id": "PID-CLI-77"})], user="root")
    kek = KeyEncryptionKey.from_file(cfg.keys.kek)
    now = datetime.now(UTC)
    full = records_between(db_path(cfg), kek, now - timedelta(minutes=5), now + timedelta(minutes=5))
    mine = [r for r in full if r["event"] in ("model.changed", "audit.exported")]
    assert [r["event"] for r in mine] == ["model.changed", "audit.exported"]
    assert all(r["user"] == "root" and r["details"]["sudo_user"] == "alice" for r in mine)
    # The pseudonymised view (what operators and the fleet see) holds no patient ID.
    assert "PID-CLI-77" not in repr(tail(db_path(cfg), kek, 50))
    assert Path(db_path(cfg)).exists()
