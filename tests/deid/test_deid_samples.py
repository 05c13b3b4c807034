"""Every sample file of pydicom, pydicom-data and deid-data: de-identified, quarantined or
refused with DeidError, never a crash; outputs keep no original name, ID or UID."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from agent.deid import OPTIONS, Deidentifier, DeidSettings
from agent.errors import DeidError
from tests.helpers.deid import KEY


def _sample_files() -> list[Path]:
    roots: list[Path] = [Path(pydicom.__file__).parent / "data" / "test_files"]
    for module in ("data_store", "deid_data"):  # pydicom-data, deid-data
        try:
            mod = __import__(module)
        except ImportError:
            continue
        roots.append(Path(str(mod.__file__)).parent / "data")
    files = []
    for root in roots:
        files += [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in (".dcm", "")]
    return files


FILES = _sample_files()
# sample files with placeholder names whose parts also occur as ordinary words
GENERIC = {"NAME", "PATIENT", "TEST", "ANONYMIZED", "ANONYMOUS", "PHANTOM", "FAMILY", "GIVEN"}


def _strings(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out += _strings(item)
        elif isinstance(elem.value, str):
            out.append(elem.value)
        elif elem.VR in ("PN", "LO", "SH") and elem.value is not None:
            out += [str(v) for v in elem.value] if elem.VM > 1 else [str(elem.value)]
    return out


@pytest.mark.parametrize("options", [frozenset(), frozenset(OPTIONS) - {"retain_longitudinal_full_dates"}])
def test_all_sample_files(options: frozenset[str]) -> None:
    assert len(FILES) > 100
    engine = Deidentifier(DeidSettings(options=options), KEY)
    counts = {"ok": 0, "quarantined": 0, "refused": 0, "unreadable": 0}
    for path in FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                ds.remove_private_tags  # noqa: B018 -- touch: a lazily failing read fails here
                original_name = str(ds.get("PatientName", "") or "")
                original_id = str(ds.get("PatientID", "") or "")
                original_uids = {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SOPInstanceUID")}
            except Exception:  # noqa: BLE001 -- malformed sample files are not our input
                counts["unreadable"] += 1
                continue
            try:
                outcome = engine.deidentify(ds)
            except DeidError:
                counts["refused"] += 1
                continue
            if outcome.dataset is None:
                assert outcome.quarantine_reason
                counts["quarantined"] += 1
                continue
            out = outcome.dataset
            buf = io.BytesIO()
            out.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            back = pydicom.dcmread(io.BytesIO(data))
            assert back.PatientIdentityRemoved == "YES", path
            values = " ".join(_strings(back))
            if len(original_name) >= 4 and "retain_uids" not in options:
                for part in original_name.replace("^", " ").split():
                    if len(part) >= 4 and part.upper() not in GENERIC:
                        assert part not in values, (path, part)
                if len(original_id) >= 6:  # short IDs like "0010" occur in ordinary values
                    assert original_id not in values, path
                for uid in original_uids - {""}:
                    assert uid.encode() not in data, (path, uid)
            counts["ok"] += 1
    assert counts["ok"] > 50 and counts["quarantined"] > 5, counts
