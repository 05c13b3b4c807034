"""Subgroup values, coarse from the moment the box keeps them.

Per-subgroup performance (agent/review/) needs the patient's age and sex, but
de-identification (PS3.15 Annex E) removes both before any model sees the data:
Patient's Age is X, Patient's Sex and Birth Date are Z.  So the *patient
characteristics* a manifest names (``drift.subgroup_attributes``, any of
``PATIENT_ATTRIBUTES``) are captured on the PHI side, from the original instance,
before de-identification (agent/pipeline.py), and coarsened at capture:

* age: a band of ``AGE_BANDS`` (0-17, 18-39, 40-64, 65+), from Patient's Age or,
  without one, from Patient's Birth Date against the study's date; the exact age
  or birth date is never kept.  65+ also covers HIPAA Safe Harbor's "90 or older".
* sex: ``M``, ``F``, ``O`` or ``unknown``.

Nothing else is taken from the original: the other subgroup attributes (scanner
manufacturer and model, body part, modality) are read by the engine from the
de-identified instance, so an attribute the profile removes (a station name, an
institution) can never enter through a manifest.  The values go only into the
sealed review store and leave the box only as k-suppressed aggregates
(agent/review/performance.py).

May import: pydicom (reads a data set's values), nothing of agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from typing import Any

PATIENT_ATTRIBUTES = ("PatientAge", "PatientSex")
AGE_BANDS = ("0-17", "18-39", "40-64", "65+")
UNKNOWN = "unknown"
SEXES = ("M", "F", "O")

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
# The study's own date, then the next best: what an age at the time of the study needs.
_WHEN = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def age_band(years: float | None) -> str:
    if years is None or not 0 <= years < 150:
        return UNKNOWN
    if years < 18:
        return AGE_BANDS[0]
    if years < 40:
        return AGE_BANDS[1]
    if years < 65:
        return AGE_BANDS[2]
    return AGE_BANDS[3]


def _age_string(value: Any) -> float | None:
    m = _AGE.match(str(value or "").strip())
    return int(m.group(1)) / _PER_YEAR[m.group(2)] if m else None


def _date(value: Any) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _years_between(born: date, then: date) -> float | None:
    if then < born:
        return None
    return then.year - born.year - ((then.month, then.day) < (born.month, born.day))


def sex(value: Any) -> str:
    text = str(value or "").strip().upper()
    return text if text in SEXES else UNKNOWN


def _value(ds: Any, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is an unknown value
        return None


def capture(ds: Any, attributes: Iterable[str]) -> dict[str, str]:
    """The coarse patient characteristics of one original data set, for those of
    ``attributes`` that are patient characteristics; never raises (a value the box
    cannot read is ``unknown``)."""
    out: dict[str, str] = {}
    for attr in attributes:
        if attr == "PatientAge":
            years = _age_string(_value(ds, "PatientAge"))
            if years is None:
                born = _date(_value(ds, "PatientBirthDate"))
                then = next((d for d in (_date(_value(ds, k)) for k in _WHEN) if d), None)
                years = _years_between(born, then) if born and then else None
            out[attr] = age_band(years)
        elif attr == "PatientSex":
            out[attr] = sex(_value(ds, "PatientSex"))
    return out


def coarse(attribute: str, value: str) -> str:
    """What a subgroup value becomes before it is stored: a patient characteristic
    in its coarse form (a band stays a band; a DICOM Age String becomes one), any
    other value trimmed to 64 printable characters."""
    if attribute == "PatientAge":
        return value if value in AGE_BANDS else age_band(_age_string(value))
    if attribute == "PatientSex":
        return sex(value)
    cleaned = "".join(ch for ch in value if ch.isprintable()).strip()
    return cleaned[:64] or UNKNOWN
