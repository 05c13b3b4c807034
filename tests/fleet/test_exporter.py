"""``edge-agent fleet exporter`` end to end: two real daemons publish through the dev
mosquitto (mutual TLS), two exporters split their telemetry and audit messages with an
MQTT 5 share group, and Debian's ``prometheus`` scrapes both and evaluates the shipped
rules; everything is read back through Prometheus' HTTP API. A plain ops subscriber on
the same broker is the ground truth of what the boxes published."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from agent.uplink import cloudevents
from fleet.exporter import FAMILIES
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config, storescu, wait_for
from tests.helpers.fleet import Exporter, Prometheus, add_box, ops_config, publish_as, tool

GROUP = "exporters"


def fast(b: Box) -> None:
    """Telemetry every second and a checkpoint a second after new audit records."""
    set_config(b.config, "telemetry", "interval_seconds", "1")
    set_config(b.config, "audit", "checkpoint_seconds", "1")


@pytest.fixture
def fleet(box: Box) -> Iterator[tuple[Box, Box, Broker]]:
    second = add_box(box, "box-2")  # before the broker reads the ACL
    for b in (box, second):
        fast(b)
    broker = Broker(box)
    broker.start()
    yield box, second, broker
    broker.stop()


def families_with_samples(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-z_:]+)[{ ]", text, flags=re.M)}


def test_prometheus_scrapes_two_exporters_that_split_two_daemons(
        tmp_path: Path, fleet: tuple[Box, Box, Broker]) -> None:
    box, second, _broker = fleet
    truth = Subscriber(box).start()  # ops: every message, no share group
    exporters = [Exporter(ops_config(box, ident), "--share-group", GROUP,
                          log=box.root / f"exporter-{ident}.log")
                 for ident in ("ops-sub", "ops-2")]
    prom = Prometheus(tmp_path / "prometheus", [e.target for e in exporters])
    # box-2 writes results back to a PACS (down): its delivery queue is served too.
    set_config(second.config, "results", "enabled", "true")
    with second.config.open("a") as fh:
        fh.write('\n[[results.destinations]]\nname = "pacs"\nae_title = "PACS"\n'
                 'host = "127.0.0.1"\nport = 9\n')
    daemons = [Daemon(box), Daemon(second)]
    try:
        for e in exporters:  # subscribed before any box speaks
            e.scrape_when("edge_agent_fleet_broker_connected 1")
        for d in daemons:
            d.start()
        ct = Path(get_testdata_file("CT_small.dcm"))
        sent = storescu(box.dicom_port, [ct])
        assert sent.returncode == 0, sent.stderr
        truth.wait("results", 1, timeout=120)

        # Presence, from both exporters (every exporter sees every retained status).
        up = 'edge_agent_up{device="%s"} == 1'
        for dev in ("dev-box", "box-2"):
            wait_for(lambda dev=dev: len(prom.query(up % dev)) == 2, 60,
                     f"{dev} online on both exporters")
        # The model version the box itself announced in its retained status (the active
        # demo version changes with releases; the exporter must label what the box runs).
        statuses = [m.json()["data"] for m in truth.on("status")
                    if m.topic.split("/")[-2] == "dev-box" and m.json()["data"]["state"] == "online"]
        assert statuses, "no online status from dev-box"
        version = next(m["version"] for m in statuses[-1]["models"] if m["name"] == "lesion-demo")
        # What the shipped rules and the dashboard read, for the box that did a study.
        want = {
            'edge_agent:up:max{device="dev-box"}': 1.0,
            f'count(edge_agent_model_info{{device="dev-box",model="lesion-demo",version="{version}"}})':
                2.0,
            'max(edge_agent_studies_processed_total{device="dev-box"})': 1.0,
        }
        for expr, value in want.items():
            wait_for(lambda expr=expr, value=value: [float(s["value"][1]) for s in
                                                     prom.query(expr)] == [value], 60, expr)
        for expr in ('edge_agent:certificate_days_left:min{device="dev-box",cert="mqtt_device"} > 300',
                     'edge_agent_study_latency_seconds{device="dev-box",quantile="0.95"} > 0',
                     'edge_agent:audit_checkpoint_timestamp_seconds:max{device="box-2"}',
                     'edge_agent_audit_security_events_total{device="dev-box",event="config.loaded"}',
                     'edge_agent_certificate_expiry_warning{device="box-2",cert="mqtt_device"} == 0'):
            wait_for(lambda expr=expr: prom.query(expr), 60, expr)

        # Every family the exporter defines is served from a real daemon's messages,
        # except drift PSI (a model shows it only after drift_min_studies studies).
        scraped = exporters[0].scrape() + exporters[1].scrape()
        served = families_with_samples(scraped)
        assert served == set(FAMILIES) - {"edge_agent_model_drift_psi"}, \
            set(FAMILIES) ^ served
        # With every family served (the study latency's quantiles included), each
        # exposition still passes promtool's linter.
        for e in exporters:
            check = subprocess.run([tool("promtool"), "check", "metrics"], input=e.scrape(),
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr

        for d in daemons:
            d.stop()  # graceful: the outbox drains, then the status says offline
        for dev in ("dev-box", "box-2"):
            wait_for(lambda dev=dev: prom.values('edge_agent:up:max', "device").get(dev) == 0.0,
                     60, f"{dev} offline in Prometheus")
        # The offline alert is pending (for: 5m) for both boxes, from real data.
        wait_for(lambda: {s["metric"]["device"] for s in prom.query(
            'ALERTS{alertname="EdgeAgentBoxOffline",alertstate="pending"}')}
            == {"dev-box", "box-2"}, 60, "EdgeAgentBoxOffline pending for both boxes")

        # The share group split the boxes' telemetry and audit messages: each exporter
        # took a part, together they took every message once.
        published = Counter((m.topic.split("/")[2], m.topic.split("/")[3])
                            for m in truth.messages if not m.retain)
        for channel in ("telemetry", "audit"):
            expr = f'edge_agent_messages_received_total{{channel="{channel}"}}'
            for dev in ("dev-box", "box-2"):
                assert published[(dev, channel)] > 2, published
                wait_for(lambda dev=dev, expr=expr, channel=channel: prom.values(
                    f"sum by (device) ({expr})", "device").get(dev) == published[(dev, channel)],
                    60, f"Prometheus to count every {channel} message of {dev} once")
            per_exporter = prom.values(f"sum by (instance) ({expr})", "instance")
            assert set(per_exporter) == {e.target for e in exporters}, per_exporter
            total = sum(published[(d, channel)] for d in ("dev-box", "box-2"))
            assert all(0 < n < total for n in per_exporter.values()), (channel, per_exporter)
        # Nothing a real box sends is rejected.
        assert prom.values("edge_agent_fleet_messages_rejected_total", "instance") == \
            {e.target: 0.0 for e in exporters}
    finally:
        for d in daemons:
            if d.proc is not None:
                d.stop()
        prom.stop()
        codes = [e.stop() for e in exporters]
        truth.stop()
    assert codes == [0, 0], "the exporters did not stop cleanly on SIGTERM"
    assert "Traceback" not in "".join(e.log.read_text() for e in exporters)


def test_exporter_cli_says_what_is_wrong(box: Box) -> None:
    base = [*EDGE_AGENT, "fleet", "exporter", "--config"]
    cases = [
        ([str(box.root / "nope.toml")], "file not found"),
        ([str(box.root / "ops.toml"), "--listen", "9464"], "must be host:port"),
        ([str(box.root / "ops.toml"), "--share-group", "a/#"], "share group 'a/#'"),
    ]
    with subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as held:
        assert held.stdout is not None
        port = re.search(r"port (\d+)", held.stdout.readline())
        assert port
        cases.append(([str(box.root / "ops.toml"), "--listen", f"127.0.0.1:{port.group(1)}"],
                      "cannot listen there"))
        for args, message in cases:
            out = subprocess.run([*base, *args], cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
            assert "Traceback" not in out.stderr
        held.terminate()


def test_promtool_accepts_what_the_exporter_serves(box: Box, broker: Broker) -> None:
    """The exposition of a live exporter (no box yet: only its own families) passes
    promtool's parser and linter."""
    e = Exporter(box.root / "ops.toml", log=box.root / "exporter.log")
    try:
        text = e.scrape_when("edge_agent_fleet_broker_connected 1")
    finally:
        assert e.stop() == 0
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_hostile_box_can_neither_inject_series_nor_flood_labels(box: Box) -> None:
    """box-evil has a valid certificate and writes only under its own prefix, but the
    names in its telemetry are its choice: a model name that closes the label and
    starts a series of another box, a control character, a lone surrogate, a 10 kB
    name, and 5,000 certificates. Prometheus must see one box's well-formed series,
    at most 32 per map, and the exporter says how many it dropped."""
    evil = add_box(box, "box-evil")
    broker = Broker(box)
    broker.start()
    e = Exporter(box.root / "ops.toml", log=box.root / "exporter.log")
    try:
        e.scrape_when("edge_agent_fleet_broker_connected 1")
        inject = 'x"} 1\nedge_agent_up{site="dev-site",device="dev-box"} 1\n#'
        src = "edge-agent/dev-site/box-evil"
        status = cloudevents.envelope(kind="status", source=src, data={
            "state": "online", "since": "2026-01-01T00:00:00Z", "agent_version": inject,
            "site": "dev-site", "device": "box-evil",
            "models": [{"name": inject, "version": "\x1b[2J\ud800", "sha256": "a" * 10_000}]})
        certs = {f"c{i}": {"days_left": 1.0, "not_after": "2030-01-01T00:00:00Z", "warn": True}
                 for i in range(5000)}
        telemetry = cloudevents.envelope(kind="telemetry", source=src, data={
            "interval_s": 1, "system": {}, "pipeline": {"outbox_depth": 1},
            "security": {"certificates": certs, "egress_blocked": 0},
            "models": [], "drift": {}, "liveness": {"stages": {inject: {"stuck": True}}}})
        topic = "edge/dev-site/box-evil/"
        publish_as(box, box.pki / "box-evil.pem", box.pki / "box-evil.key",
                   [(topic + "status", json.dumps(status).encode(), True),
                    (topic + "telemetry", json.dumps(telemetry).encode(), False)])
        text = e.scrape_when("edge_agent_outbox_depth{")
    finally:
        assert e.stop() == 0
        broker.stop()
    assert evil.info["mqtt"]["device"] == "box-evil"
    check = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    # Every sample of a box is box-evil's: nothing names dev-box.
    boxes = {m.group(1) for line in samples if (m := re.search(r'device="([^"]*)"', line))}
    assert boxes == {"box-evil"}, boxes
    assert sum(line.startswith("edge_agent_certificate_expiry_timestamp_seconds{")
               for line in samples) == 32
    assert "edge_agent_fleet_samples_dropped_total 4968" in samples
    assert all(len(line) < 1200 for line in samples)
    assert "\x1b" not in text and "\ud800" not in text


def test_exporter_waits_for_the_broker_and_says_why_it_is_not_connected(box: Box) -> None:
    """A service outlives a broker restart: before the broker is up it serves
    ``edge_agent_fleet_broker_connected 0`` and logs why in the box's words; then it
    connects on its own."""
    log = box.root / "exporter.log"
    e = Exporter(box.root / "ops.toml", log=log)
    broker = Broker(box)
    try:
        assert "edge_agent_fleet_broker_connected 0" in e.scrape()
        wait_for(lambda: "broker refused the TCP connection" in log.read_text(), 30,
                 "the exporter to say why it is not connected")
        broker.start()
        e.scrape_when("edge_agent_fleet_broker_connected 1", timeout=180)
        wait_for(lambda: "connected to the broker; subscribed to edge/+/+/status"
                 in log.read_text(), 30, "the exporter to log that it is connected")
    finally:
        assert e.stop() == 0
        broker.stop()
