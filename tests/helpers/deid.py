"""Helpers shared by the deid tests (keys and re-identification recipients)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@dataclass(frozen=True)
class Recipient:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path


def make_recipient(directory: Path, cn: str) -> Recipient:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / f"{cn}.key.pem"
    cert_path = directory / f"{cn}.cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Recipient(key, cert, key_path, cert_path)


def sample_path(name: str) -> str:
    """Path of a pydicom bundled test file (never one that would need a download)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path
