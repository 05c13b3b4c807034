"""Helpers for the ops tests: a fleet CA that signs the box's CSR, and the CLI."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.pki import PrivateKey, cert_pem
from tests.helpers.peers import EDGE_AGENT, REPO


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=env)


def sign_csr(csr_path: Path, ca_key: PrivateKey, ca_cert: x509.Certificate, out: Path, *,
             eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
             not_before: datetime | None = None, days: float = 365,
             subject: x509.Name | None = None) -> Path:
    """What the hospital's fleet CA does with the CSR (copies the subject it asks for)."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    now = datetime.now(UTC)
    start = not_before or now - timedelta(minutes=5)
    b = (x509.CertificateBuilder()
         .subject_name(subject or csr.subject)
         .issuer_name(ca_cert.subject)
         .public_key(csr.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(start)
         .not_valid_after(start + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    out.write_bytes(cert_pem(b.sign(ca_key, hashes.SHA256())))
    return out
