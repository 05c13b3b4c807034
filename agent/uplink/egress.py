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


# What one string or number of a payload contributes to its check, in order: a hit
# decided on the spot (a whole token or number equal to a study value), or a free text
# to be searched with the rest of the batch (agent/uplink/guardscan.py).
_Step = GuardHit | str
MEMO_MAX = 4096  # remembered strings and numbers per study
MEMO_TEXT_MAX = 256  # longer strings are free text in practice: not remembered


class _Study:
    """One study's values compiled once, and what its payloads' short strings and numbers
    were found to be.

    A drain checks the same keys, fixed words, model names and numbers in every message
    of a study: deciding again which of them are the box's own words, tokens, template
    instances or free text was most of the guard's walk through a payload.  Only that
    decision is remembered, never a search result: every free text is still searched,
    in every message.  The decision depends on the study's values (this object) and the
    vocabulary, which only grows (``vocabulary.allow``): the memo is dropped when it has.
    """

    __slots__ = ("matcher", "memo", "generation")

    def __init__(self, matcher: guardscan.ValueMatcher) -> None:
        self.matcher = matcher
        self.memo: dict[object, tuple[_Step, ...]] = {}
        self.generation = vocabulary.generation()

    def fresh(self) -> _Study:
        if (gen := vocabulary.generation()) != self.generation:
            self.memo = {}
            self.generation = gen
        return self

    def remember(self, key: object, steps: tuple[_Step, ...], generation: int) -> None:
        if generation != self.generation:
            return  # the vocabulary grew meanwhile: decided under the old one
        if len(self.memo) >= MEMO_MAX:
            self.memo = {}
        self.memo[key] = steps


@lru_cache(maxsize=64)
def _study(values: frozenset[str]) -> _Study:
    """One study's values compiled once: the outbox hands every message of a study the
    same fingerprint, so a drain compiles each study once (bounded: 64 studies)."""
    return _Study(guardscan.compile_values(needles(values), short_parts(values)))


def _number_forms(x: float) -> set[str]:
    forms = {json.dumps(x)}
    if isinstance(x, float) and x.is_integer():
        forms.add(str(int(x)))
    return forms


# What a payload's check depends on, in the order the checks ran one by one: a hit
# decided on the spot, or the index of a free text in the batch, searched with all the
# others in one pass.
_Plan = list["GuardHit | int"]


def _classify(text: str, long: frozenset[str], out: list[_Step], depth: int = 0) -> None:
    if vocabulary.is_fixed(text) or vocabulary.is_standard_uid(text):
        return
    if _TOKEN.fullmatch(text):
        if guardscan.norm(text) in long:
            out.append(_STUDY_VALUE)
        return
    parts = vocabulary.holes(text) if depth < 3 else None
    if parts is not None:
        for hole, is_number in parts:
            if not is_number:
                _classify(hole, long, out, depth + 1)
            elif guardscan.norm(hole) in long:
                out.append(_STUDY_VALUE)
        return
    out.append(text)


class _Walk:
    """One payload's walk: its steps go into ``plan``, its free texts into ``batch``."""

    __slots__ = ("study", "batch", "plan", "generation")

    def __init__(self, study: _Study, batch: guardscan.TextBatch, plan: _Plan) -> None:
        self.study = study.fresh()
        self.batch = batch
        self.plan = plan
        self.generation = study.generation

    def emit(self, steps: tuple[_Step, ...] | list[_Step]) -> None:
        for step in steps:
            if isinstance(step, str):
                self.plan.append(self.batch.add(step, self.study.matcher))
            else:
                self.plan.append(step)

    def string(self, text: str) -> None:
        steps = self.study.memo.get(text)
        if steps is None:
            out: list[_Step] = []
            _classify(text, self.study.matcher.long, out)
            steps = tuple(out)
            if len(text) <= MEMO_TEXT_MAX:
                self.study.remember(text, steps, self.generation)
        self.emit(steps)

    def number(self, x: float) -> None:
        key = (type(x), x)  # 1 and 1.0 are equal keys but not the same JSON
        steps = self.study.memo.get(key)
        if steps is None:
            steps = (_STUDY_VALUE,) if _number_forms(x) & self.study.matcher.long else ()
            self.study.remember(key, steps, self.generation)
        self.emit(steps)

    def value(self, doc: Any) -> None:
        if isinstance(doc, str):
            self.string(doc)
        elif isinstance(doc, bool) or doc is None:
            return
        elif isinstance(doc, int | float):
            self.number(doc)
        elif isinstance(doc, dict):
            for k, v in doc.items():
                self.string(str(k))
                self.value(v)
        elif isinstance(doc, list):
            for v in doc:
                self.value(v)
        else:
            self.emit([str(doc)])


def _plan(payload: bytes | str, guard: PhiFingerprint, made_at: float | None,
          batch: guardscan.TextBatch) -> _Plan:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    plan: _Plan = []
    walk = _Walk(_study(guard.values), batch, plan)
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
                walk.string(key)
            walk.value(value)
        return plan
    # Not a CloudEvent: everything in it is free text, the raw text first.
    walk.emit([text])
    if doc is not None:
        walk.emit(list(_strings(doc)))
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
