"""The model manifest: what a model applies to, how to feed it, how to read it.

The manifest is the signed part of a model package (the ONNX file is bound to
it by its sha256), so everything that changes a model's clinical behaviour —
preprocessing, threshold, review band, aggregation — lives here and is covered
by the publisher's signature.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.errors import ModelError
from agent.subgroups import PATIENT_ATTRIBUTES

Activation = Literal["softmax", "sigmoid", "none"]
Aggregation = Literal["max", "mean", "noisy_or"]
VoiMode = Literal["window", "dataset", "percentile"]
InputKind = Literal["image", "volume"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AppliesTo:
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]  # empty: any; a study without BodyPartExamined matches
    sop_classes: tuple[str, ...]  # empty: any
    min_images: int
    max_images: int  # larger studies are sampled evenly, bounding latency and memory


@dataclass(frozen=True)
class InputSpec:
    """``[input]``: what one model input is.  ``image``: one 2-D image (N, C, H, W), the
    study scored image by image.  ``volume``: one series as a 3-D grid (N, C, D, H, W):
    the slices sorted along their normal, spacing checked, resampled to ``depth`` slices
    of ``preprocessing.resize`` (agent/infer/volume.py, agent/infer/resample.py)."""

    kind: InputKind = "image"
    depth: int = 0  # volume: slices of the model's grid
    # volume: largest relative deviation of a slice gap from the series' median gap
    spacing_tolerance: float = 0.1


@dataclass(frozen=True)
class Preprocessing:
    rescale: bool
    voi: VoiMode
    windows: dict[str, tuple[float, float]]  # modality -> (center, width)
    percentile: tuple[float, float]
    invert_monochrome1: bool
    resize: tuple[int, int]  # rows, cols
    mean: float
    std: float
    channels: int


@dataclass(frozen=True)
class Decision:
    labels: tuple[str, ...]
    activation: Activation
    positive_label: str
    positive_finding: str
    negative_finding: str
    threshold: float
    review_band: tuple[float, float]
    max_uncertainty: float
    review_if_positive: bool
    aggregation: Aggregation


ExplanationMethod = Literal["cam", "occlusion", "none"]
EXPLANATION_METHODS: tuple[ExplanationMethod, ...] = ("cam", "occlusion", "none")
# Which [explanation] keys each method reads; any other key is a publisher's mistake.
_EXPLANATION_KEYS: dict[str, frozenset[str]] = {
    "cam": frozenset({"method", "output", "keep_fraction", "min_score"}),
    "occlusion": frozenset({"method", "patch", "stride", "keep_fraction"}),
    "none": frozenset({"method"}),
}


@dataclass(frozen=True)
class Explanation:
    method: ExplanationMethod
    output: str  # cam: the model output holding the map, computed in the same run ("" else)
    patch: int  # occlusion: square side in model-input pixels
    stride: int  # occlusion: step between squares
    keep_fraction: float  # saliency above this fraction of the peak forms the box
    min_score: float  # cam: below this top-image score the map points at nothing


Code = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)
# SNOMED CT, as in highdicom's examples: a lesion is a morphologically abnormal structure.
DEFAULT_CATEGORY: Code = ("49755003", "SCT", "Morphologically abnormal structure")
DEFAULT_TYPE: Code = ("52988006", "SCT", "Lesion")
_MASK_KEYS = frozenset({"output", "label", "threshold", "category", "type"})


@dataclass(frozen=True)
class MaskOutput:
    """A model that also outputs a segmentation mask (``[mask]`` in the manifest): a
    per-pixel probability map of the segment at the model's input grid, (N, 1, H, W)
    or (N, H, W).  The engine stretches the top image's map back to that image's grid
    and thresholds it (agent/infer/mask.py); the result link keeps it and the SEG
    writes it into the original study (agent/results/seg.py)."""

    output_name: str  # the ONNX output holding the mask
    label: str  # what the segment is, e.g. "lesion" (the SEG's Segment Label)
    threshold: float  # mask probability at or above this is inside the segment
    category: Code = DEFAULT_CATEGORY  # Segmented Property Category
    type: Code = DEFAULT_TYPE  # Segmented Property Type


@dataclass(frozen=True)
class DriftReference:
    input_edges: tuple[float, ...]
    input_reference: tuple[float, ...]
    output_edges: tuple[float, ...]
    output_reference: tuple[float, ...]
    subgroup_attributes: tuple[str, ...]

    @property
    def instance_subgroups(self) -> tuple[str, ...]:
        """The subgroup attributes read from the de-identified instance (the engine's and
        the drift monitor's): all but the patient characteristics, which the pipeline
        captures coarse before de-identification for the review store only."""
        return tuple(a for a in self.subgroup_attributes if a not in PATIENT_ATTRIBUTES)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str
    intended_use: str
    publisher: str
    model_file: str
    sha256: str
    input_name: str
    output_name: str
    applies_to: AppliesTo
    attributes: tuple[str, ...]  # the only dataset attributes model code may see
    preprocessing: Preprocessing
    decision: Decision
    uncertainty: Literal["tta_flip", "entropy"]
    explanation: Explanation
    drift: DriftReference
    mask: MaskOutput | None = None  # absent: no SEG for this model
    # [acceptance]: the least each metric may be, measured from reviewers' verdicts on
    # the box (agent/review/performance.py); absent: no threshold alerts for this model.
    acceptance: tuple[tuple[str, float], ...] = ()
    input: InputSpec = InputSpec()


class _Reader:
    """Collects every problem so a publisher fixes a manifest in one pass."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.problems: list[str] = []

    def table(self, key: str) -> dict[str, Any]:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.problems.append(f"[{key}] must be a table")
            return {}
        return value

    def get(self, tbl: dict[str, Any], where: str, key: str, kind: type,
            default: Any = None) -> Any:
        if key not in tbl:
            if default is None:
                self.problems.append(f"{where}.{key} is missing")
            return default
        value = tbl[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"{where}.{key} must be {kind.__name__}, got {value!r}")
            return default
        return value

    def strings(self, tbl: dict[str, Any], where: str, key: str) -> tuple[str, ...]:
        value = tbl.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.append(f"{where}.{key} must be a list of strings")
            return ()
        return tuple(value)

    def floats(self, tbl: dict[str, Any], where: str, key: str,
               n: int | None = None) -> tuple[float, ...]:
        value = tbl.get(key)
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if not ok or (n is not None and len(value) != n):  # type: ignore[arg-type]
            size = f" of {n}" if n is not None else ""
            self.problems.append(f"{where}.{key} must be a list{size} numbers")
            return tuple(0.0 for _ in range(n or 0))
        return tuple(float(v) for v in value)  # type: ignore[union-attr]

    def choice(self, tbl: dict[str, Any], where: str, key: str, allowed: tuple[str, ...],
               default: str | None = None) -> str:
        value = tbl.get(key, default)
        if value not in allowed:
            self.problems.append(f"{where}.{key} must be one of {list(allowed)}, got {value!r}")
            return allowed[0]
        return str(value)


def _pair(values: tuple[float, ...]) -> tuple[float, float]:
    return (values[0], values[1])


def _code(r: _Reader, tbl: dict[str, Any], key: str, default: Code) -> Code:
    """``mask.category`` / ``mask.type``: [code value, scheme, meaning] (PS3.3 coded
    entries: value up to 16 characters, meaning up to 64)."""
    if key not in tbl:
        return default
    value = tbl[key]
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, str) and v.strip() for v in value)):
        r.problems.append(f"mask.{key} must be [code value, coding scheme, meaning], e.g. "
                          f"{list(default)}, got {value!r}")
        return default
    if len(value[0]) > 16 or len(value[1]) > 16 or len(value[2]) > 64:
        r.problems.append(f"mask.{key}: code value and scheme at most 16 characters, "
                          f"meaning at most 64")
    return (str(value[0]), str(value[1]), str(value[2]))


def _mask(r: _Reader) -> MaskOutput | None:
    """``[mask]`` (optional): the model outputs a segmentation mask, written back as
    DICOM SEG to destinations whose kinds include "seg"."""
    if "mask" not in r.data:
        return None
    tbl = r.table("mask")
    for key in sorted(set(tbl) - _MASK_KEYS):
        r.problems.append(f"mask.{key} is not a known key ({', '.join(sorted(_MASK_KEYS))})")
    out = MaskOutput(output_name=r.get(tbl, "mask", "output", str, ""),
                     label=r.get(tbl, "mask", "label", str, ""),
                     threshold=r.get(tbl, "mask", "threshold", float, 0.5),
                     category=_code(r, tbl, "category", DEFAULT_CATEGORY),
                     type=_code(r, tbl, "type", DEFAULT_TYPE))
    if not out.output_name or not out.label:
        r.problems.append("[mask] needs output (the ONNX output name) and label")
    if len(out.label) > 64:
        r.problems.append("mask.label must be at most 64 characters (the SEG's Segment Label)")
    if not 0.0 < out.threshold < 1.0:
        r.problems.append("mask.threshold must be between 0 and 1")
    return out


def _input(r: _Reader) -> InputSpec:
    """``[input]`` (optional: absent means one 2-D image per run, as before it existed)."""
    if "input" not in r.data:
        return InputSpec()
    tbl = r.table("input")
    for key in sorted(set(tbl) - {"kind", "depth", "spacing_tolerance"}):
        r.problems.append(f"input.{key} is not a known key (kind, depth, spacing_tolerance)")
    kind = r.choice(tbl, "input", "kind", ("image", "volume"), "image")
    depth = r.get(tbl, "input", "depth", int, 0)
    tolerance = r.get(tbl, "input", "spacing_tolerance", float, 0.1)
    if kind == "volume" and not 2 <= depth <= 1024:
        r.problems.append(f"input.depth must be 2..1024 slices for kind 'volume', got {depth}")
    if kind == "image" and "depth" in tbl:
        r.problems.append("input.depth applies only to kind 'volume'")
    if not 0.0 < tolerance < 0.5:
        r.problems.append(f"input.spacing_tolerance must be in (0, 0.5), got {tolerance}")
    return InputSpec(kind=kind, depth=depth, spacing_tolerance=tolerance)  # type: ignore[arg-type]


def _explanation(r: _Reader, expl: dict[str, Any]) -> Explanation:
    """[explanation]: ``cam`` (a map the model computes in the same run, named by
    ``output``), ``occlusion`` (one extra pass per patch) or ``none``."""
    known = expl.get("method", "occlusion") in EXPLANATION_METHODS
    method = r.choice(expl, "explanation", "method", EXPLANATION_METHODS, "occlusion")
    if known:  # an unknown method already got its problem; its keys mean nothing
        for key in sorted(set(expl) - _EXPLANATION_KEYS[method]):
            users = [m for m, keys in _EXPLANATION_KEYS.items() if key in keys]
            r.problems.append(f"explanation.{key} does not apply to method {method!r}"
                              + (f" (only to {' / '.join(users)})" if users else ""))
    output = r.get(expl, "explanation", "output", str, "")
    if known and method == "cam" and not output:
        r.problems.append("explanation.output is missing: method 'cam' needs the name of "
                          "the model output that holds the map")
    keep = r.get(expl, "explanation", "keep_fraction", float, 0.5)
    if not 0.0 < keep <= 1.0:
        r.problems.append(f"explanation.keep_fraction must be in (0, 1], got {keep}")
    min_score = r.get(expl, "explanation", "min_score", float, 0.02)
    if not 0.0 <= min_score < 1.0:
        r.problems.append(f"explanation.min_score must be in [0, 1), got {min_score}")
    return Explanation(
        method=method,  # type: ignore[arg-type]
        output=output,
        patch=r.get(expl, "explanation", "patch", int, 16),
        stride=r.get(expl, "explanation", "stride", int, 8),
        keep_fraction=keep,
        min_score=min_score,
    )


def parse_manifest(raw: bytes, *, source: str = "manifest.toml") -> Manifest:
    """Parse and validate manifest bytes (the exact bytes the signature covers)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(
            f"{source}: not valid UTF-8 TOML ({exc})",
            hint="rebuild the package with training/sign.py; do not edit manifests by hand",
        ) from exc
    r = _Reader(data)
    if data.get("schema") != SCHEMA_VERSION:
        r.problems.append(f"schema must be {SCHEMA_VERSION}, got {data.get('schema')!r}")
    name = r.get(data, "", "name", str, "")
    version = r.get(data, "", "version", str, "")
    model = r.table("model")
    applies = r.table("applies_to")
    inputs = r.table("inputs")
    pre = r.table("preprocessing")
    dec = r.table("decision")
    expl = r.table("explanation")
    drift = r.table("drift")

    labels = r.strings(dec, "decision", "labels")
    positive = r.get(dec, "decision", "positive_label", str, "")
    if labels and positive not in labels:
        r.problems.append(f"decision.positive_label {positive!r} is not one of {list(labels)}")
    windows: dict[str, tuple[float, float]] = {}
    raw_windows = pre.get("windows", {})
    if isinstance(raw_windows, dict):
        for modality in raw_windows:
            cw = r.floats(raw_windows, "preprocessing.windows", modality, 2)
            if cw[1] <= 0:
                r.problems.append(f"preprocessing.windows.{modality} width must be > 0")
            windows[str(modality)] = (cw[0], cw[1])
    resize = r.floats(pre, "preprocessing", "resize", 2)
    band = r.floats(dec, "decision", "review_band", 2)
    attributes = r.strings(inputs, "inputs", "attributes")
    subgroups = r.strings(drift, "drift", "subgroup_attributes")
    for attr in subgroups:
        # Patient characteristics are captured before de-identification, coarse, for the
        # review store only (agent/subgroups.py): the model never sees them.
        if attr not in attributes and attr not in PATIENT_ATTRIBUTES:
            r.problems.append(f"drift.subgroup_attributes {attr!r} is not in inputs.attributes "
                              f"(nor one of {', '.join(PATIENT_ATTRIBUTES)})")
    sha = r.get(model, "model", "sha256", str, "")
    if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        r.problems.append("model.sha256 must be 64 lowercase hex digits")
    in_edges = r.floats(drift, "drift", "input_edges")
    in_ref = r.floats(drift, "drift", "input_reference")
    out_edges = r.floats(drift, "drift", "output_edges")
    out_ref = r.floats(drift, "drift", "output_reference")
    for edges, ref, what in ((in_edges, in_ref, "input"), (out_edges, out_ref, "output")):
        if len(edges) != len(ref) + 1:
            r.problems.append(f"drift.{what}_edges must have one more entry than {what}_reference")

    manifest = Manifest(
        name=name,
        version=version,
        description=r.get(data, "", "description", str, ""),
        intended_use=r.get(data, "", "intended_use", str, ""),
        publisher=r.get(data, "", "publisher", str, ""),
        model_file=r.get(model, "model", "file", str, "model.onnx"),
        sha256=sha,
        input_name=r.get(model, "model", "input", str, ""),
        output_name=r.get(model, "model", "output", str, ""),
        applies_to=AppliesTo(
            modalities=r.strings(applies, "applies_to", "modalities"),
            body_parts=tuple(b.upper() for b in r.strings(applies, "applies_to", "body_parts")),
            sop_classes=r.strings(applies, "applies_to", "sop_classes"),
            min_images=r.get(applies, "applies_to", "min_images", int, 1),
            max_images=r.get(applies, "applies_to", "max_images", int, 64),
        ),
        attributes=attributes,
        preprocessing=Preprocessing(
            rescale=r.get(pre, "preprocessing", "rescale", bool, True),
            voi=r.choice(pre, "preprocessing", "voi", ("window", "dataset", "percentile")),  # type: ignore[arg-type]
            windows=windows,
            percentile=_pair(r.floats(pre, "preprocessing", "percentile", 2))
            if "percentile" in pre else (1.0, 99.0),
            invert_monochrome1=r.get(pre, "preprocessing", "invert_monochrome1", bool, True),
            resize=(int(resize[0]), int(resize[1])),
            mean=r.get(pre, "preprocessing", "mean", float, 0.0),
            std=r.get(pre, "preprocessing", "std", float, 1.0),
            channels=r.get(pre, "preprocessing", "channels", int, 1),
        ),
        decision=Decision(
            labels=labels,
            activation=r.choice(dec, "decision", "activation", ("softmax", "sigmoid", "none")),  # type: ignore[arg-type]
            positive_label=positive,
            positive_finding=r.get(dec, "decision", "positive_finding", str, ""),
            negative_finding=r.get(dec, "decision", "negative_finding", str, ""),
            threshold=r.get(dec, "decision", "threshold", float, 0.5),
            review_band=(band[0], band[1]),
            max_uncertainty=r.get(dec, "decision", "max_uncertainty", float, 1.0),
            review_if_positive=r.get(dec, "decision", "review_if_positive", bool, False),
            aggregation=r.choice(dec, "decision", "aggregation",  # type: ignore[arg-type]
                                 ("max", "mean", "noisy_or"), "max"),
        ),
        uncertainty=r.choice(r.table("uncertainty"), "uncertainty", "method",  # type: ignore[arg-type]
                             ("tta_flip", "entropy"), "tta_flip"),
        explanation=_explanation(r, expl),
        drift=DriftReference(in_edges, in_ref, out_edges, out_ref, subgroups),
        mask=_mask(r),
        acceptance=_acceptance(r),
        input=_input(r),
    )
    p = manifest.preprocessing
    if p.channels not in (1, 3):
        r.problems.append("preprocessing.channels must be 1 or 3")
    if p.std <= 0:
        r.problems.append("preprocessing.std must be > 0")
    if min(p.resize) < 8:
        r.problems.append("preprocessing.resize must be at least 8x8")
    if not 0.0 <= manifest.decision.review_band[0] <= manifest.decision.review_band[1] <= 1.0:
        r.problems.append("decision.review_band must be [low, high] within 0..1")
    if manifest.applies_to.min_images < 1 or manifest.applies_to.max_images < 1:
        r.problems.append("applies_to.min_images and max_images must be >= 1")
    ex = manifest.explanation
    if ex.method == "cam" and ex.output in (manifest.output_name, manifest.input_name):
        r.problems.append(f"explanation.output {ex.output!r} must name the model output that "
                          f"holds the map, not the model's input or its score output")
    if manifest.input.kind == "volume":
        if ex.method == "occlusion":
            r.problems.append("explanation.method 'occlusion' is not available for volume "
                              "models: use 'cam' (a map over the grid) or 'none'")
        if manifest.uncertainty == "tta_flip":
            r.problems.append("uncertainty.method 'tta_flip' is not available for volume "
                              "models: use 'entropy'")
        if manifest.mask is not None:
            r.problems.append("[mask] (DICOM SEG) is not available for volume models")
    if manifest.mask is not None and manifest.mask.output_name in (manifest.output_name,
                                                                   manifest.input_name):
        r.problems.append(f"mask.output {manifest.mask.output_name!r} must name the model "
                          f"output that holds the mask, not the model's input or its score "
                          f"output")
    if ex.method == "occlusion" and min(ex.patch, ex.stride) < 1:
        r.problems.append("explanation.patch and explanation.stride must be >= 1")
    if ex.method == "occlusion" and ex.patch > min(p.resize):
        r.problems.append(f"explanation.patch {ex.patch} is larger than the model input "
                          f"{list(p.resize)}")
    if r.problems:
        lines = "\n".join(f"  - {p}" for p in r.problems)
        raise ModelError(
            f"{source}: {len(r.problems)} manifest problem(s):\n{lines}",
            hint="fix the manifest at its source, then re-sign it with training/sign.py",
        )
    return manifest


def load_manifest(path: Path) -> Manifest:
    return parse_manifest(path.read_bytes(), source=str(path))


ACCEPTANCE_METRICS = ("sensitivity", "specificity", "ppv", "npv", "agreement")


def _acceptance(r: _Reader) -> tuple[tuple[str, float], ...]:
    """[acceptance] metric = lowest acceptable value (0 < v <= 1), per metric."""
    if "acceptance" not in r.data:
        return ()
    tbl = r.table("acceptance")
    out: list[tuple[str, float]] = []
    for key, value in sorted(tbl.items()):
        if key not in ACCEPTANCE_METRICS:
            r.problems.append(f"acceptance.{key} is not a metric ({', '.join(ACCEPTANCE_METRICS)})")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            r.problems.append(f"acceptance.{key} must be a number in (0, 1]")
        else:
            out.append((str(key), float(value)))
    return tuple(out)
