"""Delivery of result objects into the original study, in every configured PACS.

Three duties, one thread each plus one sender per destination:

* **plan**: every held link (agent/results/link.py) not yet planned is turned into
  its objects (agent/results/build.py) and queued, for each destination that takes
  that kind, in one durable transaction (agent/results/queue.py).  Planning reads
  the link store, not the pipeline: a crash between processing and planning only
  delays it.
* **send** (per destination): due objects go out in one association; answers move
  rows on (stored, retried with jittered exponential backoff, or dead-lettered);
  with storage commitment the stored rows are then covered by an N-ACTION.
* **finish**: a study version whose every row is final gets its delivery summary
  published over MQTT (destination names and states, nothing else) and, when every
  destination confirmed every object, its link released (shredded and audited).
  A version with a dead-lettered object keeps its link until
  ``[results] link_retention_days``.

Every send is audited as DICOM Instances Transferred (110104) with its outcome.
Where PHI may go is decided in agent/uplink/egresspolicy.py: a destination that is not
configured there is never connected to.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from queue import Empty, Queue
from typing import Any

import pydicom

from agent.config import Config, ResultDestination
from agent.errors import EdgeAgentError, OutOfResources
from agent.results.build import build_all
from agent.results.common import Issuer
from agent.results.link import LinkStore
from agent.results.queue import DeliveryQueue, DestinationStats, Item, QueuedObject
from agent.results.scu import Link, new_transaction_uid
from agent.uplink import cloudevents, egresspolicy, vocabulary
from agent.uplink.outbox import Outbox

log = logging.getLogger(__name__)

AuditFn = Callable[..., None]

# States in the published summary (docs/schemas/delivery.schema.json).
QUEUED, CONFIRMED, DEAD, NOTHING = vocabulary.DELIVERY_STATES

_active: Delivery | None = None
_active_lock = threading.Lock()


def commitment_result(transaction_uid: str, success_uids: list[str],
                      failed_uids: list[str]) -> bool:
    """A Storage Commitment report (N-EVENT-REPORT, event type 1 or 2) for this box.

    Called by the DICOM acceptor when a PACS sends the report on a new association,
    and by our own SCU when it arrives on the send association.  True when the
    transaction is one of ours (answer Success); False otherwise (answer 0x0110 or
    "No such object instance", the acceptor's choice).  Never raises."""
    with _active_lock:
        d = _active
    if d is None:
        return False
    try:
        return d.on_commitment(transaction_uid, success_uids, failed_uids)
    except Exception:  # noqa: BLE001 - called from a network handler
        log.exception("storage commitment report not handled")
        return False


def commitment_report(transaction_uid: str, success_uids: list[str], failed_uids: list[str],
                      answer: Callable[[bool], None]) -> None:
    """``commitment_result``, answered later: the report waits in the delivery's
    queue and its own thread calls ``answer(taken)`` (``answer(False)`` at once when
    delivery is not running).  For the receive pool's dispatcher, which relays the
    reports its workers take and must not wait for the database meanwhile
    (agent/dicom/pool.py).  Never raises."""
    with _active_lock:
        d = _active
    if d is None:
        _answer(answer, False)
        return
    d.reports.put((transaction_uid, success_uids, failed_uids, answer))


def _answer(answer: Callable[[bool], None], taken: bool) -> None:
    try:
        answer(taken)
    except Exception:  # noqa: BLE001 - the caller's callback; nothing to undo here
        log.exception("answering a storage commitment report failed")


def backoff(attempt: int, lo: float, hi: float, rnd: random.Random | None = None) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential from ``lo`` to
    ``hi``, with "equal jitter" (half fixed, half random) so a fleet of boxes that lost
    the same PACS does not come back in lockstep."""
    base = min(hi, lo * (2 ** max(0, min(attempt - 1, 30))))
    r = rnd.random() if rnd is not None else random.random()
    return float(base / 2 + base / 2 * r)


class Delivery:
    """The planner, the senders and the finisher for one daemon."""

    def __init__(self, cfg: Config, links: LinkStore, queue: DeliveryQueue, issuer: Issuer,
                 outbox: Outbox, audit: AuditFn) -> None:
        self.cfg = cfg
        self.settings = cfg.results
        self.links = links
        self.queue = queue
        self.issuer = issuer
        self.outbox = outbox
        self._audit = audit
        self._stop = threading.Event()
        self._plan_now = threading.Event()
        self._threads: list[threading.Thread] = []
        # Only destinations the egress policy names: the one answer to "where may PHI go".
        allowed = {d.name for d in egresspolicy.phi_destinations(cfg) if d.kind == "dicom"}
        self.destinations: tuple[ResultDestination, ...] = tuple(
            d for d in cfg.results.destinations if d.name in allowed)
        self._fails: dict[str, int] = {d.name: 0 for d in self.destinations}
        self._connected: dict[str, bool] = {d.name: False for d in self.destinations}
        # An unreachable destination is not dialled again (not even for commitment
        # requests) before its backoff ran out.
        self._not_before: dict[str, float] = {d.name: 0.0 for d in self.destinations}
        self._wake: dict[str, threading.Event] = {d.name: threading.Event()
                                                  for d in self.destinations}
        self.counters: dict[str, dict[str, int]] = {
            d.name: {"sent": 0, "failed": 0, "dead": 0, "committed": 0}
            for d in self.destinations}
        self._subjects: dict[tuple[str, int], dict[str, str]] = {}
        self._planned: set[tuple[str, int]] = set()  # saves a query per held link and round
        # Storage Commitment reports handed on by ``commitment_report``, applied in
        # order by the results-commitment thread.
        self.reports: Queue[tuple[str, list[str], list[str], Callable[[bool], None]]] = (
            Queue())

    def __repr__(self) -> str:
        return f"Delivery(<{len(self.destinations)} destinations>)"

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        global _active
        with _active_lock:
            _active = self
        self._threads = [threading.Thread(target=self._planner, name="results-plan",
                                          daemon=True),
                         threading.Thread(target=self._reports_loop, name="results-commitment",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._sender, args=(d,),
                                           name=f"results-send-{d.name}", daemon=True)
                          for d in self.destinations]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        global _active
        self._stop.set()
        self._plan_now.set()
        for e in self._wake.values():
            e.set()
        self.queue.wake()
        for t in self._threads:
            t.join(timeout)
        with _active_lock:
            if _active is self:
                _active = None
        while True:  # not applied: the PACS keeps its record and may report again
            try:
                *_, answer = self.reports.get_nowait()
            except Empty:
                break
            _answer(answer, False)

    def wake(self) -> None:
        """New links may be held (the pipeline processed a study)."""
        self._plan_now.set()

    def _reports_loop(self) -> None:
        while not self._stop.is_set():
            try:
                tx, ok, failed, answer = self.reports.get(timeout=0.5)
            except Empty:
                continue
            try:
                taken = self.on_commitment(tx, ok, failed)
            except Exception:  # noqa: BLE001 - one report's failure is its own
                log.exception("storage commitment report not handled")
                taken = False
            _answer(answer, taken)

    # -- plan + finish ------------------------------------------------------------------

    def _planner(self) -> None:
        while not self._stop.is_set():
            self._plan_now.wait(2.0)
            self._plan_now.clear()
            if self._stop.is_set():
                return
            try:
                self.plan_pending()
                self.expire()
                self.finish()
            except OutOfResources as exc:
                log.error("results delivery: %s", exc)
            except Exception:  # noqa: BLE001 - keep delivering whatever happened
                log.exception("results delivery planning failed")

    def plan_pending(self) -> int:
        """Queue the objects of every held, not yet planned link; returns how many
        study versions were planned."""
        if not self.destinations:
            return 0
        n = 0
        if len(self._planned) > 100_000:
            self._planned.clear()  # a cache: the queue's plans table is the truth
        for ref, version, _exp in self.links.held():
            if self._stop.is_set():
                break
            if (ref, version) in self._planned:
                continue
            if self.queue.planned(ref, version):
                self._planned.add((ref, version))
                continue
            try:
                rec = self.links.get(ref, version)
            except EdgeAgentError as exc:
                log.error("study %s v%d: result link unreadable (%s); not delivered", ref,
                          version, exc)
                self.queue.plan(ref, version, [])
                continue
            try:
                objects, skipped = build_all(self.issuer, rec)
            except Exception as exc:  # noqa: BLE001 - a library's message may quote a value
                # Not planned, not released: the link stays for `results preview` and its
                # retention; tried again after a restart.
                log.error("study %s v%d: result objects could not be built (%s); not "
                          "delivered", ref, version, type(exc).__name__)
                self._planned.add((ref, version))
                continue
            for why in skipped:
                log.info("study %s v%d: %s", ref, version, why)
            rows = []
            for obj in objects:
                buf = io.BytesIO()
                obj.dataset.save_as(buf, enforce_file_format=True)
                data = buf.getvalue()
                for d in self.destinations:
                    if obj.kind in d.kinds:
                        rows.append(QueuedObject(d.name, ref, version, obj.kind, obj.model,
                                                 str(obj.dataset.SOPClassUID),
                                                 obj.sop_instance_uid, data))
            added = self.queue.plan(ref, version, rows)
            self._planned.add((ref, version))
            log.info("study %s v%d: %d result object(s) queued for %d destination(s)", ref,
                     version, added, len({r.destination for r in rows}))
            n += 1
            for name in {r.destination for r in rows}:
                self._wake[name].set()
        return n

    def expire(self) -> None:
        hours = self.settings.dead_letter_hours
        for it in self.queue.expire(hours * 3600.0):
            self.counters.get(it.destination, {}).update(
                dead=self.counters.get(it.destination, {}).get("dead", 0) + 1)
            log.error("result %s of study %s v%d not confirmed by %s within %g hours: "
                      "dead-lettered", it.kind, it.study_ref, it.version, it.destination, hours)
            self._note(it, "major_failure", "dead-letter", None,
                       f"not confirmed within [results] dead_letter_hours ({hours:g})")

    def finish(self) -> int:
        n = 0
        for ref, version in self.queue.finished():
            summary = self.queue.summary(ref, version)
            delivered = self.delivered_to(summary)
            everything = bool(summary) and all(
                set(states) <= {"done"} for states in summary.values())
            released = False
            if everything or not summary:
                # Confirmed everywhere, or nothing to send: the link has done its work.
                released = self.links.release(ref, version)
            if summary:  # a result without objects promised no delivery: nothing to say
                self._publish_summary(ref, version, delivered)
            self.queue.mark_reported(ref, version, released)
            n += 1
        return n

    def delivered_to(self, summary: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
        out = []
        for d in self.destinations:
            states = summary.get(d.name, {})
            if not states:
                state = NOTHING
            elif states.get("dead"):
                state = DEAD
            elif set(states) <= {"done"}:
                state = CONFIRMED
            else:
                state = QUEUED
            out.append({"destination": d.name, "state": state,
                        "objects": sum(states.values()),
                        "confirmed": int(states.get("done", 0))})
        return out

    def _publish_summary(self, ref: str, version: int, delivered: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        eid = cloudevents.stable_id(cfg.site, cfg.device, "result-delivery", ref, str(version))
        ev = cloudevents.envelope(
            kind="result.delivery", source=f"edge-agent/{cfg.site}/{cfg.device}",
            data={"study": {"ref": ref, "version": version}, "delivered_to": delivered},
            event_id=eid, subject=ref)
        self.outbox.enqueue("results", eid, cloudevents.encode(ev))

    # -- send -------------------------------------------------------------------------

    def _sender(self, dest: ResultDestination) -> None:
        wake = self._wake[dest.name]
        while not self._stop.is_set():
            try:
                self.deliver(dest)
            except Exception:  # noqa: BLE001 - a sender must outlive any one failure
                log.exception("results delivery to %s failed", dest.name)
                self._fails[dest.name] += 1
            self._plan_now.set()  # finish what this round completed
            nxt = self.queue.next_due(dest.name)
            wait = 5.0 if nxt is None else min(5.0, max(0.05, nxt - time.time()))
            if dest.storage_commitment:
                wait = min(wait, 5.0)
            wake.wait(wait)
            wake.clear()

    def deliver(self, dest: ResultDestination, now: float | None = None) -> int:
        """One round for ``dest``: send what is due, request commitment for what was
        stored.  Returns the objects stored."""
        if not egresspolicy.may_send_phi(self.cfg, "dicom", dest.host, dest.port,
                                         ae_title=dest.ae_title):
            return 0  # defence in depth: the destinations were filtered at start
        if (now if now is not None else time.time()) < self._not_before[dest.name]:
            return 0
        items = self.queue.due(dest.name, now)
        commit: list[Item] = []
        if dest.storage_commitment:
            commit = self.queue.to_commit(dest.name, self.settings.commitment_timeout_seconds,
                                          now)
        if not items and not commit:
            return 0
        link = Link(dest, self.cfg.dicom.ae_title, {it.sop_class for it in items},
                    commitment=dest.storage_commitment,
                    connect_timeout=self.settings.connect_timeout_seconds,
                    dimse_timeout=self.cfg.dicom.dimse_timeout,
                    on_report=lambda tx, ok, bad: self.on_commitment(tx, ok, bad))
        if not link.open():
            self._unreachable(dest, items, link.error)
            return 0
        self._connected[dest.name] = True
        self._not_before[dest.name] = 0.0
        stored = 0
        try:
            for i, it in enumerate(items):
                if self._stop.is_set():
                    break
                if not link.alive():
                    self._unreachable(dest, items[i:], "association lost")
                    break
                if not link.accepts(it.sop_class):
                    self._retry(dest, it, None, "the destination did not accept this SOP "
                                                "class (check its configuration)")
                    continue
                try:
                    ds = pydicom.dcmread(io.BytesIO(it.data))
                except Exception as exc:  # noqa: BLE001 - our own bytes; never expected
                    self.queue.dead(it.id, None, f"queued object unreadable "
                                                 f"({type(exc).__name__})")
                    continue
                out = link.store(ds)
                if out.verdict == "stored":
                    self.queue.stored(it.id, int(out.status or 0),
                                      commitment=dest.storage_commitment)
                    self.counters[dest.name]["sent"] += 1
                    self._fails[dest.name] = 0
                    stored += 1
                    self._note(it, "success", "stored", out.status, out.words)
                elif out.verdict == "refused":
                    self.queue.dead(it.id, out.status, out.words)
                    self.counters[dest.name]["dead"] += 1
                    log.error("%s refused result %s of study %s v%d: %s; dead-lettered "
                              "(sending it again would be refused again)", dest.name,
                              it.kind, it.study_ref, it.version, out.words)
                    self._note(it, "major_failure", "refused", out.status, out.words)
                elif out.status is None:
                    self._unreachable(dest, items[i:], out.words)
                    break
                else:
                    self._retry(dest, it, out.status, out.words)
            if dest.storage_commitment and link.alive():
                self._request_commitment(dest, link, now)
        finally:
            link.close()
        return stored

    def _request_commitment(self, dest: ResultDestination, link: Link,
                            now: float | None) -> None:
        todo = self.queue.to_commit(dest.name, self.settings.commitment_timeout_seconds, now)
        if not todo:
            return
        tx = new_transaction_uid()
        self.queue.requested([it.id for it in todo], tx)  # durable before the request
        status, words = link.request_commitment(tx, [(it.sop_class, it.sop_uid)
                                                     for it in todo])
        if status != 0:
            self.queue.request_failed(tx, words, status)
            log.warning("%s: storage commitment request not accepted: %s", dest.name, words)
            return
        log.info("%s: storage commitment requested for %d object(s)", dest.name, len(todo))
        link.wait_report(self.settings.commitment_wait_seconds)

    def on_commitment(self, tx: str, ok: list[str], failed: list[str]) -> bool:
        if not self.queue.has_transaction(tx):
            return False
        done, bad = self.queue.committed(tx, ok, failed)
        for it in done:
            self.counters.get(it.destination, {}).update(
                committed=self.counters.get(it.destination, {}).get("committed", 0) + 1)
            self._note(it, "success", "committed", 0, "storage commitment confirmed",
                       event="results.committed")
        for it in bad:
            log.warning("%s: storage commitment failed for result %s of study %s v%d; "
                        "sending it again", it.destination, it.kind, it.study_ref, it.version)
            self._note(it, "minor_failure", "commitment-failed", None,
                       "storage commitment failed; sent again", event="results.committed")
            self._wake.get(it.destination, threading.Event()).set()
        self._plan_now.set()
        return True

    def _retry(self, dest: ResultDestination, it: Item, status: int | None, words: str) -> None:
        at = time.time() + backoff(it.attempts + 1, self.settings.retry_min_seconds,
                                   self.settings.retry_max_seconds)
        self.queue.retry(it.id, status, words, at)
        self.counters[dest.name]["failed"] += 1
        log.warning("%s: result %s of study %s v%d not stored (%s); retrying", dest.name,
                    it.kind, it.study_ref, it.version, words)
        self._note(it, "minor_failure", "retry", status, words)

    def _unreachable(self, dest: ResultDestination, items: list[Item], why: str) -> None:
        self._connected[dest.name] = False
        self._fails[dest.name] += 1
        at = time.time() + backoff(self._fails[dest.name], self.settings.retry_min_seconds,
                                   self.settings.retry_max_seconds)
        self._not_before[dest.name] = at
        n = self.queue.defer(dest.name, why, at)
        self.counters[dest.name]["failed"] += 1
        log.warning("%s (%s:%d): %s; %d object(s) wait, next try in %.0f s", dest.name,
                    dest.host, dest.port, why, n, at - time.time())
        for it in items[:1] or []:
            # One record per failed attempt, not one per waiting object (an outage
            # must not flood the audit log); it names how many were waiting.
            self._note(it, "minor_failure", "unreachable", None, why, waiting=n)

    # -- audit ----------------------------------------------------------------------------

    def _phi(self, ref: str, version: int) -> dict[str, str]:
        """Patient ID, name and study UID of the original for the local audit record
        (ATNA participant objects); never published (agent/audit)."""
        key = (ref, version)
        got = self._subjects.get(key)
        if got is None:
            try:
                s = self.links.get(ref, version).subject
                got = {"patient_id": str(s.get("PatientID", "") or ""),
                       "patient_name": str(s.get("PatientName", "") or ""),
                       "study_uid": str(s.get("StudyInstanceUID", "") or "")}
            except EdgeAgentError:
                got = {}
            if len(self._subjects) > 1000:
                self._subjects.clear()
            self._subjects[key] = got
        return {k: v for k, v in got.items() if v}

    def _note(self, it: Item, outcome: str, what: str, status: int | None, words: str,
              *, event: str = "results.sent", **extra: object) -> None:
        dest = next((d for d in self.destinations if d.name == it.destination), None)
        details: dict[str, object] = {
            "destination": it.destination, "study": it.study_ref, "version": it.version,
            "kind": it.kind, "sop_instance_uid": it.sop_uid, "sop_class_uid": it.sop_class,
            "result": what, "status": f"0x{status:04X}" if status is not None else None,
            "why": words, **extra}
        if dest is not None:
            details["peer"] = f"{dest.ae_title}@{dest.host}:{dest.port}"
        try:
            self._audit(event, outcome=outcome, details=details,
                        phi=self._phi(it.study_ref, it.version))
        except Exception:  # noqa: BLE001 - the audit log reports its own failures
            log.exception("audit of %s failed", event)

    # -- telemetry / status ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per destination: queue depth, oldest age, last error code (no PHI)."""
        got: dict[str, DestinationStats] = self.queue.stats([d.name for d in self.destinations])
        out: dict[str, Any] = {}
        for d in self.destinations:
            s = got[d.name]
            out[d.name] = {
                "depth": s.depth, "pending": s.pending, "awaiting_commitment": s.awaiting,
                "dead_letter": s.dead, "confirmed": s.done,
                "oldest_age_s": round(s.oldest_age_s, 1),
                "last_error_code": f"0x{s.last_status:04X}" if s.last_status is not None
                and s.last_status != 0 else None,
                "last_error": s.last_error or None,
                "connected": self._connected[d.name],
                "consecutive_failures": self._fails[d.name],
                **self.counters[d.name],
            }
        return out

    def warnings(self) -> list[str]:
        out = []
        for name, s in self.stats().items():
            if s["dead_letter"]:
                out.append(f"results destination {name}: {s['dead_letter']} object(s) "
                           "dead-lettered (see the audit log, results.sent)")
            if s["depth"] and s["consecutive_failures"]:
                out.append(f"results destination {name} not reachable: {s['last_error']}; "
                           f"{s['depth']} object(s) wait, oldest {s['oldest_age_s']:.0f} s")
        return out
