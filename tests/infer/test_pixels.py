"""Every transfer syntax the DICOM node accepts decodes, multi-frame included.

Samples come from pydicom's test files and pydicom-data.  Lossless syntaxes
are compared pixel for pixel with the uncompressed original of the same image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID

from agent.dicom.sink import TRANSFER_SYNTAXES
from agent.infer.pixels import decode_frame, extract_attributes, frame_count, iter_images

# One sample per accepted syntax: (file, uncompressed reference or None).
SAMPLES: dict[str, tuple[str, str | None]] = {
    "1.2.840.10008.1.2": ("MR_small_implicit.dcm", "MR_small.dcm"),
    "1.2.840.10008.1.2.1": ("MR_small.dcm", None),
    "1.2.840.10008.1.2.1.99": ("image_dfl.dcm", None),
    "1.2.840.10008.1.2.2": ("MR_small_bigendian.dcm", "MR_small.dcm"),
    "1.2.840.10008.1.2.4.50": ("SC_rgb_jpeg_dcmtk.dcm", None),
    "1.2.840.10008.1.2.4.51": ("JPGExtended.dcm", None),
    "1.2.840.10008.1.2.4.57": ("JPEG-LL.dcm", None),  # relabelled, see _load
    "1.2.840.10008.1.2.4.70": ("JPEG-LL.dcm", None),
    "1.2.840.10008.1.2.4.80": ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    "1.2.840.10008.1.2.4.81": ("JPEGLSNearLossless_16.dcm", None),
    "1.2.840.10008.1.2.4.90": ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    "1.2.840.10008.1.2.4.91": ("693_J2KI.dcm", None),
    "1.2.840.10008.1.2.5": ("MR_small_RLE.dcm", "MR_small.dcm"),
}

# Multi-frame: the same 10-frame MR in several encodings (pydicom-data).
MULTIFRAME = ["emri_small_big_endian.dcm", "emri_small_RLE.dcm",
              "emri_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm"]


def _load(name: str, syntax: str | None = None) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"sample {name} missing: install pydicom-data"
    ds = pydicom.dcmread(path)
    if syntax == "1.2.840.10008.1.2.4.57":
        # No public 4.57 sample exists; a Selection Value 1 stream (4.70) is a
        # valid Process 14 (4.57) stream, so relabelling yields a true 4.57 file.
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        buf = io.BytesIO()
        ds.save_as(buf)
        buf.seek(0)
        ds = pydicom.dcmread(buf)
    return ds


def test_every_accepted_syntax_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(TRANSFER_SYNTAXES)


@pytest.mark.parametrize("syntax", sorted(SAMPLES), ids=lambda s: UID(s).name)
def test_transfer_syntax_decodes(syntax: str) -> None:
    name, reference = SAMPLES[syntax]
    ds = _load(name, syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    images = list(iter_images([(0, ds)], ["Modality", "RescaleSlope"], limit=64))
    assert len(images) == frame_count(ds)
    first = images[0].pixels
    assert first.shape == (ds.Rows, ds.Columns)  # colour is reduced to one plane
    assert np.isfinite(first.astype(np.float64)).all()
    assert float(first.std()) > 0, "a decoded image should not be flat"
    if reference is not None:
        expected = _load(reference).pixel_array
        np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize("name", MULTIFRAME)
def test_multiframe_decodes_frame_by_frame(name: str) -> None:
    ds = _load(name)
    reference = _load("emri_small.dcm").pixel_array
    assert frame_count(ds) == reference.shape[0] == 10
    frames = list(iter_images([(3, ds)], [], limit=100))
    assert [(f.instance, f.frame) for f in frames] == [(3, i) for i in range(10)]
    for img in frames:
        np.testing.assert_array_equal(img.pixels, reference[img.frame])


def test_long_series_is_sampled_evenly_to_the_limit() -> None:
    ds = _load("emri_small_RLE.dcm")
    frames = list(iter_images([(0, ds), (1, ds)], [], limit=5))
    assert [(f.instance, f.frame) for f in frames] == [(0, 0), (0, 5), (1, 0), (1, 4), (1, 9)]


def test_only_requested_attributes_reach_the_model() -> None:
    ds = _load("CT_small.dcm")
    assert "PatientName" in ds and "PatientID" in ds
    attrs = extract_attributes(ds, ["Modality", "RescaleSlope", "RescaleIntercept", "WindowCenter"])
    assert set(attrs) <= {"Modality", "RescaleSlope", "RescaleIntercept", "WindowCenter"}
    assert attrs["Modality"] == "CT" and isinstance(attrs["RescaleSlope"], float)
    image = next(iter_images([(0, ds)], ["Modality"], limit=1))
    assert set(image.attrs) == {"Modality"}
    assert not any(isinstance(v, Dataset) for v in image.attrs.values())


def test_undecodable_pixels_raise_a_model_error(tmp_path: Path) -> None:
    ds = _load("MR_small_RLE.dcm")
    ds.PixelData = ds.PixelData[:40]  # truncated fragment
    from agent.errors import ModelError

    with pytest.raises(ModelError, match="could not be decoded"):
        decode_frame(ds, 0)
