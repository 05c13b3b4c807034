"""Rewrite references to modules that moved into packages (issue 15): imports, monkeypatch
and importlib targets, ``agent/x.py`` paths in docs, and the test helpers' old names.

For branches written before the move, and for merges:

    python tools/rewrite_moved_imports.py $(git ls-files '*.py' '*.md' '*.json' '*.toml')

Files are rewritten in place; run ``ruff check --fix --select I`` afterwards to re-sort
imports. Idempotent: new paths are left alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# old module under agent/ -> new dotted path under agent/
AGENT_MOVES = {
    "inbox": "store.inbox", "quarantine": "store.quarantine",
    "quarantine_review": "store.quarantine_review",
    "outbox": "uplink.outbox", "egress": "uplink.egress", "egresspolicy": "uplink.egresspolicy",
    "publish": "uplink.publish", "telemetry": "uplink.telemetry", "metrics": "uplink.metrics",
    "vocabulary": "uplink.vocabulary", "cloudevents": "uplink.cloudevents",
    "inbound": "uplink.inbound",
    "identity": "identity.certificates", "pki": "identity.pki",
    "credentials": "identity.credentials", "keyrotate": "identity.keyrotate",
    "control": "ops.control", "doctor": "ops.doctor", "sdnotify": "ops.sdnotify",
    "liveness": "ops.liveness", "devbox": "ops.devbox", "faults": "ops.faults",
}
# names that left agent.uplink.publish for agent.uplink.mqtt_tls
MQTT_TLS_NAMES = ("tls_context", "diagnose", "probe", "check_identity", "certificate_cn",
                  "client_id", "describe_tls_failure", "is_tls_reason")
# old top-level test helper module -> new module
TEST_MOVES = {
    "support": "tests.helpers", "mqtt_helpers": "tests.helpers.mqtt",
    "ops_helpers": "tests.helpers.ops", "audit_helpers": "tests.helpers.audit",
    "collector": "tests.helpers.syslog_collector", "fleet_helpers": "tests.helpers.fleet",
    "infer_helpers": "tests.helpers.infer", "results_support": "tests.helpers.results",
    "fault_support": "tests.helpers.faults", "deid_support": "tests.helpers.deid",
    "deid_canary": "tests.helpers.deid_canary", "debroot": "tests.helpers.debroot",
}

# A module that became a package of the same name: agent.identity is both the old
# module and the new package, so only what names the old module's contents moves.
_PACKAGE_NOW = {"identity": ("certificates", "pki", "credentials", "keyrotate")}
_names = "|".join(sorted(map(re.escape, AGENT_MOVES), key=len, reverse=True))
# not after "-", "." or a word character: "edge-agent.telemetry" is a CloudEvents type
_DOTTED = re.compile(rf"(?<![-.\w])agent\.({_names})\b(?!\w)((?:\.| import )\w+)?")
_SLASHED = re.compile(rf"(?<![-.\w])agent/({_names})\.py\b")
_FROM_AGENT = re.compile(r"^(\s*)from agent import (.+?)(\s*#.*)?$")
_tests = "|".join(map(re.escape, TEST_MOVES))
_FROM_TEST = re.compile(rf"^(\s*)from ({_tests}) import ", re.M)
_IMPORT_TEST = re.compile(rf"^(\s*)import ({_tests})( as \w+)?$", re.M)
_MQTT_TLS = re.compile(r"^(\s*)from agent\.uplink\.publish import (.+)$", re.M)


def _from_agent(line: str) -> str:
    m = _FROM_AGENT.match(line)
    if not m:
        return line
    indent, body, comment = m.group(1), m.group(2), m.group(3) or ""
    groups: dict[str, list[str]] = {}
    for part in (p.strip() for p in body.split(",") if p.strip()):
        name, _, alias = part.partition(" as ")
        if name.strip() not in AGENT_MOVES:
            groups.setdefault("agent", []).append(part)
            continue
        pkg, _, mod = AGENT_MOVES[name.strip()].rpartition(".")
        alias = alias.strip() or (name.strip() if mod != name.strip() else "")
        groups.setdefault(f"agent.{pkg}", []).append(mod + (f" as {alias}" if alias else ""))
    if list(groups) == ["agent"]:
        return line
    return "\n".join(f"{indent}from {t} import {', '.join(ps)}" + (comment if i == 0 else "")
                     for i, (t, ps) in enumerate(sorted(groups.items())))


def _split_mqtt_tls(m: re.Match[str]) -> str:
    indent, names = m.group(1), [n.strip() for n in m.group(2).split(",")]
    tls = [n for n in names if n.split(" as ")[0] in MQTT_TLS_NAMES]
    rest = [n for n in names if n not in tls]
    lines = [f"{indent}from agent.uplink.mqtt_tls import {', '.join(tls)}"] if tls else []
    lines += [f"{indent}from agent.uplink.publish import {', '.join(rest)}"] if rest else []
    return "\n".join(lines)


def _dotted(m: re.Match[str]) -> str:
    name, after = m.group(1), m.group(2) or ""
    if name in _PACKAGE_NOW:
        following = after.removeprefix(".").removeprefix(" import ")
        if not after or following in _PACKAGE_NOW[name]:
            return m.group(0)  # the package itself, or one of its modules
    return "agent." + AGENT_MOVES[name] + after


def rewrite(text: str, python: bool) -> str:
    text = _DOTTED.sub(_dotted, text)
    text = _SLASHED.sub(lambda m: "agent/" + AGENT_MOVES[m.group(1)].replace(".", "/") + ".py",
                        text)
    if python:
        text = "\n".join(_from_agent(line) for line in text.split("\n"))
        text = _MQTT_TLS.sub(_split_mqtt_tls, text)
        text = _FROM_TEST.sub(lambda m: f"{m.group(1)}from {TEST_MOVES[m.group(2)]} import ", text)

        def plain_import(m: re.Match[str]) -> str:
            pkg, _, name = TEST_MOVES[m.group(2)].rpartition(".")
            alias = m.group(3) or (f" as {m.group(2)}" if name != m.group(2) else "")
            return f"{m.group(1)}from {pkg} import {name}{alias}"

        text = _IMPORT_TEST.sub(plain_import, text)
    return text


def main(paths: list[str]) -> int:
    for name in paths:
        p = Path(name)
        try:
            old = p.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        new = rewrite(old, p.suffix == ".py")
        if new != old:
            p.write_text(new)
            print(f"rewrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
