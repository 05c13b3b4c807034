"""The committed Annex E table matches what the generator makes from the standard."""

from __future__ import annotations

import json
from pathlib import Path

from agent.deid.table import TABLE, TABLE_PATH
from tests.helpers import missing
from tools import gen_deid_table

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "dicom-standard"


def test_regenerated_table_matches_committed() -> None:
    if not SHARED.exists():
        # CI puts shared/ beside the clone, so there this is a failure; a developer's
        # clone (or a worktree) may not have the standard's extract beside it.
        missing(f"the DICOM standard extract {SHARED.resolve()}",
                "put the project's shared/ folder beside the clone, as CI does")
    assert gen_deid_table.build(SHARED.resolve()) == TABLE_PATH.read_text(encoding="utf-8"), (
        "agent/deid/table.json is stale: run .venv/bin/python -m tools.gen_deid_table"
    )


def test_table_records_edition_sources_and_counts() -> None:
    doc = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    assert doc["edition"] == "2024b"
    files = {s["file"]: s for s in doc["sources"]}
    assert len(files["confidentiality_profile_attributes.2024b.json"]["sha256"]) == 64
    assert files["confidentiality_profile_attributes.2024b.json"]["rows"] == len(TABLE.rows)
    assert files["part15.2023b.xml"]["rows"] == len(TABLE.safe_private)
    assert len(TABLE.rows) == 621
    assert len(TABLE.safe_private) >= 400


def test_table_has_every_action_and_option_column() -> None:
    basics = {r.basic for r in TABLE.rows}
    assert {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"} <= basics
    rows = {r.tag: r for r in TABLE.rows}
    assert rows["0010,0020"].basic == "Z/D"  # changed from Z in 2024b
    assert dict(rows["private"].options) == {"retain_safe_private": "C"}
    assert rows["60xx,3000"].basic == "X" and rows["50xx,xxxx"].basic == "X"
    options = {o for r in TABLE.rows for o, _ in r.options}
    assert len(options) == 10
    assert all("\u200b" not in r.name for r in TABLE.rows)
