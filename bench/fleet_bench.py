"""A simulated fleet through a local mutual-TLS mosquitto into ``fleet watch``.

N boxes (default 1,000), each its own client certificate (CN = its device id)
and MQTT 5 session, publish a retained birth status and a telemetry message
every 10 s (QoS 1), staggered like real boxes that started at different times.
The broker runs a bench-specific config: ``pattern write edge/+/%u/#`` lets
each certificate write only under its own device segment.  ``edge-agent fleet
watch`` (the real CLI, live table mode, output to /dev/null) is measured with
psutil for CPU and memory; then ``fleet watch --once --json`` must list every
box online.  Broker settings: mosquitto ``set_tcp_nodelay true``, persistence
off.  Writes JSON and markdown to bench/out/.

    .venv/bin/python bench/fleet_bench.py [--boxes 1000] [--interval 10] [--measure 60]
"""

from __future__ import annotations

import argparse
import getpass
import json
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.identity.pki import issue, make_ca, write_pair  # noqa: E402
from agent.uplink import cloudevents  # noqa: E402
from bench.common import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
SITE = "bench-site"


def make_pki(root: Path, n: int) -> None:
    ca_key, ca = make_ca("fleet bench CA")
    write_pair(root, "ca", ca_key, ca)
    k, c = issue(ca_key, ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    write_pair(root, "broker", k, c)
    k, c = issue(ca_key, ca, "ops", client=True)
    write_pair(root, "ops", k, c)
    for i in range(n):
        k, c = issue(ca_key, ca, f"box-{i:04d}", client=True)
        write_pair(root / "boxes", f"box-{i:04d}", k, c)


def write_broker(root: Path, port: int) -> Path:
    acl = root / "bench.acl"
    acl.write_text("# every box writes only under its own device segment (CN = username)\n"
                   "pattern write edge/+/%u/#\n\nuser ops\ntopic read edge/#\n")
    conf = root / "mosquitto.conf"
    conf.write_text(f"""per_listener_settings false
allow_anonymous false
persistence false
log_dest stderr
log_type error
log_type warning
user {getpass.getuser()}
set_tcp_nodelay true
max_queued_messages 10000
acl_file {acl}
listener {port} 127.0.0.1
cafile {root / "ca.pem"}
certfile {root / "broker.pem"}
keyfile {root / "broker.key"}
require_certificate true
use_identity_as_username true
""")
    return conf


def telemetry(i: int, t0: float, interval: float) -> dict[str, Any]:
    # Plausible, varied numbers; the fleet view's cost does not depend on them.
    return {
        "interval_s": interval,
        "system": {"cpu_percent": float(i % 70), "memory_percent": 30.0 + i % 50,
                   "disk_free_percent": 20.0 + i % 70, "load_avg": [0.1, 0.2, 0.3],
                   "process": {"rss_bytes": 150_000_000, "threads": 12}},
        "pipeline": {"outbox_depth": i % 5, "outbox_oldest_age_s": 0.5,
                     "studies_processed": int(time.time() - t0) // 7,
                     "latency_ms_p50": 900.0, "latency_ms_p95": 2400.0},
        "security": {"cert_days_left": {"mqtt_device": 300.0 - i % 400},
                     "egress_blocked": 0, "broker_refusals": 0, "mqtt_tls_failures": 0},
        "models": [{"name": "lesion-demo", "version": "1.0.0"}],
        "drift": {},
    }


def simulate(ids: list[int], root: Path, port: int, interval: float, run_s: float,
             ready: Any) -> None:
    """One process driving many paho clients from a single selector loop."""
    sel = selectors.DefaultSelector()
    clients: list[tuple[int, mqtt.Client]] = []
    for i in ids:
        dev = f"box-{i:04d}"
        ctx = ssl.create_default_context(cafile=str(root / "ca.pem"))
        ctx.load_cert_chain(str(root / "boxes" / f"{dev}.pem"), str(root / "boxes" / f"{dev}.key"))
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{SITE}.{dev}",
                        protocol=mqtt.MQTTv5)
        c.tls_set_context(ctx)
        src = f"edge-agent/{SITE}/{dev}"
        off = cloudevents.envelope(kind="status", source=src, data={
            "state": "offline", "since": datetime.now(UTC).isoformat(), "agent_version": "0.1.0",
            "site": SITE, "device": dev, "models": []})
        c.will_set(f"edge/{SITE}/{dev}/status", cloudevents.encode(off), qos=1, retain=True)
        c.connect("localhost", port, keepalive=60)
        sock = c.socket()
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, c)
        clients.append((i, c))
        c.loop_read()  # CONNACK
    t0 = time.time()
    for i, c in clients:
        dev = f"box-{i:04d}"
        birth = cloudevents.envelope(kind="status", source=f"edge-agent/{SITE}/{dev}", data={
            "state": "online", "since": datetime.now(UTC).isoformat(), "agent_version": "0.1.0",
            "site": SITE, "device": dev, "models": [{"name": "lesion-demo", "version": "1.0.0"}]})
        c.publish(f"edge/{SITE}/{dev}/status", cloudevents.encode(birth), qos=1, retain=True)
    ready.set()
    n = len(ids)
    # Staggered: box k of this process publishes at t0 + k * interval / n, every interval.
    due = {i: t0 + k * interval / n for k, (i, _c) in enumerate(clients)}
    last_misc = 0.0
    sent = 0
    while time.time() - t0 < run_s:
        now = time.time()
        for i, c in clients:
            if due[i] <= now:
                dev = f"box-{i:04d}"
                ev = cloudevents.envelope(kind="telemetry", source=f"edge-agent/{SITE}/{dev}",
                                          data=telemetry(i, t0, interval))
                c.publish(f"edge/{SITE}/{dev}/telemetry", cloudevents.encode(ev), qos=1)
                due[i] += interval
                sent += 1
        for _i, c in clients:
            if c.want_write():
                c.loop_write()
        for key, _ev in sel.select(timeout=0.02):
            key.data.loop_read(10)
        if now - last_misc > 1.0:
            for _i, c in clients:
                c.loop_misc()
            last_misc = now
    for _i, c in clients:
        c.disconnect()
    print(json.dumps({"pid": os.getpid(), "clients": n, "telemetry_sent": sent}), flush=True)


def measure(proc: psutil.Process, seconds: float) -> dict[str, float]:
    c0 = proc.cpu_times()
    t0 = time.time()
    rss = []
    while time.time() - t0 < seconds:
        rss.append(proc.memory_info().rss)
        time.sleep(1.0)
    c1 = proc.cpu_times()
    busy = (c1.user - c0.user) + (c1.system - c0.system)
    return {"seconds": round(time.time() - t0, 1),
            "cpu_percent_of_one_core": round(100.0 * busy / (time.time() - t0), 2),
            "rss_mib_max": round(max(rss) / 2**20, 1),
            "rss_mib_mean": round(sum(rss) / len(rss) / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--measure", type=float, default=60.0)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    mosq: subprocess.Popen[bytes] | None = None
    sims: list[mp.Process] = []
    watch: subprocess.Popen[bytes] | None = None
    try:
        t = time.time()
        make_pki(root, args.boxes)
        pki_s = time.time() - t
        port = free_port()
        conf = write_broker(root, port)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        mosq = subprocess.Popen([exe, "-c", str(conf)], stderr=open(root / "mosq.log", "wb"))
        time.sleep(0.5)
        ops = root / "ops.toml"
        ops.write_text(f'[mqtt]\nhost = "localhost"\nport = {port}\nca = "{root / "ca.pem"}"\n'
                       f'cert = "{root / "ops.pem"}"\nkey = "{root / "ops.key"}"\n'
                       'topic_prefix = "edge"\n')
        cli = [sys.executable, "-m", "provisioning.cli", "fleet", "watch", "--config", str(ops)]
        watch = subprocess.Popen(cli, cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=open(root / "watch.log", "wb"))
        run_s = args.measure + 60
        readies = []
        t = time.time()
        for p in range(args.procs):
            ev = mp.Event()
            ids = list(range(p, args.boxes, args.procs))
            proc = mp.Process(target=simulate, args=(ids, root, port, args.interval, run_s, ev))
            proc.start()
            sims.append(proc)
            readies.append(ev)
        for ev in readies:
            ev.wait(300)
        connect_s = time.time() - t
        time.sleep(args.interval)  # every box has sent telemetry once; steady state from here
        wproc = psutil.Process(watch.pid)
        steady = measure(wproc, args.measure)
        once = subprocess.run([*cli, "--once", "--json", "--wait", str(args.interval + 2)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        rows = json.loads(once.stdout) if once.returncode == 0 else []
        online = sum(1 for r in rows if r["state"] == "online")
        with_telemetry = sum(1 for r in rows if r["cpu"] is not None)
        sim_cpu = sum(psutil.Process(p.pid).cpu_times().user for p in sims if p.is_alive())
        result = {
            "boxes": args.boxes, "telemetry_interval_s": args.interval,
            "messages_per_s": round(args.boxes / args.interval, 1),
            "fleet_watch_live_table": steady,
            "once_json": {"rows": len(rows), "online": online, "with_telemetry": with_telemetry,
                          "returncode": once.returncode},
            "setup": {"pki_s": round(pki_s, 1), "connect_all_s": round(connect_s, 1),
                      "simulator_processes": args.procs,
                      "simulator_user_cpu_s": round(sim_cpu, 1)},
            "broker": "mosquitto " + subprocess.run([exe, "-h"], capture_output=True,
                                                     text=True).stdout.split("\n")[0].split()[-1]
                      + ", mutual TLS, set_tcp_nodelay true, persistence false, QoS 1",
            "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                        "load_avg_1m": os.getloadavg()[0]},
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "fleet_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        md = (f"# fleet watch: {args.boxes} boxes, telemetry every {args.interval:g} s\n\n"
              f"| metric | value |\n|---|---|\n"
              f"| messages/s into the view | {result['messages_per_s']} |\n"
              f"| fleet watch CPU (one core) | {steady['cpu_percent_of_one_core']} % |\n"
              f"| fleet watch RSS max / mean | {steady['rss_mib_max']} / "
              f"{steady['rss_mib_mean']} MiB |\n"
              f"| boxes listed / online / with telemetry | {len(rows)} / {online} / "
              f"{with_telemetry} |\n"
              f"| connect all boxes (mTLS) | {connect_s:.1f} s |\n\n"
              f"{result['broker']}; {psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}.\n")
        (OUT / "fleet_bench.md").write_text(md)
        print(md)
        return 0 if online == args.boxes else 1
    finally:
        if watch is not None:
            watch.terminate()
            watch.wait(10)
        for p in sims:
            p.terminate()
            p.join(10)
        if mosq is not None:
            mosq.terminate()
            mosq.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
