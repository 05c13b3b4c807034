"""Helpers for the MQTT tests: bad certificates, extra brokers, an in-process
publisher on a real outbox, and a persistent-session ops collector."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import config as cfgmod
from agent.crypto import KeyEncryptionKey
from agent.identity.pki import PrivateKey, issue, load_cert, load_key, make_ca, write_pair
from agent.types import PhiFingerprint
from agent.uplink import cloudevents
from agent.uplink.inbound import Inbound
from agent.uplink.outbox import Outbox
from agent.uplink.publish import Publisher
from tests.helpers.peers import EDGE_AGENT, REPO, Box, Broker
from tests.helpers.waiting import free_port, wait_for


def dev_ca(box: Box) -> tuple[PrivateKey, Any]:
    return load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")


def write_cert(dir_: Path, stem: str, key: PrivateKey, cert: Any) -> tuple[Path, Path]:
    kp, cp = write_pair(dir_, stem, key, cert)
    return cp, kp


def expired_device(box: Box, out: Path, cn: str = "dev-site.dev-box") -> tuple[Path, Path]:
    now = datetime.now(UTC)
    k, c = issue(*dev_ca(box), cn, client=True, not_before=now - timedelta(days=30),
                 not_after=now - timedelta(days=2))
    return write_cert(out, "expired-device", k, c)


def other_ca_device(out: Path, cn: str = "dev-site.dev-box") -> tuple[Path, Path, Path]:
    """A device pair from an unrelated CA; returns (cert, key, that CA's cert)."""
    ck, cc = make_ca("some other CA")
    k, c = issue(ck, cc, cn, client=True)
    cert, key = write_cert(out, "other-device", k, c)
    ca_key, ca_cert = write_pair(out, "other-ca", ck, cc)
    return cert, key, ca_cert


def point_config_at(box: Box, **paths: Path | str) -> None:
    """Rewrite [mqtt] keys of the box's agent.toml (paths absolute)."""
    from tests.helpers.peers import set_config

    for k, v in paths.items():
        set_config(box, "mqtt", k, json.dumps(str(v)) if not isinstance(v, int) else str(v))


def alt_broker(box: Box, stem: str, *, dns: tuple[str, ...] = ("localhost",),
               ips: tuple[str, ...] = (), expired: bool = False) -> Broker:
    """A second mosquitto on its own port with a broker certificate we choose,
    same CA and ACL as the dev broker."""
    now = datetime.now(UTC)
    extra: dict[str, Any] = {}
    if expired:
        extra = {"not_before": now - timedelta(days=30), "not_after": now - timedelta(days=1)}
    k, c = issue(*dev_ca(box), "localhost", server=True, dns=dns, ips=ips, **extra)
    cert, key = write_cert(box.root / "alt", stem, k, c)
    port = free_port()
    conf_text = Path(box.info["mosquitto_conf"]).read_text()
    conf_text = re.sub(r"^listener \d+", f"listener {port}", conf_text, flags=re.M)
    conf_text = re.sub(r"^certfile .*$", f"certfile {cert}", conf_text, flags=re.M)
    conf_text = re.sub(r"^keyfile .*$", f"keyfile {key}", conf_text, flags=re.M)
    conf_text = re.sub(r"^persistence true", "persistence false", conf_text, flags=re.M)
    conf = box.root / "alt" / f"{stem}.conf"
    conf.write_text(conf_text)
    info = {**box.info, "mosquitto_conf": str(conf), "mqtt": {**box.info["mqtt"], "port": port}}
    return Broker(Box(box.root, info))


def mqtt_client(box: Box, cert: Path, key: Path, client_id: str) -> mqtt.Client:
    """A connected MQTT 5 client with the given certificate (CONNACK received); PUBACK
    reason codes by message id are kept in its user data for ``publish_acked``."""
    acks: dict[int, int] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                    userdata=acks)
    ctx = ssl.create_default_context(cafile=str(box.pki / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    c.tls_set_context(ctx)
    connack = threading.Event()
    codes: list[int] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        codes.append(int(rc.value))
        connack.set()

    def on_publish(_c: mqtt.Client, u: dict[int, int], mid: int, rc: Any, _p: Any = None) -> None:
        u[mid] = int(rc.value)

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect("localhost", box.mqtt_port, keepalive=30)
    c.loop_start()
    if not connack.wait(15) or codes != [0]:
        c.loop_stop()
        raise RuntimeError(f"{client_id} could not connect: {codes}")
    return c


def publish_acked(c: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> int:
    """QoS 1 publish; the broker's PUBACK reason code (0 and 0x10 = accepted, 0x87 = not
    authorized)."""
    acks: dict[int, int] = c.user_data_get()
    mid = c.publish(topic, payload, qos=1, retain=retain).mid
    return int(wait_for(lambda: acks.get(mid, -1) + 1, 15, f"the PUBACK for {topic}")) - 1


def daemon_mqtt(box: Box) -> dict[str, Any]:
    """The running daemon's broker link, as ``edge-agent status --json`` reports it."""
    out = subprocess.run([*EDGE_AGENT, "status", "--config", str(box.config), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["mqtt"])


@dataclass
class Harness:
    """A real Publisher on a real encrypted outbox, in this process."""

    box: Box
    cfg: cfgmod.Config
    outbox: Outbox
    publisher: Publisher
    alerts: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def enqueue(self, n: int, *, start: int = 0, channel: str = "results",
                guard: PhiFingerprint = PhiFingerprint(),
                data: dict[str, Any] | None = None) -> list[str]:
        ids = []
        for i in range(start, start + n):
            ev = cloudevents.envelope(kind="result", source="edge-agent/dev-site/dev-box",
                                      data=data or {"n": i, "status": "ok"},
                                      event_id=cloudevents.stable_id("test", str(i)))
            self.outbox.enqueue(channel, ev["id"], cloudevents.encode(ev), guard)  # type: ignore[arg-type]
            ids.append(ev["id"])
        return ids


@contextmanager
def harness(box: Box, *, start: bool = True, inbound: Inbound | None = None) -> Iterator[Harness]:
    cfg = cfgmod.load(box.config)
    outbox = Outbox(box.root / "harness-outbox.db", KeyEncryptionKey.from_file(cfg.keys.kek),
                    10**8)
    alerts: list[tuple[str, dict[str, object]]] = []

    def status(online: bool) -> dict[str, Any]:
        # The source a box uses: the egress guard validates it by format.
        return cloudevents.envelope(kind="status", source=f"edge-agent/{cfg.site}/{cfg.device}",
                                    data={
                                        "state": "online" if online else "offline",
                                        "since": datetime.now(UTC).isoformat().replace(
                                            "+00:00", "Z"),
                                        "agent_version": "test", "site": cfg.site,
                                        "device": cfg.device, "models": []})

    pub = Publisher(cfg, outbox, birth=lambda: status(True), offline=lambda: status(False),
                    on_alert=lambda e, d: alerts.append((e, d)), inbound=inbound)
    h = Harness(box, cfg, outbox, pub, alerts)
    if start:
        pub.start()
    try:
        yield h
    finally:
        pub.stop(drain_timeout=1.0)
        outbox.close()


class Collector:
    """Central ops with a persistent session (clean start off, session expiry),
    so nothing published while it was cut off from a restarted broker is lost."""

    def __init__(self, box: Box, topic: str = "edge/#", client_id: str | None = None,
                 identity: str = "ops") -> None:
        self.box = box
        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"collector-{free_port()}",
                                  protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(box.pki / "ca.pem"))
        ctx.load_cert_chain(str(box.pki / f"{identity}.pem"), str(box.pki / f"{identity}.key"))
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        c.subscribe(self.topic, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

    def start(self) -> Collector:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("localhost", self.box.mqtt_port, keepalive=5, clean_start=False,
                            properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(15):
            raise TimeoutError("collector could not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _r in self.messages if t.endswith(suffix) and p]

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _p, _r in self.messages]
