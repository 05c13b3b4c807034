"""The DICOM node inside the real daemon: kill -9 in the middle of a multi-study
send, and flat memory while a very large instance streams in."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.helpers import Box, Broker, Daemon, Subscriber, set_config, wait_for
from tests.helpers.receive import big_instance, ct_files, dcmtk


def send(port: int, ae_title: str, files: list[Path], acked: list[Path],
         after: int | None = None, on_after: object = None) -> None:
    """Send files on one association, recording those acknowledged with Success."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = ae.dimse_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    for f in files:
        if not assoc.is_established:
            break
        try:
            status = assoc.send_c_store(pydicom.dcmread(f))
        except RuntimeError:  # the association went away under us (the kill)
            break
        if status and status.Status == 0:
            acked.append(f)
            if after is not None and len(acked) == after and callable(on_after):
                on_after()
    if assoc.is_established:
        assoc.release()


def test_kill9_mid_send_then_every_acked_instance_is_processed_exactly_once(
        tmp_path: Path, box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "600")  # completion happens in the burst run
    studies = [ct_files(tmp_path / f"s{i}", 12, tag=f"s{i}-") for i in range(3)]
    files = [f for s in studies for f in s]
    d = Daemon(box)
    d.start()
    acked: list[Path] = []
    send(box.dicom_port, box.ae_title, files, acked, after=15, on_after=d.kill9)
    assert len(acked) == 15  # killed in the middle of the second study
    # The modality retries what was not acknowledged after the box is back;
    # one of those may already be stored (acked by the box, lost in transit).
    d = Daemon(box)
    d.start()
    rest = [f for f in files if f not in acked]
    acked2: list[Path] = []
    send(box.dicom_port, box.ae_title, rest, acked2)
    assert acked2 == rest
    assert d.stop() == 0
    burst = Daemon(box, "--burst")
    burst.start()
    assert burst.proc is not None and burst.proc.wait(180) == 0
    ops.wait("results", 3, timeout=60)
    by_id = {m.json()["id"]: m.json() for m in ops.on("results")}  # consumers dedupe on id
    per_study = {}
    for ev in by_id.values():
        key = (ev["data"]["study"]["ref"], ev["data"]["study"]["version"])
        assert key not in per_study, "two results for one study version"
        per_study[key] = ev["data"]["study"]["instances_received"]
    assert sorted(per_study.values()) == [12, 12, 12]
    assert all(version == 1 for _, version in per_study)
    # Nothing of the studies is left in the inbox.
    db = sqlite3.connect(f"file:{box.state / 'inbox' / 'index.db'}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    assert not list((box.state / "inbox" / "tmp").iterdir())


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def stream_big(tmp_path: Path, box: Box, frames: int) -> tuple[int, int, int]:
    set_config(box, "study", "quiet_seconds", "600")  # measure receiving, not processing
    set_config(box, "dicom", "max_instance_bytes", str(4 * 1024**3))
    big = big_instance(tmp_path / "big.dcm", frames)
    d = Daemon(box)
    d.start()
    try:
        assert d.proc is not None
        # Warm up (imports, first association) before taking the baseline.
        warm = ct_files(tmp_path / "warm", 1)
        assert dcmtk("storescu", "-aet", "STORESCU", "-aec", box.ae_title, "127.0.0.1",
                     str(box.dicom_port), str(warm[0])).returncode == 0
        before = peak_rss(d.proc.pid)
        r = dcmtk("storescu", "-aet", "STORESCU", "-aec", box.ae_title, "-R", "127.0.0.1",
                  str(box.dicom_port), str(big), timeout=900)
        assert r.returncode == 0, r.stderr
        after = peak_rss(d.proc.pid)
        db = sqlite3.connect(f"file:{box.state / 'inbox' / 'index.db'}?mode=ro", uri=True)
        size = db.execute("SELECT MAX(size) FROM instances").fetchone()[0]
    finally:
        d.stop()
    return before, after, int(size)


@pytest.mark.peer("storescu")
def test_200mb_instance_streams_with_flat_memory(tmp_path: Path, box: Box, broker: Broker) -> None:
    before, after, size = stream_big(tmp_path, box, frames=400)  # 400 x 512 x 512 x 2 = 200 MiB
    assert size > 200 * 1024**2
    # The whole instance never sits in memory: growth is a few PDUs and chunks.
    assert after - before < 64 * 1024**2, json.dumps({"before": before, "after": after})


@pytest.mark.slow
@pytest.mark.peer("storescu")
def test_1gb_instance_streams_with_flat_memory(tmp_path: Path, box: Box, broker: Broker) -> None:
    before, after, size = stream_big(tmp_path, box, frames=2048)  # 1 GiB of pixels
    assert size > 1024**3
    assert after - before < 64 * 1024**2, json.dumps({"before": before, "after": after})


def test_threads_are_not_left_behind(tmp_path: Path) -> None:
    # The in-process node's accept threads end with it (no leak across tests).
    from tests.helpers.receive import node

    names_before = {t.name for t in threading.enumerate()}
    with node(tmp_path):
        pass
    wait_for(lambda: not ({t.name for t in threading.enumerate()} - names_before), 10,
             "listener threads to end")
