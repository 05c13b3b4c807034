"""CloudEvents 1.0 structured-mode JSON envelopes for everything we publish."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

SPEC_VERSION = "1.0"
TYPE_PREFIX = "org.edge-agent"


def envelope(
    *,
    kind: str,
    source: str,
    data: dict[str, Any],
    event_id: str | None = None,
    subject: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """Build the envelope; ``event_id`` must be stable for retried results."""
    ev: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": f"{TYPE_PREFIX}.{kind}.v1",
        "time": (time or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    if subject is not None:
        ev["subject"] = subject
    return ev


def encode(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def stable_id(*parts: str) -> str:
    """A deterministic UUID (v5) so a re-created message keeps its id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "edge-agent:" + "/".join(parts)))
