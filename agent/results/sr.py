"""The result as a Structured Report: TID 1500 Measurement Report, Comprehensive 3D SR.

One SR per study version holds one measurement group per model:

* TID 1410 (planar ROI) when the model explained its finding with a region: the
  region as a closed polyline on the original image it was found on; else
  TID 1501 with the images the model read as source images;
* the finding as a coded concept (our local scheme: manifests carry words, not
  codes), the probability of every label and the uncertainty as numeric
  measurements, the model's name, version and sha256 as its Algorithm
  Identification (TID 4019), the review flag as a qualitative evaluation and its
  reasons and the explanation as text.

The document's own qualitative evaluations say in plain words that it is AI
output requiring review, and how the model's input was de-identified.  The
observer is the box as a device (TID 1004) naming the models.  It references
the original images it read (image library and evidence); it is PRELIMINARY and
UNVERIFIED.  A later version of the study's result names the earlier SR in its
Predecessor Documents Sequence.
"""

from __future__ import annotations

import hashlib

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from agent.errors import ResultError
from agent.results.common import (
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SERIES_NUMBER,
    Issuer,
    coding_schemes,
    frame_number,
    local_code,
    statement,
)
from agent.results.link import LinkRecord, has_sr
from agent.types import ModelOutput

NO_UNITS = CodedConcept("1", "UCUM", "no units")
UNCERTAINTY = local_code("UNCERTAINTY", "Model uncertainty")
NEEDS_REVIEW = local_code("NEEDSREVIEW", "Requires clinician review")
REVIEW_REASON = local_code("REVIEWREASON", "Reason for review")
EXPLANATION = local_code("EXPLANATION", "Explanation")
AI_STATEMENT = local_code("AISTATEMENT", "AI output statement")
DEID_METHOD = local_code("DEIDMETHOD", "De-identification of model input")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def finding_code(m: ModelOutput) -> CodedConcept:
    """The finding as a code of our local scheme: stable per model and finding text."""
    digest = hashlib.sha256(f"{m.name}\x00{m.finding}".encode()).hexdigest()[:12].upper()
    return local_code(f"F{digest}", m.finding or "no finding")


def probability_code(label: str) -> CodedConcept:
    digest = hashlib.sha256(label.encode()).hexdigest()[:12].upper()
    return local_code(f"P{digest}", f"Probability of {label}")


def models_text(rec: LinkRecord) -> str:
    return ", ".join(f"{m.name} {m.version}" for m in rec.result.models)


def _text(name: CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value[:1024],
                           relationship_type=RelationshipTypeValues.CONTAINS)


def _rectangle(bbox: list[int]) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float32)


def _group(issuer: Issuer, rec: LinkRecord, i: int, m: ModelOutput,
           ) -> PlanarROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations:
    algorithm = AlgorithmIdentification(name=m.name, version=m.version,
                                        parameters=[f"sha256={m.sha256}"])
    # The group names the algorithm once (TID 1501 row 8); the numbers inherit it.
    measurements = [Measurement(name=probability_code(label), value=float(p), unit=NO_UNITS)
                    for label, p in sorted(m.labels.items())]
    measurements.append(Measurement(name=UNCERTAINTY, value=float(m.uncertainty),
                                    unit=NO_UNITS))
    review = [QualitativeEvaluation(NEEDS_REVIEW, codes.SCT.Yes if m.needs_review
                                    else codes.SCT.No)]
    tracking = TrackingIdentifier(uid=issuer.instance_uid(rec.study_ref, rec.version,
                                                          "tracking", m.name),
                                  identifier=f"{m.name} {m.version} finding {i + 1}")
    e = m.explanation
    where = e.get("instance")
    group: (PlanarROIMeasurementsAndQualitativeEvaluations
            | MeasurementsAndQualitativeEvaluations)
    if e.get("bbox") and isinstance(where, int) and 0 <= where < len(rec.sources):
        ref = rec.sources[where]
        number = frame_number(ref, int(e.get("frame", 0)))
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE, graphic_data=_rectangle(e["bbox"]),
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=ref.SOPClassUID,
                referenced_sop_instance_uid=ref.SOPInstanceUID,
                referenced_frame_numbers=[number] if number else None))
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region,
            finding_type=finding_code(m), algorithm_id=algorithm,
            measurements=measurements, qualitative_evaluations=review)
    else:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding_code(m), algorithm_id=algorithm,
            measurements=measurements, qualitative_evaluations=review,
            source_images=[SourceImageForMeasurementGroup(
                referenced_sop_class_uid=rec.sources[s].SOPClassUID,
                referenced_sop_instance_uid=rec.sources[s].SOPInstanceUID)
                for s in _read(rec, m)])
    items = group[0].ContentSequence
    for reason in m.review_reasons:
        items.append(_text(REVIEW_REASON, reason))
    if e.get("text"):
        items.append(_text(EXPLANATION, str(e["text"])))
    return group


def _read(rec: LinkRecord, m: ModelOutput) -> list[int]:
    """The positions of the originals ``m`` read (all of the study when unknown)."""
    read = [s for s in m.sources if 0 <= s < len(rec.sources)]
    return read or list(range(len(rec.sources)))


def build_sr(issuer: Issuer, rec: LinkRecord) -> Dataset:
    """The SR of ``rec``'s result (raises ResultError when it has nothing to report)."""
    r = rec.result
    if not has_sr(r):
        raise ResultError(f"study {rec.study_ref} version {rec.version}: no model output "
                          f"to report (status {r.status})")
    read = sorted({s for m in r.models for s in _read(rec, m)})
    evidence = [rec.reference(s) for s in read]
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=issuer.device_uid(), name=issuer.name, manufacturer_name=MANUFACTURER,
            model_name=models_text(rec)[:64], serial_number=issuer.serial))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[_group(issuer, rec, i, m) for i, m in enumerate(r.models)],
        referenced_images=evidence)
    options = ", ".join(r.deid_options) or "none"
    notes = ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                 relationship_type=RelationshipTypeValues.CONTAINS)
    notes.ContentSequence = ContentSequence([
        _text(AI_STATEMENT, statement(models_text(rec))),
        _text(DEID_METHOD, f"The model read de-identified copies of these images: "
                           f"{r.deid_method}; options: {options}."),
    ])
    report[0].ContentSequence.append(notes)
    previous = None
    if rec.predecessor is not None:
        before = Dataset()
        before.StudyInstanceUID = rec.subject.StudyInstanceUID
        before.SeriesInstanceUID = issuer.series_uid(rec.study_ref, "sr")
        before.SOPInstanceUID = issuer.instance_uid(rec.study_ref, rec.predecessor, "sr")
        before.SOPClassUID = Comprehensive3DSRStorage
        previous = [before]
    try:
        return Comprehensive3DSR(
            evidence=evidence, content=report[0],
            series_instance_uid=issuer.series_uid(rec.study_ref, "sr"),
            series_number=SERIES_NUMBER["sr"],
            sop_instance_uid=issuer.instance_uid(rec.study_ref, rec.version, "sr"),
            instance_number=rec.version, manufacturer=MANUFACTURER,
            is_complete=True, is_final=False, is_verified=False,
            previous_versions=previous, series_description=SERIES_DESCRIPTION["sr"],
            manufacturer_model_name="edge-agent", software_versions=issuer.software,
            device_serial_number=issuer.serial, coding_schemes=coding_schemes())
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ResultError(f"study {rec.study_ref} version {rec.version}: SR not built "
                          f"({type(exc).__name__})") from None
