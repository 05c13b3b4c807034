"""The explanation as a Secondary Capture key image: the region and the words burned in.

For a viewer that shows no presentation states: the explained frame rendered
as the modality meant it (modality LUT, the image's own window, else the 1st
to 99th percentile; MONOCHROME1 inverted), the region drawn as a yellow
rectangle, and a black banner with "AI - not for diagnosis" and the finding in
white.  Small images are enlarged (nearest neighbour, whole factors) so the
words stay legible.  The text is drawn with Pillow's built-in font: Pillow is
already installed with highdicom, and its default font needs no font file on
the box.  The image says BurnedInAnnotation YES and names its source image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from agent.errors import ResultError
from agent.results.common import (
    DISCLAIMER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    Issuer,
    coding_schemes,
    frame_number,
    probability_text,
)
from agent.results.gsps import explained
from agent.results.link import LinkRecord
from agent.types import ModelOutput

REGION_RGB = (255, 255, 0)
TEXT_RGB = (255, 255, 255)
BANNER_RGB = (0, 0, 0)
MIN_SIDE = 512  # smaller images are enlarged to at least this (whole factors)


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str) or not hasattr(value, "__len__"):
            return float(value)
        return float(value[0])  # multi-valued window: the first is the default one
    except (TypeError, ValueError, IndexError):
        return None


def render(ds: Dataset, frame: int = 0) -> npt.NDArray[np.uint8]:
    """One frame as 8-bit RGB, displayed the way the modality meant it."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr: npt.NDArray[Any] = pixel_array(ds, index=frame) if frames > 1 else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise ResultError(f"the explained image cannot be decoded ({type(exc).__name__})") \
            from None
    if arr.ndim == 3:
        if arr.dtype != np.uint8:
            top = float(arr.max()) or 1.0
            arr = np.clip(arr.astype(np.float64) * 255.0 / top, 0, 255)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    values = arr.astype(np.float64)
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    values = values * (slope if slope is not None else 1.0) + (intercept or 0.0)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 1:
        low, high = np.percentile(values, [1.0, 99.0])
        center, width = (low + high) / 2.0, max(float(high - low), 1.0)
    # PS3.3 C.11.2.1.2.1, linear window
    grey = np.clip(((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0, 0, 255)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255.0 - grey
    g = np.round(grey).astype(np.uint8)
    return np.ascontiguousarray(np.stack([g, g, g], axis=-1))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError, TypeError):  # Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def burn(rgb: npt.NDArray[np.uint8], box: list[int], lines: list[str],
         ) -> tuple[npt.NDArray[np.uint8], int, tuple[int, int, int, int]]:
    """Draw the region and the banner; returns (image, scale, banner box x0 y0 x1 y1)."""
    rows, cols = rgb.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / max(rows, cols)))
    img = Image.fromarray(rgb, "RGB")
    if scale > 1:
        img = img.resize((cols * scale, rows * scale), Image.Resampling.NEAREST)
    width, height = img.size
    draw = ImageDraw.Draw(img)
    x, y, w, h = (int(v) * scale for v in box)
    thick = max(2, round(min(width, height) / 200))
    draw.rectangle((x, y, x + w - 1, y + h - 1), outline=REGION_RGB, width=thick)
    size = max(10, min(width // 26, 28))
    font = _font(size)
    pad = max(2, size // 4)
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    line_h = int(max(b[3] for b in boxes)) + pad
    banner = (0, 0, min(width, int(max(b[2] for b in boxes)) + 2 * pad),
              min(height, line_h * len(lines) + pad))
    draw.rectangle(banner, fill=BANNER_RGB)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, fill=TEXT_RGB, font=font)
    return np.asarray(img, dtype=np.uint8).copy(), scale, banner


def _orientation(ref: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the rows and columns: the source's, else from its
    Image Orientation (Patient) (the main axis of each direction)."""
    po = ref.get("PatientOrientation")
    if po and len(po) == 2 and all(str(v) for v in po):
        return str(po[0])[:1], str(po[1])[:1]
    iop = ref.get("ImageOrientationPatient")
    if iop and len(iop) == 6:
        def letter(v: list[float]) -> str:
            axis = int(np.argmax(np.abs(v)))
            return ("L", "P", "H")[axis] if v[axis] > 0 else ("R", "A", "F")[axis]
        try:
            return letter([float(c) for c in iop[:3]]), letter([float(c) for c in iop[3:]])
        except (TypeError, ValueError):
            return None
    return None


def build_key_image(issuer: Issuer, rec: LinkRecord, m: ModelOutput,
                    source: Dataset | None = None) -> Dataset:
    """The key image of ``m``'s explanation; ``source`` is the explained original with its
    pixels (default: the frame kept in the link)."""
    found = explained(rec, m)
    if found is None:
        raise ResultError(f"model {m.name}: no explanation region to show")
    where, frame, box = found
    if source is None:
        source = rec.source_image(m.name, where)
        frame = 0  # the link keeps the explained frame alone
        if source is None:
            raise ResultError(f"model {m.name}: the link holds no pixels of the explained "
                              "image")
    ref = rec.reference(where)
    rgb = render(source, frame)
    if rgb.shape[:2] != (int(ref.Rows), int(ref.Columns)):
        raise ResultError(f"model {m.name}: the explained image is {rgb.shape[1]}x"
                          f"{rgb.shape[0]}, its link says {ref.Columns}x{ref.Rows}")
    p = m.labels.get(max(m.labels, key=lambda k: m.labels[k])) if m.labels else m.confidence
    lines = [DISCLAIMER,
             f"{m.name} {m.version}: {m.finding}",
             f"p={probability_text(float(p or 0.0))}  uncertainty "
             f"{probability_text(m.uncertainty)}" + ("  NEEDS REVIEW" if m.needs_review else "")]
    pixels, scale, _ = burn(rgb, box, lines)
    spacing = ref.get("PixelSpacing") or ref.get("ImagerPixelSpacing")
    orientation = _orientation(ref)
    try:
        sc = SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=issuer.series_uid(rec.study_ref, "sc"),
            series_number=SERIES_NUMBER["sc"],
            sop_instance_uid=issuer.instance_uid(rec.study_ref, rec.version, "sc", m.name),
            instance_number=rec.version, manufacturer=MANUFACTURER,
            pixel_spacing=(tuple(float(v) / scale for v in spacing)  # type: ignore[arg-type]
                           if spacing and len(spacing) == 2 else None),
            patient_orientation=orientation or ("A", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=SERIES_DESCRIPTION["sc"],
            manufacturer_model_name="edge-agent", software_versions=issuer.software,
            device_serial_number=issuer.serial, coding_schemes=coding_schemes())
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultError(f"study {rec.study_ref} version {rec.version}: key image not built "
                          f"({type(exc).__name__})") from None
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: unknown, rather than a made-up direction
    sc.Laterality = ref.get("Laterality", "") or ""  # Type 2C: the source's, else unknown
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{DISCLAIMER}. AI explanation region and finding drawn on the image."
    sc.DerivationDescription = (f"{m.name} {m.version} explanation region and disclaimer "
                                "burned into the source image")[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    number = frame_number(ref, found[1])
    if number:
        item.ReferencedFrameNumber = number
    sc.SourceImageSequence = [item]
    return sc
