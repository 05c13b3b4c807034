"""Health gates over a deployment's soak: what the box observed since the switch.

Fed from the daemon's audit events (``model.failed``, ``inference.done`` of the
deployed models), the pipeline's latencies and the drift report.  A gate is
breached when an observation goes over the limit the signed document set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from agent.deploy.document import Deployment


@dataclass(frozen=True)
class Breach:
    gate: str
    observed: float
    limit: float

    def describe(self) -> str:
        return f"gate {self.gate}: observed {self.observed:g}, limit {self.limit:g}"


class SoakWatch:
    """Counters of one soak; thread-safe (audit events come from any thread)."""

    def __init__(self, models: tuple[str, ...]) -> None:
        self.models = frozenset(models)
        self._lock = threading.Lock()
        self.errors = 0
        self.studies: set[str] = set()
        self.review: set[str] = set()

    def observe(self, event: str, details: dict[str, Any]) -> bool:
        """Count one audit event; True when it concerns a deployed model."""
        if details.get("model") not in self.models:
            return False
        with self._lock:
            if event == "model.failed":
                self.errors += 1
            elif event == "inference.done":
                study = str(details.get("study", ""))
                self.studies.add(study)
                if details.get("needs_review"):
                    self.review.add(study)
            else:
                return False
        return True

    def breach(self, dep: Deployment, latencies: list[float],
               drift: dict[str, Any]) -> Breach | None:
        with self._lock:
            errors, studies, review = self.errors, len(self.studies), len(self.review)
        limit = dep.gate("max_inference_errors")
        if errors > limit:
            return Breach("inference_errors", errors, limit)
        if studies >= dep.gate("min_studies_for_rate"):
            rate = review / studies
            limit = dep.gate("max_needs_review_rate")
            if rate > limit:
                return Breach("needs_review_rate", round(rate, 4), limit)
        for name in sorted(self.models):
            report = drift.get(name)
            if not isinstance(report, dict) or report.get("suppressed"):
                continue
            psi = max(float(report.get("psi_input", 0.0)), float(report.get("psi_output", 0.0)))
            limit = dep.gate("max_drift_psi")
            if psi > limit:
                return Breach("drift_psi", psi, limit)
        recent = sorted(latencies[-studies:]) if studies else []
        if recent:
            p95 = recent[min(len(recent) - 1, round(0.95 * (len(recent) - 1)))]
            limit = dep.gate("max_latency_ms_p95")
            if p95 > limit:
                return Breach("latency_ms_p95", round(p95, 1), limit)
        return None

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {"inference_errors": self.errors, "studies": len(self.studies),
                    "needs_review": len(self.review)}
