"""The audit anchor: a small file outside the audit database saying that a log exists.

Why: without it, deleting ``audit/audit.db`` makes the next start create a
fresh log with a new genesis key, and ``audit verify`` on that fresh log says
INTACT.  The anchor (``<state_dir>/audit-anchor.json``, next to the audit
folder, not in it) records the genesis key and the newest checkpoint; at
start the log compares itself with it, so a missing, replaced or rolled-back
database is noticed, alerted and recorded in the new log instead of passing
in silence.

It holds only public values (keys, hashes, counts), so it is not sealed: a
local root who deletes both the database and the anchor is not stopped by it,
only by the checkpoints already published to central ops (docs/audit.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.crypto import write_file_atomic
from agent.errors import AuditError

NAME = "audit-anchor.json"
FORMAT = 1
MAX_HISTORY = 16


@dataclass(frozen=True)
class Anchor:
    box: str
    genesis: str  # hex of the genesis public key
    created: str
    checkpoint: int = -1  # newest checkpoint number (-1: none yet)
    seq: int = 0  # records that checkpoint covers
    head: str = ""  # hash of that checkpoint's body (hex)
    time: str = ""  # when that checkpoint was signed
    replaced: tuple[dict[str, Any], ...] = field(default=())  # earlier logs that went missing

    def describe(self) -> str:
        if self.checkpoint < 0:
            return f"genesis {self.genesis[:16]}..., no checkpoint yet"
        return (f"genesis {self.genesis[:16]}..., last checkpoint {self.checkpoint} "
                f"(seq {self.seq}, {self.time})")

    def with_checkpoint(self, number: int, seq: int, head: str, time: str) -> Anchor:
        return replace(self, checkpoint=number, seq=seq, head=head, time=time)


def path_for(db_path: Path) -> Path:
    """``<state_dir>/audit-anchor.json`` for ``<state_dir>/audit/audit.db``."""
    return db_path.parent.parent / NAME


def read(path: Path) -> Anchor | None:
    """The anchor, None when there is none; AuditError when it is unreadable."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"audit anchor {path} is not readable ({exc.strerror})") from None
    try:
        data = json.loads(raw)
        return Anchor(box=str(data["box"]), genesis=str(data["genesis_public_key"]),
                      created=str(data.get("created", "")),
                      checkpoint=int(data.get("checkpoint", -1)), seq=int(data.get("seq", 0)),
                      head=str(data.get("head", "")), time=str(data.get("time", "")),
                      replaced=tuple(dict(x) for x in data.get("replaced", ())
                                     if isinstance(x, dict)))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AuditError(f"audit anchor {path} is malformed") from None


def write(path: Path, anchor: Anchor) -> None:
    """Replace the anchor atomically and durably.

    Its values are public (central ops pins them), but it is 0600 like every
    file in the state directory, so the one permission rule has no exception."""
    data = asdict(anchor)
    data["genesis_public_key"] = data.pop("genesis")
    data["replaced"] = list(anchor.replaced[-MAX_HISTORY:])
    data["v"] = FORMAT
    write_file_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)
