"""Prometheus text exposition (format 0.0.4), just what the fleet exporter needs.

Label values come from the network (a box names its certificates, stages and
models), so they are cleaned here once: control characters and lone surrogates
replaced, length bounded, and ``\\``, ``"`` and newlines escaped as the format
requires. A box therefore cannot end a label early and write series of its own
(``"} edge_agent_up{device="other"} 1``) into what Prometheus scrapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LABEL_CHARS = 128
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class Family:
    name: str
    # "summary" only for quantile series the box computes itself (no _sum/_count:
    # the box reports p50/p95, not the observations); Prometheus' linter refuses a
    # "quantile" label on any other type.
    type: Literal["gauge", "counter", "summary"]
    help: str
    labels: tuple[str, ...] = ()  # beyond site and device, in this order

    def __post_init__(self) -> None:
        assert _NAME.match(self.name) and all(_LABEL_NAME.match(x) for x in self.labels)
        assert (self.type == "counter") == self.name.endswith("_total"), self.name
        assert (self.type == "summary") == ("quantile" in self.labels), self.name


def clean(value: object) -> str:
    """A label value fit for the exposition: printable, bounded, escaped."""
    text = _UNPRINTABLE.sub("\ufffd", str(value))[:MAX_LABEL_CHARS]
    return text.replace("\\", "\\\\").replace('"', '\\"')


def labels(pairs: Iterable[tuple[str, object]]) -> str:
    """``a="x",b="y"`` with cleaned values."""
    return ",".join(f'{k}="{clean(v)}"' for k, v in pairs)


def number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def line(name: str, label_text: str, value: float) -> str:
    """One sample; ``label_text`` is ``a="x",b="y"`` made of cleaned values (or empty)."""
    return f"{name}{{{label_text}}} {number(value)}" if label_text else f"{name} {number(value)}"


def render(families: Iterable[tuple[Family, Iterable[str]]]) -> str:
    """Each family's HELP and TYPE, then its sample lines."""
    out: list[str] = []
    for fam, lines in families:
        out.append(f"# HELP {fam.name} {_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        out.extend(lines)
    return "\n".join(out) + "\n"
