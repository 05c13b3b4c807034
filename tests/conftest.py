"""Shared fixtures: a provisioned dev box, its real mTLS broker, the daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Box, Broker, Daemon, Subscriber, provision, require_peer


# No ordering mark on purpose: this runs after skipif (the skipping plugin is tryfirst),
# so a test skipped for another reason (not root) stays skipped, and before the fixtures
# are set up (the runner's hook was registered earlier), so a missing peer costs no broker.
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("peer"):
        for name in marker.args:
            require_peer(name)


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
