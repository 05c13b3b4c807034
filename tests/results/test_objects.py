"""The result objects built from a real link (real de-identifier, real demo model):
each passes dciodvfy without errors, the GSPS passes dcmpschk, the key image shows
the region and the words when DCMTK renders it, the SR says what the issue asks, and
UIDs are stable per (study, version, kind)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from agent.crypto import random_key
from agent.errors import ResultError
from agent.infer import InferenceEngine
from agent.infer.manifest import MaskOutput, load_manifest, parse_manifest
from agent.results.build import Mask, build_all
from agent.results.common import DISCLAIMER, Issuer
from agent.results.keyimage import REGION_RGB, render
from agent.results.seg import build_seg
from agent.results.sr import build_sr
from tests.helpers.results import (
    DCIODVFY,
    PATIENT_ID,
    PATIENT_NAME,
    Linked,
    dciodvfy_errors,
    link,
    original_study,
    process,
)

REPO = Path(__file__).resolve().parents[2]
needs_dcmtk = pytest.mark.skipif(shutil.which("dcmj2pnm") is None or DCIODVFY is None,
                                 reason="DCMTK / dicom3tools not installed")


@pytest.fixture
def linked(tmp_path: Path, demo_engine: InferenceEngine) -> Linked:
    return link(tmp_path, demo_engine)


def _mask(ln: Linked) -> Mask:
    m = ln.record.result.models[0]
    x, y, w, h = m.explanation["bbox"]
    pixels = np.zeros((int(ln.record.sources[0].Rows), int(ln.record.sources[0].Columns)), bool)
    pixels[y:y + h, x:x + w] = True
    return Mask(MaskOutput("mask", "lesion", 0.5), int(m.explanation["instance"]), pixels)


@needs_dcmtk
def test_every_object_passes_dciodvfy_and_the_gsps_dcmpschk(linked: Linked,
                                                             tmp_path: Path) -> None:
    objects, skipped = build_all(linked.issuer, linked.record,
                                 masks={"lesion-demo": _mask(linked)})
    assert sorted(o.kind for o in objects) == ["gsps", "sc", "seg", "sr"], skipped
    for obj in objects:
        path = tmp_path / obj.file_name(1)
        assert dciodvfy_errors(obj.dataset, path) == [], obj.kind
        if obj.kind == "gsps":
            proc = subprocess.run(["dcmpschk", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0 and "Test passed" in proc.stdout + proc.stderr, \
                proc.stdout + proc.stderr
        # Every object lands in the original study of the original patient.
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == linked.originals.study_uid
        assert ds.PatientID == PATIENT_ID and str(ds.PatientName) == PATIENT_NAME
        assert ds.AccessionNumber == linked.originals.datasets[0].AccessionNumber


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _meaning(item: pydicom.Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def test_sr_reports_finding_probability_review_model_and_references_originals(
        linked: Linked) -> None:
    rec = linked.record
    (m,) = rec.result.models
    sr = build_sr(linked.issuer, rec)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    items = _items(sr)
    texts = {_meaning(i): str(i.TextValue) for i in items if i.ValueType == "TEXT"}
    assert texts["AI output statement"].startswith(DISCLAIMER)
    assert "qualified clinician" in texts["AI output statement"]
    assert rec.result.deid_method in texts["De-identification of model input"]
    assert texts["Algorithm Name"] == m.name and texts["Algorithm Version"] == m.version
    assert texts["Algorithm Parameters"] == f"sha256={m.sha256}"
    assert texts["Device Observer Name"] == "edge-agent site-a/edge-1"
    codes = {_meaning(i): i.ConceptCodeSequence[0] for i in items if i.ValueType == "CODE"}
    assert codes["Observer Type"].CodeMeaning == "Device"
    assert codes["Finding"].CodeMeaning == m.finding
    assert codes["Requires clinician review"].CodeMeaning == ("Yes" if m.needs_review else "No")
    reasons = [str(i.TextValue) for i in items
               if i.ValueType == "TEXT" and _meaning(i) == "Reason for review"]
    assert reasons == list(m.review_reasons)
    numbers = {_meaning(i): float(i.MeasuredValueSequence[0].NumericValue)
               for i in items if i.ValueType == "NUM" and "MeasuredValueSequence" in i}
    for label, p in m.labels.items():
        assert numbers[f"Probability of {label}"] == pytest.approx(p, abs=1e-6)
    assert numbers["Model uncertainty"] == pytest.approx(m.uncertainty, abs=1e-6)
    # The region is on the original image the model explained, by its original UID.
    (region,) = [i for i in items if i.ValueType == "SCOORD"]
    ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert ref == linked.originals.sop_uids[m.explanation["instance"]]
    x, y, w, h = m.explanation["bbox"]
    assert list(region.GraphicData)[:4] == [x, y, x + w, y]
    evidence = {i.ReferencedSOPInstanceUID
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == set(linked.originals.sop_uids)
    assert "PredecessorDocumentsSequence" not in sr


def test_a_new_version_replaces_the_earlier_sr(linked: Linked, tmp_path: Path,
                                               demo_engine: InferenceEngine) -> None:
    first = build_sr(linked.issuer, linked.record)
    more = original_study(tmp_path / "more", n=1, seed=11, study_uid=linked.originals.study_uid)
    dstudy, result, captured = process(more, demo_engine, linked.issuer.uid_key, version=2)
    assert linked.store.record(dstudy, result, captured)
    second = build_sr(linked.issuer, linked.store.get(dstudy.study_ref, 2))
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    (pred,) = second.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == linked.originals.study_uid
    (series,) = pred.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == first.SOPClassUID


def test_uids_are_stable_per_study_version_and_kind(linked: Linked) -> None:
    once = {o.kind: o.sop_instance_uid for o in build_all(linked.issuer, linked.record)[0]}
    again = {o.kind: o.sop_instance_uid for o in build_all(linked.issuer, linked.record)[0]}
    assert once == again and len(set(once.values())) == len(once) == 3
    other_box = Issuer("site-a", "edge-1", random_key())
    assert not set(once.values()) & {o.sop_instance_uid
                                     for o in build_all(other_box, linked.record)[0]}
    # None is an original UID or a de-identified one.
    assert not set(once.values()) & set(linked.originals.sop_uids)


@needs_dcmtk
def test_key_image_rendered_by_dcmtk_shows_region_and_text(linked: Linked,
                                                            tmp_path: Path) -> None:
    rec = linked.record
    (m,) = rec.result.models
    (sc,) = [o.dataset for o in build_all(linked.issuer, rec)[0] if o.kind == "sc"]
    assert sc.BurnedInAnnotation == "YES" and sc.SamplesPerPixel == 3
    where = m.explanation["instance"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == linked.originals.sop_uids[where]
    path, ppm = tmp_path / "sc.dcm", tmp_path / "sc.ppm"
    sc.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dcmj2pnm", "+op", str(path), str(ppm)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    shown = _read_ppm(ppm)
    scale = shown.shape[0] // int(rec.sources[where].Rows)
    assert scale >= 1 and shown.shape[0] == int(rec.sources[where].Rows) * scale
    x, y, w, h = (v * scale for v in m.explanation["bbox"])
    yellow = np.all(shown == REGION_RGB, axis=-1)
    # The rectangle: its edges are yellow, the inside and the rest of the image are not.
    assert yellow[y + h // 2, x] and yellow[y + h // 2, x + w - 1]
    assert yellow[y, x + w // 2] and yellow[y + h - 1, x + w // 2]
    inside = yellow[y + 3:y + h - 3, x + 3:x + w - 3]
    assert inside.size and not inside.any()
    outline = np.zeros_like(yellow)
    outline[y:y + h, x:x + w] = True
    assert not (yellow & ~outline).any()
    # Inside the region the pixels are the original, rendered with its own window.
    source = linked.originals.datasets[where]
    grey = np.repeat(np.repeat(render(source), scale, axis=0), scale, axis=1)
    assert np.array_equal(shown[y + 3:y + h - 3, x + 3:x + w - 3],
                          grey[y + 3:y + h - 3, x + 3:x + w - 3])
    # The banner: black with white words in the top left corner, nowhere near grey.
    band = shown[: shown.shape[0] // 12, : shown.shape[1] // 3]
    white = np.all(band == 255, axis=-1).mean()
    black = np.all(band == 0, axis=-1).mean()
    assert 0.03 < white < 0.5 and black > 0.4
    below = shown[shown.shape[0] // 2:, :]
    assert np.all(below[..., 0] == below[..., 2]) or yellow[shown.shape[0] // 2:].any()
    # Text was drawn: the banner differs from the image underneath it there.
    assert not np.array_equal(band, grey[: band.shape[0], : band.shape[1]])


def _read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P6"
    cols, rows, top = int(parts[1]), int(parts[2]), int(parts[3])
    assert top == 255
    return np.frombuffer(parts[4][: rows * cols * 3], np.uint8).reshape(rows, cols, 3)


def test_seg_only_for_a_declared_mask(linked: Linked) -> None:
    mask = _mask(linked)
    (m,) = linked.record.result.models
    # The demo model's manifest declares no mask: it gets no SEG.
    demo = load_manifest(REPO / "models" / "lesion-demo" / "1.0.0" / "manifest.toml")
    assert demo.mask is None
    with pytest.raises(ResultError, match="declares no mask"):
        build_seg(linked.issuer, linked.record, m, demo.mask, mask.index, mask.pixels)
    assert "seg" not in {o.kind for o in build_all(linked.issuer, linked.record)[0]}
    seg = build_seg(linked.issuer, linked.record, m, mask.spec, mask.index, mask.pixels)
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == m.name
    src = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert src.ReferencedSOPInstanceUID == linked.originals.sop_uids[mask.index]
    frame = seg.pixel_array.astype(bool)
    assert frame.shape == mask.pixels.shape and np.array_equal(frame, mask.pixels)
    with pytest.raises(ResultError, match="empty"):
        build_seg(linked.issuer, linked.record, m, mask.spec, mask.index,
                  np.zeros_like(mask.pixels))
    with pytest.raises(ResultError, match="mask is"):
        build_seg(linked.issuer, linked.record, m, mask.spec, mask.index, mask.pixels[1:])


def test_manifest_mask_declaration_is_parsed_and_checked() -> None:
    raw = (REPO / "models" / "lesion-demo" / "1.0.0" / "manifest.toml").read_bytes()
    spec = parse_manifest(raw + b'\n[mask]\noutput = "mask"\nlabel = "lesion"\n').mask
    assert spec == MaskOutput("mask", "lesion", 0.5)
    with pytest.raises(Exception, match=r"\[mask\] needs output"):
        parse_manifest(raw + b'\n[mask]\nthreshold = 0.4\n')


def test_no_sr_without_a_model_output(tmp_path: Path, demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    empty = type(ln.record)(**{**ln.record.__dict__,
                               "result": type(ln.record.result)(
                                   **{**ln.record.result.__dict__, "models": (),
                                      "status": "no_applicable_model"})})
    objects, skipped = build_all(ln.issuer, empty)
    assert objects == [] and "no model output" in skipped[0]
