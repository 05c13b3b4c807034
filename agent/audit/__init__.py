"""Encrypted, hash-chained audit log with forward-evolving signed checkpoints.

See docs/audit.md for the design and docs/schemas/audit.schema.json for what
is published.  May import: agent.config, agent.crypto, agent.errors, agent.fileperm,
agent.identity (file ownership for the CLI), agent.ops.liveness, agent.uplink.egress
and egresspolicy (what of a record may leave the box, and to where).  The receipt
drainer that moves the DICOM node's journaled records into the log lives with the
DICOM node for now (agent/receive.py ReceiptDrainer).
"""

from __future__ import annotations

from .events import CATALOGUE, EventKind, kind_of
from .export import records_between, tail, write_atna_xml, write_jsonl
from .log import AuditLog
from .verify import VerifyReport, verify

__all__ = [
    "CATALOGUE",
    "AuditLog",
    "EventKind",
    "VerifyReport",
    "kind_of",
    "records_between",
    "tail",
    "verify",
    "write_atna_xml",
    "write_jsonl",
]
