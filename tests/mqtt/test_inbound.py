"""Inbound topics: what central ops sends back reaches the stage that owns it.

A real broker with the dev box's ACL: a certificate that may write the box's
review topic of its own CN (the reviewer role's grant, added here by hand) reaches
the handler, which learns the sender from the topic; the box's own certificate may not write its inbound topics (a stolen
box certificate cannot forge verdicts or deployments); a verdict sent while
the box was offline arrives when it reconnects (the box's persistent session).
"""

from __future__ import annotations

import threading

import pytest

from agent.identity.pki import issue
from agent.uplink.inbound import Inbound, InboundMessage
from tests.helpers import Box, Broker, wait_for
from tests.helpers.mqtt import dev_ca, harness, mqtt_client, publish_acked, write_cert

TOPIC = "edge/dev-site/dev-box"
REVIEW = f"{TOPIC}/review/reviewer-test"  # the writer's own review topic (its CN)


def _writer(box: Box, broker: Broker) -> tuple[object, object]:
    """A certificate with a grant to write the box's review topic (what the reviewer
    role's ACL entry gives)."""
    k, c = issue(*dev_ca(box), "reviewer-test", client=True)
    cert, key = write_cert(box.root / "inbound", "reviewer-test", k, c)
    acl = box.root / "mosquitto.acl"
    acl.write_text(acl.read_text() + f"\nuser reviewer-test\ntopic write {REVIEW}\n")
    broker.stop()
    broker.start()
    return cert, key


class _Sink:
    def __init__(self) -> None:
        self.got: list[InboundMessage] = []
        self.lock = threading.Lock()

    def __call__(self, msg: InboundMessage) -> None:
        with self.lock:
            self.got.append(msg)


def test_authorised_writer_reaches_handler_and_box_cannot_forge(box: Box, broker: Broker) -> None:
    cert, key = _writer(box, broker)
    sink = _Sink()
    inbound = Inbound(TOPIC)
    inbound.register("review", sink)
    with harness(box, inbound=inbound) as h:
        assert h.publisher.wait_connected(20)
        writer = mqtt_client(box, cert, key, "reviewer-test")  # type: ignore[arg-type]
        try:
            # The subscription is made right after CONNACK; retry until it is in place.
            def delivered() -> bool:
                assert publish_acked(writer, REVIEW, b'{"verdict":1}') in (0, 0x10)
                return any(m.payload == b'{"verdict":1}' for m in sink.got)
            wait_for(delivered, 20, "the verdict to reach the handler", step=0.5)
            assert all((m.channel, m.sender) == ("review", "reviewer-test") for m in sink.got)
            # The box's own certificate: its inbound topics are read-only to it.
            device = mqtt_client(box, box.pki / "device.pem", box.pki / "device.key",
                                 "dev-site.dev-box-forger")
            try:
                for topic in (f"{TOPIC}/review", f"{TOPIC}/review/dev-site.dev-box", REVIEW):
                    assert publish_acked(device, topic, b'{"forged":1}') == 0x87, topic
                assert publish_acked(device, f"{TOPIC}/deployments", b'{"forged":1}') == 0x87
            finally:
                device.loop_stop()
                device.disconnect()
        finally:
            writer.loop_stop()  # type: ignore[attr-defined]
            writer.disconnect()  # type: ignore[attr-defined]
    assert not any(b"forged" in m.payload for m in sink.got)
    assert not h.alerts, h.alerts


def test_verdict_sent_while_box_offline_arrives_on_reconnect(box: Box, broker: Broker) -> None:
    cert, key = _writer(box, broker)
    first = _Sink()
    inbound = Inbound(TOPIC)
    inbound.register("review", first)
    with harness(box, inbound=inbound) as h:  # establishes the box's persistent session
        assert h.publisher.wait_connected(20)
        wait_for(lambda: h.publisher.state.connected, 20, "the box's session")
        writer = mqtt_client(box, cert, key, "reviewer-test")  # type: ignore[arg-type]
        try:
            wait_for(lambda: (publish_acked(writer, REVIEW, b"ping") in (0, 0x10)
                              and any(m.payload == b"ping" for m in first.got)),
                     20, "the subscription", step=0.5)
        finally:
            writer.loop_stop()  # type: ignore[attr-defined]
            writer.disconnect()  # type: ignore[attr-defined]
    # The box is offline now; a reviewer sends a verdict.
    writer = mqtt_client(box, cert, key, "reviewer-test")  # type: ignore[arg-type]
    try:
        assert publish_acked(writer, REVIEW, b"while-offline") == 0
    finally:
        writer.loop_stop()  # type: ignore[attr-defined]
        writer.disconnect()  # type: ignore[attr-defined]
    second = _Sink()
    inbound2 = Inbound(TOPIC)
    inbound2.register("review", second)
    with harness(box, inbound=inbound2) as h2:
        assert h2.publisher.wait_connected(20)
        wait_for(lambda: any(m.payload == b"while-offline" for m in second.got), 20,
                 "the verdict queued by the broker for the offline box")


@pytest.mark.parametrize("topic", [f"{TOPIC}/other", "elsewhere/review/x", f"{TOPIC}/review",
                                   f"{TOPIC}/review/a/b", f"{TOPIC}/deployments/x"])
def test_router_drops_unknown_topics(topic: str) -> None:
    sink = _Sink()
    inbound = Inbound(TOPIC)
    inbound.register("review", sink)
    inbound.register("deployments", sink)
    assert inbound.subscriptions() == [(f"{TOPIC}/deployments", 1), (f"{TOPIC}/review/+", 1)]
    assert inbound.dispatch(topic, b"x") is False
    assert inbound.dispatch(f"{TOPIC}/review/dr.who", b"y") is True
    assert inbound.dispatch(f"{TOPIC}/deployments", b"z") is True
    assert [(m.payload, m.sender) for m in sink.got] == [(b"y", "dr.who"), (b"z", "")]
    assert inbound.counters.dropped == 1


def test_router_survives_a_failing_handler_and_bounds_size() -> None:
    def broken(_m: InboundMessage) -> None:
        raise RuntimeError("bug")
    inbound = Inbound(TOPIC, max_bytes=10)
    inbound.register("review", broken)
    assert inbound.dispatch(REVIEW, b"small") is False
    sink = _Sink()
    inbound.register("review", sink)
    assert inbound.dispatch(REVIEW, b"x" * 11) is False
    assert sink.got == []
    with pytest.raises(ValueError):
        inbound.register("results", sink)
