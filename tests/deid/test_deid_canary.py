"""MIDI-B style checks on the PHI-canary corpus: nothing leaks, kept data stays intact,
pseudonyms are consistent, keyed and stable."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset

from agent.deid import OPTIONS, Deidentifier, DeidSettings
from agent.deid.rules import resolve
from agent.deid.table import TABLE
from agent.errors import DeidError
from tests.helpers import deid_canary as dc
from tests.helpers.deid import KEY, OTHER_KEY, Recipient

N = 3


@pytest.fixture(scope="module")
def corpus() -> list[dc.Canary]:
    return [dc.build(i) for i in range(N)]


def _run(corpus: list[dc.Canary], settings: DeidSettings, key: bytes = KEY) -> list[Dataset]:
    engine = Deidentifier(settings, key)
    out = []
    for c in corpus:
        outcome = engine.deidentify(c.dataset)
        assert outcome.dataset is not None, outcome.quarantine_reason
        out.append(outcome.dataset)
    return out


def test_corpus_really_carries_the_markers(corpus: list[dc.Canary]) -> None:
    for c in corpus:
        present = dc.leaks(c, dc.to_bytes(c.dataset))
        assert len(present) > 600  # every marker kind is in the input bytes
        assert c.dataset.get_item(0x00091003).VR == "UN"  # private sequence read as UN


@pytest.mark.parametrize("mode", ["strip", "encrypt"])
def test_no_marker_anywhere_in_output(corpus: list[dc.Canary], mode: str, recipient: Recipient) -> None:
    settings = DeidSettings(
        mode="encrypt" if mode == "encrypt" else "strip",
        recipients=(recipient.cert,) if mode == "encrypt" else (),
    )
    for c, out in zip(corpus, _run(corpus, settings), strict=True):
        assert dc.leaks(c, dc.to_bytes(out)) == []


def test_phi_fingerprint_holds_the_identifiers(corpus: list[dc.Canary]) -> None:
    outcome = Deidentifier(DeidSettings(), KEY).deidentify(corpus[0].dataset)
    assert {"CANARYFAMILY", "CANARYGIVEN", dc.PATIENT_ID, dc.STUDY_UID} <= outcome.phi
    assert "PRIVLO00Q" in outcome.phi  # removed private text too
    assert "NEST000030Q" in outcome.phi  # and nested names
    assert "PHI" not in repr(outcome) and dc.PATIENT_ID not in repr(outcome)


def test_kept_attributes_and_pixels_intact(corpus: list[dc.Canary]) -> None:
    c = corpus[0]
    (out,) = _run([c], DeidSettings())
    src = c.dataset
    assert out.PixelData == src.PixelData
    for kw in ("Rows", "Columns", "PixelSpacing", "KVP", "ImageType", "Modality", "SOPClassUID"):
        assert out[kw].value == src[kw].value, kw
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert dc.to_bytes(out)[:128] == bytes(128)


def test_input_is_not_mutated(corpus: list[dc.Canary]) -> None:
    c = corpus[1]
    before = dc.to_bytes(c.dataset)
    _run([c], DeidSettings(options=frozenset({"clean_descriptors", "clean_graphics"})))
    assert dc.to_bytes(c.dataset) == before


def test_uids_and_patient_consistent_across_instances(corpus: list[dc.Canary]) -> None:
    outs = _run(corpus, DeidSettings())
    assert len({o.StudyInstanceUID for o in outs}) == 1
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert len({o.FrameOfReferenceUID for o in outs}) == 1
    assert len({o.SOPInstanceUID for o in outs}) == N
    assert len({o.PatientID for o in outs}) == 1
    for o in outs:
        assert o.StudyInstanceUID.startswith("2.25.") and len(o.StudyInstanceUID) <= 64
        assert o.StudyInstanceUID != dc.STUDY_UID
    # references inside sequences follow the referenced instance's new UID
    for i in range(1, N):
        ref = outs[i].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        assert ref == outs[i - 1].SOPInstanceUID


def test_pseudonyms_stable_across_engines_and_keyed(corpus: list[dc.Canary]) -> None:
    c = corpus[0]
    a = Deidentifier(DeidSettings(), KEY).deidentify(c.dataset)
    b = Deidentifier(DeidSettings(), KEY).deidentify(c.dataset)
    other = Deidentifier(DeidSettings(), OTHER_KEY).deidentify(c.dataset)
    assert a.dataset is not None and b.dataset is not None and other.dataset is not None
    assert (a.patient_ref, a.study_ref) == (b.patient_ref, b.study_ref)
    assert dc.to_bytes(a.dataset) == dc.to_bytes(b.dataset)
    assert a.patient_ref != other.patient_ref and a.study_ref != other.study_ref
    assert a.dataset.SOPInstanceUID != other.dataset.SOPInstanceUID
    assert a.dataset.PatientID == a.patient_ref and a.study_ref == a.dataset.StudyInstanceUID


def test_modified_dates_shift_by_one_per_patient_offset(corpus: list[dc.Canary]) -> None:
    # Clean Structured Content keeps the SR tree (without it Content Sequence, D, is
    # replaced by one dummy item), so a date inside it is shifted too.
    settings = DeidSettings(
        options=frozenset({"retain_longitudinal_modified_dates", "clean_structured_content"})
    )
    outs = _run(corpus, settings)
    offsets = set()
    for c, out in zip(corpus, outs, strict=True):
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
        for original, shifted in (
            (c.dataset.StudyDate, out.StudyDate),
            (c.dataset.SeriesDate, out.SeriesDate),
            (c.dataset.ContentSequence[2].Date, out.ContentSequence[2].Date),
        ):
            d0 = dt.datetime.strptime(original, "%Y%m%d").date()
            d1 = dt.datetime.strptime(shifted, "%Y%m%d").date()
            offsets.add((d1 - d0).days)
        assert str(out.AcquisitionDateTime).endswith("101010")  # time of day kept
        assert out.PatientBirthDate == ""  # no date option covers birth dates
    assert len(offsets) == 1 and -3680 < offsets.pop() <= -30
    other = Deidentifier(settings, OTHER_KEY).deidentify(corpus[0].dataset).dataset
    assert other is not None and other.StudyDate != outs[0].StudyDate


def test_full_dates_kept(corpus: list[dc.Canary]) -> None:
    (out,) = _run(corpus[:1], DeidSettings(options=frozenset({"retain_longitudinal_full_dates"})))
    assert out.StudyDate == corpus[0].dataset.StudyDate
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_options_keep_what_they_promise_and_clean_the_rest(corpus: list[dc.Canary]) -> None:
    opts = frozenset(OPTIONS) - {"retain_longitudinal_full_dates", "retain_uids"}
    c = corpus[0]
    (out,) = _run([c], DeidSettings(options=opts))
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == sorted(
        ["113100", "113103", "113104", "113105", "113107", "113108", "113109", "113111", "113112"]
    )
    # device and institution identity kept; AE titles replaced by a keyed token
    assert out.DeviceSerialNumber == c.dataset.DeviceSerialNumber
    assert out.InstitutionName == c.dataset.InstitutionName
    assert out.StationAETitle != c.dataset.StationAETitle if "StationAETitle" in out else True
    # safe private kept with its creator; an unsafe element of the same block removed
    assert out[0x70531000].value == "1.5" and out[0x70530010].value == dc.SAFE_CREATOR
    assert 0x70531077 not in out and 0x00091001 not in out and 0x00091003 not in out
    # descriptors keep their text but lose the identifiers they quote
    assert out.StudyDescription.startswith("CT HEAD for ")
    for ident in ("CANARYFAMILY", dc.PATIENT_ID, "CANARYGIVEN"):
        assert ident not in out.StudyDescription + out.SeriesDescription
    assert "SRTEXT00Q said" in out.ContentSequence[0].TextValue
    assert "CANARYFAMILY" not in out.ContentSequence[0].TextValue
    assert out.ContentSequence[1].PersonName != "SRNAME00Q"
    # clean graphics: overlay geometry kept, bitmap blanked; curves gone
    assert out[0x60000010].value == c.dataset[0x60000010].value
    assert set(out[0x60003000].value) == {0}
    assert out[0x60000022].value == "OVLDESC00Q [removed]"  # overlay text scrubbed
    assert not any(e.tag >> 16 == 0x5000 for e in out)
    # whatever survives is only what these options keep on purpose
    engine = Deidentifier(DeidSettings(options=opts), KEY)
    kept_rows = {r.tag.replace(",", ",") for r in TABLE.rows if resolve(r, opts).action in ("K", "C")}
    data = dc.to_bytes(out)
    leaked = {w for m, w in c.text.items() if m.upper().encode() in data.upper()}
    leaked |= {w for u, w in c.uids.items() if u.encode() in data}
    unexpected = {
        w
        for w in leaked
        if w.split(" ")[0] not in kept_rows
        and w not in {"OverlayDescription", "OverlayLabel", "OverlayComments"}
        and w != "ContentSequence > TextValue"
    }
    assert unexpected == set()
    assert engine.describe().endswith(", ".join(sorted(opts)))


def test_overlay_group_removed_as_a_whole_in_basic(corpus: list[dc.Canary]) -> None:
    (out,) = _run(corpus[:1], DeidSettings())
    assert not any(0x6000 <= e.tag >> 16 <= 0x601E for e in out)


def test_malformed_input_raises_deid_error() -> None:
    ds = Dataset()
    ds.PatientName = "X^Y"
    with pytest.raises(DeidError):
        Deidentifier(DeidSettings(), KEY).deidentify(ds)


def test_invalid_settings_report_every_problem() -> None:
    settings = DeidSettings(
        mode="encrypt",
        options=frozenset({"bogus", "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"}),
    )
    problems = settings.problems()
    assert len(problems) == 3
    with pytest.raises(DeidError):
        Deidentifier(settings, KEY)
