"""Production provisioning: init (keys, device key + CSR, config), install-cert checks,
rotate-cert with an atomic switch, all through the real CLI and real certificates."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import config as cfgmod
from agent.errors import CryptoError
from agent.identity import certificates as identity
from agent.identity.pki import load_key, make_ca, write_pair
from tests.helpers.ops import cli, sign_csr


def init_box(tmp: Path, *extra: str) -> dict[str, object]:
    p = cli("provision", "init", "--device-id", "ct-edge-01", "--site", "st-marys",
            "--state-dir", str(tmp / "state"), "--control-socket", str(tmp / "control.sock"),
            "--json", *extra)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def fleet_ca(tmp_path: Path) -> tuple[identity.PrivateKey, x509.Certificate, Path]:
    key, cert = make_ca("St Marys fleet CA")
    _, ca_path = write_pair(tmp_path / "fleet", "ca", key, cert)
    return key, cert, ca_path


def test_init_creates_private_keys_csr_and_a_valid_config(tmp_path: Path) -> None:
    out = init_box(tmp_path)
    state = tmp_path / "state"
    assert mode(state) == 0o700
    for name in ("pseudonym", "kek", "audit_signing"):
        f = state / "keys" / f"{name}.key"
        assert mode(f) == 0o600
        assert len(bytes.fromhex(f.read_text().strip())) == 32
    assert mode(state / "keys") == 0o700 and mode(state / "pki") == 0o700
    key_file = state / "pki" / "current" / "device.key"
    assert mode(key_file) == 0o600
    csr = x509.load_pem_x509_csr(Path(str(out["csr"])).read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "st-marys.ct-edge-01"
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert load_key(key_file).public_key().public_numbers() == csr.public_key().public_numbers()

    cfg = cfgmod.load(Path(str(out["config"])))
    assert (cfg.site, cfg.device, cfg.environment) == ("st-marys", "ct-edge-01", "production")
    assert cfg.keys.kek == state / "keys" / "kek.key"
    assert cfg.mqtt.key == key_file and cfg.control.socket == tmp_path / "control.sock"


def test_init_again_never_replaces_existing_secrets(tmp_path: Path) -> None:
    init_box(tmp_path)
    keys = tmp_path / "state" / "keys"
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    dev_key = (tmp_path / "state" / "pki" / "current" / "device.key").read_bytes()
    out = init_box(tmp_path)
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before
    assert (tmp_path / "state" / "pki" / "current" / "device.key").read_bytes() == dev_key
    assert out["created"] == [] and len(list(out["kept"])) == 5  # type: ignore[arg-type]


def test_init_rejects_an_id_that_would_break_mqtt_topics(tmp_path: Path) -> None:
    p = cli("provision", "init", "--device-id", "ct/#", "--site", "st-marys",
            "--state-dir", str(tmp_path / "s"))
    assert p.returncode == 2
    assert "--device-id" in p.stderr and "fix:" in p.stderr
    assert not (tmp_path / "s").exists()


def test_install_cert_checks_then_installs(tmp_path: Path, fleet_ca: tuple) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    cert = sign_csr(Path(str(out["csr"])), ca_key, ca_cert, tmp_path / "device.pem")
    p = cli("provision", "install-cert", "--cert", str(cert), "--ca", str(ca_path),
            "--config", str(out["config"]))
    assert p.returncode == 0, p.stderr
    assert "valid until" in p.stdout
    state = tmp_path / "state"
    assert (state / "pki" / "current" / "device.pem").read_bytes() == cert.read_bytes()
    assert (state / "pki" / "ca.pem").read_bytes() == ca_path.read_bytes()
    tail = cli("audit", "tail", "--config", str(out["config"]), "--json")
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    changed = [e for e in events if e["event"] == "cert.changed"]
    assert changed and changed[0]["details"]["rotated"] is False


@pytest.mark.parametrize("case,expect", [
    ("other_ca", "does not chain to the given CA"),
    ("server_only", "not allowed for TLS client authentication"),
    ("no_eku", "no extended key usage"),
    ("expired", "expired on"),
    ("not_yet", "not valid before"),
    ("wrong_name", "not 'st-marys.ct-edge-01'"),
    ("other_key", "not for this box's device key"),
])
def test_install_cert_refuses_bad_certificates(tmp_path: Path, fleet_ca: tuple, case: str,
                                               expect: str) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    csr = Path(str(out["csr"]))
    bad = tmp_path / "bad.pem"
    now = datetime.now(UTC)
    if case == "other_ca":
        k2, c2 = make_ca("Impostor CA")
        sign_csr(csr, k2, c2, bad)
    elif case == "server_only":
        sign_csr(csr, ca_key, ca_cert, bad, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    elif case == "no_eku":
        sign_csr(csr, ca_key, ca_cert, bad, eku=())
    elif case == "expired":
        sign_csr(csr, ca_key, ca_cert, bad, not_before=now - timedelta(days=400), days=365)
    elif case == "not_yet":
        sign_csr(csr, ca_key, ca_cert, bad, not_before=now + timedelta(days=2))
    elif case == "wrong_name":
        sign_csr(csr, ca_key, ca_cert, bad, subject=x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "st-marys.other-box")]))
    else:
        other = init_box(tmp_path / "other")
        sign_csr(Path(str(other["csr"])), ca_key, ca_cert, bad)
    p = cli("provision", "install-cert", "--cert", str(bad), "--ca", str(ca_path),
            "--config", str(out["config"]))
    assert p.returncode == 2
    assert expect in p.stderr and "fix:" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not (tmp_path / "state" / "pki" / "current" / "device.pem").exists()


def test_check_certificate_warns_thirty_days_before_expiry(tmp_path: Path, fleet_ca: tuple) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    cert = sign_csr(Path(str(out["csr"])), ca_key, ca_cert, tmp_path / "c.pem", days=20)
    key = load_key(tmp_path / "state" / "pki" / "current" / "device.key")
    info = identity.check_certificate(cert.read_bytes(), ca_path.read_bytes(), key,
                                      site="st-marys", device="ct-edge-01")
    assert info.days_left < 30 and "expires in" in info.warnings[0]
    with pytest.raises(CryptoError, match="expired"):
        identity.check_certificate(cert.read_bytes(), ca_path.read_bytes(), key, site="st-marys",
                                   device="ct-edge-01", now=datetime.now(UTC) + timedelta(days=21))


def test_rotate_cert_keeps_old_identity_until_install_switches(tmp_path: Path,
                                                               fleet_ca: tuple) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    conf = str(out["config"])
    first = sign_csr(Path(str(out["csr"])), ca_key, ca_cert, tmp_path / "first.pem")
    assert cli("provision", "install-cert", "--cert", str(first), "--ca", str(ca_path),
               "--config", conf).returncode == 0
    pki = tmp_path / "state" / "pki"
    old_key = (pki / "current" / "device.key").read_bytes()

    p = cli("provision", "rotate-cert", "--config", conf)
    assert p.returncode == 0, p.stderr
    pending_csr = pki / "pending" / "device.csr"
    assert pending_csr.exists() and (pki / "pending").resolve() != (pki / "current").resolve()
    # the old identity is untouched while the CA works on the new CSR
    assert (pki / "current" / "device.key").read_bytes() == old_key
    assert (pki / "current" / "device.pem").read_bytes() == first.read_bytes()

    second = sign_csr(pending_csr, ca_key, ca_cert, tmp_path / "second.pem")
    p = cli("provision", "install-cert", "--cert", str(second), "--ca", str(ca_path),
            "--config", conf)
    assert p.returncode == 0, p.stderr
    assert "switched to the new identity" in p.stdout
    assert not (pki / "pending").exists()
    assert (pki / "current" / "device.pem").read_bytes() == second.read_bytes()
    assert (pki / "current" / "device.key").read_bytes() != old_key
    assert (pki / "previous" / "device.key").read_bytes() == old_key
    cfg = cfgmod.load(Path(conf))
    key = load_key(cfg.mqtt.key)
    assert identity.check_certificate(cfg.mqtt.cert.read_bytes(), cfg.mqtt.ca.read_bytes(), key,
                                      site="st-marys", device="ct-edge-01").days_left > 300
    tail = cli("audit", "tail", "--config", conf, "--json", "-n", "50")
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    rotated = [e for e in events if e["event"] == "cert.changed" and e["details"]["rotated"]]
    assert len(rotated) == 1 and rotated[0]["user"]
    actions = [e["details"]["command"] for e in events if e["event"] == "cli.action"]
    assert "provision.rotate-cert" in actions


def _break_key(key: Path, how: str) -> None:
    if how == "key_missing":
        key.unlink()
    elif how == "key_not_pem":
        key.write_bytes(b"this is not a key\n")
    elif how == "key_unreadable":
        if os.geteuid() == 0:  # root reads any mode: make it unreadable for root too
            key.unlink()
            key.mkdir()
        else:
            key.chmod(0)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how,expect,fix", [
    ("key_missing", "does not exist", "rotate-cert"),
    ("key_not_pem", "is not a PEM private key", "rotate-cert"),
    ("key_unreadable", "cannot be read", "chmod 600"),
])
def test_install_cert_with_a_broken_device_key_says_which_file_and_what_to_do(
        tmp_path: Path, fleet_ca: tuple, how: str, expect: str, fix: str) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    cert = sign_csr(Path(str(out["csr"])), ca_key, ca_cert, tmp_path / "device.pem")
    key = (tmp_path / "state" / "pki" / "current" / "device.key").resolve()
    _break_key(key, how)
    p = cli("provision", "install-cert", "--cert", str(cert), "--ca", str(ca_path),
            "--config", str(out["config"]))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert f"device key {key} {expect}" in p.stderr, p.stderr
    assert "fix:" in p.stderr and fix in p.stderr.split("fix:", 1)[1]
    assert not (key.parent / "device.pem").exists()


@pytest.mark.parametrize("which,how,expect", [
    ("cert", "missing", "--cert {path}: No such file or directory"),
    ("cert", "not_pem", "--cert {path} is not a PEM certificate file"),
    ("ca", "missing", "--ca {path}: No such file or directory"),
    ("ca", "not_pem", "--ca {path} is not a PEM certificate file"),
    ("cert", "a_key", "--cert {path} is not a PEM certificate file"),
])
def test_install_cert_with_a_bad_cert_or_ca_file_names_it(
        tmp_path: Path, fleet_ca: tuple, which: str, how: str, expect: str) -> None:
    ca_key, ca_cert, ca_path = fleet_ca
    out = init_box(tmp_path)
    cert = sign_csr(Path(str(out["csr"])), ca_key, ca_cert, tmp_path / "device.pem")
    files = {"cert": cert, "ca": ca_path}
    bad = tmp_path / f"bad-{which}.pem"
    if how == "not_pem":
        bad.write_bytes(b"\x30\x82\x01\x0a binary DER, not PEM")
    elif how == "a_key":
        bad.write_bytes((tmp_path / "state" / "pki" / "current" / "device.key").read_bytes())
    files[which] = bad
    p = cli("provision", "install-cert", "--cert", str(files["cert"]), "--ca", str(files["ca"]),
            "--config", str(out["config"]))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert expect.format(path=bad) in p.stderr, p.stderr
    assert "fix:" in p.stderr
