"""DIMSE command sets without pydicom's general writer.

Every C-STORE costs pynetdicom two encodings of the response command set with
pydicom's ``write_dataset`` (once to compute CommandGroupLength, once to send),
about a tenth of the CPU a 0.5 MB CT instance takes to receive.  A command set
is a handful of group 0000 elements in Implicit VR Little Endian (PS3.7 6.3.1),
so ``encode`` is replaced, for exactly that case, by a direct encoding that
gives the same bytes; anything else (data sets, other encodings, a VR or value
this does not handle) still goes to pynetdicom's encoder.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_TEXT_PAD = {"UI": b"\0", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" "}

_real_encode: Callable[..., bytes | None] = getattr(dimse_messages, "encode")  # noqa: B009
_lock = threading.Lock()


def encode_command_set(ds: Dataset) -> bytes | None:
    """The Implicit VR Little Endian bytes of a command set; None if not handled here."""
    out = []
    for elem in ds:
        tag = int(elem.tag)
        if tag >> 16:
            return None  # not a command set element
        value = elem.value
        vr = elem.VR
        try:
            if value is None or value == "":
                raw = b""
            elif vr == "US" and type(value) is int:
                raw = _US.pack(value)
            elif vr == "UL" and type(value) is int:
                raw = _UL.pack(value)
            elif vr in _TEXT_PAD and isinstance(value, str):
                raw = value.encode("ascii")
                if len(raw) % 2:
                    raw += _TEXT_PAD[vr]
            else:
                return None
        except (struct.error, UnicodeEncodeError):
            return None
        out.append(_ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(raw)) + raw)
    return b"".join(out)


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    if is_implicit_vr and is_little_endian and not deflated:
        fast = encode_command_set(ds)
        if fast is not None:
            return fast
    return _real_encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Use the direct encoding for pynetdicom's command sets (process wide, idempotent)."""
    with _lock:
        setattr(dimse_messages, "encode", _encode)  # noqa: B010
