"""Generate agent/deid/table.json from the DICOM standard sources in ../shared.

Table E.1-1 (with every option column) comes from the innolitics 2024b JSON
extract; the safe private attributes (Table E.3.10-1) come from the PS3.15
2023b DocBook XML, because the JSON extract has no such table.  The output
records the edition, each source's sha256 and the row counts, so a reviewer can
tell exactly which standard text the engine implements.

Run: .venv/bin/python -m tools.gen_deid_table [--shared DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO / ".." / "shared" / "dicom-standard"
DEFAULT_OUT = REPO / "agent" / "deid" / "table.json"
E11_JSON = "confidentiality_profile_attributes.2024b.json"
PART15_XML = "part15.2023b.xml"
_DB = "{http://docbook.org/ns/docbook}"
_XML_ID = "{http://www.w3.org/XML/1998/namespace}id"

# JSON column -> the option name used in config (snake_case, see agent.deid.OPTIONS)
OPTION_COLUMNS: dict[str, str] = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_longitudinal_full_dates",
    "rtnLongModifDatesOpt": "retain_longitudinal_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}
BASIC_ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
_INVISIBLE = re.compile("[\u200b\u200c\u200d\ufeff\u00a0]")


def _clean(text: str) -> str:
    return " ".join(_INVISIBLE.sub(" ", text).split())


def _tag_key(raw: str) -> str:
    """'(0008,0050)' -> '0008,0050'; masks keep lower-case x; odd-group rows -> 'private'."""
    text = _clean(raw).upper()
    if "GGGG" in text:
        return "private"
    m = re.fullmatch(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)", text)
    if not m:
        raise SystemExit(f"unparseable tag in Table E.1-1: {raw!r}")
    return f"{m.group(1)},{m.group(2)}".replace("X", "x")


def e11_rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    rows: dict[str, dict[str, Any]] = {}
    for rec in data:
        tag = _tag_key(rec["tag"])
        basic = _clean(rec["basicProfile"])
        if basic not in BASIC_ACTIONS:
            raise SystemExit(f"unknown action {basic!r} for {tag}")
        options = {name: _clean(rec[col]) for col, name in OPTION_COLUMNS.items() if rec.get(col)}
        for act in options.values():
            if act not in {"K", "C"}:
                raise SystemExit(f"unknown option action {act!r} for {tag}")
        if tag in rows:  # the standard has a few duplicated rows; keep the first
            continue
        rows[tag] = {
            "tag": tag,
            "name": _clean(rec["name"]),
            "basic": basic,
            "in_std_iod": rec.get("stdCompIOD") == "Y",
            "options": dict(sorted(options.items())),
        }
    return sorted(rows.values(), key=lambda r: str(r["tag"]))


def safe_private_rows(path: Path) -> tuple[list[dict[str, str]], int]:
    root = ET.parse(path).getroot()
    table = next((t for t in root.iter(f"{_DB}table") if t.get(_XML_ID) == "table_E.3.10-1"), None)
    if table is None:
        raise SystemExit("table_E.3.10-1 not found in the PS3.15 XML")
    body = table.find(f"{_DB}tbody")
    assert body is not None
    seen: dict[tuple[str, str], dict[str, str]] = {}
    raw_rows = 0
    for tr in body.iter(f"{_DB}tr"):
        cells = [_clean("".join(td.itertext())) for td in tr.findall(f"{_DB}td")]
        if len(cells) < 5:
            continue
        raw_rows += 1
        m = re.fullmatch(r"\(([0-9A-Fa-f]{4}),\s*[xX]{2}([0-9A-Fa-f]{2})\)", cells[0])
        if not m:
            raise SystemExit(f"unparseable safe private tag {cells[0]!r}")
        group, elem = m.group(1).upper(), m.group(2).upper()
        key = (f"{group},xx{elem}", cells[1])
        if key not in seen:
            seen[key] = {
                "tag": key[0],
                "creator": cells[1],
                "vr": cells[2],
                "vm": cells[3],
                "meaning": cells[4],
            }
    rows = sorted(seen.values(), key=lambda r: (r["tag"], r["creator"]))
    return rows, raw_rows


def build(shared: Path) -> str:
    e11_path = shared / E11_JSON
    xml_path = shared / PART15_XML
    e11 = e11_rows(e11_path)
    safe, safe_raw = safe_private_rows(xml_path)
    doc = {
        "generator": "tools/gen_deid_table.py",
        "profile": "DICOM PS3.15 Table E.1-1 Basic Application Level Confidentiality Profile",
        "edition": "2024b",
        "safe_private_edition": "2023b",
        "sources": [
            {
                "file": E11_JSON,
                "sha256": hashlib.sha256(e11_path.read_bytes()).hexdigest(),
                "rows": len(e11),
            },
            {
                "file": PART15_XML,
                "sha256": hashlib.sha256(xml_path.read_bytes()).hexdigest(),
                "table": "E.3.10-1",
                "rows_in_source": safe_raw,
                "rows": len(safe),
            },
        ],
        "options": list(OPTION_COLUMNS.values()),
        "attributes": e11,
        "safe_private": safe,
    }
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    text = build(args.shared.resolve())
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
