"""docs/deid.md is generated from the rules' own descriptions and must stay in sync."""

from __future__ import annotations

from agent.deid.docs import DOC_PATH, render
from agent.deid.rules import ACTION_TEXT, OPTION_TEXT, SEQUENCES
from agent.deid.settings import OPTIONS


def test_docs_are_current() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/deid.md is out of date: run .venv/bin/python -m agent.deid.docs"
    )


def test_every_action_and_option_describes_itself() -> None:
    text = render()
    assert set(OPTION_TEXT) == set(OPTIONS)
    for action, description in ACTION_TEXT.items():
        assert f"| `{action}` | " in text and description.split(";")[0] in text
    for option in OPTIONS:
        assert f"| `{option}` |" in text
    assert "## Sequences" in text and all(f"- {line}" in text for line in SEQUENCES)
