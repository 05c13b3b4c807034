"""Who may connect and associate: per-peer admission limits for the DICOM listener.

Owns: the connection and association bounds, the association rate, the
throttle on refusal log lines, and ``Verdict`` (the main process's answer to a
receive worker).  Imports nothing of the node.

Two independent bounds, both keyed by the peer's IP address:

* concurrent TCP connections, counted from ``accept`` (before any PDU is read),
  so a peer that opens sockets and never speaks can only ever hold its own
  share of the listener, never everybody's;
* associations per minute (a sliding window), so a peer that reconnects in a
  tight loop is answered with a transient rejection instead of eating CPU.

Fair share.  The per-peer bound alone is not enough: a few addresses, each
within its own bound, can together hold every connection slot (six addresses
with six half-open connections each fill 32 slots).  So when the listener is
full, a connection from a peer holding fewer connections than the heaviest
holder (by two or more) closes that holder's oldest connection that has no
association yet, and takes its slot.  An established association is never
closed this way, and peers of equal share never displace each other.
Associations have a fair share of their own (``association_limit``): the last
quarter of them is kept for peers that hold none.

Thread safe: the node runs one thread per connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerLimits:
    max_connections_per_peer: int
    max_connections: int
    associations_per_minute_per_peer: int
    window_seconds: float = 60.0


@dataclass(frozen=True)
class Admitted:
    """The outcome of ``PeerLimiter.admit``."""

    ok: bool
    # A connection (peer, key) the caller must close now: it gave up its slot.
    evict: tuple[str, Hashable] | None = None


class PeerLimiter:
    def __init__(self, limits: PeerLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        # peer -> {connection key: has an association}, oldest first
        self._open: dict[str, dict[Hashable, bool]] = {}
        self._total = 0
        self._recent: dict[str, deque[float]] = {}

    def admit(self, peer: str, key: Hashable) -> Admitted:
        """Count a new connection ``key`` from ``peer``, if the bounds allow it,
        possibly by evicting another peer's connection (see the module docstring)."""
        with self._lock:
            mine = self._open.get(peer, {})
            if len(mine) >= self.limits.max_connections_per_peer:
                return Admitted(False)
            evict: tuple[str, Hashable] | None = None
            if self._total >= self.limits.max_connections:
                evict = self._victim(peer, len(mine))
                if evict is None:
                    return Admitted(False)
                self._forget(*evict)
            self._open.setdefault(peer, {})[key] = False
            self._total += 1
            return Admitted(True, evict)

    def _victim(self, peer: str, have: int) -> tuple[str, Hashable] | None:
        for other, conns in sorted(self._open.items(), key=lambda kv: -len(kv[1])):
            if len(conns) < have + 2:
                return None
            if other == peer:
                continue
            for key, associated in conns.items():
                if not associated:
                    return other, key
        return None

    def associated(self, peer: str, key: Hashable) -> None:
        """The connection carries an association now: it is never evicted."""
        with self._lock:
            conns = self._open.get(peer)
            if conns is not None and key in conns:
                conns[key] = True

    def release(self, peer: str, key: Hashable) -> None:
        """The connection closed (a no-op when it was evicted or never counted)."""
        with self._lock:
            self._forget(peer, key)

    def _forget(self, peer: str, key: Hashable) -> None:
        conns = self._open.get(peer)
        if conns is None or key not in conns:
            return
        del conns[key]
        if not conns:
            del self._open[peer]
        self._total -= 1

    def connections(self, peer: str | None = None) -> int:
        with self._lock:
            return self._total if peer is None else len(self._open.get(peer, {}))

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


def association_reserve(max_associations: int) -> int:
    """Association slots kept for peers that hold none (a quarter of the total)."""
    return max_associations // 4


def association_limit(held: int, total: int, *, per_peer: int, max_total: int) -> str | None:
    """Why a peer holding ``held`` of ``total`` open associations may not open
    another one, or None when it may.

    The per-peer bound alone lets a few addresses hold every association (four
    peers with four each fill sixteen).  So the last quarter of the slots only
    goes to peers that hold none yet: addresses holding several associations
    each fill three quarters at most, and a newcomer finds a slot unless that
    many more distinct addresses hold one each.
    """
    if held >= per_peer:
        return "too many associations from this peer"
    if total >= max_total:
        return "too many associations in total"
    if held and total >= max_total - association_reserve(max_total):
        return "the remaining associations are kept for peers that hold none"
    return None


@dataclass(frozen=True)
class Verdict:
    """What the association bounds say about an association request."""

    rate_ok: bool  # within the peer's associations-per-minute
    limit: str | None  # why the association bounds refuse it, or None


AuditFn = Callable[..., None]


def audit_refused(audit: AuditFn, throttle: AuditThrottle, peer: str, why: str) -> None:
    """Audit a connection refused before any association; log it throttled per peer.

    Every refusal goes to the audit log, which counts repeats into summary
    records (agent/audit/summary.py): throttling here lost them uncounted."""
    audit("association.rejected", outcome="minor_failure", source=peer,
          details={"reason": why})
    if throttle.due(peer, why):
        log.warning("refused connection from %s: %s", peer, why)
