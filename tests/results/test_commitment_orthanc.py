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


def test_report_for_an_unknown_transaction_is_refused_and_roles_stay_narrow(
        box: Box, broker: object) -> None:
    """A report for a transaction the box never started gets 0x0110 and the node keeps
    serving; a peer asking for the SCP role of a storage SOP class does not get it,
    and one offering commitment without the SCP role gets that context as its SCU
    only (a modality's commitment requests: the box is Storage Commitment SCP too)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StorageCommitmentPushModel,
        Verification,
    )

    enable_delivery(box)
    add_destination(box, "pacs", "NOWHERE", 9, storage_commitment="true")  # never reached
    daemon = Daemon(box)
    daemon.start()
    try:
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(StorageCommitmentPushModel)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        roles = [build_role(StorageCommitmentPushModel, scp_role=True),
                 build_role(CTImageStorage, scu_role=True, scp_role=True)]
        assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title, ext_neg=roles)
        assert assoc.is_established
        by_class = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
        commit_cx = by_class[str(StorageCommitmentPushModel)]
        assert commit_cx.as_scp and not commit_cx.as_scu  # we accepted it as its SCP
        ct = by_class[str(CTImageStorage)]
        assert ct.as_scu and not ct.as_scp  # the SCP role of storage stays refused
        info = Dataset()
        info.TransactionUID = "2.25.123456789"
        ref = Dataset()
        ref.ReferencedSOPClassUID = str(CTImageStorage)
        ref.ReferencedSOPInstanceUID = "2.25.1"
        info.ReferencedSOPSequence = [ref]
        status, _ = assoc.send_n_event_report(info, 1, StorageCommitmentPushModel,
                                              "1.2.840.10008.1.20.1.1")
        assert status is not None and status.Status == 0x0110
        assert assoc.send_c_echo().Status == 0x0000  # still serving
        assoc.release()

        # Without the SCP role proposed, the commitment context is accepted with the
        # requestor as SCU only (default roles).
        plain = AE(ae_title="ORTHANC")
        plain.add_requested_context(StorageCommitmentPushModel)
        plain.add_requested_context(Verification)
        assoc = plain.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
        assert assoc.is_established
        plain_cx = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
        assert set(plain_cx) == {str(Verification), str(StorageCommitmentPushModel)}
        assert plain_cx[str(StorageCommitmentPushModel)].as_scu
        assert not plain_cx[str(StorageCommitmentPushModel)].as_scp
        assoc.release()
    finally:
        daemon.stop()
    reports = [e for e in audit_events(box, 2000) if e["event"] == "commitment.report"]
    assert [e["details"]["status"] for e in reports] == ["0x0110"]
    assert reports[0]["outcome"] not in (0, "success")


def test_a_failed_sop_report_on_a_new_association_resends_that_object(
        box: Box, broker: object, tmp_path: Path) -> None:
    """A PACS reporting on its own association (like Orthanc) that one object failed:
    only that object is sent again (same UID) and committed on the next request."""
    from tests.helpers.delivery import CommittingPeer, assert_first_refused_then_committed

    originals = original_study(tmp_path / "study")
    # the box as provisioned allows calling AE "ORTHANC" ([[dicom.peers]])
    peer = CommittingPeer("ORTHANC", report_to=(box.ae_title, box.dicom_port),
                          refuse_first=True)
    enable_delivery(box, commitment_wait_seconds="0")
    add_destination(box, "pacs", peer.aet, peer.port, storage_commitment="true")
    daemon = Daemon(box)
    daemon.start()
    try:
        peer.start()
        assert storescu(box.dicom_port, list(originals.files)).returncode == 0
        wait_for(lambda: [e for e in audit_events(box, 2000)
                          if e["event"] == "results.link_shredded"], 240, "the link released")
    finally:
        daemon.stop()
        peer.stop()
    audit = audit_events(box, 2000)
    assert_first_refused_then_committed(peer, audit)
    assert [e["details"]["status"] for e in audit if e["event"] == "commitment.report"] == \
        ["0x0000", "0x0000"]
