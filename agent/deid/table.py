"""The generated PS3.15 Annex E table (table.json), loaded once at import.

table.json is produced by tools/gen_deid_table.py from the standard's sources;
never edit it by hand (a test regenerates it and compares).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("table.json")


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1: the basic action and the option overrides."""

    tag: str  # "0008,0050", a mask "60xx,3000" / "50xx,xxxx", or "private"
    name: str
    basic: str  # D, Z, X, K, C, U or a compound such as X/Z/D
    options: tuple[tuple[str, str], ...]  # (option name, "K" | "C")


@dataclass(frozen=True)
class SafePrivate:
    group: int
    element_low: int  # the xx.. low byte of (gggg,xxEE)
    creator: str
    vr: str
    meaning: str


@dataclass(frozen=True)
class ProfileTable:
    edition: str
    safe_private_edition: str
    sources: tuple[tuple[str, str, int], ...]  # (file, sha256, rows)
    rows: tuple[ProfileRow, ...]
    safe_private: tuple[SafePrivate, ...]


def _load(path: Path) -> ProfileTable:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    rows = tuple(
        ProfileRow(
            tag=r["tag"],
            name=r["name"],
            basic=r["basic"],
            options=tuple(sorted(r["options"].items())),
        )
        for r in doc["attributes"]
    )
    safe = []
    for r in doc["safe_private"]:
        group, elem = r["tag"].split(",")
        safe.append(
            SafePrivate(
                group=int(group, 16),
                element_low=int(elem[2:], 16),
                creator=r["creator"],
                vr=r["vr"],
                meaning=r["meaning"],
            )
        )
    return ProfileTable(
        edition=doc["edition"],
        safe_private_edition=doc["safe_private_edition"],
        sources=tuple((s["file"], s["sha256"], int(s["rows"])) for s in doc["sources"]),
        rows=rows,
        safe_private=tuple(safe),
    )


TABLE: ProfileTable = _load(TABLE_PATH)
