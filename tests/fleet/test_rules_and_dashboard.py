"""The shipped Prometheus rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), and every expression in them and in the Grafana dashboard
reads only metrics the exporter serves (or the rules record)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

from fleet.exporter import FAMILIES
from tests.helpers import REPO
from tests.helpers.fleet import RULES, tool

DASHBOARD = REPO / "docs" / "grafana" / "edge-agent-fleet.json"
RULE_TESTS = RULES.with_name("edge-agent.rules.test.yml")
NAME = re.compile(r"\bedge_agent[a-zA-Z0-9_:]*")


def recorded() -> set[str]:
    return set(re.findall(r"^\s*- record: (\S+)$", RULES.read_text(), flags=re.M))


def rule_exprs() -> list[str]:
    # Each expr is one line or a '|' block indented under it.
    out, lines = [], RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: ?(.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            out.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt.strip())
        out.append(" ".join(block))
    return out


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query") and isinstance(v, str):
                yield v
            else:
                yield from dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from dashboard_exprs(v)


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Every alert the rules define is exercised by the unit tests.
    alerts = set(re.findall(r"^\s*- alert: (\S+)$", RULES.read_text(), flags=re.M))
    tested = set(re.findall(r"alertname: (\S+)$", RULE_TESTS.read_text(), flags=re.M))
    assert alerts and alerts == tested, alerts ^ tested
    for name in ("EdgeAgentBoxOffline", "EdgeAgentBacklogGrowing", "EdgeAgentCertificateExpiring",
                 "EdgeAgentEgressBlocked", "EdgeAgentModelDrift", "EdgeAgentAuditAnchorLate"):
        assert name in alerts  # what the issue asks for, by name


def test_rules_and_dashboard_read_only_what_the_exporter_serves() -> None:
    served = set(FAMILIES) | recorded()
    exprs = rule_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        names = set(NAME.findall(expr))
        assert names and names <= served, (expr, names - served)

    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["panels"]
    for panel in dash["panels"]:
        if panel["type"] not in ("row", "text"):
            assert panel.get("targets"), panel["title"]
    exprs = list(dashboard_exprs(dash))
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        if expr in ("prometheus",):  # the datasource variable's plugin id
            continue
        names = set(NAME.findall(expr))
        assert names and names <= set(FAMILIES), (expr, names - set(FAMILIES))
        used |= names
    # The dashboard shows what the issue names: presence, backlog, latency, certificates,
    # drift, security counters, model versions, the audit anchor.
    for name in ("edge_agent_up", "edge_agent_outbox_depth", "edge_agent_study_latency_seconds",
                 "edge_agent_certificate_expiry_timestamp_seconds", "edge_agent_model_drift_psi",
                 "edge_agent_egress_blocked_total", "edge_agent_model_info",
                 "edge_agent_audit_checkpoint_timestamp_seconds"):
        assert name in used, name
