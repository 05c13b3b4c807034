"""Synthetic chest-radiograph-like images for the 512x512 model (cxr-lesion-512).

Kept apart from training/train_large.py so tests can make the same images without
torch (a development-only dependency, never installed by the test command).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SIZE = 512
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def make_image(seed: int, index: int, lesion: bool | None = None
               ) -> tuple[npt.NDArray[np.uint16], tuple[int, int, int, int] | None]:
    """A 512x512 chest-radiograph-like image (12-bit) and the lesion box (x, y, w, h)."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = np.full((SIZE, SIZE), 2200.0, dtype=np.float32)
    scale = float(rng.uniform(0.85, 1.05))
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1, 1):
        cx, cy = SIZE / 2 + side * 110 * scale, SIZE / 2 - 10
        lungs |= ((xx - cx) / (85 * scale)) ** 2 + ((yy - cy) / (170 * scale)) ** 2 <= 1
    img[lungs] = 1200.0
    for k in range(8):  # rib arcs
        y0 = 110 + 40 * k + float(rng.uniform(-6, 6))
        arc = y0 + 0.0018 * (xx - SIZE / 2) ** 2
        img += 380.0 * np.exp(-((yy - arc) ** 2) / (2 * 5.0 ** 2)) * lungs
    box = None
    has = bool(rng.random() < 0.5) if lesion is None else lesion
    if has:
        side = -1 if rng.random() < 0.5 else 1
        cx = SIZE / 2 + side * float(rng.uniform(70, 140)) * scale
        cy = SIZE / 2 + float(rng.uniform(-120, 110)) * scale
        sigma = float(rng.uniform(7.0, 14.0))
        img += float(rng.uniform(1600, 2400)) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2)
                                                     / (2 * sigma ** 2))
        r = 2 * sigma
        box = (int(cx - r), int(cy - r), int(2 * r), int(2 * r))
    img += rng.standard_normal(img.shape).astype(np.float32) * float(rng.uniform(40, 110))
    return np.clip(img, 0, 4095).astype(np.uint16), box


def to_dataset(stored: npt.NDArray[np.uint16]) -> Dataset:
    """A DX For Presentation instance holding the image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PatientName, ds.PatientID = "Large^Phantom", "CXR-512"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = stored.tobytes()
    return ds
