"""Helpers for the result-object tests: an original study with PHI, run through the
real de-identifier and the real demo model, linked through the real link store."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.crypto import KeyEncryptionKey, random_key
from agent.deid import Deidentifier, DeidSettings
from agent.infer import InferenceEngine, InferenceSettings
from agent.results.common import Issuer
from agent.results.link import LinkRecord, LinkStore, Originals
from agent.types import DeidentifiedStudy, InferenceResult
from training.synth import make_case, to_dataset

REPO = Path(__file__).resolve().parents[2]
DEV_PUB = REPO / "models" / "dev-publisher.pub"
DCIODVFY = shutil.which("dciodvfy")

PATIENT_NAME = "Linkmann^Ottilie^Rosa"
PATIENT_ID = "PID-LINK-4471"
ISSUER = "HOSP-A"
BIRTH = "19480211"
ACCESSION = "ACC-LINK-2090"
REFERRING = "Referrer^Berta"
STUDY_ID = "SID-77"


@dataclass(frozen=True)
class Originals3:
    study_uid: str
    files: tuple[Path, ...]
    datasets: tuple[Dataset, ...]

    @property
    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def original_study(folder: Path, n: int = 3, seed: int = 5, study_uid: str | None = None,
                   lesion: bool = True) -> Originals3:
    """A synthetic chest CT series with a lesion and a full patient/study header."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, frame_of_ref = generate_uid(), generate_uid()
    files, datasets = [], []
    for i in range(n):
        ds = to_dataset(make_case(seed, i, kind="ct", noise="low", lesion=lesion),
                        instance_number=i + 1, study_seed=study_uid)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = PATIENT_NAME, PATIENT_ID, ISSUER
        ds.PatientBirthDate, ds.PatientSex = BIRTH, "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260301", "101500", STUDY_ID
        ds.AccessionNumber, ds.ReferringPhysicianName = ACCESSION, REFERRING
        ds.SeriesNumber, ds.FrameOfReferenceUID = 3, frame_of_ref
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100, -100, -40 + 5 * i]
        ds.PositionReferenceIndicator = ""
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PatientPosition = "HFS"
        ds.RescaleType = "HU"
        ds.BurnedInAnnotation = "NO"
        ds.ContentDate, ds.ContentTime = "20260301", "101501"
        ds.Laterality = ""
        path = folder / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        datasets.append(pydicom.dcmread(path))
    return Originals3(study_uid, tuple(files), tuple(datasets))


def engine(state: Path) -> InferenceEngine:
    return InferenceEngine(InferenceSettings(REPO / "models", state, environment="development",
                                             publisher_keys=(DEV_PUB,)))


def process(originals: Originals3, eng: InferenceEngine, pseudonym_key: bytes,
            version: int = 1) -> tuple[DeidentifiedStudy, InferenceResult, Originals]:
    """What the pipeline does at the PHI boundary and after, in one function."""
    deid = Deidentifier(DeidSettings(), pseudonym_key)
    captured = Originals()
    out = []
    ref = ""
    patient = ""
    for path in originals.files:
        ds = pydicom.dcmread(path)
        got = Originals.read(ds)
        outcome = deid.deidentify(ds)
        assert outcome.dataset is not None
        out.append(outcome.dataset)
        captured.add(got)
        ref, patient = outcome.study_ref, outcome.patient_ref
    dstudy = DeidentifiedStudy(study_ref=ref, patient_ref=patient, version=version,
                               instances=tuple(out), quarantined=(), failed=(),
                               method=deid.describe(), options=(),
                               received_instances=len(out), first_received_at=0.0,
                               last_received_at=0.0)
    outputs, failures = eng.infer(dstudy)
    result = InferenceResult(study_ref=ref, patient_ref=patient, version=version,
                             status="ok" if outputs else "no_applicable_model",
                             models=tuple(outputs), failures=tuple(failures),
                             instances_received=len(out), instances_processed=len(out),
                             quarantined=(), deid_method=deid.describe(), deid_options=(),
                             latency_ms=1.0)
    return dstudy, result, captured


@dataclass
class Linked:
    store: LinkStore
    kek: KeyEncryptionKey
    issuer: Issuer
    originals: Originals3
    record: LinkRecord


def link(tmp: Path, eng: InferenceEngine, key: bytes | None = None,
         audit: object = None) -> Linked:
    key = key or random_key()
    kek = KeyEncryptionKey(random_key())
    store = LinkStore(tmp / "results" / "links.db", kek, audit=audit)  # type: ignore[arg-type]
    originals = original_study(tmp / "originals")
    dstudy, result, captured = process(originals, eng, key)
    assert store.record(dstudy, result, captured)
    rec = store.get(dstudy.study_ref, 1)
    return Linked(store, kek, Issuer("site-a", "edge-1", key), originals, rec)


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([DCIODVFY or "dciodvfy", str(path)], capture_output=True, text=True)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def uids_in(text: str) -> set[str]:
    return set(re.findall(r"[0-9]+(?:\.[0-9]+){3,}", text))
