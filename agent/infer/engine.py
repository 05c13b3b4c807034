"""The inference stage the daemon calls: de-identified study in, model outputs out.

Models are loaded once (verified, policy-checked, warmed up).  For each study
and each applicable model: decode frames -> preprocess (pixels plus the
manifest's attributes only) -> batched runs (probability; uncertainty from the
same run's predictive entropy, or from test-time flips) -> study aggregation ->
review rule -> explanation of the top image (the map the model computed in the
same run, or occlusion) -> drift aggregates -> audit.  A failing model yields a
failure reason and an audit event; it never raises into the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from agent.errors import ModelError
from agent.infer.drift import DriftMonitor
from agent.infer.explain import Saliency, cam_region, occlusion, to_image_box
from agent.infer.manifest import AppliesTo, Decision, Manifest
from agent.infer.mask import mask_channel, to_source
from agent.infer.pixels import decode_frame, extract_attributes, frame_count, iter_images
from agent.infer.preprocess import ImageInput, preprocess, to_unit
from agent.infer.providers import choose as choose_providers
from agent.infer.registry import ModelPackage, Registry, enforce, safe_audit
from agent.infer.resample import assemble, source_index
from agent.infer.session import ModelSession, ModelTimeout
from agent.infer.signing import load_public_keys
from agent.infer.volume import VolumePlan, plan_volume, series_groups
from agent.types import MASK_MAX_BYTES, DeidentifiedStudy, ModelFailure, ModelOutput, SegMask
from agent.uplink import vocabulary

log = logging.getLogger(__name__)

AuditFn = Callable[[str, dict[str, object]], None]
# Images per onnxruntime call: at most _RUN_BATCH, and at most _RUN_BYTES of input.  The
# model's intermediate tensors grow with the batch too: 256 instead of 128 cost the daemon
# ~60 MB more peak memory (tests/infer/test_pipeline_memory.py) for a ~1 % faster run.
_RUN_BATCH = 128
_RUN_BYTES = 32 * 1024**2


def run_batch(image_shape: tuple[int, ...]) -> int:
    """How many images of this (C, H, W) shape go into one onnxruntime call."""
    per_image = 4 * math.prod(image_shape)  # float32
    return max(1, min(_RUN_BATCH, _RUN_BYTES // max(1, per_image)))


@dataclass(frozen=True)
class InferenceSettings:
    models_dir: Path
    state_dir: Path  # where active-version state and drift aggregates live
    environment: Literal["production", "development"] = "development"
    publisher_keys: tuple[Path, ...] = ()  # pinned Ed25519 public keys (PEM)
    threads: int = 1
    timeout_seconds: float = 60.0
    drift_min_studies: int = 10  # k-anonymity for drift telemetry
    # [infer] providers: onnxruntime execution providers in preference order, CPU fallback
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class _Loaded:
    package: ModelPackage
    session: ModelSession

    @property
    def manifest(self) -> Manifest:
        return self.package.manifest

    @property
    def extras(self) -> tuple[str, ...]:
        """The outputs fetched with the score, in the session's order: the explanation
        map (``cam``), then the mask (``[mask]``) unless it is the same output."""
        return extra_outputs(self.manifest)


def extra_outputs(m: Manifest) -> tuple[str, ...]:
    names = [m.explanation.output] if m.explanation.method == "cam" else []
    if m.mask is not None:
        names.append(m.mask.output_name)
    return tuple(dict.fromkeys(names))


_PIXEL_DATA = BaseTag(0x7FE00010)
_MODALITY = BaseTag(0x00080060)
_SOP_CLASS = BaseTag(0x00080016)
_BODY_PART = BaseTag(0x00180015)


def _value(ds: Dataset, tag: BaseTag) -> Any:
    """``ds.get(keyword, "")`` by tag: no keyword-to-tag lookup per access."""
    elem = ds.get(tag)
    return "" if elem is None else elem.value


def applies(rule: AppliesTo, ds: Dataset) -> bool:
    """Routing check on the de-identified dataset (engine-side, never seen by models)."""
    if _PIXEL_DATA not in ds:
        return False
    if rule.modalities and str(_value(ds, _MODALITY)).upper() not in rule.modalities:
        return False
    if rule.sop_classes and str(_value(ds, _SOP_CLASS)) not in rule.sop_classes:
        return False
    body = str(_value(ds, _BODY_PART) or "").upper()
    # A missing body part does not exclude: many modalities leave it empty.
    return not (rule.body_parts and body and body not in rule.body_parts)


def explained_label(manifest: Manifest) -> str:
    return manifest.decision.positive_label.replace("_", " ")


def manifest_words(manifest: Manifest) -> list[str]:
    """What a result may say that the signed manifest fixed: name, version, labels,
    findings (agent/uplink/vocabulary.py: the egress guard does not take these for study text)."""
    dec = manifest.decision
    return [manifest.name, manifest.version, *dec.labels, dec.positive_finding,
            dec.negative_finding, explained_label(manifest)]


def activate(logits: npt.NDArray[np.float32], kind: str) -> npt.NDArray[np.float64]:
    z = logits.astype(np.float64)
    if kind == "softmax":
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return np.clip(z, 0.0, 1.0)


def aggregate(values: npt.NDArray[np.float64], how: str) -> float:
    if how == "mean":
        return float(values.mean())
    if how == "noisy_or":
        return float(1.0 - np.prod(1.0 - values))
    return float(values.max())


def map_channel(manifest: Manifest, shape: tuple[int, ...]) -> int | None:
    """Which channel of an explanation output of this shape (first axis: images) holds
    the positive label's map: None for (N, h, w), 0 for (N, 1, h, w), the positive
    label's index for (N, labels, h, w).  Anything else raises ModelError."""
    dec = manifest.decision
    name = manifest.explanation.output
    if len(shape) == 3 and min(shape[1:]) >= 1:
        return None
    if len(shape) == 4 and min(shape[2:]) >= 1 and shape[1] in (1, len(dec.labels)):
        return 0 if shape[1] == 1 else dec.labels.index(dec.positive_label)
    raise ModelError(
        f"explanation output {name!r} has shape {list(shape)}; expected [N, H, W], "
        f"[N, 1, H, W] or [N, {len(dec.labels)}, H, W] (one map per label)",
        code="output-mismatch",
        hint="export the map with one of these shapes, or use explanation.method = "
             "\"occlusion\" in the manifest")


def volume_map(manifest: Manifest, shape: tuple[int, ...]) -> int | None:
    """Which channel of a volume model's map output (N, [channels,] d, h, w) holds the
    positive label's map (None: no channel axis).  Anything else raises ModelError."""
    dec = manifest.decision
    if len(shape) == 4 and min(shape[1:]) >= 1:
        return None
    if len(shape) == 5 and min(shape[2:]) >= 1 and shape[1] in (1, len(dec.labels)):
        return 0 if shape[1] == 1 else dec.labels.index(dec.positive_label)
    raise ModelError(
        f"explanation output {manifest.explanation.output!r} has shape {list(shape)}; a "
        f"volume model's map must be [N, d, h, w], [N, 1, d, h, w] or "
        f"[N, {len(dec.labels)}, d, h, w]", code="output-mismatch",
        hint="export the map with one of these shapes, or use explanation.method = \"none\"")


def review(decision: Decision, p: float, uncertainty: float, positive: bool) -> tuple[str, ...]:
    reasons = []
    low, high = decision.review_band
    if low <= p <= high:
        reasons.append(vocabulary.REVIEW_BAND.format(p=p, low=low, high=high))
    if uncertainty > decision.max_uncertainty:
        reasons.append(vocabulary.REVIEW_UNCERTAIN.format(u=uncertainty,
                                                          limit=decision.max_uncertainty))
    if positive and decision.review_if_positive:
        reasons.append(vocabulary.REVIEW_POSITIVE)
    return tuple(reasons)


class InferenceEngine:
    def __init__(self, settings: InferenceSettings, audit: AuditFn | None = None) -> None:
        self._settings = settings
        self._audit = audit
        self._lock = threading.Lock()  # held by a study's inference and by the swap
        self._reload_lock = threading.Lock()  # one reload at a time
        self._registry = Registry(settings.models_dir, settings.state_dir,
                                  publisher_keys=load_public_keys(settings.publisher_keys),
                                  environment=settings.environment, audit=audit)
        self._drift = DriftMonitor(settings.state_dir, settings.drift_min_studies)
        self._models: list[_Loaded] = []
        warning = choose_providers(settings.providers).warning()
        if warning:  # said once per start; doctor says it too
            log.warning("%s", warning)
            safe_audit(audit, "model.provider_fallback", {"reason": warning[:300]})
        for pkg in self._registry.active_packages():
            try:
                loaded = self._load(pkg)
            except ModelError as exc:
                log.error("model %s %s not loaded: %s", pkg.name, pkg.version, exc)
                safe_audit(audit, "model.not_loaded", {"model": pkg.name, "version": pkg.version,
                                                       "reason": str(exc)})
                continue
            self._adopt(loaded)

    def _load(self, pkg: ModelPackage) -> _Loaded:
        """Open, check and warm one package's session (raises ModelError)."""
        pre = pkg.manifest.preprocessing
        spec = pkg.manifest.explanation
        session = ModelSession(pkg.model_path, input_name=pkg.manifest.input_name,
                               output_name=pkg.manifest.output_name,
                               threads=self._settings.threads,
                               extra_outputs=extra_outputs(pkg.manifest),
                               providers=self._settings.providers)
        grid = ((pkg.manifest.input.depth,) if pkg.manifest.input.kind == "volume" else ())
        try:
            session.check_input(pre.channels, *grid, *pre.resize)
            outs = session.warm_up(pre.channels, *grid, *pre.resize,
                                   timeout=self._settings.timeout_seconds)
            fetched = dict(zip(extra_outputs(pkg.manifest), outs[1:], strict=True))
            if spec.method == "cam":
                # a wrong map refuses the model now
                (volume_map if grid else map_channel)(pkg.manifest, fetched[spec.output].shape)
            if pkg.manifest.mask is not None:  # so does a mask of the wrong shape
                mask_channel(pkg.manifest, fetched[pkg.manifest.mask.output_name].shape)
        except ModelError:
            session.close()
            raise
        return _Loaded(pkg, session)

    def _adopt(self, loaded: _Loaded) -> None:
        pkg = loaded.package
        vocabulary.allow(manifest_words(pkg.manifest))  # before any result that names them
        self._models = [*self._models, loaded]  # a new list: active_models() reads unlocked
        self._drift.track(pkg.name, pkg.version, pkg.manifest.drift)
        safe_audit(self._audit, "model.loaded", {"model": pkg.name, "version": pkg.version,
                                                 "sha256": pkg.verification.sha256,
                                                 "verification": pkg.verification.status})

    def reload(self) -> list[dict[str, str]]:
        """Switch to the registry's current active set, atomically between studies.

        The new set is verified, policy-checked and warmed up first, outside the lock
        (a study in flight keeps running on the old set); only then are the lists
        swapped under the lock and the sessions no longer used closed.  Any package of
        the new set that fails keeps the old set running and raises ModelError saying
        why.  Unchanged packages (same name, version and hash) keep their session.
        """
        with self._reload_lock:
            current = {(m.package.name, m.package.version, m.package.verification.sha256): m
                       for m in self._models}
            fresh: list[_Loaded] = []
            keep: list[_Loaded] = []
            try:
                for name in self._registry.names():
                    version = self._registry.active_version(name)
                    if version is None:
                        continue
                    pkg = self._registry.package(name, version)
                    enforce(pkg, self._settings.environment, self._audit)
                    same = current.get((pkg.name, pkg.version, pkg.verification.sha256))
                    if same is not None:
                        keep.append(same)
                    else:
                        fresh.append(self._load(pkg))
            except ModelError as exc:
                for m in fresh:
                    m.session.close()
                first = str(exc).splitlines()[0]
                log.error("model reload failed, keeping the loaded models: %s", first)
                safe_audit(self._audit, "model.reload_failed", {"reason": first[:300]})
                raise ModelError(f"reload failed, the previous models stay loaded: {first}",
                                 hint=exc.hint) from None
            with self._lock:  # waits for the study in flight, if any
                old, self._models = self._models, keep  # readers see old or new, never half
                for m in fresh:
                    self._adopt(m)
            for m in old:
                if m not in keep:
                    m.session.close()
            models = self.active_models()
            safe_audit(self._audit, "model.reloaded", {
                "models": [f"{m['name']} {m['version']}" for m in models]})
            log.info("models reloaded: %s",
                     ", ".join(f"{m['name']} {m['version']}" for m in models) or "none")
            return models

    # -- public API ------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """The installed packages and active choices (deployments install and switch)."""
        return self._registry

    def active_models(self) -> list[dict[str, str]]:
        models = self._models  # one read: a concurrent reload swaps the whole list
        return [{"name": m.package.name, "version": m.package.version,
                 "sha256": m.package.verification.sha256,
                 "verification": m.package.verification.status} for m in models]

    def run_seconds(self) -> float:
        """Wall time spent inside onnxruntime by the loaded sessions (benchmarks)."""
        return sum(m.session.run_seconds for m in self._models)

    def images_run(self) -> int:
        """Images fed to the loaded models so far: forward passes, whatever they were for."""
        return sum(m.session.images_run for m in self._models)

    def manifest_of(self, name: str, version: str) -> Manifest | None:
        """The manifest of a loaded model version (the review stage reads its decision
        labels and acceptance thresholds)."""
        for m in self._models:
            if m.package.name == name and m.package.version == version:
                return m.manifest
        return None

    def drift_report(self) -> dict[str, object]:
        self._drift.flush()
        return self._drift.report()

    def close(self) -> None:
        with self._lock:
            for m in self._models:
                m.session.close()
            self._models = []
            self._drift.flush()

    def infer(self, study: DeidentifiedStudy) -> tuple[list[ModelOutput], list[ModelFailure]]:
        outputs: list[ModelOutput] = []
        failures: list[ModelFailure] = []
        with self._lock:
            for model in self._models:
                rule = model.manifest.applies_to
                selected = [(i, ds) for i, ds in enumerate(study.instances) if applies(rule, ds)]
                volume = model.manifest.input.kind == "volume"
                if volume:  # the largest applicable series, if it has enough slices
                    selected = next(iter(series_groups(selected)), [])
                    if not rule.min_images <= len(selected) <= rule.max_images:
                        continue
                elif sum(frame_count(ds) for _, ds in selected) < max(1, rule.min_images):
                    continue
                try:
                    run = self._run_volume if volume else self._run
                    outputs.append(run(model, selected, study.study_ref))
                except Exception as exc:  # noqa: BLE001 - a failing model fails this model only
                    what = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    # The result publishes the code (fixed vocabulary); the library's own
                    # text, which may quote anything, stays in the log and local audit.
                    failure = ModelFailure(
                        model.package.name, model.package.version,
                        exc.code if isinstance(exc, ModelError) else "model-error", what,
                        exc.transfer_syntax if isinstance(exc, ModelError) else "")
                    failures.append(failure)
                    log.warning("study %s: %s", study.study_ref[:12], failure)
                    safe_audit(self._audit, "model.failed", {
                        "model": model.package.name, "version": model.package.version,
                        "sha256": model.package.verification.sha256,
                        "study": study.study_ref, "reason": str(failure), "code": failure.code,
                        "error": type(exc).__name__})
        return outputs, failures

    # -- one model on one study ------------------------------------------------
    def _scores(self, model: _Loaded, batch: npt.NDArray[np.float32],
                deadline: float) -> tuple[npt.NDArray[np.float64], list[npt.NDArray[np.float32]],
                                          list[npt.NDArray[np.float32]]]:
        """Probabilities, raw score outputs and (a ``cam`` model) its maps, per run."""
        probs, raws, extras = self._scores_all(model, batch, deadline)
        m = model.manifest
        return probs, raws, extras.get(m.explanation.output, []) if m.explanation.method == \
            "cam" else []

    def _scores_all(self, model: _Loaded, batch: npt.NDArray[np.float32], deadline: float,
                    ) -> tuple[npt.NDArray[np.float64], list[npt.NDArray[np.float32]],
                               dict[str, list[npt.NDArray[np.float32]]]]:
        """Probabilities, raw score outputs and, per extra output (explanation map,
        mask), its arrays per run."""
        raws: list[npt.NDArray[np.float32]] = []
        names = model.extras
        extras: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in names}
        mask = model.manifest.mask
        step = run_batch(batch.shape[1:])
        for start in range(0, len(batch), step):
            outs = model.session.run_all(np.ascontiguousarray(batch[start : start + step]),
                                         deadline - time.monotonic())
            raws.append(outs[0])
            for name, extra in zip(names, outs[1:], strict=True):
                if len(extra) != len(outs[0]):  # a map per image, or it cannot be placed
                    what = ("mask" if mask is not None and name == mask.output_name
                            else "explanation")
                    raise ModelError(f"{what} output {name!r} has {len(extra)} maps for "
                                     f"{len(outs[0])} images (shape {list(extra.shape)})",
                                     code="output-mismatch")
                extras[name].append(extra)
        logits = np.concatenate(raws, axis=0)
        return activate(logits, model.manifest.decision.activation), raws, extras

    def _run(self, model: _Loaded, selected: Sequence[tuple[int, Dataset]],
             study_ref: str) -> ModelOutput:
        m = model.manifest
        dec = m.decision
        t_start = time.perf_counter()
        deadline = time.monotonic() + self._settings.timeout_seconds
        tensors: list[npt.NDArray[np.float32]] = []
        means: list[float] = []
        where: list[tuple[int, int, tuple[int, int]]] = []
        subgroup: dict[str, str] = {}
        decode_s = pre_s = 0.0
        images = iter_images(selected, m.attributes, m.applies_to.max_images)
        while True:
            t0 = time.perf_counter()
            img = next(images, None)
            t1 = time.perf_counter()
            decode_s += t1 - t0
            if img is None:
                break
            tensor, unit = preprocess(img, m.preprocessing)
            tensors.append(tensor)
            means.append(float(unit.mean()))
            where.append((img.instance, img.frame, (img.pixels.shape[0], img.pixels.shape[1])))
            if not subgroup:
                subgroup = {a: str(img.attrs.get(a, "unknown"))
                            for a in m.drift.instance_subgroups}
            pre_s += time.perf_counter() - t1
        if not tensors:
            raise ModelError("no decodable image among the applicable instances",
                             code="no-decodable-image")
        x = np.stack(tensors)
        n = len(x)

        t2 = time.perf_counter()
        tta = m.uncertainty == "tta_flip"
        views = [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]] if tta else [x]
        probs, raws, extras = self._scores_all(model, np.concatenate(views, axis=0), deadline)
        maps = extras.get(m.explanation.output, []) if m.explanation.method == "cam" else []
        probs = probs.reshape(len(views), n, -1)
        if probs.shape[-1] != len(dec.labels) and not (dec.activation == "sigmoid"
                                                       and probs.shape[-1] == 1):
            raise ModelError(f"model returned {probs.shape[-1]} outputs for "
                             f"{len(dec.labels)} labels", code="output-mismatch")
        pos = dec.labels.index(dec.positive_label) if probs.shape[-1] > 1 else 0
        per_image = probs.mean(axis=0)  # (n, labels): TTA-averaged
        p = aggregate(per_image[:, pos], dec.aggregation)
        if tta:
            uncertainty = float(np.std([aggregate(probs[v, :, pos], dec.aggregation)
                                        for v in range(len(views))]))
        else:
            q = min(max(p, 1e-12), 1 - 1e-12)
            uncertainty = float(-(q * math.log2(q) + (1 - q) * math.log2(1 - q)))
        labels = {label: round(aggregate(per_image[:, j], dec.aggregation), 6)
                  for j, label in enumerate(dec.labels) if j < per_image.shape[1]}
        if len(dec.labels) == 2 and dec.activation == "softmax":
            other = dec.labels[1 - dec.labels.index(dec.positive_label)]
            labels[other] = round(1.0 - p, 6)  # keep the pair consistent after aggregation
        labels[dec.positive_label] = round(p, 6)
        t3 = time.perf_counter()

        top = int(per_image[:, pos].argmax())
        # The map of the top image as the model saw it (the unflipped view comes first).
        top_map = _top_map(model.manifest, maps, top) if maps else None
        explanation = self._explain(model, x[top], float(probs[0, top, pos]), pos, where[top],
                                    selected, deadline, p, top_map)
        t4 = time.perf_counter()

        positive = p >= dec.threshold
        seg = None
        if m.mask is not None:
            seg = segment(m, extras[m.mask.output_name], top, where[top], positive)
            explanation = {**explanation, "mask": _mask_summary(seg, where[top][2])}
        reasons = review(dec, p, uncertainty, positive)
        digest = hashlib.sha256()
        for r in (*raws, *(a for runs in extras.values() for a in runs)):  # maps too
            digest.update(np.ascontiguousarray(r).data)  # same bytes as tobytes(), no copies
        out_hash = digest.hexdigest()
        self._drift.update(model.package.name, float(np.mean(means)), p, subgroup)
        result = ModelOutput(
            name=model.package.name,
            version=model.package.version,
            sha256=model.package.verification.sha256,
            labels=labels,
            finding=dec.positive_finding if positive else dec.negative_finding,
            confidence=round(p if positive else 1.0 - p, 6),
            uncertainty=round(uncertainty, 6),
            needs_review=bool(reasons),
            review_reasons=reasons,
            explanation=explanation,
            timings_ms={
                "decode": round(decode_s * 1000, 3),
                "preprocess": round(pre_s * 1000, 3),
                "inference": round((t3 - t2) * 1000, 3),
                "explanation": round((t4 - t3) * 1000, 3),
                "total": round((time.perf_counter() - t_start) * 1000, 3),
            },
            instances_used=len({w[0] for w in where}),
            sources=tuple(sorted({w[0] for w in where})),
            subgroup=tuple(sorted(subgroup.items())),
            mask=seg,
        )
        safe_audit(self._audit, "inference.done", {
            "model": result.name, "version": result.version, "sha256": result.sha256,
            "study": study_ref, "images": n,
            "input_sha256": hashlib.sha256(x.data).hexdigest(),  # x is C-contiguous: no copy
            "output_sha256": out_hash, "finding": result.finding,
            "needs_review": result.needs_review})
        return result

    def _run_volume(self, model: _Loaded, series: Sequence[tuple[int, Dataset]],
                    study_ref: str) -> ModelOutput:
        """One series as one model input: sorted and checked (agent/infer/volume.py), then
        resampled slice by slice into the model's grid (agent/infer/resample.py)."""
        m = model.manifest
        pre = m.preprocessing
        dec = m.decision
        t_start = time.perf_counter()
        deadline = time.monotonic() + self._settings.timeout_seconds
        plan = plan_volume([ds for _, ds in series], m.input.spacing_tolerance)
        subgroup: dict[str, str] = {}
        decode_s = 0.0

        def load(k: int) -> npt.NDArray[np.float32]:
            nonlocal decode_s
            index, ds = series[plan.order[k]]
            t0 = time.perf_counter()
            img = ImageInput(decode_frame(ds, 0, 1), extract_attributes(ds, m.attributes),
                             index, 0)
            decode_s += time.perf_counter() - t0
            if not subgroup:
                subgroup.update({a: str(img.attrs.get(a, "unknown"))
                                 for a in m.drift.instance_subgroups})
            if time.monotonic() > deadline:  # decoding a long series counts against the budget
                raise ModelTimeout(f"inference timed out after "
                                   f"{self._settings.timeout_seconds:.1f}s while assembling")
            return to_unit(img, pre)

        t1 = time.perf_counter()
        unit = assemble(plan.slices, m.input.depth, pre.resize, load)
        mean_unit = float(unit.mean())
        unit -= np.float32(pre.mean)  # in place: the grid is the only volume in memory
        unit /= np.float32(pre.std)
        x = np.broadcast_to(unit, (1, pre.channels, *unit.shape))
        x = np.ascontiguousarray(x)  # (1, C, D, H, W); a copy only for 3 channels
        t2 = time.perf_counter()
        probs, raws, maps = self._scores(model, x, deadline)
        if probs.shape[-1] != len(dec.labels) and not (dec.activation == "sigmoid"
                                                       and probs.shape[-1] == 1):
            raise ModelError(f"model returned {probs.shape[-1]} outputs for "
                             f"{len(dec.labels)} labels", code="output-mismatch")
        pos = dec.labels.index(dec.positive_label) if probs.shape[-1] > 1 else 0
        p = float(probs[0, pos])
        q = min(max(p, 1e-12), 1 - 1e-12)
        uncertainty = float(-(q * math.log2(q) + (1 - q) * math.log2(1 - q)))
        labels = {label: round(float(probs[0, j]), 6)
                  for j, label in enumerate(dec.labels) if j < probs.shape[1]}
        labels[dec.positive_label] = round(p, 6)
        t3 = time.perf_counter()
        explanation = self._explain_volume(model, plan, series, p,
                                           maps[0][0] if maps else None)
        t4 = time.perf_counter()

        positive = p >= dec.threshold
        reasons = review(dec, p, uncertainty, positive)
        digest = hashlib.sha256()
        for r in (*raws, *maps):
            digest.update(np.ascontiguousarray(r).data)
        self._drift.update(model.package.name, mean_unit, p, subgroup)
        result = ModelOutput(
            name=model.package.name, version=model.package.version,
            sha256=model.package.verification.sha256, labels=labels,
            finding=dec.positive_finding if positive else dec.negative_finding,
            confidence=round(p if positive else 1.0 - p, 6),
            uncertainty=round(uncertainty, 6), needs_review=bool(reasons),
            review_reasons=reasons, explanation=explanation,
            timings_ms={
                "decode": round(decode_s * 1000, 3),
                "preprocess": round((t2 - t1 - decode_s) * 1000, 3),
                "inference": round((t3 - t2) * 1000, 3),
                "explanation": round((t4 - t3) * 1000, 3),
                "total": round((time.perf_counter() - t_start) * 1000, 3),
            },
            instances_used=plan.slices,
            sources=tuple(sorted(i for i, _ in series)),
        )
        safe_audit(self._audit, "inference.done", {
            "model": result.name, "version": result.version, "sha256": result.sha256,
            "study": study_ref, "images": plan.slices, "grid": list(x.shape[2:]),
            "input_sha256": hashlib.sha256(x.data).hexdigest(),
            "output_sha256": digest.hexdigest(), "finding": result.finding,
            "needs_review": result.needs_review})
        return result

    def _explain_volume(self, model: _Loaded, plan: VolumePlan,
                        series: Sequence[tuple[int, Dataset]], p: float,
                        cam: npt.NDArray[np.float32] | None) -> dict[str, Any]:
        """The slice and region where the model's 3-D map peaks, on the original slice.

        The map's peak cell gives the grid slice, hence the nearest source slice along
        the normal; the box is drawn on that depth of the map as for a 2-D model."""
        spec = model.manifest.explanation
        depth = model.manifest.input.depth
        resize = model.manifest.preprocessing.resize
        info: dict[str, Any] = {"method": spec.method, "slices": plan.slices}
        if spec.method == "none" or cam is None:
            first = series[plan.order[0]]
            info.update(instance=first[0], frame=0, image_size=[plan.rows, plan.cols],
                        bbox=None, text=vocabulary.NO_EXPLANATION)
            return info
        grid_map = volume_map(model.manifest, (1, *cam.shape))
        m3 = cam if grid_map is None else cam[grid_map]
        kd = int(np.unravel_index(int(np.argmax(m3)), m3.shape)[0])
        k = min(depth - 1, int((kd + 0.5) * depth / m3.shape[0]))  # grid slice of that cell
        s = source_index(k, plan.slices, depth)
        instance, ds = series[plan.order[s]]
        info.update(instance=instance, frame=0, slice=s + 1,
                    image_size=[plan.rows, plan.cols])
        uid = ds.get("SOPInstanceUID")
        if uid:
            info["sop_instance_uid"] = str(uid)  # the de-identified (keyed) UID
        label = explained_label(model.manifest)
        where_txt = vocabulary.WHERE_IMAGE.format(image=instance + 1)
        sal = (cam_region(m3[kd], resize, keep_fraction=spec.keep_fraction)
               if p >= spec.min_score else Saliency(None, 0.0))
        if sal.bbox is None:
            info.update(bbox=None, text=vocabulary.CAM_NO_REGION.format(
                where=where_txt, label=label, score=p))
            return info
        x, y, w, h = to_image_box(sal.bbox, resize, (plan.rows, plan.cols))
        above = p >= model.manifest.decision.threshold
        template = vocabulary.CAM_REGION_ABOVE if above else vocabulary.CAM_REGION_BELOW
        info.update(bbox=[x, y, w, h], text=template.format(
            label=label, where=where_txt, x=x, y=y, w=w, h=h, score=p, drop=0.0))
        return info

    def _explain(self, model: _Loaded, tensor: npt.NDArray[np.float32], base: float, pos: int,
                 where: tuple[int, int, tuple[int, int]],
                 selected: Sequence[tuple[int, Dataset]], deadline: float,
                 study_p: float, top_map: npt.NDArray[np.float32] | None) -> dict[str, Any]:
        spec = model.manifest.explanation
        instance, frame, shape = where
        info: dict[str, Any] = {"method": spec.method, "instance": instance, "frame": frame,
                                "image_size": [shape[0], shape[1]]}
        uid = next((ds.get("SOPInstanceUID") for i, ds in selected if i == instance), None)
        if uid:
            info["sop_instance_uid"] = str(uid)  # the de-identified (keyed) UID
        if spec.method == "none":
            info.update(bbox=None, text=vocabulary.NO_EXPLANATION)
            return info

        def score(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return self._scores(model, batch, deadline)[0][:, pos]

        sal = saliency(model.manifest, tensor, base, score, top_map)
        label = explained_label(model.manifest)
        where_txt = (vocabulary.WHERE_FRAME.format(image=instance + 1, frame=frame + 1) if frame
                     else vocabulary.WHERE_IMAGE.format(image=instance + 1))
        cam = spec.method == "cam"
        if not cam:
            info["score_drop"] = round(sal.peak_drop, 4)
        if sal.bbox is None:
            template = vocabulary.CAM_NO_REGION if cam else vocabulary.NO_REGION
            info.update(bbox=None, text=template.format(where=where_txt, label=label, score=base))
            return info
        x, y, w, h = to_image_box(sal.bbox, model.manifest.preprocessing.resize, shape)
        above = study_p >= model.manifest.decision.threshold
        if cam:
            template = vocabulary.CAM_REGION_ABOVE if above else vocabulary.CAM_REGION_BELOW
        else:
            template = vocabulary.REGION_ABOVE if above else vocabulary.REGION_BELOW
        info.update(bbox=[x, y, w, h],
                    text=template.format(label=label, where=where_txt, x=x, y=y, w=w, h=h,
                                         score=base, drop=sal.peak_drop))
        return info


def segment(manifest: Manifest, runs: list[npt.NDArray[np.float32]], top: int,
            where: tuple[int, int, tuple[int, int]], positive: bool) -> SegMask | None:
    """The segment of the top image at that image's grid, for the SEG; None when the
    study is negative (a negative finding gets no SEG) or the mask is empty there.
    A mask output of the wrong shape raises ModelError (the model fails this study)."""
    spec = manifest.mask
    if spec is None or not runs:
        return None
    step = len(runs[0])
    run = runs[top // step]
    channel = mask_channel(manifest, run.shape)
    one: npt.NDArray[np.float32] = run[top % step]
    prob = one if channel is None else one[channel]
    instance, frame, shape = where
    if not positive:
        return None
    pixels = to_source(prob, shape, spec.threshold)
    if not pixels.any():
        return None
    bits = SegMask.pack(pixels)
    if len(bits) > MASK_MAX_BYTES:  # cannot happen for a real image: a bound, not a rule
        log.warning("model %s: mask of %d bytes not kept (limit %d)", manifest.name,
                    len(bits), MASK_MAX_BYTES)
        return None
    return SegMask(index=instance, frame=frame, rows=shape[0], cols=shape[1], bits=bits,
                   label=spec.label, category=spec.category, type=spec.type)


def _mask_summary(seg: SegMask | None, shape: tuple[int, int]) -> dict[str, Any]:
    """What the published result says about the mask: de-identified aggregates only
    (its pixels stay on the box, see docs/threat-model.md)."""
    pixels = int(seg.pixels().sum()) if seg is not None else 0
    return {"pixels": pixels, "area_fraction": round(pixels / max(1, shape[0] * shape[1]), 6)}


def _top_map(manifest: Manifest, maps: list[npt.NDArray[np.float32]],
             top: int) -> npt.NDArray[np.float32]:
    """The positive label's (h, w) map of image ``top`` from the per-run map outputs."""
    step = len(maps[0])
    run = maps[top // step]
    channel = map_channel(manifest, run.shape)  # a model may change shape with the batch
    one: npt.NDArray[np.float32] = run[top % step]
    return one if channel is None else one[channel]


def saliency(manifest: Manifest, tensor: npt.NDArray[np.float32], base: float,
             score: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]],
             top_map: npt.NDArray[np.float32] | None) -> Saliency:
    """The explanation region of one model-input image, by the manifest's method: its map
    (computed by the model in the run that scored it) or occlusion (``score`` runs the
    occluded copies).  Shared with training/localize.py, which measures it."""
    spec = manifest.explanation
    if spec.method == "cam":
        if top_map is None:  # cannot happen: the session fetches the map (checked at load)
            raise ModelError(f"explanation output {spec.output!r} was not fetched",
                             code="output-mismatch")
        if base < spec.min_score:
            return Saliency(None, 0.0)  # nothing suspicious for the map to point at
        return cam_region(top_map, manifest.preprocessing.resize,
                          keep_fraction=spec.keep_fraction)
    return occlusion(score, tensor, base, patch=spec.patch, stride=spec.stride,
                     keep_fraction=spec.keep_fraction, batch_size=run_batch(tensor.shape))
