"""De-identification benchmark: ours vs dicognito, pydicom/deid and dicom-anonymizer.

One command:  .venv/bin/python bench/deid_bench.py [--instances 300] [--rounds 5] [--out bench/out]

It generates a deterministic corpus of 512x512 CT instances (6 patients, one study
each) with 28 planted PHI fields, runs every tool with its default settings on the
same files (read + de-identify + write, one process, sequential), and reports
instances/s and which planted fields survive anywhere in the output bytes.
Results go to <out>/deid_bench.md and <out>/deid_bench.json.

Fairness: every tool first gets one untimed pass over the whole corpus (imports,
first-call setup, its code warm); then come ``--rounds`` timed rounds, the order of
the tools rotating from round to round.  Before each timed run the corpus is read
once (page cache warm for everyone), the output folder is new and empty, dirty pages
are flushed (os.sync) and the garbage collector has just run.  Each tool writes the way it is used: ours through
the CLI's writer (agent.deid.writer, which writes pydicom's bytes), the others with
``Dataset.save_as`` or their own writer.  The table gives the median of the rounds
and the range; the ratio to dicognito is taken within each round, side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
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
    """What `edge-agent deid` does per file (provisioning/deid_cmd.py), minus its summary."""
    from agent.deid import Deidentifier, DeidSettings, writer

    engine = Deidentifier(DeidSettings(), BENCH_KEY)
    for path in paths:
        outcome = engine.deidentify(pydicom.dcmread(path))
        if outcome.dataset is not None:
            writer.save(outcome.dataset, out / path.name)


def run_ours_save_as(paths: list[Path], out: Path) -> None:
    """The same engine, written with pydicom's save_as: shows what the writer is worth."""
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
    "edge-agent (save_as)": ("agent.deid (strip, no options)", run_ours_save_as),
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


def _timed(fn: Callable[[list[Path], Path], None], corpus: list[Path], out: Path) -> tuple[float, str | None]:
    """One timed run into a new, empty ``out``, with the corpus in the page cache and
    the disk's dirty pages flushed."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in corpus:
        path.read_bytes()
    os.sync()  # no write-back of the previous run's files lands on this one
    gc.collect()
    error = None
    start = time.perf_counter()
    try:
        fn(corpus, out)
    except ImportError as exc:
        error = f"not installed ({exc.name})"
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- a competitor failing is a result
        error = f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - start, error


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per tool (median reported)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of the tools")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    names = [n for n in args.tools.split(",") if n]
    unknown = set(names) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools: {', '.join(sorted(unknown))}")
    corpus = make_corpus(args.out / "deid" / "corpus", args.instances)
    folder = {name: args.out / "deid" / re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") for name in names}

    for name in names:  # untimed warm-up: one whole pass each
        _timed(TOOLS[name][1], corpus, folder[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, str | None] = dict.fromkeys(names)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds, error = _timed(TOOLS[name][1], corpus, folder[name])
            times[name].append(seconds)
            errors[name] = errors[name] or error
        print(
            f"round {r + 1}: "
            + ", ".join(f"{n} {args.instances / times[n][-1]:.0f}/s" for n in names),
            file=sys.stderr,
        )

    results = []
    for name in names:
        module = TOOLS[name][0]
        leaked, written = leaked_fields(folder[name], args.instances)  # the last round's output
        rates = sorted(args.instances / t for t in times[name])
        error = errors[name]
        results.append(
            {
                "tool": name,
                "version": _version(module.split()[0]),
                "instances": args.instances,
                "written": written,
                "rounds": args.rounds,
                "seconds": [round(t, 3) for t in times[name]],
                "instances_per_s": None if error else round(statistics.median(rates), 1),
                "instances_per_s_min": None if error else round(rates[0], 1),
                "instances_per_s_max": None if error else round(rates[-1], 1),
                "leaked_fields": len(leaked),
                "leaked": leaked,
                "error": error,
            }
        )
    ratio = None
    if "edge-agent" in times and "dicognito" in times and not errors["edge-agent"] and not errors["dicognito"]:
        per_round = sorted(d / o for o, d in zip(times["edge-agent"], times["dicognito"], strict=True))
        ratio = {
            "median": round(statistics.median(per_round), 2),
            "min": round(per_round[0], 2),
            "max": round(per_round[-1], 2),
            "per_round": [round(x, 2) for x in per_round],
        }
    env = {
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "planted_fields": len(_fields(0)),
    }
    payload = {"env": env, "rounds": args.rounds, "results": results, "ratio_to_dicognito": ratio}
    (args.out / "deid_bench.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        f"{args.instances} CT instances 512x512, {len(_fields(0))} planted PHI fields, "
        f"read + de-identify + write, one process (Python {env['python']}, pydicom {env['pydicom']}, "
        f"{env['cpus']} CPUs). Every tool: one untimed warm-up pass over the corpus, then "
        f"{args.rounds} timed rounds in rotating tool order, each into a new empty folder with "
        "the corpus in the page cache and dirty pages flushed; instances/s is the median of the rounds, with the "
        "slowest and fastest round; leaks are searched in the last round's output bytes.",
        "",
        "| tool | version | instances/s (median) | range | written | leaked fields | which |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["instances_per_s"] if r["instances_per_s"] is not None else r["error"]
        spread = (
            f"{r['instances_per_s_min']}-{r['instances_per_s_max']}" if r["instances_per_s"] is not None else "-"
        )
        lines.append(
            f"| {r['tool']} | {r['version']} | {rate} | {spread} | {r['written']} | {r['leaked_fields']} | "
            f"{', '.join(r['leaked']) or '-'} |"
        )
    if ratio is not None:
        lines += [
            "",
            f"edge-agent / dicognito throughput, per round (same round, side by side): median "
            f"**{ratio['median']}x**, range {ratio['min']}x-{ratio['max']}x "
            f"({', '.join(f'{x}x' for x in ratio['per_round'])}).",
        ]
    if "edge-agent (save_as)" in times and "edge-agent" in times:
        ours = sorted(folder["edge-agent"].glob("*.dcm"))
        same = sum(
            p.read_bytes() == (folder["edge-agent (save_as)"] / p.name).read_bytes()
            for p in ours
            if (folder["edge-agent (save_as)"] / p.name).exists()
        )
        payload["writer_identical_files"] = same
        lines += [
            "",
            "`edge-agent (save_as)` is the same engine written with pydicom's `Dataset.save_as` "
            "instead of `agent.deid.writer` (which `edge-agent deid` uses); it shows how much of "
            f"the difference is the writer. Output files byte-identical between the two: {same} of {len(ours)}.",
        ]
        (args.out / "deid_bench.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    (args.out / "deid_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
