"""Keyed pseudonyms: stable per box key, unlinkable without it.

Every derived value is an HMAC-SHA256 of the original under the box's pseudonym
key with a distinct label, so a UID, a patient token and a date offset of the
same input cannot be correlated with one another, and nobody without the key
can recompute (or brute-force from a guessed ID) the mapping.
"""

from __future__ import annotations

import uuid

from agent.crypto import hmac_sha256

# PS3.5 B.2: a UID under the 2.25 root is the decimal form of a UUID.
_UID_ROOT = "2.25."
DATE_SHIFT_MIN_DAYS = 30
DATE_SHIFT_SPAN_DAYS = 3650


class Pseudonymizer:
    kind = "keyed"  # [deid] pseudonyms

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key must hold at least 128 bits")
        self._key = key
        self._uids: dict[str, str] = {}

    def __repr__(self) -> str:
        return "Pseudonymizer(<key hidden>)"

    def uid(self, original: str) -> str:
        """Original UID -> 2.25.<int>, the same for the same input and key."""
        got = self._uids.get(original)
        if got is None:
            digest = hmac_sha256(self._key, b"uid", original.encode("ascii", "replace"))
            got = _UID_ROOT + str(uuid.UUID(bytes=digest[:16], version=4).int)
            if len(self._uids) > 200_000:  # bound memory in a long-running daemon
                self._uids.clear()
            self._uids[original] = got
        return got

    def token(self, label: str, original: str, length: int = 16) -> str:
        """An upper-case hex token (fits SH/LO/PN/AE) for a labelled original value."""
        digest = hmac_sha256(self._key, label.encode(), original.encode("utf-8", "replace"))
        return digest.hex()[:length].upper()

    def date_offset_days(self, patient_identity: str) -> int:
        """Per-patient shift into the past, 30..3679 days: keeps intervals exact."""
        digest = hmac_sha256(self._key, b"date-shift", patient_identity.encode("utf-8"))
        return -(DATE_SHIFT_MIN_DAYS + int.from_bytes(digest[:8], "big") % DATE_SHIFT_SPAN_DAYS)
