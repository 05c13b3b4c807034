"""Modality Performed Procedure Step SCP (PS3.4 Annex F): N-CREATE and N-SET.

Owns the MPPS handlers.  A modality creates an MPPS IN PROGRESS when it starts a
procedure and sets it COMPLETED or DISCONTINUED at the end, listing the series and
instances it produced (Performed Series Sequence > Referenced Image Sequence and
Referenced Non-Image Composite SOP Instance Sequence).  The box keeps only what
completion needs, in the inbox index (agent.store.completion): the state and the
keyed hashes of the performed instances.  A final state turns them into an
expectation: the study completes as soon as they are all in, instead of after the
quiet period.

DISCONTINUED: the instances it lists are what was acquired before the modality
stopped; the box processes them as soon as they are in, exactly as for COMPLETED,
with completion ``mpps_discontinued`` (a triage result on a partial study is still
worth having: a stroke protocol stopped after the non-contrast series still needs
that series read).  The discontinuation reason code (a coded value, no PHI) is
audited.  A final N-SET that lists no instance (an MPPS that names series only, or
a procedure stopped before any image) leaves the study to its quiet period.

Statuses (PS3.4 F.7.2, PS3.7 10.1.4/10.1.3): N-CREATE 0x0111 (duplicate SOP
instance), 0x0120 (missing attribute: the Type 1 ones completion needs), 0x0106
(invalid attribute value: status other than IN PROGRESS); N-SET 0x0112 (no such
SOP instance), 0x0110 with Error ID 0xA710 and the comment PS3.4 gives
("Performed Procedure Step Object may no longer be updated") once the step is
COMPLETED or DISCONTINUED, 0x0106 for an unknown status value; 0x0110 when the
inbox index cannot be written.  Every request is audited (pseudonymous MPPS
reference, counts; no UID, no patient attribute).
May import pydicom, agent.store.completion and agent.dicom.{admission, dimse,
negotiation, status}.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from agent.dicom.admission import AuditFn
from agent.dicom.dimse import (
    N_CREATE_RQ,
    N_SET_RQ,
    DimseReply,
    DimseRequest,
    HandlerRegistry,
    command_uid,
)
from agent.dicom.status import STATUS_PROCESSING_FAILURE, STATUS_SUCCESS
from agent.store.completion import CompletionStore

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
STATUS_INVALID_ATTRIBUTE_VALUE = 0x0106
STATUS_DUPLICATE_INSTANCE = 0x0111
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_MISSING_ATTRIBUTE = 0x0120
ERROR_ID_NO_LONGER_UPDATABLE = 0xA710
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"
STATES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
# Type 1 at N-CREATE (PS3.4 F.7.2.1) and what completion relies on.
REQUIRED_AT_CREATE = ("PerformedProcedureStepStatus", "ScheduledStepAttributesSequence",
                      "Modality")


def performed_instances(ds: Dataset) -> list[str] | None:
    """The SOP Instance UIDs of the Performed Series Sequence; None when the data
    set does not carry the sequence (an N-SET that leaves it as it was)."""
    if "PerformedSeriesSequence" not in ds:
        return None
    out: list[str] = []
    for series in ds.PerformedSeriesSequence or []:
        for seq in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(seq, []) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if uid:
                    out.append(uid)
    return out


def _study_uid(ds: Dataset) -> str:
    for step in ds.get("ScheduledStepAttributesSequence", []) or []:
        uid = str(step.get("StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    return ""


def _reason_code(ds: Dataset) -> str | None:
    for item in ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence", []) or []:
        return f"{item.get('CodingSchemeDesignator', '')}:{item.get('CodeValue', '')}"
    return None


class MppsService:
    """The N-CREATE and N-SET handlers; ``wake`` tells the assembler (in this process,
    or relayed from a receive worker) that a study may be complete now."""

    def __init__(self, store: CompletionStore, audit: AuditFn, wake: Callable[[], None]) -> None:
        self._store = store
        self._audit = audit
        self._wake = wake

    def register(self, registry: HandlerRegistry) -> None:
        registry.register(N_CREATE_RQ, MPPS_SOP_CLASS, self.n_create)
        registry.register(N_SET_RQ, MPPS_SOP_CLASS, self.n_set)

    # -- N-CREATE ---------------------------------------------------------------------

    def n_create(self, req: DimseRequest) -> DimseReply:
        uid = command_uid(req.command, 0x1000) or str(generate_uid())
        ds = req.data_set or Dataset()
        details: dict[str, object] = {"peer": req.peer, "calling_ae": req.calling_ae,
                                      "mpps": self._store.ref(uid)}
        missing = [k for k in REQUIRED_AT_CREATE if k not in ds or ds[k].value in (None, "")]
        status = str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()
        if missing:
            reply = DimseReply(STATUS_MISSING_ATTRIBUTE,
                               error_comment=f"missing {', '.join(missing)}", sop_instance=uid)
        elif status != "IN PROGRESS":
            reply = DimseReply(STATUS_INVALID_ATTRIBUTE_VALUE,
                               error_comment="N-CREATE status must be IN PROGRESS",
                               sop_instance=uid)
        else:
            try:
                created = self._store.mpps_create(uid, _study_uid(ds), req.calling_ae)
            except sqlite3.Error:
                log.exception("recording an MPPS failed")
                created = None
            if created is None:
                reply = DimseReply(STATUS_PROCESSING_FAILURE, error_comment="inbox index error",
                                   sop_instance=uid)
            elif not created:
                reply = DimseReply(STATUS_DUPLICATE_INSTANCE,
                                   error_comment="MPPS instance exists already", sop_instance=uid)
            else:
                reply = DimseReply(STATUS_SUCCESS, sop_instance=uid)
        details["modality"] = str(ds.get("Modality", "") or "")[:16]
        self._record("mpps.n_create", reply, details)
        return reply

    # -- N-SET ------------------------------------------------------------------------

    def n_set(self, req: DimseRequest) -> DimseReply:
        uid = command_uid(req.command, 0x1001)
        ds = req.data_set or Dataset()
        details: dict[str, object] = {"peer": req.peer, "calling_ae": req.calling_ae,
                                      "mpps": self._store.ref(uid) if uid else ""}
        raw = ds.get("PerformedProcedureStepStatus")
        state = str(raw or "").strip().upper() if raw is not None else None
        performed = performed_instances(ds)
        if not uid:
            reply = DimseReply(STATUS_NO_SUCH_INSTANCE, error_comment="no Requested SOP Instance")
        elif state is not None and state not in STATES:
            reply = DimseReply(STATUS_INVALID_ATTRIBUTE_VALUE,
                               error_comment="status must be IN PROGRESS, COMPLETED or "
                               "DISCONTINUED", sop_instance=uid)
        else:
            try:
                outcome, n = self._store.mpps_set(uid, state or "IN PROGRESS", performed,
                                                  req.calling_ae)
            except sqlite3.Error:
                log.exception("updating an MPPS failed")
                outcome, n = "error", 0
            details["state"] = state or "IN PROGRESS"
            details["instances"] = n
            if outcome == "unknown":
                reply = DimseReply(STATUS_NO_SUCH_INSTANCE, error_comment="no such MPPS instance",
                                   sop_instance=uid)
            elif outcome == "final":
                reply = DimseReply(STATUS_PROCESSING_FAILURE, error_comment=NO_LONGER_UPDATABLE,
                                   error_id=ERROR_ID_NO_LONGER_UPDATABLE, sop_instance=uid)
            elif outcome == "error":
                reply = DimseReply(STATUS_PROCESSING_FAILURE, error_comment="inbox index error",
                                   sop_instance=uid)
            else:
                reply = DimseReply(STATUS_SUCCESS, sop_instance=uid)
                if state == "DISCONTINUED":
                    details["reason_code"] = _reason_code(ds) or ""
                if state in ("COMPLETED", "DISCONTINUED"):
                    if n == 0:
                        log.info("MPPS %s %s from %s lists no instance: the study completes "
                                 "by its quiet period", details["mpps"], state, req.calling_ae)
                    self._wake()
        self._record("mpps.n_set", reply, details)
        return reply

    def _record(self, event: str, reply: DimseReply, details: dict[str, object]) -> None:
        ok = reply.status == STATUS_SUCCESS
        details["status"] = f"0x{reply.status:04X}"
        if not ok:
            log.warning("%s from %s (%s) answered 0x%04X: %s", event, details["peer"],
                        details["calling_ae"], reply.status, reply.error_comment)
        try:
            self._audit(event, outcome="success" if ok else "minor_failure", details=details)
        except Exception:  # noqa: BLE001 - the answer does not depend on the audit
            log.exception("auditing %s failed", event)
