from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The project runs pytest with --import-mode=importlib: make our helpers importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deid_support import Recipient, make_recipient  # noqa: E402


@pytest.fixture(scope="session")
def recipient(tmp_path_factory: pytest.TempPathFactory) -> Recipient:
    return make_recipient(tmp_path_factory.mktemp("recipient"), "reid-officer")


@pytest.fixture(scope="session")
def other_recipient(tmp_path_factory: pytest.TempPathFactory) -> Recipient:
    return make_recipient(tmp_path_factory.mktemp("recipient2"), "someone-else")
