"""Writing de-identified instances: pydicom's bytes, without pydicom's per-element cost.

``save(ds, path)`` writes exactly the bytes of
``ds.save_as(path, enforce_file_format=True)`` (pydicom 3.0), which it falls back
to for anything outside its fast path.  The fast path covers the little-endian
transfer syntaxes (implicit and explicit VR, native and encapsulated pixel data,
not deflated) and does for each element what pydicom's ``write_data_element``
does, minus the per-element buffer and stream overhead:

* a raw element (read from the source, or one of the engine's pre-encoded
  replacements) is written verbatim with its tag, VR and length - exactly what
  pydicom does when the dataset's encoding and character set match the output's
  (otherwise that whole dataset goes through pydicom's converting writer);
* a sequence is written item by item, each item with its defined length (or
  undefined, with delimiters, when the item or sequence says so), recursively;
* a bytes-valued OB/OW element (Pixel Data after pydicom's own conversion) is
  written with its even-length padding;
* any other element, and any element pydicom would treat specially (a value too
  long for a 16-bit length, undefined length outside a sequence, a missing VR),
  is encoded by pydicom's own ``write_data_element``.

The file meta group is built as ``dcmwrite`` builds it (the same conversions of
SOP Class/Instance UID and Pixel Data, ``validate_file_meta``) and written by
pydicom's ``write_file_meta_info``, which computes the group length.
tests/deid/test_writer.py checks the bytes against ``save_as`` on every sample.
"""

from __future__ import annotations

import copy
import os
import re
import struct
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from agent import dicomraw

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_BYTES_VRS = frozenset({"OB", "OW"})
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_tag_le = struct.Struct("<HH").pack
_short_header = struct.Struct("<HH2sH").pack  # explicit VR, 16-bit length
_long_header = struct.Struct("<HH2s2xL").pack  # explicit VR, 32-bit length
_implicit_header = struct.Struct("<HHL").pack
_ul_le = struct.Struct("<L").pack
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
_META_FROM_DATASET = (
    ("MediaStorageSOPClassUID", "SOPClassUID"),
    ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
)
_TAGS = {
    "MediaStorageSOPClassUID": BaseTag(0x00020002),
    "SOPClassUID": BaseTag(0x00080016),
    "MediaStorageSOPInstanceUID": BaseTag(0x00020003),
    "SOPInstanceUID": BaseTag(0x00080018),
}
_GROUP_LENGTH = BaseTag(0x00020000)
_META_VERSION = BaseTag(0x00020001)
# What validate_file_meta(enforce_standard=True) adds when missing or requires.
_META_REQUIRED = tuple(BaseTag(t) for t in (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013))


def instance_uid(ds: Dataset) -> str:
    """str(ds.SOPInstanceUID) without converting the element (so it is written verbatim)."""
    uid = _canonical_uid(dicomraw.raw(ds, _TAGS["SOPInstanceUID"]))
    return uid if uid is not None else str(ds.SOPInstanceUID)


def save(ds: Dataset, path: str | os.PathLike[str]) -> None:
    """``ds.save_as(path, enforce_file_format=True)``, byte for byte, faster."""
    parts = _encode(ds)
    if parts is None:
        ds.save_as(path, enforce_file_format=True)
        return
    with open(path, "wb") as f:
        f.writelines(parts)


def encode(ds: Dataset) -> bytes | None:
    """The DICOM file ``save_as(enforce_file_format=True)`` would write, or None when
    the dataset is outside the fast path (the caller then uses pydicom)."""
    parts = _encode(ds)
    return None if parts is None else b"".join(parts)


def _encode(ds: Dataset) -> list[bytes] | None:
    src_meta = getattr(ds, "file_meta", None)
    if src_meta is None or any(tag >> 16 in (0, 2) for tag in dicomraw.elements(ds)):
        return None
    tsyntax = src_meta.get("TransferSyntaxUID", None)
    if (
        not isinstance(tsyntax, UID)
        or tsyntax.is_private
        or not tsyntax.is_transfer_syntax
        or not tsyntax.is_little_endian
        or tsyntax == DeflatedExplicitVRLittleEndian
        or ds.original_encoding[1] is False  # save_as refuses the endian conversion
    ):
        return None
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        return None  # pydicom raises; let it
    implicit = bool(tsyntax.is_implicit_VR)

    # dcmwrite's file meta, on a copy (it deep-copies; elements are not shared mutably).
    meta = FileMetaDataset()
    for tag, elem in dicomraw.elements(src_meta).items():
        dicomraw.elements(meta)[tag] = elem if isinstance(elem, RawDataElement) else copy.copy(elem)
    meta_implicit, meta_little = src_meta.original_encoding
    meta.set_original_encoding(meta_implicit, meta_little, src_meta.original_character_set)
    for meta_keyword, ds_keyword in _META_FROM_DATASET:
        # dcmwrite: the meta's SOP Class/Instance UID follows the dataset's.  It
        # converts both elements first, which changes no byte of canonical raw UIDs.
        meta_uid = _canonical_uid(dicomraw.raw(meta, _TAGS[meta_keyword]))
        ds_uid = _canonical_uid(dicomraw.raw(ds, _TAGS[ds_keyword]))
        if meta_uid is not None and ds_uid is not None:
            if ds_uid != meta_uid:
                setattr(meta, meta_keyword, ds_uid)
            continue
        meta_value = meta.get(meta_keyword, None)
        ds_value = ds.get(ds_keyword, None)
        if meta_value is None or (ds_value and ds_value != meta_value):
            setattr(meta, meta_keyword, ds_value)
    if not _meta_complete(meta):
        validate_file_meta(meta, enforce_standard=True)  # adds what is missing, or raises
    if "PixelData" in ds:
        ds["PixelData"].is_undefined_length = tsyntax.is_compressed

    parts: list[bytes] = [preamble or b"\x00" * 128, b"DICM"]
    group_length = dicomraw.raw(meta, _GROUP_LENGTH)
    if group_length is not None and group_length.VR != "UL":
        # pydicom rewrites it in place assuming 12 bytes: leave that to pydicom.
        head = _buffer(False)
        write_file_meta_info(head, meta, enforce_standard=True)
        parts.append(head.getvalue())
    else:
        # write_file_meta_info: (0002,0000) UL = the length of the rest of the group.
        dicomraw.elements(meta).pop(_GROUP_LENGTH, None)
        group: list[bytes] = []
        _dataset(group, meta, False, default_encoding)
        parts.append(_short_header(0x0002, 0x0000, b"UL", 4) + _ul_le(sum(map(len, group))))
        parts.extend(group)
    _dataset(parts, ds, implicit, default_encoding)
    return parts


def _canonical_uid(elem: DataElement | RawDataElement | None) -> str | None:
    """The value of a raw, single, valid UID that is stored exactly as pydicom would
    write it after converting it (no padding but one trailing NUL to an even length),
    so converting it first, as dcmwrite does, would not change a byte; else None."""
    if not isinstance(elem, RawDataElement) or elem.VR not in (None, "UI"):
        return None
    raw = elem.value
    if type(raw) is not bytes or not raw.isascii():
        return None
    value = raw.decode("ascii").rstrip("\x00 ")
    if len(value) > 64 or not _UID_PATTERN.match(value):
        return None
    if (value + "\x00" if len(value) & 1 else value).encode("ascii") != raw:
        return None
    return value


def _meta_complete(meta: FileMetaDataset) -> bool:
    """True when validate_file_meta(meta, True) would neither add nor raise anything:
    only group 2, and every element it requires present with a value."""
    if any(tag >> 16 != 0x0002 for tag in dicomraw.elements(meta)):
        return False
    for tag in _META_REQUIRED:
        elem = dicomraw.raw(meta, tag)
        if elem is None:
            return False
        value = elem.value
        if isinstance(elem, RawDataElement):
            # A raw value with a byte other than padding has at least one value.
            if type(value) is not bytes or not value.strip(b"\x00 " if tag != _META_VERSION else b""):
                return False
        elif elem.is_empty:
            return False
    return True


def _dataset(parts: list[bytes], ds: Dataset, implicit: bool, parent_encoding: Any) -> None:
    """pydicom's ``write_dataset`` for a little-endian output, appending to ``parts``."""
    if (implicit, True) != ds.original_encoding or ds.original_character_set != dicomraw.character_set(ds):
        # pydicom re-encodes every element of such a dataset: let it.
        parts.append(_pydicom_dataset(ds, implicit, parent_encoding))
        return
    encodings = ds.get("SpecificCharacterSet", parent_encoding)
    get_item = ds.get_item
    for tag in sorted(dicomraw.elements(ds)):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written
        elem = get_item(tag)
        if isinstance(elem, RawDataElement):
            if _raw(parts, elem, implicit):
                continue
        elif elem.VR == "SQ":
            _sequence(parts, elem, implicit, encodings)
            continue
        elif elem.VR in _BYTES_VRS and type(elem.value) is bytes and not elem.is_undefined_length:
            value = elem.value
            pad = b"\x00" if len(value) & 1 else b""
            length = len(value) + len(pad)
            if implicit:
                parts.append(_implicit_header(tag >> 16, tag & 0xFFFF, length))
            else:
                parts.append(_long_header(tag >> 16, tag & 0xFFFF, elem.VR.encode(), length))
            parts.append(value)
            if pad:
                parts.append(pad)
            continue
        parts.append(_pydicom_element(elem, implicit, encodings))


def _raw(parts: list[bytes], elem: RawDataElement, implicit: bool) -> bool:
    """Append a raw element as pydicom writes it; False when it needs pydicom's path."""
    value = elem.value
    if type(value) is not bytes:
        return False
    tag = int(elem.tag)
    undefined = elem.length == _UNDEFINED
    if undefined and tag == _PIXEL_DATA:
        return False  # pydicom checks the encapsulation first
    if implicit:
        parts.append(_implicit_header(tag >> 16, tag & 0xFFFF, _UNDEFINED if undefined else len(value)))
    else:
        vr = elem.VR
        if vr is None or len(vr) != 2:
            return False
        if vr in _LONG_VRS:
            parts.append(_long_header(tag >> 16, tag & 0xFFFF, vr.encode(), _UNDEFINED if undefined else len(value)))
        elif undefined or len(value) > 0xFFFF:
            return False  # pydicom's VR-to-UN rewrite or its 16-bit undefined length
        else:
            parts.append(_short_header(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
    parts.append(value)
    if undefined:
        parts.append(_SEQ_DELIMITER)
    return True


def _sequence(parts: list[bytes], elem: DataElement, implicit: bool, encodings: Any) -> None:
    tag = int(elem.tag)
    body: list[bytes] = []
    if not elem.is_empty:
        item_encodings = convert_encodings(encodings or [default_encoding])
        for item in elem.value:
            content: list[bytes] = []
            _dataset(content, item, implicit, item_encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                body.append(_ITEM_TAG + _ul_le(_UNDEFINED))
                body.extend(content)
                body.append(_ITEM_DELIMITER)
            else:
                body.append(_ITEM_TAG + _ul_le(sum(map(len, content))))
                body.extend(content)
    undefined = elem.is_undefined_length
    length = _UNDEFINED if undefined else sum(map(len, body))
    if implicit:
        parts.append(_implicit_header(tag >> 16, tag & 0xFFFF, length))
    else:
        parts.append(_long_header(tag >> 16, tag & 0xFFFF, b"SQ", length))
    parts.extend(body)
    if undefined:
        parts.append(_SEQ_DELIMITER)


def _buffer(implicit: bool) -> DicomBytesIO:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    return buf


def _pydicom_element(elem: DataElement | RawDataElement, implicit: bool, encodings: Any) -> bytes:
    buf = _buffer(implicit)
    write_data_element(buf, elem, encodings)
    return buf.getvalue()


def _pydicom_dataset(ds: Dataset, implicit: bool, parent_encoding: Any) -> bytes:
    from pydicom.filewriter import write_dataset

    buf = _buffer(implicit)
    write_dataset(buf, ds, parent_encoding)
    return buf.getvalue()
