"""Test-only: seed the review store with synthetic results, through the same code
the pipeline hook runs (``ReviewService.record``), so a test can plant a subgroup
that performs worse without sending hundreds of studies.

Armed only like the fault hooks (agent/ops/faults.py): ``EDGE_AGENT_TEST_MODE=1`` in
the daemon's environment *and* ``[box] environment = "development"``.  A
production box never registers the command; no config key turns it on.  Each use
is audited (``cli.action`` control.review.seed) with the caller's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import EdgeAgentError
from agent.ops.faults import MODE_VAR
from agent.types import InferenceResult, ModelOutput
from agent.uplink import cloudevents

if TYPE_CHECKING:
    from agent.daemon import Daemon


def armed(environment: str) -> bool:
    return environment == "development" and os.environ.get(MODE_VAR) == "1"


def seed(d: Daemon, args: Mapping[str, Any]) -> dict[str, Any]:
    """args: {"model": NAME, "items": [{"subgroup": {attr: value}, "positive": bool}]}.
    Returns the result ids, in order."""
    name = args.get("model")
    active = {m["name"]: m["version"] for m in d.engine.active_models()}
    if not isinstance(name, str) or name not in active:
        raise EdgeAgentError(f"model {name!r} is not loaded")
    version = active[name]
    manifest = d.engine.manifest_of(name, version)
    assert manifest is not None
    dec = manifest.decision
    items = args.get("items")
    if not isinstance(items, list):
        raise EdgeAgentError("items must be a list")
    ids = []
    base = int(args.get("offset", 0))
    for n, item in enumerate(items, base):
        positive = bool(item.get("positive"))
        subgroup = {str(k): str(v) for k, v in dict(item.get("subgroup", {})).items()}
        rid = cloudevents.stable_id(d.cfg.site, d.cfg.device, "review-seed", str(n))
        p = 0.9 if positive else 0.1
        out = ModelOutput(
            name=name, version=version, sha256="0" * 64,
            labels={dec.positive_label: p, **{lb: round(1 - p, 6) for lb in dec.labels
                                               if lb != dec.positive_label}},
            finding=dec.positive_finding if positive else dec.negative_finding,
            confidence=p if positive else 1 - p, uncertainty=0.1, needs_review=True,
            review_reasons=("seeded",), explanation={"text": "seeded"}, timings_ms={},
            instances_used=1, subgroup=tuple(sorted(subgroup.items())))
        result = InferenceResult(
            study_ref=f"seed{n:012d}", patient_ref="seed", version=1, status="ok",
            models=(out,), failures=(), instances_received=1, instances_processed=1,
            quarantined=(), deid_method="seed", deid_options=(), latency_ms=0.0)
        d.review.record(rid, result)
        ids.append(rid)
    return {"result_ids": ids, "model": name, "version": version}
