"""Deterministic synthetic phantoms for the demo lesion model (numpy only).

Two image families, both with or without a planted round lesion:

* CT-slice-like chest phantoms in Hounsfield units (body ellipse, two lungs,
  spine, vessel-like distractors), stored as unsigned values with a rescale;
* radiograph-like chest phantoms (lung fields, mediastinum, rib arcs), stored
  as 12-bit detector values, MONOCHROME2 or MONOCHROME1 depending on scanner.

Subgroups the model card reports on: three simulated scanners (noise texture,
blur, intensity offset, storage conventions), two noise levels and three
patient sizes.  Every case is a pure function of (seed, index), so training,
the model card and the tests all see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

KINDS = ("ct", "radiograph")
SCANNERS = ("A", "B", "C")
NOISES = ("low", "high")
SIZES = ("small", "medium", "large")

CT_SHAPE = (128, 128)
RADIOGRAPH_SHAPE = (160, 192)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

_SCANNER = {
    # blur sigma (px), noise correlation sigma (px), CT HU offset, radiograph gain
    "A": (0.6, 0.0, 0.0, 1.00),
    "B": (1.1, 1.2, 20.0, 0.85),
    "C": (0.8, 0.7, -15.0, 1.15),
}
_SIZE_SCALE = {"small": 0.80, "medium": 0.92, "large": 1.04}
_SIZE_NOISE = {"small": 0.8, "medium": 1.0, "large": 1.4}


@dataclass(frozen=True)
class SynthCase:
    kind: str
    scanner: str
    noise: str
    size: str
    lesion: bool
    stored: npt.NDArray[Any]  # the values a DICOM file would store
    attrs: dict[str, Any]  # technical attributes a DICOM header would carry
    lesion_bbox: tuple[int, int, int, int] | None  # x, y, w, h in pixel coordinates
    # The planted lesion's pixels (CT: the disk at half coverage or more; radiograph:
    # within two sigma of the blob): the ground truth of the segmentation model.
    lesion_mask: npt.NDArray[np.bool_] | None = None


def _blur(img: npt.NDArray[np.float64], sigma: float) -> npt.NDArray[np.float64]:
    if sigma <= 0:
        return img
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.rfftfreq(img.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(img) * transfer, s=img.shape)


def _noise(rng: np.random.Generator, shape: tuple[int, int],
           corr: float) -> npt.NDArray[np.float64]:
    n = rng.standard_normal(shape)
    if corr > 0:
        # Correlated ("textured") noise as on scanners with smoother kernels;
        # renormalised so that only the texture, not the level, differs.
        n = _blur(n, corr)
        n /= n.std() + 1e-12
    return n


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float,
             rx: float) -> npt.NDArray[np.bool_]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return bool_arr(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)


def bool_arr(a: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    return np.asarray(a, dtype=bool)


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> npt.NDArray[np.float64]:
    """A disk with a one-pixel soft edge (partial volume)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.asarray(np.clip(r + 0.5 - d, 0.0, 1.0), dtype=np.float64)


def _point_in(rng: np.random.Generator, mask: npt.NDArray[np.bool_],
              margin: int) -> tuple[int, int]:
    inner = mask.copy()
    # Erode by shifting, so the whole lesion sits inside the lung field.
    for dy, dx in ((margin, 0), (-margin, 0), (0, margin), (0, -margin)):
        inner &= np.roll(mask, (dy, dx), axis=(0, 1))
    ys, xs = np.nonzero(inner if inner.any() else mask)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _ct(rng: np.random.Generator, scanner: str, noise: str, size: str, lesion: bool) -> SynthCase:
    shape = CT_SHAPE
    h, w = shape
    blur, corr, offset, _ = _SCANNER[scanner]
    s = _SIZE_SCALE[size] * rng.uniform(0.95, 1.05)
    cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    hu = np.full(shape, -1000.0)
    body = _ellipse(shape, cy, cx, 0.36 * h * s, 0.46 * w * s)
    hu[body] = 40.0
    fat = body & ~_ellipse(shape, cy, cx, 0.36 * h * s - 3, 0.46 * w * s - 3)
    hu[fat] = -90.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lung = _ellipse(shape, cy - 0.02 * h, cx + side * 0.2 * w * s, 0.26 * h * s, 0.15 * w * s)
        lungs |= lung
    hu[lungs] = -850.0 + rng.uniform(-30, 30)
    hu[_ellipse(shape, cy + 0.27 * h * s, cx, 0.06 * h * s, 0.06 * w * s)] = 700.0
    vessel_mask = lungs.copy()
    for _ in range(int(rng.integers(4, 9))):
        vy, vx = _point_in(rng, lungs, 2)
        disk = _disk(shape, vy, vx, rng.uniform(0.8, 2.2))
        hu += disk * vessel_mask * (rng.uniform(-250, 0) + 850.0) * 0.9
    bbox = None
    truth = None
    if lesion:
        r = rng.uniform(3.5, 7.0)
        ly, lx = _point_in(rng, lungs, int(np.ceil(r)) + 1)
        disk = _disk(shape, ly, lx, r)
        target = rng.uniform(-120.0, 60.0)
        hu = hu * (1 - disk) + target * disk
        truth = bool_arr(disk >= 0.5)
        bbox = (int(np.floor(lx - r)), int(np.floor(ly - r)), int(np.ceil(2 * r)) + 1,
                int(np.ceil(2 * r)) + 1)
    hu = _blur(hu, blur) + offset
    sigma = (15.0 if noise == "low" else 55.0) * _SIZE_NOISE[size]
    hu = hu + sigma * _noise(rng, shape, corr)
    # Scanner C stores with a finer slope: decoders must apply the rescale.
    slope, intercept = (0.5, -1024.0) if scanner == "C" else (1.0, -1024.0)
    stored = np.clip(np.round((hu - intercept) / slope), 0, 4095 if slope == 1 else 8191)
    attrs: dict[str, Any] = {
        "Modality": "CT",
        "PhotometricInterpretation": "MONOCHROME2",
        "RescaleSlope": slope,
        "RescaleIntercept": intercept,
        "WindowCenter": 40.0,
        "WindowWidth": 400.0,
        "BodyPartExamined": "CHEST",
    }
    return SynthCase("ct", scanner, noise, size, lesion, stored.astype(np.uint16), attrs, bbox,
                     truth)


def _radiograph(rng: np.random.Generator, scanner: str, noise: str, size: str,
                lesion: bool) -> SynthCase:
    shape = RADIOGRAPH_SHAPE
    h, w = shape
    blur, corr, _, gain = _SCANNER[scanner]
    s = _SIZE_SCALE[size] * rng.uniform(0.95, 1.05)
    cy, cx = h * 0.52 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
    # "Attenuation" image: 0 = air (dark on display), 1 = dense.
    att = np.full(shape, 0.05)
    body = _ellipse(shape, cy, cx, 0.55 * h * s, 0.45 * w * s)
    att[body] = 0.55 + 0.1 * (s - 0.9)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lungs |= _ellipse(shape, cy - 0.05 * h, cx + side * 0.19 * w * s, 0.33 * h * s,
                          0.13 * w * s)
    att[lungs] = 0.25
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(6):  # rib arcs
        y0 = cy - 0.33 * h * s + k * 0.12 * h * s
        arc = np.abs(yy - (y0 + 0.002 * (xx - cx) ** 2 * s)) < 1.8 * s
        att[arc & body] += 0.12
    att[_ellipse(shape, cy, cx, 0.4 * h * s, 0.07 * w * s)] = 0.7  # mediastinum
    bbox = None
    truth = None
    if lesion:
        sig = rng.uniform(2.5, 4.5)
        ly, lx = _point_in(rng, lungs, int(np.ceil(2 * sig)) + 1)
        truth = bool_arr((yy - ly) ** 2 + (xx - lx) ** 2 <= (2 * sig) ** 2)
        att += rng.uniform(0.15, 0.3) * np.exp(-((yy - ly) ** 2 + (xx - lx) ** 2) / (2 * sig**2))
        rad = 2.0 * sig
        bbox = (int(np.floor(lx - rad)), int(np.floor(ly - rad)), int(np.ceil(2 * rad)) + 1,
                int(np.ceil(2 * rad)) + 1)
    att = _blur(att, blur)
    sigma = (0.012 if noise == "low" else 0.04) * _SIZE_NOISE[size]
    att = att + sigma * _noise(rng, shape, corr)
    signal = np.clip(300.0 + 3300.0 * att * gain, 0, 4095)
    attrs: dict[str, Any] = {
        "Modality": "DX",
        "PhotometricInterpretation": "MONOCHROME2",
        "RescaleSlope": 1.0,
        "RescaleIntercept": 0.0,
        "BodyPartExamined": "CHEST",
    }
    if scanner == "A":
        attrs["WindowCenter"] = float(300.0 + 3300.0 * 0.4 * gain)
        attrs["WindowWidth"] = float(3300.0 * 0.9 * gain)
    if scanner == "C":
        # This vendor stores inverted values: decoders must honour MONOCHROME1.
        signal = 4095.0 - signal
        attrs["PhotometricInterpretation"] = "MONOCHROME1"
    stored = np.round(signal).astype(np.uint16)
    return SynthCase("radiograph", scanner, noise, size, lesion, stored, attrs, bbox, truth)


def make_case(seed: int, index: int, *, kind: str | None = None, scanner: str | None = None,
              noise: str | None = None, size: str | None = None,
              lesion: bool | None = None) -> SynthCase:
    """Case ``index`` of the stream ``seed``; subgroup fields may be forced."""
    rng = np.random.default_rng([seed, index])
    picked_kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    picked_scanner = scanner or SCANNERS[int(rng.integers(len(SCANNERS)))]
    picked_noise = noise or NOISES[int(rng.integers(len(NOISES)))]
    picked_size = size or SIZES[int(rng.integers(len(SIZES)))]
    has_lesion = bool(rng.integers(2)) if lesion is None else lesion
    make = _ct if picked_kind == "ct" else _radiograph
    return make(rng, picked_scanner, picked_noise, picked_size, has_lesion)


def to_dataset(case: SynthCase, *, instance_number: int = 1, study_seed: str = "synthetic",
               transfer_syntax: str = "1.2.840.10008.1.2.1") -> Any:
    """A Part 10-ready pydicom Dataset for a synthetic case (tests and the bench)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    sop_class = CT_IMAGE_STORAGE if case.kind == "ct" else DX_PRESENTATION_STORAGE
    sop_uid = generate_uid(entropy_srcs=[study_seed, str(instance_number)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[study_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_seed, "series", case.kind])
    ds.PatientID = "SYNTH"
    ds.InstanceNumber = instance_number
    ds.Modality = case.attrs["Modality"]
    ds.BodyPartExamined = case.attrs["BodyPartExamined"]
    ds.Manufacturer = f"Synthetic scanner {case.scanner}"
    ds.Rows, ds.Columns = case.stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.attrs["PhotometricInterpretation"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = case.attrs["RescaleSlope"]
    ds.RescaleIntercept = case.attrs["RescaleIntercept"]
    if "WindowCenter" in case.attrs:
        ds.WindowCenter = case.attrs["WindowCenter"]
        ds.WindowWidth = case.attrs["WindowWidth"]
    ds.PixelData = case.stored.astype("<u2").tobytes()
    return ds
