"""Real peers for the tests: a mutual-TLS mosquitto, the daemon as a subprocess,
an ops subscriber.  Nothing here imitates a peer; misbehaving peers are scripted
separately where a test needs one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers.waiting import free_port, wait_for, wait_port

REPO = Path(__file__).resolve().parents[2]
EDGE_AGENT = [sys.executable, "-m", "provisioning.cli"]

# Programs the tests talk to, and the Debian package of each ('tools/setup.sh test'
# installs them all).  A test that needs one says so with @pytest.mark.peer("name") or
# require_peer("name"): skipped on a developer machine without it, a failure under CI
# (CI=true), where a silently skipped interop test would be a green build that tested
# nothing.
PEERS: dict[str, str] = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "mosquitto": "mosquitto",
    "Orthanc": "orthanc",
    "dciodvfy": "dicom3tools",
    "gdcmanon": "libgdcm-tools",
    "openssl": "openssl",
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "systemd-tmpfiles": "systemd",
    "useradd": "passwd",
    "groupadd": "passwd",
}
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not on a normal user's PATH


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, fix: str) -> NoReturn:
    """Skip locally; fail under CI, where everything a test needs must be there."""
    if in_ci():
        pytest.fail(f"{what} is missing, and CI must run every test: {fix}", pytrace=False)
    pytest.skip(f"{what} is missing ({fix}); under CI=true this is a failure")


def find_peer(name: str) -> str | None:
    if name not in PEERS:
        raise KeyError(f"unknown test peer {name!r}: add it to tests/helpers/peers.py PEERS")
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        p = Path(folder) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def require_peer(name: str) -> str:
    """The path of a peer program, or skip (locally) / fail (CI) saying what to install."""
    path = find_peer(name)
    if path is None:
        missing(f"test peer {name}",
                f"apt-get install {PEERS[name]}, or run tools/setup.sh test")
    return path


@dataclass
class Box:
    root: Path
    info: dict[str, Any]

    @property
    def config(self) -> Path:
        return Path(self.info["config"])

    @property
    def dicom_port(self) -> int:
        return int(self.info["dicom"]["port"])

    @property
    def mqtt_port(self) -> int:
        return int(self.info["mqtt"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.info["dicom"]["ae_title"])

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def state(self) -> Path:
        return self.root / "state"


def provision(root: Path, *extra: str) -> Box:
    out = subprocess.run(
        [*EDGE_AGENT, "provision", "dev", "--state-dir", str(root), "--dicom-port",
         str(free_port()), "--mqtt-port", str(free_port()), "--json", *extra],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    return Box(root, json.loads(out.stdout))


def set_config(box: Box | Path, section: str, key: str, value: str) -> None:
    """Change one key of a box's agent.toml (value is TOML source text)."""
    conf = box.config if isinstance(box, Box) else box
    lines = conf.read_text().splitlines()
    out, cur, done = [], None, False
    for line in lines:
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            if cur == section and not done:
                out.append(f"{key} = {value}")
                done = True
            cur = s.strip("[]")
        elif s.startswith("[["):
            if cur == section and not done:
                out.append(f"{key} = {value}")
                done = True
            cur = s.strip("[]")
        if cur == section and s.split("=")[0].strip() == key:
            out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if not done:
        if cur != section:
            out.append(f"[{section}]")
        out.append(f"{key} = {value}")
    conf.write_text("\n".join(out) + "\n")


class Broker:
    def __init__(self, box: Box) -> None:
        self.box = box
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = box.root / "broker" / "mosquitto.log"

    def start(self) -> None:
        exe = require_peer("mosquitto")
        self.proc = subprocess.Popen([exe, "-c", self.box.info["mosquitto_conf"]],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_port(self.box.mqtt_port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class Daemon:
    def __init__(self, box: Box, *args: str) -> None:
        self.box = box
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = box.root / "daemon.log"

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*EDGE_AGENT, "run", "--config", str(self.box.config), *self.args],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
        )
        if wait and "--burst" not in self.args:
            try:
                wait_port(self.box.dicom_port, timeout=60)
            except TimeoutError:
                raise RuntimeError(f"daemon did not start:\n{self.log_text()[-3000:]}") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.payload))


@dataclass
class Subscriber:
    """Central ops: an mTLS MQTT 5 client with the ops certificate."""

    box: Box
    topic: str = "edge/#"
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ops-{free_port()}",
                                  protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(self.box.pki / "ca.pem"))
        ctx.load_cert_chain(str(self.box.pki / "ops.pem"), str(self.box.pki / "ops.key"))
        self.client.tls_set_context(ctx)
        self.ready = threading.Event()

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            c.subscribe(self.topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.ready.set()

        def on_message(_c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append(Received(m.topic, bytes(m.payload), bool(m.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message

    def start(self) -> Subscriber:
        self.client.connect("localhost", self.box.mqtt_port)
        self.client.loop_start()
        if not self.ready.wait(15):
            raise TimeoutError("ops subscriber could not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, channel: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith("/" + channel)]

    def wait(self, channel: str, n: int = 1, timeout: float = 60) -> list[Received]:
        return list(wait_for(lambda: self.on(channel) if len(self.on(channel)) >= n else None,
                             timeout, f"{n} message(s) on {channel}"))


def storescu(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "EDGE_AGENT",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([require_peer("storescu"), "-aet", aet, "-aec", aec, *extra,
                           "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=env, timeout=300)


def audit_events(box: Box, n: int = 500) -> list[dict[str, Any]]:
    """The newest audit records of a box, through the CLI a privacy officer uses."""
    out = subprocess.run([*EDGE_AGENT, "audit", "tail", "--config", str(box.config), "-n", str(n),
                          "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
