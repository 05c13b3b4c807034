"""Study processing: inbox -> de-identify -> PHI boundary -> infer -> outbox.

``process`` is idempotent per study version: the result's CloudEvents id is
derived from the study's keyed handle and version, the outbox ignores a second
insert of the same id, and the study is marked done only after its result is
durable.  A crash anywhere in between reprocesses the study and produces the
same single result.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_offset_to_value
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from agent import dicomraw, subgroups
from agent.config import Config
from agent.deid import Deidentifier, burnedin
from agent.errors import DeidError, EdgeAgentError, StorageError
from agent.infer import InferenceEngine
from agent.ops.liveness import Beat, no_beat
from agent.results.link import LinkStore, Originals, has_sr
from agent.store.inbox import Inbox
from agent.store.quarantine import Quarantine
from agent.types import (
    DeidentifiedStudy,
    InferenceResult,
    ModelFailure,
    ModelOutput,
    PhiFingerprint,
    QuarantineNote,
    ReceivedInstance,
    Study,
)
from agent.uplink import cloudevents, egress, vocabulary
from agent.uplink.outbox import Outbox

log = logging.getLogger(__name__)

AuditFn = Callable[..., None]


def parse_instance(raw: bytes) -> pydicom.Dataset:
    """Inbox plaintext -> Dataset; every parse failure becomes DeidError.

    The bytes came from a peer: pydicom raises many exception kinds on them
    (BytesLengthException, struct.error, OverflowError...).  One that escaped
    ``process`` would leave the study 'complete' and retried forever, ahead of
    every study behind it (found by tests/fuzz).
    """
    try:
        return pydicom.dcmread(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - hostile input, see above
        raise DeidError(f"not a readable DICOM instance ({type(exc).__name__})") from None


PIXEL_DATA = BaseTag(0x7FE00010)
DEFER_BYTES = 64 * 1024  # elements larger than this stay in the buffer until asked for


class PlainView(io.RawIOBase):
    """A read-only, seekable file over decrypted bytes held in memory (no copy, no disk).

    With ``window`` only that byte range may be read: the de-identified dataset's
    deferred Pixel Data reads through such a view, so nothing past the PHI boundary
    can read the original header out of the shared buffer (which is zeroed anyway).
    """

    def __init__(self, buf: bytearray, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        self._mv = memoryview(buf)
        self._pos = 0
        self._window = window

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._mv)}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._mv) if size is None or size < 0 else min(len(self._mv),
                                                                  self._pos + size)
        if self._window is not None and end > self._pos and not (
                self._window[0] <= self._pos and end <= self._window[1]):
            raise OSError("read outside the pixel data of a de-identified instance")
        data = self._mv[self._pos:end].tobytes()
        self._pos = max(self._pos, end)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def parse_view(buf: bytearray) -> pydicom.Dataset:
    """Decrypted instance -> Dataset whose large values (Pixel Data) stay in ``buf``."""
    try:
        ds = pydicom.dcmread(PlainView(buf), defer_size=DEFER_BYTES)
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # pydicom inflates into its own buffer: deferred offsets would not match ours.
            ds = pydicom.dcmread(PlainView(buf))
        return ds
    except Exception as exc:  # noqa: BLE001 - hostile input, see parse_instance
        raise DeidError(f"not a readable DICOM instance ({type(exc).__name__})") from None


def _detach_pixels(ds: pydicom.Dataset) -> RawDataElement | None:
    """Take the still-deferred Pixel Data out of ``ds`` before de-identification (whose
    element walk would read it in) and leave an empty stand-in, so the de-identifier
    still sees an image.  Only when the pixels cannot matter to it: no burned-in-text
    risk, hence no quarantine or pixel-clean decision that needs them."""
    elem = dicomraw.raw(ds, PIXEL_DATA)  # the raw element, without reading it
    if not isinstance(elem, RawDataElement) or elem.value is not None or elem.length == 0:
        return None
    if burnedin.burned_in_risk(ds) is not None:
        return None
    dicomraw.elements(ds)[PIXEL_DATA] = elem._replace(value=b"", length=0)
    return elem


def _reattach_pixels(out: pydicom.Dataset, placeholder: object, elem: RawDataElement,
                     buf: bytearray) -> bool:
    """Put the deferred Pixel Data back into the de-identified dataset, readable through a
    window of ``buf``; zero the rest of ``buf`` (the original header) first."""
    if dicomraw.raw(out, PIXEL_DATA) is not placeholder:
        return False  # the de-identifier did something with the element: not ours to undo
    start = elem.value_tell - data_element_offset_to_value(elem.is_implicit_VR, str(elem.VR))
    end = elem.value_tell + elem.length
    buf[:start] = bytes(start)
    buf[end:] = bytes(len(buf) - end)
    dicomraw.elements(out)[PIXEL_DATA] = elem
    out.buffer = PlainView(buf, window=(start, end))
    out.filename = None
    out.fileobj_type = PlainView
    out.timestamp = None
    return True


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        inbox: Inbox,
        deidentifier: Deidentifier,
        engine: InferenceEngine | None,
        outbox: Outbox,
        quarantine: Quarantine,
        audit: AuditFn,
        beat: Beat | None = None,
        links: LinkStore | None = None,
    ) -> None:
        self.cfg = cfg
        # [results] enabled: the encrypted link back into each original study.
        self.links = links
        # The assembler's liveness heartbeat (agent/ops/liveness.py): a study of many
        # instances must not look like a hang.
        self.beat: Beat = beat or no_beat
        self.inbox = inbox
        self.deid = deidentifier
        self.engine = engine
        self.outbox = outbox
        self.quarantine = quarantine
        self.audit = audit
        self.latencies_ms: list[float] = []
        # Fixed by configuration before any study: the guard must not read them as study
        # text ("options: none" and a patient called NONE^BOB).
        vocabulary.allow([deidentifier.describe(), *cfg.deid.options,
                          *(d.name for d in cfg.results.destinations)])
        self.counters = {"studies": 0, "quarantined": 0, "failed_instances": 0, "failed_studies": 0}
        # Called with each result's event id once it is durable in the outbox, before the
        # study is marked done (the review stage remembers what a verdict joins with).
        self.on_result: Callable[[str, InferenceResult], None] | None = None

    # -- stages ------------------------------------------------------------------

    def deidentify(self, study: Study, originals: Originals | None = None,
                   patients: list[dict[str, str]] | None = None,
                   ) -> tuple[DeidentifiedStudy, PhiFingerprint]:
        """Cross the PHI boundary: only pseudonyms and de-identified data come out.

        ``originals`` (results enabled) collects, for each instance that makes it into
        the de-identified study, what writing a result back into the original needs.
        ``patients`` collects, per such instance, the patient characteristics the
        active models name as subgroups, coarse (age band, sex: agent/subgroups.py),
        read from the original before de-identification removes them."""
        wanted = self.patient_subgroups() if patients is not None else ()
        datasets: list[pydicom.Dataset] = []
        quarantined: list[QuarantineNote] = []
        failed: list[QuarantineNote] = []
        phi: set[str] = set()
        patient_ref = study_ref = ""
        limit = self.cfg.study.max_process_instance_bytes
        for inst in study.instances:
            self.beat(progress=True, doing="de-identifying")
            ref = inst.instance_key[:12]
            if inst.size > limit:
                reason = (f"instance of {inst.size / 2**20:.0f} MiB is larger than "
                          f"[study] max_process_instance_bytes ({limit / 2**20:.0f} MiB): "
                          "not processed")
                failed.append(QuarantineNote(ref, reason, "too-large"))
                # The catalogued "held back" event (ATNA vocabulary), marked as a refusal.
                self.audit("instance.quarantined", outcome="minor_failure",
                           details={"study": study.ref, "instance": ref, "reason": reason,
                                    "refused": "size", "bytes": inst.size})
                continue
            try:
                buf = self._decrypt(study, inst)
            except EdgeAgentError as exc:
                failed.append(QuarantineNote(ref, f"unreadable inbox file: {exc}",
                                             "inbox-unreadable"))
                self.audit("security.alert", outcome="serious_failure",
                           details={"study": study.ref, "instance": ref,
                                    "reason": "inbox file failed authentication"})
                continue
            pixels: RawDataElement | None = None
            try:
                ds = parse_view(buf)
                pixels = _detach_pixels(ds)
                placeholder = dicomraw.raw(ds, PIXEL_DATA)
                captured = Originals.read(ds) if originals is not None else None
                patient = subgroups.capture(ds, wanted)
                outcome = self.deid.deidentify(ds)
            except (InvalidDicomError, DeidError, ValueError, TypeError, KeyError,
                    AttributeError, EOFError, OSError) as exc:
                reason = f"cannot de-identify ({type(exc).__name__})"
                self.quarantine.put(study.study_key, inst.instance_key, bytes(buf), reason)
                failed.append(QuarantineNote(ref, reason, "not-deidentifiable"))
                self.audit("instance.quarantined", outcome="minor_failure",
                           details={"study": study.ref, "instance": ref, "reason": reason})
                continue
            if (pixels is not None and outcome.dataset is not None
                    and outcome.quarantine_reason is None
                    and not _reattach_pixels(outcome.dataset, placeholder, pixels, buf)):
                # Unexpected: de-identify once more with the pixels read in (the old way).
                outcome = self.deid.deidentify(parse_view(buf))
            raw = buf  # for the quarantine below; dropped with this iteration
            phi |= outcome.phi
            patient_ref = patient_ref or outcome.patient_ref
            study_ref = study_ref or outcome.study_ref
            if outcome.quarantine_reason is not None or outcome.dataset is None:
                reason = outcome.quarantine_reason or "quarantined"
                self.quarantine.put(study.study_key, inst.instance_key, bytes(raw), reason)
                quarantined.append(QuarantineNote(ref, reason, burnedin.reason_code(reason)))
                self.audit("instance.quarantined", details={"study": study.ref, "instance": ref,
                                                            "reason": reason})
                continue
            datasets.append(outcome.dataset)
            if originals is not None and captured is not None:
                originals.add(captured)
            if patients is not None:
                patients.append(patient)
        if not study_ref:
            study_ref = study.study_key[:16]
        if not patient_ref:
            patient_ref = "unknown"
        self.audit("deid.applied", details={
            "study": study_ref, "method": self.deid.describe(),
            "instances": len(datasets), "quarantined": len(quarantined), "failed": len(failed),
        })
        dstudy = DeidentifiedStudy(
            study_ref=study_ref, patient_ref=patient_ref, version=study.version,
            instances=tuple(datasets), quarantined=tuple(quarantined), failed=tuple(failed),
            method=self.deid.describe(), options=tuple(sorted(self.cfg.deid.options)),
            received_instances=len(study.instances),
            first_received_at=study.first_received_at, last_received_at=study.last_received_at,
        )
        return dstudy, PhiFingerprint(frozenset(phi))

    def patient_subgroups(self) -> tuple[str, ...]:
        """The patient characteristics the active models' manifests name as subgroups."""
        engine = self.engine
        if engine is None:
            return ()
        names: set[str] = set()
        for a in engine.active_models():
            man = engine.manifest_of(a["name"], a["version"])
            if man is not None:
                names.update(x for x in man.drift.subgroup_attributes
                             if x in subgroups.PATIENT_ATTRIBUTES)
        return tuple(sorted(names))

    def with_patient_subgroups(self, r: InferenceResult,
                               patients: Sequence[dict[str, str]]) -> InferenceResult:
        """Each model's subgroup plus the patient characteristics its manifest names, as
        captured from the first instance it read (box-local: the published result never
        carries a subgroup)."""
        if not patients or self.engine is None:
            return r
        models = []
        for m in r.models:
            man = self.engine.manifest_of(m.name, m.version)
            wanted = [a for a in (man.drift.subgroup_attributes if man else ())
                      if a in subgroups.PATIENT_ATTRIBUTES]
            at = m.sources[0] if m.sources and m.sources[0] < len(patients) else 0
            values = {a: patients[at].get(a, subgroups.UNKNOWN) for a in wanted}
            models.append(replace(m, subgroup=tuple(sorted({**dict(m.subgroup),
                                                            **values}.items())))
                          if values else m)
        return replace(r, models=tuple(models))

    def _decrypt(self, study: Study, inst: ReceivedInstance) -> bytearray:
        """The instance's plaintext in one buffer, filled chunk by chunk (no joined copy)."""
        buf = bytearray(inst.size)
        pos = 0
        for chunk in self.inbox.iter_read(study, inst):
            if pos + len(chunk) > len(buf):
                raise StorageError(f"inbox file for instance {inst.instance_key[:12]} is "
                                   "larger than its index entry")
            buf[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos != len(buf):
            raise StorageError(f"inbox file for instance {inst.instance_key[:12]} is "
                               "shorter than its index entry")
        return buf

    def infer(self, d: DeidentifiedStudy) -> InferenceResult:
        outputs: list[ModelOutput] = []
        failures: list[ModelFailure] = []
        if d.instances and self.engine is not None:
            # Each model run is bounded by its timeout: allow that much before the next beat.
            runs = max(1, len(self.engine.active_models()))
            self.beat(progress=True, doing="running inference",
                      allow=runs * self.cfg.models.timeout_seconds)
            try:
                outs, fails = self.engine.infer(d)
                outputs, failures = list(outs), list(fails)
            except Exception as exc:  # noqa: BLE001 - a model must never take the daemon down
                failures.append(ModelFailure("", "", "inference-failed", type(exc).__name__))
                log.exception("inference failed for study %s", d.study_ref)
        if not d.instances:
            status = "all_quarantined"
        elif failures and not outputs:
            status = "failed"
        elif not outputs:
            status = "no_applicable_model"
        else:
            status = "ok"
        notes = d.quarantined + d.failed
        return InferenceResult(
            study_ref=d.study_ref, patient_ref=d.patient_ref, version=d.version,
            status=status,  # type: ignore[arg-type]
            models=tuple(outputs), failures=tuple(failures),
            instances_received=d.received_instances, instances_processed=len(d.instances),
            quarantined=notes, deid_method=d.method, deid_options=d.options,
            latency_ms=(time.time() - d.last_received_at) * 1000.0,
        )

    def result_payload(self, study: Study, r: InferenceResult) -> tuple[str, bytes]:
        return self.payload_for(study.study_key, str(study.version), r)

    def payload_for(self, study_key: str, version: str, r: InferenceResult,
                    *, linked: bool = True) -> tuple[str, bytes]:
        """The result event; ``version`` also names a released quarantined instance
        (agent/store/quarantine_review.py), so its result has an id of its own.  ``linked``:
        the study's link is written, so its objects will be delivered (delivered_to)."""
        data: dict[str, Any] = {
            "study": {
                "ref": r.study_ref, "patient_ref": r.patient_ref, "version": r.version,
                "instances_received": r.instances_received,
                "instances_processed": r.instances_processed,
                # Rule codes with their fixed descriptions, never the box-local reason:
                # no text derived from the instance leaves the box (agent/uplink/vocabulary.py).
                "quarantined": [_quarantine_json(q) for q in r.quarantined],
            },
            "status": r.status,
            "deidentification": {"method": r.deid_method, "options": list(r.deid_options)},
            "models": [_model_json(m) for m in r.models],
            "failures": [_failure_json(f) for f in r.failures],
            "latency_ms": round(r.latency_ms, 1),
        }
        if linked and self.links is not None and self.cfg.results.destinations and has_sr(r):
            # Where the result objects go (names only); the final states follow in a
            # result.delivery event (agent/results/delivery.py).
            data["delivered_to"] = [{"destination": d.name, "state": "queued"}
                                    for d in self.cfg.results.destinations]
        eid = cloudevents.stable_id(self.cfg.site, self.cfg.device, "result", study_key, version)
        ev = cloudevents.envelope(kind="result", source=f"edge-agent/{self.cfg.site}/{self.cfg.device}",
                                  data=data, event_id=eid, subject=r.study_ref)
        return eid, cloudevents.encode(ev)

    # -- the whole thing -------------------------------------------------------------

    def process(self, study: Study) -> InferenceResult:
        attempts = self.inbox.note_attempt(study)
        log.info("processing study %s (%d instances, attempt %d)", study.ref,
                 len(study.instances), attempts)
        originals = Originals() if self.links is not None else None
        patients: list[dict[str, str]] = []
        dstudy, phi = self.deidentify(study, originals, patients)
        with egress.watch(phi):  # an exception text quoting an original gets scrubbed too
            result = self.with_patient_subgroups(self.infer(dstudy), patients)
        # The engine audits each model run (name, version, sha256, input/output
        # hashes) and each failure itself; the pipeline audits the study outcome.
        eid, payload = self.result_payload(study, result)
        self.outbox.enqueue("results", eid, payload, phi)
        if self.on_result is not None:
            self.on_result(eid, result)
        if self.links is not None and originals is not None:
            # Before mark_done deletes the originals; a crash before it reprocesses.
            self.links.record(dstudy, result, originals)
        self.inbox.mark_done(study)
        self.counters["studies"] += 1
        self.counters["quarantined"] += len(dstudy.quarantined)
        self.counters["failed_instances"] += len(dstudy.failed)
        self.latencies_ms.append(result.latency_ms)
        del self.latencies_ms[:-1000]
        self.audit("study.completed", details={"study": dstudy.study_ref, "version": study.version,
                                               "status": result.status, "event_id": eid})
        log.info("study %s -> result %s (%s)", dstudy.study_ref, eid, result.status)
        return result


def _quarantine_json(q: QuarantineNote) -> dict[str, Any]:
    code = q.code if q.code in vocabulary.QUARANTINE else "quarantined"
    return {"instance": q.instance_key, "code": code, "reason": vocabulary.QUARANTINE[code]}


def _failure_json(f: ModelFailure) -> dict[str, Any]:
    code = f.code if f.code in vocabulary.FAILURE else "model-error"
    out: dict[str, Any] = {"code": code, "reason": vocabulary.FAILURE[code]}
    if f.model:
        out |= {"model": f.model, "version": f.version}
    if f.transfer_syntax and vocabulary.is_fixed(f.transfer_syntax):
        out["transfer_syntax"] = f.transfer_syntax
    return out


def _model_json(m: ModelOutput) -> dict[str, Any]:
    d = asdict(m)
    d["review_reasons"] = list(m.review_reasons)
    del d["sources"]  # box-local positions, for the result objects (agent/results/)
    del d["subgroup"]  # quasi-identifiers: box-local, for the review store (agent/review/)
    del d["mask"]  # a mask model's pixels: box-local, for the SEG (agent/results/seg.py)
    return d
