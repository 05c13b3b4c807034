"""DIMSE statuses the node answers with, and the exception that carries one.

Owns: the status codes (PS3.7 Annex C and the service classes of PS3.4) and
``Refused``.  Imports nothing of the node.
"""

from __future__ import annotations

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_DATASET_MISMATCH = 0xA900
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNISED_OPERATION = 0x0211


class Refused(Exception):
    """An instance or request answered with a failure status (never leaves the node)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
