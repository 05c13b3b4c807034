"""The deployment stage of the box: accept or refuse documents, download, verify,
switch, soak, and roll back when a health gate breaks.

Two threads touch it.  paho's loop thread calls ``on_message`` for everything on
``{base}/deployments`` (agent/uplink/inbound.py): a document is checked (shape,
approvals, expiry, replay, target, config subset, size) and either recorded
durably as the current job or refused; a chunk is checked against the signed
chunk list and appended, fsynced, to its part file.  Both are quick and never
raise.  The ``deploy`` thread does the slow part: asks for chunks, verifies the
whole package (archive sha256, then the package's own publisher signature and
pinned key, as ``models install`` does), switches models between studies
(``InferenceEngine.reload``: warmed up before the swap), watches the gates over
the soak, and rolls back.  Every step is a job event on ``{base}/jobs``
(CloudEvents, retained, docs/schemas/job.schema.json) and an audit record.

Job phases (durable, agent/deploy/jobstate.py): received -> downloading ->
verified -> soaking -> succeeded | rolled_back; refused never becomes a job.
A restart resumes the phase it finds: a download continues from the last
good chunk, a soak restarts its clock, an activation that was interrupted is
finished or undone by the same code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.deploy import archive, overlay
from agent.deploy.chunks import ChunkError, Download
from agent.deploy.document import (
    ApproverKey,
    Deployment,
    DocumentError,
    check_approvals,
    check_config,
    check_expiry,
    check_target,
    load_approver_key,
    parse,
)
from agent.deploy.gates import SoakWatch
from agent.deploy.jobstate import JobState
from agent.errors import EdgeAgentError
from agent.infer.registry import Registry, read_package
from agent.uplink.cloudevents import TYPE_PREFIX
from agent.uplink.inbound import InboundMessage

log = logging.getLogger(__name__)

STATES = ("received", "downloading", "verified", "active", "soaking", "succeeded",
          "rolled_back", "refused")
DOC_TYPE = f"{TYPE_PREFIX}.deployment.v1"
CHUNK_TYPE = f"{TYPE_PREFIX}.deployment.chunk.v1"
WINDOW = 8  # chunks asked for at once: bounded by the inflight window of the broker
MAX_BAD_CHUNKS = 20  # corrupt chunks in one job before it is given up


class _Superseded(Exception):
    """The job the deploy thread works on was replaced by a newer document."""


@dataclass(frozen=True)
class Hooks:
    """What the stage needs from the daemon."""

    emit: Callable[[dict[str, Any]], None]  # a job event's data -> outbox (jobs)
    audit: Callable[..., None]  # daemon.audit(event, outcome=, user=, details=)
    registry: Callable[[], Registry]
    reload: Callable[[], list[dict[str, str]]]  # InferenceEngine.reload (raises ModelError)
    status_changed: Callable[[], None]  # re-publish the retained status
    latencies: Callable[[], list[float]]
    drift: Callable[[], dict[str, Any]]


class DeployStage:
    def __init__(self, cfg: Config, hooks: Hooks) -> None:
        self.cfg = cfg
        self.s = cfg.deploy
        self.hooks = hooks
        self.folder = cfg.state_dir / "deploy"
        self.state = JobState(self.folder)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._downloads: dict[str, Download] = {}
        self._requested_at = 0.0
        self._requested_next = -1
        self._requested_pkg = ""
        self._bad_chunks = 0
        self._refused_digests: set[str] = set()
        self._soak: SoakWatch | None = None
        self._soak_until = 0.0
        self.keys: tuple[ApproverKey, ...] = tuple(
            load_approver_key(role, p) for role, paths in self.s.approver_keys for p in paths)
        self.counters = {"documents": 0, "refused": 0, "chunks": 0, "chunks_refused": 0}

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deploy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def status(self) -> dict[str, Any] | None:
        """For the retained status: the deployment that is active, or in progress."""
        job = self.state.job
        if job is not None:
            return {"id": job["id"], "revision": job["revision"], "state": job["phase"]}
        return self.state.active

    # -- job events ------------------------------------------------------------------
    def _event(self, state: str, job: dict[str, Any] | None, **data: Any) -> None:
        body: dict[str, Any] = {"state": state, "site": self.cfg.site,
                                "device": self.cfg.device}
        if job is not None:
            body.update(deployment=job["id"], revision=job["revision"], wave=job.get("wave", -1),
                        packages=[{"name": p["name"], "version": p["version"]}
                                  for p in job.get("packages", [])])
        body.update(data)
        try:
            self.hooks.emit(body)
        except Exception:  # noqa: BLE001 - a full outbox must not break the stage
            log.exception("could not enqueue the %s job event", state)

    def _audit(self, event: str, outcome: str = "success", **details: Any) -> None:
        try:
            self.hooks.audit(event, outcome=outcome, user=details.pop("user", None),
                             details=details)
        except Exception:  # noqa: BLE001 - auditing problems are the audit log's to report
            log.exception("audit of %s failed", event)

    # -- inbound (paho's thread: quick, never raises) ----------------------------------
    def on_message(self, msg: InboundMessage) -> None:
        try:
            ev = json.loads(msg.payload)
            kind = ev.get("type") if isinstance(ev, dict) else None
            data = ev.get("data") if isinstance(ev, dict) else None
            if not isinstance(data, dict):
                raise DocumentError("malformed", "not a CloudEvents JSON envelope with data")
            if kind == CHUNK_TYPE:
                self._on_chunk(data)
            elif kind == DOC_TYPE:
                self._on_document(data)
            else:
                raise DocumentError("malformed", f"unexpected event type {str(kind)[:80]!r}")
        except DocumentError as exc:
            self._refuse(None, exc, raw=msg.payload)
        except (ValueError, UnicodeDecodeError):
            self._refuse(None, DocumentError("malformed", "not JSON"), raw=msg.payload)
        except Exception:  # noqa: BLE001 - never into paho
            log.exception("deployment message handling failed")

    def refuse_unread(self, why: str) -> None:
        """A message on the deployments topic the inbound router dropped unread (too
        large): audited and reported on the jobs topic like any refusal (never raises)."""
        try:
            self._refuse(None, DocumentError("too_large", f"deployment message of {why}"))
        except Exception:  # noqa: BLE001 - never into paho
            log.exception("deployment refusal failed")

    def _refuse(self, signed: dict[str, Any] | None, exc: DocumentError,
                dep: Deployment | None = None, *, raw: bytes | None = None) -> None:
        doc = signed.get("document") if isinstance(signed, dict) else None
        ident = dep.id if dep else (doc.get("id") if isinstance(doc, dict) else None)
        rev = dep.revision if dep else (doc.get("revision") if isinstance(doc, dict) else None)
        # What makes "the same message again": the document, or for a message with no
        # readable id its bytes (two different garbage messages are two refusals).
        if dep:
            key = dep.digest
        elif ident is None and raw is not None:
            key = "raw:" + hashlib.sha256(raw).hexdigest()
        else:
            key = f"{ident}:{rev}:{exc.reason}"
        with self._lock:
            if key in self._refused_digests:
                return  # the retained copy again after a reconnect: refused once is enough
            if len(self._refused_digests) >= 1000:  # bounded: a flood must not grow memory
                self._refused_digests.clear()
            self._refused_digests.add(key)
            self.counters["refused"] += 1
        ident = str(ident)[:64] if ident is not None else "unknown"
        rev = rev if isinstance(rev, int) and not isinstance(rev, bool) else 0
        reason = str(exc)
        log.warning("deployment %s revision %s refused: %s", ident, rev, reason)
        self._audit("deploy.refused", outcome="minor_failure", id=ident, revision=rev,
                    reason=exc.reason, detail=reason[:300])
        self._event("refused", None, deployment=ident, revision=rev, wave=-1, packages=[],
                    reason=exc.reason, detail=reason[:300])

    def _on_document(self, signed: dict[str, Any]) -> None:
        dep: Deployment | None = None
        try:
            dep = parse(signed)
            if not self.s.enabled:
                raise DocumentError("disabled", "deployments are disabled on this box "
                                                "([deploy] enabled = false)")
            approvals = check_approvals(signed, self.s.required_roles, self.keys)
            with self._lock:
                if dep.revision <= self.state.last_revision:
                    if dep.digest == self.state.last_digest:
                        return  # the same document again (retained, or redelivered)
                    raise DocumentError("replayed", f"revision {dep.revision} is not above "
                                                    f"{self.state.last_revision}, the highest "
                                                    "this box accepted")
                check_expiry(dep, time.time())
                check_target(dep, self.cfg.site, self.cfg.device, self.s.label_map())
                check_config(dep, self.s.allow_sensitive)
                self._check_room(dep)
                job = {"id": dep.id, "revision": dep.revision, "digest": dep.digest,
                       "action": dep.action, "phase": "received", "wave": dep.wave_of(
                           self.cfg.device),
                       "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256}
                                    for p in dep.packages],
                       "approvals": [{"role": a.role, "key_id": a.key_id, "signer": a.signer}
                                     for a in approvals],
                       "received_at": time.time()}
                replaced = self.state.accept(signed, job)
                self._downloads.clear()
                self._requested_next = -1
                self._requested_pkg = ""
                self._bad_chunks = 0
                self._soak = None
                self.counters["documents"] += 1
        except DocumentError as exc:
            self._refuse(signed, exc, dep)
            return
        if replaced is not None and replaced.get("phase") not in ("succeeded", "rolled_back"):
            self._audit("deploy.superseded", id=replaced["id"], revision=replaced["revision"],
                        by=dep.revision)
        self._audit("deploy.received", id=dep.id, revision=dep.revision, action=dep.action,
                    approvals=job["approvals"], packages=job["packages"],
                    config=sorted(k for k, _v in dep.config))
        self._event("received", job, action=dep.action, approvals=job["approvals"])
        self.hooks.status_changed()
        self._wake.set()

    def _check_room(self, dep: Deployment) -> None:
        total = sum(p.size for p in dep.packages)
        if total > self.s.max_package_bytes:
            raise DocumentError("too_large", f"packages total {total} bytes, over [deploy] "
                                             f"max_package_bytes {self.s.max_package_bytes}")
        free = shutil.disk_usage(self.cfg.state_dir).free
        if free - 2 * total < self.s.disk_reserve_bytes:  # the archive and its unpacked copy
            raise DocumentError("no_space", f"{free} bytes free; the packages need {2 * total} "
                                            f"and [deploy] disk_reserve_bytes keeps "
                                            f"{self.s.disk_reserve_bytes}")

    def _on_chunk(self, data: dict[str, Any]) -> None:
        job = self.state.job
        if job is None or job.get("phase") != "downloading":
            return
        if data.get("deployment") != job["id"] or data.get("revision") != job["revision"]:
            return  # for an older job (a late retransmission): not ours any more
        with self._lock:
            dl = self._download_of(str(data.get("package")))
            index = data.get("index")
            if dl is None or not isinstance(index, int) or isinstance(index, bool):
                return
            try:
                raw = base64.b64decode(str(data.get("data", "")), validate=True)
                accepted = dl.accept(index, raw)
            except (ChunkError, binascii.Error, ValueError) as exc:
                self._bad_chunks += 1
                self.counters["chunks_refused"] += 1
                self._requested_at = 0.0  # ask again for it at once
                bad = self._bad_chunks
                reason = str(exc) if isinstance(exc, ChunkError) else "chunk data is not base64"
            else:
                if accepted:
                    self.counters["chunks"] += 1
                    if dl.have >= self._requested_next + WINDOW or dl.complete:
                        self._wake.set()
                return
        log.warning("deployment %s: chunk refused: %s", job["id"], reason)
        self._audit("deploy.chunk_refused", outcome="minor_failure", id=job["id"],
                    revision=job["revision"], package=dl.ref.name, index=index, reason=reason)
        self._event("downloading", job, chunk_refused={"index": index, "reason": reason},
                    bad_chunks=bad)
        self._wake.set()

    # -- the deploy thread -------------------------------------------------------------
    def _update(self, job: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """Change the job the worker is on; _Superseded when a newer document replaced it
        meanwhile (the paho thread accepts under the same lock)."""
        with self._lock:
            self._check_current(job)
            return self.state.update(**changes)

    def _finish(self, job: dict[str, Any], outcome: str, **extra: Any) -> None:
        with self._lock:
            self._check_current(job)
            self.state.finish(outcome, **extra)

    def _check_current(self, job: dict[str, Any]) -> None:
        current = self.state.job
        if current is None or current.get("revision") != job.get("revision"):
            raise _Superseded(job.get("revision"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._step()
            except _Superseded as exc:
                log.info("deployment revision %s superseded while working on it", exc)
            except Exception:  # noqa: BLE001 - one bad step must not end deployments
                log.exception("deployment step failed")
                self._stop.wait(2.0)

    def _document(self) -> Deployment | None:
        job = self.state.job
        if job is None:
            return None
        signed = self.state.document(int(job["revision"]))
        return parse(signed) if signed is not None else None

    def _step(self) -> None:
        job = self.state.job
        if job is None:
            return
        dep = self._document()
        if dep is None:
            self._finish(job, "refused", reason="document lost")
            return
        phase = job["phase"]
        if phase == "received":
            if dep.action == "rollback":
                self._operator_rollback(dep, job)
                return
            # What runs now, recorded before anything is installed: a model without an
            # explicit choice runs its highest installed version, which the new package
            # would silently become.
            registry = self.hooks.registry()
            self._update(job, phase="downloading" if dep.packages else "verified",
                              previous={p.name: registry.active_version(p.name)
                                        for p in dep.packages},
                              config_previous=overlay.read(self.cfg.state_dir))
            self._wake.set()
        elif phase == "downloading":
            self._download(dep, job)
        elif phase == "verified":
            self._activate(dep, job)
        elif phase == "soaking":
            self._watch(dep, job)

    def _download(self, dep: Deployment, job: dict[str, Any]) -> None:
        for ref in dep.packages:
            with self._lock:
                dl = self._download_of(ref.sha256, dep)
                if dl is None:
                    return
                bad = self._bad_chunks if self._bad_chunks > MAX_BAD_CHUNKS else 0
                if not dl.complete and not bad:
                    stalled = (time.monotonic() - self._requested_at
                               > self.s.request_timeout_seconds)
                    if (self._requested_pkg != ref.sha256 or stalled
                            or dl.have >= self._requested_next + WINDOW):
                        self._requested_pkg = ref.sha256
                        self._requested_next = dl.have
                        self._requested_at = time.monotonic()
                        self._event("downloading", job, request={
                            "package": ref.sha256, "name": ref.name, "next": dl.have,
                            "window": WINDOW, "chunks": dl.total})
                if bad:
                    self._fail(dep, job, "refused", "corrupt_chunks",
                               f"{bad} chunks did not match their signed hashes")
                    return
                if not dl.complete:
                    return
            try:
                tar = dl.finish()
            except ChunkError as exc:
                self._fail(dep, job, "refused", "sha256_mismatch", str(exc))
                return
            try:
                self._install(ref.name, ref.version, tar)
            except EdgeAgentError as exc:
                self._fail(dep, job, "refused", "package_refused", str(exc).splitlines()[0])
                return
        self._update(job, phase="verified")
        self._event("verified", job)
        self._audit("deploy.verified", id=dep.id, revision=dep.revision,
                    packages=[f"{p.name} {p.version} {p.sha256[:12]}" for p in dep.packages])
        self._wake.set()

    def _download_of(self, sha256: str, dep: Deployment | None = None) -> Download | None:
        """The download of one package of the current job (opened, and after a restart
        recovered from its part file, by whichever thread needs it first)."""
        dl = self._downloads.get(sha256)
        if dl is not None:
            return dl
        dep = dep or self._document()
        ref = next((p for p in dep.packages if p.sha256 == sha256), None) if dep else None
        if ref is None:
            return None
        dl = self._downloads[sha256] = Download(self.folder / "downloads", ref)
        if dl.have:
            log.info("deployment %s: resuming %s at chunk %d of %d", dep.id if dep else "?",
                     ref.name, dl.have, dl.total)
        return dl

    def _install(self, name: str, version: str, tar: Path) -> None:
        """Unpack, verify (publisher signature + pinned key + model sha256), install."""
        registry = self.hooks.registry()
        staging = self.folder / "staging" / f"{name}-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            archive.unpack(tar, staging)
            pkg = read_package(staging, registry.keys)
            if not pkg.verification.ok:  # whatever the environment: a deployment is signed
                raise EdgeAgentError(f"package {name} {version} is not verified: "
                                     f"{pkg.verification.status} ({pkg.verification.detail})")
            if (pkg.name, pkg.version) != (name, version):
                raise EdgeAgentError(f"the archive holds {pkg.name} {pkg.version}, the document "
                                     f"names {name} {version}")
            registry.install(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _activate(self, dep: Deployment, job: dict[str, Any]) -> None:
        registry = self.hooks.registry()
        with self._lock:
            self._check_current(job)
        try:
            for p in dep.packages:
                registry.activate(p.name, p.version)
            self._apply_config(dep, job)
            models = self.hooks.reload()  # warms the new set up before it takes over
        except EdgeAgentError as exc:
            self._restore(job)
            self._fail(dep, job, "rolled_back", "warm_up_failed", str(exc).splitlines()[0])
            return
        self._soak = SoakWatch(tuple(p.name for p in dep.packages))
        self._soak_until = time.time() + dep.soak_seconds
        job = self._update(job, phase="soaking", soak_until=self._soak_until)
        self._event("active", job, models=models)
        self._audit("deploy.activated", id=dep.id, revision=dep.revision,
                    models=[f"{m['name']} {m['version']}" for m in models],
                    config=sorted(k for k, _v in dep.config), previous=job.get("previous"))
        self._event("soaking", job, soak_seconds=dep.soak_seconds)
        self.hooks.status_changed()
        self._wake.set()

    def _apply_config(self, dep: Deployment, job: dict[str, Any]) -> None:
        if not dep.config:
            return
        values = dict(job.get("config_previous") or {})
        values.update(dict(dep.config))
        overlay.write(self.cfg.state_dir, values, deployment=dep.id, revision=dep.revision)
        level = dict(dep.config).get("logging.level")
        if isinstance(level, str):
            logging.getLogger().setLevel(level)

    def _restore(self, job: dict[str, Any]) -> None:
        """Back to the versions and config that were active before ``job``."""
        registry = self.hooks.registry()
        for name, version in (job.get("previous") or {}).items():
            current = registry.active_version(name)
            if version is None:
                # The model was new: take the deployed version out of the models dir so
                # that the highest-installed default does not keep it running.
                for p in job.get("packages", []):
                    if p["name"] == name:
                        src = registry.models_dir / name / p["version"]
                        if src.is_dir():
                            dest = self.folder / "removed" / f"{name}-{p['version']}"
                            shutil.rmtree(dest, ignore_errors=True)
                            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                            shutil.move(str(src), str(dest))
            elif current != version:
                registry.activate(name, version)
        if "config_previous" in job:
            overlay.write(self.cfg.state_dir, dict(job["config_previous"] or {}),
                          deployment=str(job["id"]), revision=int(job["revision"]))
            level = (job["config_previous"] or {}).get("logging.level", self.cfg.log_level)
            logging.getLogger().setLevel(str(level))
        try:
            self.hooks.reload()
        except EdgeAgentError as exc:
            log.error("reload after rollback failed: %s", exc)
            self._audit("deploy.rollback_reload_failed", outcome="serious_failure",
                        id=job["id"], reason=str(exc).splitlines()[0][:300])

    def _watch(self, dep: Deployment, job: dict[str, Any]) -> None:
        with self._lock:
            self._check_current(job)
        if self._soak is None:  # after a restart: the soak starts over, counters fresh
            self._soak = SoakWatch(tuple(p.name for p in dep.packages))
            self._soak_until = time.time() + dep.soak_seconds
            self._update(job, soak_until=self._soak_until)
        breach = self._soak.breach(dep, self.hooks.latencies(), self.hooks.drift())
        if breach is not None:
            self._restore(job)
            self._fail(dep, job, "rolled_back", "gate_breached", breach.describe(),
                       gate={"name": breach.gate, "observed": breach.observed,
                             "limit": breach.limit}, observed=self._soak.summary())
            return
        if time.time() >= self._soak_until:
            summary = self._soak.summary()
            active = {"id": dep.id, "revision": dep.revision, "state": "succeeded"}
            self._finish(job, "succeeded", active=active, observed=summary)
            self._soak = None
            self._event("succeeded", job, observed=summary)
            self._audit("deploy.succeeded", id=dep.id, revision=dep.revision, observed=summary,
                        approvals=job.get("approvals"))
            self.hooks.status_changed()

    def observe(self, event: str, details: dict[str, Any]) -> None:
        """Every audit event of the daemon passes here (cheap when no soak runs)."""
        soak = self._soak
        if soak is not None and soak.observe(event, details):
            self._wake.set()

    def _fail(self, dep: Deployment, job: dict[str, Any], state: str, reason: str,
              detail: str, **extra: Any) -> None:
        with self._lock:
            self._check_current(job)
            for dl in self._downloads.values():
                dl.discard()
            self._downloads.clear()
            self._soak = None
        log.warning("deployment %s revision %d %s: %s", dep.id, dep.revision, state, detail)
        active = self.state.active if state == "refused" else {
            "id": dep.id, "revision": dep.revision, "state": state}
        self._finish(job, state, active=active, reason=reason, detail=detail[:300])
        self._event(state, job, reason=reason, detail=detail[:300], **extra)
        self._audit("deploy.rolled_back" if state == "rolled_back" else "deploy.refused",
                    outcome="serious_failure" if state == "rolled_back" else "minor_failure",
                    id=dep.id, revision=dep.revision, reason=reason, detail=detail[:300],
                    **extra)
        self.hooks.status_changed()

    def _operator_rollback(self, dep: Deployment, job: dict[str, Any]) -> None:
        """A signed rollback document: restore what deployment ``dep.id`` replaced."""
        target = self.state.finished(dep.id)
        if target is None or "previous" not in target:
            self._fail(dep, job, "refused", "nothing_to_roll_back",
                       f"this box has no finished deployment {dep.id} that changed anything")
            return
        self._restore(target)
        active = {"id": dep.id, "revision": dep.revision, "state": "rolled_back"}
        self._finish(job, "rolled_back", active=active, reason="rollback_requested")
        self._event("rolled_back", {**job, "packages": target.get("packages", [])},
                    reason="rollback_requested",
                    detail=f"rollback of {dep.id} revision {target['revision']} requested by "
                           f"central ops (revision {dep.revision})",
                    approvals=job.get("approvals"))
        self._audit("deploy.rolled_back", id=dep.id, revision=dep.revision,
                    reason="rollback_requested", undone_revision=target["revision"],
                    approvals=job.get("approvals"), restored=target.get("previous"))
        self.hooks.status_changed()
