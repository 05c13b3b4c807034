"""A verdict's reviewer is the certificate that sent it, not the name it declares.

The running daemon, the real mutual-TLS broker with the dev box's ACL, two reviewer
certificates (CN ``reviewer`` and ``reviewer-2``).  Each reviewer may write only its
own review topic ``{box}/review/<CN>`` (the broker's MQTT user is the certificate
CN): reviewer A writing on B's topic is refused by the broker (MQTT 5 reason 0x87)
and never applied, and so is every other role on a topic of its own CN; a verdict
whose body names B but comes on A's topic is refused by the box and audited under
A's CN; verdicts on the senders' own topics (one through ``fleet review submit``
with B's certificate) are accepted and audited under the certificates' CNs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import Box, Daemon, Subscriber, audit_events, set_config
from tests.helpers.mqtt import mqtt_client, publish_acked
from tests.helpers.review import (
    BOX,
    ReviewerClient,
    ack_of,
    cli,
    flagging_model,
    ops_config,
    review_topic,
    send_studies,
    verdict,
)

A, B = "reviewer", "reviewer-2"


def _as(box: Box, stem: str, cn: str, ev: dict[str, object]) -> int:
    """Publish ``ev`` with the certificate ``stem`` on the review topic of its own CN."""
    c = mqtt_client(box, box.pki / f"{stem}.pem", box.pki / f"{stem}.key", f"forger-{stem}")
    try:
        return publish_acked(c, review_topic(cn), json.dumps(ev).encode())
    finally:
        c.loop_stop()
        c.disconnect()


def test_reviewer_identity_is_the_certificate_cn(tmp_path: Path, box: Box,
                                                 ops: Subscriber) -> None:
    flagging_model(box, tmp_path)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    daemon = Daemon(box)
    daemon.start()
    a = b = None
    try:
        send_studies(box.dicom_port, ["Identity^Alpha", "Identity^Bravo"])
        results = [m.json() for m in ops.wait("results", 2, timeout=120)]
        first, second = (r["id"] for r in sorted(results, key=lambda r: r["time"]))
        a, b = ReviewerClient(box, A), ReviewerClient(box, B)

        # A on B's topic, even with a body that names B: the broker refuses it.
        forged = verdict(first, "disagreed", reviewer=B)
        assert a.send(forged, as_cn=B) == 0x87
        # Other roles on a review topic of their own CN (what a `pattern write
        # .../review/%u` would have granted every certificate): refused too.
        for stem, cn in (("device", "dev-site.dev-box"), ("ops-sub", "ops-sub"),
                         ("deployer", "deployer")):
            assert _as(box, stem, cn, verdict(first, reviewer=cn)) == 0x87, stem

        # A on its own topic with a body that names B: the broker lets it through (A
        # may write there), the box refuses it; it is acknowledged and never applied.
        assert a.send(forged) == 0
        ack = ack_of(ops, forged["id"])
        assert (ack["outcome"], ack["code"]) == ("refused", "wrong-reviewer")

        # B's own verdict on the first result, through the CLI with B's certificate: it
        # is the first verdict there (nothing forged was applied), so it is accepted.
        out = cli("fleet", "review", "submit", "--config", str(ops_config(box, "ops-2")),
                  "--box", BOX, first, "agreed", "--cert", str(box.pki / f"{B}.pem"),
                  "--key", str(box.pki / f"{B}.key"), "--json")
        sent = json.loads(out.stdout)
        assert sent["broker_reason"] == 0 and sent["ack"]["outcome"] == "accepted", sent
        own = verdict(second, "agreed", reviewer=A)
        assert a.send(own) == 0
        assert ack_of(ops, own["id"])["outcome"] == "accepted"

        shown = {rid: json.loads(cli("review", "show", rid, "--config", str(box.config),
                                     "--json").stdout)["models"][0]["verdict"]
                 for rid in (first, second)}
        assert (shown[first]["reviewer"], shown[first]["verdict"]) == (B, "agreed")
        assert (shown[second]["reviewer"], shown[second]["verdict"]) == (A, "agreed")
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        assert daemon.stop() == 0

    verdict_events = [e for e in audit_events(box, 2000) if e["event"] == "review.verdict"]
    [refused] = [e for e in verdict_events if e["details"].get("refused") == "wrong-reviewer"]
    # Audited under the CN of the certificate that sent it, not the name it declared.
    assert refused["user"] == A and refused["details"]["reviewer"] == A
    assert refused["details"]["verdict_id"] == forged["id"]
    taken = {e["details"]["result_id"]: e for e in verdict_events if e["outcome"] == 0}
    assert set(taken) == {first, second}
    assert taken[first]["user"] == B and taken[second]["user"] == A
    assert all(e["details"]["via"] == "mqtt" for e in taken.values())
    # Ops certificates read everything but verdicts in transit.
    assert not [m.topic for m in ops.messages if "/review" in m.topic]
