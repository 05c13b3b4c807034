"""Stage liveness: systemd's watchdog is fed only while every stage is live.

Each long-running stage of the daemon (a thread loop: assembler, publisher,
receive dispatcher, telemetry, control) owns a :class:`Stage` and beats it:
``progress`` when it finished a piece of work, ``idle`` when it looked for work
and found none.  A stage whose last beat is older than its deadline is stuck;
so is one whose probe (e.g. "the threads the receive node started are alive")
reports a reason.

The :class:`Watchdog` checks the stages every period and sends ``WATCHDOG=1``
only when none is stuck.  When one is, it logs which (once per transition),
says so in the systemd ``STATUS=`` line, and stops pinging: systemd then
restarts the daemon after ``WatchdogSec``.  Pinging from a thread of its own
that merely runs (as before) proves only that this one thread runs; the
watchdog has to be fed by what the daemon is for.

A beat is one attribute assignment of a frozen object (atomic under the GIL),
so a stage may beat from a hot loop without a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Probe = Callable[[], str | None]  # a reason when the stage is not live, else None


class Beat(Protocol):
    """What a stage's code calls to beat (Stage.beat, or a no-op outside the daemon)."""

    def __call__(self, *, progress: bool = ..., doing: str = ..., allow: float = ...) -> None: ...


def no_beat(*, progress: bool = False, doing: str = "", allow: float = 0.0) -> None:
    return None


@dataclass(frozen=True)
class _Beat:
    at: float  # monotonic
    kind: Literal["progress", "idle", "started"]
    doing: str
    due: float  # monotonic: the next beat is due by then


@dataclass(frozen=True)
class StageHealth:
    """One stage as the watchdog saw it (ages in seconds)."""

    name: str
    last: str  # progress | idle | started
    doing: str
    age_s: float
    deadline_s: float | None  # None: judged by its probe only
    progress_age_s: float | None  # since the last progress beat (None: none yet)
    stuck: bool
    reason: str | None  # why it is stuck, an operator sentence

    def as_json(self) -> dict[str, Any]:
        return {"last": self.last, "doing": self.doing, "age_s": self.age_s,
                "deadline_s": self.deadline_s, "progress_age_s": self.progress_age_s,
                "stuck": self.stuck, "reason": self.reason}


class Stage:
    """The liveness handle one stage beats."""

    def __init__(self, name: str, deadline: float | None, clock: Clock,
                 probe: Probe | None = None) -> None:
        self.name = name
        self.deadline = deadline
        self._clock = clock
        self._probe = probe
        now = clock()
        self._beat = _Beat(now, "started", "", now + (deadline or 0.0))
        self._progress_at: float | None = None

    def beat(self, *, progress: bool = False, doing: str = "", allow: float = 0.0) -> None:
        """Record a heartbeat; ``allow`` adds seconds for a step known to take up to that
        long before the next beat (an inference bounded by its model timeout)."""
        now = self._clock()
        self._beat = _Beat(now, "progress" if progress else "idle", doing,
                           now + (self.deadline or 0.0) + max(0.0, allow))
        if progress:
            self._progress_at = now

    def health(self, now: float | None = None) -> StageHealth:
        now = self._clock() if now is None else now
        b = self._beat
        age = max(0.0, now - b.at)
        reason: str | None = None
        if self.deadline is not None and now > b.due:
            what = f" while {b.doing}" if b.doing else ""
            reason = (f"no progress or heartbeat for {age:.0f} s{what} "
                      f"(deadline {b.due - b.at:.0f} s)")
        if reason is None and self._probe is not None:
            try:
                reason = self._probe()
            except Exception as exc:  # noqa: BLE001 - a broken probe counts as not live
                reason = f"liveness probe failed ({type(exc).__name__})"
        progress_age = None if self._progress_at is None else round(now - self._progress_at, 1)
        return StageHealth(
            name=self.name, last=b.kind, doing=b.doing, age_s=round(age, 1),
            deadline_s=None if self.deadline is None else round(b.due - b.at, 1),
            progress_age_s=progress_age, stuck=reason is not None, reason=reason,
        )


class Liveness:
    """The registry of stages (thread safe)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stages: dict[str, Stage] = {}

    def stage(self, name: str, deadline: float | None, *, probe: Probe | None = None) -> Stage:
        """Register (or re-register, e.g. after a restart) a stage; its clock starts now.
        ``deadline`` None: no beats expected, the probe alone decides."""
        st = Stage(name, deadline, self._clock, probe)
        with self._lock:
            self._stages[name] = st
        return st

    def remove(self, name: str) -> None:
        with self._lock:
            self._stages.pop(name, None)

    def check(self) -> tuple[StageHealth, ...]:
        now = self._clock()
        with self._lock:
            stages = sorted(self._stages.values(), key=lambda s: s.name)
        return tuple(s.health(now) for s in stages)


def threads_alive(threads: Iterable[threading.Thread], what: str) -> Probe:
    """A probe: every one of these threads (loops that only end at shutdown) still runs."""
    watched = tuple(threads)

    def probe() -> str | None:
        dead = [t.name for t in watched if not t.is_alive()]
        return f"{what} thread(s) {', '.join(dead)} ended" if dead else None
    return probe


@dataclass(frozen=True)
class Verdict:
    """The watchdog's last decision."""

    at: float  # wall clock
    pinging: bool
    stuck: tuple[StageHealth, ...]


class Watchdog:
    """Each ``tick``: check every stage; feed systemd only when all are live."""

    def __init__(self, liveness: Liveness, *, enabled: bool,
                 notify: Callable[[str], object],
                 healthy_status: Callable[[], str],
                 on_stuck: Callable[[], None] | None = None) -> None:
        self.liveness = liveness
        self.enabled = enabled  # systemd watches us (WATCHDOG_USEC for this pid)
        self._notify = notify
        self._healthy_status = healthy_status
        self._on_stuck = on_stuck or (lambda: None)
        self._stuck: set[str] = set()
        self.last = Verdict(time.time(), False, ())

    @property
    def state(self) -> str:
        if not self.enabled:
            return "off"
        return "pinging" if self.last.pinging else "withheld"

    def tick(self) -> Verdict:
        stages = self.liveness.check()
        stuck = tuple(s for s in stages if s.stuck)
        names = {s.name for s in stuck}
        newly = [s for s in stuck if s.name not in self._stuck]
        for s in newly:
            log.error("stage %s is stuck: %s; %s", s.name, s.reason,
                      "not feeding the systemd watchdog: systemd restarts the daemon"
                      if self.enabled else "(not run under a systemd watchdog: nothing "
                      "restarts it)")
        for name in sorted(self._stuck - names):
            log.warning("stage %s is live again", name)
        if names != self._stuck:
            if stuck:
                text = "; ".join(f"{s.name} stuck ({s.reason})" for s in stuck)
                self._notify(f"STATUS=stage {text}")
            else:
                self._notify(f"STATUS={self._healthy_status()}")
        self._stuck = names
        # The verdict is recorded before the ping: whoever reads "withheld" knows
        # that every ping of an earlier tick was already sent.
        verdict = Verdict(time.time(), self.enabled and not stuck, stuck)
        self.last = verdict
        if verdict.pinging:
            self._notify("WATCHDOG=1")
        if newly:
            self._on_stuck()
        return verdict

    def as_json(self) -> dict[str, Any]:
        """For ``edge-agent status`` and telemetry: stages as of now, the watchdog as
        of its last tick."""
        stages = self.liveness.check()
        return {
            "healthy": not any(s.stuck for s in stages),
            "watchdog": self.state,
            "stuck": [s.name for s in stages if s.stuck],
            "stages": {s.name: s.as_json() for s in stages},
        }
