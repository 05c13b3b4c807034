"""One exception root for everything edge-agent raises on purpose.

Library errors (pydicom, pynetdicom, paho, onnxruntime, cryptography) are
translated into these at the module boundary, so callers catch one family and
operator-facing messages always say what is wrong and what to do.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Root of every error edge-agent raises deliberately."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  fix: {self.hint}" if self.hint else base


class ConfigError(EdgeAgentError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` holds every problem found, so an operator fixes them in one go.
    """

    def __init__(self, problems: list[str], *, path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}{len(self.problems)} configuration problem(s):\n{lines}")


class CryptoError(EdgeAgentError):
    """A key is missing or wrong, or ciphertext failed authentication."""


class StorageError(EdgeAgentError):
    """The inbox, spool or audit store cannot be read or written."""


class OutOfResources(StorageError):
    """Disk reserve or a byte budget would be exceeded (DICOM 0xA700)."""


class DeidError(EdgeAgentError):
    """De-identification could not be applied to an instance."""


class ModelError(EdgeAgentError):
    """A model package is invalid, unsigned, tampered or failed to run.

    ``code`` names the failure in the fixed vocabulary a result publishes
    (agent/uplink/vocabulary.py FAILURE); the message is for the box's log only.
    """

    code = "model-error"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None,
                 transfer_syntax: str = "") -> None:
        super().__init__(message, hint=hint)
        if code is not None:
            self.code = code
        self.transfer_syntax = transfer_syntax  # standard keyword, for undecodable pixels


class TransportError(EdgeAgentError):
    """A network transport failed: the MQTT connection, a publish, a DICOM listener."""


class EgressBlocked(EdgeAgentError):
    """The egress guard found PHI in an outgoing message."""


class AccessDenied(EdgeAgentError):
    """The caller's role does not allow the requested action."""


class AuditError(EdgeAgentError):
    """The audit store is damaged, or an audit operation failed."""


class ResultError(EdgeAgentError):
    """A result object (SR, presentation state, key image, SEG) could not be built."""

