"""Forward-evolving Ed25519 checkpoint keys and signed checkpoint bodies.

The signing seed evolves by a hash ratchet, seed[i+1] = SHA-256("evolve" || seed[i]),
and only the current seed is kept on disk.  Checkpoint i is signed with the
key derived from seed[i] and names the public key of epoch i+1, so a verifier
holding only the genesis public key can walk the whole chain, while someone
who steals today's seed cannot compute any earlier one and so cannot re-sign
an earlier checkpoint (the idea behind journald's Forward Secure Sealing).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.crypto import KEY_BYTES, load_key_file, write_secret_file
from agent.errors import AuditError, CryptoError

FORMAT = 1


def evolve(seed: bytes) -> bytes:
    return hashlib.sha256(b"evolve" + seed).digest()


def private_key(seed: bytes) -> Ed25519PrivateKey:
    # Domain-separate the signing key from the ratchet so the seed itself is never a key.
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"sign" + seed).digest())


def public_bytes(seed: bytes) -> bytes:
    return private_key(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def canonical(obj: object) -> bytes:
    """The exact bytes that are hashed and signed: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def body_hash(body: bytes) -> bytes:
    return hashlib.sha256(b"edge-agent checkpoint\x00" + body).digest()


@dataclass
class Ratchet:
    """The current epoch seed, persisted (0600, atomically) in the audit signing key file."""

    path: Path
    seed: bytes = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Ratchet:
        try:
            return cls(path, load_key_file(path, purpose="audit signing"))
        except CryptoError as exc:
            raise AuditError(str(exc.args[0]), hint=exc.hint) from None

    @property
    def public(self) -> bytes:
        return public_bytes(self.seed)

    @property
    def next_public(self) -> bytes:
        return public_bytes(evolve(self.seed))

    def sign(self, body: bytes) -> bytes:
        return private_key(self.seed).sign(body)

    def advance(self) -> None:
        """Move to the next epoch and overwrite the stored seed (the old one is gone)."""
        new = evolve(self.seed)
        write_secret_file(self.path, new.hex().encode("ascii") + b"\n")
        self.seed = new

    def catch_up(self, expected_public: bytes) -> bool:
        """After a crash between committing a checkpoint and evolving the file.

        Returns True when the seed matches (possibly after one evolution).
        """
        if self.public == expected_public:
            return True
        if self.next_public == expected_public:
            self.advance()
            return True
        return False


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: records 1..seq hash to ``head`` on this box."""

    number: int
    body: bytes  # canonical JSON, exactly as signed
    signature: bytes

    @property
    def fields(self) -> dict[str, Any]:
        data = json.loads(self.body)
        if not isinstance(data, dict):
            raise AuditError(f"checkpoint {self.number} body is not a JSON object")
        return data

    @property
    def hash(self) -> bytes:
        return body_hash(self.body)

    def to_json(self) -> dict[str, object]:
        return {"body": self.fields, "signature": self.signature.hex()}


def build_body(*, number: int, box: str, epoch_public: bytes, next_public: bytes,
               genesis: bytes, seq: int, head: bytes, first_seq: int, prev_hash: bytes,
               floor_seq: int, floor_hash: bytes, time: str) -> bytes:
    return canonical({
        "v": FORMAT,
        "box": box,
        "checkpoint": number,
        "seq": seq,
        "first_seq": first_seq,
        "head": head.hex(),
        "prev": prev_hash.hex(),
        "floor_seq": floor_seq,
        "floor_hash": floor_hash.hex(),
        "time": time,
        "public_key": epoch_public.hex(),
        "next_public_key": next_public.hex(),
        "genesis_public_key": genesis.hex(),
    })


def check_signature(public: bytes, body: bytes, signature: bytes) -> bool:
    if len(public) != KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True


def checkpoint_from_json(obj: Mapping[str, object]) -> Checkpoint:
    """Rebuild a checkpoint from its published form (body object + hex signature)."""
    body = obj.get("body")
    sig = obj.get("signature")
    if not isinstance(body, dict) or not isinstance(sig, str):
        raise AuditError("published checkpoint lacks 'body' or 'signature'")
    number = body.get("checkpoint")
    if not isinstance(number, int):
        raise AuditError("published checkpoint has no number")
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        raise AuditError(f"published checkpoint {number} has a malformed signature") from None
    return Checkpoint(number, canonical(body), signature)
