"""Storage Commitment (push model) against a real Orthanc, and SEG delivery.

Orthanc answers N-ACTION and sends the N-EVENT-REPORT on a NEW association to the
AE it knows as the requester (DicomModalities).  The daemon's DICOM acceptor is being
rewritten in agent/dicom/ and will hand such a report to
``agent.results.delivery.commitment_result``; until it does, this test plays that
acceptor with a pynetdicom SCP that calls the same function, and drives the real
delivery machinery (queue, sender, planner, link store) in-process."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from agent import config
from agent.crypto import KeyEncryptionKey, random_key
from agent.infer import InferenceEngine
from agent.infer.manifest import MaskOutput
from agent.results import delivery as delivery_mod
from agent.results.build import Mask, build_all
from agent.results.delivery import Delivery
from agent.results.queue import DeliveryQueue, QueuedObject
from agent.results.scu import parse_report
from agent.uplink.outbox import Outbox
from tests.helpers import Box, free_port, set_config, wait_for
from tests.helpers.orthanc import Orthanc
from tests.helpers.results import PATIENT_ID, link

pytestmark = [pytest.mark.peer("Orthanc")]


class ReportAcceptor:
    """Plays the daemon's acceptor for N-EVENT-REPORT: hands the report over."""

    def __init__(self, aet: str) -> None:
        self.port = free_port()
        self.reports: list[tuple[str, list[str], list[str]]] = []
        self.answers: list[bool] = []
        self.got = threading.Event()
        ae = AE(ae_title=aet)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._ae = ae
        self._server: Any = None

    def _report(self, event: evt.Event) -> tuple[int, None]:
        tx, ok, failed = parse_report(event.event_information)
        self.reports.append((tx, ok, failed))
        self.answers.append(delivery_mod.commitment_result(tx, ok, failed))
        self.got.set()
        return 0x0000, None

    def start(self) -> ReportAcceptor:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_N_EVENT_REPORT,
                                                            self._report)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def test_commitment_from_orthanc_releases_the_link_and_seg_arrives(
        tmp_path: Path, box: Box, demo_engine: InferenceEngine) -> None:
    audit: list[tuple[str, dict[str, Any]]] = []

    def note(event: str, **kw: Any) -> None:
        audit.append((event, kw))

    ln = link(tmp_path, demo_engine, audit=note)
    m = ln.record.result.models[0]
    x, y, w, h = m.explanation["bbox"]
    pixels = np.zeros((int(ln.record.sources[0].Rows), int(ln.record.sources[0].Columns)), bool)
    pixels[y:y + h, x:x + w] = True
    objects, skipped = build_all(ln.issuer, ln.record, masks={m.name: Mask(
        MaskOutput("mask", "lesion", 0.5), int(m.explanation["instance"]), pixels)})
    assert sorted(o.kind for o in objects) == ["gsps", "sc", "seg", "sr"], skipped

    acceptor = ReportAcceptor("EDGE_AGENT").start()
    pacs = Orthanc(tmp_path / "orthanc",
                   modalities={"edge": ("EDGE_AGENT", "127.0.0.1", acceptor.port)}).start()
    set_config(box, "results", "enabled", "true")
    set_config(box, "results", "commitment_wait_seconds", "0")  # Orthanc reports elsewhere
    with box.config.open("a") as fh:
        fh.write(f'\n[[results.destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\n'
                 f'host = "127.0.0.1"\nport = {pacs.dicom}\nstorage_commitment = true\n')
    cfg = config.load(box.config)
    assert cfg.results.destinations[0].release_after == "commitment"
    queue = DeliveryQueue(tmp_path / "delivery.db", ln.kek)
    outbox = Outbox(tmp_path / "outbox.db", KeyEncryptionKey(random_key()), 2**30)
    d = Delivery(cfg, ln.store, queue, ln.issuer, outbox, note)
    rec = ln.record
    rows = []
    for o in objects:
        buf = io.BytesIO()
        o.dataset.save_as(buf, enforce_file_format=True)
        rows.append(QueuedObject("pacs", rec.study_ref, rec.version, o.kind, o.model,
                                 str(o.dataset.SOPClassUID), o.sop_instance_uid,
                                 buf.getvalue()))
    assert queue.plan(rec.study_ref, rec.version, rows) == 4
    try:
        for f in ln.originals.files:
            pacs.upload(f)
        (study_id,) = pacs.get("/studies")
        d.start()
        # Stored, then awaiting the commitment report: the link is still held.
        wait_for(lambda: queue.stats(["pacs"])["pacs"].awaiting == 4 or
                 queue.stats(["pacs"])["pacs"].done == 4, 120, "the objects stored")
        assert acceptor.got.wait(120), "Orthanc sent no storage commitment report"
        wait_for(lambda: queue.stats(["pacs"])["pacs"].done == 4, 60, "commitment applied")
        wait_for(lambda: not ln.store.held(), 60, "the link released")
        # A report for a transaction that is not ours is not taken.
        assert not delivery_mod.commitment_result("2.25.12345", ["2.25.1"], [])
        stored = pacs.get(f"/studies/{study_id}/instances")
        tags = [pacs.get(f"/instances/{i['ID']}/simplified-tags") for i in stored]
    finally:
        d.stop()
        pacs.stop()
        acceptor.stop()
    (tx, ok, failed) = acceptor.reports[0]
    assert acceptor.answers == [True]
    assert sorted(ok) == sorted(o.sop_instance_uid for o in objects) and failed == []
    mine = [t for t in tags if t["SOPInstanceUID"] in set(ok)]
    assert sorted(t["Modality"] for t in mine) == ["OT", "PR", "SEG", "SR"]
    assert all(t["StudyInstanceUID"] == ln.originals.study_uid and t["PatientID"] == PATIENT_ID
               for t in mine)
    events = [e for e, _ in audit]
    assert events.count("results.sent") == 4 and events.count("results.committed") == 4
    assert "results.link_shredded" in events
    assert tx and queue.has_transaction(tx)
