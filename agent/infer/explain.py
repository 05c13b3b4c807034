"""Which region of the top image drove the positive score: two ways to a box.

* Model-provided map (``cam``): the model computes a class activation map or
  saliency tensor inside its graph, in the same run as its scores, so the
  explanation costs no extra forward pass.  The map is stretched to the model
  input (bilinear) and measured against its median (the level of plain
  background); the box is the connected region around the peak that stays
  above a fraction of the peak's height.
* Occlusion needs only forward passes (no gradients), so it works for any ONNX
  model, at the price of one pass per patch.  Every patch position is scored
  in batches; a pixel's saliency is the mean score drop of the patches
  covering it, and the box is the connected region around the peak where
  saliency stays above a fraction of the peak.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

Scorer = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]

_BATCH = 256
# A reused batch buffer saves the page faults of a fresh multi-MB array on every
# explanation (~0.5 ms of a 30 ms one for the demo model); big inputs are not kept.
_KEEP_BYTES = 16 * 1024**2
_workspace = threading.local()


@dataclass(frozen=True)
class Saliency:
    bbox: tuple[int, int, int, int] | None  # x, y, w, h in model-input pixels
    peak_drop: float  # occlusion: largest score drop caused by hiding one patch (cam: 0)
    peak: tuple[int, int] | None = None  # x, y of the saliency peak, model-input pixels


def _positions(size: int, patch: int, stride: int) -> list[int]:
    last = max(0, size - patch)
    pos = list(range(0, last + 1, stride))
    if pos[-1] != last:
        pos.append(last)  # cover the far edge too
    return pos


@lru_cache(maxsize=8)
def _layout(rows: int, cols: int, patch: int,
            stride: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64],
                                  npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Patch masks and coverage, computed once per input geometry.

    fy[i, r] = 1 where patch row-position i covers image row r (fx likewise), so
    a patch mask is an outer product and the saliency map two matrix products.
    """
    masks, fy, fx, cover, _, _ = _geometry(rows, cols, patch, stride)
    return masks, fy, fx, cover


@lru_cache(maxsize=8)
def _geometry(rows: int, cols: int, patch: int, stride: int) -> tuple[
        npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.float64],
        npt.NDArray[np.float64], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """_layout plus, for every hidden pixel, (patch number, flat pixel index): filling
    by index touches only the hidden pixels instead of reading every mask pixel."""
    ys, xs = _positions(rows, patch, stride), _positions(cols, patch, stride)
    cover_y = np.zeros((len(ys), rows), dtype=bool)
    for i, y in enumerate(ys):
        cover_y[i, y : y + patch] = True
    cover_x = np.zeros((len(xs), cols), dtype=bool)
    for j, x in enumerate(xs):
        cover_x[j, x : x + patch] = True
    masks = (cover_y[:, None, :, None] & cover_x[None, :, None, :]).reshape(-1, 1, rows, cols)
    fy, fx = cover_y.astype(np.float64), cover_x.astype(np.float64)
    cover = np.maximum(fy.T @ np.ones((len(ys), len(xs))) @ fx, 1.0)
    which, flat = np.nonzero(masks.reshape(len(masks), rows * cols))
    for arr in (masks, fy, fx, cover, which, flat):
        arr.flags.writeable = False  # shared between calls
    return masks, fy, fx, cover, which, flat


@lru_cache(maxsize=8)
def _hidden(rows: int, cols: int, patch: int, stride: int, channels: int,
            batch: int) -> tuple[tuple[npt.NDArray[np.intp], ...], ...]:
    """Per batch of ``batch`` patches and per channel, the flat index into that batch's
    (n, C, H, W) array of every hidden pixel: one flat index per pixel is ~3x faster
    to scatter into than an index pair, and nothing is selected per call."""
    masks, _, _, _, which, flat = _geometry(rows, cols, patch, stride)
    out = []
    for start in range(0, len(masks), batch):
        # which is ascending (np.nonzero order): this batch's pixels are one slice.
        lo, hi = np.searchsorted(which, [start, start + batch])
        per_channel = []
        for c in range(channels):
            index = ((which[lo:hi] - start) * channels + c) * (rows * cols) + flat[lo:hi]
            index.flags.writeable = False  # shared between calls
            per_channel.append(index)
        out.append(tuple(per_channel))
    return tuple(out)


def _batch(n: int, tensor: npt.NDArray[np.float32], capacity: int) -> npt.NDArray[np.float32]:
    """An (n, C, H, W) float32 array holding ``tensor`` n times: the first n images of a
    buffer of ``capacity`` images reused per thread, so a study's last, shorter batch
    (and the next study) write into memory the previous batch just warmed."""
    kept: npt.NDArray[np.float32] | None = getattr(_workspace, "batch", None)
    if kept is None or kept.shape[1:] != tensor.shape or len(kept) < n:
        kept = np.empty((max(n, capacity), *tensor.shape), dtype=np.float32)
        if kept.nbytes <= _KEEP_BYTES:
            _workspace.batch = kept
    view = kept[:n]  # leading-axis slice: still C-contiguous
    view[:] = tensor
    return view


def occlusion(score: Scorer, tensor: npt.NDArray[np.float32], base: float, *, patch: int,
              stride: int, keep_fraction: float, min_drop: float = 0.02,
              batch_size: int = _BATCH) -> Saliency:
    """``batch_size`` patches go to ``score`` per call: the engine passes its onnxruntime
    run batch, so each call is exactly one run on one reused buffer."""
    channels, rows, cols = tensor.shape
    fill = tensor.mean(axis=(1, 2))  # neutral grey of this image, per channel
    step = max(1, batch_size)
    masks, fy, fx, cover, _, _ = _geometry(rows, cols, patch, stride)
    drops = np.empty(len(masks), dtype=np.float64)
    hidden = _hidden(rows, cols, patch, stride, channels, step)
    for k, start in enumerate(range(0, len(masks), step)):
        n = min(step, len(masks) - start)
        batch = _batch(n, tensor, min(step, len(masks)))
        values = batch.reshape(-1)  # a view: the batch is C-contiguous
        for c in range(channels):
            values[hidden[k][c]] = fill[c]
        drops[start : start + n] = base - score(batch)
    grid = np.maximum(drops, 0.0).reshape(fy.shape[0], fx.shape[0])
    sal = (fy.T @ grid @ fx) / cover
    peak = float(sal.max())
    # Below min_drop no region matters: drawing a box there would mislead.
    if peak <= 1e-6 or float(drops.max()) < min_drop:
        return Saliency(None, float(drops.max(initial=0.0)))
    return _region(sal, peak, keep_fraction, float(drops.max()))


def _region(sal: npt.NDArray[np.float64], peak: float, keep_fraction: float,
            peak_drop: float) -> Saliency:
    """The box of the connected region around the peak of ``sal`` above the cut."""
    seed = np.unravel_index(int(sal.argmax()), sal.shape)
    region = _component(sal >= keep_fraction * peak, seed)
    rows_hit = np.flatnonzero(region.any(axis=1))
    cols_hit = np.flatnonzero(region.any(axis=0))
    by, bx = int(rows_hit[0]), int(cols_hit[0])
    return Saliency((bx, by, int(cols_hit[-1]) - bx + 1, int(rows_hit[-1]) - by + 1),
                    peak_drop, (int(seed[1]), int(seed[0])))


@lru_cache(maxsize=16)
def _stretch(size: int, to: int) -> npt.NDArray[np.float64]:
    """(to, size) bilinear weights, half-pixel centres (map cell i covers input pixels
    i*to/size .. (i+1)*to/size), edges clamped; built once per geometry."""
    pos = np.clip((np.arange(to) + 0.5) * size / to - 0.5, 0.0, size - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    frac = pos - lo
    weights = np.zeros((to, size))
    weights[np.arange(to), lo] += 1.0 - frac
    weights[np.arange(to), hi] += frac
    weights.flags.writeable = False  # shared between calls
    return weights


def stretch_weights(size: int, to: int) -> npt.NDArray[np.float64]:
    """(to, size) bilinear weights of a map axis of ``size`` cells stretched to ``to``
    pixels (read-only, shared): how a map is laid over the image it was computed on."""
    return _stretch(size, to)


def cam_region(cam: npt.NDArray[np.float32], input_shape: tuple[int, int], *,
               keep_fraction: float) -> Saliency:
    """Box around the peak of a model-provided map ``cam`` (h, w), in model-input pixels.

    The map's median is taken as its background level: maps in logit units have
    no natural zero, and the median stays on background as long as the hot
    spot covers less than half the map.  A flat map (nothing above its median)
    has no region.
    """
    rows, cols = input_shape
    m = np.asarray(cam, dtype=np.float64)
    if not np.isfinite(m).all():
        return Saliency(None, 0.0)
    up = _stretch(m.shape[0], rows) @ m @ _stretch(m.shape[1], cols).T
    sal = up - float(np.median(m))
    peak = float(sal.max())
    if peak <= 1e-6:
        return Saliency(None, 0.0)
    return _region(sal, peak, keep_fraction, 0.0)


def _component(mask: npt.NDArray[np.bool_], seed: tuple[np.intp, ...]) -> npt.NDArray[np.bool_]:
    """The 4-connected region of ``mask`` around ``seed`` (a second, separate
    hot spot gets its own box in a later version, not a merged giant one).

    Grows along whole row runs, then whole column runs, until nothing changes: a
    blob takes a handful of rounds instead of one round per pixel of its width.
    """
    region = np.zeros_like(mask)
    region[seed] = True
    while True:
        grown = _spread_runs(_spread_runs(region, mask).T, mask.T).T
        if np.array_equal(grown, region):
            return region
        region = grown


def _spread_runs(region: npt.NDArray[np.bool_],
                 mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Every horizontal run of ``mask`` that touches ``region``, plus ``region``."""
    starts = mask.copy()
    starts[:, 1:] &= ~mask[:, :-1]  # a run starts where the pixel to its left is off
    ids = np.cumsum(starts.ravel()).reshape(mask.shape) * mask  # 0: not in mask
    hit = np.zeros(int(ids.max()) + 1, dtype=bool)
    hit[ids[region]] = True
    hit[0] = False
    return hit[ids] | region


def to_image_box(box: tuple[int, int, int, int], input_shape: tuple[int, int],
                 image_shape: tuple[int, int]) -> list[int]:
    """Model-input box -> box on the de-identified image (the resize is a plain stretch)."""
    x, y, w, h = box
    sy, sx = image_shape[0] / input_shape[0], image_shape[1] / input_shape[1]
    x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
    x1 = min(image_shape[1], int(np.ceil((x + w) * sx)))
    y1 = min(image_shape[0], int(np.ceil((y + h) * sy)))
    return [x0, y0, x1 - x0, y1 - y0]
