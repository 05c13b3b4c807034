"""`edge-agent doctor` against real boxes: a healthy running box, a dead broker, loose
permissions, a busy port, an expiring certificate, a broken config, and a production
identity (provision init + rotate-cert) doing a real mTLS handshake with the broker."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from agent.identity.pki import issue, load_cert, load_key, write_pair
from tests.helpers import Box, Broker, Daemon, set_config
from tests.helpers.ops import cli, sign_csr


def doctor(config: Path, *extra: str) -> tuple[int, dict[str, object]]:
    p = cli("doctor", "--config", str(config), "--json", "--broker-timeout", "5", *extra)
    return p.returncode, dict(json.loads(p.stdout))


def by_name(rep: dict[str, object], name: str) -> list[dict[str, str]]:
    return [c for c in rep["checks"] if c["name"] == name]  # type: ignore[union-attr]


def test_healthy_running_box_passes_everything(box: Box, daemon: Daemon) -> None:
    rc, rep = doctor(box.config)
    bad = [c for c in rep["checks"] if c["status"] != "PASS"]  # type: ignore[union-attr]
    assert rc == 0 and not bad, bad
    names = {c["name"] for c in rep["checks"]}  # type: ignore[union-attr]
    assert names >= {"config", "keys", "permissions", "certificate", "clock", "dicom-port",
                     "broker", "models", "disk", "spool", "audit", "daemon"}
    assert "mutual TLS" in by_name(rep, "broker")[0]["message"]
    assert "running edge-agent" in by_name(rep, "dicom-port")[0]["message"]
    text = cli("doctor", "--config", str(box.config), "--broker-timeout", "5")
    assert text.returncode == 0 and "FAIL" not in text.stdout


def test_dead_broker_fails_with_a_fix_and_other_checks_still_run(box: Box) -> None:
    rc, rep = doctor(box.config)
    assert rc == 2 and rep["worst"] == "FAIL"
    broker = by_name(rep, "broker")[0]
    assert broker["status"] == "FAIL" and "refused" in broker["message"] and broker["fix"]
    assert by_name(rep, "certificate")[0]["status"] == "PASS"
    assert by_name(rep, "models")[0]["status"] == "PASS"


def test_warnings_only_exit_1(box: Box, broker: Broker) -> None:
    # a certificate 10 days from expiry from the same CA: WARN, and no daemon: WARN
    ca_key, ca = load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")
    k, c = issue(ca_key, ca, "dev-site.dev-box", client=True, days=10)
    write_pair(box.pki, "device", k, c)
    rc, rep = doctor(box.config)
    assert rc == 1 and rep["worst"] == "WARN", rep
    cert = by_name(rep, "certificate")[0]
    assert cert["status"] == "WARN" and "10 days left" in cert["message"]
    assert "rotate-cert" in cert["fix"]


def test_loose_key_permissions_and_busy_port_fail(box: Box) -> None:
    kek = box.root / "keys" / "kek.key"
    kek.chmod(0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", box.dicom_port))
        s.listen(1)
        rc, rep = doctor(box.config, "--skip", "broker")
    assert rc == 2
    perm = [c for c in by_name(rep, "permissions") if c["status"] == "FAIL"]
    assert perm and "chmod 600" in perm[0]["fix"]
    port = by_name(rep, "dicom-port")[0]
    assert port["status"] == "FAIL" and "another program" in port["message"]
    assert not by_name(rep, "broker")


def test_invalid_config_lists_every_problem(box: Box) -> None:
    set_config(box, "dicom", "port", "0")
    set_config(box, "mqtt", "keepalive", '"often"')
    rc, rep = doctor(box.config)
    assert rc == 2
    msgs = " ".join(c["message"] for c in by_name(rep, "config"))
    assert "[dicom.port]" in msgs and "[mqtt.keepalive]" in msgs


def test_production_identity_connects_then_rotates(tmp_path: Path, box: Box,
                                                   broker: Broker) -> None:
    """provision init with the broker's fleet CA, then rotate: both identities do a real
    mutual-TLS MQTT handshake (the broker's ACL user is the certificate CN)."""
    ca_key, ca = load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")
    p = cli("provision", "init", "--device-id", "dev-box", "--site", "dev-site", "--state-dir",
            str(tmp_path / "prod"), "--mqtt-host", "localhost", "--mqtt-port", str(box.mqtt_port),
            "--control-socket", str(tmp_path / "c.sock"), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    conf = out["config"]
    cert = sign_csr(Path(out["csr"]), ca_key, ca, tmp_path / "d1.pem")
    assert cli("provision", "install-cert", "--cert", str(cert), "--ca", str(box.pki / "ca.pem"),
               "--config", conf).returncode == 0
    only = ["--skip", "dicom-port", "--skip", "models", "--skip", "daemon"]
    rc, rep = doctor(Path(conf), *only)
    assert by_name(rep, "broker")[0]["status"] == "PASS", rep
    assert by_name(rep, "certificate")[0]["status"] == "PASS"

    assert cli("provision", "rotate-cert", "--config", conf).returncode == 0
    pending = tmp_path / "prod" / "pki" / "pending" / "device.csr"
    cert2 = sign_csr(pending, ca_key, ca, tmp_path / "d2.pem")
    assert cli("provision", "install-cert", "--cert", str(cert2), "--ca",
               str(box.pki / "ca.pem"), "--config", conf).returncode == 0
    rc, rep = doctor(Path(conf), *only)
    assert by_name(rep, "broker")[0]["status"] == "PASS", rep
    serial = load_cert(tmp_path / "prod" / "pki" / "current" / "device.pem").serial_number
    assert serial == load_cert(cert2).serial_number
