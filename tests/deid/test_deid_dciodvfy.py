"""dciodvfy (Debian dicom3tools) reports no new error on de-identified output."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from agent.deid import OPTIONS, Deidentifier, DeidSettings, PixelCleanRule
from tests.helpers import deid_canary as dc
from tests.helpers import require_peer
from tests.helpers.deid import KEY, Recipient, sample_path

pytestmark = pytest.mark.peer("dciodvfy")
SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "US1_UNCR.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "rtstruct.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
]
ALL_OPTIONS = frozenset(OPTIONS) - {"retain_longitudinal_full_dates"}


def _errors(ds: Dataset, path: Path) -> set[str]:
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([require_peer("dciodvfy"), str(path)], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    # UIDs change by design; compare the messages, not the UID values in them
    return {re.sub(r"[0-9]+(\.[0-9]+)+", "<uid>", ln) for ln in lines if ln.startswith("Error")}


def _inputs() -> list[tuple[str, Dataset]]:
    out: list[tuple[str, Dataset]] = [("canary", dc.build(0).dataset)]
    for name in SAMPLES:
        ds = pydicom.dcmread(sample_path(name), force=True)
        if name.startswith(("MR", "US")):
            ds.BurnedInAnnotation = "NO"  # let risky images through to be checked
        out.append((name, ds))
    return out


@pytest.mark.parametrize("mode", ["strip-basic", "strip-options", "encrypt"])
def test_no_new_errors(mode: str, tmp_path: Path, recipient: Recipient) -> None:
    settings = {
        "strip-basic": DeidSettings(),
        "strip-options": DeidSettings(options=ALL_OPTIONS),
        "encrypt": DeidSettings(mode="encrypt", recipients=(recipient.cert,)),
    }[mode]
    engine = Deidentifier(settings, KEY)
    for name, ds in _inputs():
        before = _errors(ds, tmp_path / "in.dcm")
        out = engine.deidentify(ds).dataset
        assert out is not None, name
        after = _errors(out, tmp_path / "out.dcm")
        assert after - before == set(), name


def test_no_new_errors_after_pixel_clean(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sample_path("US1_J2KR.dcm"))
    rule = PixelCleanRule("G.E. Medical Systems", "LOGIQ 700", 480, 640, ((0, 0, 640, 40),))
    before = _errors(ds, tmp_path / "in.dcm")
    out = Deidentifier(DeidSettings(pixel_clean=(rule,)), KEY).deidentify(ds).dataset
    assert out is not None
    assert _errors(out, tmp_path / "out.dcm") - before == set()
