"""Processing a 200 MiB multi-frame instance keeps the daemon's memory bounded: the
instance is never held whole more than once, and only the frames a model samples are
decoded.  Peak RSS (VmHWM) of the daemon process, measured around the processing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.ops import control
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config, wait_for
from tests.helpers.receive import big_instance, ct_files, dcmtk

MiB = 1024**2


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def send(box: Box, path: Path) -> None:
    r = dcmtk("storescu", "-aet", "STORESCU", "-aec", box.ae_title, "-R", "127.0.0.1",
              str(box.dicom_port), str(path), timeout=900)
    assert r.returncode == 0, r.stderr


@pytest.mark.peer("storescu")
def test_200mb_instance_is_processed_with_bounded_memory(tmp_path: Path, box: Box,
                                                         broker: Broker) -> None:
    sock = tmp_path / "ctl" / "control.sock"
    set_config(box, "control", "socket", json.dumps(str(sock)))
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "dicom", "max_instance_bytes", str(4 * 1024**3))
    big = big_instance(tmp_path / "big.dcm", 400)  # 400 x 512 x 512 x 2 = 200 MiB
    size = big.stat().st_size
    assert size > 200 * MiB
    d = Daemon(box)
    d.start()
    try:
        assert d.proc is not None
        # Warm up (imports, model session, a first study) before the baseline.
        send(box, ct_files(tmp_path / "warm", 1)[0])

        def processed() -> int:
            return int(control.request(sock, "status")["studies"]["processed"])

        wait_for(lambda: processed() == 1, 120, "the warm-up study")
        before = peak_rss(d.proc.pid)
        send(box, big)
        wait_for(lambda: processed() == 2, 600, "the big study")
        after = peak_rss(d.proc.pid)
        status = control.request(sock, "status")
    finally:
        d.stop()
    # (Its result is held by the egress guard: the test's patient name "Big^Instance"
    # matches the word "instances" in every payload.  What matters here is memory.)
    assert status["studies"]["failed"] == 0 and status["quarantine"]["count"] == 0, status
    growth = after - before
    print(json.dumps({"instance_mib": round(size / MiB, 1), "before_mib": before // MiB,
                      "after_mib": after // MiB, "growth_mib": growth // MiB}))
    # One copy of the pixel data (the parsed dataset) plus bounded working memory.
    assert growth < size + 96 * MiB, json.dumps({"before": before, "after": after})


@pytest.mark.peer("storescu")
def test_instance_above_the_processing_bound_is_refused_with_a_reason(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "study", "max_process_instance_bytes", "4096")  # CT_small is ~39 KB
    d = Daemon(box)
    d.start()
    try:
        send(box, ct_files(tmp_path / "ct", 1)[0])
        data = ops.wait("results", 1, timeout=120)[0].json()["data"]
    finally:
        d.stop()
    assert data["status"] == "all_quarantined"
    [note] = data["study"]["quarantined"]
    assert "max_process_instance_bytes" in note["reason"] and "not processed" in note["reason"]
    tail = subprocess.run([*EDGE_AGENT, "audit", "tail", "--config", str(box.config), "--json",
                           "-n", "100"], capture_output=True, text=True, cwd=REPO, timeout=120)
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    refused = [r["details"] for r in rows if r["event"] == "instance.quarantined"]
    assert [d.get("refused") for d in refused] == ["size"]
