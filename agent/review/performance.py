"""Per model version and per subgroup: what the verdicts say about the model.

Truth comes from the reviewer: *agreed* confirms the model's finding,
*disagreed* reverses it (or, with a corrected label, sets it: positive when the
label is the model's positive label), *indeterminate* counts towards nothing
but the verdict count.  From the confusion counts: sensitivity TP/(TP+FN),
specificity TN/(TN+FP), PPV TP/(TP+FP), NPV TN/(TN+FN), and the agreement rate
agreed/(agreed+disagreed), each with a Wilson 95 % interval (agent/review/stats.py),
over each rolling window (verdicts of the last N days).

Quasi-identifiers never leave the box: per attribute, the values with fewer than
``k`` verdicts are merged into ``<attribute>=other``; when that merge is still
below ``k`` it is suppressed (no counts, no names, only how many cells were
suppressed).  A model version below ``k`` altogether is suppressed entirely.

Alerts (on published cells only):

* ``below-threshold``: a subgroup's (or the whole model's) interval lies wholly
  below the manifest's acceptance threshold for that metric;
* ``gap``: a subgroup's interval lies wholly below the interval of all other
  verdicts of the same model version (the rest), by more than ``gap``.  One-sided
  on purpose: with two subgroups a two-sided rule would flag the better one too,
  and the question governance asks is which subgroup the model serves worse.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import subgroups
from agent.review.stats import Proportion, interval_gap, wilson
from agent.review.store import Joined

METRICS = ("sensitivity", "specificity", "ppv", "npv", "agreement")
OTHER = "other"


def band(attribute: str, value: str) -> str:
    """What a subgroup value becomes before it is stored (agent/subgroups.py): ages in
    bands (0-17, 18-39, 40-64, 65+), sex M/F/O/unknown, other values trimmed to 64
    printable characters."""
    return subgroups.coarse(attribute, value)


@dataclass
class Counts:
    agreed: int = 0
    disagreed: int = 0
    indeterminate: int = 0
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def verdicts(self) -> int:
        return self.agreed + self.disagreed + self.indeterminate

    def add(self, j: Joined) -> None:
        v = j.verdict
        if v.verdict == "indeterminate":
            self.indeterminate += 1
            return
        if v.verdict == "agreed":
            self.agreed += 1
            truth = j.record.positive
        else:
            self.disagreed += 1
            truth = (v.corrected_label == j.record.positive_label
                     if v.corrected_label else not j.record.positive)
        predicted = j.record.positive
        if predicted and truth:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif truth:
            self.fn += 1
        else:
            self.tn += 1

    def merged(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def minus(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.agreed, self.disagreed, self.indeterminate, self.tp, self.fp, self.tn,
                self.fn)

    def metrics(self) -> dict[str, Proportion]:
        return {
            "sensitivity": wilson(self.tp, self.tp + self.fn),
            "specificity": wilson(self.tn, self.tn + self.fp),
            "ppv": wilson(self.tp, self.tp + self.fp),
            "npv": wilson(self.tn, self.tn + self.fn),
            "agreement": wilson(self.agreed, self.agreed + self.disagreed),
        }

    def as_json(self) -> dict[str, Any]:
        return {"verdicts": self.verdicts, "agreed": self.agreed, "disagreed": self.disagreed,
                "indeterminate": self.indeterminate, "tp": self.tp, "fp": self.fp,
                "tn": self.tn, "fn": self.fn,
                **{k: p.as_json() for k, p in self.metrics().items()}}


@dataclass
class _Version:
    total: Counts = field(default_factory=Counts)
    # attribute -> value -> counts
    groups: dict[str, dict[str, Counts]] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    model: str
    version: str
    window_days: int
    subgroup: str  # "attribute=value", or "all" for the whole model version
    metric: str
    kind: str  # below-threshold | gap
    value: float | None
    ci95: tuple[float, float]
    threshold: float | None = None
    rest: float | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "version": self.version,
                               "window_days": self.window_days, "subgroup": self.subgroup,
                               "metric": self.metric, "kind": self.kind,
                               "value": None if self.value is None else round(self.value, 4),
                               "ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)]}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.rest is not None:
            out["rest"] = round(self.rest, 4)
        return out

    def sentence(self) -> str:
        ci = f"[{self.ci95[0]:.2f}, {self.ci95[1]:.2f}]"
        where = f"{self.model} {self.version} {self.subgroup} ({self.window_days} d)"
        if self.kind == "below-threshold":
            return f"{where}: {self.metric} 95% CI {ci} below threshold {self.threshold}"
        return f"{where}: {self.metric} 95% CI {ci} below the rest ({self.rest:.2f})"


def _tally(rows: Iterable[Joined]) -> dict[tuple[str, str], _Version]:
    out: dict[tuple[str, str], _Version] = {}
    for j in rows:
        v = out.setdefault((j.record.model, j.record.version), _Version())
        v.total.add(j)
        for attr, value in j.record.subgroup.items():
            v.groups.setdefault(attr, {}).setdefault(value, Counts()).add(j)
    return out


def _cells(v: _Version, k: int) -> tuple[list[tuple[str, str, Counts]], int]:
    """Published (attribute, value, counts) cells after merging and suppression, and
    how many cells were suppressed."""
    cells: list[tuple[str, str, Counts]] = []
    suppressed = 0
    for attr in sorted(v.groups):
        small = Counts()
        n_small = 0
        for value, c in sorted(v.groups[attr].items()):
            if c.verdicts >= k and value != OTHER:
                cells.append((attr, value, c))
            else:
                small = small.merged(c)
                n_small += 1
        if n_small:
            if small.verdicts >= k:
                cells.append((attr, OTHER, small))
            else:
                suppressed += 1
    return cells, suppressed


def report(rows_by_window: Mapping[int, list[Joined]], *, k: int,
           thresholds: Mapping[tuple[str, str], Mapping[str, float]],
           gap: float) -> tuple[dict[str, Any], list[Alert]]:
    """The ``performance`` telemetry section and its alerts."""
    models: list[dict[str, Any]] = []
    alerts: list[Alert] = []
    for days, rows in sorted(rows_by_window.items()):
        for (name, version), v in sorted(_tally(rows).items()):
            limits = dict(thresholds.get((name, version), {}))
            entry: dict[str, Any] = {"name": name, "version": version, "window_days": days}
            if v.total.verdicts < k:
                models.append({**entry, "suppressed": True})
                continue
            cells, suppressed = _cells(v, k)
            entry["overall"] = v.total.as_json()
            entry["subgroups"] = [{"attribute": a, "value": val, **c.as_json()}
                                  for a, val, c in cells]
            entry["suppressed_subgroups"] = suppressed
            models.append(entry)
            overall = v.total.metrics()
            for metric, floor in sorted(limits.items()):
                whole = overall.get(metric)
                if whole is not None and whole.n and whole.high < floor:
                    alerts.append(Alert(name, version, days, "all", metric, "below-threshold",
                                        whole.value, (whole.low, whole.high), threshold=floor))
            for attr, val, c in cells:
                mine = c.metrics()
                rest = v.total.minus(c).metrics()
                for metric in METRICS:
                    p, r = mine[metric], rest[metric]
                    if not p.n:
                        continue
                    limit = limits.get(metric)
                    if limit is not None and p.high < limit:
                        alerts.append(Alert(name, version, days, f"{attr}={val}", metric,
                                            "below-threshold", p.value, (p.low, p.high),
                                            threshold=limit))
                    elif r.n and interval_gap(p, r) > gap:
                        alerts.append(Alert(name, version, days, f"{attr}={val}", metric, "gap",
                                            p.value, (p.low, p.high), rest=r.value))
    return {"k": k, "gap": gap, "computed_at": round(time.time()),
            "models": models, "alerts": [a.as_json() for a in alerts]}, alerts


def markdown(section: Mapping[str, Any], name: str) -> str:
    """The table of one model as a model-card appendix (governance record)."""
    lines = [f"## Appendix: performance measured on this box ({name})", "",
             f"From reviewers' verdicts joined with the box's results; Wilson 95 % intervals; "
             f"subgroups with fewer than {section.get('k')} verdicts merged into `other` or "
             "suppressed.", ""]
    for m in section.get("models", []):
        if m.get("name") != name:
            continue
        lines.append(f"### {name} {m['version']}, last {m['window_days']} days")
        lines.append("")
        if m.get("suppressed"):
            lines += ["Fewer verdicts than k: suppressed.", ""]
            continue
        lines.append("| subgroup | verdicts | " + " | ".join(METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        for label, cell in [("all", m["overall"])] + [
                (f"{s['attribute']}={s['value']}", s) for s in m["subgroups"]]:
            vals = []
            for metric in METRICS:
                p = cell[metric]
                vals.append("-" if p["value"] is None else
                            f"{p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] (n={p['n']})")
            lines.append(f"| {label} | {cell['verdicts']} | " + " | ".join(vals) + " |")
        if m.get("suppressed_subgroups"):
            lines.append(f"\n{m['suppressed_subgroups']} subgroup cell(s) suppressed (below k).")
        lines.append("")
    alerts = [a for a in section.get("alerts", []) if a.get("model") == name]
    if alerts:
        lines.append("### Alerts")
        lines += [f"- {a['version']} {a['subgroup']} ({a['window_days']} d): {a['metric']} "
                  f"{a['kind']} 95% CI {a['ci95']}" for a in alerts]
        lines.append("")
    return "\n".join(lines)
