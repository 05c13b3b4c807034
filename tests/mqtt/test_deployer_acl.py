"""The deployer identity on the real broker with the dev ACL: it may write every box's
deployments topic (documents and package chunks) and read job states and presence,
and nothing else: not a verdict, not a result, not a box's status."""

from __future__ import annotations

from mqtt_helpers import mqtt_client, publish_acked
from support import Box, Broker


def test_deployer_writes_deployments_topics_only(box: Box, broker: Broker) -> None:
    c = mqtt_client(box, box.pki / "deployer.pem", box.pki / "deployer.key", "deployer")
    try:
        for topic in ("edge/dev-site/dev-box/deployments", "edge/other-site/box-9/deployments"):
            assert publish_acked(c, topic, b"{}") in (0, 0x10), topic
        for topic in ("edge/dev-site/dev-box/review", "edge/dev-site/dev-box/results",
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
