"""Performance by subgroup, on the box: the running daemon, the real broker.

A test-only seeding command (armed only with EDGE_AGENT_TEST_MODE=1 on a
development box, agent/review/seed.py) records synthetic results through the same
code as the pipeline's hook; one real study goes through the whole pipeline too.
Verdicts come from the reviewer certificate over MQTT.  Subgroup Modality=DX is
planted to miss positives; a third subgroup has fewer than k verdicts and carries
a canary value.  The telemetry's performance section matches its schema, names
DX in an alert, and never names the small subgroup; no message the box publishes
carries the canary or the study's PHI; the CLI prints the table and writes the
model-card appendix; the fleet view shows the alert.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.ops import control
from tests.helpers import REPO, Box, Daemon, Subscriber, audit_events, set_config, wait_for
from tests.helpers.review import (
    BOX,
    ReviewerClient,
    ack_of,
    cli,
    flagging_model,
    ops_config,
    send_studies,
    verdict,
)

CANARY = "CANARYSCANNERQX7"
PATIENT = "Perfcanary^Zelda"
SCHEMAS = REPO / "docs" / "schemas"


def _seed(box: Box, items: list[dict[str, Any]], offset: int) -> list[str]:
    sock = box.state / "control.sock"
    out = control.request(sock, "review.seed", {"model": "lesion-demo", "items": items,
                                                "offset": offset})
    return list(out["result_ids"])


def _plan() -> list[tuple[dict[str, str], bool, str]]:
    """(subgroup, model positive, verdict): CT right every time; DX misses 18 of 48
    positives (verdict 'disagreed' on a negative); the canary scanner: 3 verdicts."""
    plan: list[tuple[dict[str, str], bool, str]] = []
    for _ in range(30):
        plan.append(({"Modality": "CT"}, True, "agreed"))
        plan.append(({"Modality": "CT"}, False, "agreed"))
        plan.append(({"Modality": "DX"}, True, "agreed"))
    for i in range(30):
        plan.append(({"Modality": "DX"}, False, "disagreed" if i < 18 else "agreed"))
    for _ in range(3):
        plan.append(({"Modality": CANARY}, True, "agreed"))
    return plan


def _total(perf: dict[str, Any]) -> int:
    return sum(m.get("overall", {}).get("verdicts", 0) for m in perf.get("models", []))


@pytest.fixture
def test_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_TEST_MODE", "1")


def test_planted_subgroup_alert_small_subgroup_suppressed_no_phi(
        tmp_path: Path, box: Box, ops: Subscriber, test_mode: None) -> None:
    flagging_model(box, tmp_path)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    set_config(box, "review", "min_verdicts", "10")
    set_config(box, "review", "windows_days", "[30]")
    set_config(box, "review", "gap", "0.05")
    daemon = Daemon(box)
    daemon.start()
    reviewer = ReviewerClient(box)
    try:
        # One real study through the pipeline, reviewed like the rest.
        send_studies(box.dicom_port, [PATIENT])
        [real] = [m.json() for m in ops.wait("results", 1, timeout=120)]
        plan = _plan()
        ids = _seed(box, [{"subgroup": g, "positive": p} for g, p, _v in plan], offset=0)
        sent = [verdict(rid, v) for rid, (_g, _p, v) in zip(ids, plan, strict=True)]
        sent.append(verdict(real["id"], "agreed"))
        for ev in sent:
            assert reviewer.send(ev) == 0
        ack_of(ops, sent[-1]["id"])
        # Published counts move in steps of k verdicts at least: one reviewer's one verdict
        # cannot be tied to a subgroup by watching the counts change.
        totals = [_total(t.json()["data"]["performance"]) for t in ops.on("telemetry")]
        steps = [b - a for a, b in zip(totals, totals[1:], strict=False) if b != a]
        assert steps and all(step >= 10 for step in steps), totals
        # A restart computes everything at once (what a day's roll would do).
        reviewer.close()
        assert daemon.stop() == 0
        daemon.start()
        reviewer = ReviewerClient(box)

        def alerted() -> list[dict[str, Any]]:
            for t in reversed(ops.on("telemetry")):
                perf = t.json()["data"].get("performance", {})
                if perf.get("alerts") and _total(perf) == len(sent):
                    return [perf]
            return []
        [perf] = wait_for(alerted, 60, "a performance alert in telemetry")
        # The table and the appendix, through the CLI.
        table = cli("models", "performance", "lesion-demo", "--config", str(box.config),
                    "--markdown", str(tmp_path / "appendix.md"))
        watch = json.loads(cli("fleet", "watch", "--config", str(ops_config(box, "ops-2")),
                               "--once", "--json", "--wait", "3").stdout)
    finally:
        reviewer.close()
        assert daemon.stop() == 0

    perf_schema = json.loads((SCHEMAS / "performance.schema.json").read_text())
    jsonschema.validate(perf, perf_schema)
    [model] = perf["models"]
    assert model["version"] == "1.1.1" and model["overall"]["verdicts"] == len(sent)
    cells = {f"{s['attribute']}={s['value']}": s for s in model["subgroups"]}
    assert set(cells) == {"Modality=CT", "Modality=DX"}  # 3 canary verdicts: suppressed
    # ... and so are the one real study's age band and sex (seeded results have none).
    assert model["suppressed_subgroups"] == 3
    dx = cells["Modality=DX"]
    assert (dx["tp"], dx["fn"], dx["tn"], dx["fp"]) == (30, 18, 12, 0)
    assert dx["sensitivity"]["ci95"][1] < 0.8  # wholly below the manifest's threshold
    assert cells["Modality=CT"]["sensitivity"]["ci95"][0] > 0.8
    named = {(a["subgroup"], a["metric"], a["kind"]) for a in perf["alerts"]}
    assert ("Modality=DX", "sensitivity", "below-threshold") in named
    assert not any("CT" in a["subgroup"] for a in perf["alerts"])

    out = table.stdout
    assert "Modality=DX" in out and "ALERT" in out and CANARY not in out
    appendix = (tmp_path / "appendix.md").read_text()
    assert "| Modality=DX |" in appendix and CANARY not in appendix
    row = next(r for r in watch if r["box"] == BOX)
    assert any("Modality=DX" in a and "sensitivity" in a for a in row["performance_alerts"])

    # The canary sweep: every message the box published (performance sections
    # above all), and the published audit events.
    phi = [PATIENT, PATIENT.replace("^", " "), "Perfcanary", "ID-Perfcanary"]
    for m in ops.messages:
        text = m.payload.decode()
        assert CANARY not in text, m.topic
        for value in phi:
            assert value.lower() not in text.lower(), (m.topic, value)
        if m.topic.endswith("/telemetry"):
            data = m.json()["data"]
            if data.get("performance", {}).get("models"):
                jsonschema.validate(data["performance"], perf_schema)
    alerts = [e for e in audit_events(box, 3000) if e["event"] == "performance.alert"]
    assert any(e["details"]["subgroup"] == "Modality=DX" for e in alerts)
    assert all(CANARY not in json.dumps(e) for e in alerts)
