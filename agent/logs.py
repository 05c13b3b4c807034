"""Logging set-up: one format, and every record passes the PHI scrubber."""

from __future__ import annotations

import logging
import sys

from agent.egress import ScrubFilter


def setup(level: str = "INFO") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO can carry identifiers (pynetdicom dumps PDUs).
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
