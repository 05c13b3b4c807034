"""Attack and bad input through the running daemon: an association flood from
one peer while a legitimate modality is served, half-sent PDUs from several
addresses, unknown AE titles, fuzzed data sets over the wire, and a PHI canary
sweep over every egress path."""

from __future__ import annotations

import io
import json
import socket
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, rx_peer, set_config, wait_for
from tests.helpers.faults import (
    CANARY_NAME,
    SentStudy,
    check_nothing_lost,
    ct_instance,
    results,
    send,
)
from tests.helpers.receive import rejected


def _associate(box: Box, aet: str, *, called: str | None = None,
               bind: str = "127.0.0.1") -> object:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", box.dicom_port, ae_title=called or box.ae_title,
                        bind_address=(bind, 0))


def test_flood_from_one_peer_does_not_starve_a_modality(box: Box, broker: Broker,
                                                        ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "0.5")
    d = Daemon(box)
    d.start()
    stop = threading.Event()
    outcomes: list[str] = []

    def flood() -> None:
        # Associations held open and churned from 127.0.0.9 as fast as it goes.
        while not stop.is_set():
            a = _associate(box, "PYNETDICOM", bind="127.0.0.9")
            outcomes.append("ok" if a.is_established else "refused")  # type: ignore[attr-defined]

    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(flood)
        wait_for(lambda: outcomes.count("refused") >= 5, 60, "the flood to be limited")
        st_ = SentStudy(generate_uid())
        sent = send(box, st_, 3, aet="MODALITY")  # from 127.0.0.1: another peer
        stop.set()
    assert sent == 3
    wait_for(lambda: results(ops), 60, "the modality's result")
    check_nothing_lost(box, [st_], results(ops))
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0


ATTACKERS = [f"127.0.0.{i}" for i in range(2, 8)]  # six more peers on loopback


def test_half_sent_pdus_from_six_addresses_do_not_lock_out_a_modality(
        box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "0.5")
    # Deadlines long enough for the attack to be in force while the modality sends.
    set_config(box, "dicom", "acse_timeout", "15")
    set_config(box, "dicom", "pdu_timeout", "15")
    d = Daemon(box)
    d.start()
    stalled: list[socket.socket] = []
    try:
        # Allowlisted addresses (127.0.0.0/8): associations each holding half a
        # P-DATA-TF, then six connections each with 30 bytes of an A-ASSOCIATE-RQ.
        for addr in ATTACKERS:
            for _ in range(4):
                try:
                    s = rx_peer.associate(box.dicom_port, box.ae_title, source=addr)
                except (AssertionError, OSError):
                    continue
                s.sendall(rx_peer.pdata(rx_peer.pdv(1, 0x03, rx_peer.store_rq(
                    1, rx_peer.CT, "1.2.3.4")))[:20])
                stalled.append(s)
        for addr in ATTACKERS:
            for _ in range(6):
                try:
                    s = rx_peer.connect(box.dicom_port, source=addr)
                    s.sendall(rx_peer.associate_rq(box.ae_title, "PYNETDICOM")[:30])
                except OSError:
                    continue
                stalled.append(s)
        # The modality is served on every attempt.
        for _ in range(3):
            a = _associate(box, "MODALITY")
            assert a.is_established  # type: ignore[attr-defined]
            a.release()  # type: ignore[attr-defined]
        st_ = SentStudy(generate_uid())
        assert send(box, st_, 3, aet="MODALITY") == 3
        # The daemon ends every stalled connection itself.
        for s in stalled:
            s.settimeout(60)
            assert rx_peer.closed_by_peer(s)
    finally:
        for s in stalled:
            s.close()
    wait_for(lambda: results(ops), 60, "the modality's result")
    check_nothing_lost(box, [st_], results(ops))
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    log = d.log_text()
    assert "ARTIM" in log and "pdu_timeout" in log and "Traceback" not in log


def test_unknown_and_malformed_ae_titles_are_rejected(box: Box, daemon: Daemon) -> None:
    for calling, called in [("INTRUDER", None), ("pynetdicom", None), ("PYNETDICOMX", None),
                            ("PYNETDICOM", "edge_agent"), ("PYNETDICOM", "OTHER_NODE"),
                            ("*", None), ("STORE SCU", None)]:
        a = _associate(box, calling, called=called)
        assert rejected(a), (calling, called)
    ok = _associate(box, "PYNETDICOM")
    assert ok.is_established  # type: ignore[attr-defined]
    ok.release()  # type: ignore[attr-defined]
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log_text()


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def test_fuzzed_datasets_over_the_wire_never_crash_the_daemon(box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "0.3")
    d = Daemon(box)
    d.start()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.network_timeout = 20
    statuses: list[int] = []

    @FUZZ
    @given(flips=st.lists(st.tuples(st.integers(200, 5000), st.integers(0, 255)), max_size=6),
           cut=st.one_of(st.none(), st.integers(100, 6000)))
    def one(flips: list[tuple[int, int]], cut: int | None) -> None:
        ds = ct_instance(generate_uid(), generate_uid(), 1)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        raw = bytearray(buf.getvalue())
        for pos, val in flips:
            raw[pos % len(raw)] = val
        if cut is not None:
            raw = raw[:cut]
        try:
            fuzzed = pydicom.dcmread(io.BytesIO(bytes(raw)), force=True)
            fuzzed.SOPClassUID = CTImageStorage
            fuzzed.SOPInstanceUID = generate_uid()
        except Exception:  # noqa: BLE001 - cannot even build a request from it
            return
        assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(fuzzed)
        except Exception:  # noqa: BLE001 - pynetdicom may refuse to encode it client-side
            assoc.abort()
            return
        if status:
            statuses.append(int(status.Status))
        assoc.release() if assoc.is_established else assoc.abort()

    one()
    assert statuses, "no fuzzed instance reached the daemon"
    # Every answer is a DICOM status; the node still serves a clean instance.
    good = SentStudy(generate_uid())
    assert send(box, good, 1) == 1
    wait_for(lambda: "assembler cycle failed" not in d.log_text()
             and d.log_text().count("-> result") >= 1, 60, "processing")
    assert d.proc is not None and d.proc.poll() is None
    rss = psutil.Process(d.proc.pid).memory_info().rss
    assert rss < 1024 * 2**20
    assert d.stop() == 0
    assert "assembler cycle failed" not in d.log_text()


def test_phi_canary_sweep_over_every_egress_path(tmp_path: Path, box: Box, broker: Broker,
                                                 ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "0.5")
    d = Daemon(box)
    d.start()
    st_ = SentStudy(generate_uid())
    assert send(box, st_, 3) == 3
    ops.wait("results", 1, timeout=60)
    ops.wait("telemetry", 1, timeout=30)
    assert d.stop() == 0
    wait_for(lambda: ops.on("audit"), 30, "an audit checkpoint")
    phi = st_.phi() | set(CANARY_NAME.split("^"))
    sweep: dict[str, str] = {}
    sweep["mqtt"] = "\n".join(m.topic + "\n" + m.payload.decode("utf-8", "replace")
                              for m in ops.messages)
    sweep["daemon log"] = d.log_text()
    # The CLI de-identifier's output files (what a user would copy off the box).
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        ds = ct_instance(st_.uid, generate_uid(), i + 1)
        ds.save_as(src / f"i{i}.dcm", enforce_file_format=True)
        phi.add(ds.SOPInstanceUID)
    out = tmp_path / "out"
    proc = subprocess.run([*EDGE_AGENT, "deid", str(src), str(out), "--config", str(box.config)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert written
    sweep["deid files"] = "\n".join(p.read_bytes().decode("latin-1") + p.name for p in written)
    sweep["deid cli output"] = proc.stdout + proc.stderr
    # The operator's audit view is pseudonymised.
    tail = subprocess.run([*EDGE_AGENT, "audit", "tail", "--config", str(box.config), "-n",
                           "500", "--json"], cwd=REPO, capture_output=True, text=True)
    assert tail.returncode == 0, tail.stderr
    sweep["audit tail"] = tail.stdout + tail.stderr
    for where, text in sweep.items():
        for value in phi:
            assert value not in text, f"PHI canary found in {where}"
    # The investigator's export holds PHI by design: it must be private to its reader.
    exp = tmp_path / "export.jsonl"
    proc = subprocess.run([*EDGE_AGENT, "audit", "export", "--config", str(box.config),
                           "--since", "2000-01-01", "--until", "2100-01-01", "--out", str(exp)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode == 0:
        assert stat.S_IMODE(exp.stat().st_mode) == 0o600
        assert all(json.loads(line) for line in exp.read_text().splitlines())
    else:
        assert proc.returncode == 3, proc.stderr  # not in the auditor group: refused
