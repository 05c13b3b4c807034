"""A department's normal day, end to end: studies acquired today, common and very
short patient names, a study whose pixels do not decode and an ultrasound image
that is quarantined.  Central ops must get one result for each (the egress guard
blocks none of them), and no result carries anything of the patients.

Sent with DCMTK storescu to the real daemon; results read by the ops
certificate from the real mutual-TLS broker."""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from tests.helpers import REPO, Box, Daemon, Subscriber, set_config, storescu, wait_for
from tests.helpers.dicom import sample

# The day the studies are acquired, as the envelope's UTC timestamp spells it.
TODAY = datetime.now(UTC).strftime("%Y%m%d")


@dataclass
class Sent:
    name: str
    patient_id: str
    kind: str  # "ct", "undecodable" or "us"
    study_uid: str = field(default_factory=generate_uid)
    uids: set[str] = field(default_factory=set)

    def phi(self, *, dates: bool) -> set[str]:
        y, m, d = TODAY[:4], TODAY[4:6], TODAY[6:]
        spellings = {TODAY, f"{y}-{m}-{d}", f"{m}/{d}/{y}", f"{d}.{m}.{y}"} if dates else set()
        return {self.name, self.name.replace("^", " "), self.patient_id, self.study_uid,
                *self.uids, *spellings}

    def name_parts(self) -> list[str]:
        return [p for p in self.name.split("^") if p]


STUDIES = [
    Sent("SMITH^JOHN", "MRN-100231", "ct"),
    Sent("NONE^BOB", "MRN-100232", "ct"),
    Sent("LI^WU", "MRN-100233", "us"),
    Sent("OH^YU", "MRN-100234", "undecodable"),
]


def _stamp(ds: Dataset, s: Sent, i: int) -> None:
    ds.PatientName = s.name
    ds.PatientID = s.patient_id
    ds.PatientBirthDate = "19700101"
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, kw, TODAY)
    ds.StudyTime = "083000"
    ds.StudyInstanceUID = s.study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = i + 1
    s.uids |= {ds.SeriesInstanceUID, ds.SOPInstanceUID}


def _corrupt_rle(ds: Dataset) -> None:
    """RLE Lossless whose header puts the second segment past the end of the data: no
    decoder can read it (pydicom's and pylibjpeg's both refuse)."""
    ds.compress(RLELossless)
    data = bytearray(ds.PixelData)
    frag = data.index(b"\xfe\xff\x00\xe0", 8)  # the first fragment, after the offset table
    header = frag + 8  # item tag and length, then the RLE header: count, 15 offsets
    data[header + 8 : header + 12] = (0x7FFFFFFF).to_bytes(4, "little")
    ds.PixelData = bytes(data)


def make_files(tmp: Path) -> list[Path]:
    files: list[Path] = []
    for n, s in enumerate(STUDIES):
        if s.kind == "us":
            ds = sample("US1_UNCR.dcm")
            # The modality put the patient's name into a code string the
            # quarantine rule reads: the reason must still not quote it.
            ds.BurnedInAnnotation = s.name.replace("^", " ")
            count = 1
        else:
            ds = sample()
            ds.BodyPartExamined = "CHEST"  # the demo model applies
            count = 2 if s.kind == "ct" else 1
        for i in range(count):
            one = copy.deepcopy(ds)
            _stamp(one, s, i)
            if s.kind == "undecodable":
                _corrupt_rle(one)
            p = tmp / f"s{n}-{i}.dcm"
            one.save_as(p, enforce_file_format=True)
            files.append(p)
    return files


def _assert_clean(text: str, s: Sent, where: str, *, dates: bool) -> None:
    low = text.lower()
    for value in s.phi(dates=dates):
        assert value.lower() not in low, f"{where}: a value of {s.name!r} leaked"
    for part in s.name_parts():  # short parts too, as whole words (names are upper case)
        assert not re.search(rf"(?<![A-Za-z0-9]){re.escape(part)}(?![A-Za-z0-9])", text), \
            f"{where}: name part of {s.name!r} leaked"


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_a_normal_day_gets_a_result_for_every_study(tmp_path: Path, box: Box,
                                                    ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "2")
    set_config(box, "telemetry", "interval_seconds", "1")
    daemon = Daemon(box)
    daemon.start()
    try:
        # -xr: propose RLE Lossless too (and the uncompressed syntaxes), as a modality does.
        proc = storescu(box.dicom_port, make_files(tmp_path), extra=("-xr",))
        assert proc.returncode == 0, proc.stderr
        results = [m.json() for m in ops.wait("results", len(STUDIES), timeout=120)]
        wait_for(lambda: [t for t in ops.on("telemetry")
                          if t.json()["data"]["pipeline"]["studies_processed"] >= len(STUDIES)],
                 60, "telemetry after the studies")
    finally:
        assert daemon.stop() == 0

    assert len({r["data"]["study"]["ref"] for r in results}) == len(STUDIES)
    schema = json.loads((REPO / "docs" / "schemas" / "result.schema.json").read_text())
    for r in results:
        jsonschema.validate(r["data"], schema)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        d = r["data"]
        kind = ("us" if d["status"] == "all_quarantined"
                else "undecodable" if d["status"] == "failed" else "ct")
        by_kind.setdefault(kind, []).append(d)
    assert len(by_kind["ct"]) == 2 and all(d["status"] == "ok" for d in by_kind["ct"])
    [us] = by_kind["us"]
    [q] = us["study"]["quarantined"]
    assert q["code"] == "burned-in-possible-modality"
    [bad] = by_kind["undecodable"]
    [f] = bad["failures"]
    assert f["code"] == "pixels-undecodable" and f["transfer_syntax"] == "RLELossless"
    assert f["model"] == "lesion-demo"

    # The guard blocked nothing, so ops does not see this box in alarm.
    last = [t.json()["data"] for t in ops.on("telemetry")][-1]
    assert last["security"]["egress_blocked"] == 0
    assert "egress guard blocked" not in daemon.log_text()

    # No result carries anything of any patient, not even the day of the study
    # (the envelope's own timestamp aside); no other message does either.
    for m in ops.messages:
        ev = json.loads(m.payload)
        body = json.dumps(ev.get("data"), ensure_ascii=False) + m.topic + str(ev.get("subject"))
        for s in STUDIES:
            _assert_clean(body, s, m.topic, dates=m.topic.endswith("/results"))
    log = daemon.log_text()
    for s in STUDIES:
        for value in (s.name, s.patient_id, s.study_uid, *s.uids):
            assert value not in log
        for part in s.name_parts():
            assert not re.search(rf"\b{part}\b", log), f"log: name part of {s.name!r}"
