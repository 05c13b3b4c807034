"""Central ops: build, sign and roll out deployment documents; watch their progress.

``fleet sign`` turns a deployment spec (JSON: the document's fields with packages
named by name and version) into the signed document, resolving each package from
a models tree into the sha256 of its transfer archive and of each chunk, and adds
one approver's signature; approvers sign independently, each with their own key.
``fleet deploy`` runs the rollout (``Rollout``): it publishes the document,
retained, to the canary boxes' deployments topics, serves the chunks each box asks
for on its jobs topic, waits until every canary has soaked successfully, then does
the same wave by wave; a canary (or any box) that rolls back or refuses stops the
rollout.  ``fleet deployments`` folds the retained job states into progress per
wave and box; ``fleet rollback`` publishes a signed rollback document.

The central side connects with the ``deployer`` certificate: it may write
``{prefix}/+/+/deployments`` and read jobs and status, nothing else (docs/fleet.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.deploy import archive
from agent.deploy.document import (
    Deployment,
    DocumentError,
    iso,
    load_private_key,
    parse,
    sign,
    validate_shape,
)
from agent.errors import EdgeAgentError
from agent.uplink.cloudevents import TYPE_PREFIX
from agent.uplink.mqtt_tls import tls_context
from fleet.settings import OpsSettings

log = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024  # base64 in JSON: ~350 kB per message, under the box's 1 MiB bound
TERMINAL = ("succeeded", "rolled_back", "refused")
SOURCE = "fleet/deploy"


def _envelope(kind: str, data: dict[str, Any]) -> bytes:
    ev = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": SOURCE,
          "type": f"{TYPE_PREFIX}.{kind}.v1",
          "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
          "datacontenttype": "application/json", "data": data}
    return json.dumps(ev, separators=(",", ":"), sort_keys=True).encode()


# -- building and signing ---------------------------------------------------------------

def package_ref(folder: Path, chunk_size: int = CHUNK_SIZE) -> tuple[dict[str, Any], bytes]:
    """The document's entry for one package folder, and its transfer archive."""
    import tomllib

    try:
        manifest = tomllib.loads((folder / "manifest.toml").read_text())
    except (OSError, ValueError) as exc:
        raise EdgeAgentError(f"{folder} is not a model package ({exc})",
                             hint="give the folder holding manifest.toml, its .sig, "
                                  "model.onnx and MODEL_CARD.md") from None
    data = archive.pack(folder)
    chunks = [hashlib.sha256(data[i:i + chunk_size]).hexdigest()
              for i in range(0, len(data), chunk_size)]
    return ({"name": str(manifest.get("name")), "version": str(manifest.get("version")),
             "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
             "chunk_size": chunk_size, "chunks": chunks}, data)


def build_document(spec: dict[str, Any], models: Path) -> dict[str, Any]:
    """The document of a spec: packages resolved from ``models/<name>/<version>``."""
    doc = {k: v for k, v in spec.items() if k != "packages"}
    doc.setdefault("schema", 1)
    doc.setdefault("action", "deploy")
    doc.setdefault("issued", iso(time.time()))
    if "expires" not in doc:
        doc["expires"] = iso(time.time() + 7 * 86400)
    refs = []
    for p in spec.get("packages", []):
        if not isinstance(p, dict) or not {"name", "version"} <= set(p):
            raise EdgeAgentError(f"package entry {p!r} needs name and version")
        if "sha256" in p:
            refs.append(p)
            continue
        size = p.get("chunk_size", CHUNK_SIZE)
        ref, _data = package_ref(models / str(p["name"]) / str(p["version"]),
                                 size if isinstance(size, int) else CHUNK_SIZE)
        refs.append(ref)
    if refs or "packages" in spec:
        doc["packages"] = refs
    return doc


def sign_file(path: Path, role: str, key: Path, *, models: Path | None = None,
              signer: str = "") -> dict[str, Any]:
    """Add one approver's signature to the signed document in ``path`` (or to a spec,
    which is built into a document first)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeAgentError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(loaded, dict):
        raise EdgeAgentError(f"{path}: expected a JSON object")
    if "document" not in loaded:
        loaded = {"document": build_document(loaded, models or path.parent), "signatures": []}
    loaded["signatures"] = [s for s in loaded.get("signatures", [])
                            if not (s.get("role") == role)] + [
        sign(loaded["document"], role, load_private_key(key), signer)]
    try:
        validate_shape(loaded)
        parse(loaded)
    except DocumentError as exc:
        raise EdgeAgentError(str(exc), hint="fix the deployment spec") from None
    return loaded


# -- the rollout ------------------------------------------------------------------------

@dataclass
class BoxProgress:
    site: str
    device: str
    wave: int
    state: str = "pending"
    detail: str = ""
    published: bool = False
    updated: float = 0.0
    next_chunk: int | None = None


@dataclass
class Outcome:
    completed: bool
    stopped_reason: str
    boxes: dict[str, BoxProgress] = field(default_factory=dict)


class Rollout:
    """Publishes one signed document wave by wave and serves its chunks."""

    def __init__(self, s: OpsSettings, signed: dict[str, Any], models: Path,
                 *, echo: Callable[[str], None] = lambda _l: None,
                 labelled: tuple[str, ...] = ()) -> None:
        self.s = s
        self.signed = signed
        self.dep: Deployment = parse(signed)
        self.echo = echo
        self.archives: dict[str, bytes] = {}
        for ref in self.dep.packages:
            got, data = package_ref(models / ref.name / ref.version, ref.chunk_size)
            if got["sha256"] != ref.sha256:
                raise EdgeAgentError(
                    f"package {ref.name} {ref.version} under {models} differs from the one "
                    "the approvers signed", hint="deploy the exact package that was approved")
            self.archives[ref.sha256] = data
        self.boxes: dict[str, BoxProgress] = {}
        # No plan but a label selector: the boxes whose status announces matching labels,
        # all in one wave.
        self.steps = self.dep.plan() or ([tuple(sorted(labelled))] if labelled else [])
        for wave, step in enumerate(self.steps):
            for device in step:
                self.boxes[device] = BoxProgress(self.dep.site, device, wave)
        if not self.boxes:
            raise EdgeAgentError("the rollout plan names no boxes",
                                 hint="list boxes under rollout.canary and rollout.waves")
        self._lock = threading.Lock()
        self._retained: dict[str, dict[str, Any]] = {}
        self._changed = threading.Event()
        self.connected = threading.Event()
        cid = f"deployer-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(tls_context(s.mqtt))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._refused: dict[int, str] = {}  # mid -> PUBACK reason (MQTT 5) of a refusal

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self._refused[mid] = str(rc)

    def topic(self, device: str, channel: str) -> str:
        return f"{self.s.topic_prefix}/{self.dep.site}/{device}/{channel}"

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker refused the deployer: %s", rc)
            return
        c.subscribe([(self.topic("+", "jobs"), 1)])
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parts = msg.topic.split("/")
            device = parts[-2] if len(parts) >= 2 else ""
            ev = json.loads(msg.payload)
            data = ev.get("data") if isinstance(ev, dict) else None
            if not isinstance(data, dict) or ev.get("type") != f"{TYPE_PREFIX}.job.v1":
                return
            self._fold(device, data)
        except Exception:  # noqa: BLE001 - one bad message must not stop the rollout
            log.exception("job message handling failed")

    def _fold(self, device: str, data: dict[str, Any]) -> None:
        with self._lock:
            box = self.boxes.get(device)
            if box is None or data.get("deployment") != self.dep.id:
                return
            if data.get("revision") != self.dep.revision:
                return
            if not box.published:
                # Retained from an earlier run of this rollout (fleet deploy restarted):
                # used once this run publishes to the box, so a finished canary counts.
                self._retained[device] = data
                return
            state = str(data.get("state", ""))
            box.state = state
            box.updated = time.time()
            box.detail = str(data.get("detail", data.get("reason", "")))[:200]
            request = data.get("request")
        self._changed.set()
        if state == "downloading" and isinstance(request, dict):
            self._serve(device, request)

    def _serve(self, device: str, request: dict[str, Any]) -> None:
        sha = str(request.get("package", ""))
        data = self.archives.get(sha)
        ref = next((r for r in self.dep.packages if r.sha256 == sha), None)
        nxt, window = request.get("next"), request.get("window", 8)
        if data is None or ref is None or not isinstance(nxt, int) or not isinstance(window, int):
            return
        with self._lock:
            self.boxes[device].next_chunk = nxt
        for index in range(max(0, nxt), min(len(ref.chunks), nxt + max(1, min(window, 64)))):
            chunk = data[index * ref.chunk_size:(index + 1) * ref.chunk_size]
            self.publish_chunk(device, ref.sha256, index, chunk)

    def publish_chunk(self, device: str, package: str, index: int, chunk: bytes) -> None:
        payload = _envelope("deployment.chunk", {
            "deployment": self.dep.id, "revision": self.dep.revision, "package": package,
            "index": index, "data": base64.b64encode(chunk).decode("ascii")})
        self.client.publish(self.topic(device, "deployments"), payload, qos=1)

    def publish_document(self, device: str) -> None:
        with self._lock:
            self.boxes[device].published = True
            earlier = self._retained.pop(device, None)
        info = self.client.publish(self.topic(device, "deployments"),
                                   _envelope("deployment", self.signed), qos=1, retain=True)
        info.wait_for_publish(30)
        refused = self._refused.pop(info.mid, None)
        if refused is not None or not info.is_published():
            raise EdgeAgentError(
                f"the broker did not accept the document for {device} "
                f"({refused or 'no acknowledgement within 30 s'})",
                hint="run fleet deploy with the deployer certificate (the only one that may "
                     "write deployments topics, docs/fleet.md)")
        if earlier is not None:
            self._fold(device, earlier)

    def start(self) -> None:
        self.client.connect(self.s.mqtt.host, self.s.mqtt.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(15):
            self.stop()
            raise EdgeAgentError("could not connect to the broker as the deployer within 15 s",
                                 hint="check [mqtt] in the deployer's ops config and that its "
                                      "certificate is the 'deployer' one")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _wait_step(self, step: tuple[str, ...], deadline: float) -> list[str]:
        """Until every box of the step is terminal or the deadline; the boxes still open."""
        while True:
            with self._lock:
                open_ = [d for d in step if self.boxes[d].state not in TERMINAL]
            if not open_ or time.time() >= deadline:
                return open_
            self._changed.wait(1.0)
            self._changed.clear()

    def run(self, *, final_wait: float | None = None) -> Outcome:
        """The whole rollout; returns when it completed or stopped."""
        pending: list[str] = []
        for n, step in enumerate(self.steps):
            label = ("canary" if n == 0 and self.dep.canary
                     else f"wave {n if self.dep.canary else n + 1}")
            self.echo(f"{label}: publishing {self.dep.id} revision {self.dep.revision} to "
                      f"{', '.join(step)}")
            for device in step:
                self.publish_document(device)
            open_ = self._wait_step(step, time.time() + self.dep.wave_timeout_seconds)
            failed = [d for d in step if self.boxes[d].state in ("rolled_back", "refused")]
            if failed:
                why = "; ".join(f"{d}: {self.boxes[d].state} ({self.boxes[d].detail})"
                                for d in failed)
                self.echo(f"{label} failed, rollout stopped: {why}")
                return Outcome(False, f"{label} failed: {why}", dict(self.boxes))
            if open_ and n == 0 and self.dep.canary:
                return Outcome(False, f"canary did not finish in time: {', '.join(open_)}",
                               dict(self.boxes))
            if open_:
                self.echo(f"{label}: still waiting for {', '.join(open_)} (offline?); going on")
                pending += open_
            else:
                self.echo(f"{label}: every box succeeded")
        if pending:
            until = time.time() + (final_wait if final_wait is not None
                                   else max(0.0, self.dep.expires - time.time()))
            still = self._wait_step(tuple(pending), until)
            failed = [d for d in pending if self.boxes[d].state in ("rolled_back", "refused")]
            if failed or still:
                return Outcome(False, "not every box finished: " + ", ".join(
                    f"{d} {self.boxes[d].state}" for d in failed + still), dict(self.boxes))
        return Outcome(True, "", dict(self.boxes))


def select_by_labels(statuses: dict[tuple[str, str, str], dict[str, Any]],
                     dep: Deployment) -> tuple[str, ...]:
    """Boxes of the document's site whose retained status announces all its labels."""
    out = []
    for (site, device, channel), data in statuses.items():
        labels = data.get("labels")
        if channel != "status" or site != dep.site or not isinstance(labels, dict):
            continue
        if dep.labels and all(labels.get(k) == v for k, v in dep.labels):
            out.append(device)
    return tuple(sorted(out))


# -- progress and rollback --------------------------------------------------------------

def collect(s: OpsSettings, seconds: float, topics: tuple[str, ...] = ("jobs",)
            ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The retained (and live) messages of ``topics`` for ``seconds``:
    {(site, device, channel): data} of the newest message per box and channel."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    lock = threading.Lock()
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"deployer-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(s.mqtt))

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if not getattr(rc, "is_failure", False):
            c.subscribe([(f"{s.topic_prefix}/+/+/{t}", 1) for t in topics])
            ready.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parts = msg.topic.split("/")
            ev = json.loads(msg.payload)
            if isinstance(ev, dict) and isinstance(ev.get("data"), dict) and len(parts) == 4:
                with lock:
                    out[(parts[1], parts[2], parts[3])] = ev["data"]
        except ValueError:
            pass

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(s.mqtt.host, s.mqtt.port, keepalive=30)
    client.loop_start()
    try:
        if not ready.wait(15):
            raise EdgeAgentError("could not connect to the broker within 15 s",
                                 hint="check [mqtt] in the ops config")
        time.sleep(seconds)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(out)


def progress_rows(jobs: dict[tuple[str, str, str], dict[str, Any]],
                  deployment: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for (site, device, _ch), d in sorted(jobs.items()):
        if deployment is not None and d.get("deployment") != deployment:
            continue
        wave = d.get("wave", -1)
        rows.append({"deployment": d.get("deployment"), "revision": d.get("revision"),
                     "wave": "canary" if wave == 0 else f"wave {wave}" if isinstance(
                         wave, int) and wave > 0 else "-",
                     "box": f"{site}/{device}", "state": d.get("state"),
                     "detail": d.get("detail") or d.get("reason") or _request_text(d)})
    return rows


def _request_text(d: dict[str, Any]) -> str:
    r = d.get("request")
    if isinstance(r, dict):
        return f"{r.get('name')}: chunk {r.get('next')} of {r.get('chunks')}"
    return ""


def rollback_document(deployment: str, site: str, boxes: list[str], revision: int,
                      hours: float = 24.0) -> dict[str, Any]:
    now = time.time()
    return {"schema": 1, "id": deployment, "revision": revision, "action": "rollback",
            "issued": iso(now), "expires": iso(now + hours * 3600),
            "target": {"site": site, "boxes": sorted(boxes)},
            "rollout": {"canary": [], "waves": [sorted(boxes)], "soak_seconds": 0}}


def publish_documents(s: OpsSettings, site: str, boxes: list[str],
                      signed: dict[str, Any]) -> None:
    """Publish one signed document, retained, to each box's deployments topic."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"deployer-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(s.mqtt))
    client.connect(s.mqtt.host, s.mqtt.port, keepalive=30)
    client.loop_start()
    try:
        for device in boxes:
            info = client.publish(f"{s.topic_prefix}/{site}/{device}/deployments",
                                  _envelope("deployment", signed), qos=1, retain=True)
            info.wait_for_publish(30)
            if not info.is_published():
                raise EdgeAgentError(f"the broker did not acknowledge the document for {device}")
    finally:
        client.disconnect()
        client.loop_stop()
