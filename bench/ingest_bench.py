"""DICOM ingest: the edge-agent daemon next to DCMTK storescp and Orthanc, same run.

Workloads (generated, uncompressed Explicit VR Little Endian, random pixels):
  CT-like  300 instances of 512 x 512 x 16 bit (~0.5 MB each)
  DX-like   24 instances of 2560 x 2048 x 16 bit (~10 MB each)
each sent over 1 and over 4 concurrent associations by DCMTK storescu
(``TCP_NODELAY=1`` in its environment; the files are split evenly across the
associations).  Receivers:
  edge-agent  the daemon (``edge-agent run``) of a dev box: every instance sealed
              (AES-256-GCM), fsynced and indexed before Success; study completion
              is pushed out of the measured window (quiet_seconds = 3600);
              receiving in the daemon's process ([dicom] workers = 1)
  edge-agent-w2  the same with two receive worker processes ([dicom] workers = 2)
  storescp    DCMTK storescp writing files to disk (``--fork`` for 4 associations,
              ``TCP_NODELAY=1``); no fsync
  orthanc     Orthanc (Debian package), default storage to disk, ``TCP_NODELAY=1``
Maximum PDU received: edge-agent 1 MiB (its default), storescp and Orthanc
131072 (the largest DCMTK accepts).  The daemon's peak RSS (VmHWM, reset
before each cell; with workers, the sum over the daemon and its workers) is
reported for every edge-agent cell, and the receiver's CPU time per instance
(user + system; edge-agent: daemon and workers; Orthanc: its process) for
edge-agent and Orthanc: on a machine with few cores it tells a rate limited by CPU from one
limited by waiting (fsync, locks).

    .venv/bin/python bench/ingest_bench.py [--runs 3] [--ct 300] [--dx 24] [--targets ...]

Writes bench/out/ingest_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.ops.devbox import provision_dev  # noqa: E402
from bench.common import free_port, set_config, wait_port  # noqa: E402
from tests.helpers.orthanc import Orthanc  # noqa: E402

OUT = REPO / "bench" / "out"
CALLED = "EDGE_AGENT"


def make_series(root: Path, n: int, rows: int, cols: int, modality: str) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=rows * cols, dtype=np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1.1"
    out = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Bench^Patient", "BENCH-1"
        ds.Modality, ds.InstanceNumber = modality, i + 1
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = pixels
        p = root / f"{modality.lower()}{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def send(port: int, files: list[Path], assocs: int, aec: str) -> float:
    """Wall time for storescu to deliver all files over ``assocs`` associations."""
    env = dict(os.environ, TCP_NODELAY="1")
    groups = [g for g in (files[i::assocs] for i in range(assocs)) if g]
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, g)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for g in groups]
    errors = [p.communicate()[1] for p in procs]
    took = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return took


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The receive worker's module: agent.dicom.worker since issue 15, agent.recvworker in a
# --baseline checkout from before it.
WORKER_MODULES = (b"agent.dicom.worker", b"agent.recvworker")


def children(pid: int) -> list[int]:
    """Receive worker processes of the daemon (direct children running a WORKER_MODULES)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and any(m in cmd for m in WORKER_MODULES):
            out.append(int(entry.name))
    return out


def wait_workers(pid: int, n: int, timeout: float = 30) -> None:
    """Until the daemon's ``n`` receive workers run and have gone idle.

    Idle, not a fixed pause: a worker still importing when the first association
    comes in puts its start-up CPU (~0.5 s per worker) into the measured window, and
    on a busy machine that alone doubled the CPU per instance of an 8-instance cell.
    The same rule applies to a --baseline checkout, whatever its workers do at start."""
    deadline = time.monotonic() + timeout
    while n > 1 and len(children(pid)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [pid, *children(pid)]
    before = -1.0
    while time.monotonic() < deadline:
        now = sum(cpu_seconds(p) for p in pids)
        if now - before < 0.02:  # under 4 % of a core over the last 0.5 s
            return
        before = now
        time.sleep(0.5)


def reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


class EdgeAgent:
    name = "edge-agent"

    def __init__(self, root: Path, workers: int = 1, code: Path = REPO) -> None:
        self.port = free_port()
        self.code = code
        if code == REPO:
            provision_dev(root / "box", dicom_port=self.port, mqtt_port=free_port(),
                          extra_ae=("BENCH",))
        else:
            # A baseline checkout provisions with its own code: its config loader may not
            # know keys this tree's dev box writes.
            # (the dev box module moved in the restructure: take the one that exists)
            devbox = ".".join(["agent", "devbox"]) if (code / "agent" / "devbox.py").exists() \
                else "agent.ops.devbox"
            subprocess.run(
                [sys.executable, "-c", "import sys, importlib, pathlib; "
                 "importlib.import_module(sys.argv[4]).provision_dev(pathlib.Path(sys.argv[1]), "
                 "dicom_port=int(sys.argv[2]), mqtt_port=int(sys.argv[3]), extra_ae=('BENCH',))",
                 str(root / "box"), str(self.port), str(free_port()), devbox],
                cwd=code, env=dict(os.environ, PYTHONPATH=str(code)), check=True,
                stdout=subprocess.DEVNULL)
        cfg = root / "box" / "agent.toml"
        text = cfg.read_text().replace("quiet_seconds = 3\n", "quiet_seconds = 3600\n")
        text = text.replace("[logging]\nlevel = \"INFO\"", "[logging]\nlevel = \"WARNING\"")
        cfg.write_text(text)
        set_config(cfg, "dicom", "workers", str(workers))
        self.workers = workers
        self.cfg = cfg
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", "run", "--config", str(self.cfg)],
            cwd=self.code, env=dict(os.environ, PYTHONPATH=str(self.code)),
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class StoreSCP:
    name = "storescp"

    def __init__(self, root: Path, assocs: int) -> None:
        self.port = free_port()
        self.dir = root / "storescp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.assocs = assocs
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["storescp", "-aet", CALLED, "--max-pdu", "131072", "-od", str(self.dir)]
        if self.assocs > 1:
            args.append("--fork")
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen([*args, str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


class OrthancTarget:
    name = "orthanc"

    def __init__(self, root: Path) -> None:
        self.o = Orthanc(root / "orthanc", aet=CALLED)
        cfg = json.loads(self.o.config.read_text())
        cfg["MaximumPduLength"] = 131072
        self.o.config.write_text(json.dumps(cfg))
        self.port = self.o.dicom

    def start(self) -> None:
        self.o.start()

    def stop(self) -> None:
        self.o.stop()


def run_cell(target: str, files: list[Path], assocs: int, work: Path,
             baseline: Path | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=work))
    t: Any
    if target.startswith(("edge-agent", "baseline")):
        # "edge-agent" receives in the daemon's process, "edge-agent-wN" with N workers;
        # "baseline[-wN]" the same from the --baseline checkout (before/after, one run)
        code = baseline if target.startswith("baseline") and baseline is not None else REPO
        t = EdgeAgent(root, workers=int(target.rpartition("-w")[2]) if "-w" in target else 1,
                      code=code)
    elif target == "storescp":
        t = StoreSCP(root, assocs)
    else:
        t = OrthancTarget(root)
    t.start()
    try:
        pid = t.proc.pid if target.startswith(("edge-agent", "baseline")) else None
        cpu_pid = pid if pid else (
            t.o.proc.pid if target == "orthanc" and t.o.proc is not None else None)
        if pid:
            wait_workers(pid, t.workers)
        pids = ([pid, *children(pid)] if pid else [cpu_pid] if cpu_pid else [])
        for p in pids:
            reset_peak(p)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        took = send(t.port, files, assocs, CALLED)
        cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / len(files) * 1000 if pids else None
        # Workers and daemon together: what the box pays in memory.
        rss = sum(peak_rss(p) for p in pids) if pid else None
    finally:
        t.stop()
        shutil.rmtree(root, ignore_errors=True)
    size = sum(f.stat().st_size for f in files)
    return {"seconds": took, "instances_per_s": len(files) / took,
            "mb_per_s": size / took / 1e6, "peak_rss_mb": rss / 2**20 if rss else None,
            "cpu_ms_per_instance": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ct", type=int, default=300)
    ap.add_argument("--dx", type=int, default=24)
    ap.add_argument("--targets", default="edge-agent,edge-agent-w2,storescp,orthanc",
                    help="edge-agent (receive in the daemon process), edge-agent-wN (N receive "
                         "worker processes), storescp, orthanc; with --baseline also "
                         "baseline and baseline-wN")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of an earlier commit (git worktree add DIR COMMIT): adds "
                         "baseline and baseline-w2 receivers run from it, interleaved with the "
                         "rest, for a before/after comparison in one run")
    a = ap.parse_args()
    if a.baseline is not None:
        a.baseline = a.baseline.resolve()
        if "baseline" not in a.targets:
            a.targets += ",baseline,baseline-w2"
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} (DCMTK) is required: tools/setup.sh test", file=sys.stderr)
            return 2
    targets = [t for t in a.targets.split(",") if t != "orthanc" or Orthanc.available()]
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        sets = {"CT 512x512x16 bit": make_series(work / "ct", a.ct, 512, 512, "CT"),
                "DX 2560x2048x16 bit": make_series(work / "dx", a.dx, 2560, 2048, "DX")}
        results: list[dict[str, Any]] = []
        for label, files in sets.items():
            if not files:
                continue  # --ct 0 / --dx 0: that workload is skipped
            for assocs in (1, 4):
                # Runs interleave the receivers (rotating who goes first), so a
                # noisy minute on the shared machine hits all of them alike.
                per: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
                for r in range(a.runs):
                    for target in targets[r % len(targets):] + targets[:r % len(targets)]:
                        per[target].append(run_cell(target, files, assocs, work, a.baseline))
                cell: list[dict[str, Any]] = []
                for target in targets:
                    runs = per[target]
                    med = {k: statistics.median(x[k] for x in runs)
                           for k in ("seconds", "instances_per_s", "mb_per_s")}
                    rates = [x["instances_per_s"] for x in runs]
                    cpus = [x["cpu_ms_per_instance"] for x in runs
                            if x["cpu_ms_per_instance"] is not None]
                    med["cpu_ms_per_instance"] = statistics.median(cpus) if cpus else None
                    rss = [x["peak_rss_mb"] for x in runs if x["peak_rss_mb"] is not None]
                    row = {"set": label, "instances": len(files), "associations": assocs,
                           "target": target, **med, "min_instances_per_s": min(rates),
                           "max_instances_per_s": max(rates),
                           "peak_rss_mb": max(rss) if rss else None, "runs": a.runs}
                    cell.append(row)
                orthanc = next((x for x in cell if x["target"] == "orthanc"), None)
                for row in cell:
                    row["vs_orthanc"] = (row["instances_per_s"] / orthanc["instances_per_s"]
                                         if orthanc and row["target"].startswith(
                                             ("edge-agent", "baseline"))
                                         else None)
                    results.append(row)
                    print(f"{label:22} x{assocs} {row['target']:14} "
                          f"{row['instances_per_s']:8.1f} inst/s {row['mb_per_s']:8.1f} MB/s"
                          + (f"  CPU {row['cpu_ms_per_instance']:.1f} ms/inst"
                             if row["cpu_ms_per_instance"] is not None else "")
                          + (f"  peak RSS {row['peak_rss_mb']:.0f} MiB" if row["peak_rss_mb"]
                             else "")
                          + (f"  x{row['vs_orthanc']:.2f} Orthanc" if row["vs_orthanc"] else ""),
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = {"python": platform.python_version(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "kernel": platform.release(),
           "storescp": subprocess.run(["storescp", "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0:1]}
    OUT.mkdir(exist_ok=True)
    (OUT / "ingest_bench.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    lines = ["| set | assocs | receiver | inst/s (median) | range | MB/s | vs Orthanc | "
             "CPU ms/inst | peak RSS |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rss_text = f"{r['peak_rss_mb']:.0f} MiB" if r["peak_rss_mb"] else ""
        cpu_ms = r["cpu_ms_per_instance"]
        cpu_text = f"{cpu_ms:.1f}" if cpu_ms is not None else ""
        ratio = f"{r['vs_orthanc']:.2f}x" if r["vs_orthanc"] else ""
        lines.append(f"| {r['set']} | {r['associations']} | {r['target']} | "
                     f"{r['instances_per_s']:.1f} | {r['min_instances_per_s']:.0f}-"
                     f"{r['max_instances_per_s']:.0f} | {r['mb_per_s']:.1f} | {ratio} | "
                     f"{cpu_text} | {rss_text} |")
    notes = [
        "",
        "edge-agent: the daemon with encryption (AES-256-GCM) and fsync before every "
        "Success, receiving in its own process; edge-agent-wN: the same with N receive "
        "worker processes (`[dicom] workers = N`; the default is one per core). "
        "CPU and peak RSS of edge-agent-wN are summed over the daemon and its workers "
        "(RSS counts the libraries they share once per process). storescp and Orthanc "
        "do not fsync. Ratios are medians against Orthanc's median in the same cell.",
    ]
    (OUT / "ingest_bench.md").write_text(
        f"# DICOM ingest ({a.runs} run(s) per receiver, interleaved; median; "
        f"{env['cpus']} CPUs)\n\n" + "\n".join(lines + notes) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
