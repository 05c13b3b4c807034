"""The shipped real-size models through the running daemon: a CT series in by pynetdicom
C-STORE (shuffled, tilted) -> the 3-D model's result out over MQTT with its name, version
and sha256; a bad series gets a reason code; a 512x512 radiograph -> the 2-D model of
tens of MB.  The demo stays the default; the new ones are installed with the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from agent.infer.registry import read_package
from agent.infer.signing import load_public_keys
from tests.helpers import EDGE_AGENT, REPO, Box, Daemon, Subscriber, set_config
from tests.helpers.infer import DEMO, DEV_PUB, LARGE, needs_large
from training.sign import sign_package
from training.synth_large import make_image
from training.synth_large import to_dataset as radiograph
from training.synth_volume import make_spec, to_datasets

AVAILABLE = REPO / "models" / "available"
VOLUME = AVAILABLE / "ct-nodule-volume" / "1.0.0"
SEED = 9191  # not a training, validation or test seed of the model


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def signed_copy(package: Path, dst: Path, key: Path) -> Path:
    """The shipped package as a publisher would hand it over, signed by this test's key
    (the shipped signature is by the dev key, whose private half tests never hold)."""
    shutil.copytree(package, dst)
    (dst / "manifest.toml.sig").unlink(missing_ok=True)
    sign_package(dst, key)
    return dst


def setup_box(box: Box, tmp_path: Path, publisher: tuple[Path, Path],
              packages: Iterable[Path]) -> None:
    models = tmp_path / "box-models"
    shutil.copytree(DEMO, models / "lesion-demo" / DEMO.name)
    set_config(box, "models", "dir", json.dumps(str(models)))
    set_config(box, "models", "publisher_keys", json.dumps([str(DEV_PUB), str(publisher[1])]))
    set_config(box, "models", "timeout_seconds", "300")
    set_config(box, "study", "quiet_seconds", "1")
    for pkg in packages:
        src = signed_copy(pkg, tmp_path / "incoming" / pkg.parent.name, publisher[0])
        r = cli("models", "install", str(src), "--config", str(box.config))
        assert r.returncode == 0, r.stderr + r.stdout


def send(box: Box, datasets: list[Dataset], context: str) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = 1 << 20
    ae.add_requested_context(context, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title, max_pdu=1 << 20)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def series(index: int, *, lesion: bool, drop: int | None = None) -> list[Dataset]:
    spec = make_spec(SEED, index, slices=60, lesion=lesion)
    slices = list(to_datasets(spec, SEED, index, tilt_deg=12.0))
    if drop is not None:
        del slices[drop]
    random.Random(index).shuffle(slices)  # the order a modality or router may send
    return slices


def model(ev: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in ev["data"]["models"] if m["name"] == name]
    assert len(found) == 1, ev["data"]
    return found[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verifies(pkg: Path) -> None:
    p = read_package(pkg, load_public_keys((DEV_PUB,)))
    assert p.verification.sha256 == sha(pkg / "model.onnx")
    assert p.verification.ok, p.verification


@needs_large
def test_built_large_package_verifies_against_its_signed_manifest() -> None:
    """The 512 model is built, not committed (make models-large): what the build wrote
    must match the signed manifest in git (or the one the build re-signed)."""
    _verifies(LARGE)
    assert (LARGE / "model.onnx").stat().st_size > 10 * 2**20  # tens of MB, as deployed


def test_shipped_packages_verify_and_are_not_active_by_default(tmp_path: Path) -> None:
    _verifies(VOLUME)
    assert read_package(VOLUME, load_public_keys((DEV_PUB,))).manifest.input.kind == "volume"
    # models/available/ is a catalogue: a box pointed at models/ runs only the demo.
    from agent.infer import InferenceEngine, InferenceSettings
    engine = InferenceEngine(InferenceSettings(REPO / "models", tmp_path / "state",
                                               environment="production",
                                               publisher_keys=(DEV_PUB,)))
    try:
        assert [m["name"] for m in engine.active_models()] == ["lesion-demo"]
    finally:
        engine.close()


def test_volume_model_reads_a_shuffled_ct_series_through_the_daemon(
        box: Box, broker: object, ops: Subscriber, tmp_path: Path,
        publisher: tuple[Path, Path]) -> None:
    setup_box(box, tmp_path, publisher, [VOLUME])
    d = Daemon(box)
    d.start()
    try:
        with_nodule = series(1, lesion=True)
        send(box, with_nodule, CTImageStorage)
        first = ops.wait("results", 1, timeout=180)[0].json()
        send(box, series(2, lesion=False), CTImageStorage)
        second = ops.wait("results", 2, timeout=180)[1].json()
        # One slice missing from the middle: refused with its reason, not resampled.
        send(box, series(3, lesion=True, drop=30), CTImageStorage)
        third = ops.wait("results", 3, timeout=180)[2].json()
    finally:
        d.stop()

    out = model(first, "ct-nodule-volume")
    assert out["version"] == "1.0.0" and out["sha256"] == sha(VOLUME / "model.onnx")
    assert out["instances_used"] == 60
    assert out["finding"] == "pulmonary nodule suspected in the series", out
    assert out["explanation"]["method"] == "cam" and out["explanation"]["slices"] == 60
    # The explanation names the slice of the nodule: it lies within the nodule's extent.
    spec = make_spec(SEED, 1, slices=60, lesion=True)
    assert spec.nodule is not None
    k = out["explanation"]["slice"] - 1
    assert abs(k * spec.spacing - spec.nodule.centre[2]) <= spec.nodule.radius + 2 * spec.spacing
    assert model(first, "lesion-demo")  # the default model still reads the slices

    neg = model(second, "ct-nodule-volume")
    assert neg["finding"] == "no nodule found in the series", neg

    codes = [f["code"] for f in third["data"]["failures"]]
    assert codes == ["volume-missing-slices"], third["data"]
    assert third["data"]["failures"][0]["model"] == "ct-nodule-volume"
    # De-identification and the egress guard applied as to any result.
    blob = "\n".join(m.payload.decode() + m.topic for m in ops.messages)
    assert "Volume^Phantom" not in blob and "Phantom" not in blob and f"VOL-{SEED}" not in blob
    assert with_nodule[0].StudyInstanceUID not in blob
    assert "Phantom" not in d.log_text()


@needs_large
def test_large_2d_model_reads_a_512_radiograph_through_the_daemon(
        box: Box, broker: object, ops: Subscriber, tmp_path: Path,
        publisher: tuple[Path, Path]) -> None:
    setup_box(box, tmp_path, publisher, [LARGE])
    r = cli("models", "list", "--config", str(box.config), "--json")
    listed = {(m["name"], m["version"], m["active"]) for m in json.loads(r.stdout)}
    assert ("cxr-lesion-512", "1.0.0", True) in listed and ("lesion-demo", "1.1.0", True) in listed
    stored, box_xy = make_image(SEED, 4, lesion=True)
    assert box_xy is not None
    d = Daemon(box)
    d.start()
    try:
        send(box, [radiograph(stored)], DigitalXRayImageStorageForPresentation)
        ev = ops.wait("results", 1, timeout=180)[0].json()
    finally:
        d.stop()
    out = model(ev, "cxr-lesion-512")
    assert out["version"] == "1.0.0" and out["sha256"] == sha(LARGE / "model.onnx")
    assert out["finding"] == "lesion suspected on the radiograph", out
    assert out["explanation"]["image_size"] == [512, 512]
    x, y, w, h = out["explanation"]["bbox"]
    lx, ly, lw, lh = box_xy
    assert x <= lx + lw and lx <= x + w and y <= ly + lh and ly <= y + h, "box on the lesion"
    assert "Large^Phantom" not in "\n".join(m.payload.decode() for m in ops.messages)


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_volume_engine_refuses_uneven_spacing_without_crashing(
        tmp_path: Path, publisher: tuple[Path, Path], tilt: float) -> None:
    """Through the engine (no daemon): a series with jittered positions gets the reason
    code, and the next, regular series still runs."""
    from agent.infer import InferenceEngine, InferenceSettings
    from tests.helpers.infer import study_of

    models = tmp_path / "models"
    signed_copy(VOLUME, models / "ct-nodule-volume" / "1.0.0", publisher[0])
    engine = InferenceEngine(InferenceSettings(models, tmp_path / "state",
                                               environment="production",
                                               publisher_keys=(publisher[1],),
                                               timeout_seconds=300))
    try:
        spec = make_spec(SEED, 5, slices=40, lesion=False)
        bad = list(to_datasets(spec, SEED, 5, tilt_deg=tilt))
        rng = np.random.default_rng(5)
        normal = np.cross(bad[0].ImageOrientationPatient[:3], bad[0].ImageOrientationPatient[3:])
        for ds in bad[1:]:
            shift = normal * float(rng.uniform(-0.2, 0.2)) * spec.spacing  # gaps 0.6-1.4x
            ds.ImagePositionPatient = [float(a + b) for a, b in
                                       zip(ds.ImagePositionPatient, shift, strict=True)]
        outputs, failures = engine.infer(study_of(tuple(bad)))
        assert not outputs and [f.code for f in failures] == ["volume-uneven-spacing"]
        good = list(to_datasets(spec, SEED, 5, tilt_deg=tilt))
        random.Random(5).shuffle(good)
        outputs, failures = engine.infer(study_of(tuple(good)))
        assert not failures and outputs[0].instances_used == 40
    finally:
        engine.close()
