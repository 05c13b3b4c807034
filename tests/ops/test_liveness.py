"""The decisions behind the watchdog and the control socket's refusal audit, on a
clock the test turns (the daemon-level behaviour is in tests/faults/test_watchdog.py
and tests/ops/test_roles.py)."""

from __future__ import annotations

import threading
from typing import Any

from agent.ops.control import DenialAudit
from agent.ops.liveness import Liveness, Watchdog, threads_alive


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_is_stuck_only_past_its_deadline_and_allow_extends_one_step() -> None:
    clock = Clock()
    reg = Liveness(clock)
    st = reg.stage("assembler", 10.0)
    clock.now += 9
    assert not reg.check()[0].stuck
    clock.now += 2
    h = reg.check()[0]
    assert h.stuck and h.last == "started" and "no progress or heartbeat for 11 s" in str(h.reason)
    st.beat(progress=True, doing="running inference", allow=60)
    clock.now += 65
    h = reg.check()[0]
    assert not h.stuck and h.deadline_s == 70 and h.progress_age_s == 65
    clock.now += 6
    h = reg.check()[0]
    assert h.stuck and "while running inference" in str(h.reason)
    st.beat()  # an idle heartbeat is as good as progress for liveness
    h = reg.check()[0]
    assert not h.stuck and h.last == "idle" and h.progress_age_s == 71


def test_a_probe_alone_decides_a_stage_without_deadline() -> None:
    clock = Clock()
    reg = Liveness(clock)
    gate = threading.Event()
    t = threading.Thread(target=gate.wait, name="dicom-accept-1")
    t.start()
    reg.stage("receive", None, probe=threads_alive([t], "DICOM receive"))
    clock.now += 10**6
    assert not reg.check()[0].stuck
    gate.set()
    t.join()
    h = reg.check()[0]
    assert h.stuck and h.reason == "DICOM receive thread(s) dicom-accept-1 ended"


def test_watchdog_pings_only_while_all_live_and_reports_transitions_once() -> None:
    clock = Clock()
    reg = Liveness(clock)
    a = reg.stage("assembler", 10.0)
    reg.stage("publisher", 10.0).beat()
    sent: list[str] = []
    stuck_calls: list[int] = []
    wd = Watchdog(reg, enabled=True, notify=sent.append, healthy_status=lambda: "listening",
                  on_stuck=lambda: stuck_calls.append(1))
    wd.tick()
    assert sent == ["WATCHDOG=1"] and wd.state == "pinging"
    clock.now += 11
    reg.stage("publisher", 10.0)  # publisher fresh, assembler silent for 11 s
    sent.clear()
    wd.tick()
    wd.tick()
    assert "WATCHDOG=1" not in sent and wd.state == "withheld"
    assert len([m for m in sent if m.startswith("STATUS=stage assembler stuck")]) == 1
    assert stuck_calls == [1]
    assert wd.as_json()["stuck"] == ["assembler"]
    a.beat()
    sent.clear()
    wd.tick()
    assert sent == ["STATUS=listening", "WATCHDOG=1"] and wd.state == "pinging"


def test_watchdog_off_without_systemd_still_judges() -> None:
    clock = Clock()
    reg = Liveness(clock)
    reg.stage("assembler", 1.0)
    sent: list[str] = []
    wd = Watchdog(reg, enabled=False, notify=sent.append, healthy_status=lambda: "ok")
    clock.now += 2
    wd.tick()
    assert wd.state == "off" and "WATCHDOG=1" not in sent
    assert wd.as_json()["healthy"] is False


def test_denials_first_at_once_then_counted_per_window() -> None:
    clock = Clock()
    records: list[dict[str, Any]] = []

    def audit(event: str, **kw: Any) -> None:
        records.append({"event": event, **kw})

    d = DenialAudit(audit, window=10.0, clock=clock)
    for _ in range(100):
        d.refused("mallory", "control.status", {"needed_role": ["operator"]})
    d.refused("eve", "control.status", {"needed_role": ["operator"]})
    assert [(r["user"], r["details"]["count"]) for r in records] == [("mallory", 1), ("eve", 1)]
    d.flush()
    assert len(records) == 2  # window still open
    clock.now += 10
    for _ in range(50):  # the flood goes on into the next window
        d.refused("mallory", "control.status", {"needed_role": ["operator"]})
    d.flush()
    assert [(r["user"], r["details"]["count"]) for r in records[2:]] == [("mallory", 149)]
    assert records[2]["details"]["window_s"] == 10.0 and records[2]["outcome"] == "serious_failure"
    clock.now += 10
    d.flush()  # eve's window had nothing more: nothing written, window closed
    assert len(records) == 3
    d.refused("eve", "control.status", {"needed_role": ["operator"]})
    assert records[-1]["user"] == "eve" and records[-1]["details"]["count"] == 1
    d.flush(force=True)  # at stop: nothing counted is left out
    assert sum(r["details"]["count"] for r in records if r["user"] == "mallory") == 150
