"""Burned-in annotation: decide quarantine, or black out known text regions.

Ultrasound, secondary capture, photographs, endoscopy and derived/secondary
images often carry the patient's name in the pixels, where no header rule can
reach it.  Such instances are quarantined unless BurnedInAnnotation says NO,
or a configured pixel-clean rule for that exact device and image size lets us
black the text regions out.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from agent import dicomraw, pixelbound
from agent.deid.settings import PixelCleanRule
from agent.uplink.vocabulary import QUARANTINE

RISKY_MODALITIES = frozenset({"US", "SC", "XC", "OT", "ES", "GM", "SM"})
_SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
_ENCAPSULATED_DOC_ROOT = "1.2.840.10008.5.1.4.1.1.104."
RULE_TEXT = (
    "An instance is quarantined when BurnedInAnnotation is YES, or when it is an image "
    "of modality US, SC, XC, OT, ES, GM or SM, a Secondary Capture SOP class, or has "
    "ImageType DERIVED or SECONDARY, and BurnedInAnnotation is not NO; unless a pixel-clean "
    "rule matches its Manufacturer, Manufacturer's Model Name, Rows and Columns and the "
    "pixels decode: then the rule's rectangles are blacked out in every frame, "
    "BurnedInAnnotation becomes NO and Clean Pixel Data (113101) is claimed."
)


# The attributes read here, with their VRs: all plain ASCII code strings or UIDs.
_PEEKED = {"BurnedInAnnotation": "CS", "ImageType": "CS", "Modality": "CS", "SOPClassUID": "UI"}
_PEEK_TAGS = {keyword: BaseTag(tag_for_keyword(keyword) or 0) for keyword in _PEEKED}


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` without converting a raw element in place.

    For a raw, non-empty ASCII CS or UI value this gives what pydicom's conversion
    gives (trailing spaces/NULs removed, one str or a MultiValue split at backslashes); the
    element stays raw, so the de-identified copy can be written verbatim.  Anything
    else is left to pydicom.
    """
    vr = _PEEKED.get(keyword)
    if vr is not None:
        elem = dicomraw.raw(ds, _PEEK_TAGS[keyword])
        if elem is None:
            return default
        if isinstance(elem, RawDataElement) and elem.VR in (None, vr):
            raw = elem.value
            if type(raw) is bytes and raw and raw.isascii():
                items = raw.decode("ascii").rstrip(" \x00").split("\\")
                if len(items) == 1:
                    return items[0]
                if vr == "CS":  # the same type pydicom gives a multi-valued CS
                    return MultiValue(str, items)
    return ds.get(keyword, default)


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword, "")
    if isinstance(value, list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value or "").strip()


def is_encapsulated_document(ds: Dataset) -> bool:
    return str(_get(ds, "SOPClassUID", "")).startswith(_ENCAPSULATED_DOC_ROOT)


def risk_code(ds: Dataset) -> str | None:
    """The rule (agent/uplink/vocabulary.py QUARANTINE code) by which the pixels may carry text,
    or None when there is no reason to think so.

    The reason names the rule, never a value read from the instance: a modality that
    puts the patient's name into BurnedInAnnotation or ImageType must not see it quoted
    in a reason that leaves the box.
    """
    if is_encapsulated_document(ds):
        return "encapsulated-document"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    burned = _text(ds, "BurnedInAnnotation").upper()
    if burned == "YES":
        return "burned-in-present"
    if burned == "NO":
        return None
    if _text(ds, "Modality").upper() in RISKY_MODALITIES:
        return "burned-in-possible-modality"
    if str(_get(ds, "SOPClassUID", "")).startswith(_SECONDARY_CAPTURE_ROOT):
        return "burned-in-possible-secondary-capture"
    image_type = [str(v).upper() for v in (_get(ds, "ImageType") or [])]
    if "DERIVED" in image_type[:1] or "SECONDARY" in image_type[1:2]:
        return "burned-in-possible-derived"
    return None


def burned_in_risk(ds: Dataset) -> str | None:
    """Why the pixels may carry text (the rule's fixed description), or None."""
    code = risk_code(ds)
    return None if code is None else QUARANTINE[code]


def reason_code(reason: str) -> str:
    """The rule code of a de-identification quarantine reason (see ``burned_in_risk``).

    Reasons built from the fixed descriptions map back to their code; anything else
    (a reason this module does not know) is the generic "quarantined", so what a
    result publishes stays within the fixed vocabulary whatever text is passed in.
    """
    for code, text in QUARANTINE.items():
        if reason == text:
            return code
        if reason.startswith(text) and "not decodable" in reason:
            return "pixel-clean-undecodable"
    return "quarantined"


def matching_rule(ds: Dataset, rules: tuple[PixelCleanRule, ...]) -> PixelCleanRule | None:
    if not rules:
        return None
    manufacturer = _text(ds, "Manufacturer")
    model = _text(ds, "ManufacturerModelName")
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    for rule in rules:
        if rule.matches(manufacturer, model, rows, cols):
            return rule
    return None


def black_out(ds: Dataset, rule: PixelCleanRule) -> None:
    """Black out the rule's rectangles in every frame of ``ds`` (a de-identified copy).

    Raises whatever the pixel handlers raise when the data cannot be decoded; the
    caller turns that into a quarantine reason.
    """
    pixelbound.check(ds, what="pixel cleaning")  # before the decoder allocates
    arr = ds.pixel_array.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    black = 0
    if photometric == "MONOCHROME1":  # in MONOCHROME1 the highest value is black
        black = (1 << int(ds.BitsStored)) - 1
    for x, y, w, h in rule.rectangles:
        if frames > 1:
            arr[:, y : y + h, x : x + w, ...] = black
        else:
            arr[y : y + h, x : x + w, ...] = black
    if photometric.startswith("YBR") and int(ds.get("SamplesPerPixel", 1)) == 3:
        photometric = "RGB"  # pydicom converted the decoded pixels to RGB
    # generate_instance_uid=False: the keyed SOP Instance UID must stay consistent.
    ds.set_pixel_data(arr, photometric, int(ds.BitsStored), generate_instance_uid=False)
    ds.BurnedInAnnotation = "NO"
