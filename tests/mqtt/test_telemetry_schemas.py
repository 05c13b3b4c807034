"""One real daemon run, checked against the published contracts: status,
telemetry, result and audit messages validate against docs/schemas/; the
telemetry carries the security counters and flags a certificate that expires
within 30 days (also in the log); the local Prometheus endpoint serves the
same sample on loopback."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.identity.pki import issue
from agent.uplink import metrics
from tests.helpers import REPO, Box, Broker, Daemon, free_port, set_config, wait_for
from tests.helpers.dicom import make_instance, sample
from tests.helpers.mqtt import Collector, dev_ca, point_config_at, write_cert

SCHEMAS = REPO / "docs" / "schemas"


def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def send_study(port: int, n: int = 2) -> None:
    study, series = generate_uid(), generate_uid()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, sample().file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    try:
        for i in range(n):
            ds = make_instance("Canary^Telemetry", study, series, InstanceNumber=i + 1)
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def test_daemon_messages_match_schemas_and_telemetry_is_complete(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    now = datetime.now(UTC)
    k, c = issue(*dev_ca(box), "dev-site.dev-box", client=True, not_after=now + timedelta(days=10))
    cert, key = write_cert(tmp_path, "soon", k, c)
    point_config_at(box, cert=cert, key=key)
    prom = free_port()
    set_config(box, "telemetry", "interval_seconds", "1")
    set_config(box, "telemetry", "prometheus_port", str(prom))
    set_config(box, "study", "quiet_seconds", "1")

    ops = Collector(box).start()
    d = Daemon(box)
    d.start()
    try:
        send_study(box.dicom_port)
        ops_results = wait_for(lambda: ops.on("/results"), 90, "a result")
        tel = wait_for(lambda: [t for t in ops.on("/telemetry")
                                if t["data"]["pipeline"]["studies_processed"] >= 1], 30,
                       "telemetry after the study")[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{prom}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            prom_text = resp.read().decode()
    finally:
        assert d.stop() == 0
    wait_for(lambda: ops.on("/audit"), 20, "an audit checkpoint")
    wait_for(lambda: any(s["data"]["state"] == "offline" for s in ops.on("/status")), 20,
             "the offline status of a graceful stop")
    ops.stop()

    checks: dict[str, list[dict[str, Any]]] = {
        "status.schema.json": ops.on("/status"),
        "telemetry.schema.json": ops.on("/telemetry"),
        "result.schema.json": ops_results,
        "audit.schema.json": ops.on("/audit"),
    }
    for schema, messages in checks.items():
        v = validator(schema)
        assert messages, schema
        for m in messages:
            # The result schema (owned by inference) describes the CloudEvents data.
            v.validate(m["data"] if schema == "result.schema.json" else m)
    assert {s["data"]["state"] for s in ops.on("/status")} == {"online", "offline"}

    data = tel["data"]
    sec = data["security"]
    assert sec["cert_expiry_warning"] is True and sec["certs_expiring"] == ["mqtt_device"]
    assert 9 <= sec["cert_days_left"]["mqtt_device"] <= 10
    assert sec["certificates"]["mqtt_ca"]["warn"] is False
    assert sec["mqtt_connected"] is True and sec["egress_blocked"] == 0
    assert data["pipeline"]["instances_received"] == 2
    assert data["pipeline"]["latency_ms_p50"] is not None
    assert data["system"]["process"]["rss_bytes"] > 0 and data["interval_s"] == 1.0
    assert "certificate mqtt_device expires in" in d.log_text()

    assert 'edge_agent_security_cert_days_left{cert="mqtt_device"}' in prom_text
    assert "edge_agent_pipeline_instances_received 2" in prom_text
    assert "edge_agent_security_cert_expiry_warning 1" in prom_text


def test_metrics_render_and_loopback_only() -> None:
    sample = {"system": {"cpu_percent": 12.5, "load_avg": [0.1, 0.2, 0.3],
                         "temperatures_c": {'cpu"0': 51.0}},
              "security": {"cert_days_left": {"mqtt_device": 3.5}, "mqtt_last_error": "x",
                           "mqtt_connected": False},
              "models": [{"name": "lesion", "version": "1.0"}]}
    text = metrics.render(sample)
    assert "edge_agent_system_cpu_percent 12.5" in text
    assert 'edge_agent_system_load_avg{window="1"} 0.2' in text
    assert 'edge_agent_system_temperatures_c{sensor="cpu\\"0"} 51' in text
    assert "edge_agent_security_mqtt_connected 0" in text
    assert 'edge_agent_model_info{name="lesion",version="1.0"} 1' in text
    assert "mqtt_last_error" not in text
    s = metrics.MetricsServer(0)
    s.start()
    try:
        s.update(sample)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=5) as r:
            assert r.read().decode() == text
    finally:
        s.stop()
    try:
        metrics.MetricsServer(0, host="0.0.0.0")
    except Exception as exc:  # noqa: BLE001
        assert "loopback" in str(exc)
    else:
        raise AssertionError("a LAN bind must be refused")
