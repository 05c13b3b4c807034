"""Counted summaries of repeated refusals, so a flood cannot flood the audit log.

An unknown peer can have its associations refused hundreds of times a second.
One record each would fill ``[audit] max_bytes`` and, through retention, wash
real history out.  Instead, per (event, peer, reason) the first refusal of a
window of ``[audit] summary_seconds`` is recorded as usual, and the repeats
inside the window are only counted; when the window ends (or a checkpoint is
signed, or the log closes) one summary record says how many there were and
when the first and last came.  Every refusal is still counted, none is
written twice.

Bounded memory: at most ``max_keys`` windows are open; past that, refusals of
further peers are counted in one window per (event, reason) whose summary says
``"peers": "many"``.

The counts of open windows live in memory only: a crash loses them (the first
refusal of each window is on record).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from .store import iso

MAX_KEYS = 1024
_MANY = "*"
_NEVER = 1 << 62

Key = tuple[str, str, str, str]  # event, source, reason, status


def is_refusal(entry: Mapping[str, object]) -> bool:
    """Refusals of a peer: rejected associations and failed C-STOREs."""
    event = entry.get("event")
    return event == "association.rejected" or (
        event == "instance.received" and entry.get("outcome") != "success")


@dataclass
class _Window:
    start_us: int
    outcome: str
    repeated: int = 0
    first_us: int = 0
    last_us: int = 0


class Summaries:
    def __init__(self, window_seconds: float, max_keys: int = MAX_KEYS) -> None:
        self.window_us = int(window_seconds * 1_000_000)
        self.max_keys = max_keys
        self.absorbed = 0  # refusals counted into a summary instead of written
        self._lock = threading.Lock()
        self._open: dict[Key, _Window] = {}
        self._ready: list[tuple[int, dict[str, object]]] = []
        self._next_due = _NEVER  # no open window ends before this (skips needless scans)

    def absorb(self, entry: Mapping[str, object], ts_us: int) -> bool:
        """True when ``entry`` repeats a refusal inside its window: counted, not written.

        False: write it (the first of a window, or not a refusal); a window it
        ends is summarised first (``take`` returns that summary).
        """
        if not is_refusal(entry):
            return False
        details = entry.get("details")
        d = details if isinstance(details, Mapping) else {}
        key: Key = (str(entry.get("event")), str(entry.get("source") or ""),
                    str(d.get("reason", "")), str(d.get("status", "")))
        with self._lock:
            w = self._open.get(key)
            if w is None and len(self._open) >= self.max_keys:
                self._close_expired(ts_us)
                if len(self._open) >= self.max_keys:
                    key = (key[0], _MANY, key[2], key[3])
                    w = self._open.get(key)
            if w is not None and ts_us - w.start_us < self.window_us:
                w.repeated += 1
                w.first_us = w.first_us or ts_us
                w.last_us = max(w.last_us, ts_us)
                self.absorbed += 1
                return True
            if w is not None:
                self._close(key, w, ts_us)
            self._open[key] = _Window(ts_us, str(entry.get("outcome", "minor_failure")))
            self._next_due = min(self._next_due, ts_us + self.window_us)
            return False

    def take(self, now_us: int, *, everything: bool = False) -> list[tuple[int, dict[str, object]]]:
        """Summaries (ts_us, entry fields) of the windows that ended, oldest first."""
        with self._lock:
            if everything:
                for key, w in list(self._open.items()):
                    self._close(key, w, now_us)
            else:
                self._close_expired(now_us)
            out, self._ready = self._ready, []
        return sorted(out, key=lambda x: x[0])

    def pending(self) -> int:
        with self._lock:
            return sum(w.repeated for w in self._open.values())

    def snapshot(self) -> object:
        """The whole state, for ``restore`` when the write that used it rolled back."""
        with self._lock:
            return copy.deepcopy((self._open, self._ready, self._next_due, self.absorbed))

    def restore(self, state: object) -> None:
        with self._lock:
            self._open, self._ready, self._next_due, self.absorbed = copy.deepcopy(state)  # type: ignore[misc]

    # -- internals (callers hold self._lock) ---------------------------------------------

    def _close_expired(self, now_us: int) -> None:
        if now_us < self._next_due:
            return
        self._next_due = _NEVER
        for key, w in list(self._open.items()):
            if now_us - w.start_us >= self.window_us:
                self._close(key, w, now_us)
            else:
                self._next_due = min(self._next_due, w.start_us + self.window_us)

    def _close(self, key: Key, w: _Window, now_us: int) -> None:
        del self._open[key]
        if not w.repeated:
            return
        event, source, reason, status = key
        details: dict[str, object] = {
            "summary": True, "repeated": w.repeated, "first_time": iso(w.first_us),
            "last_time": iso(w.last_us), "window_seconds": self.window_us / 1_000_000,
            "reason": reason}
        if status:
            details["status"] = status
        if source == _MANY:
            details["peers"] = "many"
        self._ready.append((max(now_us, w.last_us), {
            "event": event, "outcome": w.outcome,
            "source": None if source in ("", _MANY) else source, "details": details}))
