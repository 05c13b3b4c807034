"""MQTT 5 over mutual TLS: drains the outbox to the broker, at least once, in order.

One thread owns the paho client (paho's client is not meant to be driven from
several threads).  It connects with a jittered exponential backoff, publishes
the retained birth message, then walks the outbox in sequence order keeping at
most ``inflight`` messages un-acknowledged.  A message is deleted from the
outbox only on a PUBACK with a success reason code; a refusal (e.g. 0x87 not
authorized) moves it to the blocked table and raises an alert, because
retrying a refused message forever would stall everything behind it.

On disconnect the in-flight window is forgotten and the walk restarts from the
oldest un-acknowledged message, so a message may be delivered twice, always
with the same CloudEvents id, never zero times.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import egress
from agent.config import Config, MqttSettings
from agent.errors import TransportError
from agent.outbox import Outbox

log = logging.getLogger("edge_agent.publish")


def tls_context(s: MqttSettings) -> ssl.SSLContext:
    """TLS 1.2+, the fleet CA pinned, hostname verified, our client certificate."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(s.cert), str(s.key))
        if s.crl is not None:
            ctx.load_verify_locations(cafile=str(s.crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except FileNotFoundError as exc:
        raise TransportError(
            f"MQTT TLS file missing: {exc.filename}",
            hint="check [mqtt] ca, cert and key in the config, or re-run provisioning",
        ) from None
    except ssl.SSLError as exc:
        raise TransportError(
            f"MQTT TLS files unusable: {exc.reason or exc}",
            hint="the certificate and key must match and be PEM; see 'edge-agent doctor'",
        ) from None
    return ctx


def describe_tls_failure(exc: BaseException) -> str:
    """Turn an ssl error into an operator sentence (no secrets in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"broker certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper():
            return f"broker refused our client certificate ({reason})"
        return f"TLS handshake failed ({reason})"
    if isinstance(exc, ConnectionRefusedError):
        return "broker refused the TCP connection (not listening?)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "broker did not answer in time"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class LinkState:
    connected: bool = False
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    connects: int = 0
    tls_failures: int = 0
    published: int = 0
    refused: int = 0
    blocked_phi: int = 0


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
    ) -> None:
        self.cfg = config
        self.s = config.mqtt
        self.outbox = outbox
        self.state = LinkState()
        self._birth = birth
        self._offline = offline
        self._alert = on_alert or (lambda _e, _d: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # mid -> outbox seq
        self._last_seq = 0
        self._client: mqtt.Client | None = None
        self._ctx = tls_context(self.s)
        self._connected_evt = threading.Event()
        self._drained = threading.Event()

    # -- topics -------------------------------------------------------------

    def topic(self, channel: str) -> str:
        return f"{self.cfg.topic_base}/{channel}"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Try to drain, send offline status, then disconnect cleanly."""
        deadline = time.time() + drain_timeout
        while time.time() < deadline and self.state.connected and self.outbox.stats()["depth"] > 0:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=drain_timeout + 5)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_evt.wait(timeout)

    # -- paho callbacks (never raise into paho) ------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                    _p: Any = None) -> None:
        try:
            if rc.is_failure:
                self.state.last_error = f"broker refused connection: {rc}"
                log.warning("mqtt connect refused: %s", rc)
                return
            with self._lock:
                self._inflight.clear()
                self._last_seq = 0
            self.state.connected = True
            self.state.since = time.time()
            self.state.last_error = None
            self.state.connects += 1
            birth = json.dumps(self._birth(), separators=(",", ":")).encode()
            client.publish(self.topic("status"), birth, qos=1, retain=True)
            self._connected_evt.set()
            log.info("mqtt connected to %s:%d", self.s.host, self.s.port)
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_connect handler failed")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any = None) -> None:
        try:
            if self.state.connected:
                self.state.since = time.time()
            self.state.connected = False
            self._connected_evt.clear()
            if rc.is_failure or rc.value != 0:
                self.state.last_error = f"disconnected: {rc}"
                # Under TLS 1.3 a refused client certificate shows up here.
                if self.state.connects == 0:
                    self.state.tls_failures += 1
            with self._lock:
                self._inflight.clear()
                self._last_seq = 0
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_disconnect handler failed")

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any = None) -> None:
        try:
            with self._lock:
                seq = self._inflight.pop(mid, None)
            if seq is None:
                return
            if rc.is_failure:
                self.state.refused += 1
                self.outbox.block(seq, f"broker refused publish: {rc}")
                self._alert("security.alert", {"reason": "broker refused publish",
                                                "reason_code": int(rc.value)})
                log.error("broker refused message seq=%d: %s", seq, rc)
            else:
                self.outbox.ack(seq)
                self.state.published += 1
        except Exception:  # noqa: BLE001
            log.exception("mqtt on_publish handler failed")

    # -- the loop -------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        cid = self.s.client_id or f"{self.cfg.site}.{self.cfg.device}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.tls_set_context(self._ctx)
        if self.s.tls_server_name:
            c.tls_insecure_set(False)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.max_inflight_messages_set(self.s.inflight)
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
        backoff = 0.5
        while not self._stop.is_set():
            client = self._new_client()
            self._client = client
            try:
                self._connect(client)
            except (OSError, ssl.SSLError) as exc:
                self.state.last_error = describe_tls_failure(exc)
                if isinstance(exc, ssl.SSLError):
                    self.state.tls_failures += 1
                log.warning("mqtt connect to %s:%d failed: %s", self.s.host, self.s.port,
                            self.state.last_error)
                self._sleep_backoff(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            try:
                self._session(client)
            except Exception as exc:  # noqa: BLE001 - never let the link thread die
                log.exception("mqtt session failed: %s", exc)
            was_up = self.state.connects > 0
            if self._stop.is_set():
                break
            backoff = 0.5 if was_up and self.state.connected is False and backoff > 8 else backoff
            self._sleep_backoff(backoff)
            backoff = min(backoff * 2, 60.0)
        self._client = None

    def _sleep_backoff(self, base: float) -> None:
        # Full jitter: a fleet reconnecting after a broker restart spreads out.
        self._stop.wait(random.uniform(base / 2, base))

    def _session(self, client: mqtt.Client) -> None:
        deadline = time.time() + 15
        while not self._stop.is_set():
            rc = client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if self.state.last_error is None:
                    self.state.last_error = f"network loop: {mqtt.error_string(rc)}"
                return
            if not self.state.connected:
                if time.time() > deadline:
                    self.state.last_error = self.state.last_error or "no CONNACK from broker"
                    client.disconnect()
                    return
                continue
            self._pump(client)
        # Graceful stop: an explicit offline status, then a clean disconnect
        # (a clean DISCONNECT suppresses the last will, so send it ourselves).
        if self.state.connected:
            offline = json.dumps(self._offline(), separators=(",", ":")).encode()
            info = client.publish(self.topic("status"), offline, qos=1, retain=True)
            end = time.time() + 3
            while not info.is_published() and time.time() < end:
                client.loop(timeout=0.05)
            client.disconnect()
            client.loop(timeout=0.1)

    def _pump(self, client: mqtt.Client) -> None:
        with self._lock:
            room = self.s.inflight - len(self._inflight)
            after = self._last_seq
        if room <= 0:
            return
        for msg in self.outbox.peek(after, room):
            hit = egress.check(msg.payload, msg.guard)
            with self._lock:
                self._last_seq = msg.seq
            if hit is not None:
                self.state.blocked_phi += 1
                self.outbox.block(msg.seq, str(hit))
                self._alert("egress.blocked", {"channel": msg.channel, "event_id": msg.event_id,
                                               "check": hit.kind})
                log.error("egress guard blocked %s message %s (%s)", msg.channel, msg.event_id,
                          hit.kind)
                continue
            info = client.publish(self.topic(msg.channel), msg.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                with self._lock:
                    self._last_seq = msg.seq - 1
                return
            with self._lock:
                self._inflight[info.mid] = msg.seq
