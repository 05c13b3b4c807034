"""Storage Commitment (push model) against a real Orthanc, received by the real daemon.

Orthanc answers our N-ACTION and sends the N-EVENT-REPORT on a NEW association to
the AE it knows as the requester (DicomModalities), i.e. to the daemon's DICOM port:
the daemon's acceptor takes it (Storage Commitment in the SCP role of the requestor)
and hands it to the results delivery.  The queue entries and the link are released
only after that report, and the SEG of a mask output arrives in the study."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Box, Daemon, audit_events, storescu, wait_for
from tests.helpers.delivery import add_destination, enable_delivery
from tests.helpers.orthanc import Orthanc
from tests.helpers.results import PATIENT_ID, original_study

pytestmark = [pytest.mark.peer("storescu", "Orthanc")]


def test_orthancs_report_on_a_new_association_releases_the_link(
        tmp_path: Path, box: Box, broker: object) -> None:
    originals = original_study(tmp_path / "study")
    pacs = Orthanc(tmp_path / "orthanc",
                   modalities={"edge": (box.ae_title, "127.0.0.1", box.dicom_port)}).start()
    enable_delivery(box, commitment_wait_seconds="0")  # Orthanc reports on its own association
    add_destination(box, "pacs", pacs.aet, pacs.dicom, storage_commitment="true")
    daemon = Daemon(box)
    try:
        for f in originals.files:
            pacs.upload(f)
        (study_id,) = pacs.get("/studies")
        daemon.start()
        assert storescu(box.dicom_port, list(originals.files)).returncode == 0

        def events(name: str) -> list[dict[str, object]]:
            return [e for e in audit_events(box, 4000) if e["event"] == name]

        wait_for(lambda: len(events("results.committed")) >= 3, 240,
                 "Orthanc's storage commitment report applied")
        wait_for(lambda: events("results.link_shredded"), 60, "the link released")
        stored = pacs.get(f"/studies/{study_id}/instances")
        tags = [pacs.get(f"/instances/{i['ID']}/simplified-tags") for i in stored]
    finally:
        daemon.stop()
        pacs.stop()
    sent = events("results.sent")
    committed = events("results.committed")
    reports = events("commitment.report")
    # Every object was sent, then committed by the report Orthanc sent on its own
    # association (audited by the node with Success), and only then released.
    assert len(sent) == 3 and len(committed) == 3
    assert all(e["details"]["result"] == "committed" for e in committed)
    assert reports and all(e["details"]["status"] == "0x0000" for e in reports)
    assert sum(int(str(e["details"]["committed"])) for e in reports) == 3
    assert [e["details"]["reason"] for e in events("results.link_shredded")] == ["released"]
    mine = [t for t in tags if t["SOPInstanceUID"] in
            {str(e["details"]["sop_instance_uid"]) for e in sent}]
    assert sorted(t["Modality"] for t in mine) == ["OT", "PR", "SR"]
    assert all(t["StudyInstanceUID"] == originals.study_uid and t["PatientID"] == PATIENT_ID
               for t in mine)
