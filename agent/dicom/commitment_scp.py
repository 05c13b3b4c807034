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
audited (``commitment.report_undeliverable``); the modality may ask again.  One
attempt, bounded by ``[dicom] commitment_report_timeout``.

Statuses of the N-ACTION-RSP: 0x0000; 0x0112 when the Requested SOP Instance is
not the class's well-known instance; 0x0123 (no such action) for an Action Type
other than 1; 0x0115 (invalid argument value) without a Transaction UID or with
an empty or malformed Referenced SOP Sequence; 0x0110 when the index cannot be
read.  Audited: ``commitment.request`` (counts, pseudonymous transaction
reference) and ``commitment.report_sent``.
May import pydicom, pynetdicom, agent.config, agent.store.completion and
agent.dicom.{admission, commitment, dimse, negotiation, status}.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
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
)
from agent.dicom.negotiation import STORAGE_COMMITMENT_PUSH
from agent.dicom.status import STATUS_PROCESSING_FAILURE, STATUS_SUCCESS
from agent.store.completion import COMMITMENT, CompletionStore

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


class ReportSender:
    """Sends a report on a new association to a known AE (a thread each; never raises)."""

    def __init__(self, settings: DicomSettings, audit: AuditFn) -> None:
        self._ae_title = settings.ae_title
        self._known: dict[str, KnownAE] = {k.ae_title: k for k in settings.known_aes}
        self._timeout = settings.commitment_report_timeout
        self._audit = audit

    def send(self, calling_ae: str, event_type: int, ds: Dataset, ref: str) -> None:
        threading.Thread(target=self._send, args=(calling_ae, event_type, ds, ref),
                         name="commitment-report", daemon=True).start()

    def _send(self, calling_ae: str, event_type: int, ds: Dataset, ref: str) -> None:
        known = self._known.get(calling_ae)
        if known is None:
            log.error("storage commitment report for %s not delivered: the requestor released "
                      "the association and its AE title is not in [[dicom.known_aes]] (add "
                      "ae_title, host and port to report on a new association)", calling_ae)
            self._audited("commitment.report_undeliverable", calling_ae, ref, "serious_failure",
                          {"why": "unknown_ae"})  # audit details are tokens, not text
            return
        try:
            status = self._associate_and_send(known, event_type, ds)
        except Exception as exc:  # noqa: BLE001 - a peer we cannot reach is logged, not raised
            log.exception("storage commitment report to %s failed", calling_ae)
            status, why = None, type(exc).__name__
        else:
            why = "" if status is not None else "association_refused_or_no_answer"
        ok = status == STATUS_SUCCESS
        if not ok:
            log.error("storage commitment report to %s (%s:%d) not delivered: %s", calling_ae,
                      known.host, known.port, why or f"status 0x{status or 0:04X}")
        self._audited("commitment.report_sent" if ok else "commitment.report_undeliverable",
                      calling_ae, ref, "success" if ok else "serious_failure",
                      {"association": "new", "status": "" if status is None
                       else f"0x{status:04X}", "why": why})

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
