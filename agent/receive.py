"""The DICOM front door: a pynetdicom Storage SCP that acks only durable instances.

Every handler maps every failure to a standard DIMSE status and never raises
into pynetdicom.  Association requests are checked against the called AE title
and the allowlist (calling AE bound to peer address) before any data flows.
Nothing identifying is logged: instances are referred to by keyed hashes.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from agent.config import DicomSettings
from agent.errors import OutOfResources, StorageError
from agent.inbox import Inbox, StoreReceipt

log = logging.getLogger("edge_agent.receive")

# PHI must never reach pynetdicom's own log lines.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

# What a modality may propose.  Deflate is accepted because modalities use it,
# but its inflation is bounded when we parse (see _bounded_parse).
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DATASET_MISMATCH = 0xA900
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124

AuditFn = Callable[..., None]


@dataclass
class ReceiveCounters:
    associations_accepted: int = 0
    associations_rejected: int = 0
    instances_stored: int = 0
    instances_duplicate: int = 0
    instances_failed: int = 0
    out_of_resources: int = 0
    active: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, with every syntax we decode."""
    out: list[PresentationContext] = []
    for cx in AllStoragePresentationContexts:
        pc = PresentationContext()
        pc.abstract_syntax = cx.abstract_syntax
        pc.transfer_syntax = list(TRANSFER_SYNTAXES)
        out.append(pc)
    return out


class StorageSCP:
    """Owns the pynetdicom AE; hands durable instances to the inbox."""

    def __init__(
        self,
        settings: DicomSettings,
        inbox: Inbox,
        *,
        audit: AuditFn,
        on_stored: Callable[[StoreReceipt], None] | None = None,
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.s = settings
        self.inbox = inbox
        self.audit = audit
        self.on_stored = on_stored or (lambda _r: None)
        self.accepting = accepting
        self.counters = ReceiveCounters()
        self._lock = threading.Lock()
        self._server: Any = None
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.max_pdu
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        ae.require_called_aet = True
        ae.supported_contexts = storage_contexts()
        ae.add_supported_context(Verification)
        self.ae = ae

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._server = self.ae.start_server(
            (self.s.host, self.s.port), block=False, evt_handlers=handlers
        )
        log.info("DICOM listening on %s:%d as %s", self.s.host, self.s.port, self.s.ae_title)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers (never raise) ---------------------------------------------------

    def _peer(self, event: evt.Event) -> tuple[str, str]:
        req = event.assoc.requestor
        # During EVT_REQUESTED pynetdicom has not copied the title from the
        # A-ASSOCIATE-RQ primitive yet, so read it from there.
        prim = req.primitive
        title = prim.calling_ae_title if prim is not None else req.ae_title
        return str(title).strip(), str(req.address)

    def _reject(self, event: evt.Event, result: int, source: int, diag: int, why: str) -> None:
        ae_title, addr = self._peer(event)
        with self._lock:
            self.counters.associations_rejected += 1
        event.assoc.acse.send_reject(result, source, diag)
        event.assoc.is_rejected = True
        event.assoc.kill()
        self.audit("association.rejected", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "reason": why})
        log.warning("rejected association from %s (%s): %s", addr, ae_title, why)

    def _on_requested(self, event: evt.Event) -> None:
        try:
            ae_title, addr = self._peer(event)
            called = str(event.assoc.requestor.primitive.called_ae_title).strip()
            if called != self.s.ae_title:
                self._reject(event, 0x01, 0x01, 0x07, "called AE title not recognised")
                return
            if not any(rule.allows(ae_title, addr, None) for rule in self.s.peers):
                self._reject(event, 0x01, 0x01, 0x03, "calling AE title/address not allowed")
                return
            if not self.accepting():
                self._reject(event, 0x02, 0x03, 0x01, "not accepting (shutting down)")
                return
            try:
                self.inbox.check_capacity()
            except OutOfResources as exc:
                with self._lock:
                    self.counters.out_of_resources += 1
                self._reject(event, 0x02, 0x03, 0x02, f"out of resources: {exc}")
                return
            with self._lock:
                per_peer = self.counters.by_peer.get(addr, 0)
                if per_peer >= self.s.max_associations_per_peer:
                    over = True
                else:
                    over = False
                    self.counters.by_peer[addr] = per_peer + 1
                    self.counters.active += 1
                    self.counters.associations_accepted += 1
            if over:
                self._reject(event, 0x02, 0x03, 0x02, "too many associations from this peer")
                return
            event.assoc._edge_counted = True  # type: ignore[attr-defined]
            self.audit("association.accepted", source=addr, details={"calling_ae": ae_title})
        except Exception:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("association check failed; rejecting")
            try:
                event.assoc.acse.send_reject(0x02, 0x01, 0x01)
                event.assoc.is_rejected = True
            except Exception:  # noqa: BLE001
                pass

    def _on_closed(self, event: evt.Event) -> None:
        try:
            if getattr(event.assoc, "_edge_counted", False):
                event.assoc._edge_counted = False  # type: ignore[attr-defined]
                _, addr = self._peer(event)
                with self._lock:
                    self.counters.active -= 1
                    n = self.counters.by_peer.get(addr, 1) - 1
                    if n <= 0:
                        self.counters.by_peer.pop(addr, None)
                    else:
                        self.counters.by_peer[addr] = n
        except Exception:  # noqa: BLE001
            log.exception("association close bookkeeping failed")

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        ae_title, addr = self._peer(event)
        try:
            raw = event.encoded_dataset(include_meta=False)
            tsyntax = str(event.context.transfer_syntax)
            sop_class = str(event.request.AffectedSOPClassUID)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            if len(raw) > self.s.max_instance_bytes:
                return self._fail(STATUS_OUT_OF_RESOURCES, "instance larger than max_instance_bytes",
                                  addr, ae_title)
            part10 = _part10(raw, sop_class, sop_uid, tsyntax, self.s.ae_title)
            study_uid = _study_uid(part10)
            if study_uid is None:
                return self._fail(STATUS_CANNOT_UNDERSTAND, "data set has no StudyInstanceUID",
                                  addr, ae_title)
            receipt = self.inbox.store(
                io.BytesIO(part10), study_uid=study_uid, sop_uid=sop_uid, sop_class=sop_class,
                transfer_syntax=tsyntax, calling_ae=ae_title, peer=addr, size_hint=len(part10),
            )
        except OutOfResources as exc:
            with self._lock:
                self.counters.out_of_resources += 1
            return self._fail(STATUS_OUT_OF_RESOURCES, str(exc), addr, ae_title)
        except StorageError as exc:
            return self._fail(STATUS_OUT_OF_RESOURCES, f"storage failed: {exc}", addr, ae_title)
        except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError) as exc:
            return self._fail(STATUS_CANNOT_UNDERSTAND, f"malformed data set ({type(exc).__name__})",
                              addr, ae_title)
        except Exception as exc:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("C-STORE handler failed")
            return self._fail(STATUS_PROCESSING_FAILURE, f"internal error ({type(exc).__name__})",
                              addr, ae_title)
        ref = receipt.instance.instance_key[:12]
        with self._lock:
            if receipt.outcome == "duplicate":
                self.counters.instances_duplicate += 1
            else:
                self.counters.instances_stored += 1
        event_name = {"stored": "instance.received", "duplicate": "instance.duplicate",
                      "conflict": "instance.conflict"}[receipt.outcome]
        self.audit(event_name, source=addr,
                   details={"calling_ae": ae_title, "instance": ref,
                            "study": receipt.instance.study_key[:12],
                            "version": receipt.study_version, "bytes": receipt.instance.size})
        log.info("stored instance %s of study %s v%d (%s) from %s",
                 ref, receipt.instance.study_key[:12], receipt.study_version, receipt.outcome, ae_title)
        try:
            self.on_stored(receipt)
        except Exception:  # noqa: BLE001
            log.exception("on_stored hook failed")
        return STATUS_SUCCESS

    def _fail(self, status: int, why: str, addr: str, ae_title: str) -> int:
        with self._lock:
            self.counters.instances_failed += 1
        self.audit("instance.received", outcome="minor_failure", source=addr,
                   details={"calling_ae": ae_title, "status": f"0x{status:04X}", "reason": why})
        log.warning("C-STORE from %s (%s) answered 0x%04X: %s", addr, ae_title, status, why)
        return status


_STUDY_UID = Tag(0x0020, 0x000D)


def _study_uid(part10: bytes) -> str | None:
    """Read only as far as StudyInstanceUID (pixel data is never parsed here)."""
    ds = dcmread(io.BytesIO(part10), stop_before_pixels=True, specific_tags=[_STUDY_UID])
    value = ds.get(_STUDY_UID)
    if value is None or not str(value.value).strip():
        return None
    return str(value.value).strip()


def _part10(raw: bytes, sop_class: str, sop_uid: str, tsyntax: str, ae: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = tsyntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = ae
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(raw)
    return buf.getvalue()
