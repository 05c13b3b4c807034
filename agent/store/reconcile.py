"""Start-up reconciliation of the inbox's files and its index.

The index commit of an instance is not fsynced (agent.store.index): a power cut
may take back its newest rows, and a kill -9 may fall between an instance file
made durable and its row.  Every instance file ends with its own index record
(agent.store.record), so at start, before anything reads the index:

* a complete, authentic instance file that no row references is indexed again
  from its record (dedupe and conflict rules as at commit), with an audit record
  (``instance.received`` or ``instance.conflict``, ``recovered``): it may have
  been acknowledged;
* a row whose file is missing or empty is dropped, with a ``security.alert``
  audit record and an error in the log: the index no longer pretends to hold it;
* anything else not referenced (a partial write, a file sealed under a study
  version that is gone or shredded, a duplicate) never held an acknowledged
  instance and is emptied by ``Slots.recover`` as before.

Files written before records existed carry none; they were indexed durably when
they were received (``synchronous=FULL`` then) and are read as before.

May import: agent.crypto, agent.errors, agent.store.files, agent.store.record,
agent.store.receipts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from agent.crypto import KeyEncryptionKey
from agent.errors import EdgeAgentError, StorageError
from agent.store.files import file_digest, iter_stream
from agent.store.receipts import ReceiptJournal
from agent.store.record import MAGIC, InstanceRecord, read_trailer

log = logging.getLogger(__name__)

# Tokens, not sentences: audit detail values that look like free text are redacted
# when records are shown or leave the box.
RECOVERED = "reindexed_from_own_record"
DROPPED = "index_row_without_file_dropped"


@dataclass(frozen=True)
class Found:
    """An unindexed instance file that authenticates completely."""

    rel: str
    study_id: int
    record: InstanceRecord
    sha256: str


@dataclass(frozen=True)
class Summary:
    reindexed: int
    duplicates: int
    dropped: int
    earlier_format: int


def run(db: sqlite3.Connection, root: Path, slot_root: Path, kek: KeyEncryptionKey,
        receipts: ReceiptJournal) -> Summary:
    """Reconcile inside the caller's index transaction (nothing else runs yet)."""
    dropped, earlier = _drop_orphans(db, root, receipts)
    indexed = {str(r[0]) for r in db.execute("SELECT file FROM instances")}
    found = []
    for p in sorted([*slot_root.glob("*.enc"), *slot_root.glob("*/*.enc")]):
        rel = str(p.relative_to(root))
        if rel not in indexed:
            f = _authentic(db, root, rel, kek)
            if f is not None:
                found.append(f)
    reindexed = duplicates = 0
    for f in sorted(found, key=lambda f: f.record.received_at):  # in the order received
        if _index(db, root, kek, receipts, f):
            reindexed += 1
        else:
            duplicates += 1
    if reindexed or duplicates:
        log.warning("inbox: %d instance file(s) the index did not hold (a crash or power cut "
                    "between the file and its index commit) were indexed again from their own "
                    "records; %d were repeats of indexed instances", reindexed, duplicates)
    if earlier:
        log.info("inbox: %d pending instance file(s) were written by an earlier version "
                 "(without their own index record); they are read as before", earlier)
    return Summary(reindexed, duplicates, dropped, earlier)


def _drop_orphans(db: sqlite3.Connection, root: Path,
                  receipts: ReceiptJournal) -> tuple[int, int]:
    """Drop rows whose file is missing or empty; count files without a record."""
    rows = db.execute(
        "SELECT i.id, i.file, i.size, i.instance_key, s.id, s.study_key, s.version "
        "FROM instances i JOIN studies s ON s.id=i.study_id").fetchall()
    dropped = earlier = 0
    emptied: set[int] = set()
    for iid, rel, size, ikey, sid, skey, version in rows:
        path = root / str(rel)
        try:
            with open(path, "rb") as fh:
                n = os.fstat(fh.fileno()).st_size
                present = n > 0
                if n >= len(MAGIC):
                    fh.seek(-len(MAGIC), os.SEEK_END)
                    earlier += fh.read(len(MAGIC)) != MAGIC
        except FileNotFoundError:
            present = False
        except OSError as exc:
            log.warning("inbox: cannot check an instance file (%s)", exc)
            present = True  # not proof that it is gone
        if present:
            continue
        db.execute("DELETE FROM instances WHERE id=?", (iid,))
        db.execute("UPDATE studies SET n_instances=MAX(0, n_instances-1), "
                   "n_bytes=MAX(0, n_bytes-?) WHERE id=?", (int(size), sid))
        emptied.add(int(sid))
        receipts.record(db, {
            "event": "security.alert", "outcome": "serious_failure", "source": None,
            "details": {"reason": DROPPED,
                        "instance": str(ikey)[:12], "study": str(skey)[:12],
                        "version": int(version), "bytes": int(size)}})
        log.error("inbox: instance %s of study %s v%d is indexed but its file is missing or "
                  "empty: the row was dropped (audited as security.alert); the study is "
                  "processed without it", str(ikey)[:12], str(skey)[:12], int(version))
        dropped += 1
    for sid in emptied:
        # A completed version left with nothing would be processed as an empty study.
        db.execute("DELETE FROM studies WHERE id=? AND n_instances=0 AND state='complete'",
                   (sid,))
    return dropped, earlier


def _authentic(db: sqlite3.Connection, root: Path, rel: str,
               kek: KeyEncryptionKey) -> Found | None:
    """The file's record if the file is complete and authentic under its study
    version's data key; None for anything that never held an acknowledged instance."""
    try:
        with open(root / rel, "rb") as fh:
            trailer = read_trailer(fh)
            if trailer is None:
                return None
            row = db.execute("SELECT id, wrapped_key FROM studies WHERE study_key=? AND version=?",
                             (trailer.study_key, trailer.version)).fetchone()
            if row is None or row[1] is None:
                return None  # that version is gone or shredded: never acknowledged into it
            key = kek.unwrap(bytes(row[1]))
            record = trailer.open(key)
            if record is None:
                return None
            h, n = hashlib.sha256(), 0
            for chunk in iter_stream(fh, key, trailer.study_key.encode()):
                h.update(chunk)
                n += len(chunk)
            if n != record.size:
                return None
    except (OSError, EdgeAgentError) as exc:
        log.warning("inbox: an unindexed file could not be read back (%s); it is emptied", exc)
        return None
    return Found(rel, int(row[0]), record, h.hexdigest())


def _index(db: sqlite3.Connection, root: Path, kek: KeyEncryptionKey,
           receipts: ReceiptJournal, f: Found) -> bool:
    """Index a found file as commit would have; False for a repeat of an indexed one."""
    r = f.record
    dup = db.execute(
        "SELECT i.id, i.sha256, i.file, s.wrapped_key FROM instances i "
        "JOIN studies s ON s.id=i.study_id WHERE s.study_key=? AND i.instance_key=?",
        (r.study_key, r.instance_key)).fetchall()
    for iid, sha, rel, wrapped in dup:
        if not sha and wrapped is not None:
            try:
                sha = file_digest(root / str(rel), kek.unwrap(bytes(wrapped)),
                                  r.study_key.encode())
            except (StorageError, EdgeAgentError):
                continue
            db.execute("UPDATE instances SET sha256=? WHERE id=?", (sha, iid))
        if sha == f.sha256:
            return False
    db.execute(
        "INSERT INTO instances (study_id, instance_key, sha256, file, size, sop_class, "
        "transfer_syntax, calling_ae, peer, received_at, flag, series_key) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (f.study_id, r.instance_key, f.sha256 if dup else "", f.rel, r.size, r.sop_class,
         r.transfer_syntax, r.calling_ae, r.peer, r.received_at, "conflict" if dup else None,
         r.series_key))
    db.execute("UPDATE studies SET n_instances=n_instances+1, n_bytes=n_bytes+?, "
               "last_at=MAX(last_at, ?) WHERE id=?", (r.size, r.received_at, f.study_id))
    receipts.record(db, {
        "event": "instance.conflict" if dup else "instance.received", "outcome": "success",
        "source": r.peer,
        "details": {"calling_ae": r.calling_ae, "instance": r.instance_key[:12],
                    "study": r.study_key[:12], "version": r.version, "bytes": r.size,
                    "recovered": RECOVERED}})
    return True
