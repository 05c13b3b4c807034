"""A model's mask output back on the source image's grid.

A mask model (``[mask]`` in its manifest) outputs a per-pixel probability map at its
input grid.  The preprocessing stretched the image to that grid (agent/infer/
preprocess.py), so the inverse is a bilinear stretch of the map back to the source
rows x columns (half-pixel centres, as the explanation map is drawn), thresholded
at the manifest's ``mask.threshold``.  The result is bit-packed and compressed
(``agent.types.SegMask``): it stays on the box, in the encrypted result link, and
becomes a DICOM SEG in the original study (agent/results/seg.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.errors import ModelError
from agent.infer.explain import stretch_weights
from agent.infer.manifest import Manifest

# Source rows upsampled at a time: bounds the float32 working set to this many rows of
# the source image whatever its size.
_BLOCK_ROWS = 256


def mask_channel(manifest: Manifest, shape: tuple[int, ...]) -> int | None:
    """Which channel of a mask output of this shape (first axis: images) holds the
    segment's map: None for (N, h, w), 0 for (N, 1, h, w).  Anything else is a
    ModelError naming the output and the shapes it may have."""
    name = manifest.mask.output_name if manifest.mask else "?"
    if len(shape) == 3 and min(shape[1:]) >= 1:
        return None
    if len(shape) == 4 and shape[1] == 1 and min(shape[2:]) >= 1:
        return 0
    raise ModelError(
        f"mask output {name!r} has shape {list(shape)}; expected [N, H, W] or "
        f"[N, 1, H, W] (one probability map per image)", code="output-mismatch",
        hint="export the mask with one of these shapes, or remove [mask] from the manifest")


def to_source(prob: npt.NDArray[np.float32], shape: tuple[int, int],
              threshold: float) -> npt.NDArray[np.bool_]:
    """The (h, w) probability map stretched to ``shape`` (rows, cols) and thresholded."""
    m = np.asarray(prob, dtype=np.float32)
    if m.ndim != 2 or not np.isfinite(m).all():
        raise ModelError(f"mask of shape {list(m.shape)} is not a finite 2-D map",
                         code="output-mismatch")
    rows, cols = shape
    across = (m @ stretch_weights(m.shape[1], cols).T.astype(np.float32))  # (h, cols)
    down = stretch_weights(m.shape[0], rows).astype(np.float32)  # (rows, h)
    out = np.empty((rows, cols), dtype=bool)
    for start in range(0, rows, _BLOCK_ROWS):
        block = down[start : start + _BLOCK_ROWS] @ across
        out[start : start + _BLOCK_ROWS] = block >= np.float32(threshold)
    return out
