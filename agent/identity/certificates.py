"""Production identity: box keys, device key + CSR, certificate install and rotation.

Layout under the state dir (0700, owned by the service user)::

    keys/pseudonym.key keys/kek.key keys/audit_signing.key     0600, 32 bytes hex
    pki/id-0001/device.key device.csr device.pem               one identity per folder
    pki/current -> id-0001                                     what the config names
    pki/pending -> id-0002                                     a rotation in progress
    pki/previous -> id-0001                                    kept for rollback
    pki/ca.pem                                                 the fleet CA

A key and its certificate must change together; two files cannot be replaced
atomically, but one symlink can: ``rename(pending, current)`` switches both at
once, so a crash leaves either the old identity or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.crypto import fsync_dir, write_file_atomic, write_secret_file
from agent.errors import CryptoError, EdgeAgentError
from agent.identity.pki import PrivateKey, key_pem, load_key, new_key

SERVICE_USER = "edge-agent"
WARN_DAYS = 30
CLOCK_SKEW = timedelta(minutes=5)
_ID_DIR = re.compile(r"^id-(\d{4,})$")


# -- ownership ---------------------------------------------------------------------

def service_owner() -> tuple[int, int]:
    """The ``edge-agent`` user when it exists (sysusers.d creates it), else whoever runs us."""
    try:
        pw = pwd.getpwnam(SERVICE_USER)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return os.getuid(), os.getgid()


def owner_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def give(path: Path, owner: tuple[int, int]) -> None:
    """chown when we can (root provisioning for the service user); otherwise we own it."""
    if os.geteuid() == 0 and owner != (0, 0):
        os.lchown(path, *owner)


def give_tree(root: Path, owner: tuple[int, int]) -> None:
    if os.geteuid() != 0:
        return
    give(root, owner)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            give(Path(dirpath) / n, owner)


def _write_public(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic replace of a non-secret file (certificates, CSRs, config)."""
    write_file_atomic(path, data, mode)


def _symlink(pki: Path, name: str, target: str) -> None:
    tmp = pki / f".{name}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, pki / name)
    fsync_dir(pki)


# -- the device key -------------------------------------------------------------------

def load_device_key(path: Path) -> PrivateKey:
    """The device's TLS private key, or a CryptoError naming the file and the fix."""
    remake = ("make a new key and CSR with 'edge-agent provision rotate-cert', have the fleet "
              "CA sign the CSR, and install that certificate (or restore the key from backup)")
    try:
        return load_key(path)
    except FileNotFoundError:
        raise CryptoError(f"device key {path} does not exist", hint=remake) from None
    except PermissionError:
        raise CryptoError(
            f"device key {path} cannot be read by this user (uid {os.geteuid()})",
            hint=f"run as root or the {SERVICE_USER} user, or give the key to that user: "
                 f"chown {SERVICE_USER} {path} && chmod 600 {path}") from None
    except OSError as exc:
        raise CryptoError(
            f"device key {path} cannot be read ({exc.strerror})",
            hint=f"it must be a regular file: chmod 600 {path}; if it is gone, {remake}",
        ) from None
    except (ValueError, TypeError):  # TypeError: a passphrase-protected key
        raise CryptoError(f"device key {path} is not a PEM private key (unencrypted EC or RSA)",
                          hint=remake) from None


# -- CSR ----------------------------------------------------------------------------

def common_name(site: str, device: str) -> str:
    return f"{site}.{device}"


def make_csr(key: PrivateKey, site: str, device: str) -> x509.CertificateSigningRequest:
    """CN = "<site>.<device>" (the broker's ACL user), asking for clientAuth only."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common_name(site, device))]))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _new_identity(pki: Path, site: str, device: str, owner: tuple[int, int]) -> Path:
    numbers = [int(m.group(1)) for p in pki.iterdir() if (m := _ID_DIR.match(p.name))]
    d = pki / f"id-{max(numbers, default=0) + 1:04d}"
    d.mkdir(mode=0o700)
    key = new_key()
    write_secret_file(d / "device.key", key_pem(key))
    csr = make_csr(key, site, device).public_bytes(serialization.Encoding.PEM)
    _write_public(d / "device.csr", csr)
    give_tree(d, owner)
    return d


# -- init ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InitResult:
    state_dir: Path
    config: Path
    csr: Path
    created: tuple[str, ...]
    kept: tuple[str, ...]
    owner: str


CONFIG_TEMPLATE = """\
# edge-agent configuration written by 'edge-agent provision init'.
# Every key is described in docs/configuration.md.  Secrets are files (0600) or
# systemd credentials; never put key material in this file.
[box]
site = "{site}"
device = "{device}"
environment = "production"
state_dir = "{state}"

[logging]
level = "INFO"

[dicom]
host = "0.0.0.0"
port = {dicom_port}
ae_title = "{ae_title}"
# One table per modality (or PACS router) allowed to send:
# [[dicom.peers]]
# ae_title = "CT_SCANNER_1"
# addresses = ["10.20.30.40/32"]

[deid]
mode = "strip"
options = []

[keys]
pseudonym = "{state}/keys/pseudonym.key"
kek = "{state}/keys/kek.key"
audit_signing = "{state}/keys/audit_signing.key"

[models]
dir = "{state}/models"
publisher_keys = []

[mqtt]
host = "{mqtt_host}"
port = {mqtt_port}
ca = "{state}/pki/ca.pem"
cert = "{state}/pki/current/device.pem"
key = "{state}/pki/current/device.key"
topic_prefix = "edge"

[control]
socket = "{socket}"

# The hospital's ATNA audit repository (IHE ITI-20, syslog over mutual TLS): the
# complete audit records, PHI included, go to this collector only; central ops
# gets the pseudonymised projection (docs/audit.md).
# [atna]
# enabled = true
# host = "audit.hospital.example"
# port = 6514
# ca_file = "/etc/edge-agent/atna-ca.pem"
# cert_file = "{state}/pki/current/device.pem"
# key_file = "{state}/pki/current/device.key"
# format = "dicom-xml"
"""


def init(device: str, site: str, state_dir: Path, *, config_path: Path | None = None,
         mqtt_host: str = "mqtt.example.org", mqtt_port: int = 8883, dicom_port: int = 11112,
         ae_title: str = "EDGE_AGENT", control_socket: Path = Path("/run/edge-agent/control.sock"),
         overwrite_config: bool = False) -> InitResult:
    """Create (idempotently) keys, device key + CSR and a config; existing secrets are kept:
    replacing a KEK or pseudonym key would orphan encrypted data and break pseudonyms."""
    from agent.config import BOX_NAME_RULE, box_name_problem

    for what, value in (("--device-id", device), ("--site", site)):
        bad = box_name_problem(value, common_name(site, device))
        if bad:
            raise EdgeAgentError(f"{what} {value!r} is not a valid name (it becomes an MQTT "
                                 f"topic segment and part of the certificate name): {bad[0]}",
                                 hint=f"use e.g. {bad[1]!r} ({BOX_NAME_RULE})")
    state = state_dir.resolve()
    owner = service_owner()
    created: list[str] = []
    kept: list[str] = []
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    for sub in ("keys", "pki", "models"):
        (state / sub).mkdir(exist_ok=True, mode=0o700)
        os.chmod(state / sub, 0o700)
    for name in ("pseudonym", "kek", "audit_signing"):
        p = state / "keys" / f"{name}.key"
        if p.exists():
            kept.append(str(p))
        else:
            # Same format as the dev box: 32 random bytes, hex, so load_key_file reads both.
            write_secret_file(p, os.urandom(32).hex().encode())
            created.append(str(p))
    pki = state / "pki"
    current = pki / "current"
    if current.exists():
        ident = current.resolve()
        kept.append(str(ident / "device.key"))
        key = load_key(ident / "device.key")
        _write_public(ident / "device.csr",
                      make_csr(key, site, device).public_bytes(serialization.Encoding.PEM))
    else:
        ident = _new_identity(pki, site, device, owner)
        _symlink(pki, "current", ident.name)
        created.append(str(ident / "device.key"))
    cfg = (config_path or state / "agent.toml").resolve()
    if cfg.exists() and not overwrite_config:
        kept.append(str(cfg))
    else:
        if not cfg.parent.exists():
            # As tmpfiles.d makes /etc/edge-agent: 0750, group edge-agent (the CLI's umask
            # is 0077, which would leave the service unable to read its config).
            cfg.parent.mkdir(parents=True, mode=0o750)
            os.chmod(cfg.parent, 0o750)
            if os.geteuid() == 0 and state not in cfg.parent.parents and cfg.parent != state:
                os.chown(cfg.parent, 0, owner[1])
        _write_public(cfg, CONFIG_TEMPLATE.format(
            site=site, device=device, state=state, dicom_port=dicom_port, ae_title=ae_title,
            mqtt_host=mqtt_host, mqtt_port=mqtt_port, socket=control_socket).encode(), 0o640)
        created.append(str(cfg))
        if cfg.parent == state or state in cfg.parents:
            give(cfg, owner)
        elif os.geteuid() == 0:
            os.chown(cfg, 0, owner[1])  # root:edge-agent 0640, readable by the service
    give_tree(state, owner)
    try:
        owner_name = pwd.getpwuid(owner[0]).pw_name
    except KeyError:
        owner_name = str(owner[0])
    return InitResult(state, cfg, ident / "device.csr", tuple(created), tuple(kept), owner_name)


# -- certificate checks ---------------------------------------------------------------

@dataclass(frozen=True)
class CertInfo:
    subject: str
    serial: str
    fingerprint: str  # sha256 of the DER, hex
    not_before: datetime
    not_after: datetime
    days_left: float
    warnings: tuple[str, ...]


def _load_pems(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CryptoError(f"{what} is not a PEM certificate file",
                          hint="pass the PEM ('-----BEGIN CERTIFICATE-----') the fleet CA "
                               "returned; convert DER with 'openssl x509 -inform der -in "
                               "FILE -out FILE.pem'") from None
    return certs


def _public_der(obj: x509.Certificate | PrivateKey) -> bytes:
    pub = obj.public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _chain_ok(leaf: x509.Certificate, intermediates: list[x509.Certificate],
              anchors: list[x509.Certificate], now: datetime) -> None:
    """Walk issuer signatures from the leaf up to one of the CA certificates."""
    cur = leaf
    pool = intermediates + anchors
    for _ in range(8):
        issuer = None
        for cand in pool:
            if cand.subject != cur.issuer:
                continue
            try:
                cur.verify_directly_issued_by(cand)
            except (ValueError, TypeError, InvalidSignature):
                continue
            issuer = cand
            break
        if issuer is None:
            raise CryptoError(
                "the certificate does not chain to the given CA "
                f"(no valid issuer for {cur.issuer.rfc4514_string()})",
                hint="pass the fleet CA that signed this certificate with --ca "
                     "(and any intermediate in the --cert file)")
        try:
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CryptoError(f"issuer {issuer.subject.rfc4514_string()} is not a CA certificate")
        if not (issuer.not_valid_before_utc - CLOCK_SKEW <= now <= issuer.not_valid_after_utc):
            raise CryptoError(f"CA certificate {issuer.subject.rfc4514_string()} is outside its "
                              "validity period",
                              hint="get a current CA certificate; check the clock")
        if issuer in anchors:
            return
        cur = issuer
    raise CryptoError("certificate chain is too long or loops")


def check_certificate(cert_pem: bytes, ca_pem: bytes, key: PrivateKey, *, site: str, device: str,
                      now: datetime | None = None, cert_name: str = "--cert",
                      ca_name: str = "--ca", key_name: str = "") -> CertInfo:
    """Chain, key match, validity dates, clientAuth usage and name; raise CryptoError.

    ``*_name`` say where the bytes came from ("--cert /path", "[mqtt] cert /path") so
    an error names the file the operator has to change."""
    now = now or datetime.now(UTC)
    certs = _load_pems(cert_pem, cert_name)
    anchors = _load_pems(ca_pem, ca_name)
    leaf = certs[0]
    if _public_der(leaf) != _public_der(key):
        raise CryptoError(f"the certificate {cert_name} is not for this box's device key"
                          + (f" {key_name}" if key_name else ""),
                          hint="submit the CSR printed by 'provision init' / 'rotate-cert' and "
                               "install the certificate issued for it")
    if now < leaf.not_valid_before_utc - CLOCK_SKEW:
        start = leaf.not_valid_before_utc
        raise CryptoError(f"the certificate is not valid before {start:%Y-%m-%d %H:%M} UTC",
                          hint="check the box clock (timedatectl) or wait until then")
    if now >= leaf.not_valid_after_utc:
        raise CryptoError(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
                          hint="request a new certificate for the CSR")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CryptoError("the certificate has no extended key usage; TLS client use "
                          "(clientAuth) is required",
                          hint="ask the fleet CA for a client certificate "
                               "(EKU clientAuth)") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CryptoError("the certificate is not allowed for TLS client authentication "
                          "(no clientAuth extended key usage)",
                          hint="ask the fleet CA for a client certificate (EKU clientAuth)")
    with contextlib.suppress(x509.ExtensionNotFound):
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise CryptoError("the certificate's key usage does not allow digitalSignature, "
                              "which a TLS client needs")
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    want = common_name(site, device)
    if cns != [want]:
        raise CryptoError(f"the certificate is for {cns!r}, not {want!r}",
                          hint="the broker ACL uses the certificate name as the MQTT user; "
                               "request a certificate for the CSR of this box")
    _chain_ok(leaf, certs[1:], anchors, now)
    left = (leaf.not_valid_after_utc - now).total_seconds() / 86400
    warnings = []
    if left < WARN_DAYS:
        warnings.append(f"the certificate expires in {left:.0f} days; plan 'provision rotate-cert'")
    return CertInfo(
        subject=leaf.subject.rfc4514_string(), serial=format(leaf.serial_number, "x"),
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
        days_left=round(left, 1), warnings=tuple(warnings),
    )


# -- install / rotate -----------------------------------------------------------------

def pki_dir(cert_path: Path) -> Path:
    """The pki folder of a provisioned box, from the config's ``[mqtt] cert``."""
    if cert_path.parent.name != "current" or not (cert_path.parent.parent / "current").is_symlink():
        raise EdgeAgentError(
            f"{cert_path} is not inside a 'pki/current' identity made by 'provision init'",
            hint="provision the box with 'edge-agent provision init', or point [mqtt] cert/key "
                 "at <state_dir>/pki/current/device.pem and device.key")
    return cert_path.parent.parent


@dataclass(frozen=True)
class InstallResult:
    info: CertInfo
    rotated: bool
    identity: str
    previous_serial: str | None


def _serial(path: Path) -> str | None:
    try:
        return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")
    except (OSError, ValueError):
        return None


def install_certificate(pki: Path, cert_file: Path, ca_file: Path, *, site: str,
                        device: str) -> InstallResult:
    """Check, then install; a certificate for the pending key switches identities atomically."""
    pems = {}
    for opt, f, what in (("--cert", cert_file, "the certificate the fleet CA issued for "
                                               "this box's CSR"),
                         ("--ca", ca_file, "the fleet CA certificate")):
        try:
            pems[opt] = f.read_bytes()
        except OSError as exc:
            raise CryptoError(f"{opt} {f}: {exc.strerror}",
                              hint=f"pass {what} with {opt}, as a file this user can "
                                   "read") from None
    cert_pem, ca_pem = pems["--cert"], pems["--ca"]
    cert_name, ca_name = f"--cert {cert_file}", f"--ca {ca_file}"
    _load_pems(cert_pem, cert_name)  # a file that is no certificate: say so before any key
    _load_pems(ca_pem, ca_name)
    pending = pki / "pending"
    current = pki / "current"
    candidates = [(pending, True)] if pending.exists() else []
    candidates.append((current, False))
    errors = []
    for ident, rotating in candidates:
        key_path = ident.resolve() / "device.key"
        try:
            key = load_device_key(key_path)
            info = check_certificate(cert_pem, ca_pem, key, site=site, device=device,
                                     cert_name=cert_name, ca_name=ca_name,
                                     key_name=f"({key_path})")
        except CryptoError as exc:
            errors.append((ident, exc))
            continue
        owner = owner_of(pki)
        previous = _serial(current / "device.pem")
        _write_public(ident / "device.pem", cert_pem)
        _write_public(pki / "ca.pem", ca_pem)
        give(ident / "device.pem", owner)
        give(pki / "ca.pem", owner)
        target = ident.resolve().name
        if rotating:
            old = current.resolve().name
            _symlink(pki, "previous", old)
            os.replace(pending, current)  # the atomic switch: key and certificate together
            fsync_dir(pki)
            _prune(pki, keep={target, old})
        return InstallResult(info, rotating, target, previous)
    # Report the check against the key the operator most likely meant (the pending one).
    raise errors[0][1]


def _prune(pki: Path, keep: set[str]) -> None:
    """Older identities hold private keys nobody needs: remove them."""
    import shutil

    for p in pki.iterdir():
        if _ID_DIR.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


@dataclass(frozen=True)
class RotateResult:
    csr: Path
    identity: str
    reused: bool


def rotate(pki: Path, *, site: str, device: str, new: bool = False) -> RotateResult:
    """Make a new key + CSR beside the working identity (pki/pending)."""
    pending = pki / "pending"
    if pending.exists() and not new:
        ident = pending.resolve()
        return RotateResult(ident / "device.csr", ident.name, True)
    ident = _new_identity(pki, site, device, owner_of(pki))
    old = pending.resolve().name if pending.exists() else None
    _symlink(pki, "pending", ident.name)
    if old:  # a discarded pending identity: its key was never used, remove it
        keep = {ident.name, (pki / "current").resolve().name}
        if (pki / "previous").exists():
            keep.add((pki / "previous").resolve().name)
        _prune(pki, keep=keep)
    return RotateResult(ident / "device.csr", ident.name, False)


def cert_status(cert_path: Path) -> CertInfo | None:
    """Days left etc. of an installed certificate (None when absent)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    now = datetime.now(UTC)
    left = (cert.not_valid_after_utc - now).total_seconds() / 86400
    return CertInfo(cert.subject.rfc4514_string(), format(cert.serial_number, "x"),
                    hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
                    cert.not_valid_before_utc, cert.not_valid_after_utc, round(left, 1), ())
