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

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydicom.dataset import Dataset

if TYPE_CHECKING:
    # Only for SegMask's signatures: receive workers import this module and run
    # without numpy (agent/dicom/worker.py keeps pixel libraries out of them).
    import numpy as np
    import numpy.typing as npt

StudyCompletion = Literal["quiet", "max_instances", "max_bytes", "max_age", "shutdown",
                          "expected_count", "expected_series", "mpps", "mpps_discontinued", "commitment"]


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


# A mask larger than this, compressed, is not kept (agent/infer/engine.py): a SEG of one
# image never needs more (a 4096 x 4096 mask is 2 MiB bit-packed, far less compressed).
MASK_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SegMask:
    """A mask model's segment on one source image, at that image's grid: bit-packed
    (row-major, numpy.packbits) and zlib-compressed.  Box-local like ``sources``: it
    goes into the encrypted result link and a DICOM SEG, never into the published
    result (which carries only its area fraction).  Its repr shows no pixels."""

    index: int  # position in DeidentifiedStudy.instances
    frame: int  # 0-based frame of that instance
    rows: int
    cols: int
    bits: bytes = field(repr=False)
    label: str = "lesion"
    # Segmented property category and type: (code value, coding scheme, meaning)
    category: tuple[str, str, str] = ("49755003", "SCT", "Morphologically abnormal structure")
    type: tuple[str, str, str] = ("52988006", "SCT", "Lesion")

    @staticmethod
    def pack(mask: npt.NDArray[np.bool_]) -> bytes:
        import numpy as np

        return zlib.compress(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes(), 9)

    def pixels(self) -> npt.NDArray[np.bool_]:
        """The (rows, cols) boolean mask; ValueError when the bits do not make one."""
        import numpy as np

        n = self.rows * self.cols
        inflate = zlib.decompressobj()
        raw = inflate.decompress(self.bits, (n + 7) // 8 + 1)  # bounded: no inflation bomb
        if len(raw) != (n + 7) // 8 or inflate.unconsumed_tail:
            raise ValueError(f"mask bits do not hold {self.rows}x{self.cols} pixels")
        flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n)
        return np.asarray(flat.reshape(self.rows, self.cols), dtype=bool)


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
    # The subgroup attributes the manifest names (drift.subgroup_attributes): read from
    # the de-identified instance, plus the patient characteristics (age band, sex) the
    # pipeline captured coarse before de-identification (agent/subgroups.py):
    # quasi-identifiers for the review store (agent/review/), box-local, never published.
    subgroup: tuple[tuple[str, str], ...] = ()
    # A mask model's segment on the top image (manifest [mask]): box-local, for the
    # DICOM SEG (agent/results/seg.py); never published.
    mask: SegMask | None = None


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
