"""Fixtures for the inference tests: real packages, real keys, real onnxruntime."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.infer import DEMO, Events
from training.sign import keygen, sign_package


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway publisher keypair: (private PEM, public PEM)."""
    pub = tmp_path / "keys" / "publisher.pub"
    pub.parent.mkdir()
    return keygen(tmp_path / "keys" / "private", pub), pub


@pytest.fixture
def make_package(tmp_path: Path, publisher: tuple[Path, Path]) -> Callable[..., Path]:
    """Build a signed package from the demo one, optionally with another version,
    model file or manifest text, signed by the test publisher."""

    def make(version: str = "1.0.0", *, onnx: bytes | None = None,
             edit: Callable[[str], str] | None = None, sign: bool = True,
             where: Path | None = None) -> Path:
        dst = where or tmp_path / "src" / version
        dst.mkdir(parents=True)
        for name in ("MODEL_CARD.md", "model.onnx"):
            shutil.copy2(DEMO / name, dst / name)
        if onnx is not None:
            (dst / "model.onnx").write_bytes(onnx)
        text = (DEMO / "manifest.toml").read_text()
        text = re.sub(r'^version = ".*"$', f'version = "{version}"', text, flags=re.M)
        sha = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
        text = re.sub(r'^sha256 = ".*"$', f'sha256 = "{sha}"', text, flags=re.M)
        if edit is not None:
            text = edit(text)
        (dst / "manifest.toml").write_text(text)
        if sign:
            sign_package(dst, publisher[0])
        return dst

    return make


@pytest.fixture
def demo_models(tmp_path: Path) -> Path:
    """A models dir holding a copy of the shipped, dev-key-signed demo package."""
    root = tmp_path / "models"
    shutil.copytree(DEMO, root / "lesion-demo" / DEMO.name)
    return root
