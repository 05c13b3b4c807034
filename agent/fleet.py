"""Central ops: a live view of every box under the topic prefix.

Subscribes with the ops certificate to ``{prefix}/+/+/#`` (or a shared
subscription, so several ops consumers split the load) and folds status,
telemetry and results into one row per box.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import ConfigError


@dataclass(frozen=True)
class OpsSettings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path = field(repr=False)
    topic_prefix: str = "edge"
    share_group: str | None = None


def load_ops(path: Path) -> OpsSettings:
    try:
        data = tomllib.loads(path.read_text())
        m = data["mqtt"]
        base = path.parent
        def p(v: str) -> Path:
            return Path(v) if Path(v).is_absolute() else base / v
        return OpsSettings(str(m["host"]), int(m.get("port", 8883)), p(m["ca"]), p(m["cert"]),
                           p(m["key"]), str(m.get("topic_prefix", "edge")), m.get("share_group"))
    except FileNotFoundError:
        raise ConfigError(["file not found"], path=str(path)) from None
    except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"[mqtt] needs host, port, ca, cert, key ({exc})"], path=str(path)) from None


@dataclass
class BoxRow:
    box: str
    state: str = "unknown"
    since: str = ""
    last_seen: float = 0.0
    agent_version: str = ""
    models: list[str] = field(default_factory=list)
    cpu: float | None = None
    mem: float | None = None
    disk_free_pct: float | None = None
    backlog: int | None = None
    cert_days: float | None = None
    alerts: int = 0
    results: int = 0
    last_result: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class FleetView:
    def __init__(self, s: OpsSettings) -> None:
        self.s = s
        self.rows: dict[str, BoxRow] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.error: str | None = None
        cid = f"fleet-watch-{int(time.time() * 1000) % 10**9}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(s.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.cert), str(s.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self.error = f"broker refused: {rc}"
            return
        topic = f"{self.s.topic_prefix}/+/+/#"
        if self.s.share_group:
            topic = f"$share/{self.s.share_group}/{topic}"
        c.subscribe(topic, qos=1)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self.connected.clear()
        if getattr(rc, "value", 0):
            self.error = f"disconnected: {rc}"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.fold(msg.topic, json.loads(msg.payload))
        except (ValueError, TypeError, AttributeError, KeyError):
            pass  # a malformed message from one box must not stop the view

    def fold(self, topic: str, ev: dict[str, Any]) -> None:
        parts = topic.split("/")
        if len(parts) < 4:
            return
        box, channel = f"{parts[-3]}/{parts[-2]}", parts[-1]
        data = ev.get("data", {})
        with self.lock:
            row = self.rows.setdefault(box, BoxRow(box))
            row.last_seen = time.time()
            if channel == "status":
                row.state = data.get("state", "unknown")
                row.since = data.get("since", "")
                row.agent_version = data.get("agent_version", "")
                row.models = [f"{m.get('name')}@{m.get('version')}" for m in data.get("models", [])]
            elif channel == "telemetry":
                sysd, pipe, sec = data.get("system", {}), data.get("pipeline", {}), data.get("security", {})
                row.cpu = sysd.get("cpu_percent")
                row.mem = sysd.get("memory_percent")
                row.disk_free_pct = sysd.get("disk_free_percent")
                row.backlog = pipe.get("outbox_depth")
                days = [d for d in sec.get("cert_days_left", {}).values() if d is not None]
                row.cert_days = min(days) if days else None
                row.alerts = int(sec.get("egress_blocked", 0)) + int(sec.get("broker_refusals", 0))
                if data.get("models"):
                    row.models = [f"{m.get('name')}@{m.get('version')}" for m in data["models"]]
            elif channel == "results":
                row.results += 1
                row.last_result = {"id": ev.get("id"), "status": data.get("status"),
                                   "study": data.get("study", {}).get("ref"),
                                   "findings": [m.get("finding") for m in data.get("models", [])]}

    def start(self) -> None:
        self.client.connect(self.s.host, self.s.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.as_json() for r in sorted(self.rows.values(), key=lambda r: r.box)]

    def table(self) -> str:
        head = f"{'BOX':28} {'STATE':8} {'SINCE':22} {'SEEN':>6} {'CPU%':>5} {'MEM%':>5} " \
               f"{'DISK%':>6} {'BACKLOG':>7} {'CERT_D':>7} {'ALERTS':>6} {'RESULTS':>7} MODELS"
        lines = [head]
        now = time.time()
        for r in self.snapshot():
            seen = f"{now - r['last_seen']:.0f}s" if r["last_seen"] else "-"
            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)
            lines.append(
                f"{r['box']:28} {r['state']:8} {r['since'][:22]:22} {seen:>6} {f(r['cpu']):>5} "
                f"{f(r['mem']):>5} {f(r['disk_free_pct']):>6} {f(r['backlog']):>7} "
                f"{f(r['cert_days']):>7} {r['alerts']:>6} {r['results']:>7} {','.join(r['models'])}")
        return "\n".join(lines)
