"""The egress guard as it was before issue 19 section 4, kept verbatim as a test-only
reference: the differential test (test_guard_differential.py) checks that the
one-pass guard in agent/ blocks exactly what this one blocks, with the same reason.

Do not "fix" this file: it is the definition of the old behaviour.  It shares the
box's vocabulary and the envelope formats with agent/ (policy data, not guard logic).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.types import PhiFingerprint
from agent.uplink import cloudevents, vocabulary
from agent.uplink.egress import GuardHit

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


def short_parts(values: Iterable[str]) -> frozenset[str]:
    """Name components too short to search for inside words ("li", "wu", lower case).

    They are searched as whole words, and only in free text: a result carries none,
    so they cannot block one, yet "BurnedInAnnotation LI WU" would still be caught.
    """
    out: set[str] = set()
    for value in values:
        v = _norm(value)
        if "^" in v:
            out |= {p for part in v.split("^") for p in part.split()
                    if 2 <= len(p) < _MIN_VALUE_LEN and p.isalpha()}
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


def _texts(text: str) -> list[str]:
    texts = [text]
    try:
        texts.extend(_strings(json.loads(text)))
    except ValueError:
        pass  # not JSON: the raw text is all there is
    return texts


# -- the envelope, checked by format ---------------------------------------------

_ENVELOPE = cloudevents.ATTRIBUTE_FORMATS
# How far an envelope's time may lie from when its message entered the outbox.  The
# two are taken microseconds apart; the slack only absorbs a clock step in between.
# A date in ``time`` that says anything about a patient lies far outside it.
TIME_SLACK_S = 3600.0


def _envelope_ok(ev: dict[str, Any], made_at: float | None) -> bool:
    if any(k not in ev for k in cloudevents.REQUIRED):
        return False
    for key, pattern in _ENVELOPE.items():
        if key in ev and not (isinstance(ev[key], str) and pattern.fullmatch(ev[key])):
            return False
    if made_at is not None and "time" in ev:
        try:
            t = datetime.fromisoformat(ev["time"]).timestamp()
        except ValueError:
            return False
        if abs(t - made_at) > TIME_SLACK_S:
            return False
    return True


# -- data, checked value by value ------------------------------------------------

# Tokens the box makes: keyed UIDs, hex pseudonyms/instance refs/digests, UUIDs.
_TOKEN = re.compile(r"2\.25\.\d{1,39}|[0-9a-fA-F]{12,64}|" + _ENVELOPE["id"].pattern)


@dataclass(frozen=True)
class _Needles:
    long: frozenset[str]  # every spelling of every value, searched as substrings
    short: tuple[re.Pattern[str], ...]  # short name components, searched as words


def _number_forms(x: float) -> set[str]:
    forms = {json.dumps(x)}
    if isinstance(x, float) and x.is_integer():
        forms.add(str(int(x)))
    return forms


def _free_text(text: str, n: _Needles) -> GuardHit | None:
    t = _norm(text)
    if any(needle in t for needle in n.long):
        return GuardHit("study-value")
    if any(p.search(t) for p in n.short):
        return GuardHit("study-value")
    for name, pat in _PATTERNS:
        for m in pat.finditer(text):
            if not (name == "dicom-uid" and vocabulary.is_standard_uid(m.group())):
                return GuardHit(name)
    return None


def _string(text: str, n: _Needles, depth: int = 0) -> GuardHit | None:
    if vocabulary.is_fixed(text) or vocabulary.is_standard_uid(text):
        return None
    if _TOKEN.fullmatch(text):
        return GuardHit("study-value") if _norm(text) in n.long else None
    parts = vocabulary.holes(text) if depth < 3 else None
    if parts is not None:
        for hole, is_number in parts:
            hit = (GuardHit("study-value") if is_number and _norm(hole) in n.long
                   else None if is_number else _string(hole, n, depth + 1))
            if hit is not None:
                return hit
        return None
    return _free_text(text, n)


def _value(doc: Any, n: _Needles) -> GuardHit | None:
    if isinstance(doc, str):
        return _string(doc, n)
    if isinstance(doc, bool) or doc is None:
        return None
    if isinstance(doc, int | float):
        return GuardHit("study-value") if _number_forms(doc) & n.long else None
    if isinstance(doc, dict):
        for k, v in doc.items():
            hit = _string(str(k), n) or _value(v, n)
            if hit is not None:
                return hit
        return None
    if isinstance(doc, list):
        for v in doc:
            hit = _value(v, n)
            if hit is not None:
                return hit
        return None
    return _free_text(str(doc), n)


def check(payload: bytes | str, guard: PhiFingerprint = PhiFingerprint(), *,
          made_at: float | None = None) -> GuardHit | None:
    """The first reason ``payload`` must not leave the box, or None when it may.

    ``made_at`` is when the message entered the outbox (epoch seconds); when given, a
    CloudEvent's ``time`` must lie within ``TIME_SLACK_S`` of it.
    """
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    n = _Needles(needles(guard.values),
                 tuple(re.compile(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])")
                       for p in short_parts(guard.values)))
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "specversion" in doc:
        if not _envelope_ok(doc, made_at):
            return GuardHit("envelope")
        for key, value in doc.items():
            if key in _ENVELOPE:
                continue
            # data, subject (standard names) and any extension attribute (its name too)
            hit = (None if key in ("data", "subject") else _string(key, n)) or _value(value, n)
            if hit is not None:
                return hit
        return None
    # Not a CloudEvent: everything in it is free text.
    for t in _texts(text):
        hit = _free_text(t, n)
        if hit is not None:
            return hit
    return None
