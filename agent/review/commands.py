"""The local reviewer's control-socket commands (``edge-agent review list|show|submit``)
and ``models.performance``; the test-only seeding command when armed (``seed``).

The reviewer role comes from the kernel (SO_PEERCRED -> Unix groups ->
``[control] reviewer_group``, agent/ops/control.py); every action is audited with the
Unix user name.  ``show`` reveals the box-local record (subgroup attributes
included) to the reviewer on this box only, and is audited as a view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import EdgeAgentError
from agent.ops.control import ADMIN, OPERATOR, REVIEWER, Caller, Command
from agent.review import seed

if TYPE_CHECKING:
    from agent.daemon import Daemon


def _text(args: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    v = args.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise EdgeAgentError(f"give {key.replace('_', ' ')} as text")
    return v


def review_commands(d: Daemon) -> dict[str, Command]:
    reviewer = frozenset({REVIEWER})
    svc = d.review

    def r_list(_c: Caller, _a: Mapping[str, Any]) -> dict[str, Any]:
        return {"items": svc.waiting(), "backlog": svc.backlog()}

    def r_show(c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        result_id = _text(a, "result_id", required=True)
        assert result_id is not None
        out = svc.show(result_id)
        d.audit("review.viewed", user=c.user, details={"result_id": result_id})
        return out

    def r_submit(c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        result_id = _text(a, "result_id", required=True)
        verdict = _text(a, "verdict", required=True)
        assert result_id is not None and verdict is not None
        return svc.submit(reviewer=c.user, result_id=result_id, verdict=verdict,
                          model=_text(a, "model"), corrected_label=_text(a, "corrected_label"),
                          note=_text(a, "note"))

    def performance(_c: Caller, a: Mapping[str, Any]) -> dict[str, Any]:
        name = _text(a, "model", required=True)
        section = svc.performance()
        models = [m for m in section["models"] if m.get("name") == name]
        return {**section, "models": models,
                "alerts": [x for x in section["alerts"] if x.get("model") == name]}

    cmds = {
        "review.list": Command(reviewer, "list results waiting for review", r_list,
                               audited=True),
        "review.show": Command(reviewer, "view a result for review", r_show),
        # Audited by the review stage itself, with the verdict (review.verdict).
        "review.submit": Command(reviewer, "give a verdict on a result", r_submit),
        "models.performance": Command(frozenset({REVIEWER, OPERATOR, ADMIN}),
                                      "read model performance", performance),
    }
    if seed.armed(d.cfg.environment):
        cmds["review.seed"] = Command(frozenset({ADMIN}), "seed review records (test mode)",
                                      lambda _c, a: seed.seed(d, a), audited=True)
    return cmds
