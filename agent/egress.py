"""The egress guard: the last check before any byte leaves the box.

Every outgoing payload is compared with the original identifying values of the
study it came from (the PhiFingerprint) and with generic PHI patterns.  A hit
blocks the message; the caller keeps it encrypted and raises an alert.  The
same scrubber filters log records.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from agent.types import PhiFingerprint

# Patterns that never belong in what we publish: DICOM person names
# (Family^Given), US SSNs, and the UID roots real equipment uses (our own
# pseudonymous UIDs are 2.25.<int>, which is allowed).
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("person-name", re.compile(r"[A-Za-z][A-Za-z'-]+\^[A-Za-z]")),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("dicom-uid", re.compile(r"\b1\.[23]\.\d+(?:\.\d+){3,}\b")),
)
_MIN_VALUE_LEN = 4  # shorter originals ("M", "CT", "1") would match everywhere


@dataclass(frozen=True)
class GuardHit:
    kind: str  # "study-value" or a pattern name; never the value itself

    def __str__(self) -> str:
        return f"PHI egress guard: {self.kind}"


def _norm(s: str) -> str:
    return s.strip().lower()


def check(payload: bytes | str, guard: PhiFingerprint = PhiFingerprint()) -> GuardHit | None:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    low = text.lower()
    for value in guard.values:
        v = _norm(value)
        if len(v) >= _MIN_VALUE_LEN and v in low:
            return GuardHit("study-value")
        # Person names also leak as "Given Family" once carets are dropped.
        if "^" in v:
            parts = [p for p in v.split("^") if len(p) >= _MIN_VALUE_LEN]
            if any(p in low for p in parts):
                return GuardHit("study-value")
    for name, pat in _PATTERNS:
        if pat.search(text):
            return GuardHit(name)
    return None


def scrub(text: str, guard: PhiFingerprint = PhiFingerprint()) -> str:
    out = text
    for value in guard.values:
        if len(value.strip()) >= _MIN_VALUE_LEN:
            out = re.sub(re.escape(value.strip()), "[redacted]", out, flags=re.IGNORECASE)
    for name, pat in _PATTERNS:
        out = pat.sub(f"[{name}]", out)
    return out


class ScrubFilter(logging.Filter):
    """Logging filter: PHI patterns never reach a log sink, whoever logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format must not kill logging
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True
