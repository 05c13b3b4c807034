"""Retention: which audit days expire, and how a day is crypto-shredded.

Days are shredded oldest first and the newest day is never shredded, so the
shredded records always form a prefix of the chain (seq 1..floor).  The last
shredded record's hash (the floor hash) anchors the surviving chain, and the
``audit.retention`` record written in the same transaction attests it, so
verify still passes on what remains.
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


def expired_days(live_days: Sequence[str], *, today: date, retention_days: int,
                 stored_bytes: int, max_bytes: int, day_bytes: dict[str, int]) -> list[str]:
    """Days to shred: older than the retention period, then oldest until under the budget.

    ``live_days`` are the days whose key still exists, oldest first; the newest is kept.
    """
    candidates = sorted(live_days)[:-1]
    cutoff = (today - timedelta(days=retention_days)).isoformat()
    chosen = [d for d in candidates if d < cutoff]
    remaining = stored_bytes - sum(day_bytes.get(d, 0) for d in chosen)
    for d in candidates[len(chosen):]:
        if remaining <= max_bytes:
            break
        chosen.append(d)
        remaining -= day_bytes.get(d, 0)
    return chosen


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
