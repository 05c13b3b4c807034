"""Property-based fuzzing (hypothesis) of what untrusted bytes reach first:
the receive header parser, pydicom parsing as the pipeline does it, and the
de-identification engine.  Quick tier: a few hundred examples per property;
slow tier: thousands, with a memory bound."""

from __future__ import annotations

import copy
import io
import os
import resource

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from agent.deid import Deidentifier, DeidSettings
from agent.dicom.header import Header, _fast_header, parse_header, pydicom_header
from agent.dicom.status import Refused
from agent.errors import DeidError
from agent.pipeline import parse_instance
from tests.helpers.dicom import sample

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

KEY = bytes(range(32))
QUICK = settings(max_examples=150, deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=3000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_CT = sample()  # pydicom's CT_small.dcm, unchanged: the seed of every case


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


SEED_PART10 = _part10(_CT)
SEED_BODY = SEED_PART10[SEED_PART10.index(b"\x08\x00\x05\x00"):]  # data set after file meta
_implicit = copy.deepcopy(_CT)
_implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
_IMPLICIT_PART10 = _part10(_implicit)
SEED_BODY_IMPLICIT = _IMPLICIT_PART10[_IMPLICIT_PART10.index(b"\x08\x00\x05\x00"):]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few byte flips, an insertion, a deletion and/or a truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        del data[i:i + draw(st.integers(1, 128))]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


TS = st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.2",
                      "1.2.840.10008.1.2.4.50"])


def _check_header(data: bytes, ts: str, complete: bool) -> None:
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        _same_as_pydicom(data, ts)
    try:
        h = parse_header(data, ts, complete=complete)
    except Refused as r:
        assert r.status in (0xC210, 0xA700, 0xA900, 0xC000, 0x0122) or r.status >= 0xA000
        return
    assert h is None or isinstance(h, Header)
    if h is not None:
        assert 0 < len(h.study_uid) <= 64
        assert h.declared_pixel_bytes >= 0


@QUICK
@given(data=st.binary(max_size=2048), ts=TS, complete=st.booleans())
def test_header_parser_on_random_bytes(data: bytes, ts: str, complete: bool) -> None:
    _check_header(data, ts, complete)


@QUICK
@given(data=mutated(SEED_BODY), complete=st.booleans())
def test_header_parser_on_mutated_ct(data: bytes, complete: bool) -> None:
    _check_header(data, ExplicitVRLittleEndian, complete)


def _same_as_pydicom(data: bytes, ts: str) -> None:
    """Where the hand-written header walk answers, pydicom answers the same."""
    fast = _fast_header(memoryview(data), implicit=ts == ImplicitVRLittleEndian)
    if fast is None:
        return
    for complete in (False, True):
        assert pydicom_header(data, ts, complete=complete) == fast


@QUICK
@given(data=mutated(SEED_BODY))
def test_fast_header_walk_agrees_with_pydicom_on_mutated_ct(data: bytes) -> None:
    _same_as_pydicom(data, ExplicitVRLittleEndian)


@QUICK
@given(data=mutated(SEED_BODY_IMPLICIT))
def test_fast_header_walk_agrees_with_pydicom_on_mutated_implicit_ct(data: bytes) -> None:
    _same_as_pydicom(data, ImplicitVRLittleEndian)


def test_fast_header_walk_answers_the_common_case() -> None:
    """The seeds themselves take the fast path (else the agreement tests prove nothing)."""
    for body, ts in ((SEED_BODY, ExplicitVRLittleEndian),
                     (SEED_BODY_IMPLICIT, ImplicitVRLittleEndian)):
        h = _fast_header(memoryview(body), implicit=ts == ImplicitVRLittleEndian)
        assert h is not None and h == pydicom_header(body, ts, complete=True)
        assert h.study_uid == _CT.StudyInstanceUID and h.declared_pixel_bytes == 128 * 128 * 2


def _pipeline_parse(raw: bytes) -> None:
    """What Pipeline.deidentify does with an inbox file's plaintext: only
    DeidError may come out (anything else would abort the assembler cycle and
    retry the same study forever)."""
    deid = Deidentifier(DeidSettings(), KEY)
    try:
        deid.deidentify(parse_instance(raw))
    except DeidError:
        pass


@QUICK
@given(raw=mutated(SEED_PART10))
def test_pipeline_parse_of_mutated_part10_raises_only_handled_errors(raw: bytes) -> None:
    _pipeline_parse(raw)


MARK = "ZQXMARK"
marker = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=6, max_size=10).map(
    lambda s: MARK + s)

# Elements the basic profile must remove or replace (text PHI).
PHI_TEXT = ["PatientName", "PatientID", "OtherPatientNames", "AccessionNumber",
            "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "OperatorsName",
            "PerformingPhysicianName", "StudyDescription", "SeriesDescription", "StudyID",
            "PatientAddress", "RequestingPhysician", "PatientComments",
            "AdditionalPatientHistory", "ImageComments", "DeviceSerialNumber", "StationName"]


@st.composite
def planted(draw: st.DrawFn) -> tuple[Dataset, str]:
    """A CT with a secret planted in random PHI elements, nested sequences and a
    private block; also random junk in harmless elements."""
    m = draw(marker)
    ds = copy.deepcopy(_CT)
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for kw in draw(st.lists(st.sampled_from(PHI_TEXT), min_size=1, max_size=8, unique=True)):
        setattr(ds, kw, m if kw != "PatientName" else f"{m}^Given")
    depth = draw(st.integers(0, 3))
    holder: Dataset = ds
    for _ in range(depth):
        item = Dataset()
        item.PatientID = m
        item.CodeMeaning = draw(st.text(max_size=20))
        holder.OtherPatientIDsSequence = Sequence([item])
        holder = item
    if draw(st.booleans()):
        block = ds.private_block(0x0011, "ZQX PRIVATE", create=True)
        block.add_new(0x10, "LO", m)
    if draw(st.booleans()):
        ds.RequestAttributesSequence = Sequence([Dataset()])
        ds.RequestAttributesSequence[0].RequestedProcedureID = m
    ds.PatientBirthDate = draw(st.sampled_from(["19311204", "", "2000", "notadate"]))
    if draw(st.booleans()):
        ds.BurnedInAnnotation = draw(st.sampled_from(["YES", "NO", "", "maybe"]))
    return ds, m


def _deid_no_leak(case: tuple[Dataset, str]) -> None:
    ds, m = case
    deid = Deidentifier(DeidSettings(), KEY)
    try:
        out = deid.deidentify(ds)
    except DeidError:
        return  # refused cleanly: the pipeline fails the instance, nothing published
    if out.dataset is None:
        assert out.quarantine_reason
        return
    assert m not in str(out.dataset)
    assert m.encode() not in _part10(out.dataset)
    assert ds.StudyInstanceUID not in str(out.dataset)
    assert ds.SOPInstanceUID not in str(out.dataset)
    assert m not in out.study_ref and m not in out.patient_ref


@QUICK
@given(case=planted())
def test_deid_never_leaks_a_planted_marker(case: tuple[Dataset, str]) -> None:
    _deid_no_leak(case)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
@LONG
@given(raw=mutated(SEED_PART10), data=st.binary(max_size=4096), ts=TS,
       case=planted())
def test_long_fuzz_all_with_bounded_memory(raw: bytes, data: bytes, ts: str,
                                           case: tuple[Dataset, str]) -> None:
    _pipeline_parse(raw)
    _check_header(data, ts, complete=True)
    _deid_no_leak(case)
    # Peak RSS of this process: parsing thousands of hostile inputs must not
    # accumulate memory (a bound generous for the Python + numpy baseline).
    assert _rss_mib() < float(os.environ.get("EDGE_FUZZ_RSS_MIB", "1024"))
