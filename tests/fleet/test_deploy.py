"""Fleet deployments end to end: real mosquitto (mutual TLS, the dev ACL with the
deployer identity), real daemons as subprocesses, real onnxruntime, packages and
documents signed at test time with throwaway publisher and approver keys.

- three boxes, canary then two waves: the rollout completes; the box that was
  offline during its wave catches up when it returns; ``fleet deployments`` and
  ``fleet watch`` show it; unapproved, replayed and mis-targeted documents are
  refused, audited and reported; ``fleet rollback`` undoes the deployment;
- a canary whose model fails at run time breaches its gate, rolls back by itself,
  and the rollout stops before the next wave;
- kill -9 of a box mid-download resumes from the last good chunk; a corrupted chunk
  is refused and nothing is activated before the whole package verifies.

The helpers first: throwaway keys, small real ONNX packages signed at test time (one
that fails at run time on a study of two images), boxes configured to pin the test
keys, and a scripted central side for the test that needs a misbehaving one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import paho.mqtt.client as mqtt
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from agent.config import load as load_config
from agent.deploy.document import iso, sign
from agent.infer.signing import file_sha256, sign_manifest
from fleet.deploy import package_ref
from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Broker,
    Daemon,
    Subscriber,
    audit_events,
    set_config,
    storescu,
    wait_for,
)
from tests.helpers.fleet import add_box, ops_config

MODEL = "deploy-test"
ROLES = ("publisher", "clinical")


@dataclass
class Keys:
    root: Path
    publisher: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    approvers: dict[str, Ed25519PrivateKey] = field(default_factory=lambda: {
        r: Ed25519PrivateKey.generate() for r in ROLES})

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_pair(self.root / "package-publisher", self.publisher)
        for role, key in self.approvers.items():
            _write_pair(self.root / f"approver-{role}", key)

    @property
    def publisher_pub(self) -> Path:
        return self.root / "package-publisher.pub"

    def approver_key(self, role: str) -> Path:
        return self.root / f"approver-{role}.key"

    def approver_pub(self, role: str) -> Path:
        return self.root / f"approver-{role}.pub"

    def signed(self, doc: dict[str, Any], roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
        return {"document": doc, "signatures": [sign(doc, r, self.approvers[r]) for r in roles]}


def _write_pair(stem: Path, key: Ed25519PrivateKey) -> None:
    stem.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    stem.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _graph(broken: bool) -> onnx.ModelProto:
    """Two logits from the image's mean.  ``broken`` reshapes its input to a fixed batch
    of one: it loads and warms up (one blank image) and fails on any study of two
    images (onnxruntime: the Reshape cannot fit two images into [1, 1024])."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    nodes = []
    inits = []
    src = "image"
    if broken:
        inits.append(numpy_helper.from_array(np.array([1, 1, 32, 32], dtype=np.int64), "fixed"))
        nodes.append(helper.make_node("Reshape", ["image", "fixed"], ["one"]))
        src = "one"
    nodes += [helper.make_node("ReduceMean", [src], ["m"], axes=[2, 3], keepdims=0),
              helper.make_node("Neg", ["m"], ["n"]),
              helper.make_node("Concat", ["n", "m"], ["logits"], axis=1)]
    g = helper.make_graph(nodes, "deploy-test", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


MANIFEST = """\
schema = 1
name = "{name}"
version = "{version}"
description = "Deployment test model"
intended_use = "Tests only."
publisher = "test publisher"

[model]
file = "model.onnx"
sha256 = "{sha}"
input = "image"
output = "logits"

[applies_to]
modalities = ["CT"]
body_parts = []
sop_classes = []
min_images = 1
max_images = 8

[inputs]
attributes = ["Modality", "RescaleSlope", "RescaleIntercept"]

[preprocessing]
rescale = true
voi = "window"
percentile = [1.0, 99.0]
invert_monochrome1 = true
resize = [32, 32]
mean = 0.5
std = 0.25
channels = 1

[preprocessing.windows]
CT = [40.0, 400.0]

[decision]
labels = ["no_lesion", "lesion"]
activation = "softmax"
positive_label = "lesion"
positive_finding = "test finding"
negative_finding = "no test finding"
threshold = 0.5
review_band = [0.45, 0.55]
max_uncertainty = 1.0
review_if_positive = false
aggregation = "max"

[uncertainty]
method = "entropy"

[explanation]
method = "none"

[drift]
input_edges = [0, 0.5, 1]
input_reference = [0.5, 0.5]
output_edges = [0, 0.5, 1]
output_reference = [0.5, 0.5]
subgroup_attributes = ["Modality"]
"""


def make_package(models: Path, keys: Keys, version: str, *, broken: bool = False) -> Path:
    folder = models / MODEL / version
    folder.mkdir(parents=True)
    onnx.save(_graph(broken), str(folder / "model.onnx"))
    manifest = MANIFEST.format(name=MODEL, version=version,
                               sha=file_sha256(folder / "model.onnx")).encode()
    (folder / "manifest.toml").write_bytes(manifest)
    (folder / "manifest.toml.sig").write_bytes(sign_manifest(manifest, keys.publisher))
    (folder / "MODEL_CARD.md").write_text(f"# {MODEL} {version}\n\nTests only.\n")
    return folder


def configure_box(b: Box, keys: Keys, catalog: Path, *, labels: tuple[str, ...] = ()) -> Path:
    """The box runs deploy-test 1.0.0 from its own models folder, pins the test publisher
    and approvers, and keeps little disk in reserve; returns its models folder."""
    device = b.info["mqtt"]["device"]
    models = b.root / f"models-{device}"
    shutil.copytree(catalog / MODEL / "1.0.0", models / MODEL / "1.0.0")
    set_config(b.config, "models", "dir", f'"{models}"')
    set_config(b.config, "models", "publisher_keys", f'["{keys.publisher_pub}"]')
    keys_toml = ", ".join(f'{r} = ["{keys.approver_pub(r)}"]' for r in ROLES)
    set_config(b.config, "deploy", "approver_keys", "{ " + keys_toml + " }")
    set_config(b.config, "deploy", "required_roles", '["publisher", "clinical"]')
    set_config(b.config, "deploy", "disk_reserve_bytes", "1048576")
    set_config(b.config, "deploy", "request_timeout_seconds", "2")
    set_config(b.config, "deploy", "labels", json.dumps(list(labels)))
    set_config(b.config, "telemetry", "interval_seconds", "2")
    return models


def two_image_study(folder: Path) -> list[Path]:
    """Two CT instances of one study: the broken model's batch of two."""
    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = generate_uid()
    series = generate_uid()
    out = []
    for n in range(2):
        ds = src.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n + 1
        p = folder / f"ct{n}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def document(ident: str, revision: int, boxes: list[str], *, site: str = "dev-site",
             version: str = "2.0.0", canary: list[str] | None = None,
             waves: list[list[str]] | None = None, soak: float = 3,
             hours: float = 2, chunk_size: int | None = None,
             config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deployment spec (packages by name and version; ``fleet sign`` resolves them)."""
    pkg: dict[str, Any] = {"name": MODEL, "version": version}
    if chunk_size:
        pkg["chunk_size"] = chunk_size
    now = time.time()
    doc: dict[str, Any] = {
            "id": ident, "revision": revision, "issued": iso(now),
            "expires": iso(now + hours * 3600),
            "target": {"site": site, "boxes": boxes}, "packages": [pkg],
            "rollout": {"canary": canary if canary is not None else boxes[:1],
                        "waves": waves if waves is not None else [boxes[1:]] if boxes[1:] else [],
                        "soak_seconds": soak, "wave_timeout_seconds": 600},
            "gates": {"max_inference_errors": 0}}
    if config:
        doc["config"] = config
    return doc


class Central:
    """A scripted central side with the deployer certificate: publishes what the test
    says (documents, chunks, corrupt ones too) and records every job state."""

    def __init__(self, box: Box) -> None:
        self.jobs: list[tuple[str, dict[str, Any]]] = []
        self.ids: set[str] = set()
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="deployer",
                             protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(box.pki / "ca.pem"))
        ctx.load_cert_chain(str(box.pki / "deployer.pem"), str(box.pki / "deployer.key"))
        self.c.tls_set_context(ctx)

        def on_connect(c: mqtt.Client, *_a: Any) -> None:
            c.subscribe("edge/+/+/jobs", qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.ready.set()

        def on_message(_c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
            device = m.topic.split("/")[2]
            ev = json.loads(m.payload)
            with self.lock:
                if ev["id"] in self.ids:  # an outbox replay after a restart: seen already
                    return
                self.ids.add(ev["id"])
                self.jobs.append((device, ev["data"]))

        self.c.on_connect = on_connect
        self.c.on_subscribe = on_subscribe
        self.c.on_message = on_message
        self.c.connect("localhost", box.mqtt_port)
        self.c.loop_start()
        assert self.ready.wait(15), "the deployer could not subscribe"

    def states(self, device: str, revision: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [d for dev, d in self.jobs if dev == device
                    and (revision is None or d.get("revision") == revision)]

    def wait_state(self, device: str, state: str, revision: int | None = None,
                   timeout: float = 120, after: int = 0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for d in self.states(device, revision)[after:]:
                if d.get("state") == state:
                    return d
            return None
        return dict(wait_for(found, timeout, f"{device} job state {state}"))

    def publish(self, topic: str, kind: str, data: dict[str, Any], *, retain: bool = False) -> None:
        ev = {"specversion": "1.0", "id": str(time.time_ns()), "source": "test/central",
              "type": f"org.edge-agent.{kind}.v1", "datacontenttype": "application/json",
              "data": data}
        info = self.c.publish(topic, json.dumps(ev).encode(), qos=1, retain=retain)
        info.wait_for_publish(15)
        assert info.is_published()

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


pytestmark = pytest.mark.peer("mosquitto")


@pytest.fixture
def fleet(box: Box, tmp_path: Path) -> Iterator[tuple[list[Box], Keys, Path, Broker]]:
    keys = Keys(tmp_path / "keys")
    catalog = tmp_path / "catalog"
    make_package(catalog, keys, "1.0.0")
    make_package(catalog, keys, "2.0.0")
    make_package(catalog, keys, "2.0.1", broken=True)
    boxes = [box, add_box(box, "box-2"), add_box(box, "box-3")]  # before the broker starts
    for b, labels in zip(boxes, (("ring=canary",), ("ring=main",), ("ring=main",)), strict=True):
        configure_box(b, keys, catalog, labels=labels)
    broker = Broker(box)
    broker.start()
    yield boxes, keys, catalog, broker
    broker.stop()


def device(b: Box) -> str:
    return str(b.info["mqtt"]["device"])


def write_spec(path: Path, spec: dict[str, object]) -> Path:
    path.write_text(json.dumps(spec))
    return path


def sign_independently(spec: Path, keys: Keys, catalog: Path) -> Path:
    """Each approver signs on their own, with their own key (two runs of the CLI)."""
    for role in ("publisher", "clinical"):
        out = cli("fleet", "sign", str(spec), "--role", role, "--key",
                  str(keys.approver_key(role)), "--models", str(catalog),
                  "--signer", f"{role}-approver")
        assert out.returncode == 0, out.stderr
    return spec


def statuses(ops: Subscriber, dev: str) -> list[dict[str, object]]:
    return [m.json()["data"] for m in ops.on("status")
            if m.topic.split("/")[2] == dev and m.json()["data"].get("state") == "online"]


def active_version(ops: Subscriber, dev: str) -> str | None:
    s = statuses(ops, dev)
    if not s:
        return None
    models = s[-1].get("models")
    assert isinstance(models, list)
    return next((str(m["version"]) for m in models if m["name"] == MODEL), None)


def job_states(ops: Subscriber, dev: str, revision: int) -> list[str]:
    return [str(m.json()["data"]["state"]) for m in ops.on("jobs")
            if m.topic.split("/")[2] == dev and m.json()["data"].get("revision") == revision]


def deploy_proc(box: Box, signed: Path, catalog: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EDGE_AGENT, "fleet", "deploy", str(signed), "--config", str(box.root / "deploy.toml"),
         "--models", str(catalog), "--final-wait", "300"],
        cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_two_wave_rollout_offline_box_refusals_and_rollback(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary, wave1, wave2 = boxes
    ops = Subscriber(canary).start()
    daemons = [Daemon(b) for b in boxes]
    rollout: subprocess.Popen[str] | None = None
    try:
        for d in daemons:
            d.start()
        for b in boxes:
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 60,
                     f"{device(b)} online with {MODEL} 1.0.0")
        daemons[2].stop()  # box-3 goes offline before the rollout starts
        wait_for(lambda: any(m.json()["data"]["state"] == "offline" for m in ops.on("status")
                             if m.topic.split("/")[2] == "box-3"), 30, "box-3 offline")

        spec = write_spec(tmp_path / "release.json", document(
            "rel-2", 5, ["dev-box", "box-2", "box-3"], canary=["dev-box"],
            waves=[["box-2"], ["box-3"]], soak=3, chunk_size=4096,
            config={"study.quiet_seconds": 2.0, "logging.level": "INFO"}))
        sign_independently(spec, keys, catalog)
        log = tmp_path / "rollout.log"
        rollout = deploy_proc(canary, spec, catalog, log)

        # The canary soaks and succeeds before wave 1 receives anything.
        wait_for(lambda: "succeeded" in job_states(ops, "dev-box", 5), 180, "canary succeeded")
        wait_for(lambda: "succeeded" in job_states(ops, "box-2", 5), 180, "wave 1 succeeded")
        jobs = [(m.topic.split("/")[2], m.json()["data"]["state"]) for m in ops.on("jobs")]
        assert jobs.index(("dev-box", "succeeded")) < jobs.index(("box-2", "received"))
        assert job_states(ops, "box-3", 5) == []  # offline: nothing from it yet
        wait_for(lambda: "wave 2: publishing" in log.read_text(), 60, "wave 2 published")

        daemons[2].start()  # back: the retained document is waiting for it
        assert rollout.wait(240) == 0, log.read_text()
        rollout = None
        text = log.read_text()
        assert "completed" in text, text
        for b in boxes:
            states = job_states(ops, device(b), 5)
            for s in ("received", "downloading", "verified", "active", "soaking", "succeeded"):
                assert s in states, (device(b), states)
            assert states.index("verified") < states.index("active")
            wait_for(lambda b=b: active_version(ops, device(b)) == "2.0.0", 60,
                     f"{device(b)} status showing 2.0.0")
            dep = statuses(ops, device(b))[-1]["deployment"]
            assert dep == {"id": "rel-2", "revision": 5, "state": "succeeded"}, dep

        # Every job state and status on the wire matches its published schema.
        for channel, name in (("jobs", "job"), ("status", "status")):
            schema = json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())
            for m in ops.on(channel):
                jsonschema.validate(m.json(), schema)
        # The approved configuration change: an overlay the config loader applies.
        assert load_config(canary.config).study.quiet_seconds == 2.0

        # Central ops' views: progress per wave and box, and the fleet table's column.
        observer = ops_config(canary, "ops-sub")  # 'ops' is the subscriber's connection
        out = cli("fleet", "deployments", "--config", str(observer),
                  "--id", "rel-2", "--json", "--wait", "2")
        assert out.returncode == 0, out.stderr
        rows = {r["box"]: (r["wave"], r["state"]) for r in json.loads(out.stdout)}
        assert rows == {"dev-site/dev-box": ("canary", "succeeded"),
                        "dev-site/box-2": ("wave 1", "succeeded"),
                        "dev-site/box-3": ("wave 2", "succeeded")}, rows
        out = cli("fleet", "watch", "--config", str(observer), "--once", "--wait", "2")
        assert out.returncode == 0, out.stderr
        assert "DEPLOYMENT" in out.stdout and "rel-2@5 succeeded" in out.stdout, out.stdout

        # Who approved, what changed, the outcome: in the canary's audit trail.
        events = audit_events(canary)
        received = [e for e in events if e["event"] == "deploy.received"]
        assert received and {a["role"] for a in received[-1]["details"]["approvals"]} == {
            "publisher", "clinical"}
        assert any(e["event"] == "deploy.succeeded" for e in events)

        # Refused documents, each audited with its reason and reported on jobs.
        central = Central(canary)
        try:
            topic = "edge/dev-site/dev-box/deployments"

            def signed(rev: int, roles: tuple[str, ...] = ("publisher", "clinical"),
                       targets: tuple[str, ...] = ("dev-box",), hours: float = 2,
                       config: dict[str, object] | None = None) -> dict[str, object]:
                spec = write_spec(tmp_path / f"doc-{rev}.json", document(
                    f"probe-{rev}", rev, list(targets), version="2.0.0", chunk_size=4096,
                    hours=hours, config=config))
                out = cli("fleet", "sign", str(spec), "--role", roles[0], "--key",
                          str(keys.approver_key(roles[0])), "--models", str(catalog))
                assert out.returncode == 0, out.stderr
                for role in roles[1:]:
                    assert cli("fleet", "sign", str(spec), "--role", role, "--key",
                               str(keys.approver_key(role))).returncode == 0
                return dict(json.loads(spec.read_text()))

            cases = [(signed(10, roles=("publisher",)), "unapproved"),
                     (signed(4), "replayed"),
                     (signed(11, targets=("box-2",)), "mistargeted"),
                     (signed(12, hours=-1), "expired"),
                     (signed(13, config={"mqtt.host": "elsewhere.example"}), "config_refused"),
                     (signed(14, config={"dicom.peers": []}), "config_refused")]
            for n, (doc, reason) in enumerate(cases):
                central.publish(topic, "deployment", doc, retain=True)
                rev = doc["document"]["revision"]  # type: ignore[index]
                got = central.wait_state("dev-box", "refused", rev, timeout=60)
                assert got["reason"] == reason, (n, got)
            refused = [e for e in audit_events(canary) if e["event"] == "deploy.refused"]
            assert [e["details"]["reason"] for e in refused][-6:] == [
                "unapproved", "replayed", "mistargeted", "expired", "config_refused",
                "config_refused"]
            assert active_version(ops, "dev-box") == "2.0.0"
        finally:
            central.stop()

        # Rollback of the release on every box that reports it.
        out = cli("fleet", "rollback", "rel-2", "--config", str(canary.root / "deploy.toml"),
                  "--observer", str(observer),
                  *[a for r in ("publisher", "clinical")
                    for a in ("--sign", f"{r}={keys.approver_key(r)}")])
        assert out.returncode == 0, out.stdout + out.stderr
        for b in boxes:
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 120,
                     f"{device(b)} back on 1.0.0")
        assert load_config(canary.config).study.quiet_seconds == 3.0  # the config too
    finally:
        if rollout is not None and rollout.poll() is None:
            rollout.kill()
        ops.stop()
        for d in daemons:
            if d.proc is not None:
                d.stop()


def test_canary_gate_breach_rolls_back_and_stops_the_rollout(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary, wave1, _ = boxes
    ops = Subscriber(canary).start()
    daemons = [Daemon(canary), Daemon(wave1)]
    rollout: subprocess.Popen[str] | None = None
    try:
        for d in daemons:
            d.start()
        for b in (canary, wave1):
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 60,
                     f"{device(b)} online")
        spec = write_spec(tmp_path / "bad.json", document(
            "rel-bad", 7, ["dev-box", "box-2"], version="2.0.1", canary=["dev-box"],
            waves=[["box-2"]], soak=900))  # only a breached gate can end this soak
        sign_independently(spec, keys, catalog)
        log = tmp_path / "rollout.log"
        rollout = deploy_proc(canary, spec, catalog, log)
        wait_for(lambda: "soaking" in job_states(ops, "dev-box", 7), 120, "canary soaking")
        assert active_version(ops, "dev-box") in ("2.0.1", "1.0.0")
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.1", 60, "2.0.1 active")

        sent = storescu(canary.dicom_port, two_image_study(tmp_path / "study"))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: "rolled_back" in job_states(ops, "dev-box", 7), 180,
                 "the canary rolled back")
        last = [m.json()["data"] for m in ops.on("jobs")
                if m.topic.split("/")[2] == "dev-box" and m.json()["data"]["state"] == "rolled_back"]
        assert last[-1]["reason"] == "gate_breached", last[-1]
        assert last[-1]["gate"]["name"] == "inference_errors", last[-1]
        assert rollout.wait(60) == 1, log.read_text()
        rollout = None
        assert "canary failed" in log.read_text()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "canary back on 1.0.0")
        assert job_states(ops, "box-2", 7) == []  # the wave never started
        assert active_version(ops, "box-2") == "1.0.0"
        events = audit_events(canary)
        assert any(e["event"] == "deploy.rolled_back"
                   and e["details"]["reason"] == "gate_breached" for e in events)
        assert any(e["event"] == "model.failed" for e in events)
    finally:
        if rollout is not None and rollout.poll() is None:
            rollout.kill()
        ops.stop()
        for d in daemons:
            if d.proc is not None:
                d.stop()


def test_kill9_mid_download_resumes_and_a_corrupt_chunk_is_refused(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary = boxes[0]
    ops = Subscriber(canary).start()
    daemon = Daemon(canary)
    central: Central | None = None
    try:
        daemon.start()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "online")
        spec = write_spec(tmp_path / "rel.json", document(
            "rel-resume", 9, ["dev-box"], version="2.0.0", soak=1, chunk_size=1024))
        sign_independently(spec, keys, catalog)
        signed = json.loads(spec.read_text())
        ref, data = package_ref(catalog / MODEL / "2.0.0", 1024)
        assert ref["sha256"] == signed["document"]["packages"][0]["sha256"]
        n = len(ref["chunks"])
        assert n > 6, n  # more than the five sent before the kill

        def chunk(i: int, body: bytes | None = None) -> dict[str, object]:
            import base64
            raw = body if body is not None else data[i * 1024:(i + 1) * 1024]
            return {"deployment": "rel-resume", "revision": 9, "package": ref["sha256"],
                    "index": i, "data": base64.b64encode(raw).decode()}

        central = Central(canary)
        topic = "edge/dev-site/dev-box/deployments"
        central.publish(topic, "deployment", signed, retain=True)
        first = central.wait_state("dev-box", "downloading", 9)
        assert first["request"]["next"] == 0
        for i in range(5):  # part of the package, then the box dies
            central.publish(topic, "deployment.chunk", chunk(i))
        # The box asks again after its request timeout: from chunk 5, all five on disk.
        wait_for(lambda: any(d.get("request", {}).get("next") == 5
                             for d in central.states("dev-box", 9)), 60, "request from 5")
        daemon.kill9()
        seen = len(central.states("dev-box", 9))
        daemon.start()
        wait_for(lambda: any(d.get("request") for d in central.states("dev-box", 9)[seen:]),
                 120, "a request after the restart")
        # From here on only chunks 5.. are ever sent: the box can finish only if the five
        # it had fsynced before kill -9 survived (and it never asks for chunk 0 again).
        # A corrupted chunk 5: refused, reported, nothing activated.
        bad = bytearray(data[5 * 1024:6 * 1024])
        bad[0] ^= 0xFF
        mark = len(central.states("dev-box", 9))
        central.publish(topic, "deployment.chunk", chunk(5, bytes(bad)))
        refused = central.wait_state("dev-box", "downloading", 9, after=mark, timeout=60)
        wait_for(lambda: any(d.get("chunk_refused") for d in central.states("dev-box", 9)[mark:]),
                 60, "the chunk refusal")
        assert refused is not None
        states = [d["state"] for d in central.states("dev-box", 9)]
        assert "verified" not in states and "active" not in states
        assert active_version(ops, "dev-box") == "1.0.0"
        assert any(e["event"] == "deploy.chunk_refused" for e in audit_events(canary))

        for i in range(5, n):
            central.publish(topic, "deployment.chunk", chunk(i))
        central.wait_state("dev-box", "succeeded", 9, timeout=120)
        after = [d["request"]["next"] for d in central.states("dev-box", 9)[seen:]
                 if d.get("request")]
        assert after and min(after) >= 5, after
        states = [d["state"] for d in central.states("dev-box", 9)]
        assert states.index("verified") > next(
            k for k, d in enumerate(central.states("dev-box", 9)) if d.get("chunk_refused"))
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.0", 60, "2.0.0 active")

        # A package whose every chunk and archive hash match the signed document, but
        # whose model was signed by a publisher the box does not pin: refused after the
        # download, never activated (this is a development box, which would run an
        # unverified package installed by hand).
        stranger = Keys(tmp_path / "stranger")
        make_package(catalog, stranger, "3.0.0")
        spec = write_spec(tmp_path / "rel3.json", document(
            "rel-unpinned", 10, ["dev-box"], version="3.0.0", soak=1, chunk_size=4096))
        sign_independently(spec, keys, catalog)
        signed = json.loads(spec.read_text())
        ref, data = package_ref(catalog / MODEL / "3.0.0", 4096)
        central.publish(topic, "deployment", signed, retain=True)
        central.wait_state("dev-box", "downloading", 10)
        for i in range(len(ref["chunks"])):
            c = chunk(i, data[i * 4096:(i + 1) * 4096])
            c.update(deployment="rel-unpinned", revision=10, package=ref["sha256"])
            central.publish(topic, "deployment.chunk", c)
        got = central.wait_state("dev-box", "refused", 10, timeout=120)
        assert got["reason"] == "package_refused" and "unpinned_key" in got["detail"], got
        assert "active" not in [d["state"] for d in central.states("dev-box", 10)]
        assert active_version(ops, "dev-box") == "2.0.0"
    finally:
        if central is not None:
            central.stop()
        ops.stop()
        if daemon.proc is not None:
            daemon.stop(signal.SIGTERM)


def test_a_rollback_document_during_the_soak_restores_the_previous_version(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary = boxes[0]
    ops = Subscriber(canary).start()
    daemon = Daemon(canary)
    central: Central | None = None
    try:
        daemon.start()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "online")
        spec = write_spec(tmp_path / "rel.json", document(
            "rel-soak", 20, ["dev-box"], version="2.0.0", soak=900, chunk_size=65536))
        sign_independently(spec, keys, catalog)
        signed = json.loads(spec.read_text())
        ref, data = package_ref(catalog / MODEL / "2.0.0", 65536)
        central = Central(canary)
        topic = "edge/dev-site/dev-box/deployments"
        central.publish(topic, "deployment", signed, retain=True)
        central.wait_state("dev-box", "downloading", 20)
        import base64
        for i in range(len(ref["chunks"])):
            central.publish(topic, "deployment.chunk", {
                "deployment": "rel-soak", "revision": 20, "package": ref["sha256"], "index": i,
                "data": base64.b64encode(data[i * 65536:(i + 1) * 65536]).decode()})
        central.wait_state("dev-box", "soaking", 20)
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.0", 60, "2.0.0 soaking")

        # Central ops pull it back before the soak ends: a signed rollback document.
        from fleet.deploy import rollback_document
        central.publish(topic, "deployment",
                        keys.signed(rollback_document("rel-soak", "dev-site", ["dev-box"], 21)),
                        retain=True)
        got = central.wait_state("dev-box", "rolled_back", 21)
        assert got["reason"] == "rollback_requested", got
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "back on 1.0.0")
        wait_for(lambda: statuses(ops, "dev-box")[-1]["deployment"] == {
            "id": "rel-soak", "revision": 21, "state": "rolled_back"}, 30, "status")
        assert "succeeded" not in [d["state"] for d in central.states("dev-box", 20)]
        events = audit_events(canary)
        assert any(e["event"] == "deploy.superseded" for e in events)
        done = [e for e in events if e["event"] == "deploy.rolled_back"]
        assert done and done[-1]["details"]["undone_revision"] == 20
    finally:
        if central is not None:
            central.stop()
        ops.stop()
        if daemon.proc is not None:
            daemon.stop(signal.SIGTERM)
