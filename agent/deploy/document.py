"""A deployment document: its shape, its approvals, and whether it is meant for this box.

The document is JSON (schema: ``deployment.schema.json`` next to this file, the same
file as docs/schemas/deployment.schema.json).  Approvers sign the canonical JSON of
the ``document`` object with Ed25519, each under a role (``publisher``,
``clinical``...).  The box pins public keys per role ([deploy] approver_keys) and
decides which roles it requires ([deploy] required_roles): the document cannot
lower that bar.  One key counts for one role only, so a single compromised key
cannot approve a release on its own.

Everything here is pure (no I/O beyond reading key files): the box's inbound
handler and the central ``fleet sign``/``fleet deploy`` use the same code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.deploy.configkeys import LOG_LEVELS, SAFE_CONFIG_KEYS, SENSITIVE_CONFIG_KEYS
from agent.errors import EdgeAgentError
from agent.infer.signing import public_key_id

DEFAULT_GATES: dict[str, float] = {
    "max_inference_errors": 0,
    "max_needs_review_rate": 1.0,
    "min_studies_for_rate": 5,
    "max_drift_psi": 1e9,
    "max_latency_ms_p95": 1e12,
}


class DocumentError(EdgeAgentError):
    """A document refused; ``reason`` is a short code that goes into the audit and the job."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Approval:
    role: str
    key_id: str
    signer: str


@dataclass(frozen=True)
class PackageRef:
    name: str
    version: str
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class Deployment:
    """A document whose shape is valid (approvals are checked separately)."""

    id: str
    revision: int
    action: str
    expires: float
    site: str
    boxes: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    packages: tuple[PackageRef, ...]
    config: tuple[tuple[str, Any], ...]
    sensitive: tuple[str, ...]
    canary: tuple[str, ...]
    waves: tuple[tuple[str, ...], ...]
    soak_seconds: float
    wave_timeout_seconds: float
    gates: tuple[tuple[str, float], ...]
    digest: str  # sha256 of the canonical document: what was approved
    raw: dict[str, Any]

    def gate(self, name: str) -> float:
        return dict(self.gates).get(name, DEFAULT_GATES[name])

    def wave_of(self, device: str) -> int:
        """0 for a canary, 1.. for the waves, -1 when the plan does not name the box."""
        if device in self.canary:
            return 0
        for n, wave in enumerate(self.waves, 1):
            if device in wave:
                return n
        return -1

    def plan(self) -> list[tuple[str, ...]]:
        """Canary first, then the waves, without empty steps."""
        return [w for w in (self.canary, *self.waves) if w]


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    text = resources.files("agent.deploy").joinpath("deployment.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def parse_time(value: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise DocumentError("malformed", f"{value!r} is not an ISO 8601 time") from None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def validate_shape(signed: Any) -> None:
    """The JSON Schema check (raises DocumentError 'malformed' with the first problem)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(signed), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise DocumentError("malformed", f"not a valid deployment document at {where}: "
                                         f"{e.message[:200]}")


def parse(signed: dict[str, Any]) -> Deployment:
    """Shape-checked Deployment of a signed envelope ``{"document", "signatures"}``."""
    validate_shape(signed)
    d = signed["document"]
    target = d["target"]
    rollout = d.get("rollout", {})
    packages = tuple(PackageRef(p["name"], p["version"], p["sha256"], int(p["size"]),
                                int(p["chunk_size"]), tuple(p["chunks"]))
                     for p in d.get("packages", []))
    for p in packages:
        want = -(-p.size // p.chunk_size)
        if len(p.chunks) != want:
            raise DocumentError("malformed", f"package {p.name} {p.version}: {len(p.chunks)} "
                                             f"chunk hashes for {want} chunks")
    if d["action"] == "deploy" and not packages and not d.get("config"):
        raise DocumentError("malformed", "a deploy document changes nothing (no packages, "
                                         "no config)")
    return Deployment(
        id=d["id"], revision=int(d["revision"]), action=d["action"],
        expires=parse_time(d["expires"]), site=target["site"],
        boxes=tuple(target.get("boxes", ())),
        labels=tuple(sorted(target.get("labels", {}).items())),
        packages=packages,
        config=tuple(sorted(d.get("config", {}).items())),
        sensitive=tuple(d.get("sensitive", ())),
        canary=tuple(rollout.get("canary", ())),
        waves=tuple(tuple(w) for w in rollout.get("waves", ())),
        soak_seconds=float(rollout.get("soak_seconds", 60.0)),
        wave_timeout_seconds=float(rollout.get("wave_timeout_seconds", 3600.0)),
        gates=tuple(sorted((k, float(v)) for k, v in d.get("gates", {}).items())),
        digest=hashlib.sha256(canonical(d)).hexdigest(),
        raw=d,
    )


# -- approvals -------------------------------------------------------------------------

@dataclass(frozen=True)
class ApproverKey:
    role: str
    key_id: str
    key: Ed25519PublicKey
    source: str


def load_approver_key(role: str, path: Path) -> ApproverKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise EdgeAgentError(f"approver key {path} ({role}) is not a readable PEM public key "
                             f"({exc})",
                             hint="[deploy] approver_keys must point at each approver's "
                                  "Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgeAgentError(f"approver key {path} ({role}) is not an Ed25519 key",
                             hint="approvers sign with Ed25519 keys")
    return ApproverKey(role, public_key_id(key), key, str(path))


def sign(document: dict[str, Any], role: str, private_key: Ed25519PrivateKey,
         signer: str = "") -> dict[str, str]:
    sig = base64.b64encode(private_key.sign(canonical(document))).decode("ascii")
    out = {"role": role, "key_id": public_key_id(private_key.public_key()), "signature": sig}
    if signer:
        out["signer"] = signer[:128]
    return out


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise EdgeAgentError(f"{path} is not a readable unencrypted PEM private key ({exc})",
                             hint="give the approver's Ed25519 private key file") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgeAgentError(f"{path} is not an Ed25519 private key",
                             hint="approvers sign with Ed25519 keys")
    return key


def check_approvals(signed: dict[str, Any], required: tuple[str, ...],
                    pinned: tuple[ApproverKey, ...]) -> tuple[Approval, ...]:
    """Every required role approved by a distinct pinned key of that role, or DocumentError.

    A signature that does not verify is refused outright (someone altered the document
    after it was signed), even when other signatures would satisfy the roles.
    """
    if not required:
        raise DocumentError("unapproved", "no roles are required ([deploy] required_roles is "
                                          "empty): the box refuses every deployment")
    data = canonical(signed["document"])
    valid: dict[str, Approval] = {}
    used: set[str] = set()
    for s in signed["signatures"]:
        keys = [k for k in pinned if k.role == s["role"] and k.key_id == s["key_id"]]
        if not keys:
            continue  # an approval by a key we do not pin for that role counts for nothing
        try:
            keys[0].key.verify(base64.b64decode(s["signature"], validate=True), data)
        except (InvalidSignature, binascii.Error, ValueError):
            raise DocumentError("bad_signature", f"the {s['role']} signature by key "
                                                 f"{s['key_id']} does not match the document "
                                                 "(changed after signing)") from None
        if s["role"] in valid or s["key_id"] in used:
            continue
        valid[s["role"]] = Approval(s["role"], s["key_id"], str(s.get("signer", "")))
        used.add(s["key_id"])
    missing = [r for r in required if r not in valid]
    if missing:
        raise DocumentError("unapproved", "missing approval by a pinned key of role(s) "
                                          + ", ".join(missing))
    return tuple(valid[r] for r in required)


# -- is it for us, and may it change what it wants to ---------------------------------

def check_target(dep: Deployment, site: str, device: str,
                 labels: dict[str, str]) -> None:
    if dep.site != site:
        raise DocumentError("mistargeted", f"document targets site {dep.site!r}, this box is "
                                           f"in {site!r}")
    if device in dep.boxes:
        return
    if dep.labels and all(labels.get(k) == v for k, v in dep.labels):
        return
    raise DocumentError("mistargeted", f"document does not target box {device!r} (neither "
                                       "in its box list nor matching its label selector)")


def check_expiry(dep: Deployment, now: float) -> None:
    if dep.expires <= now:
        raise DocumentError("expired", f"document expired at {iso(dep.expires)}")


def check_config(dep: Deployment, allow_sensitive: tuple[str, ...]) -> None:
    for key, value in dep.config:
        kinds = SAFE_CONFIG_KEYS.get(key)
        if kinds is None:
            kinds = SENSITIVE_CONFIG_KEYS.get(key)
            if kinds is None:
                raise DocumentError("config_refused", f"config key {key!r} may not be changed "
                                                      "by a deployment")
            if key not in dep.sensitive:
                raise DocumentError("config_refused", f"config key {key!r} is sensitive and "
                                                      "the document does not declare it in "
                                                      "'sensitive'")
            if key not in allow_sensitive:
                raise DocumentError("config_refused", f"config key {key!r} is sensitive and "
                                                      "this box's policy ([deploy] "
                                                      "allow_sensitive) does not allow it")
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise DocumentError("config_refused", f"config key {key!r}: {value!r} has the "
                                                  "wrong type")
        if key == "logging.level" and value not in LOG_LEVELS:
            raise DocumentError("config_refused", f"logging.level {value!r} is not one of "
                                                  f"{', '.join(LOG_LEVELS)}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise DocumentError("config_refused", f"config key {key!r} must be positive")
