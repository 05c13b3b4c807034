"""Fixtures of the result-object tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.infer import InferenceEngine
from tests.helpers.results import engine


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    eng = engine(tmp_path_factory.mktemp("engine-state"))
    yield eng
    eng.close()
