"""Model changes on a box: admin role checked in the CLI, every change audited with the
Unix user.  The refusal runs the real CLI as a real non-admin Unix user (the helpers of
tests/ops/test_roles.py), so it needs root and useradd; skipped otherwise."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import Box, set_config
from tests.helpers.infer import PackageMaker, box_with_models, readable_config
from tests.helpers.ops import cli
from tests.ops import test_roles
from tests.ops.test_roles import Users, run_as, warm_imports

pytestmark = [pytest.mark.skipif(os.geteuid() != 0,
                                 reason="needs root to create the non-admin test users"),
              pytest.mark.peer("useradd", "groupadd")]


users = test_roles.users  # the fixture: throwaway operator/admin/auditor/nobody users


def audit_rows(box: Box) -> list[dict[str, object]]:
    tail = cli("audit", "tail", "--config", str(box.config), "--json", "-n", "200")
    assert tail.returncode == 0, tail.stderr
    return [json.loads(line) for line in tail.stdout.splitlines()]


def test_model_changes_need_admin_and_are_audited(box: Box, tmp_path: Path, users: Users,
                                                   publisher: tuple[Path, Path],
                                                   make_package: PackageMaker) -> None:
    box_with_models(box, tmp_path, publisher)
    for role, group in users.groups.items():
        set_config(box, "control", f"{role}_group", json.dumps(group))
    set_config(box, "control", "socket", json.dumps(str(tmp_path / "none" / "control.sock")))
    pkg = make_package("1.1.0")

    folder = Path(tempfile.mkdtemp(prefix="ea-models-"))
    folder.chmod(0o755)
    try:
        shared = readable_config(box, folder)
        warm_imports()
        from agent import config as _config  # noqa: F401 - loaded before dropping privileges

        for who in ("operator", "auditor", "nobody"):
            rc, out, err = run_as(users.users[who], "models", "activate", "lesion-demo",
                                  "1.0.0", "--config", str(shared))
            assert rc == 3, (who, out, err)
            assert "may not change models" in err and users.groups["admin"] in err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # The refusals changed nothing.
    assert not (box.state / "models-state" / "models" / "active.json").exists()

    # root holds every role: install, activate, roll back, each audited.
    r = cli("models", "install", str(pkg), "--config", str(box.config))
    assert r.returncode == 0, r.stderr
    r = cli("models", "activate", "lesion-demo", "1.0.0", "--config", str(box.config))
    assert r.returncode == 0, r.stderr
    assert "1.1.0 -> 1.0.0" in r.stdout and "daemon is not running" in r.stdout
    r = cli("models", "rollback", "lesion-demo", "--config", str(box.config))
    assert r.returncode == 0, r.stderr
    assert "1.0.0 -> 1.1.0" in r.stdout
    r = cli("models", "rollback", "lesion-demo", "--config", str(box.config))
    assert r.returncode == 2 and "no previous version" in r.stderr

    rows = audit_rows(box)
    changes = [(x["user"], x["details"]) for x in rows if x["event"] == "model.changed"]
    assert [(u, d["action"], d["name"], d["version"], d["previous"])  # type: ignore[index]
            for u, d in changes] == [
        ("root", "install", "lesion-demo", "1.1.0", None),
        ("root", "activate", "lesion-demo", "1.0.0", "1.1.0"),
        ("root", "rollback", "lesion-demo", "1.1.0", "1.0.0"),
    ]
    acts = [(x["user"], x["details"]["command"], x["outcome"])  # type: ignore[index]
            for x in rows if x["event"] == "cli.action"]
    # outcomes are ATNA EventOutcomeIndicator codes: 0 success, 4 minor failure
    assert acts == [("root", "models.install", 0), ("root", "models.activate", 0),
                    ("root", "models.rollback", 0), ("root", "models.rollback", 4)]
