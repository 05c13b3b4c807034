"""A missing, unreadable or mismatched MQTT TLS file stops `edge-agent run` (exit 2)
with the config key that names it, the path and the fix, never "missing: None"; the
doctor's broker check says the same."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.helpers import EDGE_AGENT, REPO, Box


def run(box: Box) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, "run", "--config", str(box.config), "--burst"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("key,file", [("key", "device.key"), ("cert", "device.pem"),
                                      ("ca", "ca.pem")])
def test_a_missing_tls_file_names_its_config_key(box: Box, key: str, file: str) -> None:
    path = box.pki / file
    path.unlink()
    p = run(box)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out and "None" not in out, out
    assert f"[mqtt] {key} {path} does not exist" in p.stderr, p.stderr
    assert "fix:" in p.stderr


def test_a_key_that_does_not_match_the_certificate_is_named(box: Box) -> None:
    shutil.copy(box.pki / "ops.key", box.pki / "device.key")  # a valid key, another identity
    p = run(box)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out
    assert (f"[mqtt] key {box.pki / 'device.key'} does not match [mqtt] cert "
            f"{box.pki / 'device.pem'}") in p.stderr, p.stderr
    assert "fix:" in p.stderr


def test_doctor_broker_check_names_the_missing_key(box: Box) -> None:
    (box.pki / "device.key").unlink()
    p = subprocess.run([*EDGE_AGENT, "doctor", "--config", str(box.config), "--json",
                        "--broker-timeout", "2"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    rep = json.loads(p.stdout)
    broker = [c for c in rep["checks"] if c["name"] == "broker"][0]
    assert broker["status"] == "FAIL"
    assert f"[mqtt] key {box.pki / 'device.key'} does not exist" in broker["message"]
    assert "None" not in broker["message"]
