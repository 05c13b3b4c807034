"""Helpers for the fleet tests: more boxes on the dev broker, fleet exporters and a
real Prometheus as subprocesses, and Prometheus' HTTP API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from agent.crypto import write_secret_file
from agent.identity.pki import issue, load_cert, load_key, write_pair
from agent.ops.devbox import device_acl
from tests.helpers.peers import EDGE_AGENT, REPO, Box, set_config
from tests.helpers.waiting import free_port, wait_for, wait_port

RULES = REPO / "fleet" / "prometheus" / "edge-agent.rules.yml"


def tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is missing: run 'tools/setup.sh test' (installs Debian's prometheus)"
    return exe


def add_box(box: Box, device: str) -> Box:
    """Another box of the dev fleet on the same broker: its own certificate
    (CN dev-site.<device>), one-prefix ACL entry, keys, state and DICOM port. Call before
    the broker starts (it reads the ACL then)."""
    root = box.root
    ca_key, ca = load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")
    k, c = issue(ca_key, ca, f"dev-site.{device}", client=True)
    write_pair(root / "pki", device, k, c)
    keys = root / f"keys-{device}"
    keys.mkdir(mode=0o700)
    for name in ("pseudonym", "kek", "audit_signing"):
        write_secret_file(keys / f"{name}.key", os.urandom(32).hex().encode())
    acl = root / "mosquitto.acl"
    acl.write_text(acl.read_text() + "\n" + device_acl("edge", "dev-site", device))
    conf = root / f"{device}.toml"
    shutil.copy(box.config, conf)
    port = free_port()
    for section, key, value in (("box", "device", f'"{device}"'),
                                ("box", "state_dir", f'"state-{device}"'),
                                ("dicom", "port", str(port)),
                                ("mqtt", "cert", f'"pki/{device}.pem"'),
                                ("mqtt", "key", f'"pki/{device}.key"'),
                                ("keys", "pseudonym", f'"keys-{device}/pseudonym.key"'),
                                ("keys", "kek", f'"keys-{device}/kek.key"'),
                                ("keys", "audit_signing", f'"keys-{device}/audit_signing.key"')):
        set_config(conf, section, key, value)
    info = json.loads(json.dumps(box.info))
    info["config"] = str(conf)
    info["dicom"]["port"] = port
    info["mqtt"]["device"] = device
    return Box(root, info)


def ops_config(box: Box, identity: str) -> Path:
    """ops.toml for another ops certificate (one connection per certificate)."""
    path = box.root / f"ops-{identity}.toml"
    text = (box.root / "ops.toml").read_text()
    text = re.sub(r'^cert = .*$', f'cert = "{box.pki / (identity + ".pem")}"', text, flags=re.M)
    text = re.sub(r'^key = .*$', f'key = "{box.pki / (identity + ".key")}"', text, flags=re.M)
    path.write_text(text)
    return path


class Exporter:
    """``edge-agent fleet exporter`` as a subprocess on a free port."""

    def __init__(self, config: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [*EDGE_AGENT, "fleet", "exporter", "--config", str(config),
             "--listen", f"127.0.0.1:{self.port}", *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_port(self.port, 30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(r.read().decode())

    def scrape_when(self, needle: str, timeout: float = 30) -> str:
        """The first scrape that contains ``needle``."""
        def ready() -> str | None:
            text = self.scrape()
            return text if needle in text else None
        return str(wait_for(ready, timeout, f"{needle!r} in the exporter's metrics"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Prometheus:
    """Debian's prometheus with a generated config scraping the exporters every second
    and evaluating the shipped rules every second."""

    def __init__(self, root: Path, targets: list[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = root / "prometheus.yml"
        conf.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: edge-agent-fleet\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_port(self.port, 60)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """{label value: sample value} of an instant query."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def publish_as(box: Box, cert: Path, key: Path, messages: list[tuple[str, bytes, bool]]) -> None:
    """Publish (topic, payload, retain) with a box's own certificate over MQTT 5, QoS 1,
    and wait for every PUBACK: a box that misbehaves, on the real broker."""
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(box.pki / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    c.tls_set_context(ctx)
    c.connect("localhost", box.mqtt_port)
    c.loop_start()
    try:
        for topic, payload, retain in messages:
            info = c.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(15)
            assert info.is_published(), topic
    finally:
        c.disconnect()
        c.loop_stop()
