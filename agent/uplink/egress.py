"""The egress guard: the last check before any byte leaves the box.

Every outgoing payload is compared with the original identifying values of the
study it came from (the PhiFingerprint) and with generic PHI patterns.  A hit
blocks the message; the caller keeps it encrypted and raises an alert.  The
same scrubber filters log records: patterns always, and the original values of
the studies currently being worked on (registered with ``watch``), so a log
line cannot carry what a payload may not.

What is checked, for a CloudEvent (everything we publish is one):

* the envelope is validated by its format, not searched: ``specversion``,
  ``id`` (a UUID), ``source``, ``type``, ``datacontenttype`` and ``time`` (an
  RFC 3339 UTC timestamp, close to when the message was made).  A study
  acquired today shares its date with every envelope made today; searching
  ``time`` for the StudyDate would block most of a department's results.
  ``subject`` and any other attribute are checked like ``data``;
* in ``data``, every string (keys included) and number is a value.  The box's
  own words (agent/uplink/vocabulary.py: rule codes, fixed descriptions, words fixed
  by configuration or a signed model manifest, standard DICOM UID keywords and
  standard UIDs) are ours however they coincide with a name ("options: none"
  and a patient NONE^BOB); a text made from a vocabulary template is checked
  in its holes only.  Box-made tokens (keyed 2.25 UIDs, hex pseudonyms and
  digests, UUIDs) and numbers are compared whole with the study's values: a
  patient id 4711 is not inside the random number of a keyed UID.  Every other
  string is free text, searched for every spelling of every study value, for
  short name components as whole words, and for the PHI patterns.

A payload that is not a CloudEvent is searched whole, as free text.

Why JSON-aware: our payloads are JSON with ``ensure_ascii``, so "Müller" is on
the wire as ``M\\u00fcller``; a plain substring test on the raw bytes would miss
it.  The guard checks decoded strings (and, for non-JSON, the raw text).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from agent.types import PhiFingerprint
from agent.uplink import cloudevents, guardscan, vocabulary

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
# _PATTERNS as the guard's one-pass scan runs them (agent/uplink/guardscan.py): the same
# texts match, in the same order of precedence, but each search starts where re can
# skip ahead fast.  ssn: from its first "-", the three digits and the word boundary
# before them as a look-behind.  dicom-uid: from its literal "1", the word boundary
# before it as a look-behind, so the same UIDs match whole (a standard one is public).
# person-name is searched only when a "^" is there at all.
_SCAN_PATTERNS = (
    guardscan.Pattern("person-name", _PATTERNS[0][1], needs="^"),
    guardscan.Pattern("ssn", re.compile(r"-(?<=\b\d{3}-)\d{2}-\d{4}\b"), needs="-"),
    guardscan.Pattern("dicom-uid", re.compile(r"1(?<!\w1)\.[23]\.\d+(?:\.\d+){3,}\b"),
                      accept=lambda m: not vocabulary.is_standard_uid(m), needs="1."),
)
assert [p.name for p in _SCAN_PATTERNS] == [name for name, _ in _PATTERNS]
_STUDY_VALUE = GuardHit("study-value")


@lru_cache(maxsize=64)
def _matcher(values: frozenset[str]) -> guardscan.ValueMatcher:
    """One study's values compiled once: the outbox hands every message of a study the
    same fingerprint, so a drain compiles each study once (bounded: 64 studies)."""
    return guardscan.compile_values(needles(values), short_parts(values))


def _number_forms(x: float) -> set[str]:
    forms = {json.dumps(x)}
    if isinstance(x, float) and x.is_integer():
        forms.add(str(int(x)))
    return forms


# What a payload's check depends on, in the order the checks ran one by one: a hit
# decided on the spot (a whole token or number equal to a study value), or the index
# of a free text in the batch, searched with all the others in one pass.
_Plan = list["GuardHit | int"]


def _free_text(text: str, n: guardscan.ValueMatcher, batch: guardscan.TextBatch,
               plan: _Plan) -> None:
    plan.append(batch.add(text, n))


def _string(text: str, n: guardscan.ValueMatcher, batch: guardscan.TextBatch, plan: _Plan,
            depth: int = 0) -> None:
    if vocabulary.is_fixed(text) or vocabulary.is_standard_uid(text):
        return
    if _TOKEN.fullmatch(text):
        if guardscan.norm(text) in n.long:
            plan.append(_STUDY_VALUE)
        return
    parts = vocabulary.holes(text) if depth < 3 else None
    if parts is not None:
        for hole, is_number in parts:
            if not is_number:
                _string(hole, n, batch, plan, depth + 1)
            elif guardscan.norm(hole) in n.long:
                plan.append(_STUDY_VALUE)
        return
    _free_text(text, n, batch, plan)


def _value(doc: Any, n: guardscan.ValueMatcher, batch: guardscan.TextBatch,
           plan: _Plan) -> None:
    if isinstance(doc, str):
        _string(doc, n, batch, plan)
    elif isinstance(doc, bool) or doc is None:
        return
    elif isinstance(doc, int | float):
        if _number_forms(doc) & n.long:
            plan.append(_STUDY_VALUE)
    elif isinstance(doc, dict):
        for k, v in doc.items():
            _string(str(k), n, batch, plan)
            _value(v, n, batch, plan)
    elif isinstance(doc, list):
        for v in doc:
            _value(v, n, batch, plan)
    else:
        _free_text(str(doc), n, batch, plan)


def _plan(payload: bytes | str, guard: PhiFingerprint, made_at: float | None,
          batch: guardscan.TextBatch) -> _Plan:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    n = _matcher(guard.values)
    plan: _Plan = []
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "specversion" in doc:
        if not _envelope_ok(doc, made_at):
            return [GuardHit("envelope")]
        for key, value in doc.items():
            if key in _ENVELOPE:
                continue
            # data, subject (standard names) and any extension attribute (its name too)
            if key not in ("data", "subject"):
                _string(key, n, batch, plan)
            _value(value, n, batch, plan)
        return plan
    # Not a CloudEvent: everything in it is free text, the raw text first.
    _free_text(text, n, batch, plan)
    if doc is not None:
        for t in _strings(doc):
            _free_text(t, n, batch, plan)
    return plan


def check_many(items: Sequence[tuple[bytes | str, PhiFingerprint, float | None]],
               ) -> list[GuardHit | None]:
    """``check`` for a batch of (payload, guard, made_at) in one pass: the free texts
    of all payloads are searched together (agent/uplink/guardscan.py)."""
    batch = guardscan.TextBatch()
    plans = [_plan(payload, guard, made_at, batch) for payload, guard, made_at in items]
    kinds = batch.kinds(_SCAN_PATTERNS, _STUDY_VALUE.kind)
    out: list[GuardHit | None] = []
    for plan in plans:
        hit: GuardHit | None = None
        for step in plan:
            if isinstance(step, GuardHit):
                hit = step
            elif (kind := kinds[step]) is not None:
                hit = GuardHit(kind)
            if hit is not None:
                break
        out.append(hit)
    return out


def check(payload: bytes | str, guard: PhiFingerprint = PhiFingerprint(), *,
          made_at: float | None = None) -> GuardHit | None:
    """The first reason ``payload`` must not leave the box, or None when it may.

    ``made_at`` is when the message entered the outbox (epoch seconds); when given, a
    CloudEvent's ``time`` must lie within ``TIME_SLACK_S`` of it.
    """
    return check_many([(payload, guard, made_at)])[0]


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
