"""Study assembly: when an open study version is complete.

DICOM has no "end of study": a version is closed when the modality said so (an
MPPS COMPLETED or DISCONTINUED, or a Storage Commitment request, whose listed
instances are all in: agent.store.completion), when it holds the instance count its
sender's ``[[study.completion]]`` rule expects, or the series count it expects
and the last series went quiet for the rule's series quiet period, when it went quiet (the rule's quiet
period, else ``[study]``'s: the fallback), hit an instance or byte bound, or got too
old; a follow-up instance then opens a new version.  Every function here runs inside the caller's index transaction and
returns the ids it changed, so the inbox can forget its cached open versions.

May import: agent.config, agent.types.
"""

from __future__ import annotations

import sqlite3

from agent.config import StudySettings
from agent.store import completion
from agent.types import StudyCompletion


def drop_stale_empty(db: sqlite3.Connection, older_than: float) -> list[int]:
    """Open versions that have held nothing since ``older_than`` (a process that
    died between opening one and its first commit): deleted, their ids returned."""
    gone = [int(r[0]) for r in db.execute(
        "SELECT id FROM studies WHERE state='open' AND n_instances=0 AND last_at < ?",
        (older_than,))]
    for sid in gone:
        db.execute("DELETE FROM studies WHERE id=?", (sid,))
    return gone


def complete_due(db: sqlite3.Connection, s: StudySettings, now: float) -> list[int]:
    """Close open studies that were declared complete, went quiet or hit a bound;
    returns their ids."""
    closed: list[int] = []
    for done in completion.take_satisfied(db, now, s.max_age_seconds):
        for sid in done.study_ids:
            row = db.execute("SELECT state, n_instances FROM studies WHERE id=?",
                             (sid,)).fetchone()
            if row is None or row[0] != "open" or not row[1]:
                continue  # completed meanwhile (by its timer or another trigger)
            if not completion.allows(completion.study_rule(db, s, sid), done.source):
                continue
            db.execute("UPDATE studies SET state='complete', completion=?, completed_at=? "
                       "WHERE id=?", (done.source, now, sid))
            closed.append(sid)
    rows = db.execute(
        "SELECT id, first_at, last_at, n_instances, n_bytes FROM studies WHERE state='open'"
    ).fetchall()
    for sid, first_at, last_at, n, nbytes in rows:
        if last_at > now or first_at > now:
            # The wall clock stepped backwards (NTP, RTC reset): times in
            # the future would hold the study for the size of the step.
            # Restart its quiet period and age from the step instead.
            last_at, first_at = min(last_at, now), min(first_at, now)
            db.execute("UPDATE studies SET last_at=?, first_at=? WHERE id=?",
                       (last_at, first_at, sid))
        reason: StudyCompletion | None = None
        rule = completion.study_rule(db, s, int(sid))
        series_at = completion.series_due(db, rule, int(sid), last_at)
        if rule is not None and rule.expected_instances and n >= rule.expected_instances:
            reason = "expected_count"
        elif series_at is not None and now >= series_at:
            reason = "expected_series"
        elif n >= s.max_instances:
            reason = "max_instances"
        elif nbytes >= s.max_bytes:
            reason = "max_bytes"
        elif now - last_at >= completion.quiet_seconds(s, rule) and n > 0:
            reason = "quiet"
        elif now - first_at >= s.max_age_seconds and n > 0:
            reason = "max_age"
        if reason is not None:
            db.execute(
                "UPDATE studies SET state='complete', completion=?, completed_at=? WHERE id=?",
                (reason, now, sid),
            )
            closed.append(int(sid))
    return closed


def complete_all(db: sqlite3.Connection, now: float) -> list[int]:
    """Close every open study that holds an instance (run-to-empty mode)."""
    ids = [int(r[0]) for r in db.execute(
        "SELECT id FROM studies WHERE state='open' AND n_instances > 0").fetchall()]
    for sid in ids:
        db.execute(
            "UPDATE studies SET state='complete', completion='shutdown', completed_at=? "
            "WHERE id=?", (now, sid))
    return ids


def next_due(db: sqlite3.Connection, s: StudySettings) -> float | None:
    """The earliest wall-clock time an open study completes by its quiet
    period or age, if nothing else arrives; None when no study is open."""
    if s.completion:  # per-sender quiet periods: the few open versions one by one
        due = []
        for sid, first_at, last_at in db.execute(
                "SELECT id, first_at, last_at FROM studies "
                "WHERE state='open' AND n_instances > 0").fetchall():
            rule = completion.study_rule(db, s, int(sid))
            at = min(last_at + completion.quiet_seconds(s, rule), first_at + s.max_age_seconds)
            series_at = completion.series_due(db, rule, int(sid), last_at)
            due.append(at if series_at is None else min(at, series_at))
        return float(min(due)) if due else None
    row = db.execute(
        "SELECT MIN(MIN(last_at + ?, first_at + ?)) FROM studies "
        "WHERE state='open' AND n_instances > 0",
        (s.quiet_seconds, s.max_age_seconds)).fetchone()
    return float(row[0]) if row is not None and row[0] is not None else None
