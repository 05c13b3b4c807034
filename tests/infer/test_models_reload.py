"""A running daemon switches models on 'models activate/rollback' without a restart:
the next result carries the new version, telemetry reports it, and a package that
cannot load leaves the previous set running."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config
from tests.helpers.dicom import make_instance
from tests.helpers.infer import PackageMaker, box_with_models


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180)


def send_study(box: Box) -> None:
    """One CT instance the demo model applies to, with fresh UIDs (a new study each time)."""
    ds = make_instance()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
    finally:
        assoc.release()


def versions(ev: dict[str, object]) -> list[str]:
    data = ev["data"]
    assert isinstance(data, dict)
    return [str(m["version"]) for m in data["models"]]


def test_activate_and_rollback_reach_the_running_daemon(
        box: Box, broker: Broker, ops: Subscriber, tmp_path: Path,
        publisher: tuple[Path, Path], make_package: PackageMaker) -> None:
    box_with_models(box, tmp_path, publisher)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    set_config(box, "control", "socket", json.dumps(str(tmp_path / "ctl" / "control.sock")))
    conf = str(box.config)
    for v in ("1.1.0", "1.2.0"):
        r = cli("models", "install", str(make_package(v)), "--config", conf)
        assert r.returncode == 0, r.stderr
    # 1.3.0 is signed and hashed correctly but is not an ONNX model: it cannot load.
    r = cli("models", "install", str(make_package("1.3.0", onnx=b"not an onnx graph")),
            "--config", conf)
    assert r.returncode == 0, r.stderr
    r = cli("models", "activate", "lesion-demo", "1.1.0", "--config", conf)
    assert r.returncode == 0 and "not running" in r.stdout, r.stderr

    d = Daemon(box)
    d.start()
    try:
        send_study(box)
        assert versions(ops.wait("results", 1, timeout=90)[-1].json()) == ["1.1.0"]

        r = cli("models", "activate", "lesion-demo", "1.2.0", "--config", conf)
        assert r.returncode == 0, r.stderr
        assert "1.1.0 -> 1.2.0" in r.stdout and "daemon reloaded" in r.stdout, r.stdout
        assert "lesion-demo 1.2.0" in r.stdout
        send_study(box)
        assert versions(ops.wait("results", 2, timeout=90)[-1].json()) == ["1.2.0"]

        # A set that does not load is reported and the running one stays.
        r = cli("models", "activate", "lesion-demo", "1.3.0", "--config", conf)
        assert r.returncode == 0, r.stderr
        assert "did not switch" in r.stdout and "1.3.0" in r.stdout, r.stdout
        status = json.loads(cli("status", "--config", conf, "--json").stdout)
        assert [m["version"] for m in status["models"]] == ["1.2.0"]

        r = cli("models", "rollback", "lesion-demo", "--config", conf)
        assert r.returncode == 0 and "daemon reloaded" in r.stdout, r.stdout
        send_study(box)
        assert versions(ops.wait("results", 3, timeout=90)[-1].json()) == ["1.2.0"]

        r = cli("models", "rollback", "lesion-demo", "--config", conf)
        assert r.returncode == 0 and "daemon reloaded" in r.stdout, r.stdout
        send_study(box)
        assert versions(ops.wait("results", 4, timeout=90)[-1].json()) == ["1.1.0"]

        # Telemetry reports the version now running (the next birth does too).
        def telemetry_models() -> list[str]:
            last = ops.on("telemetry")[-1].json()["data"]
            return [str(m["version"]) for m in last["models"]]

        n = len(ops.on("telemetry"))
        ops.wait("telemetry", n + 1, timeout=30)
        assert telemetry_models() == ["1.1.0"]
    finally:
        d.stop()
    log = d.log_text()
    assert "models reloaded: lesion-demo 1.2.0" in log
    assert "model reload failed, keeping the loaded models" in log
