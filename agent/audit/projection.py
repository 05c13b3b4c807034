"""The pseudonymised projection of audit records: what may leave the box.

Local records are complete (they hold ``phi``); the projection drops ``phi``,
keeps only scalar detail values that look like tokens (hashes, pseudonyms,
codes, counts), redacts anything resembling free text, and removes any value
that contains one of the record's own PHI values, so a caller that puts a
patient name into ``details`` by mistake still does not publish it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

# No spaces: free text (which could quote a name or a report) is redacted.
_TOKEN = re.compile(r"^[A-Za-z0-9_.:@/+=,#-]{0,128}$")
REDACTED = "[redacted]"
_MAX_DEPTH = 3


def _phi_values(phi: Mapping[str, Any] | None) -> list[str]:
    if not phi:
        return []
    return [str(v).casefold() for v in phi.values() if v is not None and len(str(v)) >= 2]


def _contains_phi(text: str, phi: Iterable[str]) -> bool:
    folded = text.casefold()
    return any(p in folded for p in phi)


def safe_value(value: object, phi: list[str], depth: int = 0) -> object:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN/Infinity
    if isinstance(value, str):
        if not _TOKEN.match(value) or _contains_phi(value, phi):
            return REDACTED
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): safe_value(v, phi, depth + 1) for k, v in value.items()
                if _TOKEN.match(str(k)) and not _contains_phi(str(k), phi)}
    if isinstance(value, list | tuple):
        return [safe_value(v, phi, depth + 1) for v in value[:64]]
    return REDACTED


def project(record: Mapping[str, Any]) -> dict[str, object]:
    """The publishable view of one decrypted record (see docs/schemas/audit.schema.json)."""
    phi = _phi_values(record.get("phi"))
    details = record.get("details") or {}
    return {
        "seq": record.get("seq"),
        "time": record.get("time"),
        "event": safe_value(record.get("event"), phi),
        "event_id": record.get("event_id"),
        "event_type": record.get("event_type"),
        "action": record.get("action"),
        "outcome": record.get("outcome_code"),
        "user": safe_value(record.get("user"), phi),
        "source": safe_value(record.get("source"), phi),
        "details": safe_value(details, phi) if isinstance(details, Mapping) else {},
    }
