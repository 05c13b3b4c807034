"""Optional Prometheus text endpoint for a hospital's own monitoring.

Serves the latest telemetry sample (the same aggregates that go to MQTT, so
nothing new can leak here) as gauges on ``127.0.0.1:[telemetry]
prometheus_port``.  Loopback only: a site that wants it remotely puts its own
authenticated exporter or proxy in front, we never open a port to the LAN.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "edge_agent"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Maps whose keys are instances of one thing become a label rather than a name.
_LABELLED = {"cert_days_left": "cert", "temperatures_c": "sensor", "load_avg": "window"}
_SKIP = {"certificates", "certs_expiring", "mqtt_last_error", "models"}
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _name(parts: tuple[str, ...]) -> str:
    return _BAD.sub("_", "_".join((PREFIX, *parts))).lower()


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        return float(v)
    return None


def _walk(doc: Mapping[str, Any], parts: tuple[str, ...]) -> Iterator[tuple[str, str, float]]:
    for key, value in doc.items():
        if key in _SKIP:
            continue
        here = (*parts, key)
        if key in _LABELLED:
            items = value.items() if isinstance(value, dict) else enumerate(value or ())
            label = _LABELLED[key]
            for k, v in items:
                n = _num(v)
                if n is not None:
                    yield _name(here), f'{{{label}="{_label(str(k))}"}}', n
        elif isinstance(value, dict):
            yield from _walk(value, here)
        else:
            n = _num(value)
            if n is not None:
                yield _name(here), "", n


def render(sample: Mapping[str, Any] | None) -> str:
    """Prometheus text exposition (format 0.0.4) of one telemetry sample."""
    lines = [f"# TYPE {PREFIX}_up gauge", f"{PREFIX}_up 1"]
    if sample is None:
        return "\n".join(lines) + "\n"
    seen: set[str] = set()
    for name, labels, value in _walk(sample, ()):
        if name not in seen:
            lines.append(f"# TYPE {name} gauge")
            seen.add(name)
        lines.append(f"{name}{labels} {value:g}")
    for m in sample.get("models") or ():
        if isinstance(m, dict):
            lines.append(f'{PREFIX}_model_info{{name="{_label(str(m.get("name")))}",'
                         f'version="{_label(str(m.get("version")))}"}} 1')
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A loopback HTTP server answering GET /metrics with the latest sample."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError([f"[telemetry] prometheus endpoint must bind loopback, not {host}"])
        self._sample: dict[str, Any] | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = render(server.sample()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # scrapes every few seconds would flood the journal

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError([f"[telemetry] prometheus_port {port}: cannot listen on "
                               f"{host} ({exc.strerror})"]) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def update(self, sample: dict[str, Any]) -> None:
        with self._lock:
            self._sample = sample

    def sample(self) -> dict[str, Any] | None:
        with self._lock:
            return self._sample

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()
        log.info("prometheus metrics on http://127.0.0.1:%d/metrics", self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
