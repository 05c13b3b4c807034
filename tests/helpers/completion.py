"""A modality's completion messages, sent with pynetdicom: MPPS (N-CREATE, N-SET) and
Storage Commitment Push Model requests, plus a modality that listens for the report
on a new association.  Used by tests/receive/test_completion.py and the bench."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)

MODALITY_AE = "MODALITY"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def mpps_create_ds(study_uid: str, *, status: str = "IN PROGRESS",
                   drop: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    step = Dataset()
    step.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    ds.PerformedProcedureStepID = "1"
    for k in drop:
        delattr(ds, k)
    return ds


def mpps_final_ds(status: str, files: list[Path], *, reason: str | None = None) -> Dataset:
    """An N-SET data set moving the step to ``status`` with its Performed Series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    series: dict[str, list[Dataset]] = {}
    for f in files:
        inst = pydicom.dcmread(f, stop_before_pixels=True)
        ref = Dataset()
        ref.ReferencedSOPClassUID = inst.SOPClassUID
        ref.ReferencedSOPInstanceUID = inst.SOPInstanceUID
        series.setdefault(str(inst.SeriesInstanceUID), []).append(ref)
    ds.PerformedSeriesSequence = []
    for uid, refs in series.items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ReferencedImageSequence = refs
        ds.PerformedSeriesSequence.append(item)
    if reason is not None:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = reason, "DCM"
        code.CodeMeaning = "reason"
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [code]
    return ds


@dataclass
class Modality:
    """One association to the box with the MPPS and Storage Commitment contexts."""

    port: int
    called: str = "EDGE_AGENT"
    aet: str = MODALITY_AE
    reports: list[Dataset] = field(default_factory=list)
    report_types: list[int] = field(default_factory=list)
    got_report: threading.Event = field(default_factory=threading.Event)
    # What it answers a report on this association with (0x0110: it takes reports
    # only on its own SCP, as modalities that release at once do).
    report_status: int = 0x0000

    def __post_init__(self) -> None:
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(StorageCommitmentPushModel)
        self.assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called,
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)])
        assert self.assoc.is_established, "the box refused the MPPS/commitment association"

    def _report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.append(event.event_information)
        self.report_types.append(int(event.event_type))
        self.got_report.set()
        return self.report_status, None

    def n_create(self, ds: Dataset, uid: str | None) -> Dataset:
        status, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        assert status is not None, "no N-CREATE response"
        return status

    def n_set(self, ds: Dataset, uid: str) -> Dataset:
        status, _ = self.assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        assert status is not None, "no N-SET response"
        return status

    def commit(self, refs: list[tuple[str, str]], tx: str | None = None) -> tuple[str, Dataset]:
        tx = tx or str(generate_uid())
        ds = Dataset()
        ds.TransactionUID = tx
        ds.ReferencedSOPSequence = []
        for cls, inst in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
            ds.ReferencedSOPSequence.append(item)
        status, _ = self.assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status is not None, "no N-ACTION response"
        return tx, status

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


class ReportListener:
    """The modality's own SCP: takes a Storage Commitment report on a new association."""

    def __init__(self, port: int, aet: str = MODALITY_AE) -> None:
        self.port = port
        self.reports: list[Dataset] = []
        self.got = threading.Event()
        ae = AE(ae_title=aet)
        # The box asks for the SCP role of the class (it reports); accept that.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)])

    def _report(self, event: evt.Event) -> tuple[int, None]:
        self.reports.append(event.event_information)
        self.got.set()
        return 0x0000, None

    def stop(self) -> None:
        self._server.shutdown()


def refs_of(files: list[Path]) -> list[tuple[str, str]]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out


def completions(state: Path) -> list[Any]:
    """The completion reason of every study version in a box's inbox index."""
    db = sqlite3.connect(state / "inbox" / "index.db")
    try:
        return [r[0] for r in db.execute("SELECT completion FROM studies ORDER BY id")]
    finally:
        db.close()
