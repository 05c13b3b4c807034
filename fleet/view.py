"""Central ops: a live view of every box under the topic prefix.

Subscribes with the ops certificate to ``{prefix}/+/+/#`` and folds status,
telemetry, results and audit into one row per box (``edge-agent fleet watch``;
the Prometheus exporter in fleet/exporter.py is this view plus what it serves).  With a share group, several ops
consumers split telemetry and results (MQTT 5 ``$share/...``); status stays a
plain subscription on every consumer because a broker never delivers retained
messages to a shared subscription, and presence is exactly the retained part.

Every message must name its box exactly: the topic is
``{prefix}/{site}/{device}/{channel}`` and nothing more, and the CloudEvents
``source`` (and ``type``) must agree with it. The broker's ACL lets a box write
anything *under* its own prefix, so ``edge/st-a/box-b/st-a/ct-1/status`` comes
from box-b however it ends: anything else is rejected, counted and reported
with its topic, never folded into a row.

A box is *stale* when it claims to be online but nothing arrived for more than
``STALE_INTERVALS`` telemetry intervals: the broker has not yet noticed the
dead TCP connection (keepalive), or the box's pipeline hangs while its MQTT
thread lives.  "200 OK while offline" is what users of other agents complain
about; stale is how we avoid it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import BOX_NAME
from agent.uplink.cloudevents import TYPE_PREFIX
from agent.uplink.mqtt_tls import tls_context
from fleet.settings import OpsSettings

STALE_INTERVALS = 3
DEFAULT_INTERVAL_S = 60.0
CERT_WARN_DAYS = 30.0
CERT_CRIT_DAYS = 7.0
# What a box publishes: channel -> the CloudEvents kinds its ``type`` may name. The
# audit topic carries signed checkpoints and the pseudonymised events they cover.
BOX_CHANNELS: dict[str, tuple[str, ...]] = {
    "status": ("status",), "telemetry": ("telemetry",), "results": ("result", "result.delivery"),
    "audit": ("audit", "audit.events"), "jobs": ("job",)}
MAX_REJECTED_TOPICS = 100  # distinct topics remembered for the report; the count is exact


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_iso(s: Any) -> float | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _perf_alert(a: dict[str, Any]) -> str:
    """One line per performance alert: model, version, subgroup, metric and why."""
    raw = a.get("ci95")
    ci: list[Any] = raw if isinstance(raw, list) else []
    span = (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 and all(isinstance(x, int | float)
                                                                 for x in ci) else "?")
    why = (f"below {a.get('threshold')}" if a.get("kind") == "below-threshold"
           else f"below the rest ({a.get('rest')})")
    return (f"{a.get('model')} {a.get('version')} {a.get('subgroup')} {a.get('metric')} "
            f"95% CI {span} {why} ({a.get('window_days')} d)")


def _fold_models(row: BoxRow, models: Any) -> None:
    items = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    row.models = [f"{m.get('name')}@{m.get('version')}" for m in items]
    row.model_detail = [(str(m.get("name", "")), str(m.get("version", "")),
                         str(m.get("sha256", ""))) for m in items]


def _fold_deployment(row: BoxRow, d: Any) -> None:
    """A job event's data or the status' ``deployment``: id, revision, state."""
    if isinstance(d, dict) and d.get("deployment", d.get("id")) and d.get("state"):
        row.deployment = (f"{d.get('deployment', d.get('id'))}@{d.get('revision')} "
                          f"{d.get('state')}")[:48]


@dataclass(frozen=True)
class BoxTopic:
    """Where a message comes from, as its topic says: exactly one box and channel."""

    site: str
    device: str
    channel: str

    @property
    def box(self) -> str:
        return f"{self.site}/{self.device}"

    @property
    def source(self) -> str:
        return f"edge-agent/{self.site}/{self.device}"


def parse_topic(prefix: str, topic: str) -> BoxTopic | str:
    """``{prefix}/{site}/{device}/{channel}`` and nothing more, or why not."""
    head = prefix + "/"
    if not topic.startswith(head):
        return f"not under the prefix {head!r}"
    parts = topic[len(head):].split("/")
    if len(parts) != 3:
        return (f"{len(parts)} segment(s) after the prefix; a box publishes on exactly "
                "<site>/<device>/<channel>")
    site, device, channel = parts
    for what, name in (("site", site), ("device", device)):
        if not BOX_NAME.match(name):
            return f"{what} {name!r} is not a valid box name"
    if channel not in BOX_CHANNELS:
        return f"unknown channel {channel!r} (a box publishes {', '.join(BOX_CHANNELS)})"
    return BoxTopic(site, device, channel)


def check_event(t: BoxTopic, ev: dict[str, Any]) -> str | None:
    """Why the envelope does not belong on its topic, or None when it does."""
    source = ev.get("source")
    if source != t.source:
        return f"source {source!r} does not match the topic (expected {t.source!r})"
    want = [f"{TYPE_PREFIX}.{kind}.v1" for kind in BOX_CHANNELS[t.channel]]
    if ev.get("type") not in want:
        return (f"type {ev.get('type')!r} does not belong on {t.channel} "
                f"(expected {' or '.join(map(repr, want))})")
    data = ev.get("data")
    if not isinstance(data, dict):
        return "data is not an object"
    for key, value in (("site", t.site), ("device", t.device)):
        if key in data and data[key] != value:
            return f"data.{key} {data[key]!r} does not match the topic ({value!r})"
    return None


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
    # (name, version, sha256) of the active models, as the status or telemetry says
    model_detail: list[tuple[str, str, str]] = field(default_factory=list)
    telemetry_time: float | None = None  # when the box took its newest sample (its clock)
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
    # Flagged results waiting for a verdict; overdue: past the box's escalate_after.
    review_waiting: int | None = None
    review_oldest_s: float | None = None
    review_overdue: int = 0
    # The box's performance alerts (aggregates; subgroups of at least k verdicts only).
    performance_alerts: list[str] = field(default_factory=list)
    results: int = 0
    last_result: dict[str, Any] | None = None
    # The box's external audit anchor: its newest signed checkpoint that reached us.
    audit_checkpoint: int | None = None
    audit_checkpoint_seq: int | None = None
    audit_checkpoint_time: float | None = None  # when the box signed it (its clock)
    audit_events_messages: int = 0
    received: dict[str, int] = field(default_factory=dict)  # messages folded, per channel
    # The deployment the box runs or is working on: "id@revision state" (status, jobs).
    deployment: str = ""
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
        if self.review_overdue:
            warn = True
            alerts.append(f"review: {self.review_overdue} flagged result(s) overdue "
                          f"(oldest {(self.review_oldest_s or 0) / 3600:.1f} h)")
        if self.performance_alerts:
            warn = True
            alerts.extend(f"performance: {a}" for a in self.performance_alerts[:3])
            if len(self.performance_alerts) > 3:
                alerts.append(f"performance: {len(self.performance_alerts) - 3} more alert(s)")
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
        d["received"] = dict(self.received)
        for key in ("telemetry_time", "audit_checkpoint_time"):
            d[key] = _iso(d[key]) if d[key] else None
        return d


class FleetView:
    # Client id prefix; a broker that binds ids to certificates replaces it.
    CLIENT_ID = "fleet-watch"

    def __init__(self, s: OpsSettings) -> None:
        self.s = s
        self.rows: dict[str, BoxRow] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.error: str | None = None
        self.messages = 0
        self.malformed = 0
        self.rejected = 0  # every message not folded because it did not name its box exactly
        self._rejections: dict[str, tuple[str, int]] = {}  # topic -> (reason, count)
        self.watching_since = time.time()
        # A broker that binds client ids to certificates (docs/fleet.md) replaces this with
        # the ops certificate's CN: one watch per ops certificate at a time.
        cid = f"{self.CLIENT_ID}-{int(time.time() * 1000) % 10**9}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        # The box's own TLS rules: TLS 1.2+, the fleet CA pinned, hostname verified.
        self.client.tls_set_context(tls_context(s.mqtt))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # The channels besides status; a share group splits these among its consumers.
    SHARED_CHANNELS: tuple[str, ...] = ("telemetry", "results", "audit", "jobs")

    def topics(self) -> list[str]:
        p = self.s.topic_prefix
        every = set(self.SHARED_CHANNELS) == set(BOX_CHANNELS) - {"status"}
        if not self.s.share_group:
            # Everything, so that nested topics show up (and are rejected, and reported).
            return [f"{p}/+/+/#"] if every else [f"{p}/+/+/{ch}" for ch in
                                                 ("status", *self.SHARED_CHANNELS)]
        g = self.s.share_group
        return [f"{p}/+/+/status"] + [f"$share/{g}/{p}/+/+/{ch}" for ch in self.SHARED_CHANNELS]

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self.error = f"broker refused: {rc}"
            return
        self.error = None
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
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            self.malformed += 1  # a malformed message from one box must not stop the view
            self.reject(msg.topic, f"malformed payload ({type(exc).__name__})")

    def reject(self, topic: str, reason: str) -> None:
        with self.lock:
            self.rejected += 1
            _earlier, n = self._rejections.pop(topic, (reason, 0))
            self._rejections[topic] = (reason, n + 1)  # most recent last
            while len(self._rejections) > MAX_REJECTED_TOPICS:
                del self._rejections[next(iter(self._rejections))]

    def rejections(self) -> list[tuple[str, str, int]]:
        """(topic, reason, count) of the rejected topics, most recent last."""
        with self.lock:
            return [(t, r, n) for t, (r, n) in self._rejections.items()]

    def rejection_report(self, limit: int = 20) -> list[str]:
        """Lines for the operator; topics are shown escaped (they come from the network)."""
        if not self.rejected:
            return []
        items = self.rejections()
        lines = [f"rejected {self.rejected} message(s) that did not name their box exactly "
                 "(a box may write anything under its own prefix; these are not folded):"]
        lines += [f"  {t[:200]!r}: {r}" + (f" (x{n})" if n > 1 else "")
                  for t, r, n in items[-limit:]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more topic(s)")
        return lines

    def forget(self, topic: str) -> None:
        t = parse_topic(self.s.topic_prefix, topic)
        if isinstance(t, str) or t.channel != "status":
            self.reject(topic, "empty payload" + (f" ({t})" if isinstance(t, str) else
                                                   f" on {t.channel}"))
            return
        with self.lock:
            self.rows.pop(t.box, None)

    def fold(self, topic: str, ev: dict[str, Any], now: float | None = None, *,
             retained: bool = False) -> bool:
        """Fold one message into its box's row; False (and counted) when rejected."""
        t = parse_topic(self.s.topic_prefix, topic)
        problem = t if isinstance(t, str) else check_event(t, ev)
        if isinstance(t, str) or problem is not None:
            self.reject(topic, str(problem))
            return False
        now = time.time() if now is None else now
        data: dict[str, Any] = ev["data"]
        with self.lock:
            row = self.rows.setdefault(t.box, BoxRow(t.box))
            row.received[t.channel] = row.received.get(t.channel, 0) + 1
            if t.channel == "status":
                self._fold_status(row, data, now, retained)
                return True
            row.last_seen = max(row.last_seen, now)
            if t.channel == "telemetry":
                self._fold_telemetry(row, data)
                row.telemetry_time = parse_iso(ev.get("time"))
            elif t.channel == "audit":
                self._fold_audit(row, data)
            elif t.channel == "results" and str(ev.get("type", "")).startswith(
                    "org.edge-agent.result.delivery."):
                # Where the objects of an earlier result went (no new result).
                if row.last_result and row.last_result.get("study") == \
                        (data.get("study") or {}).get("ref"):
                    row.last_result["delivered_to"] = data.get("delivered_to")
            elif t.channel == "jobs" and data.get("state") != "refused":
                # A refused document changed nothing: the column keeps what runs.
                _fold_deployment(row, data)
            elif t.channel == "results":
                row.results += 1
                study = data.get("study") or {}
                row.last_result = {"id": ev.get("id"), "status": data.get("status"),
                                   "study": study.get("ref"),
                                   "findings": [m.get("finding") for m in data.get("models", [])]}
        return True

    def _fold_status(self, row: BoxRow, data: dict[str, Any], now: float, retained: bool) -> None:
        state = str(data.get("state", "unknown"))
        since = parse_iso(data.get("since"))
        if row.since is not None and since is not None and since < row.since:
            return  # an older status delivered late (retained after a live one)
        row.reported_state = state
        row.since = since or now
        if state == "online":
            if not retained:  # a retained status is history, not a sign of life
                row.last_seen = max(row.last_seen, now)
            row.agent_version = str(data.get("agent_version", ""))
            _fold_models(row, data.get("models"))
            _fold_deployment(row, data.get("deployment"))

    def _fold_telemetry(self, row: BoxRow, data: dict[str, Any]) -> None:
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
            _fold_models(row, data["models"])
        review = data.get("review")
        if isinstance(review, dict):
            w = review.get("waiting")
            row.review_waiting = w if isinstance(w, int) and not isinstance(w, bool) else None
            row.review_oldest_s = _f(review.get("oldest_age_s"))
            over = review.get("overdue")
            row.review_overdue = over if isinstance(over, int) and not isinstance(over, bool) else 0
        perf = data.get("performance")
        if isinstance(perf, dict) and isinstance(perf.get("alerts"), list):
            row.performance_alerts = [_perf_alert(a) for a in perf["alerts"]
                                      if isinstance(a, dict)]

    def _fold_audit(self, row: BoxRow, data: dict[str, Any]) -> None:
        cp = data.get("checkpoint")
        if not isinstance(cp, dict):
            row.audit_events_messages += 1
            return
        body = cp.get("body")
        if not isinstance(body, dict):
            return
        number, seq = body.get("checkpoint"), body.get("seq")
        signed = parse_iso(body.get("time"))
        if not isinstance(number, int) or isinstance(number, bool):
            return
        # At least once, in order per box, but a shared subscription may hand an older
        # checkpoint to this consumer after a newer one: keep the newest.
        if row.audit_checkpoint is None or number >= row.audit_checkpoint:
            row.audit_checkpoint = number
            row.audit_checkpoint_seq = seq if isinstance(seq, int) else None
            row.audit_checkpoint_time = signed

    def start(self, *, wait_for_broker: bool = False) -> None:
        """Connect and run the network loop in a thread. With ``wait_for_broker`` an
        unreachable broker is retried in the background (a service keeps trying and
        reports itself disconnected) instead of failing here."""
        m = self.s.mqtt
        if wait_for_broker:
            self.client.reconnect_delay_set(1, 30)  # back within 30 s of the broker
            self.client.connect_async(m.host, m.port, keepalive=m.keepalive)
        else:
            self.client.connect(m.host, m.port, keepalive=m.keepalive)
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
        tail = f"; rejected={self.rejected}" if self.rejected else ""
        return f"{len(snap)} boxes: {states}; critical={crit}{tail}"

    def table(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        snap = self.snapshot(now)
        head = (f"{'BOX':28} {'STATE':7} {'FOR':>7} {'SEEN':>6} {'HEALTH':8} {'CPU%':>5} "
                f"{'MEM%':>5} {'DISK%':>6} {'BACKLOG':>7} {'CERT_D':>6} {'RESULTS':>7} "
                f"{'DEPLOYMENT':30} MODELS / ALERTS")
        lines = [self.summary(snap), head]

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)

        def ago(ts: str | None) -> str:
            t = parse_iso(ts)
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
                f"{f(r['backlog']):>7} {f(r['cert_days']):>6} {r['results']:>7} "
                f"{(r['deployment'] or '-')[:30]:30} {tail}")
        report = self.rejection_report(limit=5)
        return "\n".join(lines + ([""] + report if report else []))
