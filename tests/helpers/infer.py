"""Helpers for the inference tests: paths, an audit recorder, synthetic studies."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from agent.types import DeidentifiedStudy
from tests.helpers.peers import Box, set_config
from training.synth import SynthCase, to_dataset

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "lesion-demo" / "1.1.0"  # the shipped demo: explains from its map
PREVIOUS = REPO / "models" / "lesion-demo" / "1.0.0"  # shipped too: occlusion, flip spread
DEV_PUB = REPO / "models" / "dev-publisher.pub"
# The 512x512 catalogue model: its 28 MB ONNX file is not in git; `make models-large`
# trains it (dev-only, needs torch) next to its committed, signed manifest.
LARGE = REPO / "models" / "available" / "cxr-lesion-512" / "1.0.0"
LARGE_MISSING = "cxr-lesion-512 not built: run make models-large (needs torch)"
# Skips (before any fixture starts a broker) a test that needs the built package.
needs_large = pytest.mark.skipif(not (LARGE / "model.onnx").is_file(), reason=LARGE_MISSING)


class Events:
    """An audit sink that remembers what it was told."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, object]]] = []

    def __call__(self, event: str, details: dict[str, object]) -> None:
        self.items.append((event, details))

    def named(self, event: str) -> list[dict[str, object]]:
        return [d for e, d in self.items if e == event]


PackageMaker = Callable[..., Path]


def with_explanation(section: str) -> Callable[[str], str]:
    """A manifest edit (for ``make_package(edit=...)``) replacing the [explanation] table,
    e.g. for a test model that computes no map."""
    return lambda text: re.sub(r"\[explanation\]\n(?:[^[\n].*\n|\n)*", section + "\n", text)


NO_EXPLANATION = with_explanation('[explanation]\nmethod = "none"\n')


def roundtrip(ds: Dataset) -> Dataset:
    """Write and re-read as Part 10, so tests decode real DICOM bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def study(cases: list[SynthCase], ref: str = "study-ref") -> DeidentifiedStudy:
    datasets = tuple(roundtrip(to_dataset(c, instance_number=i + 1, study_seed=ref))
                     for i, c in enumerate(cases))
    return study_of(datasets, ref)


def study_of(datasets: tuple[Dataset, ...], ref: str = "study-ref") -> DeidentifiedStudy:
    return DeidentifiedStudy(
        study_ref=ref, patient_ref="patient-ref", version=1, instances=datasets,
        quarantined=(), failed=(), method="test", options=(),
        received_instances=len(datasets), first_received_at=0.0, last_received_at=0.0,
    )


def box_with_models(box: Box, tmp_path: Path, publisher: tuple[Path, Path]) -> Path:
    """Point the box at a models dir of its own (never the repo's) holding the shipped
    1.0.0, that pins both the dev publisher and this test's publisher key (tests then
    install 1.1.0 and up built by make_package)."""
    models = tmp_path / "box-models"
    shutil.copytree(PREVIOUS, models / "lesion-demo" / PREVIOUS.name)
    set_config(box, "models", "dir", json.dumps(str(models)))
    set_config(box, "models", "publisher_keys", json.dumps([str(DEV_PUB), str(publisher[1])]))
    return models


def readable_config(box: Box, folder: Path) -> Path:
    """A copy of agent.toml with absolute paths that other users can read (production:
    /etc/edge-agent/agent.toml 0640 root:edge-agent)."""
    shared = folder / "agent.toml"
    shared.write_text(box.config.read_text().replace('"state"', json.dumps(str(box.state)))
                      .replace('"keys/', json.dumps(str(box.root / "keys"))[:-1] + "/")
                      .replace('"pki/', json.dumps(str(box.pki))[:-1] + "/"))
    shared.chmod(0o644)
    return shared
