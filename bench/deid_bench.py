"""De-identification benchmark: ours vs dicognito, pydicom/deid and dicom-anonymizer.

One command:  .venv/bin/python bench/deid_bench.py [--instances 300] [--out bench/out]

It generates a deterministic corpus of 512x512 CT instances (6 patients, one study
each) with 28 planted PHI fields, runs every tool with its default settings on the
same files in the same run (read + de-identify + write, one process, sequential),
and reports instances/s and which planted fields survive anywhere in the output
bytes.  Results go to <out>/deid_bench.md and <out>/deid_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATIENTS = 6
BENCH_KEY = bytes(range(32))  # fixed so runs are comparable; not a secret


def _fields(p: int) -> dict[str, str]:
    """The 28 planted PHI fields of patient p: name -> marker searched for in output bytes."""
    return {
        "PatientName (surname)": f"SURNAMEP{p}",
        "PatientName (given)": f"GIVENP{p}",
        "PatientID": f"PIDBENCH{p}77",
        "PatientBirthDate": f"1950{p + 1:02d}13",
        "OtherPatientIDs": f"OPIDBENCH{p}",
        "OtherPatientNames": f"ALIASP{p}",
        "PatientAddress": f"ADDRLINEP{p}",
        "PatientTelephoneNumbers": f"555010{p}99",
        "PatientMotherBirthName": f"MOTHERP{p}",
        "PatientComments": f"PCOMMENTP{p}",
        "AdditionalPatientHistory": f"HISTORYP{p}",
        "AccessionNumber": f"ACCBENCH{p}",
        "StudyID": f"STIDP{p}",
        "ReferringPhysicianName": f"REFDOCP{p}",
        "PerformingPhysicianName": f"PERFDOCP{p}",
        "RequestingPhysician": f"REQDOCP{p}",
        "OperatorsName": f"OPERATORP{p}",
        "InstitutionName": f"HOSPITALP{p}",
        "InstitutionAddress": f"HOSPADDRP{p}",
        "StationName": f"STATIONP{p}",
        "DeviceSerialNumber": f"SERIALP{p}",
        "StudyDescription (quotes the surname)": f"STUDYDESCP{p}",
        "ImageComments": f"IMGCOMMENTP{p}",
        "nested comment (RequestAttributesSequence)": f"NESTEDCMTP{p}",
        "private tag (0009,xx01)": f"PRIVATEAP{p}",
        "private tag in a private sequence": f"PRIVSEQP{p}",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1077.77.{p}",
        "SOPInstanceUID (prefix)": f"1.2.826.0.1.3680043.10.1077.78.{p}.",
    }


def make_instance(i: int, n: int, rng: np.random.Generator) -> Dataset:
    p = i * PATIENTS // n
    f = _fields(p)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{f['SOPInstanceUID (prefix)']}{i}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = "20240312"
    ds.SeriesDate = "20240312"
    ds.ContentDate = "20240312"
    ds.StudyTime = "101500"
    ds.ContentTime = "101501"
    ds.AccessionNumber = f["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = "BenchCo"
    ds.InstitutionName = f["InstitutionName"]
    ds.InstitutionAddress = f["InstitutionAddress"]
    ds.ReferringPhysicianName = f["ReferringPhysicianName"]
    ds.StationName = f["StationName"]
    ds.StudyDescription = f"{f['StudyDescription (quotes the surname)']} for {f['PatientName (surname)']}"
    ds.PerformingPhysicianName = f["PerformingPhysicianName"]
    ds.OperatorsName = f["OperatorsName"]
    ds.PatientName = f"{f['PatientName (surname)']}^{f['PatientName (given)']}"
    ds.PatientID = f["PatientID"]
    ds.PatientBirthDate = f["PatientBirthDate"]
    ds.PatientSex = "O"
    ds.OtherPatientIDs = f["OtherPatientIDs"]
    ds.OtherPatientNames = f["OtherPatientNames"]
    ds.PatientAddress = f["PatientAddress"]
    ds.PatientTelephoneNumbers = f["PatientTelephoneNumbers"]
    ds.PatientMotherBirthName = f["PatientMotherBirthName"]
    ds.AdditionalPatientHistory = f["AdditionalPatientHistory"]
    ds.PatientComments = f["PatientComments"]
    ds.DeviceSerialNumber = f["DeviceSerialNumber"]
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = f["StudyInstanceUID"]
    ds.SeriesInstanceUID = f["StudyInstanceUID"] + ".1"
    ds.StudyID = f["StudyID"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = i + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(i)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = f["StudyInstanceUID"] + ".2"
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = f["ImageComments"]
    ds.RequestingPhysician = f["RequestingPhysician"]
    req = Dataset()
    req.RequestedProcedureID = "RP1"
    req.RequestedProcedureComments = f["nested comment (RequestAttributesSequence)"]
    ds.RequestAttributesSequence = Sequence([req])
    ds.add_new(0x00090010, "LO", "BENCH PRIVATE")
    ds.add_new(0x00091001, "LO", f["private tag (0009,xx01)"])
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "BENCH PRIVATE")
    inner.add_new(0x00091011, "LO", f["private tag in a private sequence"])
    ds.add_new(0x00091002, "SQ", Sequence([inner]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 512
    ds.Columns = 512
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16).tobytes()
    return ds


def make_corpus(folder: Path, n: int) -> list[Path]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(20240312)
    paths = []
    for i in range(n):
        path = folder / f"ct{i:04d}.dcm"
        make_instance(i, n, rng).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------- the tools
def run_ours(paths: list[Path], out: Path) -> None:
    from agent.deid import Deidentifier, DeidSettings

    engine = Deidentifier(DeidSettings(), BENCH_KEY)
    for path in paths:
        outcome = engine.deidentify(pydicom.dcmread(path))
        if outcome.dataset is not None:
            outcome.dataset.save_as(out / path.name, enforce_file_format=True)


def run_dicognito(paths: list[Path], out: Path) -> None:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()
    for path in paths:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / path.name)


def run_pydicom_deid(paths: list[Path], out: Path) -> None:
    from deid.dicom import replace_identifiers

    replace_identifiers(
        dicom_files=[str(p) for p in paths], save=True, output_folder=str(out), overwrite=True
    )


def run_dicom_anonymizer(paths: list[Path], out: Path) -> None:
    from dicomanonymizer import anonymize_dataset

    for path in paths:
        ds = pydicom.dcmread(path)
        anonymize_dataset(ds)
        ds.save_as(out / path.name)


TOOLS: dict[str, tuple[str, Callable[[list[Path], Path], None]]] = {
    "edge-agent": ("agent.deid (strip, no options)", run_ours),
    "dicognito": ("dicognito", run_dicognito),
    "pydicom/deid": ("deid", run_pydicom_deid),
    "dicom-anonymizer": ("dicomanonymizer", run_dicom_anonymizer),
}


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"dicognito": "dicognito", "deid": "deid", "dicomanonymizer": "dicom-anonymizer"}.get(module)
    if dist is None:
        return "this tree"
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def leaked_fields(out: Path, n: int) -> tuple[list[str], int]:
    files = sorted(out.rglob("*.dcm")) or sorted(p for p in out.rglob("*") if p.is_file())
    leaked: set[str] = set()
    for path in files:
        data = path.read_bytes()
        upper = data.upper()
        for p in range(PATIENTS):
            for field, marker in _fields(p).items():
                needle = marker.encode()
                if needle in data or needle.upper() in upper:
                    leaked.add(field)
    return sorted(leaked), len(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    corpus = make_corpus(args.out / "deid" / "corpus", args.instances)
    results = []
    for name, (module, fn) in TOOLS.items():
        out = args.out / "deid" / name.replace("/", "_")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        error = None
        warm = args.out / "deid" / "warmup"
        warm.mkdir(parents=True, exist_ok=True)
        try:  # untimed: imports and first-call setup are not throughput
            fn(corpus[:3], warm)
        except (Exception, SystemExit):  # noqa: BLE001 -- reported by the timed run below
            pass
        shutil.rmtree(warm)
        start = time.perf_counter()
        try:
            fn(corpus, out)
        except ImportError as exc:
            error = f"not installed ({exc.name})"
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- a competitor failing is a result
            error = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        leaked, written = leaked_fields(out, args.instances)
        results.append(
            {
                "tool": name,
                "version": _version(module.split()[0]),
                "instances": args.instances,
                "written": written,
                "seconds": round(elapsed, 3),
                "instances_per_s": round(args.instances / elapsed, 1) if not error else None,
                "leaked_fields": len(leaked),
                "leaked": leaked,
                "error": error,
            }
        )
        print(f"{name}: {results[-1]['instances_per_s']} inst/s, {len(leaked)} leaked", file=sys.stderr)
    env = {
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "planted_fields": len(_fields(0)),
    }
    (args.out / "deid_bench.json").write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    lines = [
        f"{args.instances} CT instances 512x512, {len(_fields(0))} planted PHI fields, "
        f"read + de-identify + write, one process, after an untimed 3-instance warm-up (Python {env['python']}, pydicom {env['pydicom']}, "
        f"{env['cpus']} CPUs)",
        "",
        "| tool | version | instances/s | written | leaked fields | which |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["instances_per_s"] if r["instances_per_s"] is not None else r["error"]
        lines.append(
            f"| {r['tool']} | {r['version']} | {rate} | {r['written']} | {r['leaked_fields']} | "
            f"{', '.join(r['leaked']) or '-'} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "deid_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
