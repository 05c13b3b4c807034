"""What a verdict message is, and whether this box takes it.

A verdict arrives as a CloudEvents 1.0 envelope (docs/schemas/verdict.schema.json,
a copy of ``schemas/verdict.schema.json`` here, which the box validates against
with ``jsonschema``).  Who may send one is decided twice: the broker lets a reviewer
certificate write only ``{base}/review/<its CN>``, and nobody else any review topic
(MQTT 5 reason 0x87), so the topic's last level is the reviewer's identity, bound to
the certificate; the box refuses an envelope whose ``source`` does not name a
reviewer, names another reviewer than the topic (``wrong-reviewer``: one reviewer
writing in another's name), or whose ``box`` is another box (a verdict copied
between boxes).

Refusals carry a code from ``REFUSALS``: the acknowledgement and the audit record
name it, never the message's text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

from agent.errors import EdgeAgentError

VERDICT_TYPE = "org.edge-agent.verdict.v1"
SOURCE_PREFIX = "reviewer/"

REFUSALS: dict[str, str] = {
    "malformed": "not a JSON object",
    "too-large": "over the inbound size bound (agent/uplink/inbound.py): dropped unread",
    "invalid": "does not match the verdict schema",
    "wrong-role": "the source is not a reviewer",
    "wrong-reviewer": "the source names another reviewer than the certificate that sent it",
    "wrong-box": "the verdict names another box",
    "unknown-result": "no result with this id waits on this box",
    "unknown-model": "the result has no output of this model (or several: name one)",
    "unknown-label": "the corrected label is not one of the model's labels",
    "already-reviewed": "the result already has a verdict (the first verdict wins)",
    "duplicate": "this verdict was taken before (a redelivery or a replay)",
    "store-failed": "the box could not store the verdict; send it again",
}


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _uuid_or_none(v: Any) -> str | None:
    """Only a UUID is echoed back in an acknowledgement, never other sender text."""
    return v if isinstance(v, str) and _UUID.match(v) else None


class VerdictRefused(EdgeAgentError):
    def __init__(self, code: str, detail: str = "", *, verdict_id: str | None = None,
                 result_id: str | None = None) -> None:
        self.code = code
        self.verdict_id = verdict_id
        self.result_id = result_id
        super().__init__(f"verdict refused ({code}): {REFUSALS.get(code, code)}"
                         + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class VerdictMessage:
    """A valid verdict envelope, taken apart."""

    verdict_id: str
    reviewer: str
    result_id: str
    box: str
    model: str | None
    verdict: str
    corrected_label: str | None
    note: str | None


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    text = resources.files("agent.review").joinpath("schemas/verdict.schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def schema_problems(ev: Any) -> list[str]:
    """Where the envelope breaks the schema (paths and validator names, no values)."""
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.validator}"
                  for e in _validator().iter_errors(ev))


def parse(payload: bytes, box: str, reviewer: str | None = None) -> VerdictMessage:
    """Validate one message for ``box`` (site/device); raise VerdictRefused saying why.

    ``reviewer``: the identity the message came with (the review topic's last level, the
    publishing certificate's CN); the ``source`` must name the same reviewer."""
    try:
        ev = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise VerdictRefused("malformed") from None
    if not isinstance(ev, dict):
        raise VerdictRefused("malformed")
    raw_data = ev.get("data")
    vid = _uuid_or_none(ev.get("id"))
    rid = _uuid_or_none(raw_data.get("result_id")) if isinstance(raw_data, dict) else None
    source = ev.get("source")
    if isinstance(source, str) and not source.startswith(SOURCE_PREFIX):
        raise VerdictRefused("wrong-role", verdict_id=vid, result_id=rid)
    if (reviewer is not None and isinstance(source, str)
            and source[len(SOURCE_PREFIX):] != reviewer):
        raise VerdictRefused("wrong-reviewer", verdict_id=vid, result_id=rid)
    problems = schema_problems(ev)
    if problems:
        raise VerdictRefused("invalid", "; ".join(problems[:5]), verdict_id=vid, result_id=rid)
    data: dict[str, Any] = ev["data"]
    if data["box"] != box:
        raise VerdictRefused("wrong-box", verdict_id=vid, result_id=rid)
    return VerdictMessage(
        verdict_id=str(ev["id"]), reviewer=str(source)[len(SOURCE_PREFIX):],
        result_id=str(data["result_id"]), box=box, model=data.get("model"),
        verdict=str(data["verdict"]), corrected_label=data.get("corrected_label"),
        note=data.get("note"))


def build(*, reviewer: str, box: str, result_id: str, verdict: str, model: str | None = None,
          corrected_label: str | None = None, note: str | None = None,
          verdict_id: str | None = None) -> dict[str, Any]:
    """A verdict envelope (what ``fleet review submit`` and tests send)."""
    data: dict[str, Any] = {"result_id": result_id, "box": box, "verdict": verdict}
    if model:
        data["model"] = model
    if corrected_label:
        data["corrected_label"] = corrected_label
    if note:
        data["note"] = note
    return {"specversion": "1.0", "id": verdict_id or str(uuid.uuid4()),
            "source": f"{SOURCE_PREFIX}{reviewer}", "type": VERDICT_TYPE,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json", "subject": result_id, "data": data}
