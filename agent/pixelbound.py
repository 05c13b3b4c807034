"""What decoding an instance's pixels may allocate, bounded before any decoder runs.

Decoders (pydicom's native, RLE and JPEG handlers) allocate their output from
the pixel description: Rows x Columns x Samples per Pixel x Bits Allocated / 8
per frame, times Number of Frames.  Those values are the sender's; a few hundred
bytes of RLE or JPEG 2000 may declare a gigabyte.  So:

* the receive node refuses an instance whose declared decoded size exceeds the
  processing bound, and an RLE data set that declares more than its bytes can
  decode to (an RLE segment expands at most 64-fold: a two-byte replicate run
  yields 128 bytes, PS3.5 G.3.1), before acknowledging it;
* every decoder call is preceded by ``check``: the declared size of what is
  about to be decoded against the process-wide ``limit`` (set at start from
  ``[study] max_process_instance_bytes``).
"""

from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# PS3.5 G.3.1: PackBits, at most 128 output bytes per two input bytes.
RLE_MAX_EXPANSION = 64
# The default of [study] max_process_instance_bytes; ``configure`` sets the daemon's.
_limit = 2 * 1024**3


class PixelBoundError(ValueError):
    """Decoding would allocate more than allowed (raised before it does)."""


def configure(limit: int) -> None:
    """Set the process-wide decode bound (at start, from the configuration)."""
    global _limit
    _limit = int(limit)


def limit() -> int:
    return _limit


def geometry_bytes(rows: int, cols: int, samples: int, bits: int, frames: int) -> int:
    """Decoded size the pixel description promises (what a decoder allocates)."""
    n = rows * cols * max(1, samples) * math.ceil(max(1, bits) / 8) * max(1, frames)
    if n < 0:
        raise ValueError("negative pixel geometry")
    return n


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return default
    return int(value)


def declared_bytes(ds: Dataset, frames: int | None = None) -> int:
    """Declared decoded size of ``frames`` frames (all of them by default); 0 without
    a pixel description."""
    if "Rows" not in ds or "Columns" not in ds:
        return 0
    n = _int(ds, "NumberOfFrames", 1) if frames is None else frames
    return geometry_bytes(_int(ds, "Rows", 0), _int(ds, "Columns", 0),
                          _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 8), n)


def rle_possible(declared: int, encoded: int) -> bool:
    """Can ``encoded`` bytes of RLE Lossless data decode to ``declared`` bytes?"""
    return declared <= RLE_MAX_EXPANSION * max(0, encoded)


def check(ds: Dataset, *, frames: int | None = None, what: str = "pixel data") -> None:
    """Raise PixelBoundError if decoding ``frames`` frames of ``ds`` (all by
    default) would allocate more than the bound, or cannot be what RLE data says."""
    try:
        declared = declared_bytes(ds, frames)
    except (TypeError, ValueError) as exc:
        raise PixelBoundError(f"{what}: unusable pixel description ({exc})") from None
    if declared > _limit:
        raise PixelBoundError(
            f"{what}: decoding would allocate {declared / 2**20:.0f} MiB, over the "
            f"{_limit / 2**20:.0f} MiB bound ([study] max_process_instance_bytes)")
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    elem = ds.get(0x7FE00010) if ts == RLE_LOSSLESS and frames is None else None
    if elem is not None:
        encoded = len(elem.value) if elem.value is not None else 0
        if not rle_possible(declared, encoded):
            raise PixelBoundError(
                f"{what}: {encoded} bytes of RLE data cannot decode to the "
                f"{declared} bytes its pixel description declares")
