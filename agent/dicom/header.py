"""The few header elements the node needs from the first bytes of a data set.

Owns: ``parse_header`` (StudyInstanceUID, SOP class, declared pixel size), its
hand-written fast path for the common little-endian case and the pydicom
reference it falls back to.  May import pydicom, agent.pixelbound and
agent.dicom.status; nothing else of the node.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from agent import pixelbound
from agent.dicom.status import STATUS_CANNOT_UNDERSTAND, Refused

_STOP_AFTER = 0x00280100


@dataclass(frozen=True)
class Header:
    study_uid: str
    sop_class: str | None
    declared_pixel_bytes: int
    series_uid: str = ""  # "" when absent; only its keyed hash is kept (series trigger)


def parse_header(prefix: bytes | memoryview, tsyntax: str, *, complete: bool) -> Header | None:
    """Read the few header elements we need from the first bytes of a data set.

    Returns None when ``prefix`` ends before them and more data may follow.
    Pixel data is never read; reading stops at (0028,0100).
    """
    if tsyntax != _BIG_ENDIAN:
        fast = _fast_header(memoryview(prefix), implicit=tsyntax == _IMPLICIT)
        if fast is not None:
            return fast
    return pydicom_header(prefix, tsyntax, complete=complete)


def pydicom_header(prefix: bytes | memoryview, tsyntax: str, *, complete: bool) -> Header | None:
    """``parse_header`` by pydicom alone: every case, the reference for the fast path."""
    ts = UID(tsyntax)
    stopped = False

    def stop(tag: BaseTag, _vr: str | None, _length: int) -> bool:
        nonlocal stopped
        if tag > _STOP_AFTER:
            stopped = True
            return True
        return False

    try:
        ds = read_dataset(io.BytesIO(prefix), ts.is_implicit_VR, ts.is_little_endian,
                          stop_when=stop)
        if not stopped and not complete:
            return None
        study = ds.get(0x0020000D)
        study_uid = str(study.value).strip() if study is not None and study.value else ""
        sop = ds.get(0x00080016)
        sop_class = str(sop.value).strip() if sop is not None and sop.value else None
        series = ds.get(0x0020000E)
        series_uid = str(series.value).strip() if series is not None and series.value else ""
        declared = _declared_pixel_bytes(ds)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad input
        if not complete and not stopped:
            return None
        raise Refused(STATUS_CANNOT_UNDERSTAND,
                      f"malformed data set ({type(exc).__name__})") from None
    if not study_uid or len(study_uid) > 64:
        if not stopped and not complete:
            return None
        raise Refused(STATUS_CANNOT_UNDERSTAND, "data set has no valid StudyInstanceUID")
    return Header(study_uid, sop_class, declared, series_uid)


# -- the common case without pydicom ----------------------------------------------------
#
# Almost every instance is little endian with the header elements at defined
# lengths; walking them by hand costs a fraction of building a pydicom Dataset.
# Anything unusual (undefined lengths before (0028,0100), a VR other than the one
# expected, several values, non-ASCII, a short buffer, a missing or bad study UID)
# returns None and pydicom decides, so both paths give the same answer (a
# hypothesis test compares them).

_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"))
_WANTED = {0x00080016: b"UI", 0x0020000D: b"UI", 0x0020000E: b"UI", 0x00280002: b"US", 0x00280008: b"IS",
           0x00280010: b"US", 0x00280011: b"US", 0x00280100: b"US"}
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from


def _fast_header(buf: memoryview, *, implicit: bool) -> Header | None:
    found: dict[int, bytes] = {}
    pos, n = 0, len(buf)
    # pydicom switches to explicit VR when an "implicit" data set's first element
    # looks explicit (two capital letters after the tag): leave that case to it.
    if implicit and n >= 6 and 0x40 < buf[4] < 0x5B and 0x40 < buf[5] < 0x5B:
        return None
    while True:
        if pos + 8 > n:
            return None  # ran out before (0028,0100): let pydicom say what it is
        group, elem = _UNPACK_TAG(buf, pos)
        tag = group << 16 | elem
        if tag > _STOP_AFTER:
            break
        if implicit:
            (length,) = _UNPACK_U32(buf, pos + 4)
            start = pos + 8
            vr = _WANTED.get(tag)
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    return None
                (length,) = _UNPACK_U32(buf, pos + 8)
                start = pos + 12
            elif vr in _SHORT_VRS:
                (length,) = _UNPACK_U16(buf, pos + 6)
                start = pos + 8
            else:
                return None
        if length == 0xFFFFFFFF:
            return None
        if tag in _WANTED:
            if vr != _WANTED[tag] or start + length > n:
                return None
            found[tag] = bytes(buf[start:start + length])
        elif tag == 0x00080005:
            if start + length > n or not _charset_ok(bytes(buf[start:start + length]), vr,
                                                     implicit):
                return None
        pos = start + length
    study = _text(found.get(0x0020000D))
    sop = _text(found.get(0x00080016))
    series = _text(found.get(0x0020000E))
    if (not study or len(study) > 64 or (0x00080016 in found and sop is None)
            or series is None):
        return None
    try:
        rows, cols = _us(found, 0x00280010), _us(found, 0x00280011)
        spp, bits = _us(found, 0x00280002), _us(found, 0x00280100)
        frames_text = _text(found.get(0x00280008)) if 0x00280008 in found else ""
    except ValueError:
        return None
    if frames_text is None or (frames_text and not frames_text.lstrip("+-").isdigit()):
        return None
    if rows is None or cols is None:
        declared = 0
    else:
        frames = int(frames_text) if frames_text else 1
        declared = pixelbound.geometry_bytes(rows, cols, spp or 1, bits or 8, frames)
    return Header(study, sop or None, declared, series)


def _charset_ok(raw: bytes, vr: bytes | None, implicit: bool) -> bool:
    """pydicom converts (0008,0005) while reading the header and may fail on it:
    run the same conversion, and let pydicom decide if it fails."""
    try:
        elem = RawDataElement(BaseTag(0x00080005), None if implicit or vr is None else vr.decode(),
                              len(raw), raw, 0, implicit, True)
        convert_encodings(convert_raw_data_element(elem).value)
    except Exception:  # noqa: BLE001 - whatever pydicom raises, it decides
        return False
    return True


def _text(raw: bytes | None) -> str | None:
    """A single ASCII value as pydicom would read it; None when pydicom must decide."""
    if raw is None:
        return ""
    if b"\\" in raw or not raw.isascii():
        return None
    return raw.decode("ascii").rstrip("\0 ").strip()


def _us(found: dict[int, bytes], tag: int) -> int | None:
    raw = found.get(tag)
    if raw is None or raw == b"":
        return None
    if len(raw) != 2:
        raise ValueError("not a single US value")
    return int(_UNPACK_U16(raw, 0)[0])


def _declared_pixel_bytes(ds: Dataset) -> int:
    """Decoded size the pixel description promises (what a decoder will allocate)."""
    rows, cols = ds.get(0x00280010), ds.get(0x00280011)
    if rows is None or cols is None or rows.value is None or cols.value is None:
        return 0
    spp = ds.get(0x00280002)
    bits = ds.get(0x00280100)
    frames = ds.get(0x00280008)
    n_frames = int(frames.value) if frames is not None and frames.value not in (None, "") else 1
    return pixelbound.geometry_bytes(
        int(rows.value), int(cols.value), int(spp.value if spp is not None and spp.value else 1),
        int(bits.value if bits is not None and bits.value else 8), n_frames)

