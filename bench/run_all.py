"""Run every benchmark, one after the other, and assemble docs/benchmarks.md.

Each bench module (bench/<name>.py, exposing ``main()``) runs in its own
process, so one bench's memory or threads cannot colour the next, and writes
bench/out/<name>.md (+ .json).  The report puts those tables under a
description of the machine and the exact commands to reproduce them.

    make bench                                  # everything
    .venv/bin/python -m bench.run_all --only outbox_bench,e2e_bench
    .venv/bin/python -m bench.run_all --report-only   # re-assemble from bench/out/
    .venv/bin/python -m bench.run_all --args outbox_bench="--messages 20000"
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
DOC = REPO / "docs" / "benchmarks.md"

# (module, what it compares) in report order.
BENCHES = (
    ("ingest_bench", "DICOM ingest vs DCMTK storescp and Orthanc"),
    ("deid_bench", "de-identification vs dicognito and pydicom/deid"),
    ("infer_bench", "inference: explanation + uncertainty vs a bare pass, overhead vs raw "
                    "onnxruntime"),
    ("volume_bench", "volume model on a 600-slice CT series: peak memory, streamed vs "
                     "full stack"),
    ("e2e_bench", "end-to-end latency, idle CPU and memory"),
    ("completion_bench", "time to result: MPPS and storage commitment vs the quiet period"),
    ("outbox_bench", "outbox drain after an outage (100,000 messages)"),
    ("audit_bench", "audit append and verify rate"),
    ("fleet_bench", "fleet watch / MQTT fan-in"),
    ("exporter_bench", "fleet exporter: boxes per exporter at one core"),
)


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else "not available"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _pkg(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    nproc = _run(["nproc"])
    tools = {
        "mosquitto": _run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"]),
        "DCMTK": _run(["storescu", "--version"]),
        "Orthanc": _run(["Orthanc", "--version"]),
    }
    pkgs = ["pydicom", "pynetdicom", "onnxruntime", "cryptography", "paho-mqtt", "numpy",
            "dicognito", "deid", "psutil"]
    rows = [
        "## Machine", "",
        "| | |", "|---|---|",
        f"| CPUs (`nproc`) | {nproc} |",
        f"| CPU model | {_cpu_model()} |",
        f"| RAM | {_ram()} |",
        f"| kernel | {platform.release()} |",
        f"| OS | {_os()} |",
        f"| Python | {platform.python_version()} |",
        f"| SQLite | {sqlite3.sqlite_version} |",
    ]
    rows += [f"| {k} | {v} |" for k, v in tools.items()]
    rows += [f"| {p} | {_pkg(p)} |" for p in pkgs]
    rows += [
        "", "Settings that change the numbers, as used here:", "",
        "* DCMTK tools (and Orthanc, built on DCMTK) run with `TCP_NODELAY=1` in the "
        "environment; without it they stall ~50 ms per instance (Nagle).",
        "* mosquitto runs with `set_tcp_nodelay true` (the dev box's mosquitto.conf); "
        "the default adds ~40 ms to every TLS connect.",
        "* pynetdicom: max PDU 1 MiB on both sides (its 16 KiB default costs 20-80 %).",
        "* The machine is shared (other jobs may run): every table gives medians, and "
        "ratios are taken within one run, side by side.",
    ]
    return rows


def run_bench(name: str, extra: list[str], timeout: float) -> tuple[int, float, str]:
    path = REPO / "bench" / f"{name}.py"
    if not path.exists():
        return -1, 0.0, "module not present"
    cmd = [sys.executable, str(path), *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return -2, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
    return proc.returncode, time.perf_counter() - t0, tail


def _demote(md_text: str) -> str:
    return re.sub(r"(?m)^(#+) ", lambda m: "#" + m.group(1) + " ", md_text).strip()


def report(status: dict[str, tuple[int, float, str]], args_for: dict[str, list[str]]) -> str:
    lines = [
        "# Benchmarks", "",
        "Generated by `make bench` (= `.venv/bin/python -m bench.run_all`), which runs every "
        "comparison below in one go, side by side on the same machine, and rewrites this "
        "page. Each section says what is compared and how to reproduce it alone.", "",
        *machine(), "",
    ]
    for name, what in BENCHES:
        cmd = " ".join([".venv/bin/python", f"bench/{name}.py",
                        *map(shlex.quote, args_for.get(name, []))])
        lines += [f"## {what}", "", f"Reproduce: `{cmd}`", ""]
        rc, secs, tail = status.get(name, (0, 0.0, ""))
        out = OUT / f"{name}.md"
        if rc == -1:
            lines += [f"_Not run: bench/{name}.py is not in this tree yet._", ""]
            continue
        if rc not in (None, 0):
            lines += [f"_This run failed (exit {rc} after {secs:.0f} s): {tail or 'no output'}_",
                      ""]
        if out.exists():
            body = _demote(out.read_text())
            # Each bench's own title is replaced by the section heading above.
            body = re.sub(r"^## .*\n+", "", body, count=1)
            lines += [body, ""]
        elif rc in (None, 0):
            lines += ["_No results in bench/out/ (not run yet)._", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated bench names")
    ap.add_argument("--skip", default="", help="comma-separated bench names")
    ap.add_argument("--report-only", action="store_true",
                    help="do not run anything; rebuild docs/benchmarks.md from bench/out/")
    ap.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                    help="extra arguments for one bench, e.g. outbox_bench=\"--messages 20000\"")
    ap.add_argument("--timeout", type=float, default=1800, help="per bench, seconds")
    a = ap.parse_args()
    only = {x for x in a.only.split(",") if x}
    skip = {x for x in a.skip.split(",") if x}
    args_for: dict[str, list[str]] = {}
    for item in a.args:
        name, _, rest = item.partition("=")
        args_for[name] = shlex.split(rest)
    status: dict[str, tuple[int, float, str]] = {}
    failed = 0
    for name, what in BENCHES:
        if (only and name not in only) or name in skip:
            continue
        if a.report_only:
            continue
        print(f"== {name}: {what}", flush=True)
        rc, secs, tail = run_bench(name, args_for.get(name, []), a.timeout)
        status[name] = (rc, secs, tail)
        print(f"   exit {rc} in {secs:.0f} s" + (f"\n{tail}" if rc not in (0, -1) else ""),
              flush=True)
        failed += rc not in (0, -1)
    if not a.report_only:
        for name, _ in BENCHES:
            if name not in status and not (REPO / "bench" / f"{name}.py").exists():
                status[name] = (-1, 0.0, "module not present")
    else:
        status = {n: (-1, 0.0, "") for n, _ in BENCHES if not (REPO / "bench" / f"{n}.py").exists()}
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(report(status, args_for))
    print(f"wrote {DOC.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
