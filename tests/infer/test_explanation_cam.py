"""Explanations the model provides (issue 19 item 2): the demo model computes its lesion
map in the same run as its score, so a study costs one forward pass per image for the
score, the uncertainty and the explanation; occlusion stays a manifest option for models
without a map, and a package whose map does not fit is refused at load."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from agent.infer import InferenceEngine, InferenceSettings, load_manifest
from tests.helpers import Box, Daemon, Subscriber, storescu
from tests.helpers.infer import (
    DEMO,
    DEV_PUB,
    NO_EXPLANATION,
    REPO,
    Events,
    study,
    with_explanation,
)
from training.synth import make_case, to_dataset

Box4 = tuple[int, int, int, int]
OCCLUSION = '[explanation]\nmethod = "occlusion"\npatch = 12\nstride = 4\nkeep_fraction = 0.5\n'


def overlap(a: Box4, b: Box4) -> int:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))


def entropy_bits(p: float) -> float:
    q = min(max(p, 1e-12), 1 - 1e-12)
    return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))


def engine_on(models: Path, state: Path, keys: tuple[Path, ...],
              events: Events | None = None) -> InferenceEngine:
    return InferenceEngine(InferenceSettings(models, state, environment="production",
                                             publisher_keys=keys), audit=events)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> InferenceEngine:
    eng = engine_on(REPO / "models", tmp_path_factory.mktemp("state"), (DEV_PUB,))
    assert [(m["name"], m["version"]) for m in eng.active_models()] == [("lesion-demo",
                                                                         DEMO.name)]
    return eng


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_daemon_result_explains_from_the_models_own_map(tmp_path: Path, box: Box,
                                                        daemon: Daemon, ops: Subscriber) -> None:
    case = make_case(4242, 2, kind="ct", scanner="B", noise="low", lesion=True)
    assert case.lesion_bbox is not None
    path = tmp_path / "lesion.dcm"
    to_dataset(case, study_seed="cam-e2e").save_as(path, enforce_file_format=True)
    proc = storescu(box.dicom_port, [path])
    assert proc.returncode == 0, proc.stderr

    data = ops.wait("results", 1, timeout=90)[0].json()["data"]
    [model] = data["models"]
    assert (model["name"], model["version"]) == ("lesion-demo", DEMO.name)
    ex = model["explanation"]
    assert ex["method"] == "cam" and ex["instance"] == 0
    assert overlap(tuple(ex["bbox"]), case.lesion_bbox) > 0, (ex, case.lesion_bbox)
    assert "model's own map" in ex["text"] and "score_drop" not in ex
    # The uncertainty is the entropy of the study probability, from the same pass.
    assert model["uncertainty"] == pytest.approx(entropy_bits(model["labels"]["lesion"]),
                                                 abs=1e-4)
    assert model["finding"] == "round lesion suspected"


@pytest.mark.parametrize("kind", ["ct", "radiograph"])
def test_one_forward_pass_per_image_scores_and_explains(shipped: InferenceEngine,
                                                        kind: str) -> None:
    cases = [make_case(4343, i, kind=kind, noise="high", lesion=(i == 1)) for i in range(3)]
    before = shipped.images_run()
    (out,), failures = shipped.infer(study(cases))
    assert failures == []
    # No flipped copies for the uncertainty, no occluded copies for the explanation.
    assert shipped.images_run() - before == len(cases)
    assert out.explanation["method"] == "cam" and out.explanation["instance"] == 1
    assert cases[1].lesion_bbox is not None
    assert overlap(tuple(out.explanation["bbox"]), cases[1].lesion_bbox) > 0
    assert out.uncertainty == pytest.approx(entropy_bits(out.labels["lesion"]), abs=1e-4)


def test_clean_study_gets_no_region(shipped: InferenceEngine) -> None:
    cases = [make_case(77, i, kind="ct", noise="low", lesion=False) for i in range(3)]
    (out,), _ = shipped.infer(study(cases))
    assert out.finding == "no lesion found"
    # Below min_score the map has nothing to point at: no box, and the text says so.
    assert out.labels["lesion"] < load_manifest(DEMO / "manifest.toml").explanation.min_score
    assert out.explanation["bbox"] is None
    assert "stands out in the model's map" in out.explanation["text"]


def test_occlusion_stays_a_manifest_option(tmp_path: Path, make_package: Callable[..., Path],
                                           publisher: tuple[Path, Path]) -> None:
    models = tmp_path / "models"
    (models / "lesion-demo").mkdir(parents=True)
    make_package("1.1.1", edit=with_explanation(OCCLUSION),
                 where=models / "lesion-demo" / "1.1.1")
    eng = engine_on(models, tmp_path / "state", (publisher[1],))
    cases = [make_case(4242, i, kind="ct", scanner="A", noise="low", lesion=(i == 2))
             for i in range(4)]
    (out,), failures = eng.infer(study(cases))
    assert failures == []
    ex = out.explanation
    assert ex["method"] == "occlusion" and ex["score_drop"] > 0.02
    assert cases[2].lesion_bbox is not None
    assert overlap(tuple(ex["bbox"]), cases[2].lesion_bbox) > 0
    # One pass per image, plus one per occluded patch (14 x 14 positions on 64x64).
    assert eng.images_run() - 1 == len(cases) + 14 * 14  # 1: the warm-up at load
    eng.close()


def test_no_explanation_costs_no_pass(tmp_path: Path, make_package: Callable[..., Path],
                                      publisher: tuple[Path, Path]) -> None:
    models = tmp_path / "models"
    (models / "lesion-demo").mkdir(parents=True)
    make_package("1.1.1", edit=NO_EXPLANATION,
                 where=models / "lesion-demo" / "1.1.1")
    eng = engine_on(models, tmp_path / "state", (publisher[1],))
    (out,), _ = eng.infer(study([make_case(5, 0, kind="ct", lesion=True)]))
    assert out.explanation["method"] == "none" and out.explanation["bbox"] is None
    assert eng.images_run() - 1 == 1
    eng.close()


def _with_graph_output(src: Path, name: str) -> bytes:
    """The demo graph with one of its intermediate tensors also declared as an output."""
    model = onnx.load(str(src))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None))
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(("output", "onnx_output", "expected"), [
    ("heatmap", None, "names output 'heatmap'"),  # not an output of the graph
    ("peak", "peak", "explanation output 'peak' has shape [1, 1]"),  # not a map
])
def test_a_map_that_does_not_fit_refuses_the_model_at_load(
        tmp_path: Path, make_package: Callable[..., Path], publisher: tuple[Path, Path],
        events: Events, output: str, onnx_output: str | None, expected: str) -> None:
    models = tmp_path / "models"
    (models / "lesion-demo").mkdir(parents=True)
    onnx_bytes = (_with_graph_output(DEMO / "model.onnx", onnx_output) if onnx_output
                  else None)
    make_package("1.1.1", onnx=onnx_bytes,
                 edit=lambda t: t.replace('output = "cam"', f'output = "{output}"'),
                 where=models / "lesion-demo" / "1.1.1")
    eng = engine_on(models, tmp_path / "state", (publisher[1],), events)
    assert eng.active_models() == []
    [refused] = events.named("model.not_loaded")
    assert expected in str(refused["reason"]), refused
    eng.close()
