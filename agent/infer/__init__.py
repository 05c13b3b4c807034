"""Local inference on de-identified studies: signed model packages, onnxruntime,
explanations, uncertainty and drift aggregates.  See docs/models.md.

May import: agent.crypto, agent.errors, agent.types, agent.dicomraw, agent.pixelbound,
agent.uplink.vocabulary (the fixed words a finding or failure may use),
agent.subgroups (which subgroup attributes are captured before de-identification). Sees only de-identified data sets.
"""

from agent.infer.engine import InferenceEngine, InferenceSettings
from agent.infer.manifest import Manifest, load_manifest, parse_manifest
from agent.infer.registry import ModelPackage, Registry
from agent.infer.signing import Verification, load_public_key, load_public_keys

__all__ = [
    "InferenceEngine",
    "InferenceSettings",
    "Manifest",
    "ModelPackage",
    "Registry",
    "Verification",
    "load_manifest",
    "load_public_key",
    "load_public_keys",
    "parse_manifest",
]
