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

Why a separate TLS diagnosis: under TLS 1.3 the broker judges our client
certificate *after* the handshake, so paho only sees a lost connection.  When a
connection dies before CONNACK we open one plain TLS socket and read the
broker's alert, so the operator gets "certificate expired", not "conn lost".
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import egress, faults
from agent.config import SAFE_ID, Config, MqttSettings
from agent.errors import ConfigError, TransportError
from agent.inbound import Inbound
from agent.liveness import Liveness, Stage
from agent.outbox import Outbox

# Status and job state are retained: the latest of each is what a consumer that
# subscribes later must see (presence; a deployment's progress).
RETAINED_CHANNELS = frozenset({"status", "jobs"})

log = logging.getLogger("edge_agent.publish")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 60.0
CONNACK_TIMEOUT = 15.0


class _NamedContext(ssl.SSLContext):
    """An SSLContext that verifies a fixed broker name whatever address we dial.

    paho passes the connect host as ``server_hostname``; ``[mqtt]
    tls_server_name`` lets a box dial an IP while the broker certificate names
    a host (split DNS in hospitals is common).
    """

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


_TLS_FIX = {
    "ca": "install the fleet CA with 'edge-agent provision install-cert --cert CERT.pem "
          "--ca FLEET-CA.pem', or correct [mqtt] ca in agent.toml",
    "cert": "install the device certificate with 'edge-agent provision install-cert "
            "--cert CERT.pem --ca FLEET-CA.pem', or correct [mqtt] cert in agent.toml",
    "key": "correct [mqtt] key in agent.toml, or restore the key from backup; without it, "
           "make a new key and CSR ('edge-agent provision rotate-cert') and install the "
           "certificate the fleet CA issues for it",
    "crl": "correct [mqtt] crl in agent.toml, or fetch the current CRL from the fleet CA",
}


def _tls_files(s: MqttSettings) -> list[tuple[str, Path]]:
    files = [("ca", s.ca), ("cert", s.cert), ("key", s.key)]
    return files + ([("crl", s.crl)] if s.crl is not None else [])


def _check_readable(key: str, path: Path) -> None:
    """ssl's own errors name no file ("[Errno 2] No such file or directory", filename
    None): open each file first, so the error says which config key to fix."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TransportError(f"MQTT TLS file missing: [mqtt] {key} {path} does not exist",
                             hint=_TLS_FIX[key]) from None
    except PermissionError:
        raise TransportError(
            f"MQTT TLS file unreadable: [mqtt] {key} {path} cannot be read by this user",
            hint=f"run as the edge-agent service user, or give the file to it: "
                 f"chown edge-agent {path}" + (f" && chmod 600 {path}" if key == "key" else ""),
        ) from None
    except OSError as exc:
        raise TransportError(f"MQTT TLS file unusable: [mqtt] {key} {path}: {exc.strerror}",
                             hint=_TLS_FIX[key]) from None


def _ssl_error(what: str, exc: ssl.SSLError, fix: str) -> TransportError:
    return TransportError(f"MQTT TLS files unusable: {what} ({exc.reason or exc})", hint=fix)


def tls_context(s: MqttSettings) -> ssl.SSLContext:
    """TLS 1.2+, the fleet CA pinned (system CAs not trusted), hostname verified,
    our client certificate, optional CRL."""
    for key, path in _tls_files(s):
        _check_readable(key, path)
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = s.tls_server_name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(s.ca))
    except ssl.SSLError as exc:
        raise _ssl_error(f"[mqtt] ca {s.ca} is not a PEM CA certificate", exc,
                         _TLS_FIX["ca"]) from None
    try:
        ctx.load_cert_chain(str(s.cert), str(s.key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _ssl_error(
                f"[mqtt] key {s.key} does not match [mqtt] cert {s.cert}", exc,
                "point [mqtt] key at the private key the certificate was issued for, or "
                "install the certificate issued for this key's CSR ('edge-agent provision "
                "install-cert')") from None
        raise _ssl_error(f"[mqtt] cert {s.cert} or [mqtt] key {s.key} is not PEM", exc,
                         "the certificate must be PEM ('-----BEGIN CERTIFICATE-----') and the "
                         "key an unencrypted PEM private key; 'edge-agent doctor' checks "
                         "both") from None
    if s.crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(s.crl))
        except ssl.SSLError as exc:
            raise _ssl_error(f"[mqtt] crl {s.crl} is not a PEM CRL", exc,
                             _TLS_FIX["crl"]) from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


# -- identity -----------------------------------------------------------------------


def certificate_cn(path: os.PathLike[str] | str) -> str:
    if not os.path.exists(path):
        raise TransportError(f"MQTT TLS file missing: [mqtt] cert {path} does not exist",
                             hint=_TLS_FIX["cert"])
    try:
        cert = x509.load_pem_x509_certificate(open(path, "rb").read())  # noqa: SIM115
    except (OSError, ValueError) as exc:
        raise TransportError(f"device certificate {path} is not readable PEM ({exc})",
                             hint="re-run 'edge-agent provision install-cert'") from None
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def client_id(cfg: Config) -> str:
    """The client id the config asks for; the box connects with its certificate CN
    (``check_identity`` refuses a configured id that differs from it)."""
    return cfg.mqtt.client_id or f"{cfg.site}.{cfg.device}"


def check_identity(cfg: Config) -> str:
    """Refuse identities outside the safe alphabet; returns the certificate CN.

    The broker maps the certificate CN to the user its ACL grants a topic
    prefix to, and the client id names the session: a "+", "#" or "/" in either
    could reach into another box's topics or sessions.
    """
    cn = certificate_cn(cfg.mqtt.cert)
    problems = []
    if not SAFE_ID.match(cn):
        problems.append(
            f"[mqtt] cert: the device certificate's CN {cn!r} is not a safe identity "
            "(1-64 characters of A-Z a-z 0-9 _ . -); ask the fleet CA for a certificate "
            f"with CN '{cfg.site}.{cfg.device}'")
    cid = client_id(cfg)
    if not SAFE_ID.match(cid):
        problems.append(f"[mqtt] client_id {cid!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    elif cfg.mqtt.client_id is not None and cid != cn:
        # The broker replaces the client id with the certificate name
        # (use_username_as_clientid), so that no certificate can take over another's
        # session: any other id would be a lie in our own logs.
        problems.append(
            f"[mqtt] client_id {cid!r} differs from the device certificate's CN {cn!r}; the "
            "broker binds the client id to the certificate name, so remove [mqtt] client_id "
            "(the box uses the CN)")
    if problems:
        raise ConfigError(problems, path=str(cfg.path))
    if cn != f"{cfg.site}.{cfg.device}":
        log.warning("device certificate CN %r differs from site.device %r: the broker ACL "
                    "must grant this CN the prefix %s", cn, f"{cfg.site}.{cfg.device}",
                    cfg.topic_base)
    return cn


# -- failure reasons ------------------------------------------------------------------

_ALERTS = {
    "CERTIFICATE_EXPIRED": "broker refused our client certificate: it has expired",
    "UNKNOWN_CA": "broker refused our client certificate: not issued by a CA it trusts",
    "CERTIFICATE_REQUIRED": "broker requires a client certificate and got none",
    "BAD_CERTIFICATE": "broker refused our client certificate (bad certificate)",
    "CERTIFICATE_REVOKED": "broker refused our client certificate: it is revoked",
    "UNSUPPORTED_CERTIFICATE": "broker refused our client certificate (unsupported)",
    "HANDSHAKE_FAILURE": "TLS handshake failed (no common protocol or cipher)",
    "PROTOCOL_VERSION": "TLS handshake failed (broker does not speak TLS 1.2 or newer)",
    "WRONG_VERSION_NUMBER": "the port does not speak TLS (plain MQTT listener?)",
}

_VERIFY = {
    10: "broker certificate has expired",
    9: "broker certificate is not valid yet (check the box's clock)",
    18: "broker certificate is self-signed, not issued by the pinned fleet CA",
    19: "broker certificate is not issued by the pinned fleet CA",
    20: "broker certificate is not issued by the pinned fleet CA",
    21: "broker certificate is not issued by the pinned fleet CA",
    23: "broker certificate is revoked (CRL)",
    62: "broker certificate does not name the host we connected to",
    64: "broker certificate does not name the address we connected to",
}


def describe_tls_failure(exc: BaseException, host: str = "") -> str:
    """Turn a connect error into an operator sentence (no secrets in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        base = _VERIFY.get(int(exc.verify_code or 0))
        if exc.verify_code in (62, 64) and host:
            base = f"broker certificate does not name {host!r} (hostname mismatch)"
        return base or f"broker certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).upper()
        for key, text in _ALERTS.items():
            if key in reason:
                return text
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "broker refused the TCP connection (not listening?)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "broker did not answer in time"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker host name ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"


def is_tls_reason(reason: str) -> bool:
    return reason.startswith(("broker certificate", "broker refused our client",
                              "broker requires a client", "TLS handshake", "the port does not"))


def diagnose(ctx: ssl.SSLContext, host: str, port: int, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to the broker fails, or None when TLS itself is fine."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3: the broker's verdict on our certificate is an alert that
            # arrives on the first read; a healthy broker just waits for CONNECT.
            tls.settimeout(1.0)
            try:
                if tls.recv(1) == b"":
                    return "broker closed the connection right after the TLS handshake"
            except TimeoutError:
                return None
    except (OSError, ssl.SSLError) as exc:
        return describe_tls_failure(exc, host)
    return None


def _local_cert_problem(s: MqttSettings) -> str | None:
    """Our own certificate's validity, judged locally (the broker's alert is terse)."""
    try:
        cert = x509.load_pem_x509_certificate(s.cert.read_bytes())
    except (OSError, ValueError):
        return None
    now = datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        return f"our device certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"our device certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    return None


def _explain(s: MqttSettings, ctx: ssl.SSLContext, fallback: str) -> tuple[str, bool]:
    reason = diagnose(ctx, s.host, s.port)
    if reason is None:
        return fallback, False
    local = _local_cert_problem(s)
    if local and reason.startswith("broker refused our client"):
        reason = f"{reason} ({local})"
    return reason, True


def probe(settings: Config | MqttSettings, timeout: float = 10.0) -> tuple[bool, str]:
    """One real mutual-TLS MQTT 5 connect (for ``edge-agent doctor``): (ok, reason).

    The broker binds the client id to the certificate (``use_username_as_clientid``:
    one session per identity), so this connect *is* the box's session: it would take
    a running daemon's over. ``doctor`` asks a running daemon for its own link instead
    and probes only when none runs. Clean start and no will: it leaves nothing behind
    (the box keeps undelivered messages in its outbox, not in the broker session).
    """
    s = settings.mqtt if isinstance(settings, Config) else settings
    try:
        cid = certificate_cn(s.cert) or f"edge-agent-probe-{os.getpid()}"
    except TransportError:
        cid = f"edge-agent-probe-{os.getpid()}"  # tls_context below says what is wrong
    try:
        ctx = tls_context(s)
    except TransportError as exc:
        return False, str(exc)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any = None) -> None:
        result["rc"] = rc
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    c.on_connect = on_connect
    try:
        c.connect(s.host, s.port, keepalive=max(5, int(timeout)), clean_start=True)
    except (OSError, ssl.SSLError) as exc:
        return False, describe_tls_failure(exc, s.host)
    deadline = time.monotonic() + timeout
    rc_loop = mqtt.MQTT_ERR_SUCCESS
    while not done.is_set() and time.monotonic() < deadline:
        rc_loop = c.loop(timeout=0.1)
        if rc_loop != mqtt.MQTT_ERR_SUCCESS:
            break
    rc = result.get("rc")
    if rc is not None and not rc.is_failure:
        c.disconnect()
        c.loop(timeout=0.1)
        return True, f"connected to {s.host}:{s.port} with mutual TLS (MQTT 5)"
    try:
        c.disconnect()
    except Exception:  # noqa: BLE001 - already gone
        pass
    if rc is not None:
        return False, f"broker refused the MQTT connection: {rc}"
    fallback = ("no CONNACK from the broker" if rc_loop == mqtt.MQTT_ERR_SUCCESS
                else f"connection lost before CONNACK ({mqtt.error_string(rc_loop)})")
    return False, _explain(s, ctx, fallback)[0]


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
        self._last_seq = 0
        self._client: mqtt.Client | None = None
        self._ctx = tls_context(self.s)
        self._connected_evt = threading.Event()
        self._got_connack = False
        self._attempt_error = ""

    # -- topics -------------------------------------------------------------

    def topic(self, channel: str) -> str:
        return f"{self.cfg.topic_base}/{channel}"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._liveness is not None:
            self._stage = self._liveness.stage("publisher",
                                               self.cfg.watchdog.stage_deadline_seconds)
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
                self._last_seq = 0
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
                log.warning("mqtt disconnected: %s", rc)
            self.state.connected = False
            self._connected_evt.clear()
            with self._lock:
                self._inflight.clear()
                self._status_mids.clear()
                self._last_seq = 0
                self.state.inflight = 0
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
                self.outbox.ack(seq)
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
                    reason, tls = _explain(self.s, self._ctx, self._attempt_error)
                    self._fail(reason, tls=tls)
            if self._stop.is_set():
                break
            self._sleep_backoff(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        self._client = None

    def _sleep_backoff(self, base: float) -> None:
        # Full jitter: a fleet reconnecting after a broker restart spreads out.
        delay = random.uniform(base / 2, base)
        self.state.next_retry_s = round(delay, 2)
        end = time.monotonic() + delay
        # In steps, beating: a minute of backoff is idle, not a hang.
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self._beat(doing="waiting to reconnect")
            self._stop.wait(min(left, 5.0))

    def _session(self, client: mqtt.Client) -> None:
        deadline = time.monotonic() + CONNACK_TIMEOUT
        while not self._stop.is_set():
            self._beat(doing="in session with the broker")
            rc = client.loop(timeout=0.05)
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
            after = self._last_seq
        if room <= 0:
            return
        for msg in self.outbox.peek(after, room):
            hit = egress.check(msg.payload, msg.guard, made_at=msg.created_at)
            with self._lock:
                self._last_seq = msg.seq
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
                with self._lock:
                    self._last_seq = msg.seq - 1
                return
            with self._lock:
                self._inflight[info.mid] = msg.seq
                self.state.inflight = len(self._inflight)
