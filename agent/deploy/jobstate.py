"""The box's durable deployment state: one JSON file, replaced atomically and fsynced.

It holds the highest revision accepted (replay protection survives restarts),
the current job and its phase (a kill -9 resumes where it stopped), and the
finished jobs with what each replaced (``fleet rollback`` restores from it).
The signed document of the current job is kept beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from agent.crypto import fsync_dir

HISTORY = 20


class JobState:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder = folder
        self.path = folder / "state.json"
        self._lock = threading.RLock()
        try:
            loaded = json.loads(self.path.read_text())
        except FileNotFoundError:
            loaded = {}
        except ValueError:
            # A torn file cannot happen (atomic replace); a hand-edited one keeps the
            # replay floor only if we can read it, so start from nothing but say so.
            loaded = {"corrupt": True}
        self.data: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
        self.data.setdefault("last_revision", 0)
        self.data.setdefault("last_digest", "")
        self.data.setdefault("job", None)
        self.data.setdefault("history", [])
        self.data.setdefault("active", None)

    # -- reads ---------------------------------------------------------------------
    @property
    def last_revision(self) -> int:
        return int(self.data["last_revision"])

    @property
    def last_digest(self) -> str:
        return str(self.data["last_digest"])

    @property
    def job(self) -> dict[str, Any] | None:
        job = self.data.get("job")
        return dict(job) if isinstance(job, dict) else None

    @property
    def active(self) -> dict[str, Any] | None:
        a = self.data.get("active")
        return dict(a) if isinstance(a, dict) else None

    def finished(self, deployment: str) -> dict[str, Any] | None:
        """The newest finished job of a deployment id."""
        for h in reversed(self.data["history"]):
            if isinstance(h, dict) and h.get("id") == deployment:
                return dict(h)
        return None

    def document(self, revision: int) -> dict[str, Any] | None:
        try:
            loaded = json.loads((self.folder / f"document-{revision}.json").read_text())
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    # -- writes --------------------------------------------------------------------
    def _save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".state.")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.folder)

    def accept(self, signed: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
        """Record an accepted document as the current job; returns the job it replaced."""
        with self._lock:
            doc = self.folder / f"document-{job['revision']}.json"
            doc.write_text(json.dumps(signed, sort_keys=True))
            with doc.open("rb") as fh:
                os.fsync(fh.fileno())
            replaced = self.job
            if replaced is not None:
                # Unfinished, it goes to the history anyway: a rollback document for it
                # must still find what it replaced.
                replaced.update(outcome="superseded", superseded_by=int(job["revision"]))
                self.data["history"] = [*self.data["history"], replaced][-HISTORY:]
            self.data["last_revision"] = int(job["revision"])
            self.data["last_digest"] = str(job["digest"])
            self.data["job"] = job
            self._save()
            return replaced

    def update(self, **changes: Any) -> dict[str, Any]:
        with self._lock:
            job = self.job or {}
            job.update(changes)
            self.data["job"] = job
            self._save()
            return job

    def finish(self, outcome: str, *, active: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any] | None:
        """Move the current job to the history with its outcome."""
        with self._lock:
            job = self.job
            if job is None:
                return None
            job.update(extra, outcome=outcome, phase=outcome)
            self.data["history"] = [*self.data["history"], job][-HISTORY:]
            self.data["job"] = None
            if active is not None:
                self.data["active"] = active
            self._save()
            for old in self.folder.glob("document-*.json"):
                if old.name != f"document-{job['revision']}.json":
                    old.unlink(missing_ok=True)
            return job

    def set_active(self, active: dict[str, Any] | None) -> None:
        with self._lock:
            self.data["active"] = active
            self._save()
