"""The MQTT link's TLS: the client context, the box's identity, and why a connect failed.

Why a separate TLS diagnosis: under TLS 1.3 the broker judges our client
certificate *after* the handshake, so paho only sees a lost connection.  When a
connection dies before CONNACK we open one plain TLS socket and read the
broker's alert, so the operator gets "certificate expired", not "conn lost".
``probe`` is the one real connect ``edge-agent doctor`` makes.  Used by the
publisher and by the central-ops side (fleet/), which dials the same broker.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import SAFE_ID, Config, MqttSettings
from agent.errors import ConfigError, TransportError

log = logging.getLogger(__name__)


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


def explain(s: MqttSettings, ctx: ssl.SSLContext, fallback: str) -> tuple[str, bool]:
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
    return False, explain(s, ctx, fallback)[0]
