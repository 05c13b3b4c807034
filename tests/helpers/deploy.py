"""Helpers for the fleet deployment tests: throwaway publisher and approver keys, small
real ONNX packages signed at test time (one that fails at run time on a study of two
images), boxes configured to pin the test keys, deployment specs signed through the
CLI, and a scripted central side (the deployer certificate) that publishes what a test
says, garbage too, and records every job state the boxes report."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as mqtt
import pydicom
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from agent.deploy.document import iso, sign
from agent.infer.signing import file_sha256, sign_manifest
from fleet.deploy import package_ref
from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Subscriber,
    set_config,
    wait_for,
)

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

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Exactly these bytes (no envelope): for a box that must refuse garbage."""
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(15)
        assert info.is_published()

    def send_chunks(self, topic: str, rel: Release, indices: range | list[int] | None = None,
                    body: bytes | None = None) -> None:
        """The release's package chunks (all, or these indices); ``body`` replaces the
        bytes of each one sent (a corrupt chunk)."""
        for i in indices if indices is not None else range(len(rel.ref["chunks"])):
            self.publish(topic, "deployment.chunk", rel.chunk(i, body))

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass(frozen=True)
class Release:
    """A deployment document signed by both approvers through the CLI, and its package
    cut into chunks as ``fleet deploy`` would send them."""

    ident: str
    revision: int
    signed: dict[str, Any]
    ref: dict[str, Any]
    data: bytes
    chunk_size: int

    def chunk(self, i: int, body: bytes | None = None) -> dict[str, object]:
        raw = body if body is not None else self.data[i * self.chunk_size:
                                                      (i + 1) * self.chunk_size]
        return {"deployment": self.ident, "revision": self.revision,
                "package": self.ref["sha256"], "index": i,
                "data": base64.b64encode(raw).decode()}


def release(tmp: Path, keys: Keys, catalog: Path, ident: str, revision: int, version: str,
            *, soak: float, chunk_size: int, boxes: tuple[str, ...] = ("dev-box",)) -> Release:
    spec = write_spec(tmp / f"{ident}-{revision}.json", document(
        ident, revision, list(boxes), version=version, soak=soak, chunk_size=chunk_size))
    sign_independently(spec, keys, catalog)
    signed = json.loads(spec.read_text())
    ref, data = package_ref(catalog / MODEL / version, chunk_size)
    assert ref["sha256"] == signed["document"]["packages"][0]["sha256"]
    return Release(ident, revision, signed, ref, data, chunk_size)


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

