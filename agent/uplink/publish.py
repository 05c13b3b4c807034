"""MQTT 5 over mutual TLS: drains the outbox to the broker, at least once, in order.

One thread owns the paho client (paho's client is not meant to be driven from
several threads).  It connects with a jittered exponential backoff, publishes
the retained birth message, then walks the outbox in sequence order keeping at
most ``inflight`` messages un-acknowledged.  The reading of that walk (decrypting
rows, the egress guard) runs ahead on a thread of its own (agent/uplink/readahead.py),
which hands the MQTT thread checked messages in sequence order.  A message is deleted from the
outbox only on a PUBACK with a success reason code; a refusal (e.g. 0x87 not
authorized) moves it to the blocked table and raises an alert, because
retrying a refused message forever would stall everything behind it.

On disconnect the in-flight window is forgotten and the walk restarts from the
oldest un-acknowledged message, so a message may be delivered twice, always
with the same CloudEvents id, never zero times.

The TLS context, the identity check and the diagnosis of a failed connect
live in agent/uplink/mqtt_tls.py.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config
from agent.errors import EdgeAgentError
from agent.ops import faults
from agent.ops.liveness import Liveness, Stage
from agent.types import OutboxMessage
from agent.uplink import egress
from agent.uplink.inbound import Inbound
from agent.uplink.mqtt_tls import check_identity, describe_tls_failure, explain, tls_context
from agent.uplink.mqttloop import Wakeup, corked, step
from agent.uplink.outbox import Outbox
from agent.uplink.readahead import ReadAhead

# Status and job state are retained: the latest of each is what a consumer that
# subscribes later must see (presence; a deployment's progress).
RETAINED_CHANNELS = frozenset({"status", "jobs"})

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 60.0
CONNACK_TIMEOUT = 15.0
# The longest the loop sleeps when neither the broker nor the outbox has anything for
# it: it beats the watchdog, keeps the connection alive and flushes batched acks.
IDLE_WAKE_S = 1.0


# -- live state ------------------------------------------------------------------------


@dataclass
class LinkState:
    """What ``edge-agent status`` and telemetry show about the broker link."""

    connected: bool = False
    since: float = field(default_factory=time.time)  # of the current up/down state
    last_error: str | None = None
    last_error_at: float | None = None
    connects: int = 0
    connect_failures: int = 0
    tls_failures: int = 0
    published: int = 0
    refused: int = 0
    blocked_phi: int = 0
    inflight: int = 0
    next_retry_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Publisher:
    """Owns the MQTT connection and drains the outbox to it."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        *,
        birth: Callable[[], dict[str, Any]],
        offline: Callable[[], dict[str, Any]],
        on_alert: Callable[[str, dict[str, object]], None] | None = None,
        liveness: Liveness | None = None,
        inbound: Inbound | None = None,
    ) -> None:
        self.cfg = config
        self.inbound = inbound
        self._liveness = liveness
        self._stage: Stage | None = None
        self.s = config.mqtt
        self.outbox = outbox
        self.state = LinkState()
        self.identity = check_identity(config)
        self._birth = birth
        self._offline = offline
        self._alert = on_alert or (lambda _e, _d: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # mid -> outbox seq
        self._status_mids: set[int] = set()
        self._client: mqtt.Client | None = None
        self._ctx = tls_context(self.s)
        self._connected_evt = threading.Event()
        self._got_connack = False
        self._attempt_error = ""
        # Woken by the broker's socket, by every enqueue and by stop (agent/uplink/mqttloop.py).
        self._wake = Wakeup()
        outbox.on_enqueue(self._wake.set)
        self._acks: list[int] = []  # seqs PUBACKed during one network step, acked together
        # The next messages read and checked on a thread of their own (agent/uplink/readahead.py).
        self._ahead = ReadAhead(outbox, 2 * self.s.inflight, self._wake.set)

    # -- topics -------------------------------------------------------------

    def topic(self, channel: str) -> str:
        return f"{self.cfg.topic_base}/{channel}"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._liveness is not None:
            self._stage = self._liveness.stage("publisher",
                                               self.cfg.watchdog.stage_deadline_seconds)
        self._ahead.start()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Try to drain, send offline status, then disconnect cleanly."""
        deadline = time.time() + drain_timeout
        while time.time() < deadline and self.state.connected and self.outbox.stats()["depth"] > 0:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_timeout + 5)
        self._ahead.stop()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_evt.wait(timeout)

    def _beat(self, *, progress: bool = False, doing: str = "") -> None:
        if self._stage is not None:
            self._stage.beat(progress=progress, doing=doing)

    def _fail(self, reason: str, *, tls: bool = False) -> None:
        changed = reason != self.state.last_error
        self.state.last_error = reason
        self.state.last_error_at = time.time()
        self.state.connect_failures += 1
        if tls:
            self.state.tls_failures += 1
        # Every attempt is logged while the reason changes; a steady outage is
        # logged with its count so the log does not grow by a line per retry.
        if changed or self.state.connect_failures % 20 == 1:
            log.warning("mqtt %s:%d unavailable: %s (attempt %d)", self.s.host, self.s.port,
                        reason, self.state.connect_failures)

    # -- paho callbacks (never raise into paho) ------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                    _p: Any = None) -> None:
        try:
            self._got_connack = True
            if rc.is_failure:
                self._fail(f"broker refused the MQTT connection: {rc}")
                return
            with self._lock:
                self._inflight.clear()
                self._status_mids.clear()
            self._restart_walk()
            self.state.connected = True
            self.state.since = time.time()
            self.state.last_error = None
            self.state.connects += 1
            self.state.next_retry_s = None
            birth = json.dumps(self._birth(), separators=(",", ":")).encode()
            hit = egress.check(birth)
            if hit is None:
                info = client.publish(self.topic("status"), birth, qos=1, retain=True)
                with self._lock:
                    self._status_mids.add(info.mid)
            else:
                log.error("birth status withheld: %s", hit)
            self._subscribe_inbound(client)
            self._connected_evt.set()
            log.info("mqtt connected to %s:%d as %s", self.s.host, self.s.port, self.identity)
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_connect handler failed")

    def _subscribe_inbound(self, client: mqtt.Client) -> None:
        # Every CONNACK, not only the first: the broker keeps the subscriptions of our
        # persistent session, but a broker that lost its state (or a new session) has none.
        subs = self.inbound.subscriptions() if self.inbound is not None else []
        if subs:
            client.subscribe(subs)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode],
                      _p: Any = None) -> None:
        try:
            for rc in codes:
                if rc.is_failure:
                    # An ACL that does not let the box read its own inbound topics: verdicts
                    # and deployments would never arrive; say so loudly.
                    self.state.last_error = f"broker refused an inbound subscription: {rc}"
                    self._alert("security.alert", {"reason": "broker refused subscription",
                                                    "reason_code": int(rc.value)})
                    log.error("broker refused an inbound subscription: %s", rc)
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_subscribe handler failed")

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        # Inbound.dispatch never raises; paho acknowledges a QoS 1 message after this returns.
        if self.inbound is not None:
            self.inbound.dispatch(message.topic, message.payload, retained=bool(message.retain))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any = None) -> None:
        try:
            if self.state.connected:
                self.state.since = time.time()
                # Our own clean disconnect (stop) is not a fault: only a lost link warns,
                # so `journalctl -p warning` shows outages, not every restart.
                if rc.is_failure or not self._stop.is_set():
                    log.warning("mqtt disconnected: %s", rc)
                else:
                    log.info("mqtt disconnected: %s", rc)
            self.state.connected = False
            self._connected_evt.clear()
            with self._lock:
                self._inflight.clear()
                self._status_mids.clear()
                self.state.inflight = 0
            self._restart_walk()
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_disconnect handler failed")

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any = None) -> None:
        try:
            with self._lock:
                seq = self._inflight.pop(mid, None)
                status = mid in self._status_mids
                self._status_mids.discard(mid)
                self.state.inflight = len(self._inflight)
            if status and rc.is_failure:
                self.state.refused += 1
                self.state.last_error = f"broker refused our status publish: {rc}"
                self._alert("security.alert", {"reason": "broker refused status publish",
                                                "reason_code": int(rc.value)})
                log.error("broker refused the status message on %s: %s", self.topic("status"),
                          rc)
            if seq is None:
                return
            if rc.is_failure:
                self.state.refused += 1
                self.outbox.block(seq, f"broker refused publish: {rc}")
                self._alert("security.alert", {"reason": "broker refused publish",
                                                "reason_code": int(rc.value)})
                log.error("broker refused message seq=%d on %s: %s (kept in the blocked table)",
                          seq, self.cfg.topic_base, rc)
            else:
                # Acknowledged in the outbox with the rest of this network step's
                # PUBACKs (_session), before the next peek.
                self._acks.append(seq)
                self.state.published += 1
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_publish handler failed")

    # -- the loop -------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        # The CN: the id the broker gives this certificate's session whatever we send.
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.identity,
                        protocol=mqtt.MQTTv5)
        c.tls_set_context(self._ctx)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.max_inflight_messages_set(self.s.inflight + 2)  # + birth/offline status
        c.max_queued_messages_set(0)
        will = json.dumps(self._offline(), separators=(",", ":")).encode()
        c.will_set(self.topic("status"), will, qos=1, retain=True)
        return c

    def _connect(self, c: mqtt.Client) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.s.session_expiry_seconds
        c.connect(self.s.host, self.s.port, keepalive=self.s.keepalive,
                  clean_start=False, properties=props)

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            self._beat(doing="connecting to the broker")
            client = self._new_client()
            self._client = client
            self._got_connack = False
            self._attempt_error = "connection lost before CONNACK"
            try:
                self._connect(client)
            except (OSError, ssl.SSLError) as exc:
                reason = describe_tls_failure(exc, self.s.host)
                self._fail(reason, tls=isinstance(exc, ssl.SSLError))
            else:
                connects = self.state.connects
                try:
                    self._session(client)
                except Exception as exc:  # noqa: BLE001 - never let the link thread die
                    log.exception("mqtt session failed: %s", exc)
                if self.state.connects > connects:
                    backoff = BACKOFF_MIN  # we were up: a fresh outage starts fast
                elif not self._stop.is_set() and not self._got_connack:
                    reason, tls = explain(self.s, self._ctx, self._attempt_error)
                    self._fail(reason, tls=tls)
            if self._stop.is_set():
                break
            self._sleep_backoff(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        self._client = None
        self._wake.close()

    def _sleep_backoff(self, base: float) -> None:
        # Full jitter: a fleet reconnecting after a broker restart spreads out.
        delay = random.uniform(base / 2, base)
        self.state.next_retry_s = round(delay, 2)
        end = time.monotonic() + delay
        # In steps, beating: a minute of backoff is idle, not a hang.
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self._beat(doing="waiting to reconnect")
            self._stop.wait(min(left, 5.0))

    def _restart_walk(self) -> None:
        # From the oldest un-acknowledged message again; the PUBACKs this network step
        # brought are recorded first, so those messages are not read (and sent) again.
        self._apply_acks()
        self._ahead.restart(0)

    def _apply_acks(self) -> None:
        if self._acks:
            acks, self._acks = self._acks, []
            try:
                self.outbox.ack_many(acks)
            except EdgeAgentError as exc:
                # As when each PUBACK was acked in its callback: the session goes on; a
                # message whose ack did not stick is delivered again, same id.
                log.error("outbox: could not record %d acknowledgements: %s", len(acks), exc)

    def _session(self, client: mqtt.Client) -> None:
        try:
            self._session_loop(client)
        finally:
            self._apply_acks()  # PUBACKs that came with a disconnect still count

    def _session_loop(self, client: mqtt.Client) -> None:
        deadline = time.monotonic() + CONNACK_TIMEOUT
        while not self._stop.is_set():
            self._beat(doing="in session with the broker")
            # Wakes on PUBACKs, on a new outbox message and on stop; no polling.
            rc = step(client, self._wake, IDLE_WAKE_S if self._got_connack else 0.25)
            self._apply_acks()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if not self._got_connack:
                    self._attempt_error = (
                        f"connection lost before CONNACK ({mqtt.error_string(rc)})")
                return
            if not self.state.connected:
                if self._got_connack or time.monotonic() > deadline:
                    if not self._got_connack:
                        self._attempt_error = "no CONNACK from the broker"
                    client.disconnect()
                    return
                continue
            self._pump(client)
        # Graceful stop: an explicit offline status, then a clean disconnect
        # (a clean DISCONNECT suppresses the last will, so send it ourselves).
        if self.state.connected:
            offline = json.dumps(self._offline(), separators=(",", ":")).encode()
            info = client.publish(self.topic("status"), offline, qos=1, retain=True)
            end = time.monotonic() + 3
            while not info.is_published() and time.monotonic() < end:
                client.loop(timeout=0.05)
            client.disconnect()
            client.loop(timeout=0.1)

    def _pump(self, client: mqtt.Client) -> None:
        with self._lock:
            room = self.s.inflight - len(self._inflight)
        if room <= 0:
            return
        # Read, decrypted and checked by the guard ahead of time, in seq order.
        checked = self._ahead.take(room)
        if not checked:
            return
        with corked(client):
            self._publish(client, checked)

    def _publish(self, client: mqtt.Client,
                 checked: list[tuple[OutboxMessage, egress.GuardHit | None]]) -> None:
        for msg, hit in checked:
            if hit is not None:
                self.state.blocked_phi += 1
                self.outbox.block(msg.seq, str(hit))
                self._alert("egress.blocked", {"channel": msg.channel, "event_id": msg.event_id,
                                               "check": hit.kind})
                log.error("egress guard blocked %s message %s (%s); kept encrypted in the "
                          "outbox's blocked table", msg.channel, msg.event_id, hit.kind)
                continue
            faults.hang_point("publisher")
            info = client.publish(self.topic(msg.channel), msg.payload, qos=1,
                                  retain=msg.channel in RETAINED_CHANNELS)
            self._beat(progress=True, doing="publishing")
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._ahead.restart(msg.seq - 1)  # this one and the rest again, later
                return
            with self._lock:
                self._inflight[info.mid] = msg.seq
                self.state.inflight = len(self._inflight)
