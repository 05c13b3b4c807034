"""The egress guard: the last check before any byte leaves the box.

Every outgoing payload is compared with the original identifying values of the
study it came from (the PhiFingerprint) and with generic PHI patterns.  A hit
blocks the message; the caller keeps it encrypted and raises an alert.  The
same scrubber filters log records: patterns always, and the original values of
the studies currently being worked on (registered with ``watch``), so a log
line cannot carry what a payload may not.

Why JSON-aware: our payloads are JSON with ``ensure_ascii``, so "Müller" is on
the wire as ``M\\u00fcller``; a plain substring test on the raw bytes would miss
it.  The guard therefore checks the raw text *and* every decoded string.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from agent.types import PhiFingerprint

# Patterns that never belong in what we publish: DICOM person names
# (Family^Given), US SSNs, and the UID roots real equipment uses (our own
# pseudonymous UIDs are 2.25.<int>, which is allowed).
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # The lookbehind anchors a match at a word start: without it every letter of
    # a long run (base64, say) starts a new scan to the run's end, O(n^2).
    ("person-name", re.compile(r"(?<![A-Za-z'-])[A-Za-z][A-Za-z'-]+\^[A-Za-z]")),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("dicom-uid", re.compile(r"\b1\.[23]\.\d+(?:\.\d+){3,}\b")),
)
_MIN_VALUE_LEN = 4  # shorter originals ("M", "CT", "1") would match everywhere
_DICOM_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


@dataclass(frozen=True)
class GuardHit:
    kind: str  # "study-value" or a pattern name; never the value itself

    def __str__(self) -> str:
        return f"PHI egress guard: {self.kind}"


def _norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def needles(values: Iterable[str]) -> frozenset[str]:
    """Every spelling of the original values that must not appear (lower case).

    A DICOM date 19310417 also leaks as 1931-04-17 or 1931/04/17; a person name
    Family^Given also leaks as its components once the carets are dropped.
    """
    out: set[str] = set()
    for value in values:
        v = _norm(value)
        if len(v) >= _MIN_VALUE_LEN:
            out.add(v)
        m = _DICOM_DATE.match(v)
        if m:
            y, mo, d = m.groups()
            out |= {f"{y}-{mo}-{d}", f"{y}/{mo}/{d}", f"{mo}/{d}/{y}", f"{d}.{mo}.{y}"}
        if "^" in v:
            out |= {p.strip() for p in v.split("^") if len(p.strip()) >= _MIN_VALUE_LEN}
    return frozenset(out)


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def _texts(payload: bytes | str) -> list[str]:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    texts = [text]
    try:
        texts.extend(_strings(json.loads(text)))
    except ValueError:
        pass  # not JSON: the raw text is all there is
    return texts


def check(payload: bytes | str, guard: PhiFingerprint = PhiFingerprint()) -> GuardHit | None:
    """The first reason ``payload`` must not leave the box, or None when it may."""
    texts = _texts(payload)
    # One haystack; NUL never occurs in a needle, so no match spans two strings.
    hay = "\x00".join(_norm(t) for t in texts)
    for n in needles(guard.values):
        if n in hay:
            return GuardHit("study-value")
    for name, pat in _PATTERNS:
        if any(pat.search(t) for t in texts):
            return GuardHit(name)
    return None


# -- the log scrubber -----------------------------------------------------------

_active_lock = threading.RLock()  # re-entrant: a signal handler may log mid-scrub
_active: dict[int, frozenset[str]] = {}
_active_next = 0


@contextmanager
def watch(guard: PhiFingerprint) -> Iterator[None]:
    """While inside, the log scrubber also redacts this study's original values."""
    global _active_next
    with _active_lock:
        token = _active_next
        _active_next += 1
        _active[token] = needles(guard.values)
    try:
        yield
    finally:
        with _active_lock:
            _active.pop(token, None)


def _watched() -> frozenset[str]:
    with _active_lock:
        return frozenset().union(*_active.values()) if _active else frozenset()


def scrub(text: str, guard: PhiFingerprint = PhiFingerprint()) -> str:
    """``text`` with original values and PHI patterns replaced by placeholders."""
    out = text
    # Longest first, so a full name is redacted before one of its components.
    for n in sorted(needles(guard.values) | _watched(), key=len, reverse=True):
        out = re.sub(r"\s+".join(map(re.escape, n.split())), "[redacted]", out,
                     flags=re.IGNORECASE)
    for name, pat in _PATTERNS:
        out = pat.sub(f"[{name}]", out)
    return out


class ScrubFilter(logging.Filter):
    """Logging filter: PHI never reaches a log sink, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
            clean = scrub(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                # Exception text (e.g. a pydicom error quoting a value) is
                # rendered later by the formatter: scrub it now, drop the object.
                text = logging.Formatter().formatException(record.exc_info)
                record.exc_text = scrub(text)
                record.exc_info = None
        except Exception:  # noqa: BLE001 - a broken format must not kill logging
            return True
        return True
