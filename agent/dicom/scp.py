"""Store decisions of the DICOM node: who may associate, what is stored, what is audited.

Owns: ``StoreDecisions`` (the acceptor's owner, agent.dicom.acceptor.Owner):
the allowlist and TLS subject rules, shutdown and intake holds, the
association rate and bounds (agent.dicom.admission, or a ``Verdict`` from the
main process in a receive worker), the capacity check, counters; per
association a ``StoreService`` for the DIMSE layer: the sink of a C-STORE
(agent.dicom.sink) and the commit into the inbox that decides its status
(Success only once the instance is durable); the audit records of all of it,
and ``ReceiptDrainer``, which moves journaled receipt records to the audit log.
Every failure maps to a standard status or rejection and never raises into the
acceptor.  Nothing identifying is logged: instances are referred to by keyed
hashes.  May import agent.store.inbox, agent.config and agent.dicom.{admission,
acceptor, dimse, sink, status, transport}.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.config import DicomSettings
from agent.dicom.acceptor import (
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    AssociationRequest,
    Rejection,
)
from agent.dicom.admission import (
    AuditFn,
    AuditThrottle,
    PeerLimiter,
    Verdict,
    association_limit,
    audit_refused,
)
from agent.dicom.dimse import Sink
from agent.dicom.sink import PREAMBLE, InstanceSink, MetaFields
from agent.dicom.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    Refused,
)
from agent.dicom.transport import same_subject
from agent.errors import OutOfResources, StorageError
from agent.store.inbox import Inbox, StoreReceipt

log = logging.getLogger(__name__)

# How often journaled receipt records move from the inbox to the audit log.
RECEIPT_DRAIN_SECONDS = 0.25

Admission = Callable[[str, int], Verdict]


class ReceiptLog(Protocol):
    """Where journaled receipt audit records go (``AuditLog.ingest``)."""

    def ingest(self, journal: str,
               records: Sequence[tuple[int, int, Mapping[str, object]]]) -> int: ...


@dataclass
class ReceiveCounters:
    associations_accepted: int = 0
    associations_rejected: int = 0
    connections_refused: int = 0
    rate_limited: int = 0
    tls_failures: int = 0
    instances_stored: int = 0
    instances_duplicate: int = 0
    instances_failed: int = 0
    out_of_resources: int = 0
    active: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)


# -- journaled receipt records -------------------------------------------------------


class ReceiptDrainer:
    """Moves audit records journaled in the inbox to the audit log, in batches.

    ``eager``: delete drained rows at once instead of folding the delete into
    the next instance's transaction (when other processes do the journaling).
    """

    def __init__(self, inbox: Inbox, receipts: ReceiptLog, *, eager: bool = False) -> None:
        self.inbox = inbox
        self.receipts = receipts
        self.eager = eager
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicom-receipts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self.wake.set()
            self._thread.join(timeout=30)
            self._thread = None

    def drain(self, *, idle: bool = False) -> int:
        """Move journaled records to the audit log; returns how many."""
        moved = 0
        while True:
            batch = self.inbox.pending_receipts(1000)
            if not batch:
                break
            upto = self.receipts.ingest("inbox", batch)
            self.inbox.drop_receipts(upto, now=self.eager)
            moved += len(batch)
            if len(batch) < 1000:
                break
        if idle or moved == 0:
            self.inbox.drop_receipts(0, now=True)
        return moved

    def _loop(self) -> None:
        # Leftovers of a crash are drained first (the audit log dedupes by id).
        failures = 0
        while True:
            stopping = self._stop.is_set()
            try:
                self.drain(idle=stopping)
                failures = 0
            except Exception:  # noqa: BLE001 - the journal keeps them; retried next round
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.exception("moving receipt records to the audit log failed (%d)", failures)
            if stopping:
                return
            self.wake.wait(RECEIPT_DRAIN_SECONDS)
            self.wake.clear()



# -- the decisions -------------------------------------------------------------------------


class StoreDecisions:
    """The owner of every association of one node (in-process, or one receive worker)."""

    def __init__(
        self,
        settings: DicomSettings,
        inbox: Inbox,
        *,
        audit: AuditFn,
        limiter: PeerLimiter,
        on_stored: Callable[[StoreReceipt], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
        journal_receipts: bool = False,
        admission: Admission | None = None,
        on_associated: Callable[[str, int], None] | None = None,
        on_ended: Callable[[str, int], None] | None = None,
        hold: Callable[[], str | None] | None = None,
    ) -> None:
        """``journal_receipts``: the audit record of each stored instance is
        journaled in the inbox's index transaction (and moved to the audit log
        in batches by a ``ReceiptDrainer``) instead of a synchronous ``audit``
        call (a third fsync) before Success.  ``admission`` replaces the per-peer
        rate and association-count checks, for a worker whose connections were
        counted by the main process at accept.  ``on_associated(addr, port)``: the
        connection now carries an association (no longer evictable);
        ``on_ended(addr, port)``: its association is over.  ``hold``: asked before
        an association and a C-STORE; a reason refuses them (0xA700), e.g.
        ``AuditLog.intake_hold`` while the audit trail cannot record."""
        self.s = settings
        self.inbox = inbox
        self.audit = audit
        self.limiter = limiter
        self.on_stored = on_stored or (lambda _r: None)
        self.accepting = accepting
        self.journal_receipts = journal_receipts
        self.admission = admission
        self.on_associated = on_associated
        self.on_ended = on_ended
        self.hold = hold
        self.counters = ReceiveCounters()
        self.lock = threading.Lock()
        self._refusals = AuditThrottle()

    def snapshot(self) -> ReceiveCounters:
        """A copy of the counters, taken under their lock."""
        with self.lock:
            c = self.counters
            return ReceiveCounters(**{**c.__dict__, "by_peer": dict(c.by_peer)})

    # -- associations ---------------------------------------------------------------

    def refused_connection(self, address: str, why: str) -> None:
        """A connection closed before any association (limits, TLS, not DICOM)."""
        with self.lock:
            self.counters.connections_refused += 1
            if why.startswith("TLS"):
                self.counters.tls_failures += 1
        audit_refused(self.audit, self._refusals, address, why)

    def rejected(self, rq: AssociationRequest, r: Rejection) -> None:
        with self.lock:
            self.counters.associations_rejected += 1
        self.audit("association.rejected", outcome="minor_failure", source=rq.address,
                   details={"calling_ae": rq.calling_ae, "reason": r.why,
                            "result": r.result, "source": r.source, "diagnostic": r.reason})
        log.warning("rejected association from %s (%s): %s", rq.address, rq.calling_ae, r.why)

    def _allowed(self, rq: AssociationRequest) -> bool:
        subject_text = rq.subject.rfc4514_string() if rq.subject is not None else None
        for rule in self.s.peers:
            wanted = rule.certificate_subject
            if wanted is not None and same_subject(wanted, rq.subject):
                if rule.allows(rq.calling_ae, rq.address, wanted):
                    return True
            elif rule.allows(rq.calling_ae, rq.address, subject_text):
                return True
        return False

    def admit(self, rq: AssociationRequest) -> Rejection | None:
        try:
            return self._admit(rq)
        except Exception:  # noqa: BLE001 - never raise into the acceptor
            log.exception("association check failed; rejecting")
            return Rejection(2, 1, 1, "internal error while checking the association")

    def _admit(self, rq: AssociationRequest) -> Rejection | None:
        addr = rq.address
        if not self._allowed(rq):
            return Rejection(1, 1, 3, "calling AE title/address not allowed")
        if not self.accepting():
            return Rejection(2, 3, 1, "not accepting (shutting down)")
        held = self.hold() if self.hold is not None else None
        if held is not None:
            return Rejection(2, 3, 2, held)
        verdict = self.admission(addr, rq.port) if self.admission is not None else None
        if not (verdict.rate_ok if verdict is not None
                else self.limiter.allow_association(addr)):
            with self.lock:
                self.counters.rate_limited += 1
            return Rejection(2, 3, 1, "association rate limit for this peer")
        try:
            self.inbox.check_capacity()
        except OutOfResources as exc:
            with self.lock:
                self.counters.out_of_resources += 1
            return Rejection(2, 3, 2, f"out of resources: {str(exc).splitlines()[0]}")
        with self.lock:
            per_peer = self.counters.by_peer.get(addr, 0)
            why = verdict.limit if verdict is not None else association_limit(
                per_peer, self.counters.active, per_peer=self.s.max_associations_per_peer,
                max_total=self.s.max_associations)
            if why is None:
                self.counters.by_peer[addr] = per_peer + 1
                self.counters.active += 1
                self.counters.associations_accepted += 1
        if why is not None:
            return Rejection(2, 3, 2, why)
        if self.on_associated is not None:
            self.on_associated(addr, rq.port)  # no longer evictable
        self.audit("association.accepted", source=addr, details={
            "calling_ae": rq.calling_ae, "tls": rq.subject is not None})
        return None

    def ended(self, rq: AssociationRequest, *, admitted: bool) -> None:
        if self.on_ended is not None:
            self.on_ended(rq.address, rq.port)
        if not admitted:
            return
        with self.lock:
            self.counters.active -= 1
            n = self.counters.by_peer.get(rq.address, 1) - 1
            if n <= 0:
                self.counters.by_peer.pop(rq.address, None)
            else:
                self.counters.by_peer[rq.address] = n

    def store_service(self, rq: AssociationRequest) -> _AssociationStore:
        return _AssociationStore(self, rq.calling_ae, rq.address)

    # -- instances ---------------------------------------------------------------------

    def new_sink(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> InstanceSink:
        sink = InstanceSink(self.inbox, self.s.max_instance_bytes)
        sink.write(PREAMBLE)
        sink.write_meta(MetaFields(sop_class, sop_instance, transfer_syntax,
                                   IMPLEMENTATION_UID, IMPLEMENTATION_VERSION))
        return sink

    def store_streamed(self, sink: object, sop_class: str, sop_uid: str, ae_title: str,
                       addr: str) -> int:
        """Commit an instance streamed into ``sink``; the C-STORE status (never raises).

        Called by the DIMSE layer of every association, in its thread."""
        try:
            if not isinstance(sink, InstanceSink):
                raise Refused(STATUS_PROCESSING_FAILURE, "data set was not streamed")
            if not sop_uid or len(sop_uid) > 64:
                raise Refused(STATUS_CANNOT_UNDERSTAND, "no valid Affected SOP Instance UID")
            pending, header, tsyntax = sink.finish()
            try:
                held = self.hold() if self.hold is not None else None
                if held is not None:
                    raise Refused(STATUS_OUT_OF_RESOURCES, held)
                if header.sop_class is not None and header.sop_class != sop_class:
                    raise Refused(STATUS_DATASET_MISMATCH,
                                  "data set SOP class differs from the C-STORE request")
                receipt = self.inbox.commit(
                    pending, sop_uid=sop_uid, sop_class=sop_class, transfer_syntax=tsyntax,
                    calling_ae=ae_title, peer=addr, series_uid=header.series_uid,
                    audit=_receipt_record(addr, ae_title) if self.journal_receipts else None)
            finally:
                pending.abort()
        except Refused as exc:
            if exc.status == STATUS_OUT_OF_RESOURCES:
                with self.lock:
                    self.counters.out_of_resources += 1
            return self.refuse_instance(exc.status, exc.reason, addr, ae_title)
        except OutOfResources as exc:
            with self.lock:
                self.counters.out_of_resources += 1
            return self.refuse_instance(STATUS_OUT_OF_RESOURCES, str(exc).splitlines()[0], addr,
                                        ae_title)
        except StorageError as exc:
            return self.refuse_instance(STATUS_OUT_OF_RESOURCES, f"storage failed: {exc}", addr,
                                        ae_title)
        except Exception as exc:  # noqa: BLE001 - never raise into the acceptor
            log.exception("C-STORE handler failed")
            return self.refuse_instance(STATUS_PROCESSING_FAILURE,
                                        f"internal error ({type(exc).__name__})", addr, ae_title)
        ref = receipt.instance.instance_key[:12]
        with self.lock:
            if receipt.outcome == "duplicate":
                self.counters.instances_duplicate += 1
            else:
                self.counters.instances_stored += 1
        if not self.journal_receipts:
            rec = _receipt_record(addr, ae_title)(receipt)
            self.audit(rec["event"], source=addr, details=rec["details"])
        log.info("stored instance %s of study %s v%d (%s) from %s",
                 ref, receipt.instance.study_key[:12], receipt.study_version, receipt.outcome,
                 ae_title)
        try:
            self.on_stored(receipt)
        except Exception:  # noqa: BLE001
            log.exception("on_stored hook failed")
        return STATUS_SUCCESS

    def aborted(self, why: str, addr: str, ae_title: str) -> None:
        """A C-STORE cut short by the end of its association."""
        with self.lock:
            self.counters.instances_failed += 1
        self.audit("instance.received", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "status": "aborted",
                            "reason": f"association aborted: {why}"})

    def refuse_instance(self, status: int, why: str, addr: str, ae_title: str) -> int:
        """Count, audit and log an instance answered with failure ``status``."""
        with self.lock:
            self.counters.instances_failed += 1
        self.audit("instance.received", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "status": f"0x{status:04X}", "reason": why})
        log.warning("C-STORE from %s (%s) answered 0x%04X: %s", addr, ae_title, status, why)
        return status



class _AssociationStore:
    """The store service of one association (agent.dicom.dimse.StoreService)."""

    def __init__(self, owner: StoreDecisions, calling_ae: str, peer: str) -> None:
        self._owner = owner
        self.calling_ae = calling_ae
        self.peer = peer

    def begin(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> Sink:
        return self._owner.new_sink(sop_class, sop_instance, transfer_syntax)

    def finish(self, sink: Sink, sop_class: str, sop_instance: str) -> int:
        return self._owner.store_streamed(sink, sop_class, sop_instance, self.calling_ae,
                                          self.peer)

    def refused(self, status: int, why: str) -> int:
        return self._owner.refuse_instance(status, why, self.peer, self.calling_ae)

    def aborted(self, why: str) -> None:
        self._owner.aborted(why, self.peer, self.calling_ae)


def _receipt_record(addr: str, ae_title: str) -> Callable[[StoreReceipt], dict[str, Any]]:
    """The audit record of a stored instance (pseudonymous references only)."""

    def build(receipt: StoreReceipt) -> dict[str, Any]:
        event = {"stored": "instance.received", "duplicate": "instance.duplicate",
                 "conflict": "instance.conflict"}[receipt.outcome]
        return {"event": event, "outcome": "success", "source": addr,
                "details": {"calling_ae": ae_title, "instance": receipt.instance.instance_key[:12],
                            "study": receipt.instance.study_key[:12],
                            "version": receipt.study_version, "bytes": receipt.instance.size}}

    return build
