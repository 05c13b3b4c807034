"""What the audit log publishes: signed checkpoints and, separately, their events.

A checkpoint message carries only the signed body (hashes, keys, counts,
times) and its signature: nothing a peer chose, so nothing the egress guard
could ever hold back.  The pseudonymised events a checkpoint covers go in
their own messages, at most ``EVENTS_PER_MESSAGE`` each, so a problem with
one event (or a guard block of one message) never keeps the anchor, or any
other message, from leaving the box.

Shapes (``docs/schemas/audit.schema.json``)::

    {"box", "checkpoint": {"body", "signature"}}                    org.edge-agent.audit.v1
    {"box", "covered_by", "part", "parts", "first_seq", "last_seq",
     "events": [...]}                                               org.edge-agent.audit.events.v1
"""

from __future__ import annotations

from collections.abc import Sequence

from .checkpoint import Checkpoint

EVENTS_PER_MESSAGE = 200


def checkpoint_message(box: str, cp: Checkpoint) -> dict[str, object]:
    return {"box": box, "checkpoint": cp.to_json()}


def event_messages(box: str, cp: Checkpoint,
                   events: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The projected events of ``cp`` in parts; none when it covers no new record."""
    parts = [events[i:i + EVENTS_PER_MESSAGE] for i in range(0, len(events), EVENTS_PER_MESSAGE)]
    return [{"box": box, "covered_by": cp.number, "part": n, "parts": len(parts),
             "first_seq": part[0]["seq"], "last_seq": part[-1]["seq"], "events": list(part)}
            for n, part in enumerate(parts)]


def is_checkpoint(data: dict[str, object]) -> bool:
    return isinstance(data.get("checkpoint"), dict)
