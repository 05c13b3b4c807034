"""The daemon with receive worker processes (``[dicom] workers``): concurrent
associations from DCMTK into one inbox and one result, the audit trail of every
instance, a worker that dies is replaced while the others keep serving, and a
stop closes the door but lets open associations finish and leaves no process
behind.  Kill -9 with workers is in tests/faults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)

from agent.dicom.pool import ReceivePool
from tests.helpers import (
    Box,
    Broker,
    Daemon,
    Subscriber,
    audit_events,
    require_peer,
    set_config,
    storescu,
    wait_for,
)
from tests.helpers.receive import AE_TITLE, ct_files, node


def workers_of(d: Daemon) -> list[psutil.Process]:
    assert d.proc is not None
    return [c for c in psutil.Process(d.proc.pid).children()
            if "agent.dicom.worker" in " ".join(c.cmdline())]


def send_parallel(box: Box, groups: list[list[Path]]) -> list[subprocess.CompletedProcess[str]]:
    exe = require_peer("storescu")
    procs = [subprocess.Popen([exe, "-aet", "STORESCU", "-aec", box.ae_title, "127.0.0.1",
                               str(box.dicom_port), *map(str, g)],
                              env=dict(os.environ, TCP_NODELAY="1"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for g in groups]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def test_the_port_opens_with_the_workers_ready_and_without_pixel_libraries(
        tmp_path: Path, box: Box) -> None:
    """When the daemon's DICOM port accepts, every worker has finished starting (it
    runs its counters thread, started just before it reports ready): a first
    association is not served by a process still importing.  And a worker, which
    never decodes pixels, does not load pydicom's pixel back-ends (numpy, Pillow,
    pylibjpeg), which the daemon does."""
    set_config(box, "dicom", "workers", "2")
    d = Daemon(box)
    d.start()  # returns once the DICOM port accepts connections
    try:
        assert d.proc is not None
        workers = workers_of(d)
        assert len(workers) == 2
        assert all(w.num_threads() >= 2 for w in workers), [w.num_threads() for w in workers]

        def libraries(p: psutil.Process) -> set[str]:
            return {m.path for m in p.memory_maps()}

        pixel = ("/numpy", "/PIL/", "/pylibjpeg", "/openjpeg/", "/libjpeg/")
        assert any("/numpy" in lib for lib in libraries(psutil.Process(d.proc.pid)))
        for w in workers:
            assert not [lib for lib in libraries(w) if any(x in lib for x in pixel)]
        files = ct_files(tmp_path / "ct", 2)
        (run,) = send_parallel(box, [files])
        assert run.returncode == 0, run.stderr
    finally:
        d.stop()


def test_concurrent_associations_over_workers_make_one_study_and_one_result(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "dicom", "workers", "2")
    set_config(box, "study", "quiet_seconds", "2")
    files = ct_files(tmp_path / "ct", 16, study_uid="1.2.826.0.1.3680043.8.498.4242")
    ops = Subscriber(box).start()
    d = Daemon(box)
    d.start()
    try:
        wait_for(lambda: len(workers_of(d)) == 2, 20, "two receive workers")
        runs = send_parallel(box, [files[i::4] for i in range(4)])
        assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
        got = ops.wait("results", 1, timeout=90)
        study = got[0].json()["data"]["study"]
        assert study["instances_received"] == 16
        assert study["version"] == 1
        pids = {p.pid for p in workers_of(d)}
        assert d.stop() == 0
        # The workers stopped with the daemon.
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                 != psutil.STATUS_ZOMBIE for p in pids), 10, "workers to exit")
    finally:
        if d.proc is not None:
            d.stop()
        ops.stop()
    events = audit_events(box, 2000)
    received = [e for e in events if e["event"] == "instance.received"]
    assert len(received) == 16  # every acknowledged instance, journaled by its worker
    # `audit tail` shows peers as keyed pseudonyms (never the raw address): one sender, one name.
    sources = {e["source"] for e in received}
    assert len(sources) == 1 and next(iter(sources)).startswith("peer:"), sources
    assert sum(1 for e in events if e["event"] == "association.accepted") == 4
    assert "1.2.826.0.1.3680043.8.498.4242" not in d.log_text()


def test_a_worker_that_dies_is_replaced_and_the_others_keep_serving(
        tmp_path: Path, box: Box, broker: Broker) -> None:
    set_config(box, "dicom", "workers", "2")
    d = Daemon(box)
    d.start()
    try:
        wait_for(lambda: len(workers_of(d)) == 2, 20, "two receive workers")
        victim = workers_of(d)[0]
        victim.send_signal(signal.SIGKILL)
        # Meanwhile the other worker serves (connections go to live workers only).
        r = storescu(box.dicom_port, ct_files(tmp_path / "a", 3), aec=box.ae_title)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "receive worker" in d.log_text() and "exited" in d.log_text(), 20,
                 "the exit to be logged")
        wait_for(lambda: len(workers_of(d)) == 2 and victim.pid not in
                 {p.pid for p in workers_of(d)}, 30, "a replacement worker")
        # Both workers take connections again.
        runs = send_parallel(box, [ct_files(tmp_path / f"b{i}", 2, tag=f"b{i}") for i in range(4)])
        assert all(x.returncode == 0 for x in runs), [x.stderr for x in runs]
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.stop()
    exits = [e for e in audit_events(box) if e["event"] == "dicom.worker_exited"]
    assert len(exits) == 1 and exits[0]["outcome"] == 8  # DICOM audit: serious failure


def test_stop_closes_the_door_but_lets_an_open_association_finish(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 2)
    with node(tmp_path, workers=2) as n:
        ae = AE(ae_title="MOD")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", n.port, ae_title=AE_TITLE)
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0
        assert isinstance(n.scp, ReceivePool)
        stopper = threading.Thread(target=n.scp.stop)
        stopper.start()
        wait_for(lambda: not n.scp._listeners, 5, "the listener to close")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", n.port), timeout=2).close()
        # The association that was open when the stop began is still served.
        assert assoc.send_c_store(pydicom.dcmread(files[1])).Status == 0
        assoc.release()
        stopper.join(15)
        assert not stopper.is_alive()
        assert n.stored() == 2
        assert not any(w is not None for w in n.scp._workers)


def test_workers_setting_auto_explicit_and_refused(box: Box) -> None:
    from agent import config as cfgmod
    from agent.errors import ConfigError

    cores = len(os.sched_getaffinity(0))
    assert cfgmod.load(box.config).dicom.workers == max(1, min(8, cores))  # default 0 = auto
    set_config(box, "dicom", "workers", "3")
    assert cfgmod.load(box.config).dicom.workers == 3
    set_config(box, "dicom", "workers", "40")
    with pytest.raises(ConfigError) as exc:
        cfgmod.load(box.config)
    assert "workers" in str(exc.value) and "between 0 (auto) and 32" in str(exc.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port_is_a_clear_error_and_leaves_nothing_behind(box: Box, workers: int) -> None:
    set_config(box, "dicom", "workers", str(workers))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", box.dicom_port))
        squatter.listen()
        d = Daemon(box)
        d.start(wait=False)
        assert d.proc is not None
        daemon_pid = str(d.proc.pid)
        rc = d.proc.wait(30)
    # A worker's command line ends with its daemon's pid (it outlives it only as an orphan).
    left = [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if "agent.dicom.worker" in (p.info["cmdline"] or [])
            and p.info["cmdline"][-1] == daemon_pid and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert rc == 2
    log = d.log_text()
    assert f"error: cannot listen for DICOM on 127.0.0.1:{box.dicom_port}" in log
    assert "fix: another service" in log
    assert "Traceback" not in log
    assert not left  # no receive worker outlived the failed start


def test_a_commitment_report_waiting_for_the_delivery_holds_up_no_other_association(
        tmp_path: Path) -> None:
    """A PACS's Storage Commitment report, taken by a worker, waits for the results
    delivery (database writes, which a busy disk or lock can make slow); meanwhile
    the daemon still answers the admission of another association at once, and the
    report gets its Success when the delivery took it."""
    release = threading.Event()
    reported: list[str] = []

    def on_commitment(tx: str, ok: list[str], failed: list[str],
                      answer: Any = None) -> bool | None:
        reported.append(tx)
        if answer is None:  # a delivery that answers in the caller's thread
            release.wait(60)
            return True

        def later() -> None:
            release.wait(60)
            answer(True)

        threading.Thread(target=later, daemon=True).start()
        return None

    with node(tmp_path, workers=2, on_commitment=on_commitment) as n:
        statuses: list[int] = []

        def report() -> None:
            ae = AE(ae_title="PACS")
            ae.add_requested_context(StorageCommitmentPushModel)
            assoc = ae.associate("127.0.0.1", n.port, ae_title=AE_TITLE,
                                 ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
            assert assoc.is_established
            ds = Dataset()
            ds.TransactionUID = "1.2.826.0.1.3680043.8.498.77"
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.78"
            ds.ReferencedSOPSequence = [item]
            status, _ = assoc.send_n_event_report(ds, 1, StorageCommitmentPushModel,
                                                  "1.2.840.10008.1.20.1.1")
            statuses.append(int(status.Status) if status else -1)
            assoc.release()

        pacs = threading.Thread(target=report, daemon=True)
        pacs.start()
        try:
            wait_for(lambda: reported, 60, "the report handed to the delivery")
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", n.port, ae_title=AE_TITLE)
            accepted = assoc.is_established
            if accepted:
                assoc.release()
        finally:
            release.set()
        pacs.join(60)
        assert accepted  # the admission was answered while the report waited
        assert statuses == [0x0000]
