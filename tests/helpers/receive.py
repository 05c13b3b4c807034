"""DICOM node for receive tests: a real DICOM node over a real Inbox, listening on a
free loopback port, in this process (``workers=1``) or in receive worker processes
behind a ReceivePool (``workers=N``); peers are real (DCMTK, pynetdicom, raw sockets)."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.pdu_primitives import A_ASSOCIATE

from agent.config import DicomSettings, DicomTls, InboxSettings, PeerRule, StudySettings
from agent.crypto import KeyEncryptionKey, random_key
from agent.dicom.node import DicomNode, LocalNode
from agent.dicom.pool import ReceivePool, WorkerInit
from agent.store.inbox import Inbox
from tests.helpers import require_peer

AE_TITLE = "EDGE_AGENT"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def rejected(assoc: Any) -> bool:
    """Whether a pynetdicom requestor got an A-ASSOCIATE-RJ (result 1 or 2).

    pynetdicom 3.0.4 can miss a rejection that comes back quickly: its DUL thread
    takes the A-ASSOCIATE-RJ and closes the transport (AE-4) before the requesting
    thread checks that the transport is connected (``_negotiate_as_requestor``),
    which then aborts with the rejection still in the DUL's queue.  Seen in about
    1 of 100 back-to-back rejections by the in-process node on a busy machine (the
    node audited each rejection and sent the RJ).  The rejection is on the wire
    either way, so it is looked for in that queue too."""
    if assoc.is_rejected:
        return True
    queued = list(assoc.dul.to_user_queue.queue)
    return bool(assoc.is_aborted) and any(
        isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02) for p in queued)


def association_threads() -> str:
    """Where each DICOM thread of this process is (an in-process node's): for the
    message of a test that finds a connection still counted or an answer missing,
    so that a failure seen once under load says what the node was waiting for."""
    frames = sys._current_frames()
    out = [f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident], limit=8))
           for t in threading.enumerate()
           if t.name.startswith("dicom-") and t.ident is not None and t.ident in frames]
    return "\n".join(out) or "(no DICOM threads in this process)"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Node:
    scp: DicomNode
    inbox: Inbox
    port: int
    tls_port: int
    events: list[tuple[str, dict[str, Any]]]
    lock: threading.Lock

    def audited(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [d for n, d in self.events if n == name]

    def stored(self) -> int:
        return sum(s.n for s in self.studies())

    def studies(self) -> list[Any]:
        rows = self.inbox._db.execute(
            "SELECT id, n_instances FROM studies ORDER BY id").fetchall()
        return [dataclasses.make_dataclass("S", ["id", "n"])(int(r[0]), int(r[1])) for r in rows]


class EventJournal:
    """Where a pool's journaled records land in tests without an audit log: the
    node's event list, in the shape of a synchronous audit call."""

    def __init__(self, events: list[tuple[str, dict[str, Any]]], lock: threading.Lock) -> None:
        self.events = events
        self.lock = lock
        self.last = 0

    def ingest(self, journal: str, records: Any) -> int:
        with self.lock:
            for rid, _ts, e in records:
                if rid > self.last:
                    self.events.append((str(e["event"]), {
                        "outcome": e.get("outcome", "success"), "source": e.get("source"),
                        "details": dict(e.get("details") or {})}))
                    self.last = rid
            return self.last


@contextmanager
def node(tmp: Path, *, peers: tuple[PeerRule, ...] | None = None,
         inbox: InboxSettings | None = None, receipts: Any = None, workers: int = 1,
         registry: Any = None, on_commitment: Any = None, **dicom: Any) -> Iterator[Node]:
    """``on_commitment``: Storage Commitment reports go there (in-process: called with
    (tx, ok, failed) and returns whether taken; workers: (tx, ok, failed, answer))."""
    port = free_port()
    tls_port = free_port()
    tls = dicom.pop("tls", None)
    if isinstance(tls, DicomTls):
        tls = dataclasses.replace(tls, port=tls_port)
    settings = DicomSettings(
        host="127.0.0.1", port=port, ae_title=AE_TITLE,
        peers=peers if peers is not None else (PeerRule("*", LOOPBACK),),
        tls=tls or DicomTls(), workers=workers, **dicom,
    )
    kek = KeyEncryptionKey(random_key())
    pkey = random_key()
    inbox_settings = inbox or InboxSettings(max_bytes=50 * 1024**3, min_free_bytes=0)
    study = StudySettings(quiet_seconds=3600)
    ib = Inbox(tmp / "inbox", kek, pkey, inbox_settings, study)
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def audit(name: str, **kw: Any) -> None:
        with lock:
            events.append((name, dict(kw)))

    scp: DicomNode
    if workers > 1:
        def init(index: int) -> WorkerInit:
            return WorkerInit(index, settings, tmp / "inbox", inbox_settings, study, kek, pkey,
                              "WARNING", commitment=on_commitment is not None)

        scp = ReceivePool(settings, ib, init, audit=audit,
                          receipts=receipts if receipts is not None else EventJournal(events, lock),
                          on_commitment=on_commitment)
    else:
        scp = LocalNode(settings, ib, audit=audit, receipts=receipts, registry=registry,
                        on_commitment=on_commitment)
    scp.start()
    try:
        yield Node(scp, ib, port, tls_port, events, lock)
    finally:
        scp.stop()
        ib.close()


def ct_files(tmp: Path, n: int, *, study_uid: str | None = None, tag: str = "ct") -> list[Path]:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    # DCMTK drops trailing padding when it sends: remove it so bytes compare.
    if 0xFFFCFFFC in src:
        del src[0xFFFCFFFC]
    study_uid = study_uid or generate_uid()
    series = generate_uid()
    out = []
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = tmp / f"{tag}{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def big_instance(path: Path, frames: int, rows: int = 512, cols: int = 512) -> Path:
    """A native multi-frame instance of frames*rows*cols*2 bytes, written in pieces."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Big^Instance"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    head = pydicom.filebase.DicomBytesIO()
    ds.save_as(head, enforce_file_format=True)
    nbytes = frames * rows * cols * 2
    frame = np.arange(rows * cols, dtype=np.uint16).tobytes()
    with open(path, "wb") as fh:
        fh.write(head.getvalue())
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + nbytes.to_bytes(4, "little"))
        for _ in range(frames):
            fh.write(frame)
    return path


def dcmtk(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([require_peer(tool), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
