"""Deterministic synthetic CT series for the volume demo model (numpy only).

A chest-like phantom in millimetres: body cylinder, two lungs that narrow
towards their apex and base, a spine, and vessel-like tubes running through
the lungs along the body axis.  Half the series carry a nodule: a sphere in a
lung, calcified (500-1000 HU, denser than the spine: a soft-tissue-dense
nodule among tube-shaped vessels, or a part-solid one, was too hard a task for
the few minutes of CPU training this demo may take).

Every series is a pure function of (seed, index).  ``series_slices`` yields the
stored slices one at a time (the generator never holds the series), and
``to_datasets`` writes them as CT Image Storage instances with the geometry a
scanner would write (ImagePositionPatient along the normal of an optionally
tilted ImageOrientationPatient).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FOV_MM = 320.0
INTERCEPT = -1024.0


@dataclass(frozen=True)
class Nodule:
    centre: tuple[float, float, float]  # x, y, z in mm (z along the normal from slice 0)
    radius: float
    density: float  # HU: calcified, denser than soft tissue and the spine


@dataclass(frozen=True)
class SeriesSpec:
    slices: int
    spacing: float  # mm between slices
    size: int  # rows = cols
    noise: float  # HU standard deviation
    scale: float  # patient size
    lung_top: float  # mm: where the lungs start along the normal
    lung_len: float
    vessels: tuple[tuple[float, float, float, float, float], ...]  # x, y, dx/dz, dy/dz, r
    nodule: Nodule | None


def make_spec(seed: int, index: int, *, slices: int | None = None,
              size: int = 128, lesion: bool | None = None) -> SeriesSpec:
    rng = np.random.default_rng([seed, index])
    n = slices if slices is not None else int(rng.integers(40, 121))
    extent = float(rng.uniform(200.0, 300.0))
    spacing = round(extent / n, 3)
    scale = float(rng.uniform(0.8, 1.05))
    total = spacing * (n - 1)
    lung_len = float(rng.uniform(0.6, 0.9)) * total
    lung_top = float(rng.uniform(0.02, 0.98 * total - lung_len)) if total > lung_len else 0.0
    vessels = []
    for _ in range(int(rng.integers(3, 7))):
        side = 1.0 if rng.random() < 0.5 else -1.0
        vessels.append((side * float(rng.uniform(35, 95)) * scale,
                        float(rng.uniform(-45, 35)) * scale,
                        float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15)),
                        float(rng.uniform(2.5, 5.0))))
    has = bool(rng.random() < 0.5) if lesion is None else lesion
    nodule = None
    if has:
        side = 1.0 if rng.random() < 0.5 else -1.0
        radius = float(rng.uniform(7.0, 11.0))
        z = float(rng.uniform(lung_top + 0.2 * lung_len, lung_top + 0.8 * lung_len))
        nodule = Nodule((side * float(rng.uniform(45, 85)) * scale,
                         float(rng.uniform(-35, 25)) * scale, z), radius,
                        float(rng.uniform(500.0, 1000.0)))
    return SeriesSpec(n, spacing, size, float(rng.uniform(10.0, 35.0)), scale, lung_top,
                      lung_len, tuple(vessels), nodule)


def series_slices(spec: SeriesSpec, seed: int, index: int) -> Iterator[npt.NDArray[np.uint16]]:
    """The stored values (HU - INTERCEPT) of each slice, in order along the normal."""
    rng = np.random.default_rng([seed, index, 7])
    px = FOV_MM / spec.size
    coords = (np.arange(spec.size) + 0.5) * px - FOV_MM / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    s = spec.scale
    body = (xx / (150 * s)) ** 2 + (yy / (110 * s)) ** 2 <= 1.0
    spine = (xx / 18) ** 2 + ((yy - 75 * s) / 18) ** 2 <= 1.0
    for k in range(spec.slices):
        z = k * spec.spacing
        hu = np.full(xx.shape, -1000.0)
        hu[body] = 40.0
        t = (z - spec.lung_top) / max(spec.lung_len, 1e-6)
        if 0.0 <= t <= 1.0:
            shrink = float(np.sqrt(max(0.0, 1.0 - (2 * t - 1) ** 2))) ** 0.5
            for side in (-1.0, 1.0):
                lung = (((xx - side * 65 * s) / (50 * s * shrink + 1e-6)) ** 2
                        + ((yy + 5 * s) / (75 * s * shrink + 1e-6)) ** 2) <= 1.0
                hu[lung] = -850.0
            for vx, vy, dx, dy, r in spec.vessels:
                cx, cy = vx + dx * (z - spec.lung_top), vy + dy * (z - spec.lung_top)
                hu[((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & body] = 30.0
        hu[spine] = 100.0
        if spec.nodule is not None:
            nx, ny, nz = spec.nodule.centre
            dz2 = spec.nodule.radius ** 2 - (z - nz) ** 2
            if dz2 > 0:
                hu[(xx - nx) ** 2 + (yy - ny) ** 2 <= dz2] = spec.nodule.density
        hu += rng.standard_normal(hu.shape) * spec.noise
        yield np.clip(hu - INTERCEPT, 0, 4095).astype(np.uint16)


ATTRS: dict[str, Any] = {"Modality": "CT", "RescaleSlope": 1.0, "RescaleIntercept": INTERCEPT,
                         "PhotometricInterpretation": "MONOCHROME2"}


def orientation(tilt_deg: float) -> tuple[float, ...]:
    """Axial ImageOrientationPatient tilted about the patient's x axis (gantry tilt)."""
    a = np.radians(tilt_deg)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))


def to_datasets(spec: SeriesSpec, seed: int, index: int, *, tilt_deg: float = 0.0,
                study_uid: str | None = None, series_uid: str | None = None,
                origin: tuple[float, float, float] = (-160.0, -160.0, -120.0)
                ) -> Iterator[Dataset]:
    """CT Image Storage instances of the series, in order along the normal (callers
    shuffle them as they like); InstanceNumber counts from the far end, so that only
    the geometry gives the true order."""
    iop = orientation(tilt_deg)
    normal = np.cross(iop[:3], iop[3:])
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    px = FOV_MM / spec.size
    for k, stored in enumerate(series_slices(spec, seed, index)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.PatientName = "Volume^Phantom"
        ds.PatientID = f"VOL-{seed}-{index}"
        ds.InstanceNumber = spec.slices - k
        ds.ImageOrientationPatient = [round(v, 6) for v in iop]
        pos = np.asarray(origin) + normal * (k * spec.spacing)
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.PixelSpacing = [px, px]
        ds.SliceThickness = spec.spacing
        ds.Rows = ds.Columns = spec.size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, int(INTERCEPT)
        ds.PixelData = stored.tobytes()
        yield ds
