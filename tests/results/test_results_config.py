"""[results] keys: off by default, retention bounded, mistakes reported with the fix."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from agent import config
from tests.helpers import EDGE_AGENT, REPO, Box, set_config


def _load(box: Box) -> config.Config:
    return config.parse(tomllib.loads(box.config.read_text()), box.config)


def test_results_are_off_by_default_and_can_be_enabled(box: Box) -> None:
    cfg = _load(box)
    assert cfg.results == config.ResultsSettings(enabled=False, link_retention_days=14)
    set_config(box, "results", "enabled", "true")
    set_config(box, "results", "link_retention_days", "30")
    assert _load(box).results == config.ResultsSettings(enabled=True, link_retention_days=30)


@pytest.mark.parametrize("key,value,message", [
    ("link_retention_days", "0", "must be between 1 and 3650 days"),
    ("enabled", '"yes"', "expected true or false"),
    ("link_retension_days", "3", "is not a known setting"),
])
def test_bad_results_settings_are_reported(box: Box, key: str, value: str,
                                           message: str) -> None:
    set_config(box, "results", key, value)
    with pytest.raises(config.ConfigError, match=message):
        _load(box)
    # The daemon says so too, without a traceback.
    proc = subprocess.run([*EDGE_AGENT, "run", "--config", str(box.config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_preview_needs_a_held_link(tmp_path: Path, box: Box) -> None:
    set_config(box, "results", "enabled", "true")
    (box.state / "results").mkdir(parents=True)
    from agent.crypto import KeyEncryptionKey
    from agent.results.link import LinkStore

    LinkStore(box.state / "results" / "links.db",
              KeyEncryptionKey.from_file(_load(box).keys.kek)).close()
    proc = subprocess.run([*EDGE_AGENT, "results", "preview", "2.25.0000000000", "--out",
                           str(tmp_path / "o"), "--config", str(box.config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no held result link for study 2.25.0000000000" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
