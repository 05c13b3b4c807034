"""Which onnxruntime execution providers a session asks for, and the CPU fallback.

``[infer] providers`` lists execution providers in preference order (default
only ``CPUExecutionProvider``).  A provider this onnxruntime build does not have
(``CUDAExecutionProvider`` with the CPU-only wheel, ``TensorrtExecutionProvider``
without TensorRT) is dropped with a warning, in the log and in ``doctor``, and
the CPU provider is always kept last, so a box whose GPU stack is missing or
broken still runs its models.  A provider that is present but fails when the
session is created (driver or library missing at run time) gets the same
treatment: the session is created again on the CPU alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
DEFAULT: tuple[str, ...] = (CPU,)


@dataclass(frozen=True)
class ProviderChoice:
    use: tuple[str, ...]  # what sessions are created with, CPU last
    missing: tuple[str, ...]  # requested, not in this onnxruntime build
    available: tuple[str, ...]

    def warning(self) -> str | None:
        if not self.missing:
            return None
        return (f"onnxruntime execution provider(s) {', '.join(self.missing)} requested in "
                f"[infer] providers are not available in this onnxruntime build (available: "
                f"{', '.join(self.available)}); falling back to {', '.join(self.use)}")


def choose(requested: Sequence[str]) -> ProviderChoice:
    available = tuple(ort.get_available_providers())
    use = [p for p in dict.fromkeys(requested) if p in available]
    missing = tuple(p for p in dict.fromkeys(requested) if p not in available)
    if CPU not in use:
        use.append(CPU)
    return ProviderChoice(tuple(use), missing, available)
