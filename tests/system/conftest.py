"""Fixtures of the system tier (make test-system)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from debbuild import DebBuilder  # noqa: E402


@pytest.fixture(scope="session")
def deb_builder(tmp_path_factory: pytest.TempPathFactory) -> DebBuilder:
    return DebBuilder(tmp_path_factory.mktemp("debs"))
