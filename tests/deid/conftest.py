from __future__ import annotations

import pytest

from tests.helpers.deid import Recipient, make_recipient


@pytest.fixture(scope="session")
def recipient(tmp_path_factory: pytest.TempPathFactory) -> Recipient:
    return make_recipient(tmp_path_factory.mktemp("recipient"), "reid-officer")


@pytest.fixture(scope="session")
def other_recipient(tmp_path_factory: pytest.TempPathFactory) -> Recipient:
    return make_recipient(tmp_path_factory.mktemp("recipient2"), "someone-else")
