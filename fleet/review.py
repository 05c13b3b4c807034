"""``edge-agent fleet review``: central ops' side of human review.

``collect``: the flagged results of one box as they arrive on its results topic
(de-identified: what every result carries), seen with a read-only ops
certificate, and the box's acknowledgements (telemetry ``review.acks``) that say
which of them already have a verdict.  Results are not retained by the broker:
``collect`` keeps what it saw in a local cache file (0600, de-identified results
only) so a later ``list`` still shows them.

``submit``: a verdict (docs/schemas/verdict.schema.json) published with a
*reviewer* certificate on ``{box}/review/<its CN>``, the only topic the broker lets
that certificate write; the box takes the reviewer's identity from that level, so
the verdict's ``source`` names the certificate's CN too.
The broker's PUBACK reason code says whether it took it (0x87: this certificate
may not write there); the box's acknowledgement (accepted / ignored / refused and
why) comes back in its next telemetry, which ``submit`` waits for with the ops
certificate.
"""

from __future__ import annotations

import json
import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import ConfigError, EdgeAgentError, TransportError
from agent.review import verdicts
from agent.uplink.mqtt_tls import tls_context
from fleet.settings import OpsSettings

NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class Reviewer:
    cert: Path
    key: Path
    name: str = "reviewer"  # the certificate's CN: the topic level and the verdict's source


def load_reviewer(ops_toml: Path, cert: Path | None = None, key: Path | None = None,
                  name: str | None = None) -> Reviewer:
    """The reviewer identity: --cert/--key, else ops.toml's [reviewer] cert/key.  Its name
    is the certificate's CN; a ``name`` given (--name, [reviewer] name) must be that CN."""
    table: dict[str, Any] = {}
    try:
        table = dict(tomllib.loads(ops_toml.read_text()).get("reviewer") or {})
    except (OSError, tomllib.TOMLDecodeError):
        pass
    base = ops_toml.parent

    def path(v: Any) -> Path | None:
        if not isinstance(v, str) or not v:
            return None
        return Path(v) if Path(v).is_absolute() else base / v

    c = cert or path(table.get("cert"))
    k = key or path(table.get("key"))
    if c is None or k is None:
        raise ConfigError(["no reviewer certificate: give --cert and --key, or a [reviewer] "
                           "table with cert and key in the ops config"], path=str(ops_toml))
    cn = _cn(c)
    declared = name or table.get("name")
    if isinstance(declared, str) and declared and declared != cn:
        raise ConfigError([f"reviewer name {declared!r} is not the CN of {c} ({cn!r}): the box "
                           "takes the reviewer's identity from the certificate; drop the name "
                           "or use that reviewer's certificate"], path=str(ops_toml))
    return Reviewer(c, k, cn)


def _cn(cert: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise ConfigError([f"cannot read the reviewer certificate {cert}: {exc.strerror}"],
                          path=str(cert)) from None
    except ValueError:
        raise ConfigError([f"{cert} is not a PEM certificate"], path=str(cert)) from None
    attrs = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise ConfigError([f"{cert} has no CN: a reviewer certificate's CN is its identity"],
                          path=str(cert))
    return str(attrs[0].value)


def _client(s: OpsSettings, on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
            topics: tuple[str, ...] = ()) -> tuple[mqtt.Client, threading.Event, list[str]]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-review-{os.getpid()}",
                    protocol=mqtt.MQTTv5)
    c.tls_set_context(tls_context(s.mqtt))
    ready = threading.Event()
    errors: list[str] = []
    acks: dict[int, int] = {}
    c.user_data_set(acks)

    def on_connect(cl: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            errors.append(f"broker refused the connection: {rc}")
            ready.set()
            return
        if topics:
            cl.subscribe([(t, 1) for t in topics])
        else:
            ready.set()

    def on_subscribe(*_a: Any) -> None:
        ready.set()

    def on_publish(_c: mqtt.Client, u: dict[int, int], mid: int, rc: Any, _p: Any = None) -> None:
        u[mid] = int(getattr(rc, "value", rc))

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_publish = on_publish
    if on_message is not None:
        c.on_message = lambda _c, _u, m: on_message(m)
    try:
        c.connect(s.mqtt.host, s.mqtt.port, keepalive=s.mqtt.keepalive)
    except OSError as exc:
        raise TransportError(f"cannot reach the broker {s.mqtt.host}:{s.mqtt.port}: {exc}") from None
    c.loop_start()
    return c, ready, errors


@dataclass
class Collected:
    flagged: dict[str, dict[str, Any]] = field(default_factory=dict)
    acks: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _flagged_of(ev: dict[str, Any]) -> dict[str, Any] | None:
    data = ev.get("data")
    if not isinstance(data, dict):
        return None
    models = [m for m in data.get("models", []) if isinstance(m, dict) and m.get("needs_review")]
    if not models:
        return None
    return {"result_id": ev.get("id"), "time": ev.get("time"),
            "study": (data.get("study") or {}).get("ref"),
            "models": [{"name": m.get("name"), "version": m.get("version"),
                        "finding": m.get("finding"), "confidence": m.get("confidence"),
                        "reasons": m.get("review_reasons", []),
                        "explanation": (m.get("explanation") or {}).get("text")}
                       for m in models]}


def collect(s: OpsSettings, box: str, *, wait: float, until: int | None = None,
            cache: Path | None = None,
            on_ready: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Flagged results of ``box`` (site/device) seen within ``wait`` seconds (or until
    ``until`` are known), merged with the cache; those the box acknowledged as
    reviewed are left out.  Oldest first."""
    got = Collected()
    base = f"{s.topic_prefix}/{box}"

    def on_message(m: mqtt.MQTTMessage) -> None:
        try:
            ev = json.loads(m.payload)
        except ValueError:
            return
        if not isinstance(ev, dict) or ev.get("source") != f"edge-agent/{box}":
            return
        with got.lock:
            if m.topic == f"{base}/results":
                item = _flagged_of(ev)
                if item is not None:
                    got.flagged[str(item["result_id"])] = item
            elif m.topic == f"{base}/telemetry":
                review = (ev.get("data") or {}).get("review") or {}
                got.acks.extend(a for a in review.get("acks", []) if isinstance(a, dict))

    known: dict[str, dict[str, Any]] = _read_cache(cache)
    c, ready, errors = _client(s, on_message, (f"{base}/results", f"{base}/telemetry"))
    try:
        if not ready.wait(15) or errors:
            raise TransportError(errors[0] if errors else "could not subscribe within 15 s")
        if on_ready is not None:
            on_ready()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with got.lock:
                if until is not None and len(known.keys() | got.flagged.keys()) >= until:
                    break
            time.sleep(0.2)
    finally:
        c.disconnect()
        c.loop_stop()
    with got.lock:
        known.update(got.flagged)
        done = {a.get("result_id") for a in got.acks
                if a.get("outcome") == "accepted" or a.get("code") == "already-reviewed"}
    for rid in done:
        known.pop(str(rid), None)
    if cache is not None:
        _write_cache(cache, known)
    return sorted(known.values(), key=lambda i: str(i.get("time")))


def _read_cache(cache: Path | None) -> dict[str, dict[str, Any]]:
    if cache is None or not cache.exists():
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _write_cache(cache: Path, items: dict[str, dict[str, Any]]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(items, fh)
    os.replace(tmp, cache)


def forget(cache: Path, result_id: str) -> None:
    """Drop a reviewed result from the list's cache."""
    items = _read_cache(cache)
    if items.pop(result_id, None) is not None:
        _write_cache(cache, items)


def submit(s: OpsSettings, reviewer: Reviewer, box: str, result_id: str, verdict: str, *,
           model: str | None = None, corrected_label: str | None = None,
           note: str | None = None, wait_ack: float = 30.0,
           cache: Path | None = None) -> dict[str, Any]:
    """Publish a verdict with the reviewer certificate; wait for the box's acknowledgement
    (``wait_ack`` 0: do not wait).  Raises EdgeAgentError when the broker refuses it."""
    ev = verdicts.build(reviewer=reviewer.name, box=box, result_id=result_id, verdict=verdict,
                        model=model, corrected_label=corrected_label, note=note)
    problems = verdicts.schema_problems(ev)
    if problems:
        raise EdgeAgentError(f"the verdict does not match its schema: {'; '.join(problems)}")
    acks: list[dict[str, Any]] = []
    base = f"{s.topic_prefix}/{box}"

    def on_telemetry(m: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(m.payload).get("data") or {}
        except (ValueError, AttributeError):
            return
        for a in (data.get("review") or {}).get("acks", []):
            if isinstance(a, dict) and a.get("verdict_id") == ev["id"]:
                acks.append(a)

    watcher = None
    if wait_ack > 0:
        watcher, ready, errors = _client(s, on_telemetry, (f"{base}/telemetry",))
        if not ready.wait(15) or errors:
            watcher.disconnect()
            watcher.loop_stop()
            raise TransportError(errors[0] if errors else "could not subscribe within 15 s")
    try:
        as_reviewer = OpsSettings(mqtt=s.with_identity(reviewer.cert, reviewer.key).mqtt)
        c, ready, errors = _client(as_reviewer)
        try:
            if not ready.wait(15) or errors:
                raise TransportError(errors[0] if errors else "no CONNACK within 15 s")
            pub_acks: dict[int, int] = c.user_data_get()
            mid = c.publish(f"{base}/review/{reviewer.name}", json.dumps(ev).encode(),
                            qos=1).mid
            deadline = time.monotonic() + 15
            while mid not in pub_acks and time.monotonic() < deadline:
                time.sleep(0.05)
            code = pub_acks.get(mid)
        finally:
            c.disconnect()
            c.loop_stop()
        if code is None:
            raise TransportError("the broker did not acknowledge the verdict within 15 s")
        if code == NOT_AUTHORIZED:
            raise EdgeAgentError(
                f"the broker refused the verdict (MQTT 5 reason 0x87, not authorized): "
                f"{reviewer.cert} (CN {reviewer.name}) is not a reviewer certificate for {box}",
                hint="use the certificate issued for the reviewer role (ops.toml [reviewer])")
        if code >= 0x80:
            raise EdgeAgentError(f"the broker refused the verdict (MQTT 5 reason {code:#04x})")
        out: dict[str, Any] = {"verdict_id": ev["id"], "result_id": result_id, "published": True,
                               "broker_reason": code}
        if watcher is not None:
            deadline = time.monotonic() + wait_ack
            while not acks and time.monotonic() < deadline:
                time.sleep(0.1)
            out["ack"] = acks[0] if acks else None
            done = acks and (acks[0].get("outcome") == "accepted"
                             or acks[0].get("code") == "already-reviewed")
            if done and cache is not None:
                forget(cache, result_id)
        return out
    finally:
        if watcher is not None:
            watcher.disconnect()
            watcher.loop_stop()
