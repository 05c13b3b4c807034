"""Fixtures of the result-object tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_support import engine  # noqa: E402

from agent.infer import InferenceEngine  # noqa: E402


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    eng = engine(tmp_path_factory.mktemp("engine-state"))
    yield eng
    eng.close()
