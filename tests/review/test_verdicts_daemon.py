"""Verdicts come back: the running daemon, the real mutual-TLS broker, the real CLI.

Three studies are processed by a model that flags every result.  Verdicts forged
with the box's own certificate or an ops certificate are refused by the broker
(MQTT 5 reason 0x87) and never reach the box; a verdict for an unknown result id is
refused by the box; the flagged results escalate after [review] escalate_after;
a verdict sent with the reviewer certificate through 'fleet review submit' is
accepted and audited under the reviewer's identity; the same verdict again is
ignored, a different one later refused (the first verdict wins); a local reviewer
lists (oldest first, with the explanation), shows and submits through the control
socket.  Every acknowledgement comes back in the box's telemetry, which matches
its schema.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import jsonschema

from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, audit_events, set_config, wait_for
from tests.helpers.mqtt import mqtt_client, publish_acked
from tests.helpers.review import (
    BOX,
    TOPIC,
    ReviewerClient,
    ack_of,
    cli,
    flagging_model,
    ops_config,
    send_studies,
    verdict,
)

NAMES = ["Verdict^Alpha", "Verdict^Bravo", "Verdict^Charlie"]


def _forged(box: Box, stem: str, cn: str, ev: dict[str, object]) -> int:
    """``ev`` with certificate ``stem`` on the review topic of its own CN and on the
    reviewer's: the broker's reason code when both agree."""
    c = mqtt_client(box, box.pki / f"{stem}.pem", box.pki / f"{stem}.key", f"forger-{stem}")
    try:
        codes = {publish_acked(c, f"{TOPIC}/review/{who}", json.dumps(ev).encode())
                 for who in (cn, "reviewer")}
        assert len(codes) == 1, codes
        return codes.pop()
    finally:
        c.loop_stop()
        c.disconnect()


def test_verdicts_from_reviewers_only_first_wins_audited_escalated(
        tmp_path: Path, box: Box, ops: Subscriber) -> None:
    flagging_model(box, tmp_path)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    set_config(box, "review", "escalate_after", '"3s"')
    daemon = Daemon(box)
    daemon.start()
    reviewer = None
    try:
        # Central ops listens for flagged results before they come (they are not retained).
        listing = subprocess.Popen(
            [*EDGE_AGENT, "fleet", "review", "list", "--config", str(ops_config(box, "ops-2")),
             "--box", BOX, "--wait", "120", "--until", str(len(NAMES)), "--cache",
             str(tmp_path / "cache.json"), "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert listing.stderr is not None
        for line in listing.stderr:  # subscribed: the results to come will be seen
            if "listening" in line:
                break
        else:
            raise AssertionError(f"fleet review list never listened: {listing.stdout.read()}")
        send_studies(box.dicom_port, NAMES)
        results = [m.json() for m in ops.wait("results", len(NAMES), timeout=120)]
        for r in results:
            [m] = r["data"]["models"]
            assert m["needs_review"] and m["name"] == "lesion-demo"
            assert "subgroup" not in m  # quasi-identifiers stay on the box
        ids = [r["id"] for r in sorted(results, key=lambda r: r["time"])]

        # The same verdict from the box's own certificate and from an ops certificate:
        # refused by the broker. (Sent later by the reviewer it is accepted, not ignored
        # as a replay: the forged copies never reached the box.)
        v = verdict(ids[1], "agreed")
        assert _forged(box, "device", "dev-site.dev-box", v) == 0x87
        assert _forged(box, "ops-sub", "ops-sub", v) == 0x87

        # An unknown result id, from a real reviewer: refused by the box, acknowledged.
        reviewer = ReviewerClient(box)
        unknown = verdict(str(uuid.uuid4()))
        assert reviewer.send(unknown) == 0
        ack = ack_of(ops, unknown["id"])
        assert (ack["outcome"], ack["code"]) == ("refused", "unknown-result")

        # Nothing forged was applied: all three still wait; they escalate.
        listed = json.loads(cli("review", "list", "--config", str(box.config), "--json").stdout)
        assert [i["result_id"] for i in listed["items"]] == ids  # oldest first
        assert all(i["explanation"] and i["reasons"] for i in listed["items"])
        wait_for(lambda: any(t.json()["data"]["review"]["overdue"] == len(ids)
                             for t in ops.on("telemetry")), 60, "the escalation in telemetry")
        status = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
        assert status["review"]["overdue"] == len(ids)
        assert any("escalate_after" in w for w in status["warnings"])
        watch = json.loads(cli("fleet", "watch", "--config", str(ops_config(box, "ops-2")),
                               "--once", "--json", "--wait", "3").stdout)
        row = next(r for r in watch if r["box"] == BOX)
        assert row["review_overdue"] == len(ids)
        assert any(a.startswith("review:") for a in row["alerts"])

        # Central review: the flagged results as ops sees them, a verdict with the
        # reviewer certificate through the CLI.
        out_text, _err = listing.communicate(timeout=120)
        flagged = json.loads(out_text)
        assert [f["result_id"] for f in flagged] == ids
        assert all(f["models"][0]["explanation"] and f["models"][0]["reasons"] for f in flagged)
        out = cli("fleet", "review", "submit", "--config", str(ops_config(box, "ops-2")),
                  "--box", BOX, ids[0], "disagreed", "--label", "no_lesion",
                  "--note", "Seen on the prior study.", "--cache", str(tmp_path / "cache.json"),
                  "--json")
        sent = json.loads(out.stdout)
        assert sent["broker_reason"] == 0 and sent["ack"]["outcome"] == "accepted"
        left = json.loads(cli("fleet", "review", "list", "--config",
                              str(ops_config(box, "ops-2")), "--box", BOX, "--wait", "3",
                              "--cache", str(tmp_path / "cache.json"), "--json").stdout)
        # From the cache (results are not retained); the one just reviewed is gone.
        assert [f["result_id"] for f in left] == ids[1:]

        # The same verdict again is ignored; a different one later is refused.
        assert reviewer.send(v) == 0
        assert ack_of(ops, v["id"])["outcome"] == "accepted"
        assert reviewer.send(v) == 0
        wait_for(lambda: [a for a in _acks_of(ops, v["id"]) if a["outcome"] == "ignored"], 60,
                 "the replay acknowledged as ignored")
        later = verdict(ids[1], "disagreed")
        assert reviewer.send(later) == 0
        assert ack_of(ops, later["id"])["code"] == "already-reviewed"
        bad_box = verdict(ids[2])
        bad_box["data"]["box"] = "dev-site/other-box"
        assert reviewer.send(bad_box) == 0
        assert ack_of(ops, bad_box["id"])["code"] == "wrong-box"
        assert reviewer.send(b'{"not": "a verdict"}') == 0

        # The local reviewer: list shows the one left, show and submit.
        listed = json.loads(cli("review", "list", "--config", str(box.config), "--json").stdout)
        assert [i["result_id"] for i in listed["items"]] == [ids[2]]
        cli("review", "submit", ids[2], "indeterminate", "--config", str(box.config))
        shown = json.loads(cli("review", "show", ids[0], "--config", str(box.config),
                               "--json").stdout)
        [m] = shown["models"]
        assert m["verdict"]["verdict"] == "disagreed" and m["verdict"]["via"] == "mqtt"
        assert m["verdict"]["corrected_label"] == "no_lesion"
        # CT_small.dcm is a patient aged 000Y of sex O: captured coarse before de-identification.
        assert m["subgroup"] == {"Modality": "CT", "PatientAge": "0-17", "PatientSex": "O"}
        again = cli("review", "submit", ids[2], "agreed", "--config", str(box.config),
                    check=False)
        assert again.returncode != 0 and "already-reviewed" in again.stderr
        final = wait_for(lambda: [t.json()["data"]["review"] for t in ops.on("telemetry")
                                  if t.json()["data"]["review"]["waiting"] == 0], 60,
                         "an empty backlog")[-1]
        assert final["overdue"] == 0
    finally:
        if reviewer is not None:
            reviewer.close()
        assert daemon.stop() == 0

    # Audited with the reviewer's identity; refusals and the replay too.
    events = [e for e in audit_events(box, 2000) if e["event"].startswith("review.")]
    taken = [e for e in events if e["event"] == "review.verdict" and e["outcome"] == 0]
    assert sorted(e["details"]["result_id"] for e in taken) == sorted(ids)
    by_id = {e["details"]["result_id"]: e for e in taken}
    assert by_id[ids[0]]["user"] == "reviewer" and by_id[ids[0]]["details"]["via"] == "mqtt"
    assert by_id[ids[2]]["details"]["via"] == "local"
    refused = [e["details"].get("refused") or e["details"].get("ignored") for e in events
               if e["event"] == "review.verdict" and e["outcome"] != 0]
    for code in ("unknown-result", "duplicate", "already-reviewed", "wrong-box", "invalid"):
        assert code in refused, (code, refused)
    escalated = {e["details"]["result_id"] for e in events if e["event"] == "review.escalated"}
    assert escalated == set(ids)
    # The note stays on the box: not in any message, not in the audit record.
    for m in ops.messages:
        assert b"prior study" not in m.payload
    assert all("prior study" not in json.dumps(e) for e in events)
    schema = json.loads((REPO / "docs" / "schemas" / "telemetry.schema.json").read_text())
    for t in ops.on("telemetry"):
        jsonschema.validate(t.json(), schema)


def _acks_of(ops: Subscriber, verdict_id: str) -> list[dict[str, object]]:
    from tests.helpers.review import acks

    return [a for a in acks(ops) if a["verdict_id"] == verdict_id]
