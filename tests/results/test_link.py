"""The PHI-side link store: sealed per record, found by pseudonym, shredded on release
and after its retention, every step audited; a re-wrapped KEK keeps it readable."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.crypto import KeyEncryptionKey, random_key
from agent.errors import CryptoError, EdgeAgentError, StorageError
from agent.infer import InferenceEngine
from agent.results.link import DAY, LinkStore, Originals
from tests.helpers.results import (
    ACCESSION,
    PATIENT_ID,
    PATIENT_NAME,
    link,
    original_study,
    process,
)


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event: str, *, outcome: str = "success",
                 details: dict[str, Any] | None = None) -> None:
        self.events.append((event, outcome, dict(details or {})))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [d for e, _, d in self.events if e == event]


def _disk_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_link_round_trip_keeps_originals_and_result(tmp_path: Path,
                                                    demo_engine: InferenceEngine) -> None:
    audit = Audit()
    ln = link(tmp_path, demo_engine, audit=audit)
    rec = ln.record
    assert str(rec.subject.PatientName) == PATIENT_NAME
    assert rec.subject.PatientID == PATIENT_ID and rec.subject.IssuerOfPatientID == "HOSP-A"
    assert rec.subject.AccessionNumber == ACCESSION and rec.subject.PatientSex == "F"
    assert rec.subject.StudyInstanceUID == ln.originals.study_uid
    assert [s.SOPInstanceUID for s in rec.sources] == ln.originals.sop_uids
    assert all(s.FrameOfReferenceUID == ln.originals.datasets[0].FrameOfReferenceUID
               for s in rec.sources)
    (m,) = rec.result.models
    assert m.name == "lesion-demo" and m.sources == (0, 1, 2)
    assert m.explanation["bbox"] and "lesion-demo" in rec.frames
    # The explained frame's pixels are the original's.
    where = m.explanation["instance"]
    assert bytes(rec.frames["lesion-demo"].PixelData) == \
        bytes(ln.originals.datasets[where].PixelData)
    written = audit.named("results.link_written")
    assert written and written[0]["study"] == rec.study_ref and written[0]["instances"] == 3
    # Nothing identifying in its repr, in the audit details, or readable on disk.
    shown = repr(rec) + repr(written)
    for value in (PATIENT_NAME, PATIENT_ID, ACCESSION, ln.originals.study_uid):
        assert value not in shown
        assert value.encode() not in _disk_bytes(ln.store.path)


def test_a_second_record_of_the_same_version_keeps_the_first(
        tmp_path: Path, demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    dstudy, result, captured = process(ln.originals, demo_engine, ln.issuer.uid_key)
    assert not ln.store.record(dstudy, result, captured)
    assert ln.store.get(dstudy.study_ref, 1).created_at == ln.record.created_at


def test_misaligned_capture_is_refused_not_linked(tmp_path: Path,
                                                  demo_engine: InferenceEngine) -> None:
    audit = Audit()
    store = LinkStore(tmp_path / "links.db", KeyEncryptionKey(random_key()), audit=audit)
    dstudy, result, captured = process(original_study(tmp_path / "o"), demo_engine,
                                       random_key())
    short = Originals()
    short.add((captured.subject, captured.sources[0]))  # type: ignore[arg-type]
    assert not store.record(dstudy, result, short)
    assert store.held() == []
    assert [o for e, o, _ in audit.events if e == "results.link_written"] == ["minor_failure"]


def test_expired_links_are_shredded_and_audited(tmp_path: Path,
                                                demo_engine: InferenceEngine) -> None:
    audit = Audit()
    ln = link(tmp_path, demo_engine, audit=audit)
    ref = ln.record.study_ref
    created = ln.record.created_at
    assert ln.store.expire(now=created + 14 * DAY - 60) == 0  # default retention: 14 days
    assert ln.store.get(ref, 1).study_ref == ref
    wrapped = ln.kek.id.encode()
    assert wrapped in _disk_bytes(ln.store.path)
    assert ln.store.expire(now=created + 14 * DAY + 1) == 1
    with pytest.raises(StorageError, match="shredded"):
        ln.store.get(ref, 1)
    with pytest.raises(EdgeAgentError, match="no held result link"):
        ln.store.find(ref)
    assert ln.store.held() == []
    # The wrapped data key is gone from the database file and its WAL.
    assert wrapped not in _disk_bytes(ln.store.path)
    assert audit.named("results.link_shredded") == [
        {"study": ref, "version": 1, "reason": "retention"}]


def test_release_shreds_at_once(tmp_path: Path, demo_engine: InferenceEngine) -> None:
    audit = Audit()
    ln = link(tmp_path, demo_engine, audit=audit)
    ref = ln.record.study_ref
    assert ln.store.release(ref, 1)
    assert not ln.store.release(ref, 1)  # once
    with pytest.raises(StorageError):
        ln.store.get(ref, 1)
    assert [d["reason"] for d in audit.named("results.link_shredded")] == ["released"]


def test_find_by_prefix_and_version(tmp_path: Path, demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    ref = ln.record.study_ref
    assert ln.store.find(ref[:12]) == (ref, 1)
    assert ln.store.find(ref, 1) == (ref, 1)
    with pytest.raises(EdgeAgentError, match="no held link for version 2"):
        ln.store.find(ref, 2)
    with pytest.raises(EdgeAgentError, match="too short"):
        ln.store.find(ref[:4])


def test_later_version_names_the_earlier_sr_even_after_shredding(
        tmp_path: Path, demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    ref = ln.record.study_ref
    assert ln.record.predecessor is None
    ln.store.release(ref, 1)
    more = original_study(tmp_path / "follow-up", n=1, seed=8, study_uid=ln.originals.study_uid)
    dstudy, result, captured = process(more, demo_engine, ln.issuer.uid_key, version=2)
    assert dstudy.study_ref == ref
    assert ln.store.record(dstudy, result, captured)
    assert ln.store.get(ref, 2).predecessor == 1


def test_wrong_kek_cannot_read_and_rewrap_moves_it(tmp_path: Path,
                                                   demo_engine: InferenceEngine) -> None:
    ln = link(tmp_path, demo_engine)
    ref = ln.record.study_ref
    ln.store.close()
    with pytest.raises(CryptoError):
        LinkStore(ln.store.path, KeyEncryptionKey(random_key())).get(ref, 1)
    new = KeyEncryptionKey(random_key())
    store = LinkStore(ln.store.path, ln.kek)
    assert store.rewrap(ln.kek, new) == 1
    store.close()
    again = LinkStore(ln.store.path, new)
    assert again.wrapped_by() == {new.id}
    assert dataclasses.replace(again.get(ref, 1), created_at=0).subject.PatientID == PATIENT_ID


def test_tampered_row_fails_authentication(tmp_path: Path, demo_engine: InferenceEngine) -> None:
    import sqlite3

    ln = link(tmp_path, demo_engine)
    ref = ln.record.study_ref
    db = sqlite3.connect(ln.store.path)
    # Moving a record under another version is caught: the row is bound to its place.
    db.execute("UPDATE links SET version=7 WHERE study_ref=?", (ref,))
    db.commit()
    db.close()
    with pytest.raises(CryptoError):
        ln.store.get(ref, 7)
