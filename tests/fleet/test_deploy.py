"""Fleet deployments end to end: real mosquitto (mutual TLS, the dev ACL with the
deployer identity), real daemons as subprocesses, real onnxruntime, packages and
documents signed at test time with throwaway publisher and approver keys.

- three boxes, canary then two waves: the rollout completes; the box that was
  offline during its wave catches up when it returns; ``fleet deployments`` and
  ``fleet watch`` show it; unapproved, replayed and mis-targeted documents are
  refused, audited and reported; ``fleet rollback`` undoes the deployment;
- a canary whose model fails at run time breaches its gate, rolls back by itself,
  and the rollout stops before the next wave;
- kill -9 of a box mid-download resumes from the last good chunk; a corrupted chunk
  is refused and nothing is activated before the whole package verifies.

The helpers (throwaway keys, small real ONNX packages signed at test time, boxes that
pin the test keys, a scripted central side) are in tests/helpers/deploy.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from agent.config import load as load_config
from tests.helpers import (
    REPO,
    Box,
    Broker,
    Daemon,
    Subscriber,
    audit_events,
    storescu,
    wait_for,
)
from tests.helpers.deploy import (
    MODEL,
    Central,
    Keys,
    active_version,
    cli,
    configure_box,
    deploy_proc,
    device,
    document,
    job_states,
    make_package,
    release,
    sign_independently,
    statuses,
    two_image_study,
    write_spec,
)
from tests.helpers.fleet import add_box, ops_config

pytestmark = pytest.mark.peer("mosquitto")


@pytest.fixture
def fleet(box: Box, tmp_path: Path) -> Iterator[tuple[list[Box], Keys, Path, Broker]]:
    keys = Keys(tmp_path / "keys")
    catalog = tmp_path / "catalog"
    make_package(catalog, keys, "1.0.0")
    make_package(catalog, keys, "2.0.0")
    make_package(catalog, keys, "2.0.1", broken=True)
    boxes = [box, add_box(box, "box-2"), add_box(box, "box-3")]  # before the broker starts
    for b, labels in zip(boxes, (("ring=canary",), ("ring=main",), ("ring=main",)), strict=True):
        configure_box(b, keys, catalog, labels=labels)
    broker = Broker(box)
    broker.start()
    yield boxes, keys, catalog, broker
    broker.stop()


def test_two_wave_rollout_offline_box_refusals_and_rollback(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary, wave1, wave2 = boxes
    ops = Subscriber(canary).start()
    daemons = [Daemon(b) for b in boxes]
    rollout: subprocess.Popen[str] | None = None
    try:
        for d in daemons:
            d.start()
        for b in boxes:
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 60,
                     f"{device(b)} online with {MODEL} 1.0.0")
        daemons[2].stop()  # box-3 goes offline before the rollout starts
        wait_for(lambda: any(m.json()["data"]["state"] == "offline" for m in ops.on("status")
                             if m.topic.split("/")[2] == "box-3"), 30, "box-3 offline")

        spec = write_spec(tmp_path / "release.json", document(
            "rel-2", 5, ["dev-box", "box-2", "box-3"], canary=["dev-box"],
            waves=[["box-2"], ["box-3"]], soak=3, chunk_size=4096,
            config={"study.quiet_seconds": 2.0, "logging.level": "INFO"}))
        sign_independently(spec, keys, catalog)
        log = tmp_path / "rollout.log"
        rollout = deploy_proc(canary, spec, catalog, log)

        # The canary soaks and succeeds before wave 1 receives anything.
        wait_for(lambda: "succeeded" in job_states(ops, "dev-box", 5), 180, "canary succeeded")
        wait_for(lambda: "succeeded" in job_states(ops, "box-2", 5), 180, "wave 1 succeeded")
        jobs = [(m.topic.split("/")[2], m.json()["data"]["state"]) for m in ops.on("jobs")]
        assert jobs.index(("dev-box", "succeeded")) < jobs.index(("box-2", "received"))
        assert job_states(ops, "box-3", 5) == []  # offline: nothing from it yet
        wait_for(lambda: "wave 2: publishing" in log.read_text(), 60, "wave 2 published")

        daemons[2].start()  # back: the retained document is waiting for it
        assert rollout.wait(240) == 0, log.read_text()
        rollout = None
        text = log.read_text()
        assert "completed" in text, text
        for b in boxes:
            states = job_states(ops, device(b), 5)
            for s in ("received", "downloading", "verified", "active", "soaking", "succeeded"):
                assert s in states, (device(b), states)
            assert states.index("verified") < states.index("active")
            wait_for(lambda b=b: active_version(ops, device(b)) == "2.0.0", 60,
                     f"{device(b)} status showing 2.0.0")
            dep = statuses(ops, device(b))[-1]["deployment"]
            assert dep == {"id": "rel-2", "revision": 5, "state": "succeeded"}, dep

        # Every job state and status on the wire matches its published schema.
        for channel, name in (("jobs", "job"), ("status", "status")):
            schema = json.loads((REPO / "docs" / "schemas" / f"{name}.schema.json").read_text())
            for m in ops.on(channel):
                jsonschema.validate(m.json(), schema)
        # The approved configuration change: an overlay the config loader applies.
        assert load_config(canary.config).study.quiet_seconds == 2.0

        # Central ops' views: progress per wave and box, and the fleet table's column.
        observer = ops_config(canary, "ops-sub")  # 'ops' is the subscriber's connection
        out = cli("fleet", "deployments", "--config", str(observer),
                  "--id", "rel-2", "--json", "--wait", "2")
        assert out.returncode == 0, out.stderr
        rows = {r["box"]: (r["wave"], r["state"]) for r in json.loads(out.stdout)}
        assert rows == {"dev-site/dev-box": ("canary", "succeeded"),
                        "dev-site/box-2": ("wave 1", "succeeded"),
                        "dev-site/box-3": ("wave 2", "succeeded")}, rows
        out = cli("fleet", "watch", "--config", str(observer), "--once", "--wait", "2")
        assert out.returncode == 0, out.stderr
        assert "DEPLOYMENT" in out.stdout and "rel-2@5 succeeded" in out.stdout, out.stdout

        # Who approved, what changed, the outcome: in the canary's audit trail.
        events = audit_events(canary)
        received = [e for e in events if e["event"] == "deploy.received"]
        assert received and {a["role"] for a in received[-1]["details"]["approvals"]} == {
            "publisher", "clinical"}
        assert any(e["event"] == "deploy.succeeded" for e in events)

        # Refused documents, each audited with its reason and reported on jobs.
        central = Central(canary)
        try:
            topic = "edge/dev-site/dev-box/deployments"

            def signed(rev: int, roles: tuple[str, ...] = ("publisher", "clinical"),
                       targets: tuple[str, ...] = ("dev-box",), hours: float = 2,
                       config: dict[str, object] | None = None) -> dict[str, object]:
                spec = write_spec(tmp_path / f"doc-{rev}.json", document(
                    f"probe-{rev}", rev, list(targets), version="2.0.0", chunk_size=4096,
                    hours=hours, config=config))
                out = cli("fleet", "sign", str(spec), "--role", roles[0], "--key",
                          str(keys.approver_key(roles[0])), "--models", str(catalog))
                assert out.returncode == 0, out.stderr
                for role in roles[1:]:
                    assert cli("fleet", "sign", str(spec), "--role", role, "--key",
                               str(keys.approver_key(role))).returncode == 0
                return dict(json.loads(spec.read_text()))

            cases = [(signed(10, roles=("publisher",)), "unapproved"),
                     (signed(4), "replayed"),
                     (signed(11, targets=("box-2",)), "mistargeted"),
                     (signed(12, hours=-1), "expired"),
                     (signed(13, config={"mqtt.host": "elsewhere.example"}), "config_refused"),
                     (signed(14, config={"dicom.peers": []}), "config_refused")]
            for n, (doc, reason) in enumerate(cases):
                central.publish(topic, "deployment", doc, retain=True)
                rev = doc["document"]["revision"]  # type: ignore[index]
                got = central.wait_state("dev-box", "refused", rev, timeout=60)
                assert got["reason"] == reason, (n, got)
            refused = [e for e in audit_events(canary) if e["event"] == "deploy.refused"]
            assert [e["details"]["reason"] for e in refused][-6:] == [
                "unapproved", "replayed", "mistargeted", "expired", "config_refused",
                "config_refused"]
            assert active_version(ops, "dev-box") == "2.0.0"
        finally:
            central.stop()

        # Rollback of the release on every box that reports it.
        out = cli("fleet", "rollback", "rel-2", "--config", str(canary.root / "deploy.toml"),
                  "--observer", str(observer),
                  *[a for r in ("publisher", "clinical")
                    for a in ("--sign", f"{r}={keys.approver_key(r)}")])
        assert out.returncode == 0, out.stdout + out.stderr
        for b in boxes:
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 120,
                     f"{device(b)} back on 1.0.0")
        assert load_config(canary.config).study.quiet_seconds == 3.0  # the config too
    finally:
        if rollout is not None and rollout.poll() is None:
            rollout.kill()
        ops.stop()
        for d in daemons:
            if d.proc is not None:
                d.stop()


def test_canary_gate_breach_rolls_back_and_stops_the_rollout(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary, wave1, _ = boxes
    ops = Subscriber(canary).start()
    daemons = [Daemon(canary), Daemon(wave1)]
    rollout: subprocess.Popen[str] | None = None
    try:
        for d in daemons:
            d.start()
        for b in (canary, wave1):
            wait_for(lambda b=b: active_version(ops, device(b)) == "1.0.0", 60,
                     f"{device(b)} online")
        spec = write_spec(tmp_path / "bad.json", document(
            "rel-bad", 7, ["dev-box", "box-2"], version="2.0.1", canary=["dev-box"],
            waves=[["box-2"]], soak=900))  # only a breached gate can end this soak
        sign_independently(spec, keys, catalog)
        log = tmp_path / "rollout.log"
        rollout = deploy_proc(canary, spec, catalog, log)
        wait_for(lambda: "soaking" in job_states(ops, "dev-box", 7), 120, "canary soaking")
        assert active_version(ops, "dev-box") in ("2.0.1", "1.0.0")
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.1", 60, "2.0.1 active")

        sent = storescu(canary.dicom_port, two_image_study(tmp_path / "study"))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: "rolled_back" in job_states(ops, "dev-box", 7), 180,
                 "the canary rolled back")
        last = [m.json()["data"] for m in ops.on("jobs")
                if m.topic.split("/")[2] == "dev-box" and m.json()["data"]["state"] == "rolled_back"]
        assert last[-1]["reason"] == "gate_breached", last[-1]
        assert last[-1]["gate"]["name"] == "inference_errors", last[-1]
        assert rollout.wait(60) == 1, log.read_text()
        rollout = None
        assert "canary failed" in log.read_text()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "canary back on 1.0.0")
        assert job_states(ops, "box-2", 7) == []  # the wave never started
        assert active_version(ops, "box-2") == "1.0.0"
        events = audit_events(canary)
        assert any(e["event"] == "deploy.rolled_back"
                   and e["details"]["reason"] == "gate_breached" for e in events)
        assert any(e["event"] == "model.failed" for e in events)
    finally:
        if rollout is not None and rollout.poll() is None:
            rollout.kill()
        ops.stop()
        for d in daemons:
            if d.proc is not None:
                d.stop()


def test_kill9_mid_download_resumes_and_a_corrupt_chunk_is_refused(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary = boxes[0]
    ops = Subscriber(canary).start()
    daemon = Daemon(canary)
    central: Central | None = None
    try:
        daemon.start()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "online")
        rel = release(tmp_path, keys, catalog, "rel-resume", 9, "2.0.0", soak=1,
                      chunk_size=1024)
        n = len(rel.ref["chunks"])
        assert n > 6, n  # more than the five sent before the kill
        central = Central(canary)
        topic = "edge/dev-site/dev-box/deployments"
        central.publish(topic, "deployment", rel.signed, retain=True)
        first = central.wait_state("dev-box", "downloading", 9)
        assert first["request"]["next"] == 0
        central.send_chunks(topic, rel, range(5))  # part of the package, then the box dies
        # The box asks again after its request timeout: from chunk 5, all five on disk.
        wait_for(lambda: any(d.get("request", {}).get("next") == 5
                             for d in central.states("dev-box", 9)), 60, "request from 5")
        daemon.kill9()
        seen = len(central.states("dev-box", 9))
        daemon.start()
        wait_for(lambda: any(d.get("request") for d in central.states("dev-box", 9)[seen:]),
                 120, "a request after the restart")
        # From here on only chunks 5.. are ever sent: the box can finish only if the five
        # it had fsynced before kill -9 survived (and it never asks for chunk 0 again).
        # A corrupted chunk 5: refused, reported, nothing activated.
        bad = bytearray(rel.data[5 * 1024:6 * 1024])
        bad[0] ^= 0xFF
        mark = len(central.states("dev-box", 9))
        central.send_chunks(topic, rel, [5], bytes(bad))
        refused = central.wait_state("dev-box", "downloading", 9, after=mark, timeout=60)
        wait_for(lambda: any(d.get("chunk_refused") for d in central.states("dev-box", 9)[mark:]),
                 60, "the chunk refusal")
        assert refused is not None
        states = [d["state"] for d in central.states("dev-box", 9)]
        assert "verified" not in states and "active" not in states
        assert active_version(ops, "dev-box") == "1.0.0"
        assert any(e["event"] == "deploy.chunk_refused" for e in audit_events(canary))

        central.send_chunks(topic, rel, range(5, n))
        central.wait_state("dev-box", "succeeded", 9, timeout=120)
        after = [d["request"]["next"] for d in central.states("dev-box", 9)[seen:]
                 if d.get("request")]
        assert after and min(after) >= 5, after
        states = [d["state"] for d in central.states("dev-box", 9)]
        assert states.index("verified") > next(
            k for k, d in enumerate(central.states("dev-box", 9)) if d.get("chunk_refused"))
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.0", 60, "2.0.0 active")

        # A package whose every chunk and archive hash match the signed document, but
        # whose model was signed by a publisher the box does not pin: refused after the
        # download, never activated (this is a development box, which would run an
        # unverified package installed by hand).
        stranger = Keys(tmp_path / "stranger")
        make_package(catalog, stranger, "3.0.0")
        rel3 = release(tmp_path, keys, catalog, "rel-unpinned", 10, "3.0.0", soak=1,
                       chunk_size=4096)
        central.publish(topic, "deployment", rel3.signed, retain=True)
        central.wait_state("dev-box", "downloading", 10)
        central.send_chunks(topic, rel3)
        got = central.wait_state("dev-box", "refused", 10, timeout=120)
        assert got["reason"] == "package_refused" and "unpinned_key" in got["detail"], got
        assert "active" not in [d["state"] for d in central.states("dev-box", 10)]
        assert active_version(ops, "dev-box") == "2.0.0"
    finally:
        if central is not None:
            central.stop()
        ops.stop()
        if daemon.proc is not None:
            daemon.stop(signal.SIGTERM)


def test_a_rollback_document_during_the_soak_restores_the_previous_version(
        fleet: tuple[list[Box], Keys, Path, Broker], tmp_path: Path) -> None:
    boxes, keys, catalog, _broker = fleet
    canary = boxes[0]
    ops = Subscriber(canary).start()
    daemon = Daemon(canary)
    central: Central | None = None
    try:
        daemon.start()
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "online")
        rel = release(tmp_path, keys, catalog, "rel-soak", 20, "2.0.0", soak=900,
                      chunk_size=65536)
        central = Central(canary)
        topic = "edge/dev-site/dev-box/deployments"
        central.publish(topic, "deployment", rel.signed, retain=True)
        central.wait_state("dev-box", "downloading", 20)
        central.send_chunks(topic, rel)
        central.wait_state("dev-box", "soaking", 20)
        wait_for(lambda: active_version(ops, "dev-box") == "2.0.0", 60, "2.0.0 soaking")

        # Central ops pull it back before the soak ends: a signed rollback document.
        from fleet.deploy import rollback_document
        central.publish(topic, "deployment",
                        keys.signed(rollback_document("rel-soak", "dev-site", ["dev-box"], 21)),
                        retain=True)
        got = central.wait_state("dev-box", "rolled_back", 21)
        assert got["reason"] == "rollback_requested", got
        wait_for(lambda: active_version(ops, "dev-box") == "1.0.0", 60, "back on 1.0.0")
        wait_for(lambda: statuses(ops, "dev-box")[-1]["deployment"] == {
            "id": "rel-soak", "revision": 21, "state": "rolled_back"}, 30, "status")
        assert "succeeded" not in [d["state"] for d in central.states("dev-box", 20)]
        events = audit_events(canary)
        assert any(e["event"] == "deploy.superseded" for e in events)
        done = [e for e in events if e["event"] == "deploy.rolled_back"]
        assert done and done[-1]["details"]["undone_revision"] == 20
    finally:
        if central is not None:
            central.stop()
        ops.stop()
        if daemon.proc is not None:
            daemon.stop(signal.SIGTERM)
