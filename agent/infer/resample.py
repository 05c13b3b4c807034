"""Resample a sorted stack of slices to a model's grid, one slice in memory at a time.

The grid is ``depth`` x rows x cols (``input.depth`` and ``preprocessing.resize``
of the manifest).  The volume at the model's resolution is allocated once; the
source slices are decoded in order along the normal, each is brought in plane
to rows x cols (agent/infer/preprocess.py: box average, then bilinear) and
added, weighted, into the one or few grid slices it contributes to, and is then
dropped.  A 600-slice 512x512 series therefore never exists at full resolution
in memory: the working set is the grid plus one decoded slice
(docs/benchmarks.md measures it).

Along the normal the samples follow the same convention as in plane: grid slice
k sits at source index ``(k + 0.5) * n / depth - 0.5``.  Its value is a
tent-weighted mean of the source slices around it, with the tent as wide as
one grid step (at least one source step): upsampling is plain linear
interpolation between the two nearest slices, and downsampling averages every
slice it passes over instead of picking two and skipping the rest (a small
nodule between two picked slices would vanish otherwise).  The spacing was
checked to be even (agent/infer/volume.py), so source index and position along
the normal are the same axis.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from agent.infer.preprocess import FloatArray, resize


@lru_cache(maxsize=16)
def depth_weights(n: int, depth: int) -> npt.NDArray[np.float32]:
    """(depth, n) weights: row k says how much each source slice adds to grid slice k;
    every row sums to 1."""
    if n < 1 or depth < 1:
        raise ValueError("need at least one source and one grid slice")
    centres = (np.arange(depth, dtype=np.float64) + 0.5) * (n / depth) - 0.5
    centres = np.clip(centres, 0.0, n - 1.0)
    half = max(1.0, n / depth)  # the tent's half-width in source slices
    dist = np.abs(np.arange(n, dtype=np.float64)[None, :] - centres[:, None])
    w = np.clip(1.0 - dist / half, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.flags.writeable = False  # shared between calls
    return out


def source_index(k: int, n: int, depth: int) -> int:
    """The source slice nearest to grid slice ``k`` (for saying where a finding is)."""
    return int(min(n - 1, max(0, round((k + 0.5) * (n / depth) - 0.5))))


def assemble(n: int, depth: int, shape: tuple[int, int],
             load: Callable[[int], FloatArray]) -> FloatArray:
    """The (depth, rows, cols) grid from ``n`` sorted source slices; ``load(i)`` returns
    slice i (any size) and is called once per slice that contributes, in order."""
    weights = depth_weights(n, depth)
    volume = np.zeros((depth, *shape), dtype=np.float32)
    for i in range(n):
        targets = np.flatnonzero(weights[:, i])
        if not len(targets):
            continue  # cannot happen with a tent at least one step wide; cheap to skip
        plane = resize(load(i), shape)
        for k in targets:
            volume[k] += weights[k, i] * plane
    return volume
