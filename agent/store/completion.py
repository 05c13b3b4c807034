"""What says a study is complete besides the clock: MPPS, Storage Commitment, rules.

Owns the index tables of completion triggers and the per-sender rules:

* ``mpps``: the Modality Performed Procedure Step instances the DICOM node created
  (N-CREATE) and their state (IN PROGRESS, COMPLETED, DISCONTINUED), by the keyed
  hash of their SOP Instance UID (no UID is stored in the clear);
* ``expectations`` + ``expected_instances``: sets of instances a modality declared
  complete (the Performed Series Sequence of an MPPS COMPLETED or DISCONTINUED, the
  Referenced SOP Sequence of a Storage Commitment request).  Assembly
  (agent.store.assembly) completes the open study versions that hold them as soon
  as every listed instance is in the inbox, and forgets an expectation after
  ``[study] max_age_seconds`` (its instances never came, or were processed already);
  MPPS steps untouched for a day (or ``max_age_seconds``, if longer) are forgotten;
* ``[[study.completion]]`` rules: per calling AE title and modality, a quiet period,
  an expected instance count, a series trigger (so many distinct series, by the keyed
  hash of their Series Instance UID in the instance rows, and the last one quiet for
  a short while), and whether MPPS and commitment may complete a study.

The tables live in the inbox index, so receive worker processes write them in the
same database the assembler reads (one transaction each, WAL) and a restart resumes
them.  May import: agent.config, agent.store.index, agent.store.pending_reports.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.config import CompletionRule, StudySettings
from agent.store.index import Index
from agent.store.pending_reports import PendingReports

SCHEMA = """
CREATE TABLE IF NOT EXISTS mpps (
    instance_key TEXT PRIMARY KEY,  -- keyed hash of the MPPS SOP Instance UID
    state TEXT NOT NULL,            -- IN PROGRESS | COMPLETED | DISCONTINUED
    study_key TEXT NOT NULL,        -- of the first scheduled step's Study Instance UID
    calling_ae TEXT NOT NULL,
    performed TEXT NOT NULL DEFAULT '[]',  -- JSON: instance keys of the Performed Series
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS expectations (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,           -- mpps | mpps_discontinued | commitment
    calling_ae TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS expected_instances (
    expectation_id INTEGER NOT NULL REFERENCES expectations(id),
    instance_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS expected_by_expectation ON expected_instances(expectation_id);
"""

# Completion reasons of the triggers (agent.types.StudyCompletion).
MPPS = "mpps"
MPPS_DISCONTINUED = "mpps_discontinued"
COMMITMENT = "commitment"
MPPS_KEEP = 86400.0  # seconds an untouched MPPS step is kept

# The modality of a study, from the SOP class of its first instance (the index keeps
# no header values; the class is enough to tell CT from MR from US ...).
_STORAGE = "1.2.840.10008.5.1.4.1.1."
MODALITY_OF_CLASS: dict[str, str] = {
    **{_STORAGE + s: "CT" for s in ("2", "2.1", "2.2")},
    **{_STORAGE + s: "MR" for s in ("4", "4.1", "4.2", "4.3", "4.4")},
    _STORAGE + "1": "CR",
    **{_STORAGE + s: "DX" for s in ("1.1", "1.1.1")},
    **{_STORAGE + s: "MG" for s in ("1.2", "1.2.1", "13.1.3")},
    **{_STORAGE + s: "US" for s in ("6.1", "6.2", "3.1")},
    _STORAGE + "20": "NM",
    **{_STORAGE + s: "PT" for s in ("128", "130", "128.1")},
    **{_STORAGE + s: "XA" for s in ("12.1", "12.1.1")},
    **{_STORAGE + s: "RF" for s in ("12.2", "12.2.1")},
    **{_STORAGE + s: "OT" for s in ("7", "7.1", "7.2", "7.3", "7.4")},
}


def modality_of(sop_class: str) -> str:
    return MODALITY_OF_CLASS.get(sop_class, "OT")


def rule_for(rules: Iterable[CompletionRule], calling_ae: str, sop_class: str
             ) -> CompletionRule | None:
    """The first rule that matches the sender and the modality; None: ``[study]``."""
    modality = modality_of(sop_class)
    for rule in rules:
        if rule.calling_ae not in ("*", calling_ae):
            continue
        if rule.modality not in ("*", modality):
            continue
        return rule
    return None


def first_instance(db: sqlite3.Connection, study_id: int) -> tuple[str, str]:
    """(calling AE title, SOP class) of a study version's first instance."""
    row = db.execute("SELECT calling_ae, sop_class FROM instances WHERE study_id=? "
                     "ORDER BY id LIMIT 1", (study_id,)).fetchone()
    return (str(row[0]), str(row[1])) if row is not None else ("", "")


def study_rule(db: sqlite3.Connection, s: StudySettings, study_id: int) -> CompletionRule | None:
    if not s.completion:
        return None
    return rule_for(s.completion, *first_instance(db, study_id))


def quiet_seconds(s: StudySettings, rule: CompletionRule | None) -> float:
    return rule.quiet_seconds if rule is not None and rule.quiet_seconds else s.quiet_seconds


def series_due(db: sqlite3.Connection, rule: CompletionRule | None, study_id: int,
               last_at: float) -> float | None:
    """When the series trigger completes a study version: ``last_at`` + the rule's
    series quiet period once it holds ``expected_series`` distinct series; None
    when the rule has no series trigger or too few series are in yet."""
    if rule is None or not rule.expected_series:
        return None
    (n,) = db.execute("SELECT COUNT(DISTINCT series_key) FROM instances "
                      "WHERE study_id=? AND series_key != ''", (study_id,)).fetchone()
    return last_at + rule.series_quiet_seconds if int(n) >= rule.expected_series else None


def allows(rule: CompletionRule | None, source: str) -> bool:
    """Whether a trigger of ``source`` may complete a study under ``rule``."""
    if rule is None:
        return True
    return rule.use_commitment if source == COMMITMENT else rule.use_mpps


@dataclass(frozen=True)
class Satisfied:
    """An expectation whose instances are all in: the study versions holding them."""

    source: str
    study_ids: tuple[int, ...]


def take_satisfied(db: sqlite3.Connection, now: float, max_age: float) -> list[Satisfied]:
    """Expectations whose every listed instance is in the index (deleted, returned),
    and those older than ``max_age`` (deleted: their instances never came, or were
    processed and shredded already).  Runs in the caller's transaction."""
    out: list[Satisfied] = []
    # Steps untouched for a day (or max_age, if longer) are forgotten: an N-SET
    # after that gets 0x0112, and the table does not grow with every procedure.
    db.execute("DELETE FROM mpps WHERE updated_at < ?", (now - max(max_age, MPPS_KEEP),))
    rows = db.execute("SELECT id, source, created_at FROM expectations").fetchall()
    for eid, source, created_at in rows:
        missing = db.execute(
            "SELECT COUNT(*) FROM expected_instances e WHERE e.expectation_id=? AND NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.instance_key=e.instance_key)", (eid,)).fetchone()[0]
        if missing == 0:
            ids = tuple(int(r[0]) for r in db.execute(
                "SELECT DISTINCT i.study_id FROM expected_instances e JOIN instances i "
                "ON i.instance_key=e.instance_key WHERE e.expectation_id=?", (eid,)))
            out.append(Satisfied(str(source), ids))
        elif now - float(created_at) < max_age:
            continue
        db.execute("DELETE FROM expected_instances WHERE expectation_id=?", (eid,))
        db.execute("DELETE FROM expectations WHERE id=?", (eid,))
    return out


def pending_expectations(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM expectations").fetchone()[0])


class CompletionStore:
    """The node's side: MPPS state, expectations, and which instances the inbox holds.

    Every method is one short index transaction (or a read) and may raise
    sqlite3.Error; the DICOM handlers answer a failure status then."""

    def __init__(self, index: Index, instance_key: Callable[[str], str],
                 study_key: Callable[[str], str], reports: PendingReports) -> None:
        """``reports``: the Storage Commitment reports still owed (sealed, retried)."""
        self._index = index
        self.reports = reports
        self._ikey = instance_key
        self._skey = study_key
        with index.lock:
            index.db.executescript(SCHEMA)

    # -- MPPS ---------------------------------------------------------------------

    def mpps_create(self, mpps_uid: str, study_uid: str, calling_ae: str) -> bool:
        """Record a new MPPS IN PROGRESS; False when the instance exists already."""
        now = time.time()
        with self._index.tx() as db:
            try:
                db.execute("INSERT INTO mpps (instance_key, state, study_key, calling_ae, "
                           "created_at, updated_at) VALUES (?,?,?,?,?,?)",
                           (self._ikey(mpps_uid), "IN PROGRESS",
                            self._skey(study_uid) if study_uid else "", calling_ae, now, now))
            except sqlite3.IntegrityError:
                return False
        return True

    def mpps_state(self, mpps_uid: str) -> str | None:
        with self._index.lock:
            row = self._index.db.execute("SELECT state FROM mpps WHERE instance_key=?",
                                         (self._ikey(mpps_uid),)).fetchone()
        return str(row[0]) if row is not None else None

    def mpps_set(self, mpps_uid: str, state: str, performed: list[str] | None,
                 calling_ae: str) -> tuple[str, int]:
        """An N-SET: ("unknown", 0) when no such MPPS, ("final", 0) when it is
        COMPLETED or DISCONTINUED already (it may no longer be updated), else
        ("ok", n): its state and, when given, its performed instances replaced (an
        N-SET replaces the whole Performed Series Sequence); on a final state, in the
        same transaction, the ``n`` performed instances become an expectation."""
        now = time.time()
        with self._index.tx() as db:
            row = db.execute("SELECT state, performed FROM mpps WHERE instance_key=?",
                             (self._ikey(mpps_uid),)).fetchone()
            if row is None:
                return "unknown", 0
            if row[0] != "IN PROGRESS":
                return "final", 0
            keys: list[str] = (list(dict.fromkeys(self._ikey(u) for u in performed))
                               if performed is not None else list(json.loads(row[1])))
            db.execute("UPDATE mpps SET state=?, performed=?, updated_at=? WHERE instance_key=?",
                       (state, json.dumps(keys), now, self._ikey(mpps_uid)))
            if state != "IN PROGRESS" and keys:
                source = MPPS if state == "COMPLETED" else MPPS_DISCONTINUED
                self._expect_keys(db, source, keys, calling_ae, now)
        return "ok", len(keys)

    def ref(self, uid: str) -> str:
        """A pseudonymous reference to a UID for logs and audit records."""
        return self._ikey(uid)[:12]

    # -- Storage Commitment ---------------------------------------------------------

    def held(self, sop_uids: Iterable[str]) -> dict[str, str]:
        """The SOP class of each listed instance the inbox holds durably (its index row
        is committed only after the sealed file was fsynced), by SOP Instance UID."""
        out: dict[str, str] = {}
        with self._index.lock:
            for uid in sop_uids:
                row = self._index.db.execute(
                    "SELECT sop_class FROM instances WHERE instance_key=? LIMIT 1",
                    (self._ikey(uid),)).fetchone()
                if row is not None:
                    out[uid] = str(row[0])
        return out

    def expect(self, source: str, sop_uids: list[str], calling_ae: str) -> None:
        """These instances form a complete set (a commitment request)."""
        if not sop_uids:
            return
        with self._index.tx() as db:
            self._expect(db, source, sop_uids, calling_ae, time.time())

    def _expect(self, db: sqlite3.Connection, source: str, sop_uids: list[str],
                calling_ae: str, now: float) -> None:
        self._expect_keys(db, source, [self._ikey(u) for u in dict.fromkeys(sop_uids)],
                          calling_ae, now)

    @staticmethod
    def _expect_keys(db: sqlite3.Connection, source: str, keys: list[str], calling_ae: str,
                     now: float) -> None:
        eid = db.execute("INSERT INTO expectations (source, calling_ae, created_at) "
                         "VALUES (?,?,?)", (source, calling_ae, now)).lastrowid
        db.executemany("INSERT INTO expected_instances (expectation_id, instance_key) "
                       "VALUES (?,?)", [(eid, k) for k in keys])
