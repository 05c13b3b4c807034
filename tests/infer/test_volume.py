"""Volume assembly: slices sorted along their normal whatever their order, spacing checked
with a reason code, and resampling that puts a planted blob where it physically is."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom.dataset import Dataset

from agent.errors import ModelError
from agent.infer.resample import assemble, depth_weights, source_index
from agent.infer.volume import plan_volume, series_groups

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal along y: z does not order these
TILTED = (1.0, 0.0, 0.0, 0.0, float(np.cos(0.35)), float(np.sin(0.35)))


def stack(n: int, spacing: float, iop: tuple[float, ...] = AXIAL,
          gaps: list[float] | None = None) -> list[Dataset]:
    """Header-only slices along the normal of ``iop``; InstanceNumber runs backwards."""
    normal = np.cross(iop[:3], iop[3:])
    steps = gaps if gaps is not None else [spacing] * (n - 1)
    where = np.concatenate([[0.0], np.cumsum(steps)])
    out = []
    for k, d in enumerate(where):
        ds = Dataset()
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [float(v) for v in np.array([-100.0, -80.0, 40.0])
                                   + normal * d]
        ds.Rows = ds.Columns = 16
        ds.PixelSpacing = [0.7, 0.7]
        ds.InstanceNumber = len(where) - k
        ds.SeriesInstanceUID = "2.25.1"
        out.append(ds)
    return out


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, TILTED], ids=["axial", "coronal", "tilted"])
def test_shuffled_slices_are_sorted_along_the_normal(iop: tuple[float, ...]) -> None:
    slices = stack(40, 2.5, iop)
    truth = {id(ds): k for k, ds in enumerate(slices)}
    shuffled = slices[:]
    random.Random(7).shuffle(shuffled)
    plan = plan_volume(shuffled, 0.1)
    assert [truth[id(shuffled[i])] for i in plan.order] == list(range(40))
    assert plan.spacing == pytest.approx(2.5, abs=1e-3)
    assert np.allclose(np.diff(plan.positions), 2.5, atol=1e-3)


@pytest.mark.parametrize(("gaps", "code"), [
    ([2.5] * 10 + [5.0] + [2.5] * 8, "volume-missing-slices"),
    ([2.5, 3.2, 1.9] * 6 + [2.5], "volume-uneven-spacing"),
    ([2.5] * 9 + [0.0] + [2.5] * 9, "volume-duplicate-slice"),
], ids=["missing", "uneven", "duplicate"])
def test_uneven_or_missing_spacing_is_refused_with_a_reason(gaps: list[float],
                                                            code: str) -> None:
    slices = stack(20, 2.5, gaps=gaps)
    random.Random(3).shuffle(slices)
    with pytest.raises(ModelError) as info:
        plan_volume(slices, 0.1)
    assert info.value.code == code


def test_small_jitter_within_tolerance_is_accepted() -> None:
    gaps = [2.5 + (0.1 if k % 2 else -0.1) for k in range(19)]  # 4 %: scanners round
    assert plan_volume(stack(20, 2.5, gaps=gaps), 0.1).slices == 20


def test_mixed_orientation_size_and_missing_geometry_are_refused() -> None:
    mixed = stack(10, 2.0) + stack(10, 2.0, TILTED)[5:]
    with pytest.raises(ModelError) as info:
        plan_volume(mixed, 0.1)
    assert info.value.code == "volume-mixed-orientation"

    sizes = stack(10, 2.0)
    sizes[4].Rows = 32
    with pytest.raises(ModelError) as info:
        plan_volume(sizes, 0.1)
    assert info.value.code == "volume-mixed-size"

    bare = stack(10, 2.0)
    del bare[6].ImagePositionPatient
    with pytest.raises(ModelError) as info:
        plan_volume(bare, 0.1)
    assert info.value.code == "volume-geometry-missing"


def test_the_largest_series_is_the_volume() -> None:
    a, b = stack(5, 2.0), stack(12, 2.0)
    for ds in b:
        ds.SeriesInstanceUID = "2.25.2"
    items = list(enumerate(a + b))
    assert [ds.SeriesInstanceUID for _, ds in series_groups(items)[0]] == ["2.25.2"] * 12


def test_depth_weights_interpolate_up_and_average_down() -> None:
    for n, depth in ((10, 32), (32, 32), (600, 32), (7, 3)):
        w = depth_weights(n, depth)
        assert w.shape == (depth, n)
        assert np.allclose(w.sum(axis=1), 1.0)
        assert (w.sum(axis=0) > 0).all(), "every source slice contributes"
    # A ramp along the normal stays a ramp (linear in the interior, up or down).
    for n, depth in ((20, 64), (300, 30)):
        ramp = np.arange(n, dtype=np.float64)
        centres = (np.arange(depth) + 0.5) * n / depth - 0.5
        inner = (centres > n / depth) & (centres < n - 1 - n / depth)
        assert np.allclose((depth_weights(n, depth) @ ramp)[inner], centres[inner], atol=1e-3)


@pytest.mark.parametrize(("n", "size"), [(20, 96), (300, 64), (90, 128)])
def test_a_planted_blob_lands_where_it_is_after_resampling(n: int, size: int) -> None:
    """A sphere at a known place in a stack of n slices of size x size ends up at the
    same relative place of the 32x48x48 grid, and nothing else lights up."""
    depth, grid = 32, (48, 48)
    rng = np.random.default_rng(n)
    centre = np.array([0.3 * n, 0.62 * size, 0.27 * size])  # slice, row, col
    radius = max(3.0, 0.08 * size)
    zz = np.arange(n)[:, None, None] * (size / n)  # isotropic-ish: same mm per unit
    yy, xx = np.mgrid[0:size, 0:size]
    calls: list[int] = []

    def load(i: int) -> np.ndarray:
        calls.append(i)
        d2 = ((zz[i] - centre[0] * size / n) ** 2 + (yy - centre[1]) ** 2
              + (xx - centre[2]) ** 2)
        return (d2 <= radius**2).astype(np.float32) + rng.normal(0, 0.01, (size, size)).astype(
            np.float32)

    vol = assemble(n, depth, grid, load)
    assert calls == list(range(n)), "each slice decoded once, in order"
    assert vol.shape == (depth, *grid)
    hot = np.argwhere(vol > 0.5 * vol.max())
    weights = vol[tuple(hot.T)]
    found = (hot * weights[:, None]).sum(axis=0) / weights.sum()  # the blob's centroid
    expected = (centre + 0.5) / np.array([n, size, size]) * np.array([depth, *grid]) - 0.5
    assert np.abs(found - expected).max() <= 0.75, (found, expected)
    far = vol.copy()
    k, r, c = (int(round(v)) for v in found)
    far[max(0, k - 4):k + 5, max(0, r - 8):r + 9, max(0, c - 8):c + 9] = 0
    assert far.max() < 0.2 * vol.max()


def test_source_index_names_the_nearest_slice() -> None:
    assert source_index(0, 64, 32) == 0
    assert source_index(31, 96, 32) == 94
    assert source_index(16, 300, 32) == 154  # (16 + 0.5) * 300 / 32 - 0.5 = 154.2


def test_the_input_section_is_checked_with_clear_errors() -> None:
    from agent.infer.manifest import parse_manifest
    from tests.helpers.infer import DEMO

    text = (DEMO / "manifest.toml").read_text()
    assert parse_manifest(text.encode()).input.kind == "image"  # absent: one image per run
    bad = text + '\n[input]\nkind = "volume"\ndepth = 1\nspacing = 2.0\n'
    bad = bad.replace('method = "entropy"', 'method = "tta_flip"')
    with pytest.raises(ModelError) as info:
        parse_manifest(bad.encode())
    message = str(info.value)
    for expected in ("input.depth must be 2..1024", "input.spacing is not a known key",
                     "'tta_flip' is not available for volume models"):
        assert expected in message, message
    ok = parse_manifest((text + '\n[input]\nkind = "volume"\ndepth = 16\n').encode())
    assert (ok.input.kind, ok.input.depth, ok.input.spacing_tolerance) == ("volume", 16, 0.1)
