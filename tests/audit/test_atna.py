"""IHE ATNA Record Audit Event (ITI-20) to a real rsyslog (imtcp + gtls, mutual TLS).

The daemon runs as a subprocess with ``[atna]`` pointing at a real rsyslogd on
loopback; what the collector wrote to its file is parsed as RFC 5424 and the
MSG as PS3.15 A.5 XML (or FHIR AuditEvent JSON).  Every test ends by comparing
the seqs the collector received with the records of the box's audit log:
every record arrived, first arrivals in seq order (duplicates after a broken
connection are allowed, at least once, and reported).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from agent.identity.pki import issue, make_ca, write_pair
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, Subscriber, set_config, storescu, wait_for
from tests.helpers import syslog_collector as rsyslog
from tests.helpers.dicom import make_instance, write_instances
from tests.helpers.syslog_collector import Collector, SyslogMessage

pytestmark = pytest.mark.skipif(
    not rsyslog.available() or shutil.which("echoscu") is None,
    reason="needs rsyslogd with the gtls driver (rsyslog-gnutls) and DCMTK; "
           "'tools/setup.sh test' installs them")

PATIENT_ID = "PID-ATNA-4471"
PATIENT_NAME = "Atna^Ophelia"


# -- helpers ---------------------------------------------------------------------------

def enable_atna(box: Box, port: int, *, fmt: str = "dicom-xml", cert: str = "pki/device.pem",
                key: str = "pki/device.key") -> None:
    for k, v in (("enabled", "true"), ("host", '"localhost"'), ("port", str(port)),
                 ("ca_file", '"pki/ca.pem"'), ("cert_file", f'"{cert}"'),
                 ("key_file", f'"{key}"'), ("format", f'"{fmt}"')):
        set_config(box, "atna", k, v)


def dev_collector(box: Box, root: Path) -> Collector:
    return Collector(root, ca=box.pki / "ca.pem", cert=box.pki / "collector.pem",
                     key=box.pki / "collector.key")


def echo(box: Box, aet: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", box.ae_title, "127.0.0.1",
                           str(box.dicom_port)], capture_output=True, text=True, timeout=60)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def status(box: Box) -> dict[str, Any]:
    p = cli("status", "--config", str(box.config), "--json")
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def doctor_atna(box: Box) -> dict[str, Any]:
    p = cli("doctor", "--config", str(box.config), "--json", "--skip", "broker")
    checks = [c for c in json.loads(p.stdout)["checks"] if c["name"] == "atna"]
    assert len(checks) == 1, p.stdout
    return dict(checks[0])


def head_seq(box: Box) -> int:
    """The last seq in the box's audit log (read-only; reading it records nothing)."""
    db = box.state / "audit" / "audit.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])
    finally:
        conn.close()


def xml_seq(root: ET.Element) -> int:
    """The audit record's seq, from the participant object that names the record."""
    for po in root.findall("ParticipantObjectIdentification"):
        if po.get("ParticipantObjectTypeCodeRole") == "13":
            assert str(po.get("ParticipantObjectID")).startswith("urn:uuid:")
            for d in po.findall("ParticipantObjectDetail"):
                if d.get("type") == "seq":
                    return int(base64.b64decode(str(d.get("value"))))
    raise AssertionError("no record reference in the AuditMessage")


def fhir_seq(ev: dict[str, Any]) -> int:
    for e in ev.get("entity", []):
        if e["role"]["code"] == "13":
            assert e["what"]["identifier"]["value"] == f"urn:uuid:{ev['id']}"
            return int(next(d["valueString"] for d in e["detail"] if d["type"] == "seq"))
    raise AssertionError("no record reference in the AuditEvent")


def xml_details(root: ET.Element) -> dict[str, str]:
    """The record's details, from its ParticipantObjectDetail elements (base64 values)."""
    return {str(d.get("type")): base64.b64decode(str(d.get("value"))).decode()
            for po in root.findall("ParticipantObjectIdentification")
            for d in po.findall("ParticipantObjectDetail")}


def parsed(msgs: list[SyslogMessage]) -> list[tuple[int, ET.Element]]:
    out = []
    for m in msgs:
        assert m.msgid == "IHE+RFC-3881", m
        root = ET.fromstring(m.msg)  # valid XML or this raises
        assert root.tag == "AuditMessage"
        out.append((xml_seq(root), root))
    return out


def event_ids(root: ET.Element) -> tuple[str | None, str | None]:
    ev = root.find("EventIdentification")
    assert ev is not None
    eid, etype = ev.find("EventID"), ev.find("EventTypeCode")
    return (None if eid is None else eid.get("csd-code"),
            None if etype is None else etype.get("csd-code"))


def check_complete_and_ordered(seqs: list[int], head: int) -> int:
    """Every record 1..head arrived, first arrivals in order; returns the duplicates."""
    missing = sorted(set(range(1, head + 1)) - set(seqs))
    assert not missing, f"records never reached the collector: {missing}"
    first: list[int] = []
    seen: set[int] = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            first.append(s)
    assert first == sorted(first), f"records arrived out of order: {first}"
    dupes = len(seqs) - len(seen)
    print(f"collector received {len(seqs)} messages for {head} records: {dupes} duplicate(s)")
    return dupes


def make_study(tmp: Path, n: int = 2) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return write_instances(tmp, [make_instance(PATIENT_NAME, study, series, PatientID=PATIENT_ID)
                                 for _ in range(n)], stem="ct")


@pytest.fixture
def coll(box: Box, tmp_path: Path) -> Iterator[Collector]:
    c = dev_collector(box, tmp_path / "collector")
    yield c
    c.stop()


@pytest.fixture
def stop_daemon() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None:
            d.stop()


def run_daemon(box: Box, started: list[Daemon]) -> Daemon:
    d = Daemon(box)
    d.start()
    started.append(d)
    return d


# -- tests -----------------------------------------------------------------------------

def test_daemon_events_reach_the_collector_as_atna_xml(
        tmp_path: Path, box: Box, broker: Broker, coll: Collector,
        stop_daemon: list[Daemon]) -> None:
    coll.start()
    enable_atna(box, coll.port)
    ops = Subscriber(box).start()
    try:
        d = run_daemon(box, stop_daemon)
        assert echo(box, "INTRUDER").returncode != 0  # association refused
        proc = storescu(box.dicom_port, make_study(tmp_path))
        assert proc.returncode == 0, proc.stderr
        # A privacy officer's export for one patient: a record with PHI (the patient ID).
        exp = cli("audit", "export", "--config", str(box.config), "--since", "2000-01-01",
                  "--until", "2100-01-01", "--patient", PATIENT_ID, "--out",
                  str(tmp_path / "export.jsonl"))
        assert exp.returncode == 0, exp.stderr

        def arrived(msgs: list[SyslogMessage]) -> bool:
            ids = {event_ids(root) for _, root in parsed(msgs)}
            return {("110113", "110126"), ("110104", None), ("110103", None),
                    ("110101", None)} <= ids
        msgs = coll.wait_for(arrived, 90, "the refusal, the study and the export at the "
                             "collector")
        # The header is RFC 5424 as ITI-20 asks: facility 10, notice or warning, no SD.
        host = re.sub(r"[^\x21-\x7e]", "_", socket.gethostname())
        for m in msgs:
            assert (m.version, m.facility, m.app_name, m.sd) == (1, 10, "edge-agent", "-")
            assert m.hostname == host and m.procid.isdigit()
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", m.timestamp)
        records = dict(parsed(msgs))
        refused = [(s, r) for s, r in records.items()
                   if event_ids(r) == ("110113", "110126")]
        assert refused, "association.rejected missing"
        seq, root = refused[0]
        ev = root.find("EventIdentification")
        assert ev is not None and ev.get("EventOutcomeIndicator") != "0"
        assert next(m for m in msgs if xml_seq(ET.fromstring(m.msg)) == seq).severity == 4
        # The full local record: the peer as it is (central ops sees only pseudonyms).
        peers = [p.get("UserID") for p in root.findall("ActiveParticipant")]
        assert "127.0.0.1" in peers
        assert xml_details(root)["calling_ae"] == "INTRUDER"
        # PHI goes to this collector (by design), and not to central ops.
        exported = [r for r in records.values() if event_ids(r) == ("110101", None)]
        pids = {po.get("ParticipantObjectID") for r in exported
                for po in r.findall("ParticipantObjectIdentification")
                if po.get("ParticipantObjectTypeCodeRole") == "1"}
        assert PATIENT_ID in pids
        assert all(PATIENT_ID.encode() not in m.payload for m in ops.messages)
        check = doctor_atna(box)
        assert check["status"] == "PASS" and "mutual TLS" in check["message"], check

        assert d.stop() == 0  # drains to the collector, daemon.stopped included
        head = head_seq(box)
        seqs = [s for s, _ in parsed(coll.messages())]
        check_complete_and_ordered(seqs, head)
        assert ("110100", "110121") in {event_ids(r) for _, r in parsed(coll.messages())}
    finally:
        ops.stop()


def test_fhir_auditevent_format(box: Box, broker: Broker, coll: Collector,
                                stop_daemon: list[Daemon]) -> None:
    coll.start()
    enable_atna(box, coll.port, fmt="fhir-json")
    d = run_daemon(box, stop_daemon)
    assert echo(box, "INTRUDER").returncode != 0

    def refused(msgs: list[SyslogMessage]) -> bool:
        return any(json.loads(m.msg).get("subtype", [{}])[0].get("code") == "110126"
                   for m in msgs)
    coll.wait_for(refused, 60, "an AuditEvent for the refused association")
    assert d.stop() == 0
    msgs = coll.messages()
    events = []
    for m in msgs:
        assert m.msgid == "ATNAAUDITEVENT"
        ev = json.loads(m.msg)
        assert ev["resourceType"] == "AuditEvent"
        assert ev["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
        assert ev["outcome"] in {"0", "4", "8", "12"} and ev["recorded"]
        assert ev["agent"] and all("requestor" in a for a in ev["agent"])
        events.append(ev)
    rej = next(e for e in events if e.get("subtype", [{}])[0].get("code") == "110126")
    assert rej["type"]["code"] == "110113" and rej["action"] == "E"
    assert any(a.get("network", {}).get("address") == "127.0.0.1" for a in rej["agent"])
    own = next(e for e in rej["entity"] if e["role"]["code"] == "13")
    assert {"type": "calling_ae", "valueString": "INTRUDER"} in own["detail"]
    check_complete_and_ordered([fhir_seq(e) for e in events], head_seq(box))


def test_collector_outage_loses_nothing_and_keeps_order(
        box: Box, broker: Broker, coll: Collector, stop_daemon: list[Daemon]) -> None:
    coll.start()
    enable_atna(box, coll.port)
    d = run_daemon(box, stop_daemon)
    coll.wait_for(lambda m: len(m) >= 2, 60, "the daemon's first records")
    coll.stop()
    for _ in range(6):  # the daemon keeps serving while the collector is down
        assert echo(box, "ECHOSCU").returncode == 0
    s = wait_for(lambda: (st := status(box)["atna"]) and not st["connected"]
                 and st["backlog"] > 0 and st, 60, "the ATNA backlog in status")
    assert s["last_error"] and s["failures"] >= 1
    before = len(coll.raw())
    behind = head_seq(box)
    coll.start()
    coll.wait_for(lambda m: max((x for x, _ in parsed(m)), default=0) >= behind, 90,
                  "the records of the outage")
    assert len(coll.raw()) > before
    # Duplicates are counted: every one the collector got, the box counted as re-sent.
    resent = status(box)["atna"]["resent"]
    so_far = [x for x, _ in parsed(coll.messages())]
    assert resent >= len(so_far) - len(set(so_far))
    assert d.stop() == 0
    dupes = check_complete_and_ordered([x for x, _ in parsed(coll.messages())], head_seq(box))
    assert dupes <= head_seq(box)  # at least once, not a flood


def test_kill9_during_an_outage_then_restart_delivers_everything(
        box: Box, broker: Broker, coll: Collector, stop_daemon: list[Daemon]) -> None:
    coll.start()
    enable_atna(box, coll.port)
    d = run_daemon(box, stop_daemon)
    coll.wait_for(lambda m: len(m) >= 2, 60, "the daemon's first records")
    coll.stop()
    for _ in range(4):
        assert echo(box, "ECHOSCU").returncode == 0
    wait_for(lambda: status(box)["atna"]["backlog"] > 0, 60, "a backlog")
    d.kill9()
    d = run_daemon(box, stop_daemon)
    for _ in range(3):
        assert echo(box, "ECHOSCU").returncode == 0
    behind = head_seq(box)
    coll.start()
    coll.wait_for(lambda m: max((x for x, _ in parsed(m)), default=0) >= behind, 90,
                  "the records from before and after the kill")
    assert d.stop() == 0
    check_complete_and_ordered([x for x, _ in parsed(coll.messages())], head_seq(box))


def test_collector_with_a_certificate_from_another_ca_is_refused(
        tmp_path: Path, box: Box, broker: Broker, stop_daemon: list[Daemon]) -> None:
    ca_key, ca_cert = make_ca("some other CA")
    key, cert = issue(ca_key, ca_cert, "localhost", server=True, dns=("localhost",),
                      ips=("127.0.0.1",))
    other = tmp_path / "other"
    write_pair(other, "ca", ca_key, ca_cert)
    write_pair(other, "collector", key, cert)
    # The impostor trusts the box's CA, so only the box's check can refuse it.
    coll = Collector(tmp_path / "impostor", ca=box.pki / "ca.pem",
                     cert=other / "collector.pem", key=other / "collector.key").start()
    try:
        enable_atna(box, coll.port)
        d = run_daemon(box, stop_daemon)
        assert echo(box, "ECHOSCU").returncode == 0
        st = wait_for(lambda: (a := status(box)["atna"])["last_error"] and a, 60,
                      "the refusal in status")
        assert st["last_error_code"] == "collector-cert-untrusted" and not st["connected"]
        assert "not issued by the CA in [atna] ca_file" in st["last_error"]
        assert st["tls_failures"] >= 1 and st["sent"] == 0 and st["backlog"] > 0
        assert "not issued by the CA in [atna] ca_file" in d.log_text()
        assert coll.raw() == []  # not one record went to it
        check = doctor_atna(box)
        assert check["status"] == "FAIL"
        assert "not issued by the CA in [atna] ca_file" in check["message"], check
        alerts = [e for e in audit_tail(box) if e["event"] == "security.alert"
                  and e["details"].get("what") == "atna_collector_unavailable"]
        assert alerts and alerts[0]["details"]["reason"] == "collector-cert-untrusted"
        assert len(alerts) == 1  # once per reason, not once per retry
        d.stop()
        assert coll.raw() == []
    finally:
        coll.stop()


def test_a_collector_that_refuses_our_certificate_gets_nothing(
        tmp_path: Path, box: Box, broker: Broker, coll: Collector,
        stop_daemon: list[Daemon]) -> None:
    ca_key, ca_cert = make_ca("not the collector's CA")
    key, cert = issue(ca_key, ca_cert, "dev-site.dev-box", client=True)
    write_pair(box.root / "pki", "stranger", key, cert)
    coll.start()
    enable_atna(box, coll.port, cert="pki/stranger.pem", key="pki/stranger.key")
    run_daemon(box, stop_daemon)
    st = wait_for(lambda: (a := status(box)["atna"])["last_error"] and a, 60,
                  "the refusal in status")
    assert st["last_error_code"] == "client-cert-refused", st
    assert "refused our client certificate" in st["last_error"]
    assert st["sent"] == 0 and coll.raw() == []
    assert "not permitted to talk to peer" in coll.log_text()


def test_atna_config_problems_are_reported_together(box: Box) -> None:
    (box.root / "pki" / "device.key").chmod(0o644)
    for k, v in (("enabled", "true"), ("port", "70000"), ("format", '"xml"'),
                 ("ca_file", '"pki/no-such-ca.pem"'), ("cert_file", '"pki/device.pem"'),
                 ("key_file", '"pki/device.key"'), ("facility", '"nonsense"')):
        set_config(box, "atna", k, v)
    p = cli("run", "--config", str(box.config))
    assert p.returncode != 0
    err = p.stderr
    for problem in ("[atna.host] is required", "[atna.port] = 70000",
                    "[atna.format] = 'xml'", "no-such-ca.pem", "chmod 600",
                    "[atna.facility] = 'nonsense'"):
        assert problem in err, err
    assert "Traceback" not in err


def audit_tail(box: Box) -> list[dict[str, Any]]:
    p = cli("audit", "tail", "--config", str(box.config), "-n", "200", "--json")
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_inline_pem_is_refused_without_echoing_it(box: Box) -> None:
    secret = "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\\n"
    for k, v in (("enabled", "true"), ("host", '"localhost"'), ("ca_file", '"pki/ca.pem"'),
                 ("cert_file", '"pki/device.pem"'), ("key_file", f'"{secret}"')):
        set_config(box, "atna", k, v)
    p = cli("run", "--config", str(box.config))
    assert p.returncode != 0
    assert "[atna.key_file] holds PEM text" in p.stderr
    assert "MIGHAgEA" not in p.stderr + p.stdout


def test_a_record_that_cannot_be_decrypted_is_sent_as_an_alert_and_the_rest_flow(
        box: Box, broker: Broker, coll: Collector, stop_daemon: list[Daemon]) -> None:
    enable_atna(box, coll.port)  # the collector is not up yet: records wait
    d = run_daemon(box, stop_daemon)
    assert echo(box, "ECHOSCU").returncode == 0
    assert d.stop() == 0
    db = box.state / "audit" / "audit.db"
    conn = sqlite3.connect(db)
    ct = bytearray(conn.execute("SELECT ct FROM records WHERE seq = 2").fetchone()[0])
    ct[-5] ^= 0x01  # inside the GCM tag: the record no longer decrypts
    conn.execute("UPDATE records SET ct = ? WHERE seq = 2", (bytes(ct),))
    conn.commit()
    conn.close()
    coll.start()
    d = run_daemon(box, stop_daemon)
    behind = head_seq(box)
    coll.wait_for(lambda m: max((x for x, _ in parsed(m)), default=0) >= behind, 90,
                  "every record, the tampered one included")
    assert status(box)["atna"]["unreadable"] == 1
    assert d.stop() == 0
    got = parsed(coll.messages())
    check_complete_and_ordered([x for x, _ in got], head_seq(box))
    tampered = [r for x, r in got if x == 2][0]
    assert event_ids(tampered) == ("110113", None)
    ev = tampered.find("EventIdentification")
    assert ev is not None and ev.get("EventOutcomeIndicator") == "12"
    assert xml_details(tampered)["what"] == "audit_record_unreadable"
