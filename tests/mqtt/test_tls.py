"""Mutual TLS against a real mosquitto: the valid identity works; no
certificate, another CA, an expired certificate, a broker from another CA, a
broker certificate for another host and an expired broker certificate are all
refused, with a reason an operator can act on (probe, Publisher.state, log)."""

from __future__ import annotations

import dataclasses
import json
import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import config as cfgmod
from agent.errors import ConfigError
from agent.identity.pki import issue, load_cert, load_key
from agent.uplink import mqtt_tls
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, wait_for
from tests.helpers.mqtt import (
    alt_broker,
    daemon_mqtt,
    expired_device,
    harness,
    other_ca_device,
    point_config_at,
    write_cert,
)


def settings(box: Box) -> cfgmod.MqttSettings:
    return cfgmod.load(box.config).mqtt


def test_valid_certificate_connects_and_publishes_birth(box: Box, broker: Broker) -> None:
    ok, reason = mqtt_tls.probe(cfgmod.load(box.config))
    assert ok, reason
    with harness(box) as h:
        assert h.publisher.wait_connected(15), h.publisher.state.last_error
        ids = h.enqueue(3)
        wait_for(lambda: h.publisher.state.published >= 3, 15, "3 PUBACKs")
        assert h.outbox.stats()["depth"] == 0
        assert h.publisher.state.tls_failures == 0 and h.publisher.state.last_error is None
        assert len(ids) == 3


def test_no_client_certificate_is_refused(box: Box, broker: Broker) -> None:
    ctx = ssl.create_default_context(cafile=str(box.pki / "ca.pem"))  # CA only, no identity
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    acked: list[object] = []
    c.on_connect = lambda *a: acked.append(a[3])
    c.connect("localhost", box.mqtt_port)
    for _ in range(40):
        if c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
            break
    assert acked == [], "the broker must not accept a client without a certificate"
    reason = mqtt_tls.diagnose(ctx, "localhost", box.mqtt_port)
    assert reason == "broker requires a client certificate and got none"


def test_device_certificate_from_another_ca_is_refused(tmp_path: Path, box: Box,
                                                       broker: Broker) -> None:
    cert, key, _ca = other_ca_device(tmp_path)
    ok, reason = mqtt_tls.probe(dataclasses.replace(settings(box), cert=cert, key=key))
    assert not ok
    assert reason == "broker refused our client certificate: not issued by a CA it trusts"


def test_expired_device_certificate_is_refused(tmp_path: Path, box: Box, broker: Broker) -> None:
    cert, key = expired_device(box, tmp_path)
    ok, reason = mqtt_tls.probe(dataclasses.replace(settings(box), cert=cert, key=key))
    assert not ok
    assert reason.startswith("broker refused our client certificate: it has expired")
    assert "our device certificate expired on" in reason


def test_broker_signed_by_another_ca_is_refused(tmp_path: Path, box: Box,
                                                broker: Broker) -> None:
    _cert, _key, other_ca = other_ca_device(tmp_path)
    ok, reason = mqtt_tls.probe(dataclasses.replace(settings(box), ca=other_ca))
    assert not ok
    assert reason == "broker certificate is not issued by the pinned fleet CA"


def test_broker_certificate_for_another_host_is_refused(box: Box) -> None:
    b = alt_broker(box, "no-ip-san", dns=("localhost",), ips=())
    b.start()
    try:
        port = b.box.mqtt_port
        s = dataclasses.replace(settings(box), host="127.0.0.1", port=port)
        ok, reason = mqtt_tls.probe(s)
        assert not ok
        assert reason == "broker certificate does not name '127.0.0.1' (hostname mismatch)"
        # The same broker is fine when we verify the name its certificate carries.
        ok, reason = mqtt_tls.probe(dataclasses.replace(s, tls_server_name="localhost"))
        assert ok, reason
    finally:
        b.stop()


def test_expired_broker_certificate_is_refused(box: Box) -> None:
    b = alt_broker(box, "expired-broker", ips=("127.0.0.1",), expired=True)
    b.start()
    try:
        ok, reason = mqtt_tls.probe(dataclasses.replace(settings(box), port=b.box.mqtt_port))
        assert not ok
        assert reason == "broker certificate has expired"
    finally:
        b.stop()


def test_publisher_state_keeps_the_refusal_reason(tmp_path: Path, box: Box,
                                                  broker: Broker) -> None:
    cert, key = expired_device(box, tmp_path)
    point_config_at(box, cert=cert, key=key)
    with harness(box) as h:
        wait_for(lambda: h.publisher.state.tls_failures >= 1, 20, "a counted TLS failure")
        st = h.publisher.state.as_json()
        assert st["connected"] is False and st["connects"] == 0
        assert st["last_error"].startswith("broker refused our client certificate: it has expired")
        assert st["connect_failures"] >= 1 and st["last_error_at"] is not None


def test_daemon_log_shows_why_the_broker_refused(tmp_path: Path, box: Box,
                                                 broker: Broker) -> None:
    _c, _k, other_ca = other_ca_device(tmp_path)
    point_config_at(box, ca=other_ca)  # the broker is not signed by the CA we pin
    d = Daemon(box)
    d.start()
    try:
        wait_for(lambda: "not issued by the pinned fleet CA" in d.log_text(), 60,
                 "the refusal reason in the daemon log")
    finally:
        assert d.stop() == 0
    assert "mqtt localhost:" in d.log_text()


def test_unsafe_certificate_cn_is_refused_at_start(tmp_path: Path, box: Box) -> None:
    k, c = issue(load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem"),
                 "dev-site/other-box/#", client=True)
    cert, key = write_cert(tmp_path, "evil", k, c)
    point_config_at(box, cert=cert, key=key)
    with pytest.raises(ConfigError) as exc:
        mqtt_tls.check_identity(cfgmod.load(box.config))
    assert "is not a safe identity" in str(exc.value)
    assert "'dev-site/other-box/#'" in str(exc.value)


def test_unsafe_client_id_is_refused_at_start(box: Box) -> None:
    point_config_at(box, client_id="dev-site.dev-box/+")
    with pytest.raises(ConfigError) as exc:
        mqtt_tls.check_identity(cfgmod.load(box.config))
    assert "client_id" in str(exc.value)


def _crl(box: Box, out: Path, revoke: bool) -> Path:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key, ca = load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")
    now = datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(now - timedelta(minutes=1)).next_update(now + timedelta(days=7)))
    if revoke:
        broker_cert = load_cert(box.pki / "broker.pem")
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(broker_cert.serial_number)
            .revocation_date(now - timedelta(minutes=1)).build())
    crl = b.sign(ca_key, hashes.SHA256())
    path = out / f"crl-{revoke}.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def test_crl_refuses_a_revoked_broker(tmp_path: Path, box: Box, broker: Broker) -> None:
    s = settings(box)
    ok, reason = mqtt_tls.probe(dataclasses.replace(s, crl=_crl(box, tmp_path, revoke=False)))
    assert ok, reason
    ok, reason = mqtt_tls.probe(dataclasses.replace(s, crl=_crl(box, tmp_path, revoke=True)))
    assert not ok
    assert reason == "broker certificate is revoked (CRL)"


def test_doctor_does_not_take_over_the_running_daemons_session(box: Box,
                                                               daemon: Daemon) -> None:
    """The broker gives the box's certificate one session (client id = certificate name), so
    a probe with it would push the daemon off: doctor reports the daemon's own link."""
    wait_for(lambda: (m := daemon_mqtt(box))["connected"] and m["published"] >= 1, 60,
             "the daemon connected and publishing")
    out = subprocess.run([*EDGE_AGENT, "doctor", "--config", str(box.config), "--json",
                          "--broker-timeout", "5"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    broker_check = [c for c in json.loads(out.stdout)["checks"] if c["name"] == "broker"]
    assert broker_check[0]["status"] == "PASS", broker_check
    assert broker_check[0]["message"].startswith("the running daemon is connected to localhost:")
    # A publish acknowledged after doctor finished went over a session that outlived it.
    seen = daemon_mqtt(box)["published"]
    wait_for(lambda: daemon_mqtt(box)["published"] > seen, 60, "a later publish acknowledged")
    link = daemon_mqtt(box)
    assert link["connected"] and link["connects"] == 1, link


def test_probe_connects_as_the_certificate_name(box: Box, broker: Broker) -> None:
    """With no daemon running, doctor's probe is a real connect under the box's identity."""
    ok, reason = mqtt_tls.probe(cfgmod.load(box.config))
    assert ok, reason


def test_a_client_id_other_than_the_certificate_name_is_refused_at_start(box: Box) -> None:
    point_config_at(box, client_id="dev-site.something-else")
    with pytest.raises(ConfigError) as exc:
        mqtt_tls.check_identity(cfgmod.load(box.config))
    assert "differs from the device certificate's CN 'dev-site.dev-box'" in str(exc.value)
    assert "remove [mqtt] client_id" in str(exc.value)
