"""Replacement values: VR-valid dummies, keyed date shifts and text scrubbing."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

# Dummies are valid for their VR (PS3.5 6.2) so that Type 1 attributes stay
# conformant, and generic so they carry no information about the original.
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, object] = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": DUMMY_TEXT,
    "LT": DUMMY_TEXT,
    "SH": DUMMY_TEXT,
    "ST": DUMMY_TEXT,
    "UC": DUMMY_TEXT,
    "UT": DUMMY_TEXT,
    "PN": DUMMY_TEXT,
    "UR": "urn:oid:2.25",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "UN": b"\x00\x00",
    "AT": 0,
}
TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UT", "PN", "UR", "CS"})
FREE_TEXT_VRS = frozenset({"LT", "ST", "UC", "UT"})
MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64}
REMOVED = "[removed]"


def shift_date(value: str, days: int) -> str:
    """Shift a DA value (or the date part of a DT value) by whole days.

    Times and time-zone suffixes are left alone so that intervals within a
    patient stay exact.  Values that are not a recognisable date become empty:
    an unparseable date is not trusted to be harmless.
    """
    value = value.strip()
    if len(value) >= 8 and value[:8].isdigit():
        try:
            day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        except ValueError:
            return ""
        try:
            shifted = day + dt.timedelta(days=days)
        except OverflowError:
            return ""
        return shifted.strftime("%Y%m%d") + value[8:]
    if len(value) in (4, 6) and value.isdigit():  # DT with year (and month) precision
        year = int(value[:4])
        month = int(value[4:6]) if len(value) == 6 else 1
        try:
            shifted = dt.date(year, max(1, min(12, month)), 1) + dt.timedelta(days=days)
        except (ValueError, OverflowError):
            return ""
        return shifted.strftime("%Y%m")[: len(value)]
    return ""


_DATE_LIKE = re.compile(r"\b(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})\b")
_LONG_DIGITS = re.compile(r"\d{5,}")


class Scrubber:
    """Removes known identifying strings and date/ID-like patterns from free text.

    This is the 'C' (clean) action for descriptors: the known identifiers of the
    instance (names and their parts, IDs, dates) are taken out wherever they
    appear, and so are anything that looks like a date or a long number.
    """

    def __init__(self, terms: Iterable[str]) -> None:
        words = {t.strip() for t in terms if len(t.strip()) >= 3}
        if words:
            alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            self._terms: re.Pattern[str] | None = re.compile(alts, re.IGNORECASE)
        else:
            self._terms = None

    def scrub(self, text: str) -> str:
        if self._terms is not None:
            text = self._terms.sub(REMOVED, text)
        text = _DATE_LIKE.sub(REMOVED, text)
        return _LONG_DIGITS.sub(REMOVED, text)


def name_terms(value: str) -> list[str]:
    """A person name and its components (family, given, middle...) as search terms."""
    out = [value]
    for group in value.split("="):
        out.append(group)
        out.extend(p for comp in group.split("^") for p in comp.split())
    return [t for t in out if t]
