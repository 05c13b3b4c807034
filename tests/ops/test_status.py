"""`edge-agent status` and the admin actions over the control socket, against the real
daemon started as a subprocess (with a real mTLS broker)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess

from agent.identity.pki import issue, load_cert, load_key, write_pair
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, wait_for


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_status_reports_live_daemon_state(box: Box, daemon: Daemon) -> None:
    def connected() -> dict[str, object] | None:
        p = cli("status", "--config", str(box.config), "--json")
        if p.returncode != 0:
            return None
        s = json.loads(p.stdout)
        return s if s["mqtt"]["connected"] else None

    s = wait_for(connected, 60, "status showing MQTT connected")
    assert s["site"] == "dev-site" and s["device"] == "dev-box"
    assert s["intake"] == "open"
    assert s["dicom"]["listen"].endswith(f":{box.dicom_port}")
    # The default: one receive process per core (at most 8); 0 = in the daemon's process.
    auto = min(8, len(os.sched_getaffinity(0)))
    assert s["dicom"]["receive_workers"] == (auto if auto > 1 else 0)
    assert set(s["studies"]) >= {"open", "complete", "done", "processed", "failed"}
    assert set(s["outbox"]) == {"depth", "bytes", "oldest_age_s", "blocked"}
    assert s["quarantine"]["count"] == 0
    assert s["mqtt"]["last_error"] is None
    assert 800 < s["certificates"]["mqtt_device"]["days_left"] <= 825
    assert s["warnings"] == []

    text = cli("status", "--config", str(box.config))
    assert text.returncode == 0, text.stderr
    assert "mqtt:          connected" in text.stdout
    assert "certificate:" in text.stdout and "days left" in text.stdout


def test_pause_and_resume_intake_are_audited(box: Box, daemon: Daemon) -> None:
    assert cli("control", "pause", "--config", str(box.config)).returncode == 0
    s = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
    assert s["intake"] == "paused"
    assert cli("control", "resume", "--config", str(box.config)).returncode == 0
    s = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
    assert s["intake"] == "open"
    tail = cli("audit", "tail", "--config", str(box.config), "--json", "-n", "50")
    assert tail.returncode == 0, tail.stderr
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    actions = [r["details"].get("command") for r in rows if r["event"] == "cli.action"]
    assert "control.intake.pause" in actions and "control.intake.resume" in actions
    me = pwd.getpwuid(os.getuid()).pw_name
    mine = [r for r in rows if r["event"] == "cli.action"
            and str(r["details"].get("command")).startswith("control.")]
    assert mine and all(r.get("user") == me for r in mine)


def test_status_without_daemon_says_how_to_start_it(box: Box) -> None:
    p = cli("status", "--config", str(box.config))
    assert p.returncode == 2
    assert "not running" in p.stderr and "systemctl start edge-agent" in p.stderr


def test_status_warns_thirty_days_before_certificate_expiry(box: Box, broker: Broker) -> None:
    ca_key, ca = load_key(box.pki / "ca.key"), load_cert(box.pki / "ca.pem")
    k, c = issue(ca_key, ca, "dev-site.dev-box", client=True, days=12)
    write_pair(box.pki, "device", k, c)
    d = Daemon(box)
    d.start()
    try:
        s = json.loads(cli("status", "--config", str(box.config), "--json").stdout)
        text = cli("status", "--config", str(box.config)).stdout
    finally:
        d.stop()
    assert any("expires in 12 days" in w and "rotate-cert" in w for w in s["warnings"])
    assert "warning:       device certificate expires in 12 days" in text
