"""`make deb`, once per test session for each version: the system tier's modules
share the packages (a build is a minute or more on a busy 2-core machine)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Built:
    deb: Path
    output: str  # what `make deb` printed
    linted: bool  # lintian ran on it (and found no error: make deb exited 0)


class DebBuilder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self._built: dict[str, Built] = {}

    def build(self, version: str, *, lint: bool) -> Built:
        have = self._built.get(version)
        if have is not None and (have.linted or not lint):
            return have
        p = subprocess.run(["make", "--no-print-directory", "deb", f"DEB_VERSION={version}",
                            f"DEB_OUT={self.out}", f"DEB_LINT={int(lint)}"], cwd=REPO,
                           capture_output=True, text=True, timeout=3600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        deb = self.out / f"edge-agent_{version}_amd64.deb"
        assert deb.is_file(), p.stdout[-2000:]
        self._built[version] = Built(deb, p.stdout + p.stderr, lint)
        return self._built[version]
