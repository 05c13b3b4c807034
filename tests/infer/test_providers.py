"""[infer] providers: execution providers this onnxruntime lacks fall back to the CPU with
a warning in the log and in doctor; the results are the CPU's.  (No GPU here: an actual
CUDA or TensorRT session is not tested, docs/models.md says so.)"""

from __future__ import annotations

import json
import subprocess

import pytest

from agent import config
from agent.errors import ConfigError
from agent.infer.providers import CPU, choose
from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, set_config
from tests.infer.test_models_reload import send_study

GPU_FIRST = '["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]'


def test_missing_providers_are_dropped_and_the_cpu_kept_last() -> None:
    choice = choose(["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert choice.use == (CPU,)
    assert choice.missing == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    warning = choice.warning()
    assert warning and "CUDAExecutionProvider" in warning and "falling back" in warning
    assert choose([CPU]).warning() is None and choose([CPU]).use == (CPU,)


def test_provider_names_are_checked_in_the_config(box: Box) -> None:
    set_config(box, "infer", "providers", '["CUDA"]')
    with pytest.raises(ConfigError) as info:
        config.load(box.config)
    assert "[infer.providers]" in str(info.value)
    set_config(box, "infer", "providers", "[]")
    with pytest.raises(ConfigError):
        config.load(box.config)
    set_config(box, "infer", "providers", GPU_FIRST)
    assert config.load(box.config).infer.providers[1] == "CUDAExecutionProvider"


def test_daemon_falls_back_to_cpu_with_a_warning_and_doctor_says_so(
        box: Box, broker: object, ops: Subscriber) -> None:
    set_config(box, "infer", "providers", GPU_FIRST)
    set_config(box, "study", "quiet_seconds", "1")
    doctor = subprocess.run([*EDGE_AGENT, "doctor", "--config", str(box.config), "--json",
                             "--skip", "broker", "--skip", "daemon"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    checks = json.loads(doctor.stdout)["checks"]
    providers = [c for c in checks if c["name"] == "providers"]
    assert providers and providers[0]["status"] == "WARN", checks
    assert "CUDAExecutionProvider" in providers[0]["message"] and providers[0]["fix"]
    d = Daemon(box)
    d.start()
    try:
        send_study(box)
        ev = ops.wait("results", 1, timeout=120)[0].json()
    finally:
        d.stop()
    assert ev["data"]["status"] == "ok" and ev["data"]["models"][0]["name"] == "lesion-demo"
    log = d.log_text()
    assert "TensorrtExecutionProvider, CUDAExecutionProvider requested in [infer] providers " \
           "are not available" in log, log[-3000:]
