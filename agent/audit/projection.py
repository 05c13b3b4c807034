"""The pseudonymised projection of audit records: what may leave the box.

Local records are complete (they hold ``phi``); the projection drops ``phi``,
keeps only scalar detail values that look like tokens (hashes, pseudonyms,
codes, counts), redacts anything resembling free text, and removes any value
that contains one of the record's own PHI values, so a caller that puts a
patient name into ``details`` by mistake still does not publish it.

Strings a DICOM peer chose (its calling AE title, its address) are never
published raw: they become keyed pseudonyms (``ae:<hex>``, ``peer:<hex>``),
stable per box so central ops can still count and correlate them.  Why: an
attacker picks its AE title, and one shaped like an identifier
(``123-45-6789``) would otherwise trip the egress guard on the whole message.
As a second line, any string that matches an egress-guard pattern is redacted
here, value by value, so the guard never has to block an audit message.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from agent.uplink import egress

# No spaces: free text (which could quote a name or a report) is redacted.
_TOKEN = re.compile(r"^[A-Za-z0-9_.:@/+=,#-]{0,128}$")
REDACTED = "[redacted]"
_MAX_DEPTH = 3

# Detail keys whose values come from the peer, and the prefix of their pseudonym.
PEER_FIELDS: dict[str, str] = {
    "calling_ae": "ae", "called_ae": "ae", "ae_title": "ae",
    "peer": "peer", "address": "peer", "subject": "subject",
}


class PeerNames:
    """Keyed pseudonyms for strings a peer chose; the key never leaves the box."""

    def __init__(self, key: bytes) -> None:
        # Domain-separated from every other use of the key it is derived from.
        self._key = hmac.new(key, b"edge-agent audit peer names", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "PeerNames(<key>)"

    def name(self, kind: str, value: str) -> str:
        mac = hmac.new(self._key, kind.encode() + b"\x00" + value.encode("utf-8", "replace"),
                       hashlib.sha256)
        return f"{kind}:{mac.hexdigest()[:16]}"


def _phi_values(phi: Mapping[str, Any] | None) -> list[str]:
    if not phi:
        return []
    return [str(v).casefold() for v in phi.values() if v is not None and len(str(v)) >= 2]


def _contains_phi(text: str, phi: Iterable[str]) -> bool:
    folded = text.casefold()
    return any(p in folded for p in phi)


def _safe_text(text: str, phi: list[str]) -> bool:
    return bool(_TOKEN.match(text)) and not _contains_phi(text, phi) \
        and egress.check(text) is None


def safe_value(value: object, phi: list[str], depth: int = 0,
               peers: PeerNames | None = None, kind: str | None = None) -> object:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN/Infinity
    if isinstance(value, str):
        if kind is not None:
            return peers.name(kind, value) if peers is not None and value else REDACTED
        return value if _safe_text(value, phi) else REDACTED
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): safe_value(v, phi, depth + 1, peers, PEER_FIELDS.get(str(k)))
                for k, v in value.items() if _safe_text(str(k), phi)}
    if isinstance(value, list | tuple):
        return [safe_value(v, phi, depth + 1, peers, kind) for v in value[:64]]
    return REDACTED


def project(record: Mapping[str, Any], peers: PeerNames) -> dict[str, object]:
    """The publishable view of one decrypted record (see docs/schemas/audit.schema.json)."""
    phi = _phi_values(record.get("phi"))
    details = record.get("details") or {}
    source = record.get("source")
    return {
        "seq": record.get("seq"),
        "time": record.get("time"),
        "event": safe_value(record.get("event"), phi),
        "event_id": record.get("event_id"),
        "event_type": record.get("event_type"),
        "action": record.get("action"),
        "outcome": record.get("outcome_code"),
        "user": safe_value(record.get("user"), phi),
        "source": peers.name("peer", str(source)) if source else None,
        "details": (safe_value(details, phi, peers=peers) if isinstance(details, Mapping)
                    else {}),
    }


def unreadable(seq: int, time: str) -> dict[str, object]:
    """The projection of a record that could not be decrypted (it is still counted)."""
    return {"seq": seq, "time": time, "event": "[unreadable]", "event_id": "110100",
            "event_type": None, "action": "E", "outcome": 4, "user": None, "source": None,
            "details": {}}
