"""One series as a volume: which slices, in which order, how far apart.

A volume model sees a series, not images.  The slices arrive in any order (the
modality sends them as it likes; InstanceNumber is not geometry), so they are
sorted by where they are: ImagePositionPatient projected on the slice normal,
the cross product of the row and column directions of ImageOrientationPatient.
Before any pixel is decoded the geometry is checked, and a series that is not
one evenly spaced stack is refused with a reason code (never a crash, never a
silently stretched volume):

* ``volume-geometry-missing``: a slice lacks position, orientation or size
  (or is multi-frame: enhanced objects keep per-frame positions elsewhere);
* ``volume-mixed-orientation``: the slices are not parallel (a scout, or two
  stacks in one series);
* ``volume-mixed-size``: rows, columns or pixel spacing differ between slices;
* ``volume-duplicate-slice``: two slices at the same position;
* ``volume-missing-slices``: a gap of about twice the usual spacing or more;
* ``volume-uneven-spacing``: gaps that differ from the median gap by more than
  the manifest's ``input.spacing_tolerance``.

Geometry is read here, on the engine side, like the routing rules: the model
itself receives only the resampled voxels.  This module reads headers only; the
pixels are decoded one slice at a time by agent/infer/resample.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from agent.errors import ModelError
from agent.infer.pixels import frame_count

# Direction cosines of two slices this close (per component) are the same orientation:
# scanners write IOP with 6 decimal digits, and rounding must not split a stack.
_ORIENTATION_TOLERANCE = 1e-3
# A gap this many times the median means slices are missing, not jitter.
_MISSING_FACTOR = 1.5


class VolumeError(ModelError):
    """A series that cannot be assembled into a volume; ``code`` says why."""


@dataclass(frozen=True)
class SliceGeometry:
    position: tuple[float, float, float]  # ImagePositionPatient (mm)
    orientation: tuple[float, ...]  # ImageOrientationPatient: row then column cosines
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # row spacing, column spacing (mm); (0, 0) unknown


@dataclass(frozen=True)
class VolumePlan:
    """A checked stack: ``order[k]`` is the index (into the series' instances) of the k-th
    slice along the normal, at ``positions[k]`` mm on it."""

    order: tuple[int, ...]
    positions: tuple[float, ...]
    spacing: float  # median gap between neighbouring slices (mm)
    normal: tuple[float, float, float]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]

    @property
    def slices(self) -> int:
        return len(self.order)


def _numbers(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def read_geometry(ds: Dataset) -> SliceGeometry | None:
    """The slice's geometry, or None when something a stack needs is missing."""
    position = _numbers(ds, "ImagePositionPatient", 3)
    orientation = _numbers(ds, "ImageOrientationPatient", 6)
    if position is None or orientation is None or frame_count(ds) != 1:
        return None
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        return None
    if rows <= 0 or cols <= 0:
        return None
    spacing = _numbers(ds, "PixelSpacing", 2) or (0.0, 0.0)
    return SliceGeometry((position[0], position[1], position[2]), orientation, rows, cols,
                         (spacing[0], spacing[1]))


def slice_normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise VolumeError("ImageOrientationPatient has parallel row and column directions",
                          code="volume-geometry-missing")
    return normal / length  # type: ignore[no-any-return]


def series_groups(instances: Sequence[tuple[int, Dataset]]) -> list[list[tuple[int, Dataset]]]:
    """The instances split by SeriesInstanceUID (the de-identified, keyed UID), largest
    series first; equal sizes keep the order of first appearance."""
    groups: dict[str, list[tuple[int, Dataset]]] = {}
    for item in instances:
        groups.setdefault(str(item[1].get("SeriesInstanceUID", "")), []).append(item)
    return sorted(groups.values(), key=len, reverse=True)


def plan_volume(datasets: Sequence[Dataset], tolerance: float) -> VolumePlan:
    """Sort the series' slices along their normal and check that they form one evenly
    spaced stack; raises VolumeError with the reason code otherwise."""
    geoms: list[SliceGeometry] = []
    for k, ds in enumerate(datasets):
        g = read_geometry(ds)
        if g is None:
            raise VolumeError(f"slice {k + 1} of {len(datasets)} has no usable "
                              "ImagePositionPatient / ImageOrientationPatient / Rows / Columns "
                              "(or is multi-frame)", code="volume-geometry-missing")
        geoms.append(g)
    if len(geoms) < 2:
        raise VolumeError("a volume needs at least 2 slices", code="volume-geometry-missing")
    first = geoms[0]
    iop = np.asarray([g.orientation for g in geoms])
    if float(np.abs(iop - iop[0]).max()) > _ORIENTATION_TOLERANCE:
        raise VolumeError("the series mixes slice orientations (ImageOrientationPatient)",
                          code="volume-mixed-orientation")
    if any((g.rows, g.cols) != (first.rows, first.cols) for g in geoms) or any(
            not np.allclose(g.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4)
            for g in geoms):
        raise VolumeError("the series mixes image sizes or pixel spacings",
                          code="volume-mixed-size")
    normal = slice_normal(first.orientation)
    where = np.asarray([g.position for g in geoms]) @ normal
    order = np.argsort(where, kind="stable")
    positions = where[order]
    gaps = np.diff(positions)
    spacing = float(np.median(gaps))
    if float(gaps.min()) <= max(1e-3, 1e-3 * abs(spacing)):
        raise VolumeError("two slices of the series lie at the same position",
                          code="volume-duplicate-slice")
    worst = float(np.abs(gaps - spacing).max()) / spacing
    if worst > tolerance:
        if float(gaps.max()) >= _MISSING_FACTOR * spacing:
            raise VolumeError(f"slices are missing: a gap of {float(gaps.max()):.2f} mm where "
                              f"the series' spacing is {spacing:.2f} mm",
                              code="volume-missing-slices")
        raise VolumeError(f"uneven slice spacing: gaps from {float(gaps.min()):.2f} to "
                          f"{float(gaps.max()):.2f} mm (median {spacing:.2f} mm, tolerance "
                          f"{100 * tolerance:.0f} %)", code="volume-uneven-spacing")
    return VolumePlan(order=tuple(int(i) for i in order),
                      positions=tuple(float(p) for p in positions), spacing=spacing,
                      normal=(float(normal[0]), float(normal[1]), float(normal[2])),
                      rows=first.rows, cols=first.cols, pixel_spacing=first.pixel_spacing)
