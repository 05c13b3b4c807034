"""Build the 512x512 catalogue model's ONNX file, which git does not carry (28 MB).

    make models-large        # = .venv/bin/python -m training.build_large (needs torch)

The package's manifest (with the file's sha256), its signature, model card and
metrics are committed; only ``model.onnx`` is built.  Training is deterministic
(training/train_large.py: fixed seeds, deterministic algorithms, one thread), so
on the pinned torch the built file has the manifest's sha256 and the committed
signature holds: the file is put next to it and nothing else changes.

When the bytes differ (another torch, CPU or BLAS), the committed signature cannot
cover the file.  For the dev tier only, the build then writes the fresh run's
manifest, model card and metrics in the package and re-signs the manifest with the
dev publisher key (``training/.keys/dev-publisher.pem``, never committed), and says
so: ``git diff`` then shows what changed.  Production boxes never pin the dev key.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from agent.errors import ModelError
from agent.infer.manifest import load_manifest
from agent.infer.signing import file_sha256

PACKAGE = Path("models/available/cxr-lesion-512/1.0.0")
DEV_KEY = Path("training/.keys/dev-publisher.pem")
FRESH = ("model.onnx", "manifest.toml", "MODEL_CARD.md", "metrics.json")


def install(built: Path, package: Path, key: Path) -> str:
    """Put the built package's file into ``package``; re-sign only when it must.
    Returns what was done, for the operator."""
    pinned = load_manifest(package / "manifest.toml").sha256
    got = file_sha256(built / "model.onnx")
    if got == pinned:
        shutil.copy2(built / "model.onnx", package / "model.onnx")
        return f"built {package}/model.onnx: sha256 {got} matches the signed manifest"
    if not key.is_file():
        raise ModelError(f"the built model.onnx (sha256 {got[:12]}…) is not the one the "
                         f"committed manifest pins ({pinned[:12]}…), and there is no dev "
                         f"publisher key at {key} to sign a manifest for it",
                         hint="copy the dev key into training/.keys/ (or train with the "
                              "pinned torch, pyproject.toml's [train] extra)")
    from training.sign import sign_package

    for name in FRESH:
        shutil.copy2(built / name, package / name)
    sign_package(package, key)
    return (f"built {package}/model.onnx, sha256 {got}: NOT the committed one ({pinned}); "
            f"the fresh manifest, card and metrics are in {package}, re-signed with the dev "
            f"key {key} (dev tier only; see git diff)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, default=PACKAGE)
    ap.add_argument("--key", type=Path, default=DEV_KEY,
                    help="dev publisher key, used only when the bytes differ")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401 - only to say what is missing, before minutes of work
    except ImportError:
        print("error: training needs torch: .venv/bin/pip install -e '.[train]'",
              file=sys.stderr)
        return 2
    from training import train_large

    with tempfile.TemporaryDirectory(prefix="cxr-lesion-512-") as tmp:
        built = Path(tmp) / "1.0.0"
        train_large.main(["--out", str(built)])
        try:
            print(install(built, args.package, args.key))
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
