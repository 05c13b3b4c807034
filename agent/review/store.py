"""The box's memory of what a verdict joins with, and the verdicts themselves.

Per (result id, model) the pipeline records, when the result is produced: the
model name and version, the finding, whether it was positive, the probabilities,
the needs-review flag with its reasons, the explanation a reviewer reads, and the
subgroup attributes the model's manifest names (age band, sex, scanner
manufacturer/model, body part...).  The attributes are quasi-identifiers: the
whole record is sealed (AES-256-GCM) under the store's data key, wrapped by the
box KEK like every other store, with the result id and model bound as associated
data so a row cannot be moved under another result.  Only the model name and
version, the times and the needs-review flag are in clear: what the backlog and
the escalation need without unsealing anything.

Verdicts: one per (result id, model).  **The first verdict wins**: the same
verdict delivered again (same verdict id, an MQTT redelivery or a replay) is
ignored; a different verdict for a result that already has one is refused, so a
replayed or late message can never overwrite a reviewer's decision.  The free
text a reviewer may add is sealed too and never leaves the box.

Records older than ``retention_days`` are deleted (``secure_delete`` zeroes
them): performance is computed over windows shorter than that.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.crypto import KeyEncryptionKey, load_or_create_data_key, seal, unseal
from agent.errors import CryptoError, StorageError
from agent.fileperm import open_private_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    at REAL NOT NULL,
    needs_review INTEGER NOT NULL,
    escalated REAL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (result_id, model)
);
CREATE INDEX IF NOT EXISTS results_at ON results (at);
CREATE TABLE IF NOT EXISTS verdicts (
    result_id TEXT NOT NULL,
    model TEXT NOT NULL,
    verdict_id TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    via TEXT NOT NULL,
    at REAL NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (result_id, model)
);
CREATE INDEX IF NOT EXISTS verdicts_at ON verdicts (at);
"""

VERDICTS = ("agreed", "disagreed", "indeterminate")


@dataclass(frozen=True)
class ResultRecord:
    """What the box remembers of one model's output on one result (box-local)."""

    result_id: str
    model: str
    version: str
    at: float
    needs_review: bool
    study_ref: str
    finding: str
    positive: bool
    positive_label: str
    labels: dict[str, float]
    confidence: float
    uncertainty: float
    review_reasons: tuple[str, ...]
    explanation: dict[str, Any]
    subgroup: dict[str, str]

    def sealed_json(self) -> bytes:
        return json.dumps({
            "study_ref": self.study_ref, "finding": self.finding, "positive": self.positive,
            "positive_label": self.positive_label, "labels": self.labels,
            "confidence": self.confidence, "uncertainty": self.uncertainty,
            "review_reasons": list(self.review_reasons), "explanation": self.explanation,
            "subgroup": self.subgroup}, sort_keys=True).encode()


@dataclass(frozen=True)
class Verdict:
    result_id: str
    model: str
    verdict_id: str
    verdict: str  # agreed | disagreed | indeterminate
    corrected_label: str | None
    note: str | None  # free text: box only
    reviewer: str
    via: str  # mqtt | local
    at: float


@dataclass(frozen=True)
class Joined:
    """A result with its verdict: one row of the performance computation."""

    record: ResultRecord
    verdict: Verdict


def _aad(result_id: str, model: str, what: bytes) -> bytes:
    return what + b"\0" + result_id.encode() + b"\0" + model.encode()


class ReviewStore:
    def __init__(self, path: Path, kek: KeyEncryptionKey) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        # Verdicts stored since this process opened the store: what the performance
        # section's step gate counts (agent/review/service.py), read with the rows.
        self.added = 0
        self._db = open_private_db(path, _SCHEMA)  # FULL: a verdict acked is a verdict kept
        self._kek = kek
        self._key = load_or_create_data_key(self._db, kek)

    # -- results -------------------------------------------------------------------
    def record(self, rec: ResultRecord) -> None:
        """Idempotent: a study processed again after a crash keeps its first record."""
        blob = seal(self._key, rec.sealed_json(), _aad(rec.result_id, rec.model, b"result"))
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO results (result_id, model, version, at, needs_review, "
                "sealed) VALUES (?,?,?,?,?,?)",
                (rec.result_id, rec.model, rec.version, rec.at, int(rec.needs_review), blob))

    def _record(self, row: tuple[Any, ...]) -> ResultRecord:
        result_id, model, version, at, needs, sealed = row
        try:
            d = json.loads(unseal(self._key, bytes(sealed),
                                  _aad(str(result_id), str(model), b"result")))
        except (ValueError, KeyError, CryptoError) as exc:
            raise StorageError(f"review record of result {result_id} cannot be read "
                               f"({type(exc).__name__})") from None
        return ResultRecord(
            result_id=str(result_id), model=str(model), version=str(version), at=float(at),
            needs_review=bool(needs), study_ref=str(d["study_ref"]), finding=str(d["finding"]),
            positive=bool(d["positive"]), positive_label=str(d["positive_label"]),
            labels={str(k): float(v) for k, v in d["labels"].items()},
            confidence=float(d["confidence"]), uncertainty=float(d["uncertainty"]),
            review_reasons=tuple(d["review_reasons"]), explanation=dict(d["explanation"]),
            subgroup={str(k): str(v) for k, v in d["subgroup"].items()})

    _COLS = "r.result_id, r.model, r.version, r.at, r.needs_review, r.sealed"

    def results_of(self, result_id: str) -> list[ResultRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLS} FROM results r WHERE result_id=? "
                                    "ORDER BY model", (result_id,)).fetchall()
        return [self._record(r) for r in rows]

    def waiting(self) -> list[ResultRecord]:
        """Flagged results without a verdict, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLS} FROM results r LEFT JOIN verdicts v "
                "ON v.result_id = r.result_id AND v.model = r.model "
                "WHERE r.needs_review = 1 AND v.result_id IS NULL "
                "ORDER BY r.at, r.result_id, r.model").fetchall()
        return [self._record(r) for r in rows]

    def backlog(self, now: float, escalate_after: float) -> dict[str, Any]:
        """Counts and ages only (no unsealing): telemetry, status and escalation."""
        with self._lock:
            n, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(r.at) FROM results r LEFT JOIN verdicts v "
                "ON v.result_id = r.result_id AND v.model = r.model "
                "WHERE r.needs_review = 1 AND v.result_id IS NULL").fetchone()
            over = self._db.execute(
                "SELECT COUNT(*) FROM results r LEFT JOIN verdicts v "
                "ON v.result_id = r.result_id AND v.model = r.model "
                "WHERE r.needs_review = 1 AND v.result_id IS NULL AND r.at < ?",
                (now - escalate_after,)).fetchone()[0]
        return {"waiting": int(n), "oldest_age_s": round(max(0.0, now - oldest), 1)
                if oldest is not None else 0.0, "overdue": int(over)}

    def to_escalate(self, now: float, escalate_after: float) -> list[tuple[str, str, float]]:
        """(result id, model, at) of overdue flagged results not yet escalated; marks them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.result_id, r.model, r.at FROM results r LEFT JOIN verdicts v "
                "ON v.result_id = r.result_id AND v.model = r.model "
                "WHERE r.needs_review = 1 AND v.result_id IS NULL AND r.escalated IS NULL "
                "AND r.at < ? ORDER BY r.at", (now - escalate_after,)).fetchall()
            self._db.executemany("UPDATE results SET escalated=? WHERE result_id=? AND model=?",
                                 [(now, r[0], r[1]) for r in rows])
        return [(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    # -- verdicts ------------------------------------------------------------------
    def verdict_of(self, result_id: str, model: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT verdict_id, verdict, reviewer, via, at, sealed FROM verdicts "
                "WHERE result_id=? AND model=?", (result_id, model)).fetchone()
        return None if row is None else self._verdict(result_id, model, row)

    def _verdict(self, result_id: str, model: str, row: tuple[Any, ...]) -> Verdict:
        verdict_id, verdict, reviewer, via, at, sealed = row
        d = json.loads(unseal(self._key, bytes(sealed), _aad(result_id, model, b"verdict")))
        return Verdict(result_id, model, str(verdict_id), str(verdict), d.get("corrected_label"),
                       d.get("note"), str(reviewer), str(via), float(at))

    def add_verdict(self, v: Verdict) -> bool:
        """Store the first verdict of (result, model); False when one is already there."""
        blob = seal(self._key, json.dumps({"corrected_label": v.corrected_label,
                                           "note": v.note}).encode(),
                    _aad(v.result_id, v.model, b"verdict"))
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO verdicts (result_id, model, verdict_id, verdict, "
                "reviewer, via, at, sealed) VALUES (?,?,?,?,?,?,?,?)",
                (v.result_id, v.model, v.verdict_id, v.verdict, v.reviewer, v.via, v.at, blob))
            if cur.rowcount == 1:
                self.added += 1
            return cur.rowcount == 1

    def joined(self, since: float = 0.0) -> Iterator[Joined]:
        """Results with their verdicts, for verdicts given at or after ``since``."""
        return self.joined_counted(since)[1]

    def joined_counted(self, since: float = 0.0) -> tuple[int, Iterator[Joined]]:
        """``joined`` and ``added`` as of the same moment: the rows hold exactly the
        verdicts stored up to that count (a verdict stored meanwhile is in neither)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLS}, v.verdict_id, v.verdict, v.reviewer, v.via, v.at, "
                "v.sealed FROM results r JOIN verdicts v ON v.result_id = r.result_id "
                "AND v.model = r.model WHERE v.at >= ? ORDER BY v.at", (since,)).fetchall()
            added = self.added

        def unsealed() -> Iterator[Joined]:
            for row in rows:
                rec = self._record(row[:6])
                yield Joined(rec, self._verdict(rec.result_id, rec.model, row[6:]))
        return added, unsealed()

    # -- upkeep --------------------------------------------------------------------
    def expire(self, retention_days: int, now: float | None = None) -> int:
        cutoff = (now or time.time()) - retention_days * 86400.0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM verdicts WHERE (result_id, model) IN (SELECT "
                             "result_id, model FROM results WHERE at < ?)", (cutoff,))
            n = self._db.execute("DELETE FROM results WHERE at < ?", (cutoff,)).rowcount
            self._db.execute("COMMIT")
        return int(n)

    def rewrap(self, new: KeyEncryptionKey) -> None:
        with self._lock:
            self._db.execute("UPDATE meta SET v=? WHERE k='data_key'", (new.wrap(self._key),))
            self._kek = new

    def close(self) -> None:
        with self._lock:
            self._db.close()
