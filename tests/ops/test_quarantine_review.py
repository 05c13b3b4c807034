"""The privacy officer's quarantine review against the running daemon: list, show (a
PNG on the box), release with a named pixel-clean rule and by attestation (a result
comes out on the real broker), purge (crypto-shred), retention, telemetry backlog.
Instances go in with DCMTK storescu; the CLI runs as a subprocess (root holds every
role; tests/ops/test_roles.py checks that other users need the privacy role)."""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.helpers import REPO, Box, Daemon, Subscriber, audit_events, set_config, storescu, wait_for
from tests.helpers.ops import cli

SCHEMA = json.loads((REPO / "docs" / "schemas" / "telemetry.schema.json").read_text())


def _us(tmp: Path, n: int) -> tuple[list[Path], list[str]]:
    """n ultrasound studies (quarantined: modality US, BurnedInAnnotation absent)."""
    base = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"))
    files, names = [], []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.PatientName = f"QUARANTAINE^PATIENT{i}"
        ds.PatientID = f"QPID{i:05d}"
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = tmp / f"us{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
        names.append(str(ds.PatientName))
    return files, names


def _q(box: Box, *args: str) -> tuple[int, str, str]:
    r = cli("quarantine", *args, "--config", str(box.config))
    return r.returncode, r.stdout, r.stderr


def test_quarantine_list_show_release_purge(box: Box, broker: object, tmp_path: Path) -> None:
    set_config(box, "telemetry", "interval_seconds", "1.0")
    ops = Subscriber(box).start()
    daemon = Daemon(box)
    daemon.start()
    try:
        files, names = _us(tmp_path, 3)
        assert storescu(box.dicom_port, files).returncode == 0
        results = ops.wait("results", 3)
        assert all(r.json()["data"]["status"] == "all_quarantined" for r in results)
    finally:
        daemon.stop()
    # The officer has a pixel-clean rule for this device added, then reviews.
    conf = box.config.read_text()
    box.config.write_text(conf + '\n[[deid.pixel_clean]]\nmanufacturer = "G.E. Medical Systems"\n'
                          'model = "LOGIQ 700"\nrows = 480\ncolumns = 640\n'
                          'rectangles = [[0, 0, 640, 40]]\n')
    daemon = Daemon(box)
    daemon.start()
    try:

        rc, out, err = _q(box, "list", "--json")
        assert rc == 0, err
        items = json.loads(out)["items"]
        assert len(items) == 3 and {i["code"] for i in items} == {"burned-in-possible-modality"}
        assert [i["at"] for i in items] == sorted(i["at"] for i in items)  # oldest first
        rc, text, err = _q(box, "list")
        assert rc == 0 and "pixel-clean rules" in text and "1: G.E. Medical Systems" in text
        for name in names:  # pseudonymous refs only
            for part in name.split("^"):
                assert part not in out and part not in text

        # show: a PNG of the pixels, readable by the officer only
        first, second, third = (i["id"] for i in items)
        png = tmp_path / "look.png"
        rc, out, err = _q(box, "show", str(first), "--out", str(png))
        assert rc == 0, err
        assert png.stat().st_mode & 0o777 == 0o600
        from PIL import Image
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size == (640, 480)
            assert not img.info.get("text")
        rc, out, err = _q(box, "show", str(first), "--out", str(png))
        assert rc != 0 and "exists" in err  # never overwritten

        # release with a rule that does not exist is refused, item kept
        rc, out, err = _q(box, "release", str(first), "--rule", "2")
        assert rc == 2 and "no pixel-clean rule 2" in err
        rc, out, err = _q(box, "release", str(first))
        assert rc == 2 and "--rule N or --attest-clean" in err

        # release with the named rule: a result with the instance processed comes out
        rc, out, err = _q(box, "release", str(first), "--rule", "1", "--json")
        assert rc == 0, err
        rel = json.loads(out)
        got = wait_for(lambda: [r for r in ops.on("results") if r.json()["id"] == rel["event_id"]],
                       60, "the released instance's result")
        data = got[0].json()["data"]
        assert data["study"]["instances_processed"] == 1 and data["study"]["quarantined"] == []
        assert data["status"] == rel["status"]

        # release by attestation, then purge the third
        rc, out, err = _q(box, "release", str(second), "--attest-clean", "--json")
        assert rc == 0, err
        eid2 = json.loads(out)["event_id"]
        wait_for(lambda: [r for r in ops.on("results") if r.json()["id"] == eid2], 60,
                 "the attested instance's result")
        rc, out, err = _q(box, "purge", str(third))
        assert rc == 0, err
        rc, out, err = _q(box, "list", "--json")
        assert json.loads(out)["items"] == []
        assert not list((box.state / "quarantine").glob("*.enc"))
        rc, out, err = _q(box, "show", str(third), "--out", str(tmp_path / "gone.png"))
        assert rc == 2 and f"no quarantined instance #{third}" in err

        # every action audited with the officer's identity
        ev = audit_events(box)
        user = next(e["user"] for e in ev if e["event"] == "quarantine.viewed")
        assert user
        released = [e for e in ev if e["event"] == "quarantine.released"]
        ok = [e for e in released if e["outcome"] == 0]
        assert {e["details"].get("rule") for e in ok} >= {1}
        assert any(e["details"].get("attested_clean_by") == user for e in ok)
        assert any(e["outcome"] != 0 for e in released)  # the refused rule 2
        purged = [e for e in ev if e["event"] == "quarantine.purged"]
        assert {e["details"].get("why") for e in purged} == {"released", "officer"}

        # telemetry carries the backlog (schema-valid), and the logs carry no PHI
        def backlog_zero() -> dict[str, Any] | None:
            t = [m.json() for m in ops.on("telemetry")]
            return t[-1] if t and t[-1]["data"]["quarantine"]["count"] == 0 else None
        jsonschema.validate(wait_for(backlog_zero, 30, "telemetry with an empty quarantine"),
                            SCHEMA)
        log = daemon.log_text()
        for name in names:
            assert name.split("^")[1] not in log
    finally:
        daemon.stop()
        ops.stop()


def test_quarantine_retention_purges_old_items(box: Box, broker: object, tmp_path: Path) -> None:
    set_config(box, "quarantine", "retention_days", "2")
    set_config(box, "telemetry", "interval_seconds", "1.0")
    ops = Subscriber(box).start()
    daemon = Daemon(box)
    daemon.start()
    try:
        files, _ = _us(tmp_path, 2)
        assert storescu(box.dicom_port, files).returncode == 0
        ops.wait("results", 2)

        def two() -> dict[str, Any] | None:
            t = [m.json() for m in ops.on("telemetry")]
            return t[-1] if t and t[-1]["data"]["quarantine"]["count"] == 2 else None
        tel = wait_for(two, 30, "telemetry with two quarantined instances")
        jsonschema.validate(tel, SCHEMA)
        assert tel["data"]["quarantine"]["by_code"] == {"burned-in-possible-modality": 2}
        status = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
        assert status["quarantine"]["count"] == 2 and "oldest_age_s" in status["quarantine"]
    finally:
        daemon.stop()
    # One item quarantined three days ago (as if): the next start shreds it.
    with sqlite3.connect(box.state / "quarantine" / "index.db") as db:
        db.execute("UPDATE items SET at=? WHERE id=(SELECT MIN(id) FROM items)",
                   (time.time() - 3 * 86400,))
    daemon = Daemon(box)
    daemon.start()
    try:
        rc, out, err = _q(box, "list", "--json")
        assert rc == 0, err
        assert len(json.loads(out)["items"]) == 1
        assert len(list((box.state / "quarantine").glob("*.enc"))) == 1
        ev = audit_events(box)
        assert [e["details"]["why"] for e in ev if e["event"] == "quarantine.purged"] == [
            "retention"]
    finally:
        daemon.stop()
        ops.stop()
