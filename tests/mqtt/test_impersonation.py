"""One box must not pass for another on MQTT, against a real mosquitto started with the
config ``provision dev`` generates:

- box B, with its own certificate and inside its own ACL prefix, publishes retained
  messages on nested topics (``edge/dev-site/box-b/dev-site/dev-box/status``) and with a
  CloudEvents ``source`` naming another box; ``edge-agent fleet watch`` must not fold any of
  them into dev-box's row, and must say what it rejected;
- another valid certificate (the read-only ops one) connecting with the box's client id
  must not take the running daemon's session over;
- a '.' inside a site or device name makes the certificate name ``<site>.<device>``
  ambiguous: provisioning and config load refuse it with a fix."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.identity.pki import issue
from agent.uplink import cloudevents
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, set_config, wait_for
from tests.helpers.mqtt import daemon_mqtt, dev_ca, harness, mqtt_client, publish_acked, write_cert

ACCEPTED = (0x00, 0x10)  # success, and success with "no matching subscribers"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def add_box(box: Box, broker: Broker, site: str, device: str) -> tuple[Path, Path]:
    """A second box of the fleet: a certificate from the fleet CA with CN
    ``<site>.<device>`` and the usual one-prefix ACL entry (the broker is restarted to read
    it). Returns (cert, key)."""
    k, c = issue(*dev_ca(box), f"{site}.{device}", client=True)
    cert, key = write_cert(box.root / "fleet", f"{site}.{device}", k, c)
    acl = box.root / "mosquitto.acl"
    # The wide grant of earlier ACLs (and of sites that still use `pattern write
    # edge/+/%u/#`): the fleet view must hold even where the broker lets a box write
    # deeper topics under its own prefix.
    acl.write_text(acl.read_text()
                   + f"\nuser {site}.{device}\ntopic write edge/{site}/{device}/#\n")
    broker.stop()
    broker.start()
    return cert, key


def telemetry(**security: Any) -> dict[str, Any]:
    return {"interval_s": 5.0,
            "system": {"cpu_percent": 5.0, "memory_percent": 40.0, "disk_free_percent": 60.0},
            "pipeline": {"outbox_depth": 0, "outbox_oldest_age_s": 0.0},
            "security": {"cert_days_left": {"mqtt_device": 300.0}, "egress_blocked": 0,
                         "broker_refusals": 0, **security},
            "models": [], "drift": {}}


def status(site: str, device: str, state: str, since: float) -> dict[str, Any]:
    return {"state": state, "since": iso(since), "agent_version": "0.0.0", "site": site,
            "device": device, "models": []}


def fleet_watch(box: Box) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, "fleet", "watch", "--config", str(box.root / "ops.toml"),
                           "--once", "--json", "--wait", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_box_b_cannot_pass_for_dev_box_in_the_fleet_view(box: Box, broker: Broker) -> None:
    cert, key = add_box(box, broker, "dev-site", "box-b")
    future = time.time() + 3600  # newer than any real status: it would win
    as_dev_box = "edge-agent/dev-site/dev-box"
    forged_status = cloudevents.envelope(kind="status", source=as_dev_box,
                                         data=status("dev-site", "dev-box", "offline", future))
    forged_telemetry = cloudevents.envelope(kind="telemetry", source=as_dev_box,
                                            data=telemetry(egress_blocked=3, broker_refusals=2))
    # Every topic below is inside box B's own ACL prefix: the broker accepts them all.
    forged = {
        "edge/dev-site/box-b/dev-site/dev-box/status": forged_status,
        "edge/dev-site/box-b/dev-site/dev-box/telemetry": forged_telemetry,
        "edge/dev-site/box-b/dev-box/status": forged_status,
        "edge/dev-site/box-b/x/y/dev-site/dev-box/status": forged_status,
        "edge/dev-site/box-b/heartbeat": forged_status,
        # its own topic, but the envelope says it comes from dev-box
        "edge/dev-site/box-b/telemetry": forged_telemetry,
    }
    own_status = cloudevents.envelope(kind="status", source="edge-agent/dev-site/box-b",
                                      data=status("dev-site", "box-b", "online", time.time()))
    with harness(box) as h:  # the real dev-box: birth status online, healthy telemetry
        assert h.publisher.wait_connected(15), h.publisher.state.last_error
        ev = cloudevents.envelope(kind="telemetry", source=as_dev_box, data=telemetry())
        h.outbox.enqueue("telemetry", ev["id"], cloudevents.encode(ev))
        wait_for(lambda: h.outbox.stats()["depth"] == 0, 15, "dev-box telemetry sent")
        b = mqtt_client(box, cert, key, "dev-site.box-b")
        try:
            for topic, payload in forged.items():
                rc = publish_acked(b, topic, cloudevents.encode(payload), retain=True)
                assert rc in ACCEPTED, f"the broker refused {topic}: the test would prove nothing"
            assert publish_acked(b, "edge/dev-site/box-b/status", cloudevents.encode(own_status),
                                 retain=True) in ACCEPTED
        finally:
            b.disconnect()
            b.loop_stop()
        out = fleet_watch(box)
    assert out.returncode == 0, out.stderr
    rows = {r["box"]: r for r in json.loads(out.stdout)}
    dev = rows["dev-site/dev-box"]
    assert (dev["state"], dev["health"], dev["alerts"]) == ("online", "ok", [])
    assert dev["egress_blocked"] == 0 and dev["broker_refusals"] == 0
    assert set(rows) == {"dev-site/dev-box", "dev-site/box-b"}
    other = rows["dev-site/box-b"]
    assert other["state"] == "online" and other["egress_blocked"] == 0  # not the forged one
    # Ops are told what was rejected and why, topic by topic.
    assert f"rejected {len(forged)} message(s)" in out.stderr, out.stderr
    for topic in forged:
        assert f"'{topic}'" in out.stderr
    assert "source 'edge-agent/dev-site/dev-box' does not match the topic" in out.stderr


def test_the_ops_certificate_cannot_take_over_the_boxs_session(box: Box,
                                                               daemon: Daemon) -> None:
    first = wait_for(lambda: (m := daemon_mqtt(box))["connected"] and m["published"] >= 1 and m,
                     60, "the daemon connected and publishing")
    assert first["connects"] == 1
    intruder = mqtt_client(box, box.pki / "ops.pem", box.pki / "ops.key", "dev-site.dev-box")
    try:
        # The broker has handled the intruder's CONNECT (CONNACK received). A publish the
        # daemon gets acknowledged from now on went over a session that was live after it.
        seen = daemon_mqtt(box)["published"]
        wait_for(lambda: daemon_mqtt(box)["published"] > seen, 60,
                 "a publish of the daemon acknowledged after the intruder connected")
        after = daemon_mqtt(box)
        assert after["connected"] and after["connects"] == 1, after
        assert intruder.is_connected()  # and it was not the daemon that pushed it out either
    finally:
        intruder.disconnect()
        intruder.loop_stop()
    assert "session taken over" not in daemon.log_text().lower()


@pytest.mark.parametrize(("site", "device"), [("good", "dev.ok"), ("good.dev", "ok")])
def test_provision_init_refuses_a_dot_in_site_or_device(tmp_path: Path, site: str,
                                                        device: str) -> None:
    out = subprocess.run([*EDGE_AGENT, "provision", "init", "--device-id", device, "--site", site,
                          "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2, out.stdout
    what, value = ("--device-id", device) if "." in device else ("--site", site)
    assert f"{what} {value!r}" in out.stderr, out.stderr
    assert "'.'" in out.stderr and "'good.dev.ok'" in out.stderr  # why: the ambiguous CN
    assert "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()


def test_a_dot_in_the_configured_device_name_is_refused_at_start(box: Box) -> None:
    set_config(box, "box", "device", '"dev.ok"')
    out = subprocess.run([*EDGE_AGENT, "run", "--config", str(box.config)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2
    assert "[box.device] = 'dev.ok'" in out.stderr, out.stderr
    assert "'.'" in out.stderr and "'dev-site.dev.ok'" in out.stderr
    assert "'dev-ok'" in out.stderr  # how to fix it
    assert "Traceback" not in out.stderr
