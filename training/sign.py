"""Dev publisher key and manifest signing for model packages.

    .venv/bin/python -m training.sign keygen [--keys-dir training/.keys]
                                             [--pub models/dev-publisher.pub]
    .venv/bin/python -m training.sign sign models/lesion-demo/1.0.0 \
                                           --key training/.keys/dev-publisher.pem

The private key stays out of git (training/.keys/ is ignored).  Signing first
checks that the manifest's sha256 matches model.onnx, so a publisher cannot
sign a manifest that points at a different file by mistake.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.crypto import write_secret_file
from agent.errors import ModelError
from agent.infer.manifest import parse_manifest
from agent.infer.signing import SIG_SUFFIX, file_sha256, sign_manifest


def keygen(keys_dir: Path, pub_path: Path) -> Path:
    priv_path = keys_dir / "dev-publisher.pem"
    if priv_path.exists():
        raise ModelError(f"{priv_path} already exists", hint="delete it to make a new dev key")
    key = Ed25519PrivateKey.generate()
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret_file(priv_path, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelError(f"{path} is not an Ed25519 private key")
    return key


def sign_package(package: Path, key_path: Path) -> Path:
    manifest_path = package / "manifest.toml"
    raw = manifest_path.read_bytes()
    manifest = parse_manifest(raw, source=str(manifest_path))
    actual = file_sha256(package / manifest.model_file)
    if actual != manifest.sha256:
        raise ModelError(f"{manifest_path}: sha256 {manifest.sha256[:12]}… does not match "
                         f"{manifest.model_file} ({actual[:12]}…)",
                         hint="update model.sha256 in the manifest before signing")
    sig_path = manifest_path.with_name(manifest_path.name + SIG_SUFFIX)
    sig_path.write_bytes(sign_manifest(raw, load_private_key(key_path)))
    return sig_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen")
    kg.add_argument("--keys-dir", type=Path, default=Path("training/.keys"))
    kg.add_argument("--pub", type=Path, default=Path("models/dev-publisher.pub"))
    sg = sub.add_parser("sign")
    sg.add_argument("package", type=Path)
    sg.add_argument("--key", type=Path, default=Path("training/.keys/dev-publisher.pem"))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "keygen":
            print(f"wrote {keygen(args.keys_dir, args.pub)} and {args.pub}")
        else:
            print(f"wrote {sign_package(args.package, args.key)}")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
