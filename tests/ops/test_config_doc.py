"""docs/configuration.md documents every key agent/config.py reads, under its section,
and nothing that config.py does not know."""

from __future__ import annotations

import re

from support import REPO

# [deploy] is read by its own module (agent/deploy/settings.py) through config's reader.
SOURCE = "\n".join((REPO / "agent" / f).read_text() for f in ("config.py",
                                                             "deploy/settings.py"))
DOC = (REPO / "docs" / "configuration.md").read_text()
READ = re.compile(r"""r\.(?:get|path|require_path|choice)\(\s*["']([a-z_.]+)["']""", re.S)
TABLES = re.compile(r"""_lookup\(\s*["']([a-z_.]+)["']\s*\)""")


def source_keys() -> set[str]:
    keys = set(READ.findall(SOURCE))
    # Arrays of tables: their entry keys are read from the entry dicts directly.
    for table in TABLES.findall(SOURCE):
        keys.add(table)
    return keys


def doc_keys() -> set[str]:
    keys: set[str] = set()
    section = None
    for line in DOC.splitlines():
        m = re.match(r"^## \[\[?([a-z_.]+)\]\]?\s*$", line)
        if m:
            section = m.group(1)
            if line.startswith("## [["):
                keys.add(section)
            continue
        m = re.match(r"^\| `([a-z_]+)` \|", line)
        if m and section:
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_source_parsing_sees_known_keys() -> None:
    keys = source_keys()
    # guards the regex itself: a multi-line call and an array of tables are found
    assert {"box.site", "dicom.associations_per_minute_per_peer", "control.socket",
            "dicom.peers", "deid.pixel_clean"} <= keys
    assert len(keys) > 55


def test_every_config_key_is_documented_under_its_section() -> None:
    missing = sorted(k for k in source_keys() if k not in doc_keys())
    assert not missing, f"add to docs/configuration.md: {missing}"


def test_doc_lists_no_key_config_does_not_read() -> None:
    src = source_keys()
    tables = {k for k in src if k in TABLES.findall(SOURCE)}
    stale = sorted(k for k in doc_keys()
                   if k not in src and not any(k.startswith(t + ".") for t in tables))
    assert not stale, f"docs/configuration.md documents unknown keys: {stale}"
