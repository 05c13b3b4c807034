"""The explanation as a Grayscale Softcopy Presentation State on the original image.

The region the model's explanation found (agent/infer/explain.py, a box in the
de-identified image's pixels: the same pixels as the original's) becomes a
rectangle on its own graphic layer, with a text object that says what it is and
that it is not for diagnosis.  The display (modality LUT, window) is taken
from the referenced image, so a viewer shows the image as the modality meant it
with the annotation on top.  Grayscale only: a colour source gets no GSPS (its
key image still shows the region).
"""

from __future__ import annotations

import numpy as np
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from pydicom.dataset import Dataset

from agent.errors import ResultError
from agent.results.common import (
    DISCLAIMER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    Issuer,
    frame_number,
    probability_text,
)
from agent.results.link import LinkRecord
from agent.types import ModelOutput

LAYER = "AI_EXPLANATION"


def explained(rec: LinkRecord, m: ModelOutput) -> tuple[int, int, list[int]] | None:
    """(source position, frame, [x, y, w, h]) of ``m``'s explanation region, or None."""
    e = m.explanation
    where, bbox = e.get("instance"), e.get("bbox")
    if not isinstance(where, int) or not 0 <= where < len(rec.sources) or not bbox:
        return None
    x, y, w, h = (int(v) for v in bbox)
    rows = int(rec.sources[where].get("Rows", 0) or 0)
    cols = int(rec.sources[where].get("Columns", 0) or 0)
    if w <= 0 or h <= 0 or x < 0 or y < 0 or (cols and x + w > cols) or (rows and y + h > rows):
        return None
    return where, int(e.get("frame", 0) or 0), [x, y, w, h]


def label_text(m: ModelOutput) -> str:
    p = m.labels.get(max(m.labels, key=lambda k: m.labels[k])) if m.labels else m.confidence
    review = "; needs review" if m.needs_review else ""
    return (f"{DISCLAIMER} | {m.name} {m.version}: {m.finding} "
            f"(p={probability_text(float(p or 0.0))}, confidence {probability_text(m.confidence)}"
            f"{review})")


def is_grayscale(ref: Dataset) -> bool:
    return str(ref.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME")


def build_gsps(issuer: Issuer, rec: LinkRecord, m: ModelOutput) -> Dataset:
    found = explained(rec, m)
    if found is None:
        raise ResultError(f"model {m.name}: no explanation region to show")
    where, frame, (x, y, w, h) = found
    ref = rec.reference(where)
    if not is_grayscale(ref):
        raise ResultError(f"model {m.name}: the explained image is in colour; a grayscale "
                          "presentation state does not apply")
    rows, cols = int(ref.Rows), int(ref.Columns)
    layer = GraphicLayer(layer_name=LAYER, order=1, description=f"{DISCLAIMER}: explanation")
    box = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float64)
    # The text sits above the region when there is room, else below it.
    top = max(0.0, y - 0.1 * rows)
    text_box = ((float(x), top, float(min(cols, x + max(w, cols // 2))), float(y))
                if y >= 0.05 * rows else
                (float(x), float(min(rows - 1, y + h)), float(min(cols, x + max(w, cols // 2))),
                 float(min(rows, y + h + 0.1 * rows))))
    number = frame_number(ref, frame)
    annotation = GraphicAnnotation(
        referenced_images=[ref], graphic_layer=layer,
        referenced_frame_number=number,
        graphic_objects=[GraphicObject(graphic_type=GraphicTypeValues.POLYLINE,
                                       graphic_data=box, units=AnnotationUnitsValues.PIXEL)],
        text_objects=[TextObject(text_value=label_text(m), units=AnnotationUnitsValues.PIXEL,
                                 bounding_box=text_box)])
    try:
        pr = GrayscaleSoftcopyPresentationState(
            referenced_images=[ref],
            series_instance_uid=issuer.series_uid(rec.study_ref, "gsps"),
            series_number=SERIES_NUMBER["gsps"],
            sop_instance_uid=issuer.instance_uid(rec.study_ref, rec.version, "gsps", m.name),
            instance_number=rec.version,
            manufacturer=MANUFACTURER, manufacturer_model_name="edge-agent",
            software_versions=issuer.software, device_serial_number=issuer.serial,
            content_label="AI_REGION",
            content_description=f"{DISCLAIMER}: {m.name} {m.version} explanation"[:64],
            graphic_annotations=[annotation], graphic_layers=[layer],
            series_description=SERIES_DESCRIPTION["gsps"])
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultError(f"study {rec.study_ref} version {rec.version}: presentation state "
                          f"not built ({type(exc).__name__})") from None
    # General Series Laterality is Type 2C: the source's value, else empty (unknown).
    pr.Laterality = ref.get("Laterality", "") or ""
    return pr
