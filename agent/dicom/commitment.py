"""Storage Commitment Push Model reports that a PACS sends to this node (PS3.4 J.3.3).

Owns: the N-EVENT-REPORT-RQ handler for Storage Commitment Push Model.  A PACS
answers our N-ACTION on its own new association to our DICOM port (as Orthanc
does); the event information (Transaction UID, Referenced SOP Sequence, Failed SOP
Sequence) is parsed here and handed to the daemon through ``ReportFn`` (the
results delivery's ``commitment_result``; the node does not import agent.results).

Statuses (PS3.7 10.1.1.1.8): 0x0000 when the report was taken; 0x0113 (No such
event type) for an event type other than 1 or 2; 0x0112 (No such SOP Instance)
when the Affected SOP Instance is not the class's well-known instance; 0x0115
(Invalid argument value) when the event information has no Transaction UID;
0x0110 (Processing failure) when the daemon did not take it: a transaction not
known to this box, or results delivery not running (the entry point does not tell
the two apart; either way the PACS keeps its record and may report again).
May import pydicom, agent.dicom.dimse, agent.dicom.negotiation and agent.dicom.status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset

from agent.dicom.admission import AuditFn
from agent.dicom.dimse import (
    N_EVENT_REPORT_RQ,
    DimseReply,
    DimseRequest,
    HandlerRegistry,
    command_uid,
    command_us,
)
from agent.dicom.negotiation import STORAGE_COMMITMENT_PUSH
from agent.dicom.status import STATUS_PROCESSING_FAILURE, STATUS_SUCCESS

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT = 0x0115

# (transaction UID, committed SOP Instance UIDs, failed ones) -> taken; never raises
ReportFn = Callable[[str, list[str], list[str]], bool]
# The same, answered later: ``answer(taken)`` is called once, from any thread (the
# receive pool hands reports on this way, so that a slow delivery database holds up
# only the PACS that reported, never the dispatcher); never raises.
ReportLaterFn = Callable[[str, list[str], list[str], Callable[[bool], None]], None]


def parse_event(ds: Dataset | None) -> tuple[str, list[str], list[str]]:
    """(transaction UID, committed SOP Instance UIDs, failed ones) of a report."""
    if ds is None:
        return "", [], []
    tx = str(ds.get("TransactionUID", "") or "").strip()
    ok = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", []) or []
          if "ReferencedSOPInstanceUID" in i]
    failed = [str(i.ReferencedSOPInstanceUID) for i in ds.get("FailedSOPSequence", []) or []
              if "ReferencedSOPInstanceUID" in i]
    return tx, ok, failed


class CommitmentReports:
    """The N-EVENT-REPORT-RQ handler; ``on_report`` is the daemon's entry point."""

    def __init__(self, on_report: ReportFn, audit: AuditFn) -> None:
        self._on_report = on_report
        self._audit = audit

    def register(self, registry: HandlerRegistry) -> None:
        registry.register(N_EVENT_REPORT_RQ, STORAGE_COMMITMENT_PUSH, self.handle)

    def handle(self, req: DimseRequest) -> DimseReply:
        event_type = command_us(req.command, 0x1002)
        instance = command_uid(req.command, 0x1000)
        tx, ok, failed = parse_event(req.data_set)
        if event_type not in (1, 2):
            reply = DimseReply(STATUS_NO_SUCH_EVENT_TYPE, error_comment="event type not 1 or 2")
        elif instance != WELL_KNOWN_INSTANCE:
            reply = DimseReply(STATUS_NO_SUCH_INSTANCE,
                               error_comment="not the Storage Commitment instance")
        elif not tx:
            reply = DimseReply(STATUS_INVALID_ARGUMENT, error_comment="no Transaction UID")
        elif self._on_report(tx, ok, failed):
            reply = DimseReply(STATUS_SUCCESS)
        else:
            reply = DimseReply(STATUS_PROCESSING_FAILURE,
                               error_comment="transaction not known to this box")
        taken = reply.status == STATUS_SUCCESS
        if not taken:
            log.warning("storage commitment report from %s (%s) answered 0x%04X: %s",
                        req.peer, req.calling_ae, reply.status, reply.error_comment)
        try:
            self._audit("commitment.report",
                        outcome="success" if taken else "minor_failure",
                        details={"peer": req.peer, "calling_ae": req.calling_ae,
                                 "transaction_uid": tx, "event_type": event_type,
                                 "committed": len(ok), "failed": len(failed),
                                 "status": f"0x{reply.status:04X}"})
        except Exception:  # noqa: BLE001 - the answer does not depend on the audit
            log.exception("auditing a storage commitment report failed")
        return DimseReply(reply.status, error_comment=reply.error_comment,
                          sop_instance=instance or None)
