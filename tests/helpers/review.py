"""Helpers for the review tests: a signed test model that flags every result, a
reviewer client, studies, and the box's acknowledgements."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.review import verdicts
from tests.helpers import EDGE_AGENT, REPO, Box, Subscriber, set_config, wait_for
from tests.helpers.mqtt import mqtt_client, publish_acked
from training.sign import keygen, sign_package

DEMO = REPO / "models" / "lesion-demo" / "1.1.0"
BOX = "dev-site/dev-box"
TOPIC = f"edge/{BOX}"
ACCEPTANCE = "\n[acceptance]\nsensitivity = 0.8\nspecificity = 0.8\n"


def flagging_model(box: Box, tmp: Path, version: str = "1.1.1") -> Path:
    """A copy of the demo model whose review band is [0, 1] (every result is flagged) and
    with acceptance thresholds, signed by a throwaway publisher the box pins."""
    keys = tmp / "publisher"
    pub = keys / "publisher.pub"
    keys.mkdir(parents=True)
    private = keygen(keys / "private", pub)
    dst = tmp / "models" / "lesion-demo" / version
    dst.mkdir(parents=True)
    for name in ("MODEL_CARD.md", "model.onnx"):
        shutil.copy2(DEMO / name, dst / name)
    text = (DEMO / "manifest.toml").read_text()
    text = re.sub(r'^version = ".*"$', f'version = "{version}"', text, flags=re.M)
    sha = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
    text = re.sub(r'^sha256 = ".*"$', f'sha256 = "{sha}"', text, flags=re.M)
    text = re.sub(r"^review_band = .*$", "review_band = [0.0, 1.0]", text, flags=re.M)
    # The shipped thresholds (0.90) give way to the test's: the [acceptance] table is last.
    text = text.split("\n[acceptance]\n")[0]
    (dst / "manifest.toml").write_text(text + ACCEPTANCE)
    sign_package(dst, private)
    set_config(box, "models", "dir", json.dumps(str(tmp / "models")))
    set_config(box, "models", "publisher_keys", json.dumps([str(pub)]))
    return dst


def send_studies(port: int, names: list[str],
                 attributes: list[dict[str, str]] | None = None) -> list[str]:
    """One CT study per patient name (with ``attributes[i]`` set on the i-th, e.g. its
    PatientSex and PatientAge); returns the StudyInstanceUIDs."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, src.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE_AGENT")
    assert assoc.is_established
    uids = []
    try:
        for n, name in enumerate(names):
            ds = copy.deepcopy(src)
            for keyword, value in (attributes[n] if attributes else {}).items():
                if value:
                    setattr(ds, keyword, value)
                elif keyword in ds:
                    delattr(ds, keyword)
            ds.PatientName = name
            ds.PatientID = "ID-" + name.split("^")[0]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            assert assoc.send_c_store(ds).Status == 0x0000
            uids.append(str(ds.StudyInstanceUID))
    finally:
        assoc.release()
    return uids


class ReviewerClient:
    """A reviewer's MQTT 5 client (a dev box reviewer certificate, whose CN is its stem).

    It writes its own review topic (``{box}/review/<CN>``, the only one the broker's ACL
    lets it write) unless the test names another (``as_cn``) to be refused."""

    def __init__(self, box: Box, stem: str = "reviewer", client_id: str | None = None) -> None:
        self.cn = stem
        self.client = mqtt_client(box, box.pki / f"{stem}.pem", box.pki / f"{stem}.key",
                                  client_id or stem)

    def send(self, ev: dict[str, Any] | bytes, *, as_cn: str | None = None) -> int:
        payload = ev if isinstance(ev, bytes) else json.dumps(ev).encode()
        return publish_acked(self.client, review_topic(as_cn or self.cn), payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def review_topic(cn: str) -> str:
    """The review topic of the reviewer whose certificate CN is ``cn``."""
    return f"{TOPIC}/review/{cn}"


def verdict(result_id: str, what: str = "agreed", *, reviewer: str = "reviewer",
            **kw: Any) -> dict[str, Any]:
    return verdicts.build(reviewer=reviewer, box=BOX, result_id=result_id, verdict=what, **kw)


def acks(ops: Subscriber) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in ops.on("telemetry"):
        out += m.json()["data"].get("review", {}).get("acks", [])
    return out


def ack_of(ops: Subscriber, verdict_id: str, timeout: float = 60) -> dict[str, Any]:
    return dict(wait_for(lambda: next((a for a in acks(ops) if a["verdict_id"] == verdict_id),
                                      None), timeout, f"the box's acknowledgement of {verdict_id}"))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*EDGE_AGENT, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    if check:
        assert out.returncode == 0, (out.stdout, out.stderr)
    return out


def ops_config(box: Box, stem: str) -> Path:
    """ops.toml with another read-only ops identity (one session per certificate: the
    test's own subscriber holds 'ops')."""
    text = Path(box.info["ops_config"]).read_text()
    text = text.replace(f'{box.pki / "ops.pem"}', f'{box.pki / (stem + ".pem")}')
    text = text.replace(f'{box.pki / "ops.key"}', f'{box.pki / (stem + ".key")}')
    path = box.root / f"ops-{stem}.toml"
    path.write_text(text)
    return path
