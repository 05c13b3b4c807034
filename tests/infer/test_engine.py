"""End to end through InferenceEngine on synthetic DICOM: findings, explanation
boxes on the planted lesion, review flags, no-applicable-model, drift suppression."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pydicom
import pytest
from pydicom.data import get_testdata_file

from agent.infer import InferenceEngine, InferenceSettings, load_manifest
from tests.helpers.infer import DEMO, DEV_PUB, REPO, Events, study, study_of
from training.synth import SCANNERS, make_case

Box = tuple[int, int, int, int]


def _overlap(a: Box, b: Box) -> int:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> InferenceEngine:
    state = tmp_path_factory.mktemp("state")
    eng = InferenceEngine(InferenceSettings(REPO / "models", state, environment="production",
                                            publisher_keys=(DEV_PUB,), drift_min_studies=3))
    assert [m["name"] for m in eng.active_models()] == ["lesion-demo"]
    return eng


POSITIVE = [(kind, scanner) for kind in ("ct", "radiograph") for scanner in SCANNERS]


@pytest.mark.parametrize(("kind", "scanner"), POSITIVE)
def test_explanation_box_covers_the_planted_lesion(engine: InferenceEngine, kind: str,
                                                   scanner: str) -> None:
    # A small series: the lesion is on the third image only.
    cases = [make_case(4242, i, kind=kind, scanner=scanner, noise="low", lesion=(i == 2))
             for i in range(4)]
    outputs, failures = engine.infer(study(cases))
    assert failures == []
    (out,) = outputs
    assert out.finding == "round lesion suspected"
    threshold = load_manifest(DEMO / "manifest.toml").decision.threshold
    assert out.labels["lesion"] >= threshold and abs(sum(out.labels.values()) - 1) < 1e-6
    assert out.needs_review and any("positive" in r for r in out.review_reasons)
    ex = out.explanation
    assert ex["method"] == "cam" and ex["instance"] == 2  # the model's own map
    assert cases[2].lesion_bbox is not None
    assert _overlap(tuple(ex["bbox"]), cases[2].lesion_bbox) > 0, (ex, cases[2].lesion_bbox)
    x, y, w, h = ex["bbox"]
    rows, cols = cases[2].stored.shape
    assert 0 <= x < x + w <= cols and 0 <= y < y + h <= rows
    assert out.instances_used == 4 and out.sha256 == engine.active_models()[0]["sha256"]
    assert set(out.timings_ms) >= {"decode", "preprocess", "inference", "explanation", "total"}


@pytest.mark.parametrize("kind", ["ct", "radiograph"])
def test_clean_study_is_negative(engine: InferenceEngine, kind: str) -> None:
    cases = [make_case(77, i, kind=kind, noise="low", lesion=False) for i in range(3)]
    (out,), failures = engine.infer(study(cases))
    assert failures == [] and out.finding == "no lesion found"
    assert out.confidence > 0.5
    # The demo's uncertainty is the entropy (bits) of the study probability, same pass.
    q = out.labels["lesion"]
    entropy = -(q * math.log2(q) + (1 - q) * math.log2(1 - q))
    assert out.uncertainty == pytest.approx(entropy, abs=1e-4)


def test_study_without_applicable_model_gets_nothing(engine: InferenceEngine) -> None:
    path = get_testdata_file("MR_small.dcm")
    assert path is not None
    assert engine.infer(study_of((pydicom.dcmread(path),))) == ([], [])


def test_result_payload_matches_schema(engine: InferenceEngine) -> None:
    from agent.pipeline import _model_json

    schema = json.loads((REPO / "docs/schemas/result.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    outputs, failures = engine.infer(study([make_case(5, 0, kind="ct", lesion=True)]))
    # What the pipeline publishes of it (box-local fields, sources and subgroup, left out).
    model = _model_json(outputs[0])
    data = {
        "study": {"ref": "s", "patient_ref": "p", "version": 1, "instances_received": 1,
                  "instances_processed": 1,
                  "quarantined": [{"instance": "k", "code": "too-large", "reason": "r"}]},
        "status": "ok", "deidentification": {"method": "m", "options": []},
        "models": [model], "failures": failures, "latency_ms": 12.5,
    }
    jsonschema.validate(json.loads(json.dumps(data)), schema)
    data["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_drift_report_is_suppressed_below_k(tmp_path: Path, events: Events) -> None:
    settings = InferenceSettings(REPO / "models", tmp_path / "state", environment="production",
                                 publisher_keys=(DEV_PUB,), drift_min_studies=3)
    eng = InferenceEngine(settings, audit=events)
    for i in range(2):
        eng.infer(study([make_case(9, i, kind="ct")], ref=f"s{i}"))
    assert eng.drift_report() == {"lesion-demo": {"studies": 2, "suppressed": True}}
    eng.close()

    # Aggregates survive a restart; the third study unlocks the report.
    eng = InferenceEngine(settings, audit=events)
    eng.infer(study([make_case(9, 2, kind="ct")], ref="s2"))
    report = eng.drift_report()["lesion-demo"]
    assert isinstance(report, dict) and report["studies"] == 3 and "suppressed" not in report
    assert {"psi_input", "psi_output", "output_distribution"} <= set(report)
    assert report["subgroups"] == {"Modality=CT": report["subgroups"]["Modality=CT"]}
    eng.infer(study([make_case(9, 3, kind="radiograph")], ref="s3"))
    groups = eng.drift_report()["lesion-demo"]["subgroups"]  # type: ignore[index]
    assert groups["Modality=DX"] == {"studies": 1, "suppressed": True}
    eng.close()

    # The state on disk holds counts only: no study reference, nothing per study.
    text = (tmp_path / "state" / "drift" / "lesion-demo.json").read_text()
    assert "s0" not in text and "study-ref" not in text
    assert set(json.loads(text)) == {"version", "studies", "input", "output", "subgroups"}
    done = events.named("inference.done")
    assert len(done) == 4 and all(len(str(d["input_sha256"])) == 64 for d in done)
