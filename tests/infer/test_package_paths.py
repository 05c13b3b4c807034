"""A model package may only name files inside itself: a manifest `file` that climbs out
(`../../../etc/passwd`), an absolute path, or a package member that is a symlink to a
file outside is refused by `models install` (exit 2, audited), and nothing is copied.
A development box allows unsigned packages, so the path check is the only guard there."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import EDGE_AGENT, REPO, Box
from tests.helpers.infer import PackageMaker, box_with_models

PASSWD = Path("/etc/passwd")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=180)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _file(value: str) -> Callable[[str], str]:
    return lambda text: text.replace('file = "model.onnx"', f"file = {json.dumps(value)}")


def _symlink(member: str) -> Callable[[Path], None]:
    def make(pkg: Path) -> None:
        (pkg / member).unlink()
        os.symlink(PASSWD, pkg / member)
    return make


CASES: dict[str, tuple[Callable[[str], str] | None, Callable[[Path], None] | None, str]] = {
    # name: (manifest edit, package change, what the refusal names)
    "dotdot_to_root": (_file("../" * 40 + "etc/passwd"), None, "../"),
    "dotdot_as_in_the_report": (_file("../../../etc/passwd"), None, "../../../etc/passwd"),
    "absolute": (_file(str(PASSWD)), None, str(PASSWD)),
    "model_symlink_out": (None, _symlink("model.onnx"), "model.onnx"),
    "card_symlink_out": (None, _symlink("MODEL_CARD.md"), "MODEL_CARD.md"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_install_refuses_a_package_path_outside_the_package(
        box: Box, tmp_path: Path, publisher: tuple[Path, Path], make_package: PackageMaker,
        case: str) -> None:
    edit, change, named = CASES[case]
    models = box_with_models(box, tmp_path, publisher)
    before = tree(models)
    # Unsigned: the dev box (environment = development) allows that, with a warning.
    pkg = make_package("6.6.6", edit=edit, sign=False)
    if change is not None:
        change(pkg)

    r = cli("models", "install", str(pkg), "--config", str(box.config))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    assert "outside the package" in r.stderr and named in r.stderr, r.stderr
    assert "fix:" in r.stderr
    # Nothing copied: the models dir is byte for byte what it was (no staging left either).
    assert tree(models) == before
    assert not any(p.name.startswith(".") for p in (models / "lesion-demo").iterdir())

    tail = cli("audit", "tail", "--config", str(box.config), "--json", "-n", "50")
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    refused = [x for x in rows if x["event"] == "cli.action"
               and x["details"].get("command") == "models.install"]
    assert refused and refused[-1]["outcome"] == 4  # ATNA minor failure
    assert refused[-1]["details"]["error"]  # free text: the published projection redacts it


def test_verify_reports_an_installed_package_that_points_outside(
        box: Box, tmp_path: Path, publisher: tuple[Path, Path]) -> None:
    """A package edited in place after install: verify says invalid, never reads the file."""
    models = box_with_models(box, tmp_path, publisher)
    manifest = models / "lesion-demo" / "1.0.0" / "manifest.toml"
    manifest.write_text(_file("../" * 40 + "etc/passwd")(manifest.read_text()))
    r = cli("models", "verify", "--config", str(box.config))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL lesion-demo 1.0.0: invalid" in r.stdout
    assert "outside the package" in r.stdout
