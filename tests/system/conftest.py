"""Fixtures of the system tier (make test-system)."""

from __future__ import annotations

import pytest

from tests.helpers.debbuild import DebBuilder


@pytest.fixture(scope="session")
def deb_builder(tmp_path_factory: pytest.TempPathFactory) -> DebBuilder:
    return DebBuilder(tmp_path_factory.mktemp("debs"))
