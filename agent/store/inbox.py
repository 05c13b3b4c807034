"""The durable inbox: encrypted instance files plus a SQLite index of studies.

A C-STORE is acknowledged only after ``Inbox.store`` returns: the instance is
sealed under its study's data key, written, fsynced, renamed into place, the
directory fsynced, and the index row committed with ``synchronous=FULL``.

The index is also the study assembly state, so a restart resumes exactly where
the previous process stopped (``open`` studies keep collecting, ``complete`` and
``processing`` studies are processed again; results are idempotent by id).

File names are derived from keyed hashes, never from UIDs or dataset values,
so nothing a peer sends can steer a path.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from agent.config import InboxSettings, StudySettings
from agent.crypto import (
    KeyEncryptionKey,
    StreamWriter,
    fsync_dir,
    hmac_sha256,
    iter_open_stream,
    random_key,
)
from agent.errors import CryptoError, OutOfResources, StorageError
from agent.fileperm import open_private, private_db
from agent.types import ReceivedInstance, Study, StudyCompletion

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_key TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,            -- open | complete | done
    wrapped_key BLOB,               -- NULL once shredded
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    n_bytes INTEGER NOT NULL DEFAULT 0,
    completion TEXT,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_key, version)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    instance_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,  -- of the plaintext; '' until a repeated SOP Instance UID needs it
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    flag TEXT                       -- NULL | conflict
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_id);
CREATE INDEX IF NOT EXISTS instances_key ON instances(instance_key);
-- Audit records of acknowledged instances, committed in the instance's own index
-- transaction (one fsync makes both durable) and moved to the audit log in batches.
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY,
    ts_us INTEGER NOT NULL,
    entry TEXT NOT NULL             -- JSON: event, outcome, source, details (no PHI values)
);
"""

StoreOutcome = Literal["stored", "duplicate", "conflict"]
# Builds the audit record of a receipt (event, outcome, source, details) inside
# the index transaction, once the outcome is known.
ReceiptAudit = Callable[["StoreReceipt"], Mapping[str, object]]


# Start write-back of a large instance every this many bytes while it streams in,
# so the fdatasync before Success only has the tail left to flush.
EARLY_FLUSH_BYTES = 4 << 20


def _datasync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError:
        pass  # only an early start; finish() does the fdatasync that counts
    finally:
        os.close(fd)


class PendingWrite:
    """An instance being streamed into the inbox, sealed as it arrives.

    Nothing is acknowledged until ``Inbox.commit``; ``abort`` (idempotent)
    drops the partial file.  Partial files left by a crash are removed at the
    next start because they were never acknowledged.
    """

    def __init__(self, inbox: Inbox, path: Path, study_key: str, study_id: int, version: int,
                 new_study: bool, data_key: bytes, wrapped_key: bytes) -> None:
        self.path = path
        self.study_key = study_key
        self.study_id = study_id
        self.version = version
        self.new_study = new_study
        self.data_key = data_key
        # Identifies the study version this write is sealed for: row ids can be
        # reused once an empty version is deleted, wrapped keys (random) cannot.
        self.wrapped_key = wrapped_key
        self._digest: Any = None  # hashlib sha256 while streaming, for a known re-send
        self._fh: BinaryIO | None = open(path, "r+b")  # noqa: SIM115 - closed in finish/abort
        self._writer = StreamWriter(data_key, self._fh, study_key.encode())
        self._inbox = inbox
        self.committed = False
        self._flush_mark = 0
        self._flusher: threading.Thread | None = None

    @property
    def size(self) -> int:
        return self._writer.plain_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fh is None:
            raise StorageError("write to a closed inbox file")
        if self._digest is not None:
            self._digest.update(data)
        self._writer.write(data)
        if self._writer.plain_bytes - self._flush_mark >= EARLY_FLUSH_BYTES:
            self._flush_mark = self._writer.plain_bytes
            self._early_flush()

    def hash_content(self) -> None:
        """Digest the plaintext as it streams (before the first write)."""
        if self._writer.plain_bytes == 0:
            self._digest = hashlib.sha256()

    def content_digest(self) -> str | None:
        return self._digest.hexdigest() if self._digest is not None else None

    def _early_flush(self) -> None:
        """Let the disk work while the rest of the instance arrives (off this thread)."""
        if self._fh is None or (self._flusher is not None and self._flusher.is_alive()):
            return
        try:
            self._fh.flush()
            fd = os.dup(self._fh.fileno())
        except OSError:
            return  # the write path reports real errors; this is only a head start
        self._flusher = threading.Thread(target=_datasync_and_close, args=(fd,),
                                         name="inbox-early-flush", daemon=True)
        self._flusher.start()

    def finish(self) -> int:
        """Seal the last chunk and fsync; returns the plaintext size."""
        if self._fh is None:
            raise StorageError("inbox file was already closed")
        try:
            self._writer.close()
            self._fh.flush()
            # fdatasync still flushes the file size; the inode times it skips are
            # not needed to read the instance back.
            os.fdatasync(self._fh.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write the inbox: {exc.strerror}") from None
        finally:
            self._fh.close()
            self._fh = None
        return self._writer.plain_bytes

    def abort(self) -> None:
        """Drop an uncommitted write (idempotent; no-op after commit)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self.committed:
            self.committed = True  # release once
            self._inbox._release_slot(self.path)
            if self.new_study:
                # The study version this write opened holds nothing (a refused
                # C-STORE): drop it rather than leave an open row forever.
                self._inbox._drop_if_empty(self.study_id)


@dataclass(frozen=True)
class StoreReceipt:
    outcome: StoreOutcome
    instance: ReceivedInstance
    study_version: int
    new_study: bool


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
        self._shared = worker is not None
        self._xlock: int | None = None
        for d in (self.root, self.files, self._slot_root, self.slots, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if worker is not None:
            fsync_dir(self._slot_root)  # the worker's slot directory itself must survive a crash
            self._open_xlock()
        self._kek = kek
        self._pkey = pseudonym_key
        self.settings = settings
        self.study_settings = study
        self._lock = threading.RLock()
        self._seq = itertools.count()
        self._db = sqlite3.connect(private_db(root / "index.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=60000")  # worker processes share the index
        self._db.executescript(_SCHEMA)
        if worker is None:
            self._clean_tmp()
        self._pending_bytes = self._sum_pending()
        self._receipts_drained = 0  # ids <= this are in the audit log
        self._receipts_deleted = 0
        # Open study versions: id, version and unwrapped data key, so that the
        # hot path opens no transaction before it streams.
        # (id, version, data key, wrapped data key) by study key.
        self._open: dict[str, tuple[int, int, bytes, bytes]] = {}
        self._free: collections.deque[Path] = collections.deque()
        if worker is None:
            self._recover_slots()
            # Nothing streams yet: an empty open version is a leftover of a crash.
            with self._tx() as db:
                self._drop_stale_empty(db, float("inf"))

    # -- keys and names ---------------------------------------------------

    def study_key(self, study_uid: str) -> str:
        return hmac_sha256(self._pkey, b"study", study_uid.encode()).hex()[:32]

    def instance_key(self, sop_uid: str) -> str:
        return hmac_sha256(self._pkey, b"instance", sop_uid.encode()).hex()[:32]

    # -- slots ----------------------------------------------------------------
    #
    # Instance files are pre-created empty in batches ("slots") and written in
    # place, so acknowledging an instance costs one file fsync and one index
    # commit; the directory fsync that a create or rename needs is paid once
    # per batch.  A slot not referenced by the index holds nothing that was
    # acknowledged: it is emptied and reused.

    _SLOT_BATCH = 32

    def _recover_slots(self) -> None:
        used = {str(r[0]) for r in self._db.execute(
            "SELECT file FROM instances WHERE file LIKE 'files/slots/%'")}
        for p in sorted(self._slot_root.iterdir()):
            if p.is_dir():
                # A receive worker's slots: whatever is not indexed was never
                # acknowledged.  Removed rather than recycled, because only this
                # process's own directory is recycled (no worker runs yet).
                for q in sorted(p.iterdir()):
                    if str(q.relative_to(self.root)) not in used:
                        q.unlink(missing_ok=True)
                continue
            if str(p.relative_to(self.root)) in used:
                continue
            if p.suffix != ".enc":
                p.unlink(missing_ok=True)
                continue
            if p.stat().st_size:
                os.truncate(p, 0)
            self._free.append(p)

    def _take_slot(self) -> Path:
        with self._lock:
            if not self._free:
                for _ in range(self._SLOT_BATCH):
                    p = self.slots / f"{os.urandom(8).hex()}.enc"
                    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    self._free.append(p)
                fsync_dir(self.slots)
            return self._free.popleft()

    def _release_slot(self, path: Path) -> None:
        """Empty a slot and make it available again (it never held an ack)."""
        try:
            os.truncate(path, 0)
        except FileNotFoundError:
            return
        with self._lock:
            self._free.append(path)

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

    def _drop_stale_empty(self, db: sqlite3.Connection, older_than: float) -> None:
        """Open versions that have held nothing since ``older_than`` (a process that
        died between opening one and its first commit)."""
        gone = [int(r[0]) for r in db.execute(
            "SELECT id FROM studies WHERE state='open' AND n_instances=0 AND last_at < ?",
            (older_than,))]
        for sid in gone:
            db.execute("DELETE FROM studies WHERE id=?", (sid,))
        self._forget_open(gone)

    def _clean_tmp(self) -> None:
        # Partial writes from a crash were never acknowledged: drop them.
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)

    def _sum_pending(self) -> int:
        row = self._db.execute(  # by the state index: done studies pile up over the years
            "SELECT COALESCE(SUM(n_bytes),0) FROM studies WHERE state IN ('open', 'complete')"
        ).fetchone()
        return int(row[0])

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # Between processes, SQLite's own busy wait sleeps 1 ms or more per
            # retry; a blocking flock hands the index over as soon as it is free.
            if self._xlock is not None:
                fcntl.flock(self._xlock, fcntl.LOCK_EX)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if self._xlock is not None:
                    fcntl.flock(self._xlock, fcntl.LOCK_UN)

    # -- capacity -----------------------------------------------------------

    def check_capacity(self, incoming: int = 0) -> None:
        """Raise OutOfResources when the disk reserve or byte budget is hit."""
        if self._shared:
            self._refresh_pending()
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.settings.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB is below the reserve "
                f"{self.settings.min_free_bytes // 2**20} MiB",
                hint="free space on the state volume or lower [inbox] min_free_bytes",
            )
        if self._pending_bytes + incoming > self.settings.max_bytes:
            raise OutOfResources(
                f"inbox holds {self._pending_bytes // 2**20} MiB, budget "
                f"{self.settings.max_bytes // 2**20} MiB",
                hint="wait for processing to catch up or raise [inbox] max_bytes",
            )

    def _refresh_pending(self) -> None:
        """Other processes commit and finish studies too: re-read the sum (indexed)."""
        with self._lock:
            self._pending_bytes = self._sum_pending()

    def share_with_workers(self) -> None:
        """Receive worker processes commit into this index too: read the byte count
        from it and take the index lock for every transaction."""
        self._shared = True
        self._open_xlock()

    def _open_xlock(self) -> None:
        if self._xlock is None:
            self._xlock = os.open(self.root / "index.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                  0o600)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    # -- store ----------------------------------------------------------------

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
            cached = (study_id, version, self._kek.unwrap(wrapped), wrapped)
            with self._lock:
                self._open[skey] = cached
        study_id, version, data_key, wrapped = cached
        pending = PendingWrite(self, self._take_slot(), skey, study_id, version, new_study,
                               data_key, wrapped)
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
                               transfer_syntax=transfer_syntax, calling_ae=calling_ae, peer=peer)
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
    ) -> StoreReceipt:
        """fsync, dedupe and index a streamed instance; return once it is safe to ack.

        With ``audit``, the receipt's audit record is journaled in the same
        transaction as the index row (see ``pending_receipts``): an acknowledged
        instance never lacks its audit record, and no second fsync is paid for it.
        """
        size = pending.finish()
        tmp, skey, aad = pending.path, pending.study_key, pending.study_key.encode()
        study_id, version, new_study = pending.study_id, pending.version, pending.new_study
        ikey = self.instance_key(sop_uid)
        now = time.time()
        try:
            with self._tx() as db:
                dup = db.execute(
                    "SELECT i.id, i.sha256, i.file, s.id FROM instances i "
                    "JOIN studies s ON s.id=i.study_id WHERE s.study_key=? AND i.instance_key=?",
                    (skey, ikey),
                ).fetchall()
                # Content digests are taken only when a SOP Instance UID repeats
                # (hashing every instance cost a tenth of the receiving CPU).
                sha = ((pending.content_digest() or self._file_digest(tmp, pending.data_key, aad))
                       if dup else "")
                if any(self._stored_digest(db, r) == sha for r in dup):
                    inst = ReceivedInstance(skey, ikey, Path(), size, sha, sop_class,
                                            transfer_syntax, calling_ae, peer, now)
                    receipt = StoreReceipt("duplicate", inst, version, new_study)
                    self._journal(db, audit, receipt)
                    return receipt
                # The study version may have been completed (or, empty, dropped)
                # while we were writing: the instance then belongs to another
                # version, whose data key differs, so re-seal it (rare path).
                # Compared by wrapped key: the id of a dropped version can recur.
                study_id2, version2, new2, wrapped2 = self._open_study(db, skey, now)
                if wrapped2 != pending.wrapped_key:
                    new_key = self._kek.unwrap(wrapped2)
                    self._rekey(tmp, pending.data_key, new_key, aad)
                    study_id, version, new_study = study_id2, version2, new2
                    with self._lock:
                        self._open[skey] = (study_id, version, new_key, wrapped2)
                outcome: StoreOutcome = "conflict" if dup else "stored"
                dest = tmp
                db.execute(
                    "INSERT INTO instances (study_id, instance_key, sha256, file, size, sop_class, "
                    "transfer_syntax, calling_ae, peer, received_at, flag) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (study_id, ikey, sha, str(dest.relative_to(self.root)), size, sop_class,
                     transfer_syntax, calling_ae, peer, now, "conflict" if dup else None),
                )
                db.execute(
                    "UPDATE studies SET last_at=?, n_instances=n_instances+1, n_bytes=n_bytes+? "
                    "WHERE id=?",
                    (now, size, study_id),
                )
                inst = ReceivedInstance(skey, ikey, dest, size, sha, sop_class, transfer_syntax,
                                        calling_ae, peer, now)
                receipt = StoreReceipt(outcome, inst, version, new_study)
                self._journal(db, audit, receipt)
                self._pending_bytes += size
            pending.committed = True
            return receipt
        finally:
            pending.abort()

    @staticmethod
    def _file_digest(path: Path, key: bytes, aad: bytes) -> str:
        """sha256 of an inbox file's plaintext (authenticated while read)."""
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for chunk in iter_open_stream(key, fh, aad):
                    h.update(chunk)
        except (OSError, CryptoError) as exc:
            raise StorageError(f"cannot read back an inbox file: {exc}") from None
        return h.hexdigest()

    def _stored_digest(self, db: sqlite3.Connection, row: Sequence[Any]) -> str:
        """The digest of an indexed instance, computed and recorded on first need."""
        inst_id, sha, rel, study_id = int(row[0]), str(row[1]), str(row[2]), int(row[3])
        if sha:
            return sha
        skey = db.execute("SELECT study_key FROM studies WHERE id=?", (study_id,)).fetchone()[0]
        sha = self._file_digest(self.root / rel, self._data_key(db, study_id), str(skey).encode())
        db.execute("UPDATE instances SET sha256=? WHERE id=?", (sha, inst_id))
        return sha

    def _journal(self, db: sqlite3.Connection, audit: ReceiptAudit | None,
                 receipt: StoreReceipt) -> None:
        if audit is None:
            return
        db.execute("INSERT INTO receipts (ts_us, entry) VALUES (?, ?)",
                   (time.time_ns() // 1000, json.dumps(dict(audit(receipt)), default=str)))
        self._delete_drained(db)

    def _delete_drained(self, db: sqlite3.Connection) -> None:
        # Rides on a transaction that commits anyway: deleting what the audit log
        # already holds needs no fsync of its own (re-delivery is deduplicated).
        if self._receipts_drained > self._receipts_deleted:
            # The newest row always stays: SQLite numbers a row max(id) + 1, so an
            # emptied table would restart at 1, below the drained mark here and the
            # audit log's ingested mark, and those records would never be moved.
            db.execute("DELETE FROM receipts WHERE id <= ? AND id < (SELECT MAX(id) FROM receipts)",
                       (self._receipts_drained,))
            self._receipts_deleted = self._receipts_drained

    # -- journaled receipt audit records ----------------------------------------

    def journal(self, entry: Mapping[str, object]) -> None:
        """Journal one audit record (event, outcome, source, details) durably.

        Receive worker processes cannot append to the hash-chained audit log
        (one writer keeps the chain); their records go here and the main
        process moves them over with the receipts.
        """
        with self._tx() as db:
            db.execute("INSERT INTO receipts (ts_us, entry) VALUES (?, ?)",
                       (time.time_ns() // 1000, json.dumps(dict(entry), default=str)))

    def pending_receipts(self, limit: int = 1000) -> list[tuple[int, int, dict[str, object]]]:
        """Journaled receipt audit records not yet drained, oldest first: (id, ts_us, entry)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ts_us, entry FROM receipts WHERE id > ? ORDER BY id LIMIT ?",
                (self._receipts_drained, limit)).fetchall()
        return [(int(r[0]), int(r[1]), json.loads(r[2])) for r in rows]

    def drop_receipts(self, upto: int, *, now: bool = False) -> None:
        """Records up to ``upto`` are durable in the audit log: delete them.

        The delete is folded into the next index transaction unless ``now``
        (the drainer passes it when intake is idle or stopping).
        """
        with self._lock:
            self._receipts_drained = max(self._receipts_drained, upto)
            if not now or self._receipts_drained <= self._receipts_deleted:
                return
        with self._tx() as db:
            self._delete_drained(db)

    def _rekey(self, path: Path, old: bytes, new: bytes, aad: bytes) -> None:
        out = path.with_suffix(".rekey")
        with open(path, "rb") as src, open_private(out) as fh:
            w = StreamWriter(new, fh, aad)
            for chunk in iter_open_stream(old, src, aad):
                w.write(chunk)
            w.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(out, path)
        fsync_dir(path.parent)

    # -- assembly ---------------------------------------------------------------

    def complete_due(self, now: float | None = None) -> list[int]:
        """Close open studies that went quiet or hit a bound; returns their ids."""
        now = time.time() if now is None else now
        s = self.study_settings
        closed: list[int] = []
        with self._tx() as db:
            self._drop_stale_empty(db, now - s.max_age_seconds)
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
                if n >= s.max_instances:
                    reason = "max_instances"
                elif nbytes >= s.max_bytes:
                    reason = "max_bytes"
                elif now - last_at >= s.quiet_seconds and n > 0:
                    reason = "quiet"
                elif now - first_at >= s.max_age_seconds and n > 0:
                    reason = "max_age"
                if reason is not None:
                    db.execute(
                        "UPDATE studies SET state='complete', completion=?, completed_at=? WHERE id=?",
                        (reason, now, sid),
                    )
                    closed.append(int(sid))
            self._forget_open(closed)
        return closed

    def next_due(self) -> float | None:
        """The earliest wall-clock time an open study completes by its quiet
        period or age, if nothing else arrives; None when no study is open."""
        s = self.study_settings
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(MIN(last_at + ?, first_at + ?)) FROM studies "
                "WHERE state='open' AND n_instances > 0",
                (s.quiet_seconds, s.max_age_seconds)).fetchone()
        return float(row[0]) if row is not None and row[0] is not None else None

    def _forget_open(self, study_ids: list[int]) -> None:
        gone = set(study_ids)
        with self._lock:
            for skey in [k for k, v in self._open.items() if v[0] in gone]:
                del self._open[skey]

    def complete_all(self) -> list[int]:
        """Close every open study now (run-to-empty mode)."""
        now = time.time()
        with self._tx() as db:
            ids = [int(r[0]) for r in db.execute(
                "SELECT id FROM studies WHERE state='open' AND n_instances > 0").fetchall()]
            for sid in ids:
                db.execute(
                    "UPDATE studies SET state='complete', completion='shutdown', completed_at=? "
                    "WHERE id=?", (now, sid))
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
        try:
            with open(inst.path, "rb") as fh:
                yield from iter_open_stream(key, fh, study.study_key.encode())
        except FileNotFoundError:
            raise StorageError(f"inbox file for instance {inst.instance_key[:12]} is missing") from None
        except CryptoError as exc:
            raise StorageError(f"inbox file for instance {inst.instance_key[:12]}: {exc}") from None

    def read(self, study: Study, inst: ReceivedInstance) -> bytes:
        """Decrypt one stored instance (authenticated)."""
        with self._lock:
            key = self._data_key(self._db, study.study_id)
        try:
            with open(inst.path, "rb") as fh:
                return b"".join(iter_open_stream(key, fh, study.study_key.encode()))
        except FileNotFoundError:
            raise StorageError(f"inbox file for instance {inst.instance_key[:12]} is missing") from None
        except CryptoError as exc:
            raise StorageError(f"inbox file for instance {inst.instance_key[:12]}: {exc}") from None

    def mark_done(self, study: Study) -> None:
        """Result is in the outbox: shred the study's key and delete its files."""
        with self._tx() as db:
            db.execute("UPDATE studies SET state='done', wrapped_key=NULL WHERE id=?",
                       (study.study_id,))
            db.execute("DELETE FROM instances WHERE study_id=?", (study.study_id,))
            self._pending_bytes = max(0, self._pending_bytes - sum(i.size for i in study.instances))
        for inst in study.instances:
            if inst.path.parent == self.slots:
                self._release_slot(inst.path)  # reused, already unreadable (key shredded)
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
        if self._shared:
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
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._xlock is not None:
                os.close(self._xlock)
                self._xlock = None
