"""``edge-agent fleet exporter``: the fleet view served as Prometheus metrics.

A central-side service (never on a box). It is a ``FleetView`` (same topic and
envelope checks, same rows) subscribed to status, telemetry and audit, that also
keeps, per box, the samples Prometheus needs, and answers ``GET /metrics``.

Several exporters can split a fleet with an MQTT 5 share group: each takes a share
of the telemetry and audit messages, while every one of them sees every box's
retained status (a broker never hands retained messages to a shared subscription).
So presence is the same on all of them and the other series of a box come from
whichever exporter last took one of its messages; the shipped rules and dashboard
aggregate ``by (site, device)`` across exporters (docs/fleet.md, "Prometheus").

Telemetry is rendered into exposition lines when it arrives (once per box per
interval) rather than at every scrape. What a box names (certificates, stages,
models, inbox states) becomes label values: bounded in number per box and cleaned
(fleet/metrics.py), so one compromised box cannot blow up the central Prometheus's
series count or inject series for another box.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from agent.audit.events import CATALOGUE
from agent.errors import ConfigError
from agent.uplink.mqtt_tls import diagnose, tls_context
from fleet import metrics
from fleet.metrics import Family
from fleet.settings import OpsSettings
from fleet.view import BoxRow, FleetView, parse_iso

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"
# At most this many entries of one map a box names (certificates, stages, models,
# drift, inbox states); more are dropped and counted.
MAX_KEYS = 32
DIAGNOSE_EVERY_S = 10.0  # while disconnected: one extra TLS connection to say why
SECURITY_ALERT = "110113"  # ATNA EventID of the events counted per name

G: Literal["gauge"] = "gauge"
C: Literal["counter"] = "counter"
# Telemetry keys read as plain numbers: (key, family, type, help); the system
# table also says what the value is divided by (percent -> ratio).
_SYSTEM: tuple[tuple[str, str, Literal["gauge", "counter"], str, float], ...] = (
    ("cpu_percent", "edge_agent_cpu_usage_ratio", G, "CPU busy, whole box (0-1)", 100.0),
    ("memory_percent", "edge_agent_memory_usage_ratio", G, "memory used, whole box (0-1)",
     100.0),
    ("disk_free_percent", "edge_agent_disk_free_ratio", G,
     "free space on the state directory's volume (0-1)", 100.0),
    ("disk_free_bytes", "edge_agent_disk_free_bytes", G,
     "free bytes on the state directory's volume", 1.0))
_Plain = tuple[tuple[str, str, Literal["gauge", "counter"], str], ...]
_PROCESS: _Plain = (
    ("rss_bytes", "edge_agent_process_resident_memory_bytes", G, "the daemon's resident memory"),
    ("uptime_s", "edge_agent_process_uptime_seconds", G, "seconds since the daemon started"))
_PIPELINE: _Plain = (
    ("associations_accepted", "edge_agent_associations_accepted_total", C,
     "DICOM associations accepted"),
    ("associations_rejected", "edge_agent_associations_rejected_total", C,
     "DICOM associations rejected"),
    ("associations_active", "edge_agent_associations_active", G, "DICOM associations open now"),
    ("instances_received", "edge_agent_instances_received_total", C,
     "instances stored in the inbox"),
    ("instances_failed", "edge_agent_instances_failed_total", C,
     "instances that could not be stored"),
    ("instances_quarantined", "edge_agent_instances_quarantined_total", C, "instances held back"),
    ("studies_processed", "edge_agent_studies_processed_total", C,
     "studies processed to a result"),
    ("studies_failed", "edge_agent_studies_failed_total", C, "studies that failed"))
_OUTBOX: _Plain = (  # the pipeline section too; listed after the inbox's families
    ("outbox_depth", "edge_agent_outbox_depth", G, "messages waiting for the broker"),
    ("outbox_oldest_age_s", "edge_agent_outbox_oldest_age_seconds", G,
     "age of the oldest waiting message"),
    ("outbox_blocked", "edge_agent_outbox_blocked", G,
     "messages set aside (egress guard or broker refusal), waiting for an operator"))
_SECURITY: _Plain = (
    ("egress_blocked", "edge_agent_egress_blocked_total", C,
     "messages the egress guard stopped since the daemon started"),
    ("broker_refusals", "edge_agent_broker_refusals_total", C,
     "publishes the broker refused (0x87)"),
    ("mqtt_tls_failures", "edge_agent_mqtt_tls_failures_total", C,
     "MQTT TLS handshakes that failed"),
    ("mqtt_connect_failures", "edge_agent_mqtt_connect_failures_total", C,
     "MQTT connects that failed"),
    ("dicom_connections_refused", "edge_agent_dicom_connections_refused_total", C,
     "TCP connections refused by the per-peer connection cap"),
    ("dicom_rate_limited", "edge_agent_dicom_rate_limited_total", C,
     "associations refused by the per-peer rate limit"),
    ("dicom_tls_failures", "edge_agent_dicom_tls_failures_total", C,
     "DICOM TLS handshakes that failed"),
    ("audit_errors", "edge_agent_audit_errors_total", C, "audit records that could not be written"),
    ("audit_lost", "edge_agent_audit_lost_total", C, "audit events that could not be kept"),
    ("audit_log_replaced", "edge_agent_audit_log_replaced_total", C,
     "audit logs found missing, replaced or rolled back"),
    ("audit_refusals_summarised", "edge_agent_audit_refusals_summarised_total", C,
     "repeated refusals counted into summary records"),
    ("audit_held", "edge_agent_audit_held", G, "1 while the audit store cannot write"),
    ("audit_over_budget", "edge_agent_audit_over_budget", G,
     "1 while the audit store is over its byte budget"),
    ("audit_unsigned", "edge_agent_audit_unsigned_records", G,
     "audit records written since the box's last signed checkpoint"))
_FAMILIES = [
    # presence and identity (from the retained status; the same on every exporter)
    Family("edge_agent_up", G, "1 while the box's status says online, 0 once it says offline "
           "(its last will or a graceful stop); absent before any status"),
    Family("edge_agent_status_since_timestamp_seconds", G, "when the box entered that state"),
    Family("edge_agent_last_seen_timestamp_seconds", G,
           "newest live message from the box taken by this exporter, or when this exporter "
           "started watching if none since (silence counts from then)"),
    Family("edge_agent_info", G, "the box's agent version", ("agent_version",)),
    Family("edge_agent_model_info", G, "an active model version on the box",
           ("model", "version", "sha256")),
    Family("edge_agent_messages_received_total", C,
           "messages of the box this exporter took, by channel (sum over a share group)",
           ("channel",)),
    # telemetry
    Family("edge_agent_telemetry_timestamp_seconds", G,
           "when the box took its newest telemetry sample this exporter has (box clock)"),
    Family("edge_agent_telemetry_interval_seconds", G, "the box's telemetry interval"),
    *(Family(name, kind, text) for _key, name, kind, text, _per in _SYSTEM),
    *(Family(name, kind, text) for _key, name, kind, text in (*_PROCESS, *_PIPELINE)),
    Family("edge_agent_study_latency_seconds", "summary",
           "last instance received -> result enqueued, over the box's recent studies",
           ("quantile",)),
    Family("edge_agent_inbox_studies", G, "studies in the box's inbox by state", ("state",)),
    Family("edge_agent_inbox_pending_bytes", G, "bytes received and not yet processed"),
    *(Family(name, kind, text) for _key, name, kind, text in _OUTBOX),
    Family("edge_agent_certificate_expiry_timestamp_seconds", G,
           "when the certificate expires (absent when unreadable: see the warning)",
           ("cert",)),
    Family("edge_agent_certificate_expiry_warning", G,
           "1 when the certificate expires within 30 days or is unreadable", ("cert",)),
    *(Family(name, kind, text) for _key, name, kind, text in _SECURITY),
    Family("edge_agent_model_drift_psi", G,
           "population stability index of the model's input or output against its reference",
           ("model", "version", "distribution")),
    Family("edge_agent_model_drift_studies", G, "studies behind the model's drift figures",
           ("model",)),
    Family("edge_agent_stage_stuck", G, "1 while the stage is stuck (systemd restarts the box)",
           ("stage",)),
    Family("edge_agent_stage_heartbeat_age_seconds", G, "seconds since the stage's last beat",
           ("stage",)),
    Family("edge_agent_review_waiting", G, "flagged results waiting for a reviewer's verdict"),
    Family("edge_agent_review_oldest_age_seconds", G,
           "age of the oldest flagged result without a verdict (0 when none)"),
    Family("edge_agent_review_overdue", G,
           "flagged results waiting longer than the box's [review] escalate_after"),
    Family("edge_agent_results_queue_depth", G,
           "result objects waiting for a PACS destination (pending + awaiting commitment)",
           ("destination",)),
    Family("edge_agent_results_oldest_age_seconds", G,
           "age of the oldest result object waiting for the destination", ("destination",)),
    Family("edge_agent_results_dead_letter", G,
           "result objects the box gave up on for the destination (refused or too old)",
           ("destination",)),
    Family("edge_agent_results_last_error_status", G,
           "DIMSE status of the destination's last answer that was not Success (0: none)",
           ("destination",)),
    Family("edge_agent_results_confirmed", G,
           "result objects the destination confirmed (in the box's queue)", ("destination",)),
    # audit (the external anchor, and security alerts by name)
    Family("edge_agent_audit_checkpoint_timestamp_seconds", G,
           "when the box signed its newest checkpoint this exporter has (box clock)"),
    Family("edge_agent_audit_checkpoint_number", G, "number of that checkpoint"),
    Family("edge_agent_audit_security_events_total", C,
           "Security Alert audit events (ATNA 110113) this exporter took, by event name",
           ("event",)),
    # the exporter itself
    Family("edge_agent_fleet_broker_connected", G, "1 while this exporter is connected"),
    Family("edge_agent_fleet_boxes", G, "boxes this exporter has a row for"),
    Family("edge_agent_fleet_messages_total", C, "messages this exporter received"),
    Family("edge_agent_fleet_messages_rejected_total", C,
           "messages not folded: not exactly a box's topic, or an envelope that does not "
           "match it, or malformed (the prefix names the box that wrote it)"),
    Family("edge_agent_fleet_samples_dropped_total", C,
           f"entries dropped because a box named more than {MAX_KEYS} of one kind"),
]
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}

Lines = dict[str, list[str]]  # family name -> rendered sample lines of one box


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    return float(v) if isinstance(v, int | float) else None


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


class _Box:
    """Renders the samples of one box: ``site`` and ``device`` first on every line."""

    def __init__(self, row: BoxRow) -> None:
        site, _, device = row.box.partition("/")
        self.prefix = metrics.labels((("site", site), ("device", device)))
        self.lines: Lines = {}
        self.dropped = 0

    def add(self, family: str, value: Any, **extra: object) -> None:
        v = _num(value)
        if v is None:
            return
        assert tuple(extra) == FAMILIES[family].labels, (family, extra)
        text = self.prefix + ("," + metrics.labels(extra.items()) if extra else "")
        self.lines.setdefault(family, []).append(metrics.line(family, text, v))

    def items(self, v: Any) -> list[tuple[str, Any]]:
        """A map's entries, at most MAX_KEYS of them (the rest counted as dropped)."""
        entries = list(_obj(v).items())
        self.dropped += max(0, len(entries) - MAX_KEYS)
        return [(str(k), x) for k, x in entries[:MAX_KEYS]]


def telemetry_lines(row: BoxRow, data: dict[str, Any]) -> tuple[Lines, int]:
    """The exposition lines of one telemetry sample, and how many entries were dropped."""
    b = _Box(row)
    b.add("edge_agent_telemetry_interval_seconds", data.get("interval_s"))
    system, pipe, sec = _obj(data.get("system")), _obj(data.get("pipeline")), \
        _obj(data.get("security"))
    for key, fam, _kind, _text, per in _SYSTEM:
        v = _num(system.get(key))
        b.add(fam, None if v is None else v / per)
    for key, fam, _kind, _text in _PROCESS:
        b.add(fam, _obj(system.get("process")).get(key))
    for key, fam, _kind, _text in (*_PIPELINE, *_OUTBOX):
        b.add(fam, pipe.get(key))
    for q, key in (("0.5", "latency_ms_p50"), ("0.95", "latency_ms_p95")):
        ms = _num(pipe.get(key))
        b.add("edge_agent_study_latency_seconds", None if ms is None else ms / 1000, quantile=q)
    for state, n in b.items(pipe.get("inbox")):
        if state == "pending_bytes":
            b.add("edge_agent_inbox_pending_bytes", n)
        elif state != "done":  # processed studies are not backlog
            b.add("edge_agent_inbox_studies", n, state=state)
    for key, fam, _kind, _text in _SECURITY:
        b.add(fam, sec.get(key))
    for cert, c in b.items(sec.get("certificates")):
        b.add("edge_agent_certificate_expiry_timestamp_seconds",
              parse_iso(_obj(c).get("not_after")), cert=cert)
        b.add("edge_agent_certificate_expiry_warning", _obj(c).get("warn"), cert=cert)
    for model, d in b.items(data.get("drift")):
        d = _obj(d)
        b.add("edge_agent_model_drift_studies", d.get("studies"), model=model)
        for dist in ("input", "output"):
            b.add("edge_agent_model_drift_psi", d.get(f"psi_{dist}"), model=model,
                  version=d.get("version", ""), distribution=dist)
    for dest, r in b.items(data.get("results_delivery")):
        r = _obj(r)
        b.add("edge_agent_results_queue_depth", r.get("depth"), destination=dest)
        b.add("edge_agent_results_oldest_age_seconds", r.get("oldest_age_s"), destination=dest)
        b.add("edge_agent_results_dead_letter", r.get("dead_letter"), destination=dest)
        b.add("edge_agent_results_confirmed", r.get("confirmed"), destination=dest)
        code = r.get("last_error_code")
        try:
            status = int(str(code), 16) if code else 0
        except ValueError:
            status = 0
        b.add("edge_agent_results_last_error_status", status, destination=dest)
    review = _obj(data.get("review"))
    b.add("edge_agent_review_waiting", review.get("waiting"))
    b.add("edge_agent_review_oldest_age_seconds", review.get("oldest_age_s"))
    b.add("edge_agent_review_overdue", review.get("overdue"))
    for stage, st in b.items(_obj(data.get("liveness")).get("stages")):
        st = _obj(st)
        b.add("edge_agent_stage_stuck", st.get("stuck"), stage=stage)
        b.add("edge_agent_stage_heartbeat_age_seconds", st.get("age_s"), stage=stage)
    return b.lines, b.dropped


class FleetExporter(FleetView):
    CLIENT_ID = "fleet-exporter"
    # Results are not needed for metrics (telemetry counts studies); they stay with
    # the consumers that store them.
    SHARED_CHANNELS = ("telemetry", "audit")

    def __init__(self, s: OpsSettings) -> None:
        super().__init__(s)
        self._telemetry: dict[str, Lines] = {}
        self._alerts: dict[str, dict[str, int]] = {}  # box -> security event name -> count
        self.dropped = 0

    # -- folding (under self.lock, called by FleetView.fold) --------------------------

    def _fold_telemetry(self, row: BoxRow, data: dict[str, Any]) -> None:
        super()._fold_telemetry(row, data)
        lines, dropped = telemetry_lines(row, data)
        self._telemetry[row.box] = lines
        self.dropped += dropped

    def _fold_audit(self, row: BoxRow, data: dict[str, Any]) -> None:
        super()._fold_audit(row, data)
        events = data.get("events")
        if not isinstance(events, list):
            return
        counts = self._alerts.setdefault(row.box, {})
        for e in events:
            if isinstance(e, dict) and e.get("event_id") == SECURITY_ALERT:
                name = str(e.get("event"))
                # Only the catalogue's names become labels: a box chooses this string.
                name = name if name in CATALOGUE else "other"
                counts[name] = counts.get(name, 0) + 1

    def forget(self, topic: str) -> None:
        super().forget(topic)
        with self.lock:
            for box in set(self._telemetry) - set(self.rows):
                del self._telemetry[box]
            for box in set(self._alerts) - set(self.rows):
                del self._alerts[box]

    # -- serving -------------------------------------------------------------------

    def _row_lines(self, row: BoxRow) -> Lines:
        b = _Box(row)
        if row.reported_state in ("online", "offline"):
            b.add("edge_agent_up", row.reported_state == "online")
        b.add("edge_agent_status_since_timestamp_seconds", row.since)
        b.add("edge_agent_last_seen_timestamp_seconds", max(row.last_seen, self.watching_since))
        if row.agent_version:
            b.add("edge_agent_info", 1, agent_version=row.agent_version)
        for name, version, sha in row.model_detail[:MAX_KEYS]:
            b.add("edge_agent_model_info", 1, model=name, version=version, sha256=sha)
        for channel, n in sorted(row.received.items()):
            b.add("edge_agent_messages_received_total", n, channel=channel)
        b.add("edge_agent_telemetry_timestamp_seconds", row.telemetry_time)
        b.add("edge_agent_audit_checkpoint_timestamp_seconds", row.audit_checkpoint_time)
        b.add("edge_agent_audit_checkpoint_number", row.audit_checkpoint)
        for name, n in sorted(self._alerts.get(row.box, {}).items()):
            b.add("edge_agent_audit_security_events_total", n, event=name)
        return b.lines

    def render(self) -> str:
        with self.lock:
            rows = sorted(self.rows.values(), key=lambda r: r.box)
            per_box = [(self._row_lines(r), self._telemetry.get(r.box, {})) for r in rows]
            own: dict[str, float] = {
                "edge_agent_fleet_broker_connected": float(self.connected.is_set()),
                "edge_agent_fleet_boxes": len(rows),
                "edge_agent_fleet_messages_total": self.messages,
                "edge_agent_fleet_messages_rejected_total": self.rejected,
                "edge_agent_fleet_samples_dropped_total": self.dropped,
            }

        def samples(name: str) -> Iterator[str]:
            if name in own:
                yield metrics.line(name, "", own[name])
                return
            for status_lines, tele_lines in per_box:
                yield from status_lines.get(name, ())
                yield from tele_lines.get(name, ())

        return metrics.render((fam, samples(fam.name)) for fam in _FAMILIES)


# -- the HTTP side ----------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; a clear error otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        if not sep or not host:
            raise ValueError
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError([f"--listen {listen!r} must be host:port, e.g. {DEFAULT_LISTEN} "
                           "or [::1]:9464"]) from None
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    """``GET /metrics`` (and ``/``) rendered by the exporter at each scrape."""

    def __init__(self, exporter: FleetExporter, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", metrics.CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a scrape every 15 s would flood the journal

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError([f"--listen {host}:{port}: cannot listen there ({exc.strerror}); "
                               "pick a free port or stop what holds it"]) from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def serve(s: OpsSettings, listen: str, stop: threading.Event) -> None:
    """Run until ``stop`` is set: the HTTP endpoint first (a port problem is reported
    before anything else), then the MQTT side, which keeps retrying an unreachable
    broker and reports it as ``edge_agent_fleet_broker_connected 0``."""
    host, port = parse_listen(listen)
    exporter = FleetExporter(s)
    server = MetricsServer(exporter, host, port)
    server.start()
    where = f"{host}:{server.port}" if ":" not in host else f"[{host}]:{server.port}"
    log.info("fleet exporter: metrics on http://%s/metrics; broker %s:%d, prefix %r%s",
             where, s.mqtt.host, s.mqtt.port, s.topic_prefix,
             f", share group {s.share_group!r}" if s.share_group else "")
    if not is_loopback(host):
        log.warning("metrics listen on %s, beyond this host: site and device names and "
                    "security counters are readable by whoever reaches it; put TLS and "
                    "authentication in front (docs/fleet.md)", host)
    exporter.start(wait_for_broker=True)
    said, asked = "", time.monotonic()  # first look after the first connect had its chance
    try:
        while not stop.wait(1.0):
            if exporter.connected.is_set():
                if said != "connected":
                    log.info("connected to the broker; subscribed to %s",
                             ", ".join(exporter.topics()))
                    said = "connected"
                continue
            if time.monotonic() - asked < DIAGNOSE_EVERY_S:
                continue
            asked = time.monotonic()
            # paho retries on its own; say why in the box's words, once per reason.
            why = diagnose(tls_context(s.mqtt), s.mqtt.host, s.mqtt.port) or exporter.error \
                or "no MQTT session (the broker accepts TLS; check its log and ACL)"
            if why != said:
                log.warning("not connected to the broker %s:%d: %s; retrying", s.mqtt.host,
                            s.mqtt.port, why)
                said = why
    finally:
        exporter.stop()
        server.stop()
