"""Broker-side guarantees seen from the box: the ACL refuses another box's
prefix (MQTT 5 PUBACK 0x87, so the refusal is visible and the message is kept
blocked, not lost or retried forever), and a broker restart mid-stream loses
nothing: every result arrives, duplicates only with the same id."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import Box, Broker, set_config, wait_for
from tests.helpers.mqtt import Collector, harness


def test_publishing_under_another_boxs_prefix_is_refused(box: Box, broker: Broker) -> None:
    set_config(box, "box", "site", '"other-site"')  # topics edge/other-site/dev-box/...
    ops = Collector(box).start()
    try:
        with harness(box) as h:
            assert h.publisher.wait_connected(15), h.publisher.state.last_error
            h.enqueue(2)
            wait_for(lambda: h.outbox.stats()["blocked"] == 2, 15, "2 refused messages blocked")
            st = h.publisher.state
            assert st.published == 0
            assert st.refused >= 2  # both results (and the birth status)
            codes = {d["reason_code"] for e, d in h.alerts if e == "security.alert"}
            assert codes == {0x87}
            assert h.outbox.stats()["depth"] == 0  # nothing stalls behind a refusal
        # The 0x87 PUBACKs say the broker has handled those publishes. The same identity,
        # back under its own prefix, now publishes a result: the broker forwards a client's
        # messages in order, so once it reaches ops, anything forwarded from before would
        # have reached ops first. Only then is "nothing arrived" a finding.
        set_config(box, "box", "site", '"dev-site"')
        with harness(box) as h:
            assert h.publisher.wait_connected(15), h.publisher.state.last_error
            later = h.enqueue(1, start=100)[0]
            wait_for(lambda: any(e["id"] == later for e in ops.on("/results")), 15,
                     "the later, allowed result at ops")
        assert "edge/dev-site/dev-box/results" in ops.topics()
        assert not [t for t in ops.topics() if t.startswith("edge/other-site/")]
    finally:
        ops.stop()


def _outage(box: Box, broker: Broker, outage_s: float, total: int) -> None:
    ops = Collector(box, topic="edge/+/+/results").start()
    try:
        with harness(box) as h:
            assert h.publisher.wait_connected(15)
            sent: list[str] = []
            stop_at = total // 3

            def produce() -> None:
                # The pipeline's pace: results keep coming while the broker is down.
                for i in range(total):
                    sent.extend(h.enqueue(1, start=i))
                    time.sleep(0.01)

            peak = [0]
            done = threading.Event()

            def sample_window() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], h.publisher.state.inflight)
                    time.sleep(0.002)

            t = threading.Thread(target=produce)
            sampler = threading.Thread(target=sample_window)
            t.start()
            sampler.start()
            wait_for(lambda: h.publisher.state.published >= stop_at, 30, "first third delivered")
            broker.stop()
            down_at = time.time()
            wait_for(lambda: not h.publisher.state.connected, 15, "the publisher to notice")
            time.sleep(max(0.0, outage_s - (time.time() - down_at)))
            broker.start()
            t.join()
            wait_for(lambda: h.outbox.stats()["depth"] == 0, 60, "the outbox to drain")
            done.set()
            sampler.join()
            assert h.publisher.state.connects >= 2
            # The backlog drained through a bounded window, never all at once.
            assert 1 <= peak[0] <= h.cfg.mqtt.inflight
        wait_for(lambda: len({e["id"] for e in ops.on("/results")}) >= total, 30,
                 "every result at central ops")
        got = ops.on("/results")
        ids = [e["id"] for e in got]
        assert set(ids) == set(sent) and len(sent) == total  # none missing, none invented
        # A duplicate is the same message again: same id, same content.
        by_id: dict[str, dict[str, object]] = {}
        for e in got:
            assert by_id.setdefault(e["id"], e) == e
    finally:
        ops.stop()


def test_broker_restart_mid_stream_loses_nothing(box: Box, broker: Broker) -> None:
    _outage(box, broker, outage_s=3.0, total=300)


@pytest.mark.slow
def test_broker_down_30s_mid_stream_loses_nothing(box: Box, broker: Broker) -> None:
    _outage(box, broker, outage_s=30.0, total=3000)
