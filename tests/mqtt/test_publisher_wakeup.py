"""The publisher's loop is woken by what it waits for, not by a poll: a result
enqueued while it idles goes out because the enqueue woke it, ``stop`` ends it at
once, and while nothing happens it does not spin.  Real broker (mutual TLS), real
outbox, the real Publisher in this process with its idle wake-up pushed to an hour,
so that only a wake-up can explain what the broker delivers."""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import pytest

from agent.uplink import publish
from tests.helpers import Box, Broker, wait_for
from tests.helpers.mqtt import Collector, harness


class _Waits:
    """Counts the waits of the publisher's thread ("mqtt") in select(), whoever makes
    them: paho's loop or the publisher's own step."""

    def __init__(self) -> None:
        self.n = 0
        self.real = select.select

    def __call__(self, *a: Any, **kw: Any) -> Any:
        if threading.current_thread().name == "mqtt":
            self.n += 1
        return self.real(*a, **kw)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> _Waits:
    counter = _Waits()
    monkeypatch.setattr(select, "select", counter)
    # Only a wake-up can end an idle wait now (raising=False: also on a publisher
    # without one, so that this test runs, and fails, against a polling loop).
    monkeypatch.setattr(publish, "IDLE_WAKE_S", 3600.0, raising=False)
    return counter


def test_an_enqueue_wakes_the_idle_publisher(box: Box, broker: Broker, waits: _Waits) -> None:
    ops = Collector(box, topic="edge/dev-site/dev-box/results").start()
    try:
        with harness(box) as h:
            assert h.publisher.wait_connected(15)
            # Connected, the birth status acknowledged: from here on nothing happens.
            wait_for(lambda: h.publisher.state.inflight == 0 and h.outbox.stats()["depth"] == 0,
                     15, "an idle publisher")
            idle_from = waits.n
            time.sleep(1.0)  # idle: a poll every 50 ms would go round some 20 times
            ids = h.enqueue(1)
            wait_for(lambda: len(ops.on("results")) == 1, 30,
                     "the result enqueued while the publisher idled")
            assert ops.on("results")[0]["id"] == ids[0]
            # One wait for the whole idle second, ended by the enqueue; then the PUBACK's.
            # (A load spike can only make fewer waits, never more.)
            assert waits.n - idle_from <= 4, waits.n - idle_from
            wait_for(lambda: h.outbox.stats()["depth"] == 0, 15, "the ack of the result")
    finally:
        ops.stop()


def test_stop_wakes_the_idle_publisher_and_it_says_offline(box: Box, broker: Broker,
                                                          waits: _Waits) -> None:
    ops = Collector(box, topic="edge/dev-site/dev-box/status").start()
    try:
        with harness(box) as h:
            assert h.publisher.wait_connected(15)
            wait_for(lambda: any(s["data"]["state"] == "online" for s in ops.on("status")),
                     15, "the birth status")
            h.publisher.stop(drain_timeout=0)
            # Without the wake-up the thread would still sit in its hour-long wait.
            assert h.publisher._thread is not None
            assert not h.publisher._thread.is_alive()
            wait_for(lambda: ops.on("status")[-1]["data"]["state"] == "offline", 15,
                     "the offline status sent on stop")
    finally:
        ops.stop()


def test_a_clean_stop_is_not_logged_as_a_lost_link(box: Box, broker: Broker,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Under systemd the journal keeps each line's priority: our own clean disconnect
    at stop must not show up in ``journalctl -p warning`` next to real outages."""
    caplog.set_level("INFO", logger=publish.__name__)
    with harness(box) as h:
        assert h.publisher.wait_connected(20)
    said = [r for r in caplog.records if r.getMessage().startswith("mqtt disconnected")]
    assert said, "the disconnect at stop was not logged at all"
    assert all(r.levelname == "INFO" for r in said), [(r.levelname, r.getMessage()) for r in said]
    # A lost link still warns: the broker goes away under a running publisher.
    caplog.clear()
    with harness(box) as h:
        assert h.publisher.wait_connected(20)
        broker.stop()
        wait_for(lambda: not h.publisher.state.connected, 30, "the publisher to see the outage")
        broker.start()
    assert any(r.levelname == "WARNING" and r.getMessage().startswith("mqtt disconnected")
               for r in caplog.records)
