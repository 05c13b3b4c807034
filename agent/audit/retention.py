"""Retention: which audit days expire, and how a day is crypto-shredded.

Days are shredded oldest first and the newest day is never shredded, so the
shredded records always form a prefix of the chain (seq 1..floor).  The last
shredded record's hash (the floor hash) anchors the surviving chain, and the
``audit.retention`` record written in the same transaction attests it, so
verify still passes on what remains.

Two rules, in this order: age (days older than ``retention_days`` go), then
volume (oldest days while over ``max_bytes``), but volume never takes a day
younger than ``min_retention_days``.  Volume is something an attacker can
make (refusals are summarised, yet other events are not); it must not be able
to wash recent history out.  When nothing is old enough, the store stays over
budget and the log raises ``audit.over_budget`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from .store import Store


@dataclass(frozen=True)
class ShredResult:
    days: tuple[str, ...]
    records: int
    floor_seq: int
    floor_hash: bytes


@dataclass(frozen=True)
class Plan:
    days: list[str]  # to shred, oldest first
    over_budget: bool  # still over max_bytes after shredding them
    remaining_bytes: int


def expired_days(live_days: Sequence[str], *, today: date, retention_days: int,
                 min_retention_days: int, stored_bytes: int, max_bytes: int,
                 day_bytes: dict[str, int]) -> Plan:
    """Days to shred: older than the retention period, then oldest until under the
    budget, but never for volume a day younger than ``min_retention_days``.

    ``live_days`` are the days whose key still exists, oldest first; the newest is kept.
    """
    candidates = sorted(live_days)[:-1]
    cutoff = (today - timedelta(days=retention_days)).isoformat()
    floor = (today - timedelta(days=min_retention_days)).isoformat()
    chosen = [d for d in candidates if d < cutoff]
    remaining = stored_bytes - sum(day_bytes.get(d, 0) for d in chosen)
    for d in candidates[len(chosen):]:
        if remaining <= max_bytes or d >= floor:
            break
        chosen.append(d)
        remaining -= day_bytes.get(d, 0)
    return Plan(chosen, remaining > max_bytes, remaining)


def day_sizes(store: Store) -> dict[str, int]:
    return {str(d): int(n) for d, n in store.conn.execute(
        "SELECT day, SUM(LENGTH(ct)) + COUNT(*) * 100 FROM records GROUP BY day")}


def shred(store: Store, days: Sequence[str], now_us: int) -> ShredResult:
    """Destroy the keys of ``days`` and delete their records (inside the caller's transaction)."""
    last = max(days)
    old_floor_seq, old_floor_hash = store.floor()
    row = store.conn.execute(
        "SELECT seq, hash FROM records WHERE day <= ? ORDER BY seq DESC LIMIT 1", (last,)
    ).fetchone()
    floor_seq, floor_hash = (int(row[0]), bytes(row[1])) if row else (old_floor_seq,
                                                                      old_floor_hash)
    n = store.conn.execute("DELETE FROM records WHERE seq <= ?", (floor_seq,)).rowcount
    store.conn.executemany(
        "UPDATE day_keys SET wrapped = NULL, shredded_us = ? WHERE day = ?",
        [(now_us, d) for d in days])
    store.set_meta("floor_seq", str(floor_seq))
    store.set_meta("floor_hash", floor_hash.hex())
    store.forget_cached_keys()
    return ShredResult(tuple(sorted(days)), int(n), floor_seq, floor_hash)
