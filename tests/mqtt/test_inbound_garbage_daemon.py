"""Garbage on the inbound topics, through the running daemon and the real broker.

The certificates that may write them (the reviewer's on ``review``, the deployer's on
``deployments``) send a payload that is not JSON, one that is JSON but not an object,
and one over the inbound size bound (agent/uplink/inbound.py).  For each the box
stays up, audits a refusal that says why, and reports it where it reports every
refusal of that channel: a verdict's acknowledgement in the telemetry, a deployment's
``refused`` job state on the jobs topic.  A valid message afterwards is still taken:
a verdict accepted, a signed deployment document downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agent.uplink.inbound import MAX_INBOUND_BYTES
from tests.helpers import REPO, Box, Daemon, Subscriber, audit_events, set_config, wait_for
from tests.helpers.deploy import Central, Keys, configure_box, make_package, release
from tests.helpers.review import (
    ReviewerClient,
    ack_of,
    acks,
    cli,
    flagging_model,
    send_studies,
    verdict,
)

pytestmark = pytest.mark.peer("mosquitto")

TOPIC = "edge/dev-site/dev-box"
GARBAGE = {
    "not JSON": b"\xff\xfe not json {",
    "JSON, not an object": b"[1, 2, 3]",
    "over the size bound": b"{" + b" " * MAX_INBOUND_BYTES + b"}",
}


def _refusals(acked: list[dict[str, object]]) -> list[object]:
    return [a["code"] for a in acked if a["verdict_id"] is None and a["outcome"] == "refused"]


def test_garbage_verdicts_are_refused_audited_acknowledged_and_the_box_goes_on(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    flagging_model(box, tmp_path)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    daemon = Daemon(box)
    daemon.start()
    reviewer = ReviewerClient(box)
    try:
        send_studies(box.dicom_port, ["Garbage^Verdict"])
        [result] = [m.json() for m in ops.wait("results", 1, timeout=120)]
        for payload in GARBAGE.values():
            assert reviewer.send(payload) == 0  # the broker takes it: the box must refuse
        wait_for(lambda: len(_refusals(acks(ops))) >= len(GARBAGE), 60,
                 "an acknowledgement of each refusal")
        assert _refusals(acks(ops)) == ["malformed", "malformed", "too-large"]
        assert daemon.proc is not None and daemon.proc.poll() is None
        status = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
        assert status["review"]["waiting"] == 1

        good = verdict(result["id"], "agreed")  # a valid verdict afterwards is taken
        assert reviewer.send(good) == 0
        assert ack_of(ops, good["id"])["outcome"] == "accepted"
    finally:
        reviewer.close()
        assert daemon.stop() == 0
    refused = [e for e in audit_events(box, 2000)
               if e["event"] == "review.verdict" and e["outcome"] != 0]
    assert [e["details"]["refused"] for e in refused] == ["malformed", "malformed", "too-large"]
    assert all(e["details"]["via"] == "mqtt" for e in refused)
    schema = json.loads((REPO / "docs" / "schemas" / "telemetry.schema.json").read_text())
    for t in ops.on("telemetry"):
        jsonschema.validate(t.json(), schema)


def test_garbage_deployment_messages_are_refused_audited_reported_and_the_box_goes_on(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    keys = Keys(tmp_path / "keys")
    catalog = tmp_path / "catalog"
    make_package(catalog, keys, "1.0.0")
    make_package(catalog, keys, "2.0.0")
    configure_box(box, keys, catalog)
    daemon = Daemon(box)
    daemon.start()
    central = Central(box)
    try:
        for payload in GARBAGE.values():
            central.publish_raw(f"{TOPIC}/deployments", payload)
        wait_for(lambda: len([d for d in central.states("dev-box")
                              if d.get("state") == "refused"]) >= len(GARBAGE), 60,
                 "a refused job state for each")
        refused = [d for d in central.states("dev-box") if d.get("state") == "refused"]
        assert [d["reason"] for d in refused] == ["malformed", "malformed", "too_large"]
        assert all(d["deployment"] == "unknown" for d in refused)
        assert daemon.proc is not None and daemon.proc.poll() is None

        # A valid, signed document afterwards: taken, and the download starts.
        rel = release(tmp_path, keys, catalog, "rel-after-garbage", 1, "2.0.0", soak=1,
                      chunk_size=65536)
        central.publish(f"{TOPIC}/deployments", "deployment", rel.signed)
        central.wait_state("dev-box", "downloading", 1, timeout=60)
    finally:
        central.stop()
        assert daemon.stop() == 0
    events = [e for e in audit_events(box, 2000) if e["event"] == "deploy.refused"]
    assert [e["details"]["reason"] for e in events] == ["malformed", "malformed", "too_large"]
    schema = json.loads((REPO / "docs" / "schemas" / "job.schema.json").read_text())
    jobs = ops.on("jobs")
    assert jobs
    for m in jobs:
        jsonschema.validate(m.json(), schema)
