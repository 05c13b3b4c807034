"""End-to-end latency and the daemon's idle cost, on a real dev box.

* latency: DCMTK ``storescu`` (``TCP_NODELAY=1``) sends a small CT study to the
  running daemon; we time from storescu's exit (last instance acknowledged)
  to the result arriving at an ops subscriber over mTLS MQTT.  The study's
  quiet period (``--quiet``, the assembly rule "no new instance for N s") is
  part of that by design, so it is also reported with the quiet period taken
  out, next to the pipeline's own ``latency_ms`` from the result;
* idle: CPU and RSS of the daemon process, sampled every second for
  ``--idle-seconds`` (default 60) with no traffic (telemetry still runs).

    .venv/bin/python bench/e2e_bench.py [--studies 10] [--instances 3] [--quiet 1]

Writes bench/out/e2e_bench.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pydicom
from paho.mqtt.enums import CallbackAPIVersion
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.ops.devbox import provision_dev  # noqa: E402
from bench.common import free_port, set_config, wait_port  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def _study(tmp: Path, n: int) -> list[Path]:
    src = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    st, se = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        ds = src.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = st, se
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = tmp / f"{st[-12:]}-{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


class Results:
    def __init__(self, root: Path, port: int) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.cv = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"e2e-{port}",
                             protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.pem"))
        ctx.load_cert_chain(str(root / "pki" / "ops.pem"), str(root / "pki" / "ops.key"))
        self.c.tls_set_context(ctx)
        ready = threading.Event()
        self.c.on_connect = lambda c, *_a: c.subscribe("edge/+/+/results", qos=1)
        self.c.on_subscribe = lambda *_a: ready.set()
        self.c.on_message = self._msg
        self.c.connect("localhost", port)
        self.c.loop_start()
        if not ready.wait(15):
            raise RuntimeError("subscriber could not subscribe")

    def _msg(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.cv:
            self.arrivals.append((time.perf_counter(), json.loads(m.payload)))
            self.cv.notify_all()

    def wait(self, n: int, timeout: float) -> tuple[float, dict[str, Any]]:
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.arrivals) >= n, timeout):
                raise RuntimeError("no result in time")
            return self.arrivals[n - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=1.0, help="[study] quiet_seconds")
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--workers", type=int, default=None,
                    help="[dicom] workers (default: the box's default, one per core)")
    args = ap.parse_args()
    storescu = shutil.which("storescu")
    if storescu is None:
        print("DCMTK storescu is required (tools/setup.sh test)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="e2e-bench-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        box = provision_dev(base / "box", dicom_port=free_port(), mqtt_port=free_port())
        set_config(box.config, "study", "quiet_seconds", str(args.quiet))
        if args.workers is not None:
            set_config(box.config, "dicom", "workers", str(args.workers))
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        broker = subprocess.Popen([exe, "-c", str(box.mosquitto_conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(broker)
        wait_port(box.mqtt_port)
        log = open(base / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
        daemon = subprocess.Popen([sys.executable, "-m", "provisioning.cli", "run", "--config",
                                   str(box.config)], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=log)
        procs.append(daemon)
        wait_port(box.dicom_port)
        sub = Results(base / "box", box.mqtt_port)
        env = dict(os.environ, TCP_NODELAY="1")
        lat, pipe = [], []
        for k in range(args.studies):
            files = _study(base, args.instances)
            subprocess.run([storescu, "-aet", "STORESCU", "-aec", box.ae_title, "127.0.0.1",
                            str(box.dicom_port), *map(str, files)], env=env, check=True,
                           capture_output=True)
            t_last = time.perf_counter()
            t_res, ev = sub.wait(k + 1, timeout=120)
            lat.append((t_res - t_last) * 1000)
            pipe.append(float(ev["data"]["latency_ms"]))
        # Idle: no traffic, the daemon's own threads (telemetry, MQTT keepalive) only.
        p = psutil.Process(daemon.pid)
        p.cpu_percent(None)
        cpu, rss = [], []
        for _ in range(args.idle_seconds):
            time.sleep(1)
            cpu.append(p.cpu_percent(None))
            rss.append(p.memory_info().rss / 2**20)
        sub.c.disconnect()
        sub.c.loop_stop()
        summary = {
            "studies": args.studies, "instances_per_study": args.instances,
            "quiet_seconds": args.quiet,
            "e2e_ms_median": round(statistics.median(lat), 1),
            "e2e_ms_p90": round(sorted(lat)[int(0.9 * (len(lat) - 1))], 1),
            "e2e_minus_quiet_ms_median": round(statistics.median(lat) - args.quiet * 1000, 1),
            "pipeline_latency_ms_median": round(statistics.median(pipe), 1),
            "idle_seconds": args.idle_seconds,
            "idle_cpu_percent_median": round(statistics.median(cpu), 2),
            "idle_cpu_percent_max": round(max(cpu), 2),
            "idle_rss_mib_median": round(statistics.median(rss), 1),
            "idle_rss_mib_max": round(max(rss), 1),
        }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "e2e_bench.json").write_text(json.dumps(
            {"summary": summary, "latencies_ms": lat, "pipeline_ms": pipe,
             "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                     "dcmtk_tcp_nodelay": True, "broker_tcp_nodelay": True}}, indent=2) + "\n")
        lines = [
            "# End-to-end latency and idle cost", "",
            f"{args.studies} studies of {args.instances} CT instances (CT_small, 39 kB each) sent "
            f"with DCMTK storescu (`TCP_NODELAY=1`) to the daemon on a dev box; results received "
            f"by an ops subscriber over mTLS MQTT (mosquitto `set_tcp_nodelay true`). "
            f"Quiet period {args.quiet} s.", "",
            "| measure | median | p90 |", "|---|---:|---:|",
            f"| last instance acknowledged -> result at subscriber (ms) | "
            f"{summary['e2e_ms_median']} | {summary['e2e_ms_p90']} |",
            f"| same, minus the quiet period (ms) | {summary['e2e_minus_quiet_ms_median']} | |",
            f"| pipeline latency reported in the result (ms) | "
            f"{summary['pipeline_latency_ms_median']} | |", "",
            f"Idle over {args.idle_seconds} s: CPU median {summary['idle_cpu_percent_median']} % "
            f"(max {summary['idle_cpu_percent_max']} %) of one core; RSS median "
            f"{summary['idle_rss_mib_median']} MiB (max {summary['idle_rss_mib_max']} MiB).",
        ]
        (OUT / "e2e_bench.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not os.environ.get("E2E_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
