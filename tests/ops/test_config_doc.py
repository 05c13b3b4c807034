"""docs/configuration.md documents every key agent/config.py reads, under its section,
and nothing that config.py does not know."""

from __future__ import annotations

import re

from tests.helpers import REPO

# [deploy] is read by its own module (agent/deploy/settings.py) through config's reader.
SOURCE = "\n".join((REPO / "agent" / f).read_text() for f in ("config.py",
                                                             "deploy/settings.py"))
DOC = (REPO / "docs" / "configuration.md").read_text()
READ = re.compile(r"""r\.(?:get|path|require_path|choice)\(\s*["']([a-z_.]+)["']"""
                  r"""|r\.field\(\s*\w+,\s*["']([a-z_.]+)["']""", re.S)
# r.field(Settings, "section.key", ...): the default is the dataclass field's default.
FIELD = re.compile(r"""r\.field\(\s*(\w+),\s*["']([a-z_.]+)["']""", re.S)
TABLES = re.compile(r"""_lookup\(\s*["']([a-z_.]+)["']\s*\)""")


def source_keys() -> set[str]:
    keys = {a or b for a, b in READ.findall(SOURCE)}
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


def _doc_defaults() -> dict[str, str]:
    out: dict[str, str] = {}
    section = None
    for line in DOC.splitlines():
        m = re.match(r"^## \[\[?([a-z_.]+)\]\]?\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \|", line)
        if m and section:
            out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def test_documented_defaults_are_the_settings_dataclass_defaults() -> None:
    """Defaults are written once, on the settings dataclasses; the parser reads them
    from there (r.field) and the documentation must show the same value."""
    import dataclasses

    from agent import config

    found = FIELD.findall(SOURCE)
    assert len(found) > 30  # guards the regex
    doc = _doc_defaults()
    wrong = []
    for cls_name, key in found:
        cls = getattr(config, cls_name)
        default = {f.name: f.default for f in dataclasses.fields(cls)}[key.rsplit(".", 1)[1]]
        if doc.get(key, "").startswith("required"):
            continue  # e.g. [atna] host: empty is only allowed while [atna] is off
        if doc.get(key) != _toml(default):
            wrong.append(f"{key}: docs say {doc.get(key)}, {cls_name} says {_toml(default)}")
    assert not wrong, "docs/configuration.md defaults differ from agent/config.py:\n" + "\n".join(wrong)
