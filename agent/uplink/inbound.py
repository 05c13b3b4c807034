"""The box's inbound MQTT topics: what central ops may send back, and who handles it.

Everything the box publishes is outbound (status, results, telemetry, audit,
jobs).  Two channels come back in (DESIGN.md, "back into the box"): reviewers'
verdicts on ``{base}/review/<reviewer>`` and signed deployment documents on
``{base}/deployments``.  The broker decides who may write them (the ACL gives
each role's certificates its own inbound topic); this module only routes what
arrives on the publisher's connection to the stage that owns the channel.

A verdict's topic has one level more, the sender: the broker takes the MQTT user
from the certificate CN (``use_identity_as_username``) and lets a reviewer
certificate write only ``{base}/review/<its CN>``.  The box cannot see the
certificate that published a message, but it sees the topic the broker let it
write, so that level is the reviewer's identity (``InboundMessage.sender``).

Why a router of its own: the publisher owns the one MQTT session (clean_start
false, a session that outlives reconnects, so QoS 1 messages sent while the
box was offline are delivered when it comes back), and paho calls
``on_message`` on the publisher's loop thread.  A handler must therefore be
quick and must never raise: it makes the message durable (or refuses it) and
returns; paho acknowledges a QoS 1 message only after the callback returns, so
a message the box has not yet made durable is redelivered after a crash.

May import: agent.types only (handlers bring their own dependencies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# The inbound channels the box subscribes to, and the outbound ones it may write;
# the broker ACL (agent/ops/devbox.py, docs/fleet.md) is written from these.
INBOUND_CHANNELS = ("review", "deployments")
OUTBOUND_CHANNELS = ("status", "results", "telemetry", "audit", "jobs")
# Inbound channels whose topic ends in the sender's identity (one more level).
PER_SENDER_CHANNELS = ("review",)


def topic_filter(base: str, channel: str) -> str:
    """What the box subscribes to (and the ACL lets it read) for one inbound channel."""
    return f"{base}/{channel}/+" if channel in PER_SENDER_CHANNELS else f"{base}/{channel}"

# An inbound payload bigger than this is dropped unread (a deployment document or
# a verdict is a few kB; package chunks are bounded by their own protocol).
MAX_INBOUND_BYTES = 1 << 20


@dataclass(frozen=True)
class InboundMessage:
    """One message that arrived on an inbound topic."""

    channel: str
    topic: str
    payload: bytes
    received_at: float
    retained: bool = False
    # The topic's last level on a per-sender channel: the publishing certificate's CN
    # as the broker's ACL bound it; "" on the other channels.
    sender: str = ""


Handler = Callable[[InboundMessage], None]
# Told (with why, in words with no message content) when the router drops a message of
# the channel unread, so that the channel's owner audits and reports the refusal as it
# does for the messages it reads.
Dropped = Callable[[str], None]


@dataclass
class InboundCounters:
    received: int = 0
    handled: int = 0
    dropped: int = 0  # unknown channel, oversize, or the handler failed
    per_channel: dict[str, int] = field(default_factory=dict)


class Inbound:
    """Routes messages on ``{topic_base}/{channel}`` to the handler of that channel."""

    def __init__(self, topic_base: str, *, max_bytes: int = MAX_INBOUND_BYTES) -> None:
        self._base = topic_base
        self._max = max_bytes
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._dropped: dict[str, Dropped] = {}
        self._lock = threading.Lock()
        self.counters = InboundCounters()

    def register(self, channel: str, handler: Handler, *, qos: int = 1,
                 dropped: Dropped | None = None) -> None:
        """Subscribe ``channel`` on the next (re)connect and hand its messages to ``handler``;
        ``dropped`` hears of the ones refused unread (over the size bound)."""
        if channel not in INBOUND_CHANNELS:
            raise ValueError(f"{channel!r} is not an inbound channel ({', '.join(INBOUND_CHANNELS)})")
        with self._lock:
            self._handlers[channel] = (handler, qos)
            if dropped is not None:
                self._dropped[channel] = dropped

    def subscriptions(self) -> list[tuple[str, int]]:
        """(topic, qos) pairs the publisher subscribes to after every CONNACK."""
        with self._lock:
            return [(topic_filter(self._base, ch), qos)
                    for ch, (_h, qos) in sorted(self._handlers.items())]

    def dispatch(self, topic: str, payload: bytes | bytearray, *, retained: bool = False) -> bool:
        """Hand one message to its channel's handler; never raises (paho's callback thread).

        Returns whether a handler took it.  Log lines name the channel and size only:
        a verdict's free text or a document's content never reaches the log here.
        """
        self.counters.received += 1
        rest = topic[len(self._base) + 1:] if topic.startswith(self._base + "/") else ""
        channel, _, sender = rest.partition("/")
        with self._lock:
            entry = self._handlers.get(channel)
        per_sender = channel in PER_SENDER_CHANNELS
        if (sender == "" or "/" in sender) if per_sender else sender != "":
            entry = None  # a sender level where none belongs, or none where one must be
        if entry is None:
            self.counters.dropped += 1
            log.warning("inbound message on an unexpected topic dropped (%d bytes)", len(payload))
            return False
        if len(payload) > self._max:
            self.counters.dropped += 1
            why = f"{len(payload)} bytes, over the {self._max} byte bound: dropped unread"
            log.warning("inbound %s message of %s", channel, why)
            with self._lock:
                dropped = self._dropped.get(channel)
            if dropped is not None:
                try:
                    dropped(why)
                except Exception:  # noqa: BLE001 - never into paho's loop
                    log.exception("inbound %s refusal report failed", channel)
            return False
        msg = InboundMessage(channel=channel, topic=topic, payload=bytes(payload),
                             received_at=time.time(), retained=retained, sender=sender)
        try:
            entry[0](msg)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the MQTT loop
            self.counters.dropped += 1
            log.exception("inbound %s handler failed", channel)
            return False
        self.counters.handled += 1
        self.counters.per_channel[channel] = self.counters.per_channel.get(channel, 0) + 1
        return True
