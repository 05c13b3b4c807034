"""Occlusion saliency: which region of the top image drove the positive score.

Occlusion needs only forward passes (no gradients), so it works for any ONNX
model.  Every patch position is scored in batches; a pixel's saliency is the
mean score drop of the patches covering it, and the box is the connected
region around the peak where saliency stays above a fraction of the peak.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Scorer = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]

_BATCH = 256


@dataclass(frozen=True)
class Saliency:
    bbox: tuple[int, int, int, int] | None  # x, y, w, h in model-input pixels
    peak_drop: float  # largest score drop caused by hiding one patch


def _positions(size: int, patch: int, stride: int) -> list[int]:
    last = max(0, size - patch)
    pos = list(range(0, last + 1, stride))
    if pos[-1] != last:
        pos.append(last)  # cover the far edge too
    return pos


def occlusion(score: Scorer, tensor: npt.NDArray[np.float32], base: float, *, patch: int,
              stride: int, keep_fraction: float, min_drop: float = 0.02) -> Saliency:
    _, rows, cols = tensor.shape
    fill = tensor.mean(axis=(1, 2), keepdims=True)  # neutral grey of this image
    boxes = [(y, x) for y in _positions(rows, patch, stride) for x in _positions(cols, patch, stride)]
    drops = np.empty(len(boxes), dtype=np.float64)
    for start in range(0, len(boxes), _BATCH):
        chunk = boxes[start : start + _BATCH]
        batch = np.repeat(tensor[None], len(chunk), axis=0)
        for k, (y, x) in enumerate(chunk):
            batch[k, :, y : y + patch, x : x + patch] = fill
        drops[start : start + len(chunk)] = base - score(batch)
    total = np.zeros((rows, cols), dtype=np.float64)
    cover = np.zeros((rows, cols), dtype=np.float64)
    for (y, x), d in zip(boxes, drops, strict=True):
        total[y : y + patch, x : x + patch] += max(d, 0.0)
        cover[y : y + patch, x : x + patch] += 1.0
    sal = total / np.maximum(cover, 1.0)
    peak = float(sal.max())
    # Below min_drop no region matters: drawing a box there would mislead.
    if peak <= 1e-6 or float(drops.max()) < min_drop:
        return Saliency(None, float(drops.max(initial=0.0)))
    mask = sal >= keep_fraction * peak
    y0, x0 = np.unravel_index(int(sal.argmax()), sal.shape)
    seen = np.zeros_like(mask)
    seen[y0, x0] = True
    queue = deque([(int(y0), int(x0))])
    ys, xs = [int(y0)], [int(x0)]
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < rows and 0 <= nx < cols and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
                ys.append(ny)
                xs.append(nx)
    bx, by = min(xs), min(ys)
    return Saliency((bx, by, max(xs) - bx + 1, max(ys) - by + 1), float(drops.max()))


def to_image_box(box: tuple[int, int, int, int], input_shape: tuple[int, int],
                 image_shape: tuple[int, int]) -> list[int]:
    """Model-input box -> box on the de-identified image (the resize is a plain stretch)."""
    x, y, w, h = box
    sy, sx = image_shape[0] / input_shape[0], image_shape[1] / input_shape[1]
    x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
    x1 = min(image_shape[1], int(np.ceil((x + w) * sx)))
    y1 = min(image_shape[0], int(np.ceil((y + h) * sy)))
    return [x0, y0, x1 - x0, y1 - y0]
