"""The result objects, sent with pynetdicom C-STORE to a real Orthanc that holds the
original study, arrive in that study (original PatientID and StudyInstanceUID), and a
re-send keeps the same instances (same SOP Instance UIDs, no second copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from agent.infer import InferenceEngine
from agent.infer.manifest import MaskOutput
from agent.results.build import Mask, build_all
from tests.helpers.orthanc import Orthanc
from tests.helpers.results import PATIENT_ID, link

pytestmark = pytest.mark.skipif(not Orthanc.available(),
                                reason="Orthanc (Debian package) not installed")


def _send(port: int, aet: str, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="EDGE_AGENT")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_objects_arrive_in_the_original_study(tmp_path: Path,
                                              demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    m = ln.record.result.models[0]
    x, y, w, h = m.explanation["bbox"]
    pixels = np.zeros((int(ln.record.sources[0].Rows), int(ln.record.sources[0].Columns)), bool)
    pixels[y:y + h, x:x + w] = True
    objects, skipped = build_all(ln.issuer, ln.record, masks={m.name: Mask(
        MaskOutput("mask", "lesion", 0.5), int(m.explanation["instance"]), pixels)})
    assert sorted(o.kind for o in objects) == ["gsps", "sc", "seg", "sr"], skipped

    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        for f in ln.originals.files:  # the PACS already holds the original study
            pacs.upload(f)
        (study_id,) = pacs.get("/studies")
        datasets = [o.dataset for o in objects]
        assert _send(pacs.dicom, pacs.aet, datasets) == [0] * len(datasets)
        assert _send(pacs.dicom, pacs.aet, datasets) == [0] * len(datasets)  # a re-send

        assert pacs.get("/studies") == [study_id]  # no new study, no new patient
        study = pacs.get(f"/studies/{study_id}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == ln.originals.study_uid
        assert study["PatientMainDicomTags"]["PatientID"] == PATIENT_ID
        stored = {i["MainDicomTags"]["SOPInstanceUID"]
                  for i in pacs.get(f"/studies/{study_id}/instances")}
        assert stored == set(ln.originals.sop_uids) | {o.sop_instance_uid for o in objects}
        for obj in objects:
            (hit,) = pacs.post("/tools/lookup", obj.sop_instance_uid.encode())
            tags = pacs.get(f"/instances/{hit['ID']}/simplified-tags")
            assert tags["StudyInstanceUID"] == ln.originals.study_uid
            assert tags["PatientID"] == PATIENT_ID
            assert tags["SOPClassUID"] == str(obj.dataset.SOPClassUID)
        modalities = {pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                      for s in pacs.get(f"/studies/{study_id}")["Series"]}
        assert modalities == {"CT", "SR", "PR", "OT", "SEG"}
    finally:
        pacs.stop()
