"""Benchmarks reuse the test harness's loopback helpers (tests/helpers/):
one copy of free_port, wait_port and set_config for both."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers

from tests.helpers import free_port, set_config  # noqa: E402
from tests.helpers import wait_port as _wait_port  # noqa: E402


def wait_port(port: int, timeout: float = 60) -> None:
    # A daemon starting on a loaded bench machine may need longer than tests allow.
    _wait_port(port, timeout)


__all__ = ["free_port", "set_config", "wait_port"]
