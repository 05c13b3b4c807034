"""Fault hooks for tests: make a named stage hang, to prove the watchdog catches it.

Armed only when both environment variables are set::

    EDGE_AGENT_TEST_MODE=1
    EDGE_AGENT_TEST_FAULTS=hang:assembler[,hang:publisher]

and the box's ``[box] environment`` is ``development``.  A production box
ignores them (and says so in its log), and strips them from its environment so
that no child process sees them either.  No config key turns them on.

Hang points: ``assembler`` (when it starts processing a study), ``publisher``
(when it is about to publish a message), ``inbox_index`` (a received instance's
file and its own index record are durable, its index row not yet committed: a
kill -9 there leaves the file for the start-up reconciliation; armed in the
daemon's process, i.e. with ``[dicom] workers = 1``).  A hung stage blocks forever, like a
deadlock would: only the watchdog (systemd) ends it.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

MODE_VAR = "EDGE_AGENT_TEST_MODE"
FAULTS_VAR = "EDGE_AGENT_TEST_FAULTS"
HANG_POINTS = frozenset({"assembler", "publisher", "inbox_index"})

_armed: frozenset[str] = frozenset()
_never = threading.Event()  # never set: what a hung stage waits on


def configure(environment: str) -> frozenset[str]:
    """Read the fault variables once at start; returns the armed hang points."""
    global _armed
    spec = os.environ.get(FAULTS_VAR, "").strip()
    test_mode = os.environ.get(MODE_VAR) == "1"
    if not spec:
        _armed = frozenset()
        return _armed
    if environment != "development" or not test_mode:
        why = ("this box is not a development box" if environment != "development"
               else f"{MODE_VAR}=1 is not set")
        log.error("%s is set but ignored: %s (fault hooks are for tests only)", FAULTS_VAR, why)
        os.environ.pop(FAULTS_VAR, None)
        os.environ.pop(MODE_VAR, None)
        _armed = frozenset()
        return _armed
    points = set()
    for item in spec.split(","):
        kind, _, where = item.strip().partition(":")
        if kind == "hang" and where in HANG_POINTS:
            points.add(where)
        else:
            log.error("%s: unknown fault %r ignored (known: %s)", FAULTS_VAR, item,
                      ", ".join(f"hang:{p}" for p in sorted(HANG_POINTS)))
    _armed = frozenset(points)
    if _armed:
        log.warning("TEST FAULTS ARMED: %s will hang", ", ".join(sorted(_armed)))
    return _armed


def hang_point(stage: str) -> None:
    """Block forever here when a test armed a hang of ``stage``; otherwise return at once."""
    if stage in _armed:
        log.warning("test fault: stage %s hangs now", stage)
        _never.wait()
