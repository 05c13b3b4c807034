"""Logging set-up: one format, and every record passes the PHI scrubber."""

from __future__ import annotations

import logging
import sys

from agent.egress import ScrubFilter


def setup(level: str = "INFO", process: str = "") -> None:
    """``process`` tags every line of a helper process (``recv-w0``) in the shared log."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[{process}]" if process else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    handler.addFilter(ScrubFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO can carry identifiers (pynetdicom dumps PDUs).
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
