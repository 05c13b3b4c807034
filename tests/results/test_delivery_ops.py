"""What an operator sees of delivery: `edge-agent doctor` echoes every PACS
destination; `edge-agent status` shows each queue; an object nobody confirms within
[results] dead_letter_hours is dead-lettered, audited and flagged; the queue's
rows stay readable after a KEK rotation."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.crypto import KeyEncryptionKey, random_key
from agent.results.delivery import backoff
from agent.results.queue import DeliveryQueue, QueuedObject
from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Daemon,
    Subscriber,
    audit_events,
    free_port,
    storescu,
    wait_for,
)
from tests.helpers.delivery import ScriptedPeer, StoreSCP, add_destination, enable_delivery
from tests.helpers.results import original_study

pytestmark = [pytest.mark.peer("storescu", "storescp")]


def _cli(box: Box, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args, "--config", str(box.config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_doctor_echoes_each_destination(tmp_path: Path, box: Box) -> None:
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        enable_delivery(box)
        add_destination(box, "archive", scp.aet, scp.port)
        add_destination(box, "gone", "NOBODY", free_port())
        out = _cli(box, "doctor", "--json", "--skip", "broker", "--skip", "daemon")
    finally:
        scp.stop()
    checks = [c for c in json.loads(out.stdout)["checks"] if c["name"] == "results"]
    assert len(checks) == 2, out.stdout
    ok, gone = checks
    assert ok["status"] == "PASS" and "archive" in ok["message"] and "C-ECHO ok" in ok["message"]
    assert gone["status"] == "FAIL" and "gone" in gone["message"]
    assert "Connect a PACS" in gone["fix"]
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_unconfirmed_objects_are_dead_lettered_after_their_age(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    # A PACS that keeps answering "out of resources": retried, never stored.
    full = ScriptedPeer("FULL", lambda n: 0xA700).start()
    enable_delivery(box, dead_letter_hours="0.002")  # 7.2 s
    add_destination(box, "full", full.aet, full.port)
    daemon = Daemon(box)
    daemon.start()
    try:
        assert storescu(box.dicom_port, list(original_study(tmp_path / "s").files)
                        ).returncode == 0
        msgs = ops.wait("results", 2, timeout=180)
        status = _cli(box, "status")
    finally:
        daemon.stop()
        full.stop()
    summary = [m.json() for m in msgs if "result.delivery" in m.json()["type"]]
    assert summary[0]["data"]["delivered_to"] == [
        {"destination": "full", "state": "dead-letter", "objects": 3, "confirmed": 0}]
    assert len(full.requests) >= 3 and not full.stored
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("pacs full:"))
    assert "0 queued" in line and "3 dead-lettered" in line and "0xA700" in line
    assert "warning:       results destination full: 3 object(s) dead-lettered" in status.stdout
    dead = [e for e in audit_events(box, 3000) if e["event"] == "results.sent"
            and e["details"]["result"] == "dead-letter"]
    assert len(dead) == 3 and all(e["outcome"] in (12, "major_failure") for e in dead)


def test_queue_rows_survive_a_kek_rotation_and_final_rows_are_shredded(tmp_path: Path) -> None:
    old, new = KeyEncryptionKey(random_key()), KeyEncryptionKey(random_key())
    q = DeliveryQueue(tmp_path / "delivery.db", old)
    rows = [QueuedObject("pacs", "2.25.1", 1, k, "", "1.2.840.10008.5.1.4.1.1.88.34",
                         f"2.25.{i}", b"PHI-BYTES-" + k.encode()) for i, k in
            enumerate(("sr", "gsps"), start=10)]
    assert q.plan("2.25.1", 1, rows) == 2
    assert q.plan("2.25.1", 1, rows) == 0  # a version is planned once
    assert q.rewrap(old, new) == 2
    q.close()
    q = DeliveryQueue(tmp_path / "delivery.db", new)
    due = q.due("pacs", now=time.time() + 1)
    assert [it.data for it in due] == [b"PHI-BYTES-sr", b"PHI-BYTES-gsps"]
    q.stored(due[0].id, 0, commitment=False)
    q.dead(due[1].id, 0xC000, "refused")
    assert q.finished() == [("2.25.1", 1)]
    assert q.wrapped_by() == set()  # both final: keys and bodies deleted
    q.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"PHI-BYTES" not in raw


def test_backoff_grows_jittered_and_bounded() -> None:
    import random

    rnd = random.Random(7)
    waits = [backoff(n, 5.0, 300.0, rnd) for n in range(1, 12)]
    for n, w in enumerate(waits, start=1):
        base = min(300.0, 5.0 * 2 ** (n - 1))
        assert base / 2 <= w <= base
    assert len({round(w, 6) for w in waits}) == len(waits)  # jittered, not lockstep


def test_dicom_tls_destination_with_client_certificate(
        tmp_path: Path, box: Box, broker: object, ops: Subscriber) -> None:
    """DICOM TLS towards storescp, which requires our client certificate: delivered.
    The same peer under a CA the box was not told to trust: nothing is sent."""
    from agent.identity import pki

    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca = pki.make_ca()
    (d / "ca.pem").write_bytes(pki.cert_pem(ca))
    paths = {}
    for stem, cn, kw in (("pacs", "pacs", {"server": True, "dns": ("localhost",),
                                           "ips": ("127.0.0.1",)}),
                         ("box", "edge-box", {"client": True})):
        key, cert = pki.issue(ca_key, ca, cn, **kw)  # type: ignore[arg-type]
        paths[stem] = pki.write_pair(d, stem, key, cert)
    rogue_key, rogue = pki.make_ca("rogue CA")
    (d / "rogue.pem").write_bytes(pki.cert_pem(rogue))
    secure = StoreSCP(tmp_path / "secure", aet="SECURE",
                      tls=(paths["pacs"][0], paths["pacs"][1], d / "ca.pem")).start()
    enable_delivery(box)
    tls = {"tls.enabled": "true", "tls.cert": f'"{paths["box"][1]}"',
           "tls.key": f'"{paths["box"][0]}"'}
    add_destination(box, "secure", secure.aet, secure.port, kinds='["sr"]',
                    **tls, **{"tls.ca": f'"{d / "ca.pem"}"'})
    add_destination(box, "untrusted", secure.aet, secure.port, kinds='["sr"]',
                    host="localhost", **tls, **{"tls.ca": f'"{d / "rogue.pem"}"'})
    daemon = Daemon(box)
    daemon.start()
    try:
        assert storescu(box.dicom_port, list(original_study(tmp_path / "s").files)
                        ).returncode == 0
        ops.wait("results", 1, timeout=180)
        got = wait_for(lambda: secure.received(), 120, "the SR over TLS")
        status = wait_for(lambda: (s := json.loads(_cli(box, "status", "--json").stdout))
                          ["results_delivery"]["untrusted"]["consecutive_failures"] and s, 60,
                          "the untrusted destination to fail")
    finally:
        daemon.stop()
        secure.stop()
    assert [str(ds.Modality) for ds in got] == ["SR"]  # one SR: the untrusted one sent none
    u = status["results_delivery"]["untrusted"]
    assert u["confirmed"] == 0 and u["depth"] == 1 and "TLS handshake failed" in u["last_error"]
