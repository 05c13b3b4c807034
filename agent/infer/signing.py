"""Ed25519 publisher signatures over model manifests, checked against pinned keys.

The detached signature covers the manifest bytes; the manifest carries the
ONNX file's sha256, so one signature binds both.  The signature file names the
signing key by id, which lets us tell an operator *why* a package is refused:
unsigned, signed by a key that is not pinned, a manifest changed after signing,
or a model file that no longer matches the signed hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ModelError

SIG_SUFFIX = ".sig"
_SCHEME = "ed25519"

VerifyStatus = Literal["verified", "unsigned", "unpinned_key", "bad_signature", "tampered_model"]


@dataclass(frozen=True)
class PublisherKey:
    key_id: str
    key: Ed25519PublicKey
    source: str


@dataclass(frozen=True)
class Verification:
    status: VerifyStatus
    detail: str
    key_id: str | None
    sha256: str  # of the model file as it is on disk now

    @property
    def ok(self) -> bool:
        return self.status == "verified"


def public_key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> PublisherKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise ModelError(
            f"publisher key {path} does not exist",
            hint="point --publisher-key / config at the publisher's PEM public key",
        ) from exc
    except ValueError as exc:
        raise ModelError(
            f"publisher key {path} is not a PEM public key ({exc})",
            hint="the file must start with '-----BEGIN PUBLIC KEY-----'",
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ModelError(
            f"publisher key {path} is not an Ed25519 key",
            hint="model publishers sign with Ed25519; ask for their Ed25519 public key",
        )
    return PublisherKey(public_key_id(key), key, str(path))


def load_public_keys(paths: tuple[Path, ...]) -> tuple[PublisherKey, ...]:
    return tuple(load_public_key(p) for p in paths)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The content of a ``manifest.toml.sig`` file."""
    key_id = public_key_id(private_key.public_key())
    sig = base64.b64encode(private_key.sign(manifest_bytes)).decode("ascii")
    return f"{_SCHEME} {key_id} {sig}\n".encode("ascii")


def verify_package(
    manifest_bytes: bytes,
    sig_path: Path,
    model_path: Path,
    expected_sha256: str,
    pinned: tuple[PublisherKey, ...],
) -> Verification:
    """Check signature, pinning and model hash; never raises for a bad package."""
    actual = file_sha256(model_path) if model_path.is_file() else ""
    if not sig_path.is_file():
        return Verification("unsigned", f"no signature file {sig_path.name}", None, actual)
    parts = sig_path.read_bytes().decode("ascii", errors="replace").split()
    if len(parts) != 3 or parts[0] != _SCHEME:
        return Verification("bad_signature", f"{sig_path.name} is not '{_SCHEME} KEYID SIG'",
                            None, actual)
    key_id, sig_b64 = parts[1], parts[2]
    try:
        signature = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        return Verification("bad_signature", f"{sig_path.name} signature is not base64",
                            key_id, actual)
    keys = [k for k in pinned if k.key_id == key_id]
    if not keys:
        return Verification("unpinned_key", f"signed by key {key_id}, which is not pinned",
                            key_id, actual)
    try:
        keys[0].key.verify(signature, manifest_bytes)
    except InvalidSignature:
        return Verification("bad_signature",
                            f"manifest does not match its signature by key {key_id} "
                            "(changed after signing)", key_id, actual)
    if actual != expected_sha256:
        found = actual[:12] if actual else "missing"
        return Verification("tampered_model",
                            f"model file sha256 {found}… differs from the signed "
                            f"{expected_sha256[:12]}…", key_id, actual)
    return Verification("verified", f"signed by pinned key {key_id}", key_id, actual)
