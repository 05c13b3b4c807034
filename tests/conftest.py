"""Shared fixtures: a provisioned dev box, its real mTLS broker, the daemon."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Box, Broker, Daemon, Subscriber, provision  # noqa: E402


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return provision(tmp_path / "box")


@pytest.fixture
def broker(box: Box) -> Iterator[Broker]:
    b = Broker(box)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def ops(box: Box, broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(box).start()
    yield s
    s.stop()


@pytest.fixture
def daemon(box: Box, broker: Broker) -> Iterator[Daemon]:
    d = Daemon(box)
    d.start()
    yield d
    if d.proc is not None:
        d.stop()
