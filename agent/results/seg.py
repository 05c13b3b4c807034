"""A model's mask as DICOM SEG on the original image it was computed on.

Only for models whose manifest declares a mask output (``[mask]``, see
agent/infer/manifest.py; the shipped one is models/available/lesion-seg).  One
binary segment, labelled and coded (segmented property category and type) as the
manifest says, by default SNOMED CT "Morphologically abnormal structure" / "Lesion",
made by an automatic algorithm (the model's name, version and sha256).
The source is a single-frame original; multi-frame (enhanced) sources are not
segmented yet.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from agent.errors import ResultError
from agent.infer.manifest import MaskOutput
from agent.results.common import (
    DISCLAIMER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    Issuer,
    coding_schemes,
)
from agent.results.link import LinkRecord
from agent.types import ModelOutput


def build_seg(issuer: Issuer, rec: LinkRecord, m: ModelOutput, spec: MaskOutput | None,
              index: int, mask: npt.NDArray[np.bool_]) -> Dataset:
    """SEG of ``mask`` (rows x columns of source ``index``) for model ``m``.

    Raises ResultError when the manifest declares no mask (``spec`` None), the mask
    does not fit the image, or it is empty."""
    if spec is None:
        raise ResultError(f"model {m.name}: its manifest declares no mask output, so it "
                          "gets no SEG")
    if not 0 <= index < len(rec.sources):
        raise ResultError(f"model {m.name}: mask source {index} is not in the study")
    ref = rec.reference(index)
    if int(ref.get("NumberOfFrames", 1) or 1) > 1:
        raise ResultError(f"model {m.name}: masks of multi-frame images are not written "
                          "as SEG yet")
    binary = np.asarray(mask).astype(bool)
    if binary.shape != (int(ref.Rows), int(ref.Columns)):
        raise ResultError(f"model {m.name}: mask is {binary.shape[1]}x{binary.shape[0]}, the "
                          f"image {ref.Columns}x{ref.Rows}")
    if not binary.any():
        raise ResultError(f"model {m.name}: the mask is empty; no SEG")
    segment = SegmentDescription(
        segment_number=1, segment_label=spec.label[:64],
        segmented_property_category=CodedConcept(*spec.category),
        segmented_property_type=CodedConcept(*spec.type),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=AlgorithmIdentificationSequence(
            name=m.name, family=codes.cid7162.ArtificialIntelligence, version=m.version,
            parameters={"sha256": m.sha256}))
    try:
        seg = Segmentation(
            source_images=[ref], pixel_array=binary[np.newaxis].astype(np.uint8),
            segmentation_type=SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=issuer.series_uid(rec.study_ref, "seg"),
            series_number=SERIES_NUMBER["seg"],
            sop_instance_uid=issuer.instance_uid(rec.study_ref, rec.version, "seg", m.name),
            instance_number=rec.version, manufacturer=MANUFACTURER,
            manufacturer_model_name="edge-agent", software_versions=issuer.software,
            device_serial_number=issuer.serial, content_label="AI_MASK",
            content_description=f"{DISCLAIMER}: {m.name} {m.version} {spec.label}"[:64],
            series_description=SERIES_DESCRIPTION["seg"], coding_schemes=coding_schemes())
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultError(f"study {rec.study_ref} version {rec.version}: SEG not built "
                          f"({type(exc).__name__})") from None
    return seg
