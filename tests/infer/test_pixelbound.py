"""Decoders are bounded before they allocate: the declared pixel geometry of what is
about to be decoded is checked first (agent/pixelbound.py), for inference frames and
for pixel cleaning, whatever codec would run."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import RLELossless, generate_uid

from agent import pixelbound
from agent.deid import burnedin
from agent.deid.settings import PixelCleanRule
from agent.errors import ModelError
from agent.infer import pixels

MiB = 1024**2


def rle_instance(rows: int, frames: int = 1) -> Dataset:
    """An RLE Lossless instance whose single 200-byte fragment declares rows x rows x 8 bit."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.SOPInstanceUID = generate_uid()
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "US-1"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    fragment = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * 68
    ds.PixelData = (struct.pack("<HHI", 0xFFFE, 0xE000, 0)
                    + struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
                    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    ds["PixelData"].VR = "OB"
    ds.set_original_encoding(False, True)
    return ds


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every pydicom decode entry point the code uses, replaced by a recorder."""
    calls: list[str] = []

    def refuse(*_a: object, **_k: object) -> None:
        calls.append("decoded")
        raise AssertionError("a decoder ran")

    monkeypatch.setattr(pixels, "pixel_array", refuse)
    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    yield calls


@pytest.fixture
def bound() -> Iterator[None]:
    before = pixelbound.limit()
    pixelbound.configure(64 * MiB)
    yield
    pixelbound.configure(before)


@pytest.mark.usefixtures("bound")
def test_an_inference_frame_over_the_bound_is_refused_before_decoding(
        no_decoder: list[str]) -> None:
    with pytest.raises(ModelError, match=r"256 MiB, over the 64 MiB bound"):
        pixels.decode_frame(rle_instance(16384), 0)
    # Per frame: a multi-frame instance of small frames is fine by this check.
    with pytest.raises(ModelError, match="could not be decoded"):
        pixels.decode_frame(rle_instance(512, frames=1000), 3)
    assert no_decoder == ["decoded"]  # only the frame within the bound reached a decoder


@pytest.mark.usefixtures("bound")
def test_pixel_cleaning_checks_all_frames_and_what_rle_can_hold(no_decoder: list[str]) -> None:
    rule = PixelCleanRule("ACME", "US-1", 512, 512, ((0, 0, 10, 10),))
    with pytest.raises(pixelbound.PixelBoundError, match="over the 64 MiB bound"):
        burnedin.black_out(rle_instance(512, frames=1000), rule)  # 250 MiB in all
    # Within the bound, but 200 bytes of RLE cannot hold 16 MiB.
    with pytest.raises(pixelbound.PixelBoundError, match="cannot decode to"):
        burnedin.black_out(rle_instance(4096), rule)
    assert no_decoder == []
