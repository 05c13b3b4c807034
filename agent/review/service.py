"""The review stage the daemon wires in.

* ``record`` (the pipeline's hook, on the assembler thread): once a result is
  durable in the outbox, remember per model what a verdict will join with.
* ``on_message`` (the inbound router, on paho's thread): validate a verdict,
  make it durable or refuse it, audit it with the reviewer's identity, queue the
  acknowledgement for the next telemetry (sent at once); never raises.
* ``submit`` (the local reviewer's ``edge-agent review submit``): the same path.
* ``tick`` (the telemetry thread): escalation of overdue flagged results, and the
  performance alerts, each audited once.

Idempotency (docs/operator-guide.md, "Reviewing results"): the first verdict per
(result, model) wins; the same verdict id again is ignored (acknowledged as
``ignored``), a different verdict for a reviewed result is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.crypto import KeyEncryptionKey
from agent.errors import EdgeAgentError
from agent.infer.manifest import Manifest
from agent.review import performance, verdicts
from agent.review.store import VERDICTS, ResultRecord, ReviewStore, Verdict
from agent.review.verdicts import VerdictRefused
from agent.types import InferenceResult, ModelOutput
from agent.uplink.inbound import InboundMessage

log = logging.getLogger(__name__)

AuditFn = Callable[..., None]
ManifestOf = Callable[[str, str], Manifest | None]
MAX_ACKS = 100  # acknowledgements kept for the next telemetry; older ones are dropped
# Published performance changes only in steps of at least k new verdicts, or once a day
# (the windows roll): a reviewer who sends one verdict and watches the counts must not
# learn the subgroup (age band, sex, scanner) of that one result from the increment.
PERFORMANCE_EVERY = 86400.0


class ReviewService:
    def __init__(self, cfg: Config, kek: KeyEncryptionKey, manifest_of: ManifestOf,
                 audit: AuditFn, *, wake: Callable[[], None] | None = None,
                 path: Path | None = None) -> None:
        self.cfg = cfg
        self.settings = cfg.review
        self.box = f"{cfg.site}/{cfg.device}"
        self.store = ReviewStore(path or cfg.state_dir / "review" / "review.db", kek)
        self._manifest_of = manifest_of
        self._audit = audit
        self._wake = wake or (lambda: None)
        self._lock = threading.Lock()
        self._acks: deque[dict[str, Any]] = deque(maxlen=MAX_ACKS)
        self.counters = {"accepted": 0, "ignored": 0, "refused": 0, "record_failures": 0}
        self._perf: tuple[dict[str, Any], list[performance.Alert]] | None = None
        # (verdicts stored, day) it was computed at: counted by the store with the rows it
        # read, so each published change covers at least k verdicts (not the accepted
        # counter, which a verdict stored while the rows are read has not reached yet).
        self._perf_at: tuple[int, int] = (0, -1)
        self._alerted: set[tuple[str, ...]] = set()
        self._perf_lock = threading.Lock()

    # -- results in ----------------------------------------------------------------
    def record(self, result_id: str, result: InferenceResult, now: float | None = None) -> None:
        """The pipeline hook; never raises (the result itself is already durable)."""
        for m in result.models:
            try:
                self.store.record(self._record_of(result_id, result.study_ref, m, now))
            except Exception:  # noqa: BLE001 - a review record must not fail the study
                self.counters["record_failures"] += 1
                log.exception("could not remember result %s for review", result_id)

    def _record_of(self, result_id: str, study_ref: str, m: ModelOutput,
                   now: float | None) -> ResultRecord:
        manifest = self._manifest_of(m.name, m.version)
        positive_label = manifest.decision.positive_label if manifest else ""
        positive = (m.finding == manifest.decision.positive_finding) if manifest else False
        return ResultRecord(
            result_id=result_id, model=m.name, version=m.version, at=now or time.time(),
            needs_review=m.needs_review, study_ref=study_ref, finding=m.finding,
            positive=positive, positive_label=positive_label, labels=dict(m.labels),
            confidence=m.confidence, uncertainty=m.uncertainty,
            review_reasons=tuple(m.review_reasons), explanation=dict(m.explanation),
            subgroup={a: performance.band(a, v) for a, v in m.subgroup})

    # -- verdicts in ---------------------------------------------------------------
    def on_message(self, msg: InboundMessage) -> None:
        """A verdict from a review topic (paho's thread): quick, durable, never raises.

        The reviewer is the topic's last level (the broker lets a reviewer certificate
        write only the topic of its own CN), whatever the message declares: refusals
        are audited under that identity too."""
        try:
            try:
                parsed = verdicts.parse(msg.payload, self.box, reviewer=msg.sender)
            except VerdictRefused as exc:
                self._refused(exc, None, via="mqtt", reviewer=msg.sender)
                return
            self.take(parsed, via="mqtt")
        except VerdictRefused:
            pass  # acknowledged and audited by take()
        except Exception:  # noqa: BLE001 - the MQTT loop must survive any bug here
            log.exception("verdict handling failed")

    def refuse_unread(self, why: str) -> None:
        """A message on the review topic the inbound router dropped unread (too large):
        audited and acknowledged like any refusal (paho's thread; never raises)."""
        try:
            self._refused(VerdictRefused("too-large", why), None, via="mqtt", reviewer="unknown")
        except Exception:  # noqa: BLE001 - the MQTT loop must survive any bug here
            log.exception("verdict refusal failed")

    def submit(self, *, reviewer: str, result_id: str, verdict: str, model: str | None = None,
               corrected_label: str | None = None, note: str | None = None) -> dict[str, Any]:
        """A local reviewer's verdict (control socket); raises VerdictRefused saying why."""
        import uuid

        if verdict not in VERDICTS:
            raise EdgeAgentError(f"verdict must be one of {', '.join(VERDICTS)}")
        if note is not None and len(note) > 2000:
            raise EdgeAgentError("the note is longer than 2000 characters")
        msg = verdicts.VerdictMessage(
            verdict_id=str(uuid.uuid4()), reviewer=reviewer, result_id=result_id, box=self.box,
            model=model, verdict=verdict, corrected_label=corrected_label, note=note)
        return self.take(msg, via="local")

    def take(self, m: verdicts.VerdictMessage, *, via: str) -> dict[str, Any]:
        records = self.store.results_of(m.result_id)
        try:
            if not records:
                raise VerdictRefused("unknown-result")
            if m.model is None:
                if len(records) != 1:
                    raise VerdictRefused("unknown-model")
                rec = records[0]
            else:
                found = [r for r in records if r.model == m.model]
                if not found:
                    raise VerdictRefused("unknown-model")
                rec = found[0]
            if m.corrected_label is not None and m.corrected_label not in rec.labels:
                raise VerdictRefused("unknown-label")
            earlier = self.store.verdict_of(rec.result_id, rec.model)
            if earlier is not None:
                if earlier.verdict_id == m.verdict_id:
                    return self._ignored(m, rec, via)
                raise VerdictRefused("already-reviewed")
            v = Verdict(rec.result_id, rec.model, m.verdict_id, m.verdict, m.corrected_label,
                        m.note, m.reviewer, via, time.time())
            try:
                stored = self.store.add_verdict(v)
            except Exception:  # noqa: BLE001 - sqlite/disk: refuse, the sender may retry
                log.exception("could not store a verdict")
                raise VerdictRefused("store-failed") from None
            if not stored:  # a concurrent verdict for the same result came first
                raise VerdictRefused("already-reviewed")
        except VerdictRefused as exc:
            self._refused(exc, m, via=via, reviewer=m.reviewer)
            raise
        details = self._details(m, via) | {"version": rec.version, "model": rec.model,
                                           "verdict": m.verdict}
        self._audit("review.verdict", user=m.reviewer, source=_source(via, m.reviewer),
                    details=details)
        self._ack(m.verdict_id, m.result_id, "accepted", None)
        with self._lock:
            self.counters["accepted"] += 1
        log.info("verdict %s on result %s (%s) taken via %s", m.verdict, m.result_id[:8],
                 rec.model, via)
        return {"accepted": True, "result_id": rec.result_id, "model": rec.model,
                "version": rec.version, "verdict": m.verdict, "verdict_id": m.verdict_id}

    def _details(self, m: verdicts.VerdictMessage, via: str) -> dict[str, object]:
        # Never the note (free text may name anyone): only whether there was one.
        return {"result_id": m.result_id, "verdict_id": m.verdict_id, "via": via,
                "reviewer": m.reviewer, "corrected_label": m.corrected_label,
                "note": m.note is not None}

    def _ignored(self, m: verdicts.VerdictMessage, rec: ResultRecord, via: str
                 ) -> dict[str, Any]:
        self._audit("review.verdict", outcome="minor_failure", user=m.reviewer,
                    source=_source(via, m.reviewer),
                    details=self._details(m, via) | {"model": rec.model, "ignored": "duplicate"})
        self._ack(m.verdict_id, m.result_id, "ignored", "duplicate")
        with self._lock:
            self.counters["ignored"] += 1
        return {"accepted": False, "ignored": "duplicate", "result_id": rec.result_id,
                "model": rec.model}

    def _refused(self, exc: VerdictRefused, m: verdicts.VerdictMessage | None, *, via: str,
                 reviewer: str) -> None:
        details: dict[str, object] = {"refused": exc.code, "via": via, "reviewer": reviewer,
                                      "verdict_id": exc.verdict_id, "result_id": exc.result_id}
        if m is not None:
            details |= self._details(m, via)
        self._audit("review.verdict", outcome="minor_failure", user=reviewer,
                    source=_source(via, reviewer), details=details)
        self._ack(m.verdict_id if m else exc.verdict_id, m.result_id if m else exc.result_id,
                  "refused", exc.code)
        with self._lock:
            self.counters["refused"] += 1
        log.warning("verdict refused via %s: %s", via, exc.code)

    def _ack(self, verdict_id: str | None, result_id: str | None, outcome: str,
             code: str | None) -> None:
        with self._lock:
            self._acks.append({"verdict_id": verdict_id, "result_id": result_id,
                               "outcome": outcome, "code": code, "at": round(time.time())})
        self._wake()  # the acknowledgement goes out with a telemetry message now

    # -- reading -------------------------------------------------------------------
    def waiting(self, now: float | None = None) -> list[dict[str, Any]]:
        now = now or time.time()
        return [_listing(r, now) for r in self.store.waiting()]

    def show(self, result_id: str) -> dict[str, Any]:
        recs = self.store.results_of(result_id)
        if not recs:
            raise EdgeAgentError(f"no result {result_id} on this box",
                                 hint="see 'edge-agent review list' for the ids")
        now = time.time()
        out = []
        for r in recs:
            v = self.store.verdict_of(r.result_id, r.model)
            item = _listing(r, now) | {
                "labels": r.labels, "uncertainty": r.uncertainty,
                "explanation": r.explanation, "subgroup": r.subgroup,
                "verdict": None if v is None else {
                    "verdict": v.verdict, "corrected_label": v.corrected_label,
                    "note": v.note, "reviewer": v.reviewer, "via": v.via, "at": round(v.at)}}
            out.append(item)
        return {"result_id": result_id, "models": out}

    def backlog(self, now: float | None = None) -> dict[str, Any]:
        b = self.store.backlog(now or time.time(), self.settings.escalate_after_seconds)
        return {**b, "escalate_after_s": self.settings.escalate_after_seconds}

    def take_acks(self) -> list[dict[str, Any]]:
        with self._lock:
            acks = list(self._acks)
            self._acks.clear()
        return acks

    def telemetry(self) -> dict[str, Any]:
        """The ``review`` telemetry section: backlog and acknowledgements (ids only)."""
        with self._lock:
            counts = dict(self.counters)
        return {**self.backlog(), "verdicts": counts, "acks": self.take_acks()}

    # -- periodic ------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Escalate overdue flagged results and audit new performance alerts (telemetry
        thread; never raises)."""
        now = now or time.time()
        try:
            for result_id, model, at in self.store.to_escalate(
                    now, self.settings.escalate_after_seconds):
                self._audit("review.escalated", outcome="serious_failure", details={
                    "result_id": result_id, "model": model, "waiting_s": round(now - at),
                    "escalate_after_s": self.settings.escalate_after_seconds})
                log.warning("flagged result %s (%s) has waited %.0f s for review (over "
                            "[review] escalate_after)", result_id[:8], model, now - at)
        except Exception:  # noqa: BLE001
            log.exception("review escalation check failed")

    def performance(self, now: float | None = None) -> dict[str, Any]:
        """The ``performance`` telemetry section (aggregates only); new alerts audited.

        One computation at a time (the telemetry thread and ``models performance``):
        two at once could leave an older section cached after a newer one went out."""
        with self._perf_lock:
            return self._performance(now)

    def _performance(self, now: float | None) -> dict[str, Any]:
        now = now or time.time()
        day = int(now // PERFORMANCE_EVERY)
        with self._lock:
            if (self._perf is not None and day == self._perf_at[1]
                    and self.store.added - self._perf_at[0] < self.settings.min_verdicts):
                return self._perf[0]
        added, joined = self.store.joined_counted(
            now - max(self.settings.windows_days) * 86400.0)
        rows = list(joined)
        by_window = {d: [j for j in rows if j.verdict.at >= now - d * 86400.0]
                     for d in self.settings.windows_days}
        thresholds: dict[tuple[str, str], dict[str, float]] = {}
        for j in rows:
            mv = (j.record.model, j.record.version)
            if mv not in thresholds:
                man = self._manifest_of(*mv)
                thresholds[mv] = dict(man.acceptance) if man else {}
        section, alerts = performance.report(by_window, k=self.settings.min_verdicts,
                                             thresholds=thresholds, gap=self.settings.gap)
        for a in alerts:
            ident = (a.model, a.version, str(a.window_days), a.subgroup, a.metric, a.kind)
            if ident not in self._alerted:
                self._alerted.add(ident)
                self._audit("performance.alert", outcome="serious_failure",
                            details=a.as_json())
                log.warning("performance alert: %s", a.sentence())
        with self._lock:
            self._perf, self._perf_at = (section, alerts), (added, day)
        return section

    def expire(self) -> int:
        return self.store.expire(self.settings.retention_days)

    def close(self) -> None:
        self.store.close()


def _source(via: str, reviewer: str) -> str:
    return f"mqtt:reviewer/{reviewer}" if via == "mqtt" else f"local:{reviewer}"


def _listing(r: ResultRecord, now: float) -> dict[str, Any]:
    return {"result_id": r.result_id, "model": r.model, "version": r.version,
            "study": r.study_ref[:16], "finding": r.finding, "confidence": r.confidence,
            "needs_review": r.needs_review, "reasons": list(r.review_reasons),
            "explanation": str(r.explanation.get("text", "")), "at": round(r.at),
            "age_s": round(max(0.0, now - r.at))}
