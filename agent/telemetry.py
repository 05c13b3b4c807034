"""Health telemetry: psutil system figures plus pipeline and security counters.

Only aggregates leave the box: counts, rates, latencies, versions.  Nothing
here is derived from a dataset value.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509

_START = time.time()


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return round(s[k], 1)


def cert_days_left(path: Path) -> float | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    left = cert.not_valid_after_utc - datetime.now(UTC)
    return round(left.total_seconds() / 86400, 1)


def system(state_dir: Path) -> dict[str, Any]:
    proc = psutil.Process(os.getpid())
    with proc.oneshot():
        mem = proc.memory_info()
        try:
            open_files = len(proc.open_files())
        except (psutil.Error, OSError):
            open_files = -1
        threads = proc.num_threads()
        cpu_proc = proc.cpu_percent(None)
    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(state_dir)
    out: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(None),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "memory_percent": vm.percent,
        "memory_available_bytes": vm.available,
        "disk_free_bytes": disk.free,
        "disk_free_percent": round(100.0 * disk.free / disk.total, 1) if disk.total else 0.0,
        "uptime_s": round(time.time() - psutil.boot_time()),
        "process": {
            "rss_bytes": mem.rss,
            "cpu_percent": cpu_proc,
            "threads": threads,
            "open_files": open_files,
            "uptime_s": round(time.time() - _START),
        },
    }
    temps_fn: Callable[[], dict[str, Any]] | None = getattr(psutil, "sensors_temperatures", None)
    if temps_fn is not None:
        try:
            temps = temps_fn()
            out["temperatures_c"] = {
                name: max(t.current for t in entries) for name, entries in temps.items() if entries
            }
        except (OSError, AttributeError):
            pass
    return out
