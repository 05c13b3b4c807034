"""`edge-agent audit verify|export|tail` against a real config, keys and database."""

from __future__ import annotations

import grp
import json
import os
import sqlite3
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent.audit import records_between
from agent.config import AuditSettings
from agent.crypto import write_secret_file
from provisioning.audit_cmd import is_auditor, register
from tests.helpers.audit import AuditBox, fill

PATIENT = "PID-00004"


@pytest.fixture
def cli(tmp_path: Path) -> tuple[typer.Typer, Path, AuditBox]:
    state = tmp_path / "state"
    ab = AuditBox(tmp_path)
    ab.db = state / "audit" / "audit.db"
    write_secret_file(tmp_path / "keys" / "kek.key", ab.kek.key.hex().encode())
    write_secret_file(tmp_path / "keys" / "pseudonym.key", os.urandom(32).hex().encode())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[box]
site = "st-marys"
device = "ct-edge-01"
state_dir = "{state}"
[keys]
pseudonym = "keys/pseudonym.key"
kek = "keys/kek.key"
audit_signing = "keys/audit_signing.key"
[mqtt]
host = "broker.local"
ca = "pki/ca.pem"
cert = "pki/device.pem"
key = "pki/device.key"
""")
    log = ab.open(AuditSettings(checkpoint_every=4))
    fill(log, 10)
    log.record("cli.action", user="alice", details={"command": "models.install"})
    log.checkpoint()
    log.close()
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a second command keeps 'audit' a sub-command
    register(app)
    return app, cfg, ab


def test_verify_intact_then_damaged(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, ab = cli
    published = cfg.parent / "published.jsonl"
    published.write_text("".join(json.dumps({"data": d}) + "\n" for d in ab.published))
    ok = CliRunner().invoke(app, ["audit", "verify", "--config", str(cfg),
                                  "--published", str(published)])
    assert ok.exit_code == 0, ok.output
    assert "INTACT: 11 records" in ok.output
    with sqlite3.connect(ab.db) as db:
        db.execute("DELETE FROM records WHERE seq = 6")
    bad = CliRunner().invoke(app, ["audit", "verify", "--config", str(cfg), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["problems"] == ["records seq 6..6 are missing (deleted)"]


def test_verify_reports_a_missing_database_clearly(tmp_path: Path,
                                                   cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, ab = cli
    for p in ab.db.parent.glob("audit.db*"):
        p.unlink()
    # The anchor outside the database says this box had a log: a failed verification.
    res = CliRunner().invoke(app, ["audit", "verify", "--config", str(cfg)])
    assert res.exit_code == 1, res.output
    assert "NOT VERIFIABLE" in res.output and "is missing, but this box had an audit log" \
        in res.output and "last checkpoint 2 (seq 11" in res.output
    assert not ab.db.exists(), "verify must not start a new log"
    # No database and no anchor: nothing was ever there, a usage error.
    (ab.db.parent.parent / "audit-anchor.json").unlink()
    res = CliRunner().invoke(app, ["audit", "verify", "--config", str(cfg)])
    assert res.exit_code == 2
    assert "audit database" in res.output and "does not exist" in res.output


def test_export_jsonl_for_one_patient_is_audited(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, ab = cli
    out = cfg.parent / "export.jsonl"
    res = CliRunner().invoke(app, ["audit", "export", "--config", str(cfg), "--since",
                                   "2000-01-01", "--until", "2100-01-01", "--patient", PATIENT,
                                   "--format", "jsonl", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.stat().st_mode & 0o777 == 0o600
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phi"]["patient_id"] for r in rows] == [PATIENT]
    audit = [r for r in records_between(ab.db, ab.kek, datetime(2000, 1, 1, tzinfo=UTC),
                                        datetime(2100, 1, 1, tzinfo=UTC))
             if r["event"] == "audit.exported"]
    assert len(audit) == 1
    assert audit[0]["user"] == "root" and audit[0]["details"]["records"] == 1
    assert audit[0]["phi"] == {"patient_id": PATIENT}


def test_export_atna_xml_is_well_formed(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, _ = cli
    res = CliRunner().invoke(app, ["audit", "export", "--config", str(cfg), "--since",
                                   "2000-01-01", "--until", "2100-01-01", "--format", "atna-xml"])
    assert res.exit_code == 0, res.output
    root = ET.fromstring(res.stdout)
    msgs = root.findall("AuditMessage")
    assert len(msgs) == 11
    received = msgs[4]
    ev = received.find("EventIdentification")
    assert ev is not None and ev.get("EventActionCode") == "C"
    assert ev.get("EventOutcomeIndicator") == "0" and ev.get("EventDateTime")
    eid = ev.find("EventID")
    assert eid is not None and eid.get("csd-code") == "110104" and eid.get("codeSystemName") == "DCM"
    assert len(received.findall("ActiveParticipant")) == 2
    src = received.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID") == "st-marys/ct-edge-01"
    objs = received.findall("ParticipantObjectIdentification")
    patient = [o for o in objs if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert [o.get("ParticipantObjectID") for o in patient] == [PATIENT]
    assert patient[0].findtext("ParticipantObjectName") == "Doe^Jane4"
    cli_action = msgs[10].find("EventIdentification/EventTypeCode")
    assert cli_action is not None and cli_action.get("csd-code") == "110141"


def test_tail_is_pseudonymised(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, _ = cli
    res = CliRunner().invoke(app, ["audit", "tail", "--config", str(cfg), "-n", "5"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 5
    assert "PID-" not in res.output and "Doe^" not in res.output
    assert "cli.action" in lines[-1] and "alice" in lines[-1]


def test_bad_dates_and_formats_are_explained(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, _ = cli
    res = CliRunner().invoke(app, ["audit", "export", "--config", str(cfg), "--since", "last week",
                                   "--until", "2100-01-01"])
    assert res.exit_code == 2 and "'last week' is not a date" in res.output
    res = CliRunner().invoke(app, ["audit", "export", "--config", str(cfg), "--since",
                                   "2000-01-01", "--until", "2100-01-01", "--format", "csv"])
    assert res.exit_code == 2 and "use jsonl or atna-xml" in res.output


def test_auditor_role() -> None:
    some_group = grp.getgrgid(os.getgid())
    assert is_auditor(0, [], "no-such-group-xyz")
    assert is_auditor(1000, [some_group.gr_gid], some_group.gr_name)
    assert not is_auditor(1000, [some_group.gr_gid + 12345], some_group.gr_name)
    assert not is_auditor(1000, [some_group.gr_gid], "no-such-group-xyz")


def test_atna_cli_user_is_the_requestor(cli: tuple[typer.Typer, Path, AuditBox]) -> None:
    app, cfg, _ = cli
    res = CliRunner().invoke(app, ["audit", "export", "--config", str(cfg), "--since",
                                   "2000-01-01", "--until", "2100-01-01", "--format", "atna-xml"])
    msg = ET.fromstring(res.stdout).findall("AuditMessage")[10]
    people = {p.get("UserID"): p for p in msg.findall("ActiveParticipant")}
    assert people["alice"].get("UserIsRequestor") == "true"
    assert people["alice"].find("RoleIDCode") is None
    assert people["edge-agent@st-marys/ct-edge-01"].get("UserIsRequestor") == "false"
