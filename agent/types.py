"""The data that flows between pipeline stages.

receive -> ReceivedInstance -> assemble -> Study -> deid -> DeidentifiedStudy
-> infer -> InferenceResult -> outbox -> OutboxMessage -> publish

The PHI boundary is the step from Study to DeidentifiedStudy: a Study refers to
encrypted original instances in the inbox; a DeidentifiedStudy and everything
after it carries only pseudonyms and de-identified datasets.  The original
identifier values needed by the egress guard travel separately, as a
``PhiFingerprint`` that never leaves the box and is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset

StudyCompletion = Literal["quiet", "max_instances", "max_bytes", "max_age", "shutdown",
                          "expected_count", "mpps", "mpps_discontinued", "commitment"]


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance made durable in the inbox (encrypted, fsynced, indexed)."""

    study_key: str  # keyed hash of the StudyInstanceUID: a pseudonymous handle
    instance_key: str  # keyed hash of the SOPInstanceUID
    path: Path  # encrypted file in the inbox (name derived from keys, never a UID)
    size: int  # plaintext bytes of the stored Part 10 file
    sha256: str  # of the plaintext; "" unless its SOP Instance UID was received twice
    sop_class_uid: str  # a public standard identifier, not PHI
    transfer_syntax: str
    calling_ae: str
    peer: str
    received_at: float


@dataclass(frozen=True)
class Study:
    """A completed study version ready for de-identification."""

    study_id: int  # local row id in the inbox index
    study_key: str
    version: int  # 1 for the first completion; follow-ups count up
    instances: tuple[ReceivedInstance, ...]
    completion: StudyCompletion
    first_received_at: float
    last_received_at: float
    completed_at: float

    @property
    def ref(self) -> str:
        """A log-safe reference: the pseudonymous key plus version."""
        return f"{self.study_key[:12]}v{self.version}"


@dataclass(frozen=True)
class QuarantineNote:
    """Why one instance was not processed.

    ``reason`` is for the box (quarantine store, local audit, log); a result publishes
    only ``code`` and its fixed description (agent/uplink/vocabulary.py QUARANTINE).
    """

    instance_key: str
    reason: str
    code: str = "quarantined"


@dataclass(frozen=True)
class ModelFailure:
    """Why a model gave no output for a study.

    ``detail`` (which may quote a library's message) stays on the box; a result
    publishes the model, ``code`` with its fixed description (agent/uplink/vocabulary.py
    FAILURE) and, for undecodable pixels, the standard keyword of the transfer syntax.
    """

    model: str  # "" when the engine as a whole failed
    version: str
    code: str
    detail: str
    transfer_syntax: str = ""  # a standard keyword such as "RLELossless", or ""

    def __str__(self) -> str:
        who = f"model {self.model} {self.version}" if self.model else "inference"
        return f"{who} failed: {self.detail}"


@dataclass(frozen=True)
class PhiFingerprint:
    """Original identifying values of one study, kept only for the egress guard.

    It is held in memory and in the encrypted outbox, never logged or published.
    """

    values: frozenset[str] = field(repr=False, default=frozenset())

    def __repr__(self) -> str:
        return f"PhiFingerprint(<{len(self.values)} values>)"


@dataclass(frozen=True)
class DeidentifiedStudy:
    """A study after the PHI boundary: pseudonyms and de-identified data only."""

    study_ref: str  # pseudonymous study id (keyed)
    patient_ref: str  # pseudonymous patient id (keyed)
    version: int
    instances: tuple[Dataset, ...]
    quarantined: tuple[QuarantineNote, ...]
    failed: tuple[QuarantineNote, ...]
    method: str  # e.g. "PS3.15 E.1-1 strip (2024b)"
    options: tuple[str, ...]
    received_instances: int
    first_received_at: float
    last_received_at: float


@dataclass(frozen=True)
class ModelOutput:
    """What one model concluded about one study."""

    name: str
    version: str
    sha256: str
    labels: dict[str, float]  # per-label probability
    finding: str
    confidence: float
    uncertainty: float
    needs_review: bool
    review_reasons: tuple[str, ...]
    explanation: dict[str, Any]
    timings_ms: dict[str, float]
    instances_used: int
    # Positions (in DeidentifiedStudy.instances) of the instances the model read: the
    # result objects written back into the study reference their originals.  Box-local,
    # not part of the published result.
    sources: tuple[int, ...] = ()
    # The subgroup attributes the manifest names (drift.subgroup_attributes), as read
    # from the de-identified instance: quasi-identifiers for the review store
    # (agent/review/), box-local and never published.
    subgroup: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class InferenceResult:
    study_ref: str
    patient_ref: str
    version: int
    status: Literal["ok", "no_applicable_model", "failed", "all_quarantined"]
    models: tuple[ModelOutput, ...]
    failures: tuple[ModelFailure, ...]
    instances_received: int
    instances_processed: int
    quarantined: tuple[QuarantineNote, ...]
    deid_method: str
    deid_options: tuple[str, ...]
    latency_ms: float


Channel = Literal["results", "telemetry", "audit", "status", "jobs"]


@dataclass(frozen=True)
class OutboxMessage:
    """A CloudEvents message waiting in the encrypted outbox."""

    seq: int
    event_id: str
    channel: Channel
    payload: bytes  # the CloudEvents JSON, exactly as it will be published
    created_at: float
    guard: PhiFingerprint = PhiFingerprint()
