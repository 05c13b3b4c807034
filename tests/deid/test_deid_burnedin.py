"""Burned-in annotation: quarantine rules and pixel-clean blackout."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from agent.deid import Deidentifier, DeidSettings, PixelCleanRule, burnedin
from agent.deid.pseudonym import Pseudonymizer
from agent.uplink.vocabulary import QUARANTINE
from tests.helpers.deid import KEY, sample_path

US_RULE = PixelCleanRule(
    manufacturer="G.E. Medical Systems",
    model="LOGIQ 700",
    rows=480,
    columns=640,
    rectangles=((0, 0, 640, 40), (500, 400, 100, 50)),
)


def _sample(name: str) -> Dataset:
    return pydicom.dcmread(sample_path(name))


def _deid(ds: Dataset, rules: tuple[PixelCleanRule, ...] = ()) -> tuple[Dataset | None, str | None]:
    outcome = Deidentifier(DeidSettings(pixel_clean=rules), KEY).deidentify(ds)
    return outcome.dataset, outcome.quarantine_reason


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("US1_UNCR.dcm", "burned-in-possible-modality"),
        ("SC_rgb.dcm", "burned-in-possible-modality"),  # modality OT
        ("MR_small.dcm", "burned-in-possible-derived"),
    ],
)
def test_risky_images_without_explicit_no_are_quarantined(name: str, expect: str) -> None:
    out, reason = _deid(_sample(name))
    assert out is None
    assert reason == QUARANTINE[expect] and burnedin.reason_code(reason) == expect


def test_quarantine_reason_names_the_rule_not_the_value() -> None:
    """A modality that writes the patient's name into the code strings the rule reads
    (seen: BurnedInAnnotation "LI WU") must not have it quoted in the reason, which a
    result publishes; name parts this short are no egress-guard needles."""
    us = _sample("US1_UNCR.dcm")
    us.PatientName, us.BurnedInAnnotation = "LI^WU", "LI WU"
    derived = _sample("CT_small.dcm")
    derived.PatientName, derived.ImageType = "LI^WU", ["DERIVED", "LI WU"]
    for ds, code in ((us, "burned-in-possible-modality"), (derived, "burned-in-possible-derived")):
        out, reason = _deid(ds)
        assert out is None and reason == QUARANTINE[code]
        assert not re.search(r"\bLI\b|\bWU\b", reason, re.IGNORECASE)


def test_every_risky_modality_is_named_in_its_description() -> None:
    text = QUARANTINE["burned-in-possible-modality"]
    assert all(m in text for m in burnedin.RISKY_MODALITIES)


def test_explicit_no_lets_risky_images_through() -> None:
    ds = _sample("US1_UNCR.dcm")
    ds.BurnedInAnnotation = "NO"
    out, reason = _deid(ds)
    assert reason is None and out is not None


def test_yes_quarantines_any_modality() -> None:
    ds = _sample("CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    out, reason = _deid(ds)
    assert out is None and reason == "burned-in annotation present (BurnedInAnnotation YES)"


def test_plain_ct_is_not_quarantined() -> None:
    out, reason = _deid(_sample("CT_small.dcm"))
    assert reason is None and out is not None


def test_encapsulated_document_is_quarantined() -> None:
    ds = _sample("CT_small.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.Modality = "DOC"
    ds.BurnedInAnnotation = "NO"
    del ds.PixelData
    ds.EncapsulatedDocument = b"%PDF-1.4 Patient: CompressedSamples\n"
    out, reason = _deid(ds, (US_RULE,))
    assert out is None and reason is not None and "encapsulated document" in reason


def test_quarantined_outcome_still_reports_phi() -> None:
    ds = _sample("US1_UNCR.dcm")
    ds.PatientName = "QUARANTINED^PERSON"
    outcome = Deidentifier(DeidSettings(), KEY).deidentify(ds)
    assert outcome.dataset is None and "QUARANTINED" in outcome.phi


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "US1_J2KR.dcm"])
def test_pixel_clean_rule_blacks_out_regions_and_claims_clean_pixels(name: str) -> None:
    ds = _sample(name)
    before = ds.pixel_array.copy()
    original_bytes = ds.PixelData
    out, reason = _deid(ds, (US_RULE,))
    assert reason is None and out is not None
    assert ds.PixelData == original_bytes  # the input is not touched
    # the keyed UID survives pixel cleaning (no random new UID)
    assert out.SOPInstanceUID == Pseudonymizer(KEY).uid(ds.SOPInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    after = pydicom.dcmread(io.BytesIO(_bytes(out))).pixel_array
    assert after.shape == before.shape
    assert not after[0:40, :, :].any()
    assert not after[400:450, 500:600, :].any()
    assert before[0:40, :, :].any()  # there was something to remove
    mask = np.ones(after.shape[:2], dtype=bool)
    mask[0:40, :] = False
    mask[400:450, 500:600] = False
    assert np.array_equal(after[mask], before[mask])  # everything else untouched
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_rule_for_another_size_does_not_apply() -> None:
    rule = PixelCleanRule("G.E. Medical Systems", "LOGIQ 700", 512, 512, ((0, 0, 10, 10),))
    out, reason = _deid(_sample("US1_UNCR.dcm"), (rule,))
    assert out is None and reason is not None


def test_undecodable_pixels_are_quarantined_even_with_a_rule() -> None:
    ds = _sample("US1_J2KR.dcm")
    start = ds.PixelData.index(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ markers
    ds.PixelData = ds.PixelData[:start] + bytes(64) + ds.PixelData[start + 64 :]
    out, reason = _deid(ds, (US_RULE,))
    assert out is None
    assert reason is not None and "not decodable" in reason
    assert burnedin.reason_code(reason) == "pixel-clean-undecodable"


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
