"""Turn stored pixel values plus a few technical attributes into a model tensor.

This module is numpy-only and never sees a pydicom Dataset: the decoder hands it
an ``ImageInput`` (pixels plus the attributes the manifest asked for), which is
how "minimum necessary" is enforced.  The training script imports these same
functions, so the model is trained on exactly what the runtime feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.infer.manifest import Preprocessing

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ImageInput:
    """One 2-D image (a single frame) on its way to a model."""

    pixels: npt.NDArray[Any]  # stored values (rows, cols), grayscale
    attrs: dict[str, Any] = field(default_factory=dict)  # manifest-requested attributes only
    instance: int = 0  # index of the instance in the de-identified study
    frame: int = 0


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def modality_values(img: ImageInput, pre: Preprocessing) -> FloatArray:
    """A new float32 array of modality values; the caller may change it in place.

    Every step from here to the unit image works in this one buffer: fresh
    full-resolution temporaries per step cost page faults and push the model's
    weights out of the CPU caches just before its run (measured: ~8 % slower
    runs after a cache-flushing preprocessing step).
    """
    arr = img.pixels.astype(np.float32, copy=True)
    if pre.rescale:
        slope = _first_number(img.attrs.get("RescaleSlope"))
        intercept = _first_number(img.attrs.get("RescaleIntercept"))
        if slope is not None and slope != 1.0:
            arr *= np.float32(slope)
        if intercept:
            arr += np.float32(intercept)
    return arr


def _linear(arr: FloatArray, low: float, high: float) -> FloatArray:
    """Window ``arr`` to 0..1, in place (same float32 operations as out of place)."""
    if high <= low:
        arr[...] = 0.0
        return arr
    arr -= np.float32(low)
    arr /= np.float32(high - low)
    return np.clip(arr, 0.0, 1.0, out=arr)


def to_unit(img: ImageInput, pre: Preprocessing) -> FloatArray:
    """Modality values -> display intensities in 0..1 (VOI, then MONOCHROME1 inversion)."""
    arr = modality_values(img, pre)
    modality = str(img.attrs.get("Modality", ""))
    low = high = None
    # "window": the manifest's fixed window for this modality, else as "dataset";
    # "dataset": the image's own window, else percentiles.
    if pre.voi == "window" and modality in pre.windows:
        center, width = pre.windows[modality]
        low, high = center - width / 2.0, center + width / 2.0
    elif pre.voi in ("window", "dataset"):
        center_v = _first_number(img.attrs.get("WindowCenter"))
        width_v = _first_number(img.attrs.get("WindowWidth"))
        if center_v is not None and width_v is not None and width_v > 0:
            low, high = center_v - width_v / 2.0, center_v + width_v / 2.0
    if low is None or high is None:
        # Percentiles, not min/max: a few hot pixels or burned-in markers must not
        # squash the anatomy into a narrow grey band.
        lo_p, hi_p = np.percentile(arr, pre.percentile)
        low, high = float(lo_p), float(hi_p)
    unit = _linear(arr, low, high)
    if pre.invert_monochrome1 and img.attrs.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(np.float32(1.0), unit, out=unit)
    return unit


@lru_cache(maxsize=16)
def _bilinear(h: int, w: int, rows: int, cols: int) -> tuple[npt.NDArray[Any], ...]:
    """Sample positions and weights of the bilinear step: geometry only, the same for
    every image of this size, so worked out once (identical arrays to computing them
    per image)."""
    ys = (np.arange(rows, dtype=np.float32) + 0.5) * (h / rows) - 0.5
    xs = (np.arange(cols, dtype=np.float32) + 0.5) * (w / cols) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    parts = (y0, x0, y1, x1, wy, 1 - wy, wx, 1 - wx)
    for arr in parts:
        arr.flags.writeable = False  # shared between calls
    return parts


def resize(arr: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Area-style downscale (box average to an integer factor, then bilinear)."""
    rows, cols = shape
    h, w = arr.shape
    fy, fx = max(1, h // rows), max(1, w // cols)
    if fy > 1 or fx > 1:
        # Averaging blocks first avoids the aliasing a plain bilinear
        # decimation would add (a small nodule could vanish between samples).
        # Strided sums: ~10x faster than reshape().mean() on these small images.
        hh, ww = (h // fy) * fy, (w // fx) * fx
        cols_sum = arr[:hh, 0:ww:fx].astype(np.float32, copy=True)
        for k in range(1, fx):
            cols_sum += arr[:hh, k:ww:fx]
        block = cols_sum[0::fy].copy()
        for k in range(1, fy):
            block += cols_sum[k::fy]
        block *= np.float32(1.0 / (fy * fx))  # in place: same float32 product
        arr = block
        h, w = arr.shape
    if (h, w) == (rows, cols):
        return arr.astype(np.float32, copy=False)
    y0, x0, y1, x1, wy, wy_c, wx, wx_c = _bilinear(h, w, rows, cols)
    upper, lower = arr[y0], arr[y1]
    top = upper[:, x0] * wx_c + upper[:, x1] * wx
    bottom = lower[:, x0] * wx_c + lower[:, x1] * wx
    return np.asarray(top * wy_c + bottom * wy, dtype=np.float32)


def to_tensor(unit: FloatArray, pre: Preprocessing) -> FloatArray:
    """Resized unit image -> (C, H, W) normalised tensor."""
    small = resize(unit, pre.resize)
    # A new C-ordered array (small may be the caller's unit, or Fortran-ordered after
    # the bilinear gathers).
    norm = np.subtract(small, np.float32(pre.mean), order="C")
    norm /= np.float32(pre.std)  # in place: same float32 quotient
    if pre.channels == 1:
        return norm[None, :, :]  # C-contiguous view, no copy
    return np.repeat(norm[None, :, :], pre.channels, axis=0)


def preprocess(img: ImageInput, pre: Preprocessing) -> tuple[FloatArray, FloatArray]:
    """Returns the model tensor (C, H, W) and the resized unit image (for drift)."""
    unit = to_unit(img, pre)
    tensor = to_tensor(unit, pre)
    small_unit = tensor[0] * np.float32(pre.std)
    small_unit += np.float32(pre.mean)  # in place: same float32 sum
    return tensor, small_unit
