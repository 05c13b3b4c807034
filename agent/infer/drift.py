"""Drift and subgroup monitoring from aggregates only.

Per model version we keep histogram counts — of each study's mean model-input
intensity and of its study-level probability — plus per-subgroup output
counts, and compare them with the manifest's reference distribution by the
population stability index (PSI).  Nothing per study is stored: the state file
holds counts, and ``report`` shows a model's (or subgroup's) figures only once
they cover at least ``k`` studies (k-anonymity).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.infer.manifest import DriftReference

_EPS = 1e-4  # floor for empty bins, so PSI stays finite


def psi(observed: list[int], reference: tuple[float, ...]) -> float:
    total = sum(observed)
    if total == 0:
        return 0.0
    value = 0.0
    for count, ref in zip(observed, reference, strict=True):
        o = max(count / total, _EPS)
        r = max(ref, _EPS)
        value += (o - r) * math.log(o / r)
    return value


def _bin(value: float, edges: tuple[float, ...]) -> int:
    # Values outside the reference range land in the edge bins rather than vanish.
    idx = int(np.searchsorted(np.asarray(edges), value, side="right")) - 1
    return min(max(idx, 0), len(edges) - 2)


class DriftMonitor:
    def __init__(self, state_dir: Path, k: int, save_every: float = 10.0) -> None:
        self._dir = state_dir / "drift"
        self._k = max(1, k)
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, DriftReference] = {}
        self._dirty: set[str] = set()
        self._save_every = save_every
        self._saved_at = time.monotonic()

    def track(self, name: str, version: str, ref: DriftReference) -> None:
        """Start (or resume) aggregates for a model version; a new version starts fresh."""
        path = self._dir / f"{name}.json"
        state: dict[str, Any] = {}
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            pass
        n_in, n_out = len(ref.input_reference), len(ref.output_reference)
        if (state.get("version") != version or len(state.get("input", [])) != n_in
                or len(state.get("output", [])) != n_out):
            state = {"version": version, "studies": 0, "input": [0] * n_in,
                     "output": [0] * n_out, "subgroups": {}}
        with self._lock:
            self._state[name] = state
            self._refs[name] = ref

    def update(self, name: str, input_mean: float, probability: float,
               subgroup: dict[str, str]) -> None:
        ref = self._refs.get(name)
        if ref is None:
            return
        with self._lock:
            st = self._state[name]
            st["studies"] += 1
            st["input"][_bin(input_mean, ref.input_edges)] += 1
            out_bin = _bin(probability, ref.output_edges)
            st["output"][out_bin] += 1
            for attr, value in sorted(subgroup.items()):
                key = f"{attr}={value}"
                group = st["subgroups"].setdefault(
                    key, {"studies": 0, "output": [0] * len(ref.output_reference)})
                group["studies"] += 1
                group["output"][out_bin] += 1
            self._dirty.add(name)
            due = time.monotonic() - self._saved_at >= self._save_every
        if due:
            self.flush()

    def flush(self) -> None:
        """Persist changed aggregates (also done every ``save_every`` seconds)."""
        with self._lock:
            for name in sorted(self._dirty):
                self._save(name, self._state[name])
            self._dirty.clear()
            self._saved_at = time.monotonic()

    def _save(self, name: str, state: dict[str, Any]) -> None:
        # Aggregates are telemetry, not records: an atomic replace every few
        # seconds is enough, and losing the last counts on power loss is
        # acceptable (no fsync).  Writing per study cost ~1 ms of latency.
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self._dir / f"{name}.json")

    def report(self) -> dict[str, object]:
        out: dict[str, object] = {}
        with self._lock:
            for name, st in sorted(self._state.items()):
                ref = self._refs[name]
                n = int(st["studies"])
                if n < self._k:
                    out[name] = {"studies": n, "suppressed": True}
                    continue
                groups: dict[str, object] = {}
                for key, g in sorted(st["subgroups"].items()):
                    if g["studies"] < self._k:
                        groups[key] = {"studies": g["studies"], "suppressed": True}
                    else:
                        groups[key] = {
                            "studies": g["studies"],
                            "psi_output": round(psi(g["output"], ref.output_reference), 4),
                            "output_distribution": [round(c / g["studies"], 4)
                                                    for c in g["output"]],
                        }
                out[name] = {
                    "version": st["version"],
                    "studies": n,
                    "psi_input": round(psi(st["input"], ref.input_reference), 4),
                    "psi_output": round(psi(st["output"], ref.output_reference), 4),
                    "input_distribution": [round(c / n, 4) for c in st["input"]],
                    "output_distribution": [round(c / n, 4) for c in st["output"]],
                    "output_edges": list(ref.output_edges),
                    "subgroups": groups,
                }
        return out
