"""Sequences the profile removes, empties or replaces, through the real entry points:
the `edge-agent deid` / `reidentify` commands as subprocesses, and the daemon
receiving the instance over DICOM and publishing its result over mutual-TLS MQTT.

The instance carries an institution, an operator and a verifying observer in
code sequences (the content PS3.15 says must go with the sequence), an ethics
committee (a D attribute) and a name inside a safe private sequence.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.deid import Deidentifier, DeidSettings
from agent.deid.values import DUMMY_BY_VR
from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, audit_events, storescu
from tests.helpers.deid import KEY, Recipient, sample_path

INSTITUTION = "St Elsewhere Hospital"
OPERATOR = "Jane Doolittle"
ETHICS = "Elsewhere Ethics Board"
# Everything of the sequences' content that must not come out (checked case-insensitively).
NEEDLES = (
    "Elsewhere", "STELSE01", "Doolittle", "OPJD4711", "Vervoort", "VOBS0815", "EEB-2024-77",
    "Quincy", "1.2.826.0.1.3680043.10.1077.70.",
)
PRIVATE_CREATOR = "Philips Imaging DD 001"
PRIVATE_SEQ = 0x2001105F  # a safe private sequence (Table E.3.10-1)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99STE"
    item.CodeMeaning = meaning
    return item


def make_instance(path: Path) -> Path:
    ds = pydicom.dcmread(sample_path("CT_small.dcm"))
    ds.BurnedInAnnotation = "NO"
    ds.PatientName = "Quincy^Quentin"
    ds.PatientID = "PID-QUINCY-1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1077.70.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1077.70.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1077.70.3"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstitutionName = INSTITUTION
    ds.InstitutionCodeSequence = Sequence([_code("STELSE01", INSTITUTION)])
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = Sequence([_code("OPJD4711", OPERATOR)])
    operator.InstitutionName = INSTITUTION
    operator.InstitutionCodeSequence = Sequence([_code("STELSE01", INSTITUTION)])
    ds.OperatorIdentificationSequence = Sequence([operator])
    ds.OperatorsName = "Doolittle^Jane"
    observer = Dataset()
    observer.VerifyingObserverName = "Vervoort^Vera"
    observer.VerifyingOrganization = INSTITUTION
    observer.VerificationDateTime = "20240102101010"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([_code("VOBS0815", "Vera Vervoort")])
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.ClinicalTrialProtocolEthicsCommitteeName = ETHICS
    ds.ClinicalTrialProtocolEthicsCommitteeApprovalNumber = "EEB-2024-77"
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "Elsewhere Pathology"
    ds.IssuerOfTheSpecimenIdentifierSequence = Sequence([issuer])
    hidden = Dataset()
    hidden.PatientName = "Quincy^Quentin"
    hidden.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1077.70.9"
    block = ds.private_block(PRIVATE_SEQ >> 16, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SEQ & 0xFF, "SQ", Sequence([hidden]))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def leaked(data: bytes, needles: tuple[str, ...] = NEEDLES) -> list[str]:
    upper = data.upper()
    return [n for n in needles if n.upper().encode() in upper]


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def deid_one(tmp_path: Path, name: str, *args: str) -> tuple[pydicom.Dataset, bytes]:
    src = make_instance(tmp_path / "in" / "ct.dcm")
    out = tmp_path / name
    proc = edge_agent("deid", str(src.parent), str(out), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "de-identified: 1" in proc.stdout
    (path,) = sorted(p for p in out.rglob("*.dcm"))
    data = path.read_bytes()
    return pydicom.dcmread(path), data


def test_cli_strip_removes_empties_and_replaces_sequences_whole(tmp_path: Path) -> None:
    ds, data = deid_one(tmp_path, "out")
    assert leaked(data) == []
    # X/Z/D and X/D sequences in Type 3 places: removed with everything inside
    assert "InstitutionCodeSequence" not in ds
    assert "OperatorIdentificationSequence" not in ds
    # D sequence: one dummy item carrying nothing of the original
    (observer,) = ds.VerifyingObserverSequence
    assert observer.VerifyingObserverName == DUMMY_BY_VR["PN"]
    assert observer.VerifyingOrganization == DUMMY_BY_VR["LO"]
    assert observer.VerificationDateTime == DUMMY_BY_VR["DT"]
    (code,) = observer.VerifyingObserverIdentificationCodeSequence
    assert code.CodeMeaning == DUMMY_BY_VR["LO"]
    # Z sequence: zero items
    assert len(ds.IssuerOfTheSpecimenIdentifierSequence) == 0
    # D attribute: a dummy value, not removed; its Type 1C condition, the approval
    # number (X), becomes a dummy too so that the output stays valid
    assert ds.ClinicalTrialProtocolEthicsCommitteeName == DUMMY_BY_VR["LO"]
    assert ds.ClinicalTrialProtocolEthicsCommitteeApprovalNumber == DUMMY_BY_VR["LO"]
    assert PRIVATE_SEQ not in ds


def test_cli_options_keep_what_they_name_and_nothing_more(tmp_path: Path) -> None:
    ds, data = deid_one(tmp_path, "out", "--option", "retain_institution_identity",
                        "--option", "retain_safe_private")
    # Retain Institution Identity keeps the institution code and the ethics committee ...
    assert ds.InstitutionCodeSequence[0].CodeMeaning == INSTITUTION
    assert ds.InstitutionName == INSTITUTION
    assert ds.ClinicalTrialProtocolEthicsCommitteeName == ETHICS
    # ... but no option keeps the operator or the observer
    assert "OperatorIdentificationSequence" not in ds
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName == DUMMY_BY_VR["PN"]
    # the safe private sequence stays, and the profile applies inside it
    (hidden,) = ds[PRIVATE_SEQ].value
    assert str(hidden.PatientName) != "Quincy^Quentin"
    assert str(hidden.ReferencedSOPInstanceUID).startswith("2.25.")
    others = tuple(n for n in NEEDLES if n not in ("Elsewhere", "STELSE01"))
    assert leaked(data, others) == []


def test_cli_encrypt_keeps_the_originals_only_for_the_recipient(tmp_path: Path, recipient: Recipient) -> None:
    ds, data = deid_one(tmp_path, "out", "--mode", "encrypt", "--recipient", str(recipient.cert_path))
    assert leaked(data) == []
    assert "InstitutionCodeSequence" not in ds and "OperatorIdentificationSequence" not in ds
    back = tmp_path / "back"
    proc = edge_agent("reidentify", str(tmp_path / "out"), str(back), "--key", str(recipient.key_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = sorted(back.rglob("*.dcm"))
    restored = pydicom.dcmread(path)
    assert restored.InstitutionCodeSequence[0].CodeMeaning == INSTITUTION
    operator = restored.OperatorIdentificationSequence[0]
    assert operator.PersonIdentificationCodeSequence[0].CodeMeaning == OPERATOR
    assert restored.VerifyingObserverSequence[0].VerifyingObserverName == "Vervoort^Vera"
    assert restored.ClinicalTrialProtocolEthicsCommitteeName == ETHICS


def test_removed_content_feeds_the_egress_guard(tmp_path: Path) -> None:
    # The daemon's egress guard blocks any payload quoting an original value of the
    # study; what a removed or replaced sequence held is such a value too.
    ds = pydicom.dcmread(make_instance(tmp_path / "ct.dcm"))
    outcome = Deidentifier(DeidSettings(), KEY).deidentify(ds)
    assert {INSTITUTION, OPERATOR, "Vera Vervoort", "Elsewhere Pathology"} <= outcome.phi
    assert "Vervoort" in outcome.phi  # name parts of a PN inside a replaced sequence


def test_referenced_pps_sequence_is_emptied_where_type2_and_removed_elsewhere(tmp_path: Path) -> None:
    engine = Deidentifier(DeidSettings(), KEY)
    for sop_class, expect_items in (("1.2.840.10008.5.1.4.1.1.88.22", 0), ("1.2.840.10008.5.1.4.1.1.2", None)):
        ds = pydicom.dcmread(make_instance(tmp_path / "ct.dcm"))
        ds.SOPClassUID = sop_class
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
        ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.10.1077.70.7"
        ds.ReferencedPerformedProcedureStepSequence = Sequence([ref])
        out = engine.deidentify(ds).dataset
        assert out is not None
        seq = out.get("ReferencedPerformedProcedureStepSequence")
        # SR Document Series: Type 2, so Z (zero items); General Series: Type 3, so X
        assert (None if seq is None else len(seq)) == expect_items, sop_class


def test_safe_private_sequence_from_implicit_vr_never_leaks(tmp_path: Path) -> None:
    # Read from implicit VR a private sequence is a sequence only if its VR is known
    # (pydicom knows Philips' (2001,xx5F), not Siemens' (0119,xx02)): the known one is
    # processed item by item, the unreadable one removed; neither leaks its content.
    ds = pydicom.dcmread(make_instance(tmp_path / "ct.dcm"))
    block = ds.private_block(0x0119, "SIEMENS Ultrasound SC2000", create=True)
    hidden = Dataset()
    hidden.PatientName = "Quincy^Quentin"
    block.add_new(0x02, "SQ", Sequence([hidden]))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    implicit = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    out = Deidentifier(DeidSettings(options=frozenset({"retain_safe_private"})), KEY).deidentify(implicit)
    assert out.dataset is not None
    out.dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    out.dataset.save_as(buf, enforce_file_format=True)
    assert leaked(buf.getvalue(), ("Quincy",)) == []
    assert str(out.dataset[PRIVATE_SEQ].value[0].PatientName) != "Quincy^Quentin"
    assert 0x01191002 not in out.dataset


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_daemon_result_carries_nothing_of_the_sequences(
    tmp_path: Path, box: Box, daemon: Daemon, ops: Subscriber
) -> None:
    # The daemon keeps de-identified instances inside the box (they reach only the
    # models), so what can be checked from outside is everything it emits.
    src = make_instance(tmp_path / "in" / "ct.dcm")
    proc = storescu(box.dicom_port, [src])
    assert proc.returncode == 0, proc.stderr
    ev = ops.wait("results", 1, timeout=90)[0].json()
    study = ev["data"]["study"]
    assert study["instances_received"] == 1
    assert study["instances_processed"] == 1, study  # de-identified, not quarantined or failed
    assert daemon.stop() == 0
    emitted = "\n".join(m.topic + m.payload.decode() for m in ops.messages).encode()
    assert leaked(emitted) == []
    assert leaked(daemon.log_text().encode()) == []
    assert leaked(json.dumps(audit_events(box)).encode()) == []
