"""Fixtures for the audit tests (helpers live in tests/helpers/audit.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.audit import AuditBox, Fill, fill


@pytest.fixture
def ab(tmp_path: Path) -> Iterator[AuditBox]:
    b = AuditBox(tmp_path)
    yield b
    for log in b.logs:
        try:
            log.close()
        except Exception:  # noqa: BLE001 - already closed by the test
            pass


@pytest.fixture
def filler() -> Callable[..., None]:
    return fill


__all__ = ["Fill"]
