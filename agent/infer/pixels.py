"""Decode de-identified instances into 2-D images, one frame at a time.

This is the last place a pydicom Dataset is touched on the way to a model: it
produces ``ImageInput`` objects holding pixels plus only the attributes the
manifest lists.  Multi-frame objects are decoded frame by frame
(``pydicom.pixels.pixel_array(ds, index=i)``), so memory stays bounded by one
frame per image in flight, whatever the number of frames.  When the pipeline
left native (uncompressed) Pixel Data deferred in its in-memory buffer, only the
bytes of the sampled frames are read from it (``_deferred_frame``): the element
is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array
from pydicom.tag import BaseTag
from pydicom.valuerep import IS, DSfloat

from agent import dicomraw, pixelbound
from agent.errors import ModelError
from agent.infer.preprocess import ImageInput
from agent.uplink.vocabulary import transfer_syntax_keyword

# Where enhanced multi-frame objects keep per-frame technical attributes.
_FUNCTIONAL_GROUPS = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
}


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _plain(value: Any) -> Any:
    """pydicom value -> plain Python, so model code never holds pydicom objects."""
    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes):
        return None  # binary values are never "technical attributes" a model needs
    return str(value)


def extract_attributes(ds: Dataset, names: Sequence[str], frame: int = 0) -> dict[str, Any]:
    """Only the requested attributes; for enhanced objects, per-frame then shared groups."""
    out: dict[str, Any] = {}
    for name in names:
        value = ds.get(name)
        if value is None and name in _FUNCTIONAL_GROUPS:
            value = _from_functional_groups(ds, _FUNCTIONAL_GROUPS[name], name, frame)
        if value is not None and value != "":
            plain = _plain(value)
            if plain is not None:
                out[name] = plain
    return out


def _from_functional_groups(ds: Dataset, seq: str, name: str, frame: int) -> Any:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        item = per_frame[frame].get(seq)
        if item:
            value = item[0].get(name)
            if value is not None:
                return value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0].get(seq)
        if item:
            return item[0].get(name)
    return None


def _to_gray(arr: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[Any]:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        # pydicom returns RGB for YBR data by default; luminance per BT.601.
        rgb = arr[..., :3].astype(np.float32)
        return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # type: ignore[no-any-return]
    return arr


_PIXEL_DATA = BaseTag(0x7FE00010)
_PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration")


def _deferred_frame(ds: Dataset, frame: int, frames: int) -> npt.NDArray[Any] | None:
    """One frame of still-deferred native Pixel Data, read from the dataset's buffer;
    None when the element is loaded, compressed, bit-packed or has no buffer."""
    elem = dicomraw.raw(ds, _PIXEL_DATA)  # the raw element, without reading it
    source = ds.__dict__.get("buffer")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if (not isinstance(elem, RawDataElement) or elem.value is not None or source is None
            or ts is None or ts.is_compressed or ts.is_deflated):
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits == 0 or bits % 8:
        return None
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    if size <= 0 or (frame + 1) * size > elem.length or frames * size > elem.length:
        raise ValueError(f"Pixel Data holds {elem.length} bytes, too few for {frames} frames")
    source.seek(elem.value_tell + frame * size)
    data = source.read(size)
    one = Dataset()
    one.file_meta = FileMetaDataset()
    one.file_meta.TransferSyntaxUID = ts
    for keyword in _PIXEL_MODULE:
        if keyword in ds:
            setattr(one, keyword, ds[keyword].value)
    one.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    one.PixelData = data
    one["PixelData"].VR = "OB" if bits == 8 else "OW"
    return one.pixel_array


def decode_frame(ds: Dataset, frame: int, frames: int | None = None) -> npt.NDArray[Any]:
    try:
        # Decoders allocate by the declared geometry: bound it before they do.
        pixelbound.check(ds, frames=1, what=f"frame {frame}")
    except pixelbound.PixelBoundError as exc:
        raise ModelError(str(exc), hint="the instance declares more pixels than this box "
                                        "processes; see [study] max_process_instance_bytes") from None
    try:
        n = frames if frames is not None else frame_count(ds)
        deferred = _deferred_frame(ds, frame, n)
        if deferred is not None:
            arr = deferred
        elif n > 1:
            arr = pixel_array(ds, index=frame)
        else:
            arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the daemon must go on
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ModelError(
            f"pixel data (transfer syntax {ts}, frame {frame}) could not be decoded: "
            f"{type(exc).__name__}: {str(exc)[:160]}",
            hint="check that a codec for this transfer syntax is installed",
            code="pixels-undecodable", transfer_syntax=transfer_syntax_keyword(ts),
        ) from exc
    arr = _to_gray(arr, ds)
    if arr.ndim != 2:
        raise ModelError(f"decoded frame has shape {arr.shape}, expected a 2-D image",
                         code="image-not-2d")
    return arr


def plan_images(counts: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """(instance position, frame) pairs, sampled evenly when there are more than limit."""
    pairs = [(i, f) for i, n in enumerate(counts) for f in range(n)]
    if len(pairs) <= limit:
        return pairs
    picks = np.linspace(0, len(pairs) - 1, limit).round().astype(int)
    return [pairs[int(k)] for k in picks]


def iter_images(instances: Sequence[tuple[int, Dataset]], attributes: Sequence[str],
                limit: int) -> Iterator[ImageInput]:
    """Yield ImageInputs for up to ``limit`` frames of the given (study index, dataset)."""
    counts = [frame_count(ds) for _, ds in instances]
    for position, frame in plan_images(counts, limit):
        index, ds = instances[position]
        yield ImageInput(
            pixels=decode_frame(ds, frame, counts[position]),
            attrs=extract_attributes(ds, attributes, frame),
            instance=index,
            frame=frame,
        )
