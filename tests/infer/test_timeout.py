"""A model that runs too long is terminated and fails the study, not the daemon."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.infer import InferenceEngine, InferenceSettings
from agent.infer.session import ModelSession, ModelTimeout
from tests.helpers.infer import NO_EXPLANATION, Events, PackageMaker, study
from training.synth import make_case


def slow_model() -> bytes:
    """Same interface as the demo model; loops sum(|x|) * 1e9 times.

    All-zero input (the warm-up) makes zero iterations; a real image makes
    trillions, i.e. it never finishes unless terminated.
    """
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    nodes = [
        helper.make_node("Abs", ["image"], ["abs"]),
        helper.make_node("ReduceSum", ["abs"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "zero"], ["v_final"], body=body),
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
        helper.make_node("Concat", ["flat", "flat"], ["pair"], axis=1),
        helper.make_node("Mul", ["v_final", "nothing"], ["zeroed"]),
        helper.make_node("Add", ["pair", "zeroed"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [1e9]),
         helper.make_tensor("true", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("nothing", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def test_session_run_is_terminated_at_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "slow.onnx"
    path.write_bytes(slow_model())
    session = ModelSession(path, input_name="image", output_name="logits", threads=1)
    session.warm_up(1, 64, 64, timeout=30.0)  # zero input: finishes at once
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            session.run(np.ones((1, 1, 64, 64), dtype=np.float32), timeout=0.2)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    # Liveness, not speed: without termination this run would take days.
    worker.join(120)
    assert not worker.is_alive(), "terminate flag did not stop the run"
    assert len(outcome) == 1 and isinstance(outcome[0], ModelTimeout)


def test_engine_reports_timeout_as_failure_and_goes_on(
        tmp_path: Path, make_package: PackageMaker, publisher: tuple[Path, Path],
        events: Events) -> None:
    models = tmp_path / "models"
    # The slow model computes no explanation map: its manifest says so.
    make_package("0.0.1", onnx=slow_model(), where=models / "lesion-demo" / "0.0.1",
                 edit=NO_EXPLANATION)
    engine = InferenceEngine(InferenceSettings(models, tmp_path / "state",
                                               environment="production",
                                               publisher_keys=(publisher[1],),
                                               timeout_seconds=0.3), audit=events)
    assert [m["version"] for m in engine.active_models()] == ["0.0.1"]
    outputs, failures = engine.infer(study([make_case(11, 0, kind="ct")]))
    assert outputs == []
    assert len(failures) == 1 and "lesion-demo 0.0.1 failed" in str(failures[0])
    assert "timed out" in str(failures[0]) and failures[0].code == "timeout"
    failed = events.named("model.failed")
    assert failed and failed[0]["error"] == "ModelTimeout" and failed[0]["study"] == "study-ref"
    # The engine stays usable after a timeout.
    assert engine.infer(study([make_case(11, 1, kind="ct")]))[1]
    engine.close()


@pytest.mark.parametrize("bad", ["labels"])
def test_model_with_wrong_outputs_fails_cleanly(
        bad: str, tmp_path: Path, make_package: PackageMaker, publisher: tuple[Path, Path],
        events: Events) -> None:
    models = tmp_path / "models"
    make_package("0.0.2", where=models / "lesion-demo" / "0.0.2",
                 edit=lambda t: t.replace('labels = ["no_lesion", "lesion"]',
                                          'labels = ["no_lesion", "lesion", "other"]'))
    engine = InferenceEngine(InferenceSettings(models, tmp_path / "state",
                                               environment="production",
                                               publisher_keys=(publisher[1],)), audit=events)
    outputs, failures = engine.infer(study([make_case(11, 2, kind="ct")]))
    assert outputs == [] and "2 outputs for 3 labels" in str(failures[0])
    assert failures[0].code == "output-mismatch"
    engine.close()
