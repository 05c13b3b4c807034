"""How many boxes one ``edge-agent fleet exporter`` follows on one core.

A simulated fleet publishes through a local mutual-TLS mosquitto at the real rate of
a busy box with the production defaults: a retained birth status, telemetry every
60 s (``[telemetry] interval_seconds``), and every 300 s a signed audit checkpoint
plus the message with its events (100 pseudonymised events: ``checkpoint_every``
100 is reached by a box storing a few studies per hour). Payloads have the shape
and size a real daemon sends (telemetry with five liveness stages, four
certificates, one model with drift and subgroups). A scraper plays Prometheus:
``GET /metrics`` every 15 s.

The exporter (the real CLI, one process) is measured with psutil over a steady
window; boxes per core = boxes / (CPU share of one core). Its cost is per message
and per box rendered at scrape, not per broker connection, so the boxes are driven
by a few publisher connections with a bench-only ACL (the broker's per-connection
cost for 1,000 real mutual-TLS boxes is measured by bench/fleet_bench.py).

    .venv/bin/python bench/exporter_bench.py [--boxes 2000,5000] [--measure 60]
"""

from __future__ import annotations

import argparse
import getpass
import json
import multiprocessing as mp
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.identity.pki import issue, make_ca, write_pair  # noqa: E402
from agent.uplink import cloudevents  # noqa: E402
from bench.common import free_port, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
SITE = "bench-site"
SCRAPE_S = 15.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def telemetry_data(i: int, interval: float) -> dict[str, Any]:
    certs = {name: {"days_left": 300.0 - i % 300, "not_after": "2027-06-01T00:00:00Z",
                    "warn": False} for name in ("mqtt_device", "mqtt_ca", "dicom_tls", "dicom_ca")}
    stages = {name: {"last": "idle", "doing": "waiting", "age_s": 0.4, "deadline_s": 120.0,
                     "progress_age_s": 30.0, "stuck": False, "reason": None}
              for name in ("assembler", "publisher", "receive", "telemetry", "control")}
    return {
        "interval_s": interval,
        "system": {"cpu_percent": float(i % 70), "cpu_count": 4, "load_avg": [0.4, 0.3, 0.2],
                   "memory_percent": 30.0 + i % 50, "memory_available_bytes": 6_000_000_000,
                   "disk_free_bytes": 80_000_000_000, "disk_free_percent": 20.0 + i % 70,
                   "uptime_s": 86400, "process": {"rss_bytes": 150_000_000, "cpu_percent": 3.0,
                                                  "threads": 14, "open_files": 20,
                                                  "uptime_s": 86000},
                   "temperatures_c": {"coretemp": 48.0}},
        "pipeline": {"associations_accepted": 1200, "associations_rejected": 2,
                     "associations_active": 0, "instances_received": 48000,
                     "instances_duplicate": 3, "instances_failed": 0, "studies_processed": 410,
                     "studies_failed": 1, "instances_quarantined": 12, "latency_ms_p50": 900.0,
                     "latency_ms_p95": 2400.0,
                     "inbox": {"open": 1, "complete": 0, "done": 410, "pending_bytes": 5_000_000},
                     "outbox_depth": i % 5, "outbox_oldest_age_s": 0.5, "outbox_blocked": 0},
        "security": {"rejected_associations": 2, "mqtt_connected": True, "mqtt_tls_failures": 0,
                     "mqtt_connect_failures": 1, "mqtt_last_error": None, "egress_blocked": 0,
                     "broker_refusals": 0, "dicom_connections_refused": 0,
                     "dicom_rate_limited": 0, "dicom_tls_failures": 0, "audit_errors": 0,
                     "audit_lost": 0, "audit_held": 0, "audit_log_replaced": 0,
                     "audit_over_budget": 0, "audit_refusals_summarised": 0,
                     "audit_unsigned": 40,
                     "cert_days_left": {k: v["days_left"] for k, v in certs.items()},
                     "certificates": certs, "cert_expiry_warning": False, "certs_expiring": []},
        "models": [{"name": "lesion-demo", "version": "1.0.0", "sha256": "ab" * 32,
                    "verification": "signed"}],
        "drift": {"lesion-demo": {
            "version": "1.0.0", "studies": 410, "psi_input": 0.03, "psi_output": 0.05,
            "input_distribution": [0.1] * 10, "output_distribution": [0.1] * 10,
            "output_edges": [x / 10 for x in range(11)],
            "subgroups": {f"sex={s}": {"studies": 200, "psi_output": 0.04,
                                       "output_distribution": [0.1] * 10} for s in "FM"}}},
        "liveness": {"healthy": True, "watchdog": "pinging", "stuck": [], "stages": stages},
    }


def audit_pair(dev: str, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    box = f"{SITE}/{dev}"
    body = {"v": 1, "box": box, "checkpoint": n, "seq": (n + 1) * 100, "first_seq": n * 100 + 1,
            "head": "c" * 64, "prev": "d" * 64, "floor_seq": 0, "floor_hash": "0" * 64,
            "time": now_iso(), "public_key": "e" * 64, "next_public_key": "f" * 64,
            "genesis_public_key": "a" * 64}
    checkpoint = {"box": box, "checkpoint": {"body": body, "signature": "9" * 128}}
    events = [{"seq": n * 100 + k + 1, "time": now_iso(), "event": "instance.received",
               "event_id": "110104", "event_type": None, "action": "C", "outcome": 0,
               "user": None, "source": "peer:0123456789abcdef",
               "details": {"study": "st-5d41402abc4b2a76", "instance": "in-7d793037a0760186",
                           "calling_ae": "ae:1f3870be274f6c49", "bytes": 524288}}
              for k in range(100)]
    events_data = {"box": box, "covered_by": n, "part": 0, "parts": 1, "first_seq": n * 100 + 1,
                   "last_seq": (n + 1) * 100, "events": events}
    return checkpoint, events_data


def make_pki(root: Path, sims: int) -> None:
    ca_key, ca = make_ca("exporter bench CA")
    write_pair(root, "ca", ca_key, ca)
    k, c = issue(ca_key, ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    write_pair(root, "broker", k, c)
    for cn in ["ops", *(f"sim-{p}" for p in range(sims))]:
        k, c = issue(ca_key, ca, cn, client=True)
        write_pair(root, cn, k, c)


def write_broker(root: Path, port: int, sims: int) -> Path:
    acl = root / "bench.acl"
    acl.write_text("user ops\ntopic read edge/#\n"
                   + "".join(f"user sim-{p}\ntopic write edge/#\n" for p in range(sims)))
    conf = root / "mosquitto.conf"
    conf.write_text(f"""per_listener_settings false
allow_anonymous false
persistence false
log_dest stderr
log_type error
log_type warning
user {getpass.getuser()}
set_tcp_nodelay true
max_queued_messages 100000
max_inflight_messages 100
acl_file {acl}
listener {port} 127.0.0.1
cafile {root / "ca.pem"}
certfile {root / "broker.pem"}
keyfile {root / "broker.key"}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
""")
    return conf


def simulate(p: int, ids: list[int], root: Path, port: int, interval: float, audit_s: float,
             run_s: float, ready: Any) -> None:
    """One publisher connection driving its share of the boxes, staggered like boxes
    that started at different times."""
    ctx = ssl.create_default_context(cafile=str(root / "ca.pem"))
    ctx.load_cert_chain(str(root / f"sim-{p}.pem"), str(root / f"sim-{p}.key"))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{p}", protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    c.max_queued_messages_set(0)
    c.max_inflight_messages_set(100)
    c.connect("localhost", port, keepalive=60)
    c.loop_start()
    for i in ids:
        dev = f"box-{i:05d}"
        birth = cloudevents.envelope(kind="status", source=f"edge-agent/{SITE}/{dev}", data={
            "state": "online", "since": now_iso(), "agent_version": "0.1.0", "site": SITE,
            "device": dev, "models": [{"name": "lesion-demo", "version": "1.0.0",
                                       "sha256": "ab" * 32, "verification": "signed"}]})
        c.publish(f"edge/{SITE}/{dev}/status", cloudevents.encode(birth), qos=1, retain=True)
    # One telemetry body per box, re-enveloped at each send (the exporter does not care
    # that the figures repeat; it parses every message in full).
    bodies = {i: telemetry_data(i, interval) for i in ids}
    ready.set()
    t0 = time.time()
    n = len(ids)
    due_t = {i: t0 + k * interval / n for k, i in enumerate(ids)}
    due_a = {i: t0 + k * audit_s / n for k, i in enumerate(ids)}
    checkpoints = dict.fromkeys(ids, 0)
    sent = 0
    while time.time() - t0 < run_s:
        now = time.time()
        for i in ids:
            dev = f"box-{i:05d}"
            src = f"edge-agent/{SITE}/{dev}"
            if due_t[i] <= now:
                ev = cloudevents.envelope(kind="telemetry", source=src, data=bodies[i])
                c.publish(f"edge/{SITE}/{dev}/telemetry", cloudevents.encode(ev), qos=1)
                due_t[i] += interval
                sent += 1
            if due_a[i] <= now:
                cp, evs = audit_pair(dev, checkpoints[i])
                checkpoints[i] += 1
                for kind, data in (("audit", cp), ("audit.events", evs)):
                    ev = cloudevents.envelope(kind=kind, source=src, data=data,
                                              event_id=str(uuid.uuid4()))
                    c.publish(f"edge/{SITE}/{dev}/audit", cloudevents.encode(ev), qos=1)
                    sent += 1
                due_a[i] += audit_s
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"publisher": p, "boxes": n, "sent": sent}), flush=True)


class Scraper(threading.Thread):
    """Prometheus' part: GET /metrics every 15 s."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.times: list[float] = []
        self.size = 0
        self.last = ""

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=60) as r:
                self.last = r.read().decode()
            self.times.append(time.perf_counter() - t)
            self.size = len(self.last)
            self.stop.wait(SCRAPE_S)


def exporter_counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def one_run(root: Path, boxes: int, interval: float, audit_s: float, measure_s: float,
            sims: int) -> dict[str, Any]:
    port = free_port()
    conf = write_broker(root, port, sims)
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    mosq = subprocess.Popen([exe, "-c", str(conf)], stderr=open(root / "mosq.log", "ab"))
    exporter: subprocess.Popen[bytes] | None = None
    procs: list[mp.Process] = []
    try:
        wait_port(port)
        ops = root / "ops.toml"
        ops.write_text(f'[mqtt]\nhost = "localhost"\nport = {port}\nca = "{root / "ca.pem"}"\n'
                       f'cert = "{root / "ops.pem"}"\nkey = "{root / "ops.key"}"\n')
        http = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "provisioning.cli", "fleet", "exporter", "--config", str(ops),
             "--listen", f"127.0.0.1:{http}"], cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=open(root / "exporter.log", "ab"))
        wait_port(http)
        time.sleep(1.0)  # subscribed
        run_s = interval + measure_s + 30
        readies = []
        for p in range(sims):
            ev = mp.Event()
            proc = mp.Process(target=simulate, args=(p, list(range(p, boxes, sims)), root, port,
                                                     interval, audit_s, run_s, ev))
            proc.start()
            procs.append(proc)
            readies.append(ev)
        for ev in readies:
            ev.wait(300)
        scraper = Scraper(f"http://127.0.0.1:{http}/metrics")
        scraper.start()
        time.sleep(interval + 2)  # every box has sent telemetry: steady state from here
        proc = psutil.Process(exporter.pid)
        url = f"http://127.0.0.1:{http}/metrics"
        with urllib.request.urlopen(url, timeout=60) as r:
            m0 = exporter_counter(r.read().decode(), "edge_agent_fleet_messages_total")
        c0, t0 = proc.cpu_times(), time.time()
        scrapes0 = len(scraper.times)
        rss = []
        while time.time() - t0 < measure_s:
            rss.append(proc.memory_info().rss)
            time.sleep(1.0)
        c1, wall = proc.cpu_times(), time.time() - t0
        with urllib.request.urlopen(url, timeout=60) as r:
            final = r.read().decode()
        scraper.stop.set()
        # The scrape's own cost: the publishers stop, then five scrapes back to back.
        for proc_ in procs:
            proc_.terminate()
            proc_.join(10)
        time.sleep(2.0)
        s0 = proc.cpu_times()
        for _ in range(5):
            with urllib.request.urlopen(url, timeout=120) as r:
                r.read()
        s1 = proc.cpu_times()
        scrape_cpu = ((s1.user - s0.user) + (s1.system - s0.system)) / 5
        busy = (c1.user - c0.user) + (c1.system - c0.system)
        msgs = exporter_counter(final, "edge_agent_fleet_messages_total") - m0
        cpu_share = busy / wall
        scrape_times = scraper.times[scrapes0:] or scraper.times
        rows = exporter_counter(final, "edge_agent_fleet_boxes")
        with_telemetry = final.count("edge_agent_telemetry_interval_seconds{")
        return {
            "boxes": boxes, "telemetry_interval_s": interval, "audit_interval_s": audit_s,
            "publisher_connections": sims, "measure_s": round(wall, 1),
            "messages_per_s": round(msgs / wall, 1),
            "expected_messages_per_s": round(boxes / interval + 2 * boxes / audit_s, 1),
            "exporter_cpu_percent_of_one_core": round(100 * cpu_share, 1),
            "cpu_ms_per_message_incl_scrapes": round(1000 * busy / max(msgs, 1), 3),
            "scrape_s_mean": round(sum(scrape_times) / len(scrape_times), 3),
            "scrape_cpu_s": round(scrape_cpu, 3),
            "scrape_bytes": scraper.size,
            "exporter_rss_mib_max": round(max(rss) / 2**20, 1),
            "rows": int(rows), "rows_with_telemetry": with_telemetry,
            "rejected": exporter_counter(final, "edge_agent_fleet_messages_rejected_total"),
            "boxes_per_core": int(boxes / cpu_share) if cpu_share else None,
            "load_avg_1m": round(os.getloadavg()[0], 1),
        }
    finally:
        for proc_ in procs:
            proc_.terminate()
            proc_.join(10)
        if exporter is not None:
            exporter.terminate()
            exporter.wait(15)
        mosq.terminate()
        mosq.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boxes", default="2000,5000", help="comma-separated fleet sizes")
    ap.add_argument("--interval", type=float, default=60.0, help="telemetry seconds")
    ap.add_argument("--audit-interval", type=float, default=300.0)
    ap.add_argument("--measure", type=float, default=60.0)
    ap.add_argument("--publishers", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.boxes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="exporter-bench-"))
    try:
        make_pki(root, args.publishers)
        runs = [one_run(root, n, args.interval, args.audit_interval, args.measure,
                        args.publishers) for n in sizes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"runs": runs, "scrape_interval_s": SCRAPE_S,
              "broker": "mosquitto " + subprocess.run(
                  [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                  capture_output=True, text=True).stdout.split("\n")[0].split()[-1]
              + ", mutual TLS, set_tcp_nodelay true, persistence false, QoS 1",
              "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
              "when": datetime.now(UTC).isoformat(timespec="seconds")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "exporter_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# fleet exporter: telemetry every {args.interval:g} s, a checkpoint and 100 audit "
          f"events every {args.audit_interval:g} s per box, scraped every {SCRAPE_S:g} s", "",
          "| boxes | messages/s | exporter CPU (% of one core) | ms CPU per message (incl. "
          "scrapes) | scrape s (CPU s) | scrape MiB | RSS MiB | rows with telemetry | boxes per "
          "core (extrapolated) | load |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        md.append(f"| {r['boxes']} | {r['messages_per_s']} | {r['exporter_cpu_percent_of_one_core']}"
                  f" | {r['cpu_ms_per_message_incl_scrapes']} | {r['scrape_s_mean']} "
                  f"({r['scrape_cpu_s']}) | "
                  f"{r['scrape_bytes'] / 2**20:.1f} | {r['exporter_rss_mib_max']} | "
                  f"{r['rows_with_telemetry']} / {r['rows']} | {r['boxes_per_core']} | "
                  f"{r['load_avg_1m']} |")
    md += ["", f"{result['broker']}; {args.publishers} publisher connections; "
           f"{psutil.cpu_count()} CPUs shared with other work (load column)."]
    text = "\n".join(md) + "\n"
    (OUT / "exporter_bench.md").write_text(text)
    print(text)
    ok = all(r["rows_with_telemetry"] == r["boxes"] and not r["rejected"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
