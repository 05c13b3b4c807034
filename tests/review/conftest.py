"""Puts this folder and tests/mqtt on sys.path (``review_helpers``, ``mqtt_helpers``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent / "mqtt", HERE.parents[1]):  # ..., the repo (training.sign)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
