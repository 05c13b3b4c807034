"""Count the fsync-family system calls the daemon makes per received instance.

Starts a dev box daemon under ``strace -f`` (fsync, fdatasync, sync_file_range,
msync), lets it settle, sends ``--n`` CT-like instances over one association with
DCMTK storescu, waits, and prints the calls made while receiving, per instance and
by file (the descriptors resolved by strace ``-y``).

    .venv/bin/python bench/fsync_count.py [--n 20] [--workers 1] [--code DIR]

``--code``: an older checkout to count (its daemon runs from there).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import wait_port  # noqa: E402
from bench.ingest_bench import CALLED, EdgeAgent, make_series, send  # noqa: E402

CALL = re.compile(r"^\d+\s+(fsync|fdatasync|sync_file_range|msync)\((\d+)<([^>]*)>")


def classify(path: str) -> str:
    if "/files/slots" in path:
        return "instance file" if path.endswith(".enc") else "slot directory"
    name = Path(path).name
    return name if name else path


def count(log: Path, start: int) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines()[start:]:
        m = CALL.match(line)
        if m:
            out[f"{m.group(1)} {classify(m.group(3))}"] += 1
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon (strace's child; strace itself would only detach)."""
    import psutil

    kids = psutil.Process(proc.pid).children()
    for k in kids:
        k.terminate()
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        for k in kids:
            k.kill()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--code", type=Path, default=REPO)
    a = ap.parse_args()
    if shutil.which("strace") is None or shutil.which("storescu") is None:
        print("strace and storescu (DCMTK) are required", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fsync-count-"))
    try:
        files = make_series(work / "ct", a.n, 512, 512, "CT")
        agent = EdgeAgent(work, workers=a.workers, code=a.code.resolve())
        log = work / "strace.log"
        code = str(a.code.resolve())
        proc = subprocess.Popen(
            ["strace", "-f", "-y", "-qq", "-o", str(log),
             "-e", "trace=fsync,fdatasync,sync_file_range,msync",
             sys.executable, "-m", "provisioning.cli", "run", "--config", str(agent.cfg)],
            cwd=code, env=dict(os.environ, PYTHONPATH=code),
            stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "ab"))
        try:
            wait_port(agent.port, 120)
            time.sleep(3)  # start-up writes settle
            before = len(log.read_text(errors="replace").splitlines())
            send(agent.port, files, 1, CALLED)
            time.sleep(1)
            counted = count(log, before)
        finally:
            stop(proc)
        total = sum(counted.values())
        print(f"{a.n} instances, workers={a.workers}, code={code}: {total} calls, "
              f"{total / a.n:.2f} per instance")
        for what, n in counted.most_common():
            print(f"  {n:5d}  {what}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
