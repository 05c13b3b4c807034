"""The deployment document's rules without a broker: approvals by distinct pinned keys
per role, expiry, the config subset and the box's policy, the overlay the config
loader applies, the resumable download and the archive the box unpacks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.deploy import archive, overlay
from agent.deploy.chunks import ChunkError, Download
from agent.deploy.document import (
    ApproverKey,
    DocumentError,
    PackageRef,
    check_approvals,
    check_config,
    check_expiry,
    check_target,
    iso,
    parse,
    sign,
)
from agent.errors import EdgeAgentError
from agent.infer.signing import public_key_id
from tests.helpers import REPO

ROLES = ("publisher", "clinical")


def _doc(**extra: Any) -> dict[str, Any]:
    now = time.time()
    d: dict[str, Any] = {"schema": 1, "id": "rel", "revision": 3, "action": "deploy",
                         "issued": iso(now), "expires": iso(now + 3600),
                         "target": {"site": "s", "boxes": ["a"], "labels": {"ring": "canary"}},
                         "config": {"logging.level": "DEBUG"}}
    d.update(extra)
    return d


def _keys() -> tuple[dict[str, Ed25519PrivateKey], tuple[ApproverKey, ...]]:
    priv = {r: Ed25519PrivateKey.generate() for r in ROLES}
    return priv, tuple(ApproverKey(r, public_key_id(k.public_key()), k.public_key(), r)
                       for r, k in priv.items())


def test_the_box_and_the_docs_publish_the_same_schema() -> None:
    box = (REPO / "agent" / "deploy" / "deployment.schema.json").read_text()
    assert box == (REPO / "docs" / "schemas" / "deployment.schema.json").read_text()


def test_every_required_role_by_a_distinct_pinned_key() -> None:
    priv, pinned = _keys()
    doc = _doc()
    ok = {"document": doc, "signatures": [sign(doc, r, priv[r]) for r in ROLES]}
    assert [a.role for a in check_approvals(ok, ROLES, pinned)] == list(ROLES)

    def refused(signed: dict[str, Any], pins: tuple[ApproverKey, ...] = pinned) -> str:
        with pytest.raises(DocumentError) as e:
            check_approvals(signed, ROLES, pins)
        return e.value.reason

    one = {"document": doc, "signatures": [sign(doc, "publisher", priv["publisher"])]}
    assert refused(one) == "unapproved"
    # A key pinned for both roles approves only one of them.
    shared = priv["publisher"]
    both = tuple(ApproverKey(r, public_key_id(shared.public_key()), shared.public_key(), r)
                 for r in ROLES)
    twice = {"document": doc, "signatures": [sign(doc, r, shared) for r in ROLES]}
    assert refused(twice, both) == "unapproved"
    # A key nobody pinned counts for nothing; an edit after signing is refused outright.
    stranger = Ed25519PrivateKey.generate()
    assert refused({"document": doc, "signatures": [sign(doc, r, stranger) for r in ROLES]}) \
        == "unapproved"
    edited = json.loads(json.dumps(ok))
    edited["document"]["revision"] = 4
    assert refused(edited) == "bad_signature"


def test_expiry_target_and_shape() -> None:
    priv, _ = _keys()
    doc = _doc(expires=iso(time.time() - 1))
    dep = parse({"document": doc, "signatures": [sign(doc, "publisher", priv["publisher"])]})
    with pytest.raises(DocumentError, match="expired"):
        check_expiry(dep, time.time())
    check_target(dep, "s", "a", {})
    check_target(dep, "s", "z", {"ring": "canary"})  # by label
    for site, box, labels in (("t", "a", {}), ("s", "z", {"ring": "main"})):
        with pytest.raises(DocumentError) as e:
            check_target(dep, site, box, labels)
        assert e.value.reason == "mistargeted"
    with pytest.raises(DocumentError) as e:
        parse({"document": {**doc, "target": {"site": "s"}}, "signatures": []})
    assert e.value.reason == "malformed"


@pytest.mark.parametrize(("config", "sensitive", "allow", "ok"), [
    ({"logging.level": "DEBUG", "study.quiet_seconds": 5}, [], (), True),
    ({"keys.kek": "/tmp/k"}, ["keys.kek"], ("keys.kek",), False),  # never, whatever is said
    ({"mqtt.host": "x"}, ["mqtt.host"], ("mqtt.host",), False),
    ({"atna.host": "x"}, [], ("atna.host",), False),  # not declared by the document
    ({"atna.host": "x"}, ["atna.host"], (), False),  # not allowed by the box
    ({"atna.host": "x"}, ["atna.host"], ("atna.host",), True),
    ({"logging.level": "LOUD"}, [], (), False),
    ({"study.quiet_seconds": -1}, [], (), False),
])
def test_config_changes_stay_in_the_safe_subset(config: dict[str, Any], sensitive: list[str],
                                                allow: tuple[str, ...], ok: bool) -> None:
    dep = parse({"document": _doc(config=config, sensitive=sensitive), "signatures": []})
    if ok:
        check_config(dep, allow)
    else:
        with pytest.raises(DocumentError) as e:
            check_config(dep, allow)
        assert e.value.reason == "config_refused"


def test_a_tampered_overlay_cannot_reach_keys_or_destinations(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    overlay.write(tmp_path / "state", {"study.quiet_seconds": 7, "mqtt.host": "evil",
                                       "keys.kek": "/tmp/k", "atna.host": "x"},
                  deployment="d", revision=1)
    data = {"box": {"state_dir": "state"}, "mqtt": {"host": "good"}, "keys": {"kek": "k"}}
    merged = overlay.apply(data, conf)
    assert merged["study"] == {"quiet_seconds": 7}
    assert merged["mqtt"] == {"host": "good"} and merged["keys"] == {"kek": "k"}
    assert "atna" not in merged
    allowed = overlay.apply({**data, "deploy": {"allow_sensitive": ["atna.host"]}}, conf)
    assert allowed["atna"] == {"host": "x"}


def _ref(data: bytes, size: int = 1024) -> PackageRef:
    chunks = tuple(hashlib.sha256(data[i:i + size]).hexdigest()
                   for i in range(0, len(data), size))
    return PackageRef("m", "1", hashlib.sha256(data).hexdigest(), len(data), size, chunks)


def test_download_checks_each_chunk_and_recovers_after_a_torn_write(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20  # 5 chunks, the last one short
    ref = _ref(data)
    dl = Download(tmp_path, ref)
    assert dl.accept(0, data[:1024]) and dl.accept(1, data[1024:2048])
    assert not dl.accept(3, data[3072:4096])  # a gap: not written
    with pytest.raises(ChunkError):
        dl.accept(2, b"x" * 1024)
    with pytest.raises(ChunkError):
        dl.accept(2, data[2048:2050])
    with dl.path.open("ab") as fh:  # kill -9 in the middle of chunk 2
        fh.write(data[2048:2500])
    again = Download(tmp_path, ref)
    assert again.have == 2 and again.path.stat().st_size == 2048
    for i in range(2, 5):
        assert again.accept(i, data[i * 1024:(i + 1) * 1024])
    assert again.finish().read_bytes() == data


def test_unpack_refuses_anything_but_plain_files(tmp_path: Path) -> None:
    def tar(*members: tarfile.TarInfo) -> Path:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for m in members:
                t.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)
        p = tmp_path / f"a{len(list(tmp_path.iterdir()))}.tar"
        p.write_bytes(buf.getvalue())
        return p

    up = tarfile.TarInfo("../evil")
    up.size = 1
    link = tarfile.TarInfo("model.onnx")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    for bad in (tar(up), tar(link)):
        with pytest.raises(EdgeAgentError):
            archive.unpack(bad, tmp_path / f"out-{bad.stem}")
    good = tarfile.TarInfo("manifest.toml")
    good.size = 3
    archive.unpack(tar(good), tmp_path / "ok")
    assert (tmp_path / "ok" / "manifest.toml").read_bytes() == b"xxx"


def test_soak_gates_review_rate_drift_and_latency() -> None:
    from agent.deploy.gates import SoakWatch

    gates = {"max_inference_errors": 1, "max_needs_review_rate": 0.5,
             "min_studies_for_rate": 4, "max_drift_psi": 0.25, "max_latency_ms_p95": 1000}
    dep = parse({"document": _doc(gates=gates), "signatures": []})
    w = SoakWatch(("m",))
    assert not w.observe("model.failed", {"model": "other"})  # not a deployed model
    assert w.observe("model.failed", {"model": "m"})
    assert w.breach(dep, [], {}) is None  # one error allowed
    for n in range(4):
        w.observe("inference.done", {"model": "m", "study": f"s{n}", "needs_review": n < 3})
    b = w.breach(dep, [10.0] * 4, {})
    assert b is not None and (b.gate, b.observed) == ("needs_review_rate", 0.75)
    calm = SoakWatch(("m",))
    for n in range(4):
        calm.observe("inference.done", {"model": "m", "study": f"s{n}", "needs_review": False})
    drift = {"m": {"psi_input": 0.1, "psi_output": 0.4}}
    assert calm.breach(dep, [10.0] * 4, drift).gate == "drift_psi"  # type: ignore[union-attr]
    assert calm.breach(dep, [10.0] * 4, {"m": {"suppressed": True}}) is None
    assert calm.breach(dep, [10.0, 20.0, 30.0, 5000.0], {}).gate == "latency_ms_p95"  # type: ignore[union-attr]
    w.observe("model.failed", {"model": "m"})
    assert w.breach(dep, [], {}).gate == "inference_errors"  # type: ignore[union-attr]


def test_deploy_of_an_unsigned_file_says_how_to_sign_it(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import EDGE_AGENT

    spec = tmp_path / "release.json"
    spec.write_text(json.dumps(_doc()))
    out = subprocess.run([*EDGE_AGENT, "fleet", "deploy", str(spec), "--config",
                          str(tmp_path / "deploy.toml"), "--models", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "is not signed" in out.stderr and "fleet sign" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_label_selector_picks_the_boxes_whose_status_announces_the_labels() -> None:
    from fleet.deploy import select_by_labels

    dep = parse({"document": _doc(target={"site": "s", "labels": {"ring": "main"}}),
                 "signatures": []})
    statuses: dict[tuple[str, str, str], dict[str, Any]] = {
        ("s", "a", "status"): {"labels": {"ring": "main", "ward": "ed"}},
        ("s", "b", "status"): {"labels": {"ring": "canary"}},
        ("t", "c", "status"): {"labels": {"ring": "main"}},  # another site
        ("s", "d", "status"): {},  # announces no labels
        ("s", "e", "jobs"): {"labels": {"ring": "main"}},
    }
    assert select_by_labels(statuses, dep) == ("a",)


def test_a_missing_approver_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    from agent.config import load
    from agent.errors import ConfigError
    from tests.helpers import provision, set_config

    box = provision(tmp_path / "box")
    set_config(box, "deploy", "approver_keys", '{ clinical = ["approvers/clin.pem"] }')
    with pytest.raises(ConfigError) as e:
        load(box.config)
    assert "[deploy.approver_keys.clinical]" in str(e.value)
    assert "clin.pem does not exist" in str(e.value)
