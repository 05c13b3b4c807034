"""The Debian package installs its runtime from packaging/requirements.lock with
--no-deps, so a dependency added to pyproject.toml but not to the lock would be
missing from the installed box.  This fails until `make deb-lock` is run."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _name(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()


def _locked() -> set[str]:
    text = (REPO / "packaging" / "requirements.lock").read_text()
    return {_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", text, re.M)}


def _closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = _name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_every_runtime_dependency_and_its_dependencies_are_locked() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = [Requirement(d).name for d in project["dependencies"]]
    missing = sorted(_closure(direct) - _locked())
    assert not missing, f"not in packaging/requirements.lock (run `make deb-lock`): {missing}"
