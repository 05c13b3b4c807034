"""CloudEvents 1.0 structured-mode JSON envelopes for everything we publish."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

SPEC_VERSION = "1.0"
TYPE_PREFIX = "org.edge-agent"

_SEGMENT = r"[A-Za-z0-9_.-]{1,64}"  # config's SAFE_ID: site and device ids
# What ``envelope`` writes into each attribute, as a format.  The egress guard
# validates these attributes against it instead of searching them for study values.
ATTRIBUTE_FORMATS: dict[str, re.Pattern[str]] = {
    "specversion": re.compile(re.escape(SPEC_VERSION)),
    "id": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    "source": re.compile(rf"edge-agent/{_SEGMENT}/{_SEGMENT}"),
    # One or two lower-case words: "results", "audit.events".
    "type": re.compile(re.escape(TYPE_PREFIX) + r"(?:\.[a-z][a-z-]{0,31}){1,2}\.v[0-9]{1,3}"),
    "datacontenttype": re.compile(r"application/json"),
    "time": re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z"),
}
REQUIRED = ("specversion", "id", "source", "type")


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
