"""Storage Commitment Push Model SCP (PS3.4 J.3): a modality asks the box to commit.

Owns the N-ACTION-RQ handler (Request Storage Commitment) and the delivery of its
N-EVENT-REPORT.  (agent.dicom.commitment is the other direction: reports a PACS
sends us for our own requests.)

Committed means durable in the encrypted inbox: the instance was sealed under its
study's key, written, fsynced, and its index row committed (``synchronous=FULL``)
before its C-STORE was acknowledged; the index is what is asked.  Each reference
is answered at once:

* held, same SOP class -> Referenced SOP Sequence (committed);
* held under another SOP class -> Failed SOP Sequence, reason 0x0119 (class /
  instance conflict);
* not held -> Failed SOP Sequence, reason 0x0112 (no such object instance).  Not
  held includes "not received yet" (send the request after the C-STOREs, as
  modalities do) and "processed already": the box is not an archive; once a
  study's result is out its instances are shredded.

A commitment request also says "this set is complete": the referenced instances
the box holds complete their study at once (agent.store.completion).  A referenced
instance the box does not hold does not hold the study back: it was lost in
transit, and a modality that re-sends it after the failed report opens a follow-up
version of the study (a second result) rather than delaying the first.

The report goes on the same association right after the N-ACTION-RSP when it is
still open (PS3.4 J.3.3); when the requestor released it (or it went away) before
answering the report, or answered it with a failure status (it takes reports only
on its own SCP), it goes on a new association to the requesting AE title,
whose host and port come from ``[[dicom.known_aes]]`` only, never from the
association that asked.  An AE title not in that table gets no report: logged and
audited (``commitment.report_undeliverable``); the modality may ask again.  A
report for a known AE is kept first (sealed, durable, in the inbox index:
agent.store.pending_reports), then tried, each attempt bounded by ``[dicom]
commitment_report_timeout``; a failed one is tried again with jittered
exponential backoff from ``commitment_report_retry_seconds`` (the main process's
``ReportRetries``, which also sends at start what a previous run still owed),
until ``commitment_report_max_age_seconds``: then given up and audited
(``commitment.report_undeliverable``, why ``expired``).

Statuses of the N-ACTION-RSP: 0x0000; 0x0112 when the Requested SOP Instance is
not the class's well-known instance; 0x0123 (no such action) for an Action Type
other than 1; 0x0115 (invalid argument value) without a Transaction UID or with
an empty or malformed Referenced SOP Sequence; 0x0110 when the index cannot be
read.  Audited: ``commitment.request`` (counts, pseudonymous transaction
reference) and ``commitment.report_sent``.
May import pydicom, pynetdicom, agent.config, agent.store.{completion,
pending_reports} and agent.dicom.{admission, commitment, dimse, negotiation, status}.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role

from agent.config import DicomSettings, KnownAE
from agent.dicom.admission import AuditFn
from agent.dicom.commitment import WELL_KNOWN_INSTANCE
from agent.dicom.dimse import (
    N_ACTION_RQ,
    DimseReply,
    DimseRequest,
    EventReport,
    HandlerRegistry,
    command_uid,
    command_us,
    decode_data_set,
    encode_data_set,
)
from agent.dicom.negotiation import STORAGE_COMMITMENT_PUSH
from agent.dicom.status import STATUS_PROCESSING_FAILURE, STATUS_SUCCESS
from agent.store.completion import COMMITMENT, CompletionStore
from agent.store.pending_reports import PendingReport, PendingReports

log = logging.getLogger(__name__)

STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_NO_SUCH_ACTION = 0x0123
FAILURE_NO_SUCH_OBJECT = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119


def references(ds: Dataset | None) -> list[tuple[str, str]] | None:
    """(SOP class, SOP instance) of each Referenced SOP Sequence item; None when the
    request is malformed (no items, or an item without both UIDs)."""
    if ds is None:
        return None
    out = []
    for item in ds.get("ReferencedSOPSequence", []) or []:
        cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        inst = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not cls or not inst:
            return None
        out.append((cls, inst))
    return out or None


def report_data_set(tx: str, committed: list[tuple[str, str]],
                    failed: list[tuple[str, str, int]]) -> Dataset:
    """The event information of the N-EVENT-REPORT (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = tx
    if committed:
        ds.ReferencedSOPSequence = []
        for cls, inst in committed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
            ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for cls, inst, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds


EXPLICIT_LE = "1.2.840.10008.1.2.1"
MAX_BACKOFF = 600.0  # seconds between two attempts, at most
RETRY_POLL = 1.0  # how often the retry loop looks for due reports


def backoff(base: float, attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``base``
    doubling per attempt, at most MAX_BACKOFF, jittered by +-50 % (modalities that
    came back after an outage are not all called at the same moment)."""
    return float(min(MAX_BACKOFF, base * 2.0 ** max(0, attempts - 1)) * (0.5 + rand()))


class ReportSender:
    """Sends a report on a new association to a known AE; never raises.

    The report is kept (sealed, durable: agent.store.pending_reports) before the
    first attempt, which runs in a thread of its own; a failed attempt is tried
    again by ``retry_due`` (the main process's ReportRetries) with backoff until
    ``[dicom] commitment_report_max_age_seconds``, then given up and audited."""

    def __init__(self, settings: DicomSettings, audit: AuditFn,
                 pending: PendingReports | None) -> None:
        self._ae_title = settings.ae_title
        self._known: dict[str, KnownAE] = {k.ae_title: k for k in settings.known_aes}
        self._timeout = settings.commitment_report_timeout
        self._retry = settings.commitment_report_retry_seconds
        self._max_age = settings.commitment_report_max_age_seconds
        # An attempt holds its row this long: connect + negotiate + answer + release.
        self._hold = 3 * self._timeout + 5
        self._pending = pending
        self._audit = audit

    def send(self, calling_ae: str, event_type: int, ds: Dataset, ref: str) -> None:
        if calling_ae not in self._known:
            log.error("storage commitment report for %s not delivered: the requestor released "
                      "the association and its AE title is not in [[dicom.known_aes]] (add "
                      "ae_title, host and port to report on a new association)", calling_ae)
            self._audited("commitment.report_undeliverable", calling_ae, ref, "serious_failure",
                          {"why": "unknown_ae"})  # audit details are tokens, not text
            return
        now = time.time()
        rid = 0
        try:
            body = encode_data_set(ds, EXPLICIT_LE)
            if self._pending is not None:
                rid = self._pending.add(calling_ae, ref, event_type, body, self._hold)
        except Exception:  # noqa: BLE001 - not kept: still try once now
            log.exception("keeping a storage commitment report for %s failed; one attempt "
                          "only", calling_ae)
            body = b""
        report = PendingReport(rid, calling_ae, ref, event_type, body, now, 0)
        threading.Thread(target=self._attempt, args=(report, ds), name="commitment-report",
                         daemon=True).start()

    def retry_due(self) -> int:
        """Try the kept reports that are due (from the retry loop); how many."""
        if self._pending is None:
            return 0
        at = self._pending.next_at()
        if at is None or at > time.time():
            return 0
        due = self._pending.claim_due(self._hold)
        for report in due:
            try:
                ds = decode_data_set(report.body, EXPLICIT_LE)
            except Exception:  # noqa: BLE001 - a row we cannot read is given up
                log.exception("a kept storage commitment report cannot be read: given up")
                self._give_up(report, "unreadable")
                continue
            self._attempt(report, ds)
        return len(due)

    def _attempt(self, report: PendingReport, ds: Dataset) -> None:
        calling_ae, ref = report.calling_ae, report.ref
        known = self._known.get(calling_ae)
        if known is None:  # no longer in [[dicom.known_aes]] (the config changed)
            self._give_up(report, "unknown_ae")
            return
        try:
            status = self._associate_and_send(known, report.event_type, ds)
        except Exception as exc:  # noqa: BLE001 - a peer we cannot reach is logged, not raised
            log.warning("storage commitment report to %s failed: %s", calling_ae, exc)
            status, why = None, type(exc).__name__
        else:
            why = "" if status is not None else "association_refused_or_no_answer"
        if status == STATUS_SUCCESS:
            self._forget(report)
            self._audited("commitment.report_sent", calling_ae, ref, "success",
                          {"association": "new", "status": f"0x{status:04X}",
                           "attempts": report.attempts + 1})
            return
        why = why or f"status_0x{status or 0:04X}"
        if report.id == 0 or time.time() - report.created_at >= self._max_age:
            log.error("storage commitment report to %s (%s:%d) not delivered: %s; given up "
                      "after %d attempt(s)", calling_ae, known.host, known.port, why,
                      report.attempts + 1)
            self._give_up(report, "expired" if report.id else why, status)
            return
        wait = backoff(self._retry, report.attempts + 1)
        log.warning("storage commitment report to %s (%s:%d) not delivered: %s; trying again "
                    "in %.0f s", calling_ae, known.host, known.port, why, wait)
        try:
            assert self._pending is not None
            self._pending.failed(report.id, time.time() + wait)
        except Exception:  # noqa: BLE001 - the row stays held; it is tried after the hold
            log.exception("recording a failed storage commitment report failed")

    def _give_up(self, report: PendingReport, why: str, status: int | None = None) -> None:
        self._forget(report)
        self._audited("commitment.report_undeliverable", report.calling_ae, report.ref,
                      "serious_failure",
                      {"association": "new", "why": why, "attempts": report.attempts + 1,
                       "status": "" if status is None else f"0x{status:04X}"})

    def _forget(self, report: PendingReport) -> None:
        if report.id and self._pending is not None:
            try:
                self._pending.drop(report.id)
            except Exception:  # noqa: BLE001 - then it is sent once more: harmless
                log.exception("forgetting a storage commitment report failed")

    def _associate_and_send(self, known: KnownAE, event_type: int, ds: Dataset) -> int | None:
        ae = AE(ae_title=self._ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._timeout
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        # We report as the class's SCP (PS3.4 J.3.3): ask for that role.
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate(known.host, known.port, ae_title=known.ae_title, ext_neg=[role])
        if not assoc.is_established:
            return None
        try:
            rsp, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT_PUSH,
                                               WELL_KNOWN_INSTANCE)
            return int(rsp.Status) if rsp is not None and "Status" in rsp else None
        finally:
            assoc.release()

    def _audited(self, event: str, calling_ae: str, ref: str, outcome: str,
                 details: dict[str, object]) -> None:
        try:
            self._audit(event, outcome=outcome,
                        details={"calling_ae": calling_ae, "transaction": ref, **details})
        except Exception:  # noqa: BLE001 - delivery does not depend on the audit
            log.exception("auditing %s failed", event)


class ReportRetries:
    """The retry loop of kept reports: one thread in the daemon's main process."""

    def __init__(self, sender: ReportSender, pending: PendingReports) -> None:
        self._sender = sender
        self._pending = pending
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Before the node listens: reports a previous run held are due at once."""
        try:
            n = self._pending.release_all()
            if n:
                log.info("%d storage commitment report(s) from before the restart: sending", n)
        except Exception:  # noqa: BLE001 - they are due after their hold anyway
            log.exception("reading the kept storage commitment reports failed")
        self._thread = threading.Thread(target=self._loop, name="commitment-retries",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sender.retry_due()
            except Exception:  # noqa: BLE001 - the loop outlives an index hiccup
                log.exception("retrying storage commitment reports failed")
            self._stop.wait(RETRY_POLL)


class CommitmentService:
    """The N-ACTION-RQ handler; ``wake`` tells the assembler a study may be complete."""

    def __init__(self, store: CompletionStore, sender: ReportSender, audit: AuditFn,
                 wake: Callable[[], None]) -> None:
        self._store = store
        self._sender = sender
        self._audit = audit
        self._wake = wake

    def register(self, registry: HandlerRegistry) -> None:
        registry.register(N_ACTION_RQ, STORAGE_COMMITMENT_PUSH, self.n_action)

    def n_action(self, req: DimseRequest) -> DimseReply:
        instance = command_uid(req.command, 0x1001)
        action = command_us(req.command, 0x1008)
        ds = req.data_set
        tx = str(ds.get("TransactionUID", "") or "").strip() if ds is not None else ""
        refs = references(ds)
        ref = self._store.ref(tx) if tx else ""
        details: dict[str, object] = {"peer": req.peer, "calling_ae": req.calling_ae,
                                      "transaction": ref}
        follow: EventReport | None = None
        if instance != WELL_KNOWN_INSTANCE:
            reply = DimseReply(STATUS_NO_SUCH_INSTANCE,
                               error_comment="not the Storage Commitment instance")
        elif action != 1:
            reply = DimseReply(STATUS_NO_SUCH_ACTION, error_comment="action type must be 1")
        elif not tx:
            reply = DimseReply(STATUS_INVALID_ARGUMENT, error_comment="no Transaction UID")
        elif refs is None:
            reply = DimseReply(STATUS_INVALID_ARGUMENT,
                               error_comment="empty or malformed Referenced SOP Sequence")
        else:
            try:
                held = self._store.held(inst for _, inst in refs)
                # The set is complete as the box holds it: what is missing was lost
                # in transit and, re-sent, opens a follow-up version of the study.
                self._store.expect(COMMITMENT, list(held), req.calling_ae)
            except sqlite3.Error:
                log.exception("reading the inbox index for a commitment request failed")
                held = None
            if held is None:
                reply = DimseReply(STATUS_PROCESSING_FAILURE, error_comment="inbox index error")
            else:
                committed = [(c, i) for c, i in refs if held.get(i) == c]
                failed = [(c, i, FAILURE_NO_SUCH_OBJECT if i not in held
                           else FAILURE_CLASS_INSTANCE_CONFLICT)
                          for c, i in refs if held.get(i) != c]
                details.update(committed=len(committed), failed=len(failed),
                               conflicts=sum(1 for f in failed
                                             if f[2] == FAILURE_CLASS_INSTANCE_CONFLICT))
                follow = self._report(req.calling_ae, ref,
                                      report_data_set(tx, committed, failed),
                                      1 if not failed else 2)
                reply = DimseReply(STATUS_SUCCESS, follow_up=follow)
                self._wake()
        ok = reply.status == STATUS_SUCCESS
        details["status"] = f"0x{reply.status:04X}"
        if not ok:
            log.warning("storage commitment request from %s (%s) answered 0x%04X: %s",
                        req.peer, req.calling_ae, reply.status, reply.error_comment)
        try:
            self._audit("commitment.request", outcome="success" if ok else "minor_failure",
                        details=details)
        except Exception:  # noqa: BLE001 - the answer does not depend on the audit
            log.exception("auditing a storage commitment request failed")
        return DimseReply(reply.status, error_comment=reply.error_comment,
                          sop_instance=WELL_KNOWN_INSTANCE, follow_up=follow)

    def _report(self, calling_ae: str, ref: str, ds: Dataset, event_type: int) -> EventReport:
        def undelivered() -> None:
            log.info("storage commitment report for %s: association over before it was "
                     "answered; reporting on a new association", calling_ae)
            self._sender.send(calling_ae, event_type, ds, ref)

        def answered(status: int) -> None:
            if status != STATUS_SUCCESS:
                # Refused here (a modality that takes reports only on its own SCP):
                # the known AE's address is the other place PS3.4 J.3.3 allows.
                log.info("storage commitment report for %s refused on the association "
                         "(0x%04X); reporting on a new association", calling_ae, status)
                self._sender.send(calling_ae, event_type, ds, ref)
                return
            try:
                self._audit("commitment.report_sent", outcome="success",
                            details={"calling_ae": calling_ae, "transaction": ref,
                                     "association": "same", "status": f"0x{status:04X}"})
            except Exception:  # noqa: BLE001 - the audit does not change the answer
                log.exception("auditing a storage commitment report failed")

        return EventReport(STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, event_type, ds,
                           undelivered, answered)
