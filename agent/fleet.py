"""Central ops: a live view of every box under the topic prefix.

Subscribes with the ops certificate to ``{prefix}/+/+/#`` and folds status,
telemetry and results into one row per box.  With a share group, several ops
consumers split telemetry and results (MQTT 5 ``$share/...``); status stays a
plain subscription on every consumer because a broker never delivers retained
messages to a shared subscription, and presence is exactly the retained part.

A box is *stale* when it claims to be online but nothing arrived for more than
``STALE_INTERVALS`` telemetry intervals: the broker has not yet noticed the
dead TCP connection (keepalive), or the box's pipeline hangs while its MQTT
thread lives.  "200 OK while offline" is what users of other agents complain
about; stale is how we avoid it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import ConfigError

STALE_INTERVALS = 3
DEFAULT_INTERVAL_S = 60.0
CERT_WARN_DAYS = 30.0
CERT_CRIT_DAYS = 7.0


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
        raise ConfigError([f"[mqtt] needs host, port, ca, cert, key ({exc})"],
                          path=str(path)) from None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(s: Any) -> float | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass
class BoxRow:
    box: str
    state: str = "unknown"  # online | offline | stale | unknown (no status seen)
    reported_state: str = "unknown"  # what the retained status says
    since: float | None = None  # of the current online/offline state
    last_seen: float = 0.0
    interval_s: float = DEFAULT_INTERVAL_S
    agent_version: str = ""
    models: list[str] = field(default_factory=list)
    cpu: float | None = None
    mem: float | None = None
    disk_free_pct: float | None = None
    backlog: int | None = None
    backlog_oldest_s: float | None = None
    cert_days: float | None = None
    certs_expiring: list[str] = field(default_factory=list)
    egress_blocked: int = 0
    broker_refusals: int = 0
    tls_failures: int = 0
    rejected_associations: int = 0
    drift_alerts: int = 0
    results: int = 0
    last_result: dict[str, Any] | None = None
    health: str = "unknown"  # ok | warn | critical | unknown
    alerts: list[str] = field(default_factory=list)

    def evaluate(self, now: float, watching_since: float = 0.0) -> None:
        """Derive state, health and alerts from what was folded in.

        Silence is judged from when we started watching at the earliest: a
        retained "online" says nothing about the last few minutes.
        """
        alerts: list[str] = []
        state = self.reported_state
        quiet = now - max(self.last_seen, watching_since)
        if state == "online" and quiet > STALE_INTERVALS * self.interval_s:
            state = "stale"
            alerts.append(f"stale: nothing for {quiet:.0f}s "
                          f"(> {STALE_INTERVALS} x {self.interval_s:.0f}s)")
        if state == "offline":
            alerts.append("offline" + (f" since {_iso(self.since)}" if self.since else ""))
        crit = warn = False
        if self.egress_blocked:
            crit = True
            alerts.append(f"egress guard blocked {self.egress_blocked} message(s)")
        if self.broker_refusals:
            crit = True
            alerts.append(f"broker refused {self.broker_refusals} publish(es)")
        if self.cert_days is not None and self.cert_days <= CERT_WARN_DAYS:
            if self.cert_days <= CERT_CRIT_DAYS:
                crit = True
            else:
                warn = True
            alerts.append(f"certificate expires in {self.cert_days:.0f} d"
                          + (f" ({', '.join(self.certs_expiring)})" if self.certs_expiring else ""))
        if self.disk_free_pct is not None and self.disk_free_pct < 15:
            crit = crit or self.disk_free_pct < 5
            warn = True
            alerts.append(f"disk {self.disk_free_pct:.0f}% free")
        for name, v in (("cpu", self.cpu), ("memory", self.mem)):
            if v is not None and v >= 90:
                warn = True
                alerts.append(f"{name} {v:.0f}%")
        if self.backlog_oldest_s is not None and self.backlog_oldest_s > 10 * self.interval_s:
            warn = True
            alerts.append(f"backlog {self.backlog} (oldest {self.backlog_oldest_s:.0f}s)")
        if self.drift_alerts:
            warn = True
            alerts.append(f"model drift on {self.drift_alerts} model(s)")
        if self.tls_failures or self.rejected_associations:
            warn = True
        self.state = state
        self.alerts = alerts
        if state in ("unknown", "stale"):
            self.health = "unknown"
        else:
            self.health = "critical" if crit else "warn" if warn else "ok"

    def as_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["since"] = _iso(self.since) if self.since else None
        d["last_seen"] = _iso(self.last_seen) if self.last_seen else None
        return d


class FleetView:
    def __init__(self, s: OpsSettings) -> None:
        self.s = s
        self.rows: dict[str, BoxRow] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.error: str | None = None
        self.messages = 0
        self.malformed = 0
        self.watching_since = time.time()
        cid = f"fleet-watch-{int(time.time() * 1000) % 10**9}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(s.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.cert), str(s.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def topics(self) -> list[str]:
        p = self.s.topic_prefix
        if not self.s.share_group:
            return [f"{p}/+/+/#"]
        g = self.s.share_group
        return [f"{p}/+/+/status"] + [f"$share/{g}/{p}/+/+/{ch}"
                                      for ch in ("telemetry", "results", "audit")]

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self.error = f"broker refused: {rc}"
            return
        c.subscribe([(t, 1) for t in self.topics()])
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self.connected.clear()
        if getattr(rc, "value", 0):
            self.error = f"disconnected: {rc}"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.messages += 1
            if not msg.payload:  # a cleared retained status: the box was decommissioned
                self.forget(msg.topic)
                return
            ev = json.loads(msg.payload)
            if not isinstance(ev, dict):
                raise ValueError("not an object")
            self.fold(msg.topic, ev, retained=bool(msg.retain))
        except (ValueError, TypeError, AttributeError, KeyError):
            self.malformed += 1  # a malformed message from one box must not stop the view

    @staticmethod
    def _box(topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        if len(parts) < 4:
            return None
        return f"{parts[-3]}/{parts[-2]}", parts[-1]

    def forget(self, topic: str) -> None:
        key = self._box(topic)
        if key is not None and key[1] == "status":
            with self.lock:
                self.rows.pop(key[0], None)

    def fold(self, topic: str, ev: dict[str, Any], now: float | None = None, *,
             retained: bool = False) -> None:
        key = self._box(topic)
        if key is None:
            return
        box, channel = key
        now = time.time() if now is None else now
        data = ev.get("data") or {}
        with self.lock:
            row = self.rows.setdefault(box, BoxRow(box))
            if channel == "status":
                self._fold_status(row, data, now, retained)
                return
            row.last_seen = max(row.last_seen, now)
            if channel == "telemetry":
                self._fold_telemetry(row, data)
            elif channel == "results":
                row.results += 1
                study = data.get("study") or {}
                row.last_result = {"id": ev.get("id"), "status": data.get("status"),
                                   "study": study.get("ref"),
                                   "findings": [m.get("finding") for m in data.get("models", [])]}

    @staticmethod
    def _fold_status(row: BoxRow, data: dict[str, Any], now: float, retained: bool) -> None:
        state = str(data.get("state", "unknown"))
        since = _parse_iso(data.get("since"))
        if row.since is not None and since is not None and since < row.since:
            return  # an older status delivered late (retained after a live one)
        row.reported_state = state
        row.since = since or now
        if state == "online":
            if not retained:  # a retained status is history, not a sign of life
                row.last_seen = max(row.last_seen, now)
            row.agent_version = str(data.get("agent_version", ""))
            models = data.get("models") or []
            row.models = [f"{m.get('name')}@{m.get('version')}" for m in models]

    @staticmethod
    def _fold_telemetry(row: BoxRow, data: dict[str, Any]) -> None:
        sysd = data.get("system") or {}
        pipe = data.get("pipeline") or {}
        sec = data.get("security") or {}
        interval = _f(data.get("interval_s"))
        if interval and interval > 0:
            row.interval_s = interval
        if row.reported_state == "unknown":
            row.reported_state = "online"  # telemetry before we saw the retained status
        row.cpu = _f(sysd.get("cpu_percent"))
        row.mem = _f(sysd.get("memory_percent"))
        row.disk_free_pct = _f(sysd.get("disk_free_percent"))
        backlog = pipe.get("outbox_depth")
        row.backlog = int(backlog) if isinstance(backlog, int) else None
        row.backlog_oldest_s = _f(pipe.get("outbox_oldest_age_s"))
        days = [float(d) for d in (sec.get("cert_days_left") or {}).values()
                if isinstance(d, int | float)]
        row.cert_days = min(days) if days else None
        row.certs_expiring = [str(c) for c in sec.get("certs_expiring") or []]
        row.egress_blocked = int(sec.get("egress_blocked", 0) or 0)
        row.broker_refusals = int(sec.get("broker_refusals", 0) or 0)
        row.tls_failures = int(sec.get("mqtt_tls_failures", 0) or 0)
        row.rejected_associations = int(sec.get("rejected_associations", 0) or 0)
        drift = data.get("drift") or {}
        if isinstance(drift, dict):
            row.drift_alerts = sum(1 for v in drift.values()
                                   if isinstance(v, dict) and v.get("alert"))
        if data.get("models"):
            row.models = [f"{m.get('name')}@{m.get('version')}" for m in data["models"]]

    def start(self) -> None:
        self.client.connect(self.s.host, self.s.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        with self.lock:
            rows = sorted(self.rows.values(), key=lambda r: r.box)
            for r in rows:
                r.evaluate(now, self.watching_since)
            return [r.as_json() for r in rows]

    def summary(self, snap: list[dict[str, Any]]) -> str:
        by: dict[str, int] = {}
        for r in snap:
            by[r["state"]] = by.get(r["state"], 0) + 1
        crit = sum(1 for r in snap if r["health"] == "critical")
        states = " ".join(f"{k}={v}" for k, v in sorted(by.items()))
        return f"{len(snap)} boxes: {states}; critical={crit}"

    def table(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        snap = self.snapshot(now)
        head = (f"{'BOX':28} {'STATE':7} {'FOR':>7} {'SEEN':>6} {'HEALTH':8} {'CPU%':>5} "
                f"{'MEM%':>5} {'DISK%':>6} {'BACKLOG':>7} {'CERT_D':>6} {'RESULTS':>7} "
                "MODELS / ALERTS")
        lines = [self.summary(snap), head]

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)

        def ago(ts: str | None) -> str:
            t = _parse_iso(ts)
            if t is None:
                return "-"
            s = max(0.0, now - t)
            return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"

        for r in snap:
            tail = ",".join(r["models"]) or "-"
            if r["alerts"]:
                tail += "  ! " + "; ".join(r["alerts"])
            lines.append(
                f"{r['box'][:28]:28} {r['state']:7} {ago(r['since']):>7} {ago(r['last_seen']):>6} "
                f"{r['health']:8} {f(r['cpu']):>5} {f(r['mem']):>5} {f(r['disk_free_pct']):>6} "
                f"{f(r['backlog']):>7} {f(r['cert_days']):>6} {r['results']:>7} {tail}")
        return "\n".join(lines)
