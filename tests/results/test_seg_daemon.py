"""A mask model's output as DICOM SEG in the hospital's PACS, through the running daemon.

The shipped segmentation model (models/available/lesion-seg) is installed with the
CLI; a modality sends a CT study with a planted lesion; Orthanc (real, checked through
its REST API) receives a SEG in the ORIGINAL study whose frame references the source
image it was computed on and whose pixels overlap the planted lesion.  The MQTT
result carries the mask's area fraction only, and no PHI (canary sweep).  A model
whose mask output has the wrong shape fails that study with a clear reason code,
audited, and the daemon goes on."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import pydicom
import pytest
from onnx import helper, numpy_helper

from agent.infer.signing import file_sha256
from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Daemon,
    Subscriber,
    audit_events,
    set_config,
    storescu,
)
from tests.helpers.delivery import add_destination, enable_delivery
from tests.helpers.orthanc import Orthanc
from tests.helpers.results import (
    ACCESSION,
    BIRTH,
    PATIENT_ID,
    PATIENT_NAME,
    REFERRING,
    original_study,
)
from training.sign import keygen, sign_package
from training.synth import make_case

SEG_MODEL = REPO / "models" / "available" / "lesion-seg" / "1.0.0"
DEMO = REPO / "models" / "lesion-demo" / "1.1.0"
DEV_PUB = REPO / "models" / "dev-publisher.pub"
SEED = 41  # original_study's cases: make_case(SEED, i, kind="ct", noise="low", lesion=True)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

pytestmark = [pytest.mark.peer("storescu", "Orthanc")]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def _models(box: Box, tmp_path: Path, packages: list[Path], pub: Path | None = None) -> None:
    """The box runs the demo and installs ``packages`` with the CLI (as an operator)."""
    models = tmp_path / "box-models"
    shutil.copytree(DEMO, models / "lesion-demo" / DEMO.name)
    keys = [str(DEV_PUB)] + ([str(pub)] if pub else [])
    set_config(box, "models", "dir", json.dumps(str(models)))
    set_config(box, "models", "publisher_keys", json.dumps(keys))
    set_config(box, "study", "quiet_seconds", "1")
    for pkg in packages:
        r = _cli("models", "install", str(pkg), "--config", str(box.config))
        assert r.returncode == 0, r.stderr + r.stdout


def _model(ev: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in ev["data"]["models"] if m["name"] == name]
    assert len(found) == 1, ev["data"]
    return found[0]


def _raw(pacs: Orthanc, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{pacs.http}{path}", timeout=60) as r:
        return bytes(r.read())


def test_seg_of_a_mask_model_reaches_orthanc_in_the_original_study(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    originals = original_study(tmp_path / "study", seed=SEED)
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        for f in originals.files:
            pacs.upload(f)
        (study_id,) = pacs.get("/studies")
        _models(box, tmp_path, [SEG_MODEL])
        enable_delivery(box)
        add_destination(box, "pacs", pacs.aet, pacs.dicom, kinds='["sr", "seg"]')
        daemon = Daemon(box)
        daemon.start()
        try:
            assert storescu(box.dicom_port, list(originals.files)).returncode == 0
            msgs = ops.wait("results", 2, timeout=240)
        finally:
            daemon.stop()
        stored = pacs.get(f"/studies/{study_id}/instances")
        segs = [i for i in stored
                if pacs.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"]
                == SEGMENTATION_STORAGE]
        assert len(segs) == 1, [i["ID"] for i in stored]
        seg = pydicom.dcmread(io.BytesIO(_raw(pacs, f"/instances/{segs[0]['ID']}/file")))
    finally:
        pacs.stop()

    events = [m.json() for m in msgs]
    (result,) = [e for e in events if e["type"].startswith("org.edge-agent.result.v")]
    out = _model(result, "lesion-seg")
    assert out["finding"] == "lesion segmented", out
    # Over MQTT: the mask's size as a share of the image, never its pixels.
    summary = out["explanation"]["mask"]
    assert set(summary) == {"pixels", "area_fraction"}
    assert 0 < summary["area_fraction"] < 0.05 and summary["pixels"] > 0
    schema = json.loads((REPO / "docs" / "schemas" / "result.schema.json").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(result["data"])

    # In the PACS: the SEG sits in the original study, of the original patient.
    assert seg.StudyInstanceUID == originals.study_uid
    assert seg.PatientID == PATIENT_ID and str(seg.PatientName) == PATIENT_NAME
    assert seg.AccessionNumber == ACCESSION
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    # Its frame references the source image the mask was computed on...
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert source in originals.sop_uids
    k = originals.sop_uids.index(source)
    # ...and its pixels overlap the lesion planted in that image.
    mask = seg.pixel_array.astype(bool)
    mask = mask[0] if mask.ndim == 3 else mask
    planted = make_case(SEED, k, kind="ct", noise="low", lesion=True).lesion_mask
    assert planted is not None and mask.shape == planted.shape
    inter = int((mask & planted).sum())
    dice = 2 * inter / (int(mask.sum()) + int(planted.sum()))
    assert dice > 0.5, f"SEG Dice with the planted lesion {dice:.2f}"
    assert summary["pixels"] == int(mask.sum())

    # PHI reached the PACS (above) and no MQTT message or log line.
    canaries = [PATIENT_NAME, PATIENT_ID, ACCESSION, BIRTH, REFERRING, originals.study_uid,
                *originals.sop_uids, *PATIENT_NAME.split("^")]
    every_message = b"\n".join(m.payload + m.topic.encode() for m in ops.messages).decode()
    log = daemon.log_text()
    for value in canaries:
        assert value not in every_message, "PHI in an MQTT message"
        assert value not in log, "PHI in the daemon's log"
    written = [e for e in audit_events(box, 2000) if e["event"] == "results.link_written"]
    assert written and written[0]["details"]["masks"] == 1


def _fixed_batch_copy(src: Path, dst: Path, key: Path) -> Path:
    """lesion-seg as if exported with a fixed batch of one: its mask output holds the
    first image's map whatever the batch (the warm-up's single image passes)."""
    shutil.copytree(src, dst)
    (dst / "manifest.toml.sig").unlink(missing_ok=True)
    proto = onnx.load(str(dst / "model.onnx"))
    g = proto.graph
    for node in g.node:
        node.output[:] = ["mask_all" if o == "mask" else o for o in node.output]
    for name, value in (("s0", [0]), ("s1", [1]), ("ax", [0])):
        g.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    g.node.append(helper.make_node("Slice", ["mask_all", "s0", "s1", "ax"], ["mask"]))
    for o in g.output:
        if o.name == "mask":
            o.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.checker.check_model(proto)
    (dst / "model.onnx").write_bytes(proto.SerializeToString())
    text = (dst / "manifest.toml").read_text()
    old = file_sha256(src / "model.onnx")
    (dst / "manifest.toml").write_text(text.replace(old, file_sha256(dst / "model.onnx")))
    sign_package(dst, key)
    return dst


def test_a_mask_of_the_wrong_shape_fails_the_model_clearly_and_the_daemon_goes_on(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    pub = tmp_path / "keys" / "publisher.pub"
    pub.parent.mkdir()
    key = keygen(tmp_path / "keys" / "private", pub)
    broken = _fixed_batch_copy(SEG_MODEL, tmp_path / "incoming" / "1.0.0", key)
    _models(box, tmp_path, [broken], pub)
    enable_delivery(box)
    daemon = Daemon(box)
    daemon.start()
    try:
        first = original_study(tmp_path / "s1", seed=SEED)  # 3 images: one batch of 3
        assert storescu(box.dicom_port, list(first.files)).returncode == 0
        one = ops.wait("results", 1, timeout=240)[0].json()
        second = original_study(tmp_path / "s2", seed=SEED + 1)
        assert storescu(box.dicom_port, list(second.files)).returncode == 0
        two = ops.wait("results", 2, timeout=240)[1].json()
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
    finally:
        daemon.stop()
    for ev in (one, two):
        (failure,) = ev["data"]["failures"]
        assert failure["model"] == "lesion-seg" and failure["code"] == "output-mismatch"
        assert _model(ev, "lesion-demo")  # the other model still reads the study
    # Audited (the record's free text is redacted in `audit tail`; the code is not)...
    failed = [e for e in audit_events(box, 2000) if e["event"] == "model.failed"]
    assert [(e["details"]["model"], e["details"]["code"]) for e in failed] == [
        ("lesion-seg", "output-mismatch")] * 2
    # ...and the operator's log says what is wrong with the model.
    assert daemon.log_text().count("mask output 'mask' has 1 maps for 3 images") == 2
