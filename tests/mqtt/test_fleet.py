"""The central-ops fleet view: presence with since-when, stale detection
(online but silent for more than 3 telemetry intervals), health and alerts
from telemetry, the CLI's --once --json, and MQTT 5 shared subscriptions
splitting the load between two ops consumers."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from agent.uplink import cloudevents
from fleet.settings import load_ops
from fleet.view import FleetView
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config, wait_for
from tests.helpers.mqtt import harness

T0 = 1_800_000_000.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


SOURCE = "edge-agent/st-a/ct-1"


def status(state: str, since: float) -> dict[str, Any]:
    return cloudevents.envelope(kind="status", source=SOURCE, data={
        "state": state, "since": iso(since), "agent_version": "0.1.0",
        "models": [{"name": "lesion", "version": "1.0.0"}]})


def telemetry(interval: float = 10.0, **sec: Any) -> dict[str, Any]:
    security = {"cert_days_left": {"mqtt_device": 200.0}, "egress_blocked": 0,
                "broker_refusals": 0, **sec}
    return cloudevents.envelope(kind="telemetry", source=SOURCE, data={
        "interval_s": interval, "system": {"cpu_percent": 5.0, "memory_percent": 40.0,
                                           "disk_free_percent": 60.0},
        "pipeline": {"outbox_depth": 2, "outbox_oldest_age_s": 1.0},
        "security": security, "models": [], "drift": {}})


def view(box: Box, group: str | None = None, identity: str = "ops") -> FleetView:
    """The fleet view of ops.toml; another ops identity for a second consumer running at
    the same time (the broker gives each certificate one session)."""
    s = load_ops(box.root / "ops.toml").with_identity(box.pki / f"{identity}.pem",
                                                      box.pki / f"{identity}.key")
    return FleetView(s.with_share_group(group))


def row(v: FleetView, now: float, box: str = "st-a/ct-1") -> dict[str, Any]:
    return next(r for r in v.snapshot(now) if r["box"] == box)


def row_or_none(v: FleetView, box: str) -> dict[str, Any] | None:
    return next((r for r in v.snapshot() if r["box"] == box), None)


def test_presence_staleness_health_and_alerts(box: Box) -> None:
    v = view(box)
    v.watching_since = T0
    topic = "edge/st-a/ct-1/"
    v.fold(topic + "status", status("online", T0 - 3600), now=T0, retained=True)
    r = row(v, T0 + 5)
    assert r["state"] == "online" and r["since"] == iso(T0 - 3600) and r["last_seen"] is None
    # A retained "online" is history: silence is counted from when we started watching.
    v.fold(topic + "telemetry", telemetry(10.0), now=T0 + 10)
    r = row(v, T0 + 20)
    assert (r["state"], r["health"], r["alerts"]) == ("online", "ok", [])
    assert r["backlog"] == 2 and r["cert_days"] == 200.0
    r = row(v, T0 + 10 + 31)  # > 3 x 10 s of silence
    assert r["state"] == "stale" and r["health"] == "unknown"
    assert r["alerts"][0].startswith("stale: nothing for 31s")

    v.fold(topic + "telemetry", telemetry(10.0, egress_blocked=1, certs_expiring=["mqtt_device"],
                                          cert_days_left={"mqtt_device": 12.0}), now=T0 + 50)
    r = row(v, T0 + 51)
    assert r["health"] == "critical"
    assert "egress guard blocked 1 message(s)" in r["alerts"]
    assert "certificate expires in 12 d (mqtt_device)" in r["alerts"]

    v.fold(topic + "status", status("offline", T0 + 60), now=T0 + 60)
    r = row(v, T0 + 500)
    assert r["state"] == "offline" and r["since"] == iso(T0 + 60)
    assert r["alerts"][0] == f"offline since {iso(T0 + 60)}"
    # A late, older status does not resurrect the box.
    v.fold(topic + "status", status("online", T0 - 3600), now=T0 + 70, retained=True)
    assert row(v, T0 + 500)["state"] == "offline"
    # An empty retained status means decommissioned.
    v.forget(topic + "status")
    assert v.snapshot(T0) == []
    assert v.rejected == 0
    v.client.loop_stop()


def test_only_exact_topics_with_a_matching_source_are_folded(box: Box) -> None:
    v = view(box)
    good = status("online", T0)
    bad_source = {**good, "source": "edge-agent/st-a/ct-2"}
    wrong_type = {**telemetry(), "source": SOURCE}
    for topic, ev in (("edge/st-b/box-b/st-a/ct-1/status", good),  # nested in box-b's prefix
                      ("edge/st-a/ct-1/status/extra", good),
                      ("edge/st-a/ct-1", good),
                      ("other/st-a/ct-1/status", good),
                      ("edge/st.a/ct-1/status", good),
                      ("edge/st-a/ct-1/review", good),
                      ("edge/st-a/ct-1/status", bad_source),
                      ("edge/st-a/ct-1/status", wrong_type),
                      ("edge/st-a/ct-1/status", {**good, "data": {**good["data"],
                                                                  "device": "ct-2"}})):
        assert v.fold(topic, ev, now=T0) is False, topic
    # An empty retained message on a nested topic does not decommission anyone.
    assert v.fold("edge/st-a/ct-1/status", good, now=T0)
    v.forget("edge/st-b/box-b/st-a/ct-1/status")
    assert [r["box"] for r in v.snapshot(T0)] == ["st-a/ct-1"]
    assert v.rejected == 10
    report = "\n".join(v.rejection_report())
    assert report.startswith("rejected 10 message(s)")
    assert "'edge/st-a/ct-1/status': data.device 'ct-2' does not match the topic" in report
    # Topics come from the network: shown escaped, never as terminal control sequences.
    v.fold("edge/st-a/\x1b[2Jct-1/status", good, now=T0)
    assert "\x1b" not in "\n".join(v.rejection_report()) + v.table(T0)
    v.client.loop_stop()


def test_cli_once_json_shows_a_live_box_then_its_offline_status(box: Box,
                                                                broker: Broker) -> None:
    cmd = [*EDGE_AGENT, "fleet", "watch", "--config", str(box.root / "ops.toml"), "--once",
           "--json", "--wait", "1.5"]
    with harness(box) as h:
        assert h.publisher.wait_connected(15)
        ev = cloudevents.envelope(kind="telemetry", source="edge-agent/dev-site/dev-box",
                                  data=telemetry(5.0)["data"])
        h.outbox.enqueue("telemetry", ev["id"], cloudevents.encode(ev))
        wait_for(lambda: h.outbox.stats()["depth"] == 0, 10, "telemetry sent")
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [r["box"] for r in rows] == ["dev-site/dev-box"]
        assert rows[0]["state"] == "online" and rows[0]["since"]
    # harness exit = graceful stop: the retained status is now "offline".
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    r = json.loads(out.stdout)[0]
    assert r["state"] == "offline" and r["alerts"][0].startswith("offline since")


def test_shared_subscription_splits_telemetry_but_every_consumer_sees_presence(
        box: Box, broker: Broker) -> None:
    a, b = view(box, "ops"), view(box, "ops", identity="ops-sub")
    for v in (a, b):
        v.start()
        assert v.connected.wait(10), v.error
    try:
        time.sleep(0.5)  # both subscriptions in place before the box speaks
        with harness(box) as h:
            assert h.publisher.wait_connected(15)
            for i in range(40):
                ev = cloudevents.envelope(kind="telemetry", source="edge-agent/dev-site/dev-box",
                                          data={**telemetry()["data"], "seq": i})
                h.outbox.enqueue("telemetry", ev["id"], cloudevents.encode(ev))
            wait_for(lambda: h.outbox.stats()["depth"] == 0, 15, "40 telemetry sent")
            wait_for(lambda: a.messages + b.messages >= 42, 15, "42 messages (40 + 2 births)")
        time.sleep(0.3)
        # Each telemetry went to exactly one consumer; both saw the status.
        assert a.messages + b.messages == 40 + 2 + 2  # + both offline statuses
        assert a.messages > 2 and b.messages > 2
        assert {r["state"] for r in a.snapshot()} == {"offline"} == \
            {r["state"] for r in b.snapshot()}
    finally:
        a.stop()
        b.stop()



def test_a_real_daemons_audit_messages_are_folded_not_rejected(box: Box, broker: Broker,
                                                               ops: Subscriber) -> None:
    """The box publishes two kinds on its audit topic: signed checkpoints
    (org.edge-agent.audit.v1) and the pseudonymised events they cover
    (org.edge-agent.audit.events.v1). Both belong there; neither may be counted as
    a box writing outside its exact topics."""
    set_config(box, "audit", "checkpoint_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    v = view(box, identity="ops-sub")  # beside the plain ops subscriber
    v.start()
    assert v.connected.wait(10), v.error
    d = Daemon(box)
    try:
        d.start()
        kinds = lambda: {m.json()["type"] for m in ops.on("audit")}  # noqa: E731
        wait_for(lambda: {"org.edge-agent.audit.v1",
                          "org.edge-agent.audit.events.v1"} <= kinds(), 60,
                 "a checkpoint and its events from the daemon")
        r = wait_for(lambda: v.rejected or ((row_or_none(v, "dev-site/dev-box") or {})
                                            .get("audit_events_messages", 0) > 0
                                            and row_or_none(v, "dev-site/dev-box")),
                     15, "the view to take the audit messages")
    finally:
        d.stop()
        v.stop()
    assert v.rejected == 0, v.rejection_report()
    assert r["audit_checkpoint"] >= 0 and r["audit_checkpoint_time"]
