"""Per-peer admission limits for the DICOM listener.

Two independent bounds, both keyed by the peer's IP address:

* concurrent TCP connections, counted from ``accept`` (before any PDU is read),
  so a peer that opens sockets and never speaks can only ever hold its own
  share of the listener, never everybody's;
* associations per minute (a sliding window), so a peer that reconnects in a
  tight loop is answered with a transient rejection instead of eating CPU.

Thread safe: pynetdicom runs one thread per connection.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerLimits:
    max_connections_per_peer: int
    max_connections: int
    associations_per_minute_per_peer: int
    window_seconds: float = 60.0


class PeerLimiter:
    def __init__(self, limits: PeerLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._total = 0
        self._recent: dict[str, deque[float]] = {}

    def open_connection(self, peer: str) -> bool:
        """Count a new connection; False (and nothing counted) when over a bound."""
        with self._lock:
            n = self._open.get(peer, 0)
            if n >= self.limits.max_connections_per_peer or self._total >= self.limits.max_connections:
                return False
            self._open[peer] = n + 1
            self._total += 1
            return True

    def close_connection(self, peer: str) -> None:
        with self._lock:
            n = self._open.get(peer, 0) - 1
            if n <= 0:
                self._open.pop(peer, None)
            else:
                self._open[peer] = n
            self._total = max(0, self._total - 1)

    def connections(self, peer: str | None = None) -> int:
        with self._lock:
            return self._total if peer is None else self._open.get(peer, 0)

    def allow_association(self, peer: str) -> bool:
        """Record an association attempt; False when the peer is over its rate."""
        now = self._clock()
        with self._lock:
            q = self._recent.setdefault(peer, deque())
            while q and now - q[0] >= self.limits.window_seconds:
                q.popleft()
            if len(q) >= self.limits.associations_per_minute_per_peer:
                return False
            q.append(now)
            # Forget idle peers so a scan of many addresses cannot grow this map.
            if len(self._recent) > 4096:
                for key in [k for k, v in self._recent.items()
                            if not v or now - v[-1] >= self.limits.window_seconds]:
                    del self._recent[key]
            return True


class AuditThrottle:
    """One audit record per (peer, reason) per ``seconds``: a flood of refused
    connections must not turn into an audit-log flood.  Bounded memory."""

    def __init__(self, seconds: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        self.seconds = seconds
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}

    def due(self, peer: str, why: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get((peer, why))
            if last is not None and now - last < self.seconds:
                return False
            if len(self._last) >= self._max:
                self._last.clear()
            self._last[(peer, why)] = now
            return True
