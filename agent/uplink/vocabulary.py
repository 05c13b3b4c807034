"""The box's own words: every fixed text a published result may carry.

A result tells central ops *why* an instance was held back or a model failed by
a rule code plus the fixed description below, never by text built from the
instance (a header value, an exception message, a UID): that text is derived
from PHI-bearing input, and no guard can tell a patient called "Li Wu" from
two harmless words once they are in a sentence.  Texts with numbers in them
(review reasons, explanations) are made from the templates below and nothing
else.

The egress guard (agent/uplink/egress.py) exempts exactly these words from its study
value check: a fixed string is ours however it coincides with a patient's name
("none", "rule", "frame"), and a template's fixed parts likewise; the holes of
a template are still checked.  Words that come from configuration or a signed
model manifest (the de-identification method, model names, labels, findings)
join at run time through ``allow``; they are fixed before any study arrives.
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from pydicom.uid import UID

from agent import dicomraw

# -- why an instance was not processed (result: study.quarantined[].code) ----------

QUARANTINE: Mapping[str, str] = MappingProxyType({
    "burned-in-present":
        "burned-in annotation present (BurnedInAnnotation YES)",
    "burned-in-possible-modality":
        "burned-in annotation possible (modality US, SC, XC, OT, ES, GM or SM; "
        "BurnedInAnnotation not NO)",
    "burned-in-possible-secondary-capture":
        "burned-in annotation possible (Secondary Capture SOP class; BurnedInAnnotation not NO)",
    "burned-in-possible-derived":
        "burned-in annotation possible (ImageType DERIVED or SECONDARY; "
        "BurnedInAnnotation not NO)",
    "encapsulated-document":
        "encapsulated document: its content cannot be checked for identifiers",
    "pixel-clean-undecodable":
        "a pixel-clean rule matched but the pixels could not be decoded to clean them",
    "too-large":
        "larger than [study] max_process_instance_bytes: not processed",
    "inbox-unreadable":
        "unreadable inbox file: it failed authentication (damaged or tampered); not processed",
    "not-deidentifiable":
        "not a readable DICOM instance, or it could not be de-identified; not processed",
    "quarantined":
        "held back by de-identification; see 'edge-agent quarantine list' on the box",
})

# -- why a model gave no output (result: failures[].code) --------------------------

FAILURE: Mapping[str, str] = MappingProxyType({
    "pixels-undecodable":
        "the pixel data could not be decoded (no codec for its transfer syntax on the box, "
        "or damaged data)",
    "image-not-2d": "a decoded frame is not a 2-D image",
    "no-decodable-image": "no decodable image among the instances the model applies to",
    "output-mismatch": "the model's output does not match the labels of its manifest",
    "timeout": "inference took longer than [models] timeout_seconds",
    "runtime-error": "onnxruntime failed to run the model",
    "model-error": "the model failed; the box's log says why",
    "inference-failed": "the inference engine failed; the box's log says why",
    # A volume model's series that is not one evenly spaced stack (agent/infer/volume.py).
    "volume-geometry-missing":
        "a slice of the series lacks its position, orientation or size (or is multi-frame)",
    "volume-mixed-orientation": "the series mixes slice orientations",
    "volume-mixed-size": "the series mixes image sizes or pixel spacings",
    "volume-duplicate-slice": "two slices of the series lie at the same position",
    "volume-missing-slices": "slices are missing from the series (a gap in the stack)",
    "volume-uneven-spacing": "the slice spacing of the series is uneven",
})

# -- texts with numbers (review reasons, explanations) -----------------------------

REVIEW_BAND = "probability {p:.2f} is inside the review band [{low:.2f}, {high:.2f}]"
REVIEW_UNCERTAIN = "uncertainty {u:.3f} exceeds {limit:.3f}"
REVIEW_POSITIVE = "positive findings always need a clinician's review (manifest rule)"
NO_EXPLANATION = "This model does not provide explanations."
WHERE_IMAGE = "image {image:d}"
WHERE_FRAME = "image {image:d}, frame {frame:d}"
NO_REGION = ("No single region of {where} changed the {label} score noticeably "
             "(score {score:.2f}).")
REGION_ABOVE = ("Region that drove the {label} score: {where}, x={x:d} y={y:d} "
                "({w:d}x{h:d} px); hiding it lowers the score from {score:.2f} by {drop:.2f}.")
REGION_BELOW = ("Most suspicious region, below threshold, for the {label} score: {where}, "
                "x={x:d} y={y:d} ({w:d}x{h:d} px); hiding it lowers the score from "
                "{score:.2f} by {drop:.2f}.")
# A model-provided map (explanation method "cam") says where the model looked, not what
# hiding a region would do: its texts must not claim a score drop.
CAM_NO_REGION = ("No region of {where} stands out in the model's map for the {label} score "
                 "(score {score:.2f}).")
CAM_REGION_ABOVE = ("Region that drove the {label} score: {where}, x={x:d} y={y:d} "
                    "({w:d}x{h:d} px); the model's own map of the finding peaks there "
                    "(score {score:.2f}).")
CAM_REGION_BELOW = ("Most suspicious region, below threshold, for the {label} score: {where}, "
                    "x={x:d} y={y:d} ({w:d}x{h:d} px); the model's own map of the finding "
                    "peaks there (score {score:.2f}).")
TEMPLATES = (REVIEW_BAND, REVIEW_UNCERTAIN, WHERE_IMAGE, WHERE_FRAME, NO_REGION, REGION_ABOVE,
             REGION_BELOW, CAM_NO_REGION, CAM_REGION_ABOVE, CAM_REGION_BELOW)

# -- the words of the result message itself -----------------------------------------

STATUSES = ("ok", "no_applicable_model", "failed", "all_quarantined")
RESULT_KEYS = (
    "study", "ref", "patient_ref", "version", "instances_received", "instances_processed",
    "quarantined", "instance", "code", "reason", "status", "deidentification", "method",
    "options", "models", "failures", "model", "transfer_syntax", "latency_ms", "name",
    "sha256", "labels", "finding", "confidence", "uncertainty", "needs_review",
    "review_reasons", "explanation", "timings_ms", "instances_used", "frame",
    "sop_instance_uid", "image_size", "bbox", "score_drop", "text", "decode", "preprocess",
    "inference", "total", "delivered_to", "destination", "state", "objects", "confirmed",
    "slice", "slices", "mask", "pixels", "area_fraction",
)
# delivered_to[].state: where a result's objects are on their way into the PACS.
DELIVERY_STATES = ("queued", "confirmed", "dead-letter", "nothing-to-send")
EXPLANATION_METHODS = ("cam", "occlusion", "none")

_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_NUMERIC_SPECS = frozenset("bdeEfFgGn%")


def _compile(template: str) -> tuple[re.Pattern[str], tuple[bool, ...]]:
    """A format string -> a regex of its fixed parts; per hole, whether it is a number."""
    parts: list[str] = []
    numeric: list[bool] = []
    for literal, field, spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        is_num = bool(spec) and str(spec)[-1] in _NUMERIC_SPECS
        numeric.append(is_num)
        parts.append(f"({_NUMBER})" if is_num else "(.+?)")
    return re.compile("".join(parts), re.DOTALL), tuple(numeric)


_COMPILED = tuple(_compile(t) for t in TEMPLATES)
# The fixed start of every template: a text that starts with none of them is no
# template's instance, found with one C-level startswith instead of a regex each.
_STARTS = tuple(str(next(iter(string.Formatter().parse(t)))[0]) for t in TEMPLATES)


def _standard_uid_words() -> frozenset[str]:
    """Keywords of the UIDs the DICOM standard defines (transfer syntaxes, SOP classes)."""
    return frozenset(UID(uid).keyword for uid in dicomraw.standard_uids() if UID(uid).keyword)


_FIXED = frozenset({
    *QUARANTINE, *QUARANTINE.values(), *FAILURE, *FAILURE.values(), REVIEW_POSITIVE,
    NO_EXPLANATION, *STATUSES, *RESULT_KEYS, *EXPLANATION_METHODS, *DELIVERY_STATES,
}) | _standard_uid_words()
_allowed: set[str] = set()
_allowed_lock = threading.Lock()
_generation = 0  # bumped by every ``allow``: what the guard remembered about a text is stale


def allow(words: Iterable[str]) -> None:
    """Add words fixed by configuration or a signed model manifest (never study data)."""
    global _generation
    with _allowed_lock:
        _allowed.update(w for w in words if w)
        _generation += 1


def generation() -> int:
    """Changes whenever ``is_fixed`` may answer differently for some text."""
    return _generation


def is_standard_uid(text: str) -> bool:
    """Whether ``text`` is a UID the DICOM standard itself defines: public, never PHI."""
    return text in dicomraw.standard_uids()


def is_fixed(text: str) -> bool:
    """Whether ``text`` is exactly one of the box's own words."""
    if text in _FIXED:
        return True
    with _allowed_lock:
        return text in _allowed


def holes(text: str) -> list[tuple[str, bool]] | None:
    """The holes of the template ``text`` was made from, as (text, is_number); None when
    ``text`` is not an instance of any template."""
    if all(_STARTS) and not text.startswith(_STARTS):
        return None
    for pattern, numeric in _COMPILED:
        m = pattern.fullmatch(text)
        if m is not None:
            return list(zip(m.groups(), numeric, strict=True))
    return None


def transfer_syntax_keyword(uid: object) -> str:
    """The standard keyword of a transfer syntax UID ('RLELossless'); '' when not standard.

    A result names a transfer syntax by keyword: the keyword set is closed and public,
    while a raw UID string from an instance is whatever the sender put there.
    """
    u = UID(str(uid))
    if u not in dicomraw.standard_uids():
        return ""
    return u.keyword if dicomraw.standard_uids()[u][1] == "Transfer Syntax" else ""
