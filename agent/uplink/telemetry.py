"""Health telemetry: psutil system figures plus pipeline and security counters.

Only aggregates leave the box: counts, rates, latencies, versions.  Nothing
here is derived from a dataset value.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil
from cryptography import x509

from agent.config import Config

log = logging.getLogger(__name__)

_START = time.time()
CERT_WARN_DAYS = 30.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when there are none)."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return round(s[k], 1)


def cert_not_after(path: Path) -> datetime | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


def cert_days_left(path: Path, now: datetime | None = None) -> float | None:
    end = cert_not_after(path)
    if end is None:
        return None
    left = end - (now or datetime.now(UTC))
    return round(left.total_seconds() / 86400, 1)


@dataclass(frozen=True)
class CertStatus:
    name: str
    days_left: float | None  # None: missing or unreadable
    not_after: str | None
    warn: bool  # expires within CERT_WARN_DAYS, or already expired, or unreadable

    def as_json(self) -> dict[str, Any]:
        return {"days_left": self.days_left, "not_after": self.not_after, "warn": self.warn}


class CertWatch:
    """Days until each certificate the box depends on expires.

    Warns in the log once a day per certificate from ``warn_days`` before
    expiry (and for a missing one), and flags it in telemetry, so central ops
    see it weeks before a box goes dark.
    """

    def __init__(self, certs: Mapping[str, Path], warn_days: float = CERT_WARN_DAYS) -> None:
        self.certs = dict(certs)
        self.warn_days = warn_days
        self._warned: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, cfg: Config) -> CertWatch:
        certs = {"mqtt_device": cfg.mqtt.cert, "mqtt_ca": cfg.mqtt.ca}
        tls = cfg.dicom.tls
        if tls.enabled and tls.cert is not None:
            certs["dicom_tls"] = tls.cert
        if tls.enabled and tls.ca is not None:
            certs["dicom_ca"] = tls.ca
        return cls(certs)

    def check(self, now: datetime | None = None) -> list[CertStatus]:
        now = now or datetime.now(UTC)
        out = []
        for name, path in sorted(self.certs.items()):
            end = cert_not_after(path)
            days = None if end is None else round((end - now).total_seconds() / 86400, 1)
            warn = days is None or days <= self.warn_days
            out.append(CertStatus(name, days, None if end is None else
                                  end.isoformat().replace("+00:00", "Z"), warn))
            if warn:
                self._log_once(name, days, now.timestamp())
        return out

    def _log_once(self, name: str, days: float | None, ts: float) -> None:
        with self._lock:
            if ts - self._warned.get(name, -1e12) < 86400:
                return
            self._warned[name] = ts
        if days is None:
            log.warning("certificate %s is missing or unreadable: renew it", name)
        elif days < 0:
            log.error("certificate %s expired %.0f day(s) ago: the box cannot connect; renew it",
                      name, -days)
        else:
            log.warning("certificate %s expires in %.1f day(s): renew it before it does "
                        "(edge-agent provision init / install-cert)", name, days)


class LinkView(Protocol):
    """What telemetry needs from the publisher's live state."""

    connected: bool
    tls_failures: int
    connect_failures: int
    refused: int
    blocked_phi: int
    last_error: str | None


def security(link: LinkView, rejected_associations: int,
             certs: Sequence[CertStatus]) -> dict[str, Any]:
    expiring = [c.name for c in certs if c.warn]
    return {
        "rejected_associations": rejected_associations,
        "mqtt_connected": link.connected,
        "mqtt_tls_failures": link.tls_failures,
        "mqtt_connect_failures": link.connect_failures,
        "mqtt_last_error": link.last_error,
        "egress_blocked": link.blocked_phi,
        "broker_refusals": link.refused,
        "cert_days_left": {c.name: c.days_left for c in certs},
        "certificates": {c.name: c.as_json() for c in certs},
        "cert_expiry_warning": bool(expiring),
        "certs_expiring": expiring,
    }


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
        "cpu_count": psutil.cpu_count() or 1,
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
