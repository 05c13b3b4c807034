"""The daemon: wires the stages together and owns their threads.

Threads: the DICOM node's (``dicom-accept`` and one per association, or the
receive workers' ``dicom-dispatch``; ``dicom-receipts``), ``assembler`` (closes quiet
studies and processes them one at a time), ``telemetry``, ``mqtt`` (publish),
``atna`` (the audit log to the hospital's audit repository, when configured),
``watchdog`` (feeds systemd only while every stage beats, see agent/ops/liveness.py).
SIGTERM/SIGINT stop intake first, let the current study finish, drain the
outbox for a bounded time, publish the offline status and exit 0.  Studies
still open stay open on disk and resume on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cryptography import x509

from agent import __version__
from agent.audit import AuditLog
from agent.audit.atna import AtnaSender
from agent.config import Config
from agent.crypto import KeyEncryptionKey, load_key_file
from agent.deid import Deidentifier, DeidSettings, PixelCleanRule
from agent.deid.pseudonym import Pseudonymizer
from agent.deid.vault import PseudonymVault, VaultPseudonymizer
from agent.deploy.runner import DeployStage, Hooks
from agent.dicom.commitment import ReportFn, ReportLaterFn
from agent.dicom.node import DicomNode, LocalNode
from agent.dicom.pool import ReceivePool, WorkerInit
from agent.errors import ConfigError, EdgeAgentError, OutOfResources
from agent.identity.keyrotate import hold_state_lock
from agent.infer import InferenceEngine, InferenceSettings
from agent.ops import control, faults, liveness, sdnotify
from agent.pipeline import Pipeline
from agent.results.link import LinkStore
from agent.review.service import ReviewService
from agent.store.inbox import Inbox
from agent.store.quarantine import Quarantine
from agent.uplink import cloudevents, metrics, telemetry
from agent.uplink.inbound import Inbound
from agent.uplink.outbox import Outbox
from agent.uplink.publish import Publisher

if TYPE_CHECKING:
    from agent.results.delivery import Delivery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    burst: bool = False  # run to empty: process everything, drain, exit (tests, batch)
    burst_timeout: float = 120.0


def load_recipients(paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    certs = []
    for p in paths:
        try:
            certs.append(x509.load_pem_x509_certificate(p.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"[deid.recipients] {p}: not a readable PEM certificate ({exc})"]) from None
    return tuple(certs)


def build_deidentifier(cfg: Config, pseudonym_key: bytes) -> Deidentifier:
    return Deidentifier(deid_settings(cfg), pseudonym_key)


def deid_settings(cfg: Config) -> DeidSettings:
    return DeidSettings(
        mode=cfg.deid.mode,
        options=cfg.deid.options,
        recipients=load_recipients(cfg.deid.recipients),
        pixel_clean=tuple(
            PixelCleanRule(r.manufacturer, r.model, r.rows, r.columns, r.rectangles)
            for r in cfg.deid.pixel_clean
        ),
    )


class Daemon:
    def __init__(self, cfg: Config, options: RunOptions = RunOptions()) -> None:
        self.cfg = cfg
        self.opts = options
        self.started_at = time.time()
        self._stop = threading.Event()
        self._intake = threading.Event()
        self._intake.set()
        self._work = threading.Event()
        self._last_retention = 0.0
        self._holding = False
        self._telemetry_now = threading.Event()
        faults.configure(cfg.environment)
        self.deadline = cfg.watchdog.stage_deadline_seconds
        self.liveness = liveness.Liveness()
        self.watchdog = liveness.Watchdog(
            self.liveness, enabled=sdnotify.watchdog_interval() is not None,
            notify=sdnotify.notify, healthy_status=self._listening,
            on_stuck=self._telemetry_now.set)  # ops learn of it before systemd restarts us
        self._assembler_stage: liveness.Stage | None = None
        self._atna_stage: liveness.Stage | None = None
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Shared while we run: 'keys rotate' needs it exclusively (we hold the KEK in memory).
        self._state_lock = hold_state_lock(state)
        self.kek = KeyEncryptionKey.from_file(cfg.keys.kek)
        self.pseudonym_key = load_key_file(cfg.keys.pseudonym, purpose="pseudonym")
        self.outbox = Outbox(state / "outbox" / "outbox.db", self.kek, cfg.outbox.max_bytes)
        # Peer strings (AE titles, addresses) are published as pseudonyms under this key.
        self.audit_log = AuditLog(
            state / "audit" / "audit.db", self.kek, cfg.keys.audit_signing, cfg.audit,
            box=f"{cfg.site}/{cfg.device}", publish=self._publish_audit,
            peer_key=self.pseudonym_key,
        )
        # The full records (PHI included) to the hospital's ATNA audit repository: the
        # audit log is its durable outbox (agent/audit/atna.py, agent/uplink/egresspolicy.py).
        self.atna: AtnaSender | None = None
        if cfg.atna.enabled:
            self.atna = AtnaSender(cfg, state / "audit" / "audit.db", self.kek,
                                   appended=self.audit_log.appended, audit=self.audit,
                                   beat=self._atna_beat)
        self.inbox = Inbox(state / "inbox", self.kek, self.pseudonym_key, cfg.inbox, cfg.study)
        self.quarantine = Quarantine(state / "quarantine", self.kek)
        # Kept for the privacy officer's release (agent/store/quarantine_review.py).
        self.deidentifier_settings = deid_settings(cfg)
        # [deid] pseudonyms = "vault": random codes kept in an encrypted local map.
        self.vault: PseudonymVault | None = None
        self.pseudonymizer: Pseudonymizer | None = None
        if cfg.deid.pseudonyms == "vault":
            self.vault = PseudonymVault(state / "deid" / "vault.db", self.kek)
            self.pseudonymizer = VaultPseudonymizer(self.pseudonym_key, self.vault)
        self.deidentifier = Deidentifier(self.deidentifier_settings, self.pseudonym_key,
                                         self.pseudonymizer)
        self.engine = InferenceEngine(
            InferenceSettings(
                models_dir=cfg.models.dir, state_dir=state / "models-state",
                environment=cfg.environment, publisher_keys=cfg.models.publisher_keys,
                threads=cfg.models.threads, timeout_seconds=cfg.models.timeout_seconds,
                drift_min_studies=cfg.models.drift_min_studies,
                providers=cfg.infer.providers,
            ),
            audit=lambda event, details: self.audit(event, details=details),
        )
        # [results] enabled: the encrypted links back into the original studies.
        self.links = (LinkStore(state / "results" / "links.db", self.kek,
                                retention_days=cfg.results.link_retention_days, audit=self.audit)
                      if cfg.results.enabled else None)
        if self.links is not None:
            self.links.expire()
        # [[results.destinations]]: the durable C-STORE queue into the PACS.
        self.delivery: Delivery | None = None
        # A PACS's Storage Commitment report arrives on its own association to the node.
        on_commitment: ReportFn | None = None
        on_commitment_later: ReportLaterFn | None = None
        if self.links is not None and cfg.results.destinations:
            # Imported only for a box that sends results: the object builders load
            # highdicom (and pydicom's SR concept tables), about 21 MiB of the daemon's
            # memory and a tenth of its start-up, which a box without destinations
            # never uses (issue 19 section 5, peak RSS; docs/benchmarks.md).
            from agent.results.common import Issuer
            from agent.results.delivery import Delivery, commitment_report, commitment_result
            from agent.results.queue import DeliveryQueue

            self.delivery = Delivery(
                cfg, self.links, DeliveryQueue(state / "results" / "delivery.db", self.kek),
                Issuer(cfg.site, cfg.device, self.pseudonym_key), self.outbox, self.audit)
            on_commitment, on_commitment_later = commitment_result, commitment_report
        self.expire_quarantine()
        # Flagged results wait here for reviewers' verdicts (agent/review/).
        self.review = ReviewService(cfg, self.kek, self.engine.manifest_of, self.audit,
                                    wake=self._telemetry_now.set)
        self.pipeline = Pipeline(cfg, self.inbox, self.deidentifier, self.engine, self.outbox,
                                 self.quarantine, self.audit, beat=self._assembler_beat,
                                 links=self.links)
        self.pipeline.on_result = self.review.record
        self.scp: DicomNode
        if cfg.dicom.workers > 1:
            self.scp = ReceivePool(cfg.dicom, self.inbox, self._worker_init, audit=self.audit,
                                   on_stored=lambda _r: self._work.set(),
                                   accepting=self._intake.is_set, receipts=self.audit_log,
                                   on_commitment=on_commitment_later)
        else:
            # Workers journal their audit records in the inbox (durable), so only the
            # in-process node feeds the audit queue and needs its hold.
            self.scp = LocalNode(cfg.dicom, self.inbox, audit=self.audit,
                                  on_stored=lambda _r: self._work.set(),
                                  accepting=self._intake.is_set, receipts=self.audit_log,
                                  hold=self.audit_log.intake_hold, on_commitment=on_commitment,
                                  wake=self._work.set)
        # Inbound topics (verdicts, deployments): their stages register handlers here.
        self.inbound = Inbound(cfg.topic_base)
        self.inbound.register("review", self.review.on_message,
                              dropped=self.review.refuse_unread)
        self.publisher = Publisher(cfg, self.outbox, birth=self._birth, offline=self._offline,
                                   inbound=self.inbound,
                                   on_alert=lambda e, d: self.audit(e, outcome="serious_failure",
                                                                    details=d),
                                   liveness=self.liveness)
        # Signed deployments from central ops (agent/deploy/): documents and chunks arrive
        # on {base}/deployments, job states leave on {base}/jobs.
        self.deploy = DeployStage(cfg, Hooks(
            emit=self._emit_job, audit=self.audit, registry=lambda: self.engine.registry,
            reload=self.engine.reload, status_changed=self._republish_status,
            latencies=lambda: list(self.pipeline.latencies_ms),
            drift=self.engine.drift_report))
        self.inbound.register("deployments", self.deploy.on_message,
                              dropped=self.deploy.refuse_unread)
        self.certs = telemetry.CertWatch.for_config(cfg)
        self.certs.check()  # an expiring certificate is logged at start, not after an interval
        port = cfg.telemetry.prometheus_port
        self.metrics = metrics.MetricsServer(port) if port else None
        self.control = control.ControlServer(cfg.control, control.daemon_commands(self),
                                             audit=self.audit, liveness=self.liveness,
                                             stage_deadline=self.deadline)
        self.audit("config.loaded", details={"environment": cfg.environment,
                                              "deid_mode": cfg.deid.mode})

    # -- helpers -----------------------------------------------------------------

    def audit(self, event: str, *, outcome: str = "success", user: str | None = None,
              source: str | None = None, details: Mapping[str, object] | None = None,
              phi: Mapping[str, str] | None = None) -> None:
        self.audit_log.record(event, outcome=outcome, user=user, source=source, details=details,
                              phi=phi)
        deploy = getattr(self, "deploy", None)  # health gates of a deployment's soak
        if deploy is not None and details is not None:
            deploy.observe(event, dict(details))

    def _worker_init(self, index: int) -> WorkerInit:
        cfg = self.cfg
        return WorkerInit(index=index, dicom=cfg.dicom, inbox_root=cfg.state_dir / "inbox",
                          inbox=cfg.inbox, study=cfg.study, kek=self.kek,
                          pseudonym_key=self.pseudonym_key, log_level=cfg.log_level,
                          commitment=self.delivery is not None)

    def _source(self) -> str:
        return f"edge-agent/{self.cfg.site}/{self.cfg.device}"

    def _publish_audit(self, data: dict[str, object]) -> None:
        # A stable id per checkpoint and per events part: one re-sent after a crash
        # dedupes.  OutOfResources propagates so the audit log keeps the checkpoint
        # unpublished and retries.
        cp = data.get("checkpoint")
        if isinstance(cp, dict):
            body = cp.get("body")
            number = body.get("checkpoint") if isinstance(body, dict) else None
            kind, eid = "audit", cloudevents.stable_id(self.cfg.site, self.cfg.device, "audit",
                                                       str(number))
        else:
            kind, eid = "audit.events", cloudevents.stable_id(
                self.cfg.site, self.cfg.device, "audit-events", str(data.get("covered_by")),
                str(data.get("part")))
        ev = cloudevents.envelope(kind=kind, source=self._source(), data=dict(data),
                                  event_id=eid)
        self.outbox.enqueue("audit", eid, cloudevents.encode(ev))

    def _status(self, online: bool) -> dict[str, Any]:
        return cloudevents.envelope(kind="status", source=self._source(), data={
            "state": "online" if online else "offline",
            "since": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "agent_version": __version__,
            "site": self.cfg.site, "device": self.cfg.device,
            "models": self.engine.active_models() if online else [],
            "deployment": self.deploy.status(),
            "labels": self.cfg.deploy.label_map(),
        })

    def _emit_job(self, data: dict[str, Any]) -> None:
        ev = cloudevents.envelope(kind="job", source=self._source(), data=data)
        self.outbox.enqueue("jobs", ev["id"], cloudevents.encode(ev))

    def _republish_status(self) -> None:
        """The retained status again, through the outbox: it shows the deployment now."""
        try:
            ev = self._status(True)
            self.outbox.enqueue("status", ev["id"], cloudevents.encode(ev))
        except Exception:  # noqa: BLE001 - the next birth carries it anyway
            log.exception("could not enqueue the status")

    def _listening(self) -> str:
        return f"listening on {self.cfg.dicom.host}:{self.cfg.dicom.port}"

    def _assembler_beat(self, *, progress: bool = False, doing: str = "",
                        allow: float = 0.0) -> None:
        if self._assembler_stage is not None:
            self._assembler_stage.beat(progress=progress, doing=doing, allow=allow)

    def _atna_beat(self, *, progress: bool = False, doing: str = "",
                   allow: float = 0.0) -> None:
        if self._atna_stage is not None:
            self._atna_stage.beat(progress=progress, doing=doing, allow=allow)

    def atna_status(self) -> dict[str, Any]:
        """The ATNA link for telemetry and status (counts and reasons, no record content)."""
        if self.atna is None:
            return {"enabled": False}
        s = self.atna.snapshot()
        return {"enabled": True, **{k: s[k] for k in (
            "collector", "format", "connected", "backlog", "sent", "resent", "skipped",
            "unreadable", "failures", "tls_failures", "last_error", "last_error_code")}}

    def _birth(self) -> dict[str, Any]:
        return self._status(True)

    def _offline(self) -> dict[str, Any]:
        return self._status(False)

    # -- threads --------------------------------------------------------------------

    # The assembler sleeps until the next study is due (or new work), at most this long.
    _ASSEMBLE_MAX_WAIT = 1.0

    def _assembler(self) -> None:
        wait = 0.0
        while not self._stop.is_set():
            self._work.wait(timeout=wait)
            self._work.clear()
            self._assembler_beat(doing="assembling")
            try:
                for sid in self.inbox.complete_due():
                    log.info("study row %d complete", sid)
                self._process_ready()
                self._assembler_beat(doing="waiting for studies")
                wait = self._until_due()
            except Exception:  # noqa: BLE001 - keep assembling whatever happened
                log.exception("assembler cycle failed")
                wait = self._ASSEMBLE_MAX_WAIT
                self._stop.wait(1.0)

    def _until_due(self) -> float:
        """Seconds until the next open study completes: a study completes when
        its quiet period ends, not at the next poll (receive workers store
        without waking this thread; their counters arrive every 0.2 s)."""
        due = self.inbox.next_due()
        if due is None:
            return self._ASSEMBLE_MAX_WAIT
        return min(self._ASSEMBLE_MAX_WAIT, max(0.005, due - time.time() + 0.002))

    # Room for one result message: a result is a few kB even with many models.
    _RESULT_ROOM = 64 * 1024

    def _process_ready(self) -> int:
        n = 0
        for study in self.inbox.ready():
            if self._stop.is_set():
                break
            # A result that cannot be enqueued would be de-identified and inferred
            # again every cycle: hold completed studies until the outbox drains.
            if not self.outbox.has_room("results", self._RESULT_ROOM):
                if not self._holding:
                    log.warning("outbox is full: holding completed studies until it drains")
                self._holding = True
                break
            self._holding = False
            self._assembler_beat(progress=True, doing="processing a study")
            faults.hang_point("assembler")
            try:
                self.pipeline.process(study)
                if self.delivery is not None:
                    self.delivery.wake()
                n += 1
                self._assembler_beat(progress=True, doing="processing a study")
            except OutOfResources as exc:
                log.error("cannot finish study %s: %s", study.ref, exc)
                break
            except EdgeAgentError as exc:
                self.pipeline.counters["failed_studies"] += 1
                log.error("study %s failed: %s", study.ref, exc)
        return n

    def telemetry_data(self) -> dict[str, Any]:
        r = self.scp.counters
        lat = self.pipeline.latencies_ms
        ob = self.outbox.stats()
        return {
            "system": telemetry.system(self.cfg.state_dir),
            "pipeline": {
                "associations_accepted": r.associations_accepted,
                "associations_rejected": r.associations_rejected,
                "associations_active": r.active,
                "instances_received": r.instances_stored,
                "instances_duplicate": r.instances_duplicate,
                "instances_failed": r.instances_failed,
                "studies_processed": self.pipeline.counters["studies"],
                "studies_failed": self.pipeline.counters["failed_studies"],
                "instances_quarantined": self.pipeline.counters["quarantined"],
                "latency_ms_p50": telemetry.percentile(lat, 0.5),
                "latency_ms_p95": telemetry.percentile(lat, 0.95),
                "inbox": self.inbox.counts(),
                "outbox_depth": int(ob["depth"]),
                "outbox_oldest_age_s": round(ob["oldest_age_s"], 1),
                "outbox_blocked": int(ob["blocked"]),
            },
            "security": {
                **telemetry.security(self.publisher.state, r.associations_rejected,
                                     self.certs.check()),
                "dicom_connections_refused": r.connections_refused,
                "dicom_rate_limited": r.rate_limited,
                "dicom_tls_failures": r.tls_failures,
                **self._audit_security(),
            },
            "interval_s": self.cfg.telemetry.interval_seconds,
            "models": self.engine.active_models(),
            "drift": self.engine.drift_report(),
            "liveness": self.watchdog.as_json(),
            "atna": self.atna_status(),
            "quarantine": self.quarantine.stats(),
            "results_delivery": self.delivery.stats() if self.delivery is not None else {},
            "review": self.review.telemetry(),
            "performance": self.review.performance(),
        }

    def expire_quarantine(self) -> None:
        """[quarantine] retention_days: what nobody released is crypto-shredded."""
        for item in self.quarantine.expire(self.cfg.quarantine.retention_days):
            self.audit("quarantine.purged", details={
                "id": item.id, "study": item.study_key[:12], "instance": item.instance_key[:12],
                "code": item.code, "why": "retention"})

    def _audit_security(self) -> dict[str, int]:
        a = self.audit_log.stats()
        return {"audit_errors": a["errors"], "audit_lost": a["lost"],
                "audit_held": a["held"], "audit_log_replaced": a["log_replaced"],
                "audit_over_budget": a["over_budget"],
                "audit_refusals_summarised": a["refusals_summarised"],
                # Records not yet under a signed checkpoint: with the newest published
                # checkpoint's time, central ops see an audit anchor that is late.
                "audit_unsigned": a["unsigned"]}

    def _telemetry(self) -> None:
        interval = self.cfg.telemetry.interval_seconds
        # It waits a whole interval between two beats.
        stage = self.liveness.stage("telemetry", interval + self.deadline)
        while True:
            self._telemetry_now.wait(interval)
            self._telemetry_now.clear()
            if self._stop.is_set():
                return
            stage.beat(doing="sending telemetry")
            try:
                self.review.tick()
                data = self.telemetry_data()
                ev = cloudevents.envelope(kind="telemetry", source=self._source(), data=data)
                self.outbox.enqueue("telemetry", ev["id"], cloudevents.encode(ev))
                if self.metrics is not None:
                    self.metrics.update(data)
                self.audit_log.maybe_checkpoint()
                if time.time() - self._last_retention > 3600:
                    self._last_retention = time.time()
                    self.audit_log.apply_retention()
                    if self.links is not None:
                        self.links.expire()
                    self.expire_quarantine()
                    self.review.expire()
            except Exception:  # noqa: BLE001
                log.exception("telemetry cycle failed")
            stage.beat(progress=True, doing="waiting for the next interval")

    # How often stages are checked when systemd does not watch us (logs, STATUS=).
    _LIVENESS_PERIOD = 5.0

    def _watchdog(self) -> None:
        """Feed systemd's watchdog only while every stage is live (agent/ops/liveness.py)."""
        interval = sdnotify.watchdog_interval()
        period = min(interval, self._LIVENESS_PERIOD) if interval else self._LIVENESS_PERIOD
        while not self._stop.is_set():
            try:
                self.watchdog.tick()
            except Exception:  # noqa: BLE001 - no verdict, no ping: systemd decides
                log.exception("liveness check failed; not feeding the watchdog this time")
            if self._stop.wait(period):
                return

    # -- run ------------------------------------------------------------------------

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if not self._stop.is_set():
            log.info("stop requested (signal %s): closing intake, draining", signum)
        self._intake.clear()
        self._stop.set()
        self._work.set()
        self._telemetry_now.set()

    @property
    def intake(self) -> str:
        """"open", "paused" (by an operator) or "stopping" (what ``edge-agent status`` shows)."""
        if self._stop.is_set():
            return "stopping"
        return "open" if self._intake.is_set() else "paused"

    def pause_intake(self) -> None:
        """New associations are refused until ``resume_intake`` (``edge-agent control pause``)."""
        self._intake.clear()

    def resume_intake(self) -> None:
        if self._stop.is_set():
            raise EdgeAgentError("the daemon is stopping; intake stays closed")
        self._intake.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        self.audit("daemon.started", details={"version": __version__})
        self.publisher.start()
        if self.atna is not None:
            self._atna_stage = self.liveness.stage("atna", self.deadline)
            self.atna.start()
        if self.metrics is not None:
            self.metrics.start()
        self.control.start()
        if self.delivery is not None:
            self.delivery.start()
        self.deploy.start()
        if not self.opts.burst:
            try:
                self._start_receive()
            except EdgeAgentError:
                self.shutdown([])  # workers, publisher, control: nothing left behind
                raise
            self._assembler_stage = self.liveness.stage("assembler", self.deadline)
        threads = [threading.Thread(target=self._telemetry, name="telemetry", daemon=True),
                   threading.Thread(target=self._watchdog, name="watchdog", daemon=True)]
        if not self.opts.burst:
            threads.append(threading.Thread(target=self._assembler, name="assembler", daemon=True))
        for t in threads:
            t.start()
        sdnotify.notify(f"READY=1\nSTATUS={self._listening()}")
        log.info("edge-agent %s running (site=%s device=%s env=%s)", __version__, self.cfg.site,
                 self.cfg.device, self.cfg.environment)
        if self.opts.burst:
            self._burst()
        else:
            # Bounded waits: a SIGTERM that the kernel hands to another thread runs its
            # Python handler only when the main thread wakes (an unbounded wait hung).
            while not self._stop.wait(0.5):
                pass
        return self.shutdown(threads)

    def _start_receive(self) -> None:
        """Start the DICOM node; its stage is live while the threads it started run
        (its accept loop, the receipt drainer) and, with receive workers, while the
        dispatcher beats."""
        before = set(threading.enumerate())
        started: list[threading.Thread] = []
        stage = self.liveness.stage(
            "receive", self.deadline if self.scp.beats else None,
            probe=lambda: liveness.threads_alive(started, "DICOM receive")())
        self.scp.supervise(stage, self.deadline)
        self.scp.start()
        # By name: a control client that happens to connect now is not the receive node's.
        started.extend(t for t in threading.enumerate()
                       if t not in before and t.name in ("dicom-accept", "dicom-dispatch",
                                                         "dicom-receipts"))

    def _burst(self) -> None:
        self.inbox.complete_all()
        self._process_ready()
        self.publisher.wait_connected(timeout=self.opts.burst_timeout)
        deadline = time.time() + self.opts.burst_timeout
        while time.time() < deadline and self.outbox.stats()["depth"] > 0:
            time.sleep(0.1)
        self._stop.set()
        self._telemetry_now.set()  # the telemetry thread waits on it, not on _stop

    def shutdown(self, threads: list[threading.Thread]) -> int:
        sdnotify.notify("STOPPING=1")
        self.scp.stop()
        for t in threads:
            t.join(timeout=30)
        self.control.stop()
        self.deploy.stop()
        self.audit("daemon.stopped", details={"pending_outbox": int(self.outbox.stats()["depth"])})
        try:
            self.audit_log.checkpoint()
        except Exception:  # noqa: BLE001
            log.exception("final audit checkpoint failed")
        if self.atna is not None:
            self.atna.stop(drain_timeout=5.0)  # what it cannot send waits in the audit log
        self.publisher.stop(drain_timeout=5.0)
        if self.metrics is not None:
            self.metrics.stop()
        if self.delivery is not None:
            self.delivery.stop()  # what is not sent waits in its queue for the next start
        self.engine.close()
        self.audit_log.close()
        self.inbox.close()
        self.quarantine.close()
        self.review.close()
        self.outbox.close()
        if self.delivery is not None:
            self.delivery.queue.close()
        if self.vault is not None:
            self.vault.close()
        if self.links is not None:
            self.links.close()
        os.close(self._state_lock)
        log.info("edge-agent stopped")
        return 0
