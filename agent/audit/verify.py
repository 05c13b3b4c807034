"""Verify an audit database: chain, decryption, checkpoints, gaps, truncation.

Every problem names the exact record seq, day or checkpoint number, so an
investigator knows where to look.  The verifier trusts only the genesis
public key (given explicitly, or the one pinned in the database) and, when
given, the checkpoints published to central ops: those cannot be rewritten
by someone with root on the box.

Three outcomes: INTACT; DAMAGED (problems found, each named); NOT VERIFIABLE
(the history cannot be judged from the box alone: the database is missing
while the anchor says the box had a log, or this log began after an earlier
one went missing).  A damaged SQLite file (truncated, overwritten) is a
DAMAGED report of what could be read, never a traceback.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.crypto import KeyEncryptionKey
from agent.errors import AuditError, EdgeAgentError

from . import anchor
from .checkpoint import Checkpoint, Ratchet, check_signature, checkpoint_from_json, evolve, public_bytes
from .store import ZERO_HASH, Store, connect, genesis_prev, open_record, record_hash


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    problems: list[str]
    notes: list[str] = field(default_factory=list)
    records: int = 0
    checkpoints: int = 0
    first_seq: int = 0
    last_seq: int = 0
    shredded_through: int = 0
    verifiable: bool = True  # False: cannot be judged without what central ops holds

    @property
    def state(self) -> str:
        if self.ok:
            return "INTACT"
        return "NOT VERIFIABLE" if not self.verifiable else "DAMAGED"

    def summary(self) -> str:
        state = self.state if self.ok else f"{self.state} ({len(self.problems)} problem(s))"
        return (f"audit log {state}: {self.records} records (seq {self.first_seq}.."
                f"{self.last_seq}), {self.checkpoints} checkpoints, shredded through seq "
                f"{self.shredded_through}")


def _public_key(value: Path | bytes | str | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, Path):
        value = value.read_text().strip()
    if isinstance(value, str):
        value = bytes.fromhex(value.strip())
    if len(value) == 64:  # hex given as bytes
        value = bytes.fromhex(value.decode("ascii"))
    if len(value) != 32:
        raise AuditError("the audit public key must be 32 bytes (64 hex characters)")
    return value


def _payload(item: Mapping[str, Any]) -> Any:
    """The audit payload of a published item (or of a CloudEvents envelope around it)."""
    data: Any = item.get("data", item) if "checkpoint" not in item else item
    return json.loads(data) if isinstance(data, str) else data


def _published_checkpoint(item: Mapping[str, Any]) -> Checkpoint:
    data = _payload(item)
    if not isinstance(data, Mapping) or not isinstance(data.get("checkpoint"), Mapping):
        raise AuditError("published item has no checkpoint")
    return checkpoint_from_json(data["checkpoint"])


def _is_events(item: Mapping[str, Any]) -> bool:
    """An events message (published beside its checkpoint): nothing to check it against."""
    try:
        data = _payload(item)
    except ValueError:
        return False
    return isinstance(data, Mapping) and "events" in data and "checkpoint" not in data


def verify(db_path: Path, kek: KeyEncryptionKey,
           public_key_path_or_bytes: Path | bytes | str | None = None,
           published: Sequence[Mapping[str, Any]] = (), *,
           signing_key_path: Path | None = None,
           anchor_path: Path | None = None) -> VerifyReport:
    """Check the whole audit log; ``report.ok`` only when nothing is wrong.

    ``anchor_path``: the anchor file (``<state_dir>/audit-anchor.json`` by default).
    """
    anchor_path = anchor_path or anchor.path_for(db_path)
    try:
        known = anchor.read(anchor_path)
        anchor_problem = None
    except AuditError as exc:
        known, anchor_problem = None, str(exc.args[0])
    if not db_path.exists() and known is not None:
        return VerifyReport(False, [
            f"the audit database {db_path} is missing, but this box had an audit log "
            f"({known.describe()}, per {anchor_path}): its records are gone. Verify what "
            "central ops received (--published) against the genesis key pinned there"],
            verifiable=False)
    trusted = _public_key(public_key_path_or_bytes)
    conn = connect(db_path, readonly=True)
    v = _Verifier(Store(conn), kek)
    if anchor_problem is not None:
        v.notes.append(f"{anchor_problem}: not compared with the anchor")
    try:
        return v.run(trusted, published, signing_key_path, known)
    except sqlite3.DatabaseError as exc:
        return v.damaged(db_path, exc, known)
    finally:
        conn.close()


class _Verifier:
    def __init__(self, store: Store, kek: KeyEncryptionKey) -> None:
        self.store = store
        self.kek = kek
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.unwrappable: set[str] = set()
        self.verifiable = True
        # Progress, for the report of a database that breaks half-way.
        self.read_records = 0
        self.read_last = 0

    def damaged(self, db_path: Path, exc: sqlite3.DatabaseError,
                known: anchor.Anchor | None) -> VerifyReport:
        where = (f"; {self.read_records} record(s) were readable before the damage, "
                 f"up to seq {self.read_last}") if self.read_records else ""
        self.problems.append(f"the audit database {db_path} is damaged (SQLite: {exc}): "
                             f"truncated or overwritten{where}")
        if known is not None:
            self.problems.append(f"the anchor says this log had {known.describe()}")
        return VerifyReport(False, self.problems, self.notes, self.read_records, 0,
                            0, self.read_last, 0)

    def run(self, trusted: bytes | None, published: Sequence[Mapping[str, Any]],
            signing_key_path: Path | None, known: anchor.Anchor | None = None) -> VerifyReport:
        pinned_hex = self.store.meta("genesis_public_key")
        box = self.store.meta("box") or ""
        if pinned_hex is None:
            if trusted is None:
                return VerifyReport(False, ["the database has no pinned genesis key (empty "
                                            "or tampered) and no public key was given"])
            self.problems.append("the database has lost its pinned genesis key")
            pinned = trusted
        else:
            pinned = bytes.fromhex(pinned_hex)
        genesis = trusted or pinned
        if trusted is not None and trusted != pinned:
            self.problems.append(
                f"the genesis key pinned in the database ({pinned.hex()[:16]}...) is not the "
                f"trusted key ({trusted.hex()[:16]}...): the log was re-created")
        if trusted is None:
            self.notes.append(f"trusting the genesis key pinned in the database "
                              f"({genesis.hex()[:16]}...); pin it externally with --public-key")
        self._check_predecessors(trusted)

        checkpoints = self.store.checkpoints()
        good = self._walk_checkpoints(checkpoints, genesis, box)
        floor_seq, floor_hash = self.store.floor()
        wanted = {int(cp.fields["seq"]) for cp in good.values()}
        pub_cps = self._parse_published(published)
        wanted |= {int(cp.fields.get("seq", 0)) for cp in pub_cps}
        hashes, first, last, count, attested = self._walk_records(
            genesis_prev(genesis, box), floor_seq, floor_hash, wanted)

        if floor_seq and not attested:
            self.problems.append(
                f"records 1..{floor_seq} are gone but no audit.retention record attests that "
                "they were crypto-shredded (deleted outside retention)")
        for cp in good.values():
            self._match_checkpoint(cp, "checkpoint", hashes, last, floor_seq, floor_hash,
                                   genesis, box)
        if checkpoints:
            lastcp = checkpoints[-1]
            cp_seq = int(lastcp.fields.get("seq", 0))
            if last > cp_seq:
                self.notes.append(f"{last - cp_seq} record(s) after checkpoint "
                                  f"{lastcp.number} (seq {cp_seq + 1}..{last}) are not yet "
                                  "signed")
        elif count:
            self.notes.append(f"no checkpoint yet: {count} record(s) are not signed")
        self._check_published(pub_cps, checkpoints, genesis, hashes, last, floor_seq,
                              floor_hash, box)
        if signing_key_path is not None:
            self._check_ratchet(signing_key_path, checkpoints, genesis)
        if known is not None:
            self._check_anchor(known, pinned, checkpoints)
        return VerifyReport(not self.problems, self.problems, self.notes, count,
                            len(checkpoints), first, last, floor_seq, self.verifiable)

    # -- what the box knows about earlier logs ------------------------------------------
    def _check_predecessors(self, trusted: bytes | None) -> None:
        """A log that began after another went missing is not verifiable from the box."""
        try:
            earlier = json.loads(self.store.meta("predecessors") or "[]")
        except ValueError:
            self.problems.append("the record of earlier audit logs in the database is malformed")
            return
        for p in earlier if isinstance(earlier, list) else []:
            if not isinstance(p, dict):
                continue
            what = (f"this log replaced a previous audit log that was {p.get('why')} when "
                    f"detected at {p.get('detected')} (genesis "
                    f"{str(p.get('previous_genesis_public_key'))[:16]}..., last checkpoint "
                    f"{p.get('previous_checkpoint')}, seq {p.get('previous_seq')}): its "
                    "records are not here")
            if trusted is None:
                self.verifiable = False
                self.problems.append(
                    f"{what}. Not verifiable from the box alone: verify against the genesis key "
                    "pinned by central ops (--public-key) and the checkpoints it received "
                    "(--published)")
            else:
                self.notes.append(what)

    def _check_anchor(self, known: anchor.Anchor, pinned: bytes,
                      local: list[Checkpoint]) -> None:
        if known.genesis != pinned.hex():
            self.problems.append(
                f"the anchor names genesis key {known.genesis[:16]}... but the database pins "
                f"{pinned.hex()[:16]}...: the database was replaced since the box last ran")
            return
        last = local[-1].number if local else -1
        if known.checkpoint > last:
            self.problems.append(
                f"the anchor records checkpoint {known.checkpoint} (seq {known.seq}, "
                f"{known.time}) but the database ends at checkpoint {last}: checkpoints were "
                "removed or the database was rolled back")

    # -- checkpoints ----------------------------------------------------------
    def _walk_checkpoints(self, cps: list[Checkpoint], genesis: bytes,
                          box: str) -> dict[int, Checkpoint]:
        good: dict[int, Checkpoint] = {}
        expected_pub = genesis
        prev_hash = ZERO_HASH
        prev_ok = True
        prev_seq = 0
        for i, cp in enumerate(cps):
            if cp.number != i:
                self.problems.append(f"checkpoint {i} is missing (the stored checkpoints jump "
                                     f"from {i - 1} to {cp.number})")
                prev_ok = False
            try:
                f = cp.fields
                pub = bytes.fromhex(str(f["public_key"]))
                nxt = bytes.fromhex(str(f["next_public_key"]))
                seq = int(f["seq"])
            except (AuditError, ValueError, KeyError, json.JSONDecodeError):
                self.problems.append(f"checkpoint {cp.number}: body is malformed")
                prev_ok = False
                continue
            ok = True
            if f.get("checkpoint") != cp.number:
                self.problems.append(f"checkpoint {cp.number}: its body says it is checkpoint "
                                     f"{f.get('checkpoint')} (moved or replaced)")
                ok = False
            if pub != expected_pub and prev_ok:
                self.problems.append(
                    f"checkpoint {cp.number}: signed with key {pub.hex()[:16]}..., but the "
                    f"chain expects {expected_pub.hex()[:16]}... (replaced or forged)")
                ok = False
            if not check_signature(pub, cp.body, cp.signature):
                self.problems.append(f"checkpoint {cp.number}: signature is invalid "
                                     "(checkpoint modified or replaced)")
                ok = False
            if prev_ok and f.get("prev") != prev_hash.hex():
                self.problems.append(f"checkpoint {cp.number}: does not link to checkpoint "
                                     f"{cp.number - 1} (a checkpoint was replaced or removed)")
                ok = False
            if f.get("genesis_public_key") != genesis.hex() or f.get("box") != box:
                self.problems.append(f"checkpoint {cp.number}: names another box or "
                                     "genesis key")
                ok = False
            if seq < prev_seq:
                self.problems.append(f"checkpoint {cp.number}: covers seq {seq}, less than "
                                     f"the previous checkpoint's {prev_seq}")
                ok = False
            prev_seq = max(prev_seq, seq)
            if ok:
                good[cp.number] = cp
            expected_pub = nxt
            prev_hash = cp.hash
            prev_ok = ok
        return good

    def _match_checkpoint(self, cp: Checkpoint, what: str, hashes: dict[int, bytes],
                          last: int, floor_seq: int, floor_hash: bytes, genesis: bytes,
                          box: str) -> None:
        f = cp.fields
        seq = int(f["seq"])
        head = str(f["head"])
        if int(f.get("floor_seq", 0)) > floor_seq:
            self.problems.append(
                f"{what} {cp.number}: records were shredded through seq {f.get('floor_seq')} "
                f"but the database claims only through seq {floor_seq}")
        if seq == 0:
            if head != genesis_prev(genesis, box).hex():
                self.problems.append(f"{what} {cp.number}: empty-log head does not match")
            return
        if seq < floor_seq:
            return  # covered records were shredded by retention; nothing left to compare
        if seq == floor_seq:
            if head != floor_hash.hex():
                self.problems.append(f"{what} {cp.number}: head of seq {seq} does not match "
                                     "the retention anchor (shredding was faked)")
            return
        if seq > last:
            self.problems.append(
                f"{what} {cp.number} covers records through seq {seq} but the log ends at seq "
                f"{last}: records {last + 1}..{seq} were truncated")
            return
        h = hashes.get(seq)
        if h is None:
            self.problems.append(f"{what} {cp.number}: its record seq {seq} is missing")
        elif h.hex() != head:
            self.problems.append(
                f"{what} {cp.number}: record seq {seq} no longer hashes to the signed head "
                f"(records up to seq {seq} were rewritten)")

    # -- records --------------------------------------------------------------
    def _walk_records(self, anchor: bytes, floor_seq: int, floor_hash: bytes,
                      wanted: set[int]) -> tuple[dict[int, bytes], int, int, int, bool]:
        expected = floor_seq + 1
        prev = floor_hash if floor_seq else anchor
        prev_day = ""
        first = 0
        last = floor_seq
        count = 0
        attested = False
        hashes: dict[int, bytes] = {}
        keys: dict[str, bytes | None] = {}
        shredded = {d for d, w, _ in self.store.day_rows() if w is None}
        for row in self.store.rows():
            count += 1
            self.read_records, self.read_last = count, row.seq
            first = first or row.seq
            last = row.seq
            gap = row.seq != expected
            if row.seq < expected:
                self.problems.append(f"record seq {row.seq}: lies inside the shredded range "
                                     f"1..{floor_seq}")
            elif gap:
                self.problems.append(f"records seq {expected}..{row.seq - 1} are missing "
                                     "(deleted)")
            elif row.prev != prev:
                self.problems.append(
                    f"record seq {row.seq}: does not link to seq {row.seq - 1} (records "
                    f"reordered, replaced or inserted at seq {row.seq - 1}..{row.seq})")
            actual = record_hash(row.seq, row.day, row.ts_us, row.prev, row.ct)
            if actual != row.hash:
                self.problems.append(f"record seq {row.seq} (day {row.day}): content does not "
                                     "match its hash (modified)")
            if row.day < prev_day:
                self.problems.append(f"record seq {row.seq}: day {row.day} comes after day "
                                     f"{prev_day} of the previous record (days swapped or "
                                     "rows moved)")
            prev_day = max(prev_day, row.day)
            if row.seq in wanted:
                hashes[row.seq] = row.hash
            rec = self._decrypt(row, keys, shredded)
            if rec is not None and rec.get("event") == "audit.retention":
                d = rec.get("details") or {}
                if d.get("floor_seq") == floor_seq and d.get("floor_hash") == floor_hash.hex():
                    attested = True
            prev = row.hash
            expected = row.seq + 1
        for day in sorted(keys):
            if keys[day] is None and day not in shredded and day not in self.unwrappable:
                self.problems.append(f"day {day}: its data key is missing but no retention "
                                     "shredded it (records of that day are unreadable)")
        return hashes, first, last, count, attested

    def _decrypt(self, row: Any, keys: dict[str, bytes | None],
                 shredded: set[str]) -> dict[str, Any] | None:
        if row.day not in keys:
            try:
                keys[row.day] = self.store.day_key(row.day, self.kek, create=False)
            except EdgeAgentError as exc:
                keys[row.day] = None
                self.unwrappable.add(row.day)
                self.problems.append(f"day {row.day}: data key cannot be unwrapped ({exc.args[0]})")
        key = keys[row.day]
        if key is None:
            if row.day in shredded:
                self.problems.append(f"record seq {row.seq}: belongs to day {row.day}, which "
                                     "was shredded, yet it is still stored")
            return None
        try:
            rec = open_record(key, row)
        except AuditError as exc:
            self.problems.append(str(exc.args[0]))
            return None
        if rec.get("seq") != row.seq:
            self.problems.append(f"record seq {row.seq}: its sealed content says seq "
                                 f"{rec.get('seq')}")
        return rec

    # -- published / ratchet ---------------------------------------------------
    def _parse_published(self, published: Sequence[Mapping[str, Any]]) -> list[Checkpoint]:
        out: list[Checkpoint] = []
        for i, item in enumerate(published):
            if _is_events(item):
                continue
            try:
                out.append(_published_checkpoint(item))
            except (AuditError, ValueError, json.JSONDecodeError) as exc:
                self.problems.append(f"published item {i + 1}: unreadable ({exc})")
        return out

    def _check_published(self, pub: list[Checkpoint], local: list[Checkpoint],
                         genesis: bytes, hashes: dict[int, bytes], last: int,
                         floor_seq: int, floor_hash: bytes, box: str) -> None:
        if not pub:
            return
        by_number = {cp.number: cp for cp in local}
        last_local = local[-1].number if local else -1
        for cp in sorted(pub, key=lambda c: c.number):
            f = cp.fields
            pubkey = bytes.fromhex(str(f.get("public_key", "")))
            if not check_signature(pubkey, cp.body, cp.signature):
                self.problems.append(f"published checkpoint {cp.number}: signature invalid")
                continue
            if f.get("genesis_public_key") != genesis.hex():
                self.problems.append(
                    f"published checkpoint {cp.number}: belongs to genesis key "
                    f"{str(f.get('genesis_public_key'))[:16]}..., not this log's "
                    f"{genesis.hex()[:16]}... (the local log was re-created)")
                continue
            mine = by_number.get(cp.number)
            if mine is None:
                if cp.number > last_local:
                    self.problems.append(
                        f"published checkpoint {cp.number} (seq {f.get('seq')}) is missing "
                        f"locally: local checkpoints end at {last_local} (truncated)")
                else:
                    self.problems.append(f"published checkpoint {cp.number} is missing "
                                         "locally (deleted)")
                self._match_checkpoint(cp, "published checkpoint", hashes, last, floor_seq,
                                       floor_hash, genesis, box)
            elif mine.body != cp.body or mine.signature != cp.signature:
                self.problems.append(f"checkpoint {cp.number} differs from the one published "
                                     "(local checkpoint replaced)")
                self._match_checkpoint(cp, "published checkpoint", hashes, last, floor_seq,
                                       floor_hash, genesis, box)
        if pub and local:
            newest = max(c.number for c in pub)
            self.notes.append(f"checked against {len(pub)} published checkpoint(s), newest "
                              f"{newest}")

    def _check_ratchet(self, path: Path, local: list[Checkpoint], genesis: bytes) -> None:
        try:
            seed = Ratchet.load(path).seed
        except AuditError as exc:
            self.notes.append(f"signing key not checked: {exc.args[0]}")
            return
        expected = (bytes.fromhex(str(local[-1].fields.get("next_public_key", "")))
                    if local else genesis)
        if public_bytes(seed) == expected or public_bytes(evolve(seed)) == expected:
            return
        where = f"checkpoint {local[-1].number}" if local else "the genesis key"
        self.problems.append(f"the audit signing key has evolved past {where}: later "
                             "checkpoints were removed (or the key file was replaced)")
