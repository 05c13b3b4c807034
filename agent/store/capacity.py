"""The inbox's bounds: a free-disk reserve and a byte budget.

A C-STORE that would cross either is refused (0xA700) before anything is written,
so a full disk never costs an acknowledged instance.  May import: agent.config,
agent.errors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.config import InboxSettings
from agent.errors import OutOfResources


def check(root: Path, settings: InboxSettings, pending_bytes: int, incoming: int = 0) -> None:
    """Raise OutOfResources when ``incoming`` more bytes would cross the reserve or budget."""
    free = shutil.disk_usage(root).free
    if free - incoming < settings.min_free_bytes:
        raise OutOfResources(
            f"free disk {free // 2**20} MiB is below the reserve "
            f"{settings.min_free_bytes // 2**20} MiB",
            hint="free space on the state volume or lower [inbox] min_free_bytes",
        )
    if pending_bytes + incoming > settings.max_bytes:
        raise OutOfResources(
            f"inbox holds {pending_bytes // 2**20} MiB, budget "
            f"{settings.max_bytes // 2**20} MiB",
            hint="wait for processing to catch up or raise [inbox] max_bytes",
        )
