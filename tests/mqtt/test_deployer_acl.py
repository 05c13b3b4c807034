"""The deployer identity on the real broker with the dev ACL: it may write every box's
deployments topic (documents and package chunks) and read job states and presence,
and nothing else: not a verdict, not a result, not a box's status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import EDGE_AGENT, REPO, Box, Broker
from tests.helpers.mqtt import mqtt_client, publish_acked


def test_deployer_writes_deployments_topics_only(box: Box, broker: Broker) -> None:
    c = mqtt_client(box, box.pki / "deployer.pem", box.pki / "deployer.key", "deployer")
    try:
        for topic in ("edge/dev-site/dev-box/deployments", "edge/other-site/box-9/deployments"):
            assert publish_acked(c, topic, b"{}") in (0, 0x10), topic
        for topic in ("edge/dev-site/dev-box/review", "edge/dev-site/dev-box/review/deployer",
                      "edge/dev-site/dev-box/results",
                      "edge/dev-site/dev-box/status", "edge/dev-site/dev-box/jobs",
                      "edge/dev-site/dev-box/deployments/extra"):
            assert publish_acked(c, topic, b"{}") == 0x87, topic
    finally:
        c.loop_stop()
        c.disconnect()
    # The read-only ops certificate still cannot write a deployment.
    ops = mqtt_client(box, box.pki / "ops-sub.pem", box.pki / "ops-sub.key", "ops-sub")
    try:
        assert publish_acked(ops, "edge/dev-site/dev-box/deployments", b"{}") == 0x87
    finally:
        ops.loop_stop()
        ops.disconnect()


def test_fleet_deploy_with_a_read_only_certificate_says_which_one_to_use(
        box: Box, broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "approver.key"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    spec = tmp_path / "release.json"
    spec.write_text(json.dumps({
        "id": "rel", "revision": 1, "target": {"site": "dev-site", "boxes": ["dev-box"]},
        "packages": [{"name": "lesion-demo", "version": "1.1.0"}],
        "rollout": {"canary": ["dev-box"], "soak_seconds": 1}}))
    models = REPO / "models"
    out = subprocess.run([*EDGE_AGENT, "fleet", "deploy", str(spec), "--config",
                          str(box.root / "ops.toml"), "--models", str(models),
                          "--sign", f"publisher={key}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "did not accept the document for dev-box" in out.stderr, out.stderr
    assert "deployer certificate" in out.stderr and "Traceback" not in out.stderr
