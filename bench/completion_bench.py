"""Time to result when the modality says the study is complete, next to the quiet period.

For each completion path and study size, DCMTK ``storescu`` (``TCP_NODELAY=1``) sends
the study to the running daemon on a dev box; the clock starts when storescu exits
(last instance acknowledged) and stops when the result arrives at an ops subscriber
over mTLS MQTT.  Paths:

* ``mpps``: pynetdicom N-CREATE (IN PROGRESS) before the images, N-SET COMPLETED with
  the Performed Series Sequence right after them; ``[study] quiet_seconds`` = 3600;
* ``commitment``: a Storage Commitment request for the study's instances right after
  them (the report is awaited on the association); quiet period 3600 s;
* ``quiet``: no message, the quiet period (``--quiet``, default 1 s) completes the study.

Goal (issue 19): with MPPS or commitment, p95 <= 300 ms for a 3-image CT study and
<= 1 s for a 300-image series.

    .venv/bin/python bench/completion_bench.py [--repeat 5] [--sizes 3,300] [--quiet 1]

Writes bench/out/completion_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.ops.devbox import provision_dev  # noqa: E402
from bench.common import free_port, set_config, wait_port  # noqa: E402
from bench.e2e_bench import Results  # noqa: E402
from tests.helpers.completion import (  # noqa: E402
    Modality,
    mpps_create_ds,
    mpps_final_ds,
    refs_of,
)
from tests.helpers.receive import ct_files  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GOAL_MS = {3: 300.0, 300: 1000.0}


def p95(xs: list[float]) -> float:
    """Nearest-rank 95th percentile (with few samples: the largest or close to it)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, -(-95 * len(s) // 100) - 1))]


def run_mode(mode: str, sizes: list[int], repeat: int, quiet: float, workers: int | None,
             base: Path) -> dict[int, list[float]]:
    root = base / mode
    box = provision_dev(root / "box", dicom_port=free_port(), mqtt_port=free_port())
    set_config(box.config, "study", "quiet_seconds", str(quiet if mode == "quiet" else 3600))
    if workers is not None:
        set_config(box.config, "dicom", "workers", str(workers))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.append(subprocess.Popen([exe, "-c", str(box.mosquitto_conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(box.mqtt_port)
        log = open(root / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "provisioning.cli", "run",
                                       "--config", str(box.config)], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=log))
        wait_port(box.dicom_port)
        sub = Results(root / "box", box.mqtt_port)
        storescu = shutil.which("storescu") or "storescu"
        env = dict(os.environ, TCP_NODELAY="1")
        got: dict[int, list[float]] = {n: [] for n in sizes}
        k = 0
        for n in sizes:
            for r in range(repeat):
                study = str(generate_uid())
                files = ct_files(root / f"s{n}-{r}", n, study_uid=study)
                m = Modality(box.dicom_port, box.ae_title) if mode != "quiet" else None
                mpps = str(generate_uid())
                final = mpps_final_ds("COMPLETED", files) if mode == "mpps" else None
                refs = refs_of(files) if mode == "commitment" else []
                if m is not None and final is not None:
                    m.n_create(mpps_create_ds(study), mpps)
                subprocess.run([storescu, "-aet", "STORESCU", "-aec", box.ae_title, "127.0.0.1",
                                str(box.dicom_port), *map(str, files)], env=env, check=True,
                               capture_output=True)
                t_last = time.perf_counter()
                if m is not None and final is not None:
                    m.n_set(final, mpps)
                elif m is not None:
                    m.commit(refs)
                t_res, _ = sub.wait(k + 1, timeout=max(120.0, quiet * 3))
                k += 1
                got[n].append((t_res - t_last) * 1000)
                if m is not None:
                    m.release()
        sub.c.disconnect()
        sub.c.loop_stop()
        return got
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sizes", default="3,300")
    ap.add_argument("--quiet", type=float, default=1.0, help="quiet_seconds of the quiet path")
    ap.add_argument("--modes", default="mpps,commitment,quiet")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    if shutil.which("storescu") is None:
        print("DCMTK storescu is required (tools/setup.sh test)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="completion-bench-", dir="/var/tmp"))
    rows: list[dict[str, object]] = []
    try:
        for mode in args.modes.split(","):
            for n, ms in run_mode(mode, sizes, args.repeat, args.quiet, args.workers,
                                  base).items():
                rows.append({"mode": mode, "instances": n, "runs": len(ms),
                             "median_ms": round(statistics.median(ms), 1),
                             "p95_ms": round(p95(ms), 1), "max_ms": round(max(ms), 1),
                             "goal_ms": GOAL_MS.get(n) if mode != "quiet" else None,
                             "samples_ms": [round(x, 1) for x in ms]})
    finally:
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "completion_bench.json").write_text(json.dumps(
        {"quiet_seconds": args.quiet, "rows": rows, "cpus": os.cpu_count()}, indent=2) + "\n")
    lines = [
        "# Time to result: MPPS and storage commitment vs the quiet period", "",
        f"Last instance acknowledged (storescu exits) -> result at the ops subscriber; "
        f"CT_small instances (39 kB); quiet path with quiet_seconds = {args.quiet}.", "",
        "| completion | instances | runs | median ms | p95 ms | max ms | goal p95 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        goal = f"<= {r['goal_ms']:.0f} ms" if r["goal_ms"] else ""
        lines.append(f"| {r['mode']} | {r['instances']} | {r['runs']} | {r['median_ms']} | "
                     f"{r['p95_ms']} | {r['max_ms']} | {goal} |")
    (OUT / "completion_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
