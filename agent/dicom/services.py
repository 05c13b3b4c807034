"""The completion services the node provides besides storage: MPPS SCP and Storage
Commitment Push Model SCP, registered on a DIMSE handler registry the same way in
the in-process node and in each receive worker.  May import agent.config,
agent.store.completion and agent.dicom.{admission, dimse, mpps, commitment_scp,
negotiation}.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import DicomSettings
from agent.dicom.admission import AuditFn
from agent.dicom.commitment_scp import CommitmentService, ReportRetries, ReportSender
from agent.dicom.dimse import N_ACTION_RQ, N_CREATE_RQ, HandlerRegistry
from agent.dicom.mpps import MPPS_SOP_CLASS, MppsService
from agent.dicom.negotiation import STORAGE_COMMITMENT_PUSH
from agent.store.completion import CompletionStore


def register_completion(registry: HandlerRegistry, settings: DicomSettings,
                        store: CompletionStore, audit: AuditFn,
                        wake: Callable[[], None]) -> None:
    """``wake``: a study may be complete now (the assembler looks at once).  A
    registry that brings its own handler for either keeps it (tests script peers so)."""
    if registry.find(N_CREATE_RQ, MPPS_SOP_CLASS) is None:
        MppsService(store, audit, wake).register(registry)
    if registry.find(N_ACTION_RQ, STORAGE_COMMITMENT_PUSH) is None:
        CommitmentService(store, ReportSender(settings, audit, store.reports), audit,
                          wake).register(registry)


def report_retries(settings: DicomSettings, store: CompletionStore,
                   audit: AuditFn) -> ReportRetries:
    """The retry loop of Storage Commitment reports still owed: one per daemon, in
    its main process (the in-process node, or the receive pool's dispatcher side)."""
    return ReportRetries(ReportSender(settings, audit, store.reports), store.reports)
