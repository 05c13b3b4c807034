"""Fixtures for the audit tests (helpers live in audit_helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_helpers import AuditBox, Fill, fill  # noqa: E402


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
