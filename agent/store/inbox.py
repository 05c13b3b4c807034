"""The durable inbox: the facade the DICOM node and the pipeline use.

A C-STORE is acknowledged only after ``Inbox.commit`` (or ``store``) returns: the
instance is sealed under its study's data key and written with its own index
record after it (record), fdatasynced, and the index row committed (without an
fsync of its own: a row a power cut takes back is rebuilt from the file at start,
reconcile).  The parts live next to this module: the sealed instance files and
their slots (files), the record each file carries (record), the SQLite index
(index) and the start-up reconciliation of files and index (reconcile), the byte
budget and disk reserve (capacity), study completion (assembly) and the receipt
journal of audit records (receipts).  This module ties them together: study and
instance keys, the open study versions, dedupe of a repeated SOP Instance UID,
reading back, shredding, and re-wrapping the data keys under a new KEK.

A restart resumes exactly where the previous process stopped (``open`` studies keep
collecting, ``complete`` and ``processing`` studies are processed again; results are
idempotent by id).  May import: agent.config, agent.crypto, agent.errors,
agent.fileperm, agent.types, agent.ops.faults (test hooks, inert in production)
and the modules of agent.store.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from agent.config import InboxSettings, StudySettings
from agent.crypto import KeyEncryptionKey, fsync_dir, hmac_sha256, random_key
from agent.errors import StorageError
from agent.ops import faults
from agent.store import assembly, capacity, reconcile
from agent.store.completion import CompletionStore
from agent.store.files import PendingWrite, Slots, file_digest, open_sealed, reseal
from agent.store.index import Index
from agent.store.pending_reports import PendingReports
from agent.store.receipts import ReceiptAudit, ReceiptJournal, StoreOutcome, StoreReceipt
from agent.store.record import InstanceRecord
from agent.types import ReceivedInstance, Study

__all__ = ["Inbox", "PendingWrite", "ReceiptAudit", "StoreOutcome", "StoreReceipt"]

log = logging.getLogger(__name__)


class Inbox:
    """Encrypted, fsynced instance storage and the on-disk assembly state."""

    def __init__(
        self,
        root: Path,
        kek: KeyEncryptionKey,
        pseudonym_key: bytes,
        settings: InboxSettings,
        study: StudySettings,
        *,
        worker: int | None = None,
    ) -> None:
        """``worker``: this Inbox belongs to receive worker process N (see
        agent/recvpool.py).  It then takes slots from its own directory, does
        no start-up recovery (the main process did it before any worker ran)
        and reads the pending byte count from the index, which every process
        updates."""
        self.root = root
        self.files = root / "files"
        self._slot_root = self.files / "slots"
        self.slots = self._slot_root if worker is None else self._slot_root / f"w{worker}"
        self.tmp = root / "tmp"
        for d in (self.root, self.files, self._slot_root, self.slots, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if worker is not None:
            fsync_dir(self._slot_root)  # the worker's slot directory itself must survive a crash
        self._kek = kek
        self._pkey = pseudonym_key
        self.settings = settings
        self.study_settings = study
        self._index = Index(root, shared=worker is not None)
        self._db = self._index.db
        self._lock = self._index.lock
        self._tx = self._index.tx
        self._receipts = ReceiptJournal(self._index)
        # MPPS state and declared-complete instance sets (agent.store.completion).
        self.completion = CompletionStore(self._index, self.instance_key, self.study_key,
                                          PendingReports(self._index, kek))
        self._slots = Slots(self.slots)
        self._free = self._slots.free  # the empty slots (crash-recovery tests look at them)
        if worker is None:
            # Partial writes from a crash were never acknowledged: drop them.
            for p in self.tmp.iterdir():
                p.unlink(missing_ok=True)
        self._pending_bytes = self._index.pending_bytes()
        # Open study versions: id, version and unwrapped data key, so that the
        # hot path opens no transaction before it streams.
        # (id, version, data key, wrapped data key) by study key.
        self._open: dict[str, tuple[int, int, bytes, bytes]] = {}
        if worker is None:
            # Before anything else looks at the index: instance files it lost are
            # indexed again, rows whose file is gone are dropped (both audited).
            with self._tx() as db:
                reconcile.run(db, self.root, self._slot_root, self._kek, self._receipts)
            self._index.sync()
            self._refresh_pending()
            used = {str(r[0]) for r in self._db.execute(
                "SELECT file FROM instances WHERE file LIKE 'files/slots/%'")}
            self._slots.recover(self.root, self._slot_root, used)
            # Nothing streams yet: an empty open version is a leftover of a crash.
            with self._tx() as db:
                self._forget_open(assembly.drop_stale_empty(db, float("inf")))

    # -- keys and names ---------------------------------------------------

    def study_key(self, study_uid: str) -> str:
        return hmac_sha256(self._pkey, b"study", study_uid.encode()).hex()[:32]

    def instance_key(self, sop_uid: str) -> str:
        return hmac_sha256(self._pkey, b"instance", sop_uid.encode()).hex()[:32]

    def series_key(self, series_uid: str) -> str:
        """"" for an instance without a Series Instance UID (it counts as no series)."""
        if not series_uid:
            return ""
        return hmac_sha256(self._pkey, b"series", series_uid.encode()).hex()[:32]

    # -- capacity -----------------------------------------------------------

    def check_capacity(self, incoming: int = 0) -> None:
        """Raise OutOfResources when the disk reserve or byte budget is hit."""
        if self._index.shared:
            self._refresh_pending()
        capacity.check(self.root, self.settings, self._pending_bytes, incoming)

    def _refresh_pending(self) -> None:
        """Other processes commit and finish studies too: re-read the sum (indexed)."""
        self._pending_bytes = self._index.pending_bytes()

    def share_with_workers(self) -> None:
        """Receive worker processes commit into this index too: read the byte count
        from it and take the index lock for every transaction."""
        self._index.share()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    # -- store ----------------------------------------------------------------

    def _aborted(self, pending: PendingWrite) -> None:
        """A write dropped uncommitted (a refused or broken C-STORE)."""
        self._slots.release(pending.path)
        if pending.new_study:
            # The study version this write opened holds nothing: drop it rather
            # than leave an open row forever.
            self._drop_if_empty(pending.study_id)

    def _drop_if_empty(self, study_id: int) -> None:
        """Delete an open study version that holds no instance.

        Safe against writes still streaming into it (here or in another
        process): their commit finds no open version and re-seals the instance
        under a new one, as for a version completed meanwhile."""
        try:
            with self._tx() as db:
                db.execute("DELETE FROM studies WHERE id=? AND state='open' AND n_instances=0",
                           (study_id,))
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot drop an empty study version: %s", exc)
        self._forget_open([study_id])

    def _forget_open(self, study_ids: list[int]) -> None:
        gone = set(study_ids)
        with self._lock:
            for skey in [k for k, v in self._open.items() if v[0] in gone]:
                del self._open[skey]

    def _data_key(self, db: sqlite3.Connection, study_id: int) -> bytes:
        row = db.execute("SELECT wrapped_key FROM studies WHERE id=?", (study_id,)).fetchone()
        if row is None or row[0] is None:
            raise StorageError(f"study row {study_id} has no data key (shredded)")
        return self._kek.unwrap(bytes(row[0]))

    def _open_study(self, db: sqlite3.Connection, skey: str,
                    now: float) -> tuple[int, int, bool, bytes]:
        """The open version of a study, creating one (a follow-up) when needed:
        (id, version, created now, wrapped data key)."""
        row = db.execute(
            "SELECT id, version, state, wrapped_key FROM studies WHERE study_key=? "
            "ORDER BY version DESC LIMIT 1",
            (skey,),
        ).fetchone()
        if row is not None and row[2] == "open" and row[3] is not None:
            return int(row[0]), int(row[1]), False, bytes(row[3])
        version = 1 if row is None else int(row[1]) + 1
        wrapped = self._kek.wrap(random_key())
        cur = db.execute(
            "INSERT INTO studies (study_key, version, state, wrapped_key, first_at, last_at) "
            "VALUES (?,?,?,?,?,?)",
            (skey, version, "open", wrapped, now, now),
        )
        return int(cur.lastrowid or 0), version, True, wrapped

    def begin(self, study_uid: str, *, size_hint: int = 0,
              sop_uid: str | None = None) -> PendingWrite:
        """Open a streaming write into the study's open version.

        The caller feeds the Part 10 bytes with ``PendingWrite.write`` as they
        arrive and then calls ``commit``; only ``commit`` makes the instance
        durable and indexed.  Plaintext never touches the disk: every byte is
        sealed under the study version's data key before it is written.
        """
        self.check_capacity(size_hint)
        skey = self.study_key(study_uid)
        with self._lock:
            cached = self._open.get(skey)
        new_study = False
        if cached is None:
            with self._tx() as db:
                study_id, version, new_study, wrapped = self._open_study(db, skey, time.time())
            # The version's data key must outlive a power cut before anything is
            # sealed under it (files are indexed again from it at start), also
            # when another thread or process created it and may not have synced
            # yet: once per study version and process.
            self._index.sync()
            cached = (study_id, version, self._kek.unwrap(wrapped), wrapped)
            with self._lock:
                self._open[skey] = cached
        study_id, version, data_key, wrapped = cached
        pending = PendingWrite(self._slots.take(), skey, study_id, version, new_study,
                               data_key, wrapped, on_abort=self._aborted)
        if sop_uid is not None and self._known_instance(skey, sop_uid):
            pending.hash_content()  # a re-send: its digest will be compared at commit
        return pending

    def _known_instance(self, skey: str, sop_uid: str) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM instances i JOIN studies s ON s.id=i.study_id "
                "WHERE s.study_key=? AND i.instance_key=? LIMIT 1",
                (skey, self.instance_key(sop_uid))).fetchone() is not None

    def store(
        self,
        src: BinaryIO,
        *,
        study_uid: str,
        sop_uid: str,
        sop_class: str,
        transfer_syntax: str,
        calling_ae: str,
        peer: str,
        size_hint: int = 0,
        series_uid: str = "",
    ) -> StoreReceipt:
        """Seal the Part 10 stream ``src`` durably; return once it is safe to ack."""
        pending = self.begin(study_uid, size_hint=size_hint)
        try:
            while True:
                block = src.read(1 << 20)
                if not block:
                    break
                pending.write(block)
            return self.commit(pending, sop_uid=sop_uid, sop_class=sop_class,
                               transfer_syntax=transfer_syntax, calling_ae=calling_ae, peer=peer,
                               series_uid=series_uid)
        finally:
            pending.abort()

    def commit(
        self,
        pending: PendingWrite,
        *,
        sop_uid: str,
        sop_class: str,
        transfer_syntax: str,
        calling_ae: str,
        peer: str,
        audit: ReceiptAudit | None = None,
        series_uid: str = "",
    ) -> StoreReceipt:
        """fsync, dedupe and index a streamed instance; return once it is safe to ack.

        With ``audit``, the receipt's audit record is journaled in the same
        transaction as the index row (see ``pending_receipts``): an acknowledged
        instance never lacks its audit record, and no second fsync is paid for it.
        """
        tmp, skey, aad = pending.path, pending.study_key, pending.study_key.encode()
        study_id, version, new_study = pending.study_id, pending.version, pending.new_study
        ikey = self.instance_key(sop_uid)
        series = self.series_key(series_uid)
        now = time.time()

        def record(size: int, version: int) -> InstanceRecord:
            return InstanceRecord(skey, version, ikey, size, sop_class, transfer_syntax,
                                  calling_ae, peer, now, series)

        # The file with its own index record is durable from here on: the index
        # commit below needs no fsync (a row a power cut takes back is rebuilt).
        size = pending.finish(lambda n: record(n, version).seal(pending.data_key))
        faults.hang_point("inbox_index")
        resealed = False
        try:
            with self._tx() as db:
                dup = db.execute(
                    "SELECT i.id, i.sha256, i.file, s.id FROM instances i "
                    "JOIN studies s ON s.id=i.study_id WHERE s.study_key=? AND i.instance_key=?",
                    (skey, ikey),
                ).fetchall()
                # Content digests are taken only when a SOP Instance UID repeats
                # (hashing every instance cost a tenth of the receiving CPU).
                sha = ((pending.content_digest() or file_digest(tmp, pending.data_key, aad))
                       if dup else "")
                if any(self._stored_digest(db, r) == sha for r in dup):
                    inst = ReceivedInstance(skey, ikey, Path(), size, sha, sop_class,
                                            transfer_syntax, calling_ae, peer, now)
                    receipt = StoreReceipt("duplicate", inst, version, new_study)
                    self._receipts.add(db, audit, receipt)
                    return receipt
                # The study version may have been completed (or, empty, dropped)
                # while we were writing: the instance then belongs to another
                # version, whose data key differs, so re-seal it (rare path).
                # Compared by wrapped key: the id of a dropped version can recur.
                study_id2, version2, new2, wrapped2 = self._open_study(db, skey, now)
                if wrapped2 != pending.wrapped_key:
                    new_key = self._kek.unwrap(wrapped2)
                    reseal(tmp, pending.data_key, new_key, aad,
                           record(size, version2).seal(new_key))
                    study_id, version, new_study = study_id2, version2, new2
                    resealed = True
                    with self._lock:
                        self._open[skey] = (study_id, version, new_key, wrapped2)
                outcome: StoreOutcome = "conflict" if dup else "stored"
                dest = tmp
                db.execute(
                    "INSERT INTO instances (study_id, instance_key, sha256, file, size, sop_class, "
                    "transfer_syntax, calling_ae, peer, received_at, flag, series_key) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (study_id, ikey, sha, str(dest.relative_to(self.root)), size, sop_class,
                     transfer_syntax, calling_ae, peer, now, "conflict" if dup else None,
                     series),
                )
                db.execute(
                    "UPDATE studies SET last_at=?, n_instances=n_instances+1, n_bytes=n_bytes+? "
                    "WHERE id=?",
                    (now, size, study_id),
                )
                inst = ReceivedInstance(skey, ikey, dest, size, sha, sop_class, transfer_syntax,
                                        calling_ae, peer, now)
                receipt = StoreReceipt(outcome, inst, version, new_study)
                self._receipts.add(db, audit, receipt)
                self._pending_bytes += size
            if resealed:
                self._index.sync()  # the version's data key, as in begin (a rare path)
            pending.committed = True
            return receipt
        finally:
            pending.abort()

    def _stored_digest(self, db: sqlite3.Connection, row: Sequence[Any]) -> str:
        """The digest of an indexed instance, computed and recorded on first need."""
        inst_id, sha, rel, study_id = int(row[0]), str(row[1]), str(row[2]), int(row[3])
        if sha:
            return sha
        skey = db.execute("SELECT study_key FROM studies WHERE id=?", (study_id,)).fetchone()[0]
        sha = file_digest(self.root / rel, self._data_key(db, study_id), str(skey).encode())
        db.execute("UPDATE instances SET sha256=? WHERE id=?", (sha, inst_id))
        return sha

    # -- journaled receipt audit records ----------------------------------------

    def journal(self, entry: Mapping[str, object]) -> None:
        """Journal one audit record (event, outcome, source, details) durably.

        Receive worker processes cannot append to the hash-chained audit log
        (one writer keeps the chain); their records go here and the main
        process moves them over with the receipts.
        """
        self._receipts.journal(entry)

    def pending_receipts(self, limit: int = 1000) -> list[tuple[int, int, dict[str, object]]]:
        """Journaled receipt audit records not yet drained, oldest first: (id, ts_us, entry)."""
        return self._receipts.pending(limit)

    def drop_receipts(self, upto: int, *, now: bool = False) -> None:
        """Records up to ``upto`` are durable in the audit log: delete them (see
        ReceiptJournal.drop)."""
        self._receipts.drop(upto, now=now)

    # -- assembly ---------------------------------------------------------------

    def complete_due(self, now: float | None = None) -> list[int]:
        """Close open studies that went quiet or hit a bound; returns their ids."""
        now = time.time() if now is None else now
        s = self.study_settings
        with self._tx() as db:
            self._forget_open(assembly.drop_stale_empty(db, now - s.max_age_seconds))
            closed = assembly.complete_due(db, s, now)
            self._forget_open(closed)
        return closed

    def next_due(self) -> float | None:
        """The earliest wall-clock time an open study completes by its quiet
        period or age, if nothing else arrives; None when no study is open."""
        with self._lock:
            return assembly.next_due(self._db, self.study_settings)

    def complete_all(self) -> list[int]:
        """Close every open study now (run-to-empty mode)."""
        with self._tx() as db:
            ids = assembly.complete_all(db, time.time())
            self._forget_open(ids)
        return ids

    def ready(self) -> list[Study]:
        """Completed studies not yet turned into a result, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM studies WHERE state='complete' ORDER BY completed_at, id"
            ).fetchall()
        return [self.study(int(r[0])) for r in rows]

    def study(self, study_id: int) -> Study:
        with self._lock:
            row = self._db.execute(
                "SELECT study_key, version, completion, first_at, last_at, completed_at "
                "FROM studies WHERE id=?", (study_id,)).fetchone()
            if row is None:
                raise StorageError(f"no study row {study_id}")
            inst = self._db.execute(
                "SELECT instance_key, file, size, sha256, sop_class, transfer_syntax, calling_ae, "
                "peer, received_at FROM instances WHERE study_id=? ORDER BY id", (study_id,)
            ).fetchall()
        instances = tuple(
            ReceivedInstance(row[0], i[0], self.root / i[1], int(i[2]), i[3], i[4], i[5], i[6],
                             i[7], float(i[8]))
            for i in inst
        )
        return Study(
            study_id=study_id, study_key=row[0], version=int(row[1]), instances=instances,
            completion=row[2] or "quiet", first_received_at=float(row[3]),
            last_received_at=float(row[4]), completed_at=float(row[5] or 0.0),
        )

    def iter_read(self, study: Study, inst: ReceivedInstance) -> Iterator[bytes]:
        """Decrypt one stored instance chunk by chunk (bounded memory, authenticated)."""
        with self._lock:
            key = self._data_key(self._db, study.study_id)
        yield from open_sealed(inst.path, key, study.study_key.encode(),
                               f"instance {inst.instance_key[:12]}")

    def read(self, study: Study, inst: ReceivedInstance) -> bytes:
        """Decrypt one stored instance (authenticated)."""
        return b"".join(self.iter_read(study, inst))

    def mark_done(self, study: Study) -> None:
        """Result is in the outbox: shred the study's key and delete its files."""
        with self._tx() as db:
            db.execute("UPDATE studies SET state='done', wrapped_key=NULL WHERE id=?",
                       (study.study_id,))
            db.execute("DELETE FROM instances WHERE study_id=?", (study.study_id,))
            self._pending_bytes = max(0, self._pending_bytes - sum(i.size for i in study.instances))
        # Durable before the files go: a power cut must not bring back rows
        # whose files are gone (nor files whose study is shredded).
        self._index.sync()
        for inst in study.instances:
            if inst.path.parent == self.slots:
                self._slots.release(inst.path)  # reused, already unreadable (key shredded)
            else:
                inst.path.unlink(missing_ok=True)

    def note_attempt(self, study: Study) -> int:
        with self._tx() as db:
            db.execute("UPDATE studies SET attempts=attempts+1 WHERE id=?", (study.study_id,))
            row = db.execute("SELECT attempts FROM studies WHERE id=?", (study.study_id,)).fetchone()
        return int(row[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        if self._index.shared:
            self._refresh_pending()
        out = {"open": 0, "complete": 0, "done": 0}
        out.update({str(r[0]): int(r[1]) for r in rows})
        out["pending_bytes"] = self._pending_bytes
        return out

    def rewrap(self, old: KeyEncryptionKey, new: KeyEncryptionKey) -> int:
        with self._tx() as db:
            rows = db.execute("SELECT id, wrapped_key FROM studies WHERE wrapped_key IS NOT NULL").fetchall()
            for sid, wrapped in rows:
                db.execute("UPDATE studies SET wrapped_key=? WHERE id=?",
                           (new.wrap(old.unwrap(bytes(wrapped))), sid))
        reports = self.completion.reports.rewrap(old, new)  # commitment reports owed
        self._index.sync()  # before the old KEK may go
        return len(rows) + reports

    def close(self) -> None:
        self._index.close()
