"""The PHI-side link: from a study's pseudonym to what writing back into it needs.

At the PHI boundary the pipeline captures, per instance that reaches the
de-identified study, the original identifiers and the few technical attributes
the result objects need (UIDs, SOP class, frame of reference, geometry, VOI),
plus the patient and study modules once per study.  After inference it adds the
result and, per explained model, the explained frame's pixels (the key image is
drawn on them; the originals are deleted right after); a mask model's result
carries its segment (``ModelOutput.mask``: bit-packed, zlib-compressed, at most
``agent.types.MASK_MAX_BYTES``), from which the DICOM SEG is built.  The whole record is one
sealed row:

* its own random data key, wrapped by the box KEK: shredding a record is
  deleting its wrapped key and ciphertext (``secure_delete`` zeroes the freed
  pages, a truncating WAL checkpoint drops the old frames);
* the study pseudonym and version are bound as associated data, so a row cannot
  be moved under another study;
* kept until ``release`` (delivery confirmed, later work) and at most
  ``[results] link_retention_days``; both shred and audit.

What stays after shredding is the pseudonym, the version, the times and whether
that version produced an SR: enough to name the SR that a later version
replaces (Predecessor Documents Sequence), nothing identifying.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from agent.crypto import KeyEncryptionKey, random_key, seal, unseal
from agent.errors import EdgeAgentError, StorageError
from agent.fileperm import open_private_db
from agent.types import (
    DeidentifiedStudy,
    InferenceResult,
    ModelFailure,
    ModelOutput,
    QuarantineNote,
    SegMask,
)

log = logging.getLogger(__name__)

# Patient and study modules: what a result needs to land in the original study.
SUBJECT_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID",
)
# Per source instance: identity, geometry and display attributes (GSPS displayed area,
# modality/VOI LUT; SR image library; SEG plane positions).  Nothing else is kept.
SOURCE_KEYWORDS: tuple[str, ...] = (
    "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "SeriesNumber",
    "InstanceNumber", "FrameOfReferenceUID", "Rows", "Columns", "NumberOfFrames",
    "PixelSpacing", "ImagerPixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
    "SliceThickness", "PatientOrientation", "Laterality", "ImageLaterality",
    "PhotometricInterpretation", "SamplesPerPixel", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "WindowCenter", "WindowWidth",
)
_PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter",
                 "WindowWidth")

AuditFn = Callable[..., None]


def _pick(ds: Dataset, keywords: tuple[str, ...]) -> Dataset:
    """A new dataset holding only ``keywords`` of ``ds``; an element that cannot be
    read (hostile input) is left out rather than failing the study."""
    out = Dataset()
    for kw in keywords:
        try:
            elem = ds.data_element(kw)
            if elem is not None:
                # A copy: de-identification changes the original's elements afterwards.
                out[elem.tag] = copy.deepcopy(elem)
                out[elem.tag].value  # noqa: B018 - convert now: a bad value fails here
        except Exception:  # noqa: BLE001 - a peer's bytes; the rest of the record still helps
            if kw in out:
                del out[kw]
    return out


def _to_json(ds: Dataset) -> dict[str, Any]:
    return dict(ds.to_json_dict())


def _from_json(d: Mapping[str, Any]) -> Dataset:
    return Dataset.from_json(dict(d))


class Originals:
    """What the pipeline captures at the PHI boundary, in de-identified study order.

    ``read`` runs before an instance is de-identified; ``add`` after it made it into
    the de-identified study, so ``sources[i]`` belongs to ``instances[i]``.
    """

    def __init__(self) -> None:
        self.subject: Dataset | None = None
        self.sources: list[Dataset] = []

    def __repr__(self) -> str:
        return f"Originals(<{len(self.sources)} instances>)"

    @staticmethod
    def read(ds: Dataset) -> tuple[Dataset, Dataset]:
        return _pick(ds, SUBJECT_KEYWORDS), _pick(ds, SOURCE_KEYWORDS)

    def add(self, captured: tuple[Dataset, Dataset]) -> None:
        subject, source = captured
        if self.subject is None or "PatientID" not in self.subject:
            self.subject = subject
        self.sources.append(source)


def key_frame(ds: Dataset, frame: int) -> Dataset | None:
    """The pixels of one frame as a small native single-frame dataset (pixel module
    and VOI attributes only); None when the frame cannot be decoded."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=frame) if frames > 1 else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; no key image then
        log.warning("key image frame not decodable (%s): no key image", type(exc).__name__)
        return None
    out = _pick(ds, _PIXEL_MODULE)
    if arr.ndim == 3:  # colour: pydicom returns RGB, interleaved
        out.PhotometricInterpretation = "RGB"
        out.SamplesPerPixel = 3
        out.PlanarConfiguration = 0
        arr = arr.astype(np.uint8)
        out.BitsAllocated, out.BitsStored, out.HighBit = 8, 8, 7
        out.PixelRepresentation = 0
    elif arr.dtype.itemsize > 2 or arr.dtype.kind == "f":
        return None  # float or 32-bit pixels: not drawn as a key image
    else:
        bits = 8 * arr.dtype.itemsize
        out.BitsAllocated = bits
        if int(out.get("BitsStored", bits) or bits) > bits:
            out.BitsStored, out.HighBit = bits, bits - 1
        out.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    out.Rows, out.Columns = int(arr.shape[0]), int(arr.shape[1])
    out.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    out["PixelData"].VR = "OB" if int(out.BitsAllocated) == 8 else "OW"
    return out


@dataclass(frozen=True)
class LinkRecord:
    """One study version's way back into its original study.  Its repr shows no PHI."""

    study_ref: str
    version: int
    patient_ref: str
    subject: Dataset = field(repr=False)  # patient + study modules of the original
    sources: tuple[Dataset, ...] = field(repr=False)  # aligned with the de-identified study
    result: InferenceResult = field(repr=False)
    frames: Mapping[str, Dataset] = field(repr=False)  # model name -> explained frame
    created_at: float = 0.0
    predecessor: int | None = None  # an earlier version of this study that has an SR

    def reference(self, index: int) -> Dataset:
        """Source ``index`` as a pixel-less image header with the patient/study modules:
        what highdicom copies patient and study from, and references."""
        ds = Dataset()
        ds.update(self.subject)
        ds.update(self.sources[index])
        return ds

    def source_image(self, model: str, index: int) -> Dataset | None:
        """The explained frame of ``model`` as a complete single-frame image dataset."""
        frame = self.frames.get(model)
        if frame is None:
            return None
        ds = self.reference(index)
        ds.update(frame)
        if "NumberOfFrames" in ds:
            del ds.NumberOfFrames
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # how key_frame stored it
        return ds


def _result_json(r: InferenceResult) -> dict[str, Any]:
    d = asdict(r)
    for m, out in zip(r.models, d["models"], strict=True):
        if m.mask is not None:  # bit-packed and compressed already: base64 for the JSON
            out["mask"] = {**out["mask"], "bits": base64.b64encode(m.mask.bits).decode()}
    return d


def _mask_from(d: Mapping[str, Any] | None) -> SegMask | None:
    if d is None:
        return None
    return SegMask(index=int(d["index"]), frame=int(d["frame"]), rows=int(d["rows"]),
                   cols=int(d["cols"]), bits=base64.b64decode(d["bits"]), label=str(d["label"]),
                   category=tuple(d["category"]), type=tuple(d["type"]))  # type: ignore[arg-type]


def _result_from(d: Mapping[str, Any]) -> InferenceResult:
    models = tuple(ModelOutput(**{**m, "review_reasons": tuple(m["review_reasons"]),
                                  "sources": tuple(m.get("sources", ())),
                                  "mask": _mask_from(m.get("mask"))})
                   for m in d["models"])
    return InferenceResult(**{
        **d, "models": models,
        "failures": tuple(ModelFailure(**f) for f in d["failures"]),
        "quarantined": tuple(QuarantineNote(**q) for q in d["quarantined"]),
        "deid_options": tuple(d["deid_options"]),
    })


def _encode(rec: LinkRecord) -> bytes:
    frames = {}
    for name, ds in rec.frames.items():
        pixels = bytes(ds.PixelData)
        header = Dataset()
        header.update(ds)
        del header.PixelData
        frames[name] = {"header": _to_json(header), "pixels": base64.b64encode(pixels).decode(),
                        "vr": ds["PixelData"].VR}
    doc = {"study_ref": rec.study_ref, "version": rec.version, "patient_ref": rec.patient_ref,
           "subject": _to_json(rec.subject), "sources": [_to_json(s) for s in rec.sources],
           "result": _result_json(rec.result), "frames": frames,
           "created_at": rec.created_at, "predecessor": rec.predecessor}
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 6)


def _decode(blob: bytes) -> LinkRecord:
    doc = json.loads(zlib.decompress(blob))
    frames: dict[str, Dataset] = {}
    for name, f in doc["frames"].items():
        ds = _from_json(f["header"])
        ds.PixelData = base64.b64decode(f["pixels"])
        ds["PixelData"].VR = f["vr"]
        frames[name] = ds
    return LinkRecord(
        study_ref=doc["study_ref"], version=int(doc["version"]), patient_ref=doc["patient_ref"],
        subject=_from_json(doc["subject"]),
        sources=tuple(_from_json(s) for s in doc["sources"]),
        result=_result_from(doc["result"]), frames=frames,
        created_at=float(doc["created_at"]), predecessor=doc["predecessor"])


def has_sr(result: InferenceResult) -> bool:
    """Whether this result version yields an SR (a model concluded something)."""
    return result.status == "ok" and bool(result.models)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    study_ref TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,            -- held | released | expired
    wrapped_key BLOB,               -- NULL once shredded
    body BLOB,                      -- NULL once shredded
    sr INTEGER NOT NULL,            -- this version produced an SR (kept after shredding)
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    shredded_at REAL,
    PRIMARY KEY (study_ref, version)
);
CREATE INDEX IF NOT EXISTS links_expiry ON links(state, expires_at);
"""

DAY = 86400.0


class LinkStore:
    """The encrypted link store (``state/results/links.db``)."""

    def __init__(self, path: Path, kek: KeyEncryptionKey, *, retention_days: int = 14,
                 audit: AuditFn | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.retention_s = retention_days * DAY
        self._kek = kek
        self._audit = audit
        self._lock = threading.RLock()
        try:
            # 0600 with its side files, WAL + FULL, secure_delete (a shredded key's pages zeroed)
            self._db = open_private_db(path, _SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"results link store {path}: {exc}",
                               hint="check the state volume; 'edge-agent doctor' reports "
                                    "its health") from None

    def __repr__(self) -> str:
        return f"LinkStore({self.path})"

    @contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"results link store: {what}: {exc}",
                                   hint="check the state volume") from None

    def _note(self, event: str, details: dict[str, object], outcome: str = "success") -> None:
        if self._audit is not None:
            try:
                self._audit(event, outcome=outcome, details=details)
            except Exception:  # noqa: BLE001 - the audit log reports its own failures
                log.exception("audit of %s failed", event)

    # -- write ----------------------------------------------------------------------

    def put(self, study_ref: str, version: int, patient_ref: str, originals: Originals,
            result: InferenceResult, frames: Mapping[str, Dataset],
            now: float | None = None) -> bool:
        """Durably store the link of one study version; False when it was already
        stored (a study reprocessed after a crash keeps its first link)."""
        if originals.subject is None:
            return False
        now = time.time() if now is None else now
        sr = has_sr(result)
        with self._tx("put") as db:
            if db.execute("SELECT 1 FROM links WHERE study_ref=? AND version=?",
                          (study_ref, version)).fetchone():
                return False
            row = db.execute("SELECT MAX(version) FROM links WHERE study_ref=? AND version<? "
                             "AND sr=1", (study_ref, version)).fetchone()
            rec = LinkRecord(study_ref, version, patient_ref, originals.subject,
                             tuple(originals.sources), result, dict(frames), now,
                             int(row[0]) if row and row[0] is not None else None)
            key = random_key()
            body = seal(key, _encode(rec), _aad(study_ref, version))
            db.execute("INSERT INTO links (study_ref, version, state, wrapped_key, body, sr, "
                       "created_at, expires_at) VALUES (?,?,?,?,?,?,?,?)",
                       (study_ref, version, "held", self._kek.wrap(key), body, int(sr), now,
                        now + self.retention_s))
        self._note("results.link_written", {
            "study": study_ref, "version": version, "instances": len(originals.sources),
            "models": len(result.models), "key_images": len(frames),
            "masks": sum(1 for m in result.models if m.mask is not None),
            "retention_days": round(self.retention_s / DAY, 2)})
        return True

    def record(self, study: DeidentifiedStudy, result: InferenceResult,
               originals: Originals) -> bool:
        """The pipeline's call: the link of ``study`` with its result and, per explained
        model, the explained frame.  A study whose originals cannot be linked (values a
        record cannot hold) is logged and audited, not retried; storage errors raise."""
        if originals.subject is None:
            return False  # nothing reached the de-identified study
        if len(originals.sources) != len(study.instances):
            # Positions would point at the wrong originals: no link rather than a wrong one.
            log.error("study %s: %d originals captured for %d instances; no result link",
                      study.study_ref, len(originals.sources), len(study.instances))
            self._note("results.link_written", {"study": study.study_ref,
                                                "version": study.version,
                                                "reason": "capture mismatch"}, "minor_failure")
            return False
        frames: dict[str, Dataset] = {}
        for m in result.models:
            e = m.explanation
            where = e.get("instance")
            if e.get("bbox") and isinstance(where, int) and 0 <= where < len(study.instances):
                frame = key_frame(study.instances[where], int(e.get("frame", 0) or 0))
                if frame is not None:
                    frames[m.name] = frame
        try:
            return self.put(study.study_ref, study.version, study.patient_ref, originals,
                            result, frames)
        except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
            log.error("study %s: result link not stored (%s)", study.study_ref,
                      type(exc).__name__)
            self._note("results.link_written", {"study": study.study_ref,
                                                "version": study.version,
                                                "reason": type(exc).__name__}, "minor_failure")
            return False

    # -- read -----------------------------------------------------------------------

    def find(self, ref: str, version: int | None = None) -> tuple[str, int]:
        """(study_ref, version) of the held link that ``ref`` names: a study pseudonym
        or a unique prefix of one (at least 8 characters), newest version by default."""
        ref = ref.strip()
        if len(ref) < 8:
            raise EdgeAgentError(f"study reference {ref!r} is too short",
                                 hint="give the study's ref from the result (or at least its "
                                      "first 8 characters)")
        with self._lock:
            rows = self._db.execute(
                "SELECT study_ref, version FROM links WHERE state='held' AND "
                "substr(study_ref, 1, ?)=? ORDER BY version", (len(ref), ref)).fetchall()
        refs = sorted({str(r[0]) for r in rows})
        if not refs:
            raise EdgeAgentError(f"no held result link for study {ref}",
                                 hint="[results] enabled must be true when the study is "
                                      "processed; links are shredded once released or after "
                                      "[results] link_retention_days")
        if len(refs) > 1:
            raise EdgeAgentError(f"study reference {ref!r} matches {len(refs)} studies",
                                 hint="give more characters of the study ref")
        versions = [int(r[1]) for r in rows]
        if version is None:
            return refs[0], versions[-1]
        if version not in versions:
            raise EdgeAgentError(f"study {refs[0]} has no held link for version {version}",
                                 hint=f"held versions: {', '.join(map(str, versions))}")
        return refs[0], version

    def get(self, study_ref: str, version: int) -> LinkRecord:
        with self._lock:
            row = self._db.execute("SELECT wrapped_key, body FROM links WHERE study_ref=? AND "
                                   "version=?", (study_ref, version)).fetchone()
        if row is None or row[0] is None or row[1] is None:
            raise StorageError(f"no held result link for study {study_ref} version {version}",
                               hint="it was released or expired and has been shredded")
        key = self._kek.unwrap(bytes(row[0]))
        return _decode(unseal(key, bytes(row[1]), _aad(study_ref, version)))

    def held(self) -> list[tuple[str, int, float]]:
        """(study_ref, version, expires_at) of every link still held, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT study_ref, version, expires_at FROM links WHERE "
                                    "state='held' ORDER BY created_at").fetchall()
        return [(str(a), int(b), float(c)) for a, b, c in rows]

    # -- shred ----------------------------------------------------------------------

    def release(self, study_ref: str, version: int) -> bool:
        """Every destination confirmed the result: shred the link now."""
        return self._shred([(study_ref, version)], "released", "released")

    def expire(self, now: float | None = None) -> int:
        """Shred every held link past ``[results] link_retention_days``; never raises."""
        now = time.time() if now is None else now
        try:
            with self._lock:
                rows = self._db.execute("SELECT study_ref, version FROM links WHERE "
                                        "state='held' AND expires_at<=?", (now,)).fetchall()
            doomed = [(str(a), int(b)) for a, b in rows]
            if doomed:
                self._shred(doomed, "expired", "retention", now)
            return len(doomed)
        except EdgeAgentError as exc:
            log.error("result link retention failed: %s", exc)
            return 0

    def _shred(self, which: list[tuple[str, int]], state: str, reason: str,
               now: float | None = None) -> bool:
        now = time.time() if now is None else now
        done: list[tuple[str, int]] = []
        with self._tx("shred") as db:
            for ref, version in which:
                cur = db.execute("UPDATE links SET state=?, wrapped_key=NULL, body=NULL, "
                                 "shredded_at=? WHERE study_ref=? AND version=? AND "
                                 "state='held'", (state, now, ref, version))
                if cur.rowcount:
                    done.append((ref, version))
        if done:
            with self._lock:
                try:
                    # The old pages live on in the WAL until a checkpoint overwrites them.
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.warning("results link store: checkpoint after shredding failed: %s", exc)
        for ref, version in done:
            self._note("results.link_shredded", {"study": ref, "version": version,
                                                 "reason": reason})
        return bool(done)

    # -- keys -----------------------------------------------------------------------

    def rewrap(self, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
        """Re-wrap every held record's data key under ``new`` (data not re-encrypted)."""
        with self._tx("rewrap") as db:
            rows = db.execute("SELECT study_ref, version, wrapped_key FROM links WHERE "
                              "wrapped_key IS NOT NULL").fetchall()
            for ref, version, wrapped in rows:
                db.execute("UPDATE links SET wrapped_key=? WHERE study_ref=? AND version=?",
                           (new.wrap(old.unwrap(bytes(wrapped))), ref, version))
        self._kek = new
        return len(rows)

    def wrapped_by(self) -> set[str]:
        """Ids of the KEKs that wrap the held records' keys."""
        with self._lock:
            rows = self._db.execute("SELECT wrapped_key FROM links WHERE wrapped_key IS NOT "
                                    "NULL").fetchall()
        return {bytes(r[0])[:16].decode("ascii", "replace") for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _aad(study_ref: str, version: int) -> bytes:
    return f"results-link\x00{study_ref}\x00{version}".encode()
