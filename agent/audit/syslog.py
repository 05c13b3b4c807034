"""RFC 5424 syslog messages in RFC 5425 (TLS) octet-counted frames, as IHE ITI-20 asks.

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG

* PRI = facility * 8 + severity: facility 10 (security/authorization) unless
  configured; severity 5 (notice) for a success, 4 (warning) for any failure,
  as ITI-20 recommends.
* TIMESTAMP is the record's own time (when it happened, not when it was sent:
  a record sent after an outage keeps its time).
* MSGID is ``IHE+RFC-3881`` for the DICOM PS3.15 A.5 XML and ``ATNAAUDITEVENT``
  for a FHIR AuditEvent.
* No structured data (``-``); MSG is UTF-8 with the BOM RFC 5424 asks for.

A frame is ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 section 4.3): the length counts
octets, so a message may contain newlines without splitting.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

MSGIDS = {"dicom-xml": "IHE+RFC-3881", "fhir-json": "ATNAAUDITEVENT"}
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
BOM = "\ufeff"
NIL = "-"
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True)
class Header:
    """The fields of the RFC 5424 header that stay the same for every message."""

    facility: int
    hostname: str
    app_name: str
    procid: str
    msgid: str

    @classmethod
    def for_box(cls, facility: int, app_name: str, fmt: str) -> Header:
        return cls(facility, _field(socket.gethostname(), 255), _field(app_name, 48),
                   str(os.getpid()), MSGIDS[fmt])


def _field(value: str, limit: int) -> str:
    """A header field: PRINTUSASCII without spaces, at most ``limit`` octets, or NILVALUE."""
    text = _UNPRINTABLE.sub("_", value)[:limit]
    return text or NIL


def timestamp(record_time: object) -> str:
    """The record's ISO 8601 UTC time as an RFC 5424 TIMESTAMP (``...Z``), or NILVALUE."""
    try:
        dt = datetime.fromisoformat(str(record_time))
    except ValueError:
        return NIL
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def severity(outcome_code: object) -> int:
    return SEVERITY_NOTICE if str(outcome_code) == "0" else SEVERITY_WARNING


def message(header: Header, *, time: object, outcome_code: object, msg: str) -> bytes:
    """One RFC 5424 SYSLOG-MSG, UTF-8."""
    pri = header.facility * 8 + severity(outcome_code)
    head = (f"<{pri}>1 {timestamp(time)} {header.hostname} {header.app_name} "
            f"{header.procid} {header.msgid} {NIL} ")
    return (head + BOM + msg).encode("utf-8")


def frame(syslog_msg: bytes) -> bytes:
    """RFC 5425 octet-counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(syslog_msg)).encode("ascii") + b" " + syslog_msg
