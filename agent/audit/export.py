"""Read paths for investigators and operators: export (full records) and tail (projection).

Export writes complete local records (with PHI) as JSON lines, or as ATNA
audit messages in the DICOM PS3.15 A.5.1 / RFC 3881 schema shape, one
``AuditMessage`` per record inside an ``AuditMessages`` container.  Exporting
is itself an audited access; the CLI records it before writing anything.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from agent.crypto import KeyEncryptionKey
from agent.errors import AuditError

from . import events
from .projection import PeerNames, project
from .store import Store, connect, decrypt_rows

# DICOM PS3.15 A.5.2.2: 4 = Application Server process or thread.
AUDIT_SOURCE_TYPE = "4"


def _us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def records_between(db_path: Path, kek: KeyEncryptionKey, since: datetime, until: datetime,
                    patient: str | None = None) -> list[dict[str, Any]]:
    """Decrypted records with since <= time < until (optionally of one patient id)."""
    conn = connect(db_path, readonly=True)
    try:
        store = Store(conn)
        out = []
        for _, rec in decrypt_rows(store, kek, store.rows_between(_us(since), _us(until))):
            if patient is not None and (rec.get("phi") or {}).get("patient_id") != patient:
                continue
            out.append(rec)
        return out
    except sqlite3.DatabaseError as exc:
        raise damaged(db_path, exc) from None
    finally:
        conn.close()


def tail(db_path: Path, kek: KeyEncryptionKey, n: int = 20,
         peer_key: bytes | None = None) -> list[dict[str, object]]:
    """The last ``n`` records, pseudonymised as published (what an operator may see).

    ``peer_key``: the box's pseudonym key, so peer names match the published ones.
    """
    peers = PeerNames(peer_key if peer_key is not None else kek.key)
    conn = connect(db_path, readonly=True)
    try:
        store = Store(conn)
        return [project(rec, peers) for _, rec in decrypt_rows(store, kek, store.last_rows(n))]
    except sqlite3.DatabaseError as exc:
        raise damaged(db_path, exc) from None
    finally:
        conn.close()


def damaged(db_path: Path, exc: sqlite3.DatabaseError) -> AuditError:
    return AuditError(f"audit database {db_path} is damaged ({exc})",
                      hint="run 'edge-agent audit verify' for a report of what is readable; "
                           "keep the file as evidence")


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    n = 0
    for rec in records:
        out.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        n += 1
    return n


def _coded(parent: ET.Element, tag: str, code: events.Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


@dataclass(frozen=True)
class RecordRef:
    """Which audit record a message renders: the repository dedupes on ``uuid``.

    The live ATNA feed delivers at least once; the uuid is derived from the log's
    genesis key and the record's seq, so a record sent twice (or sent and later
    exported) carries the same one, and no two logs share one.
    """

    uuid: str
    seq: int
    box: str

    @classmethod
    def of(cls, genesis_public: bytes, box: str, seq: int) -> RecordRef:
        name = f"{genesis_public.hex()}/{seq}"
        return cls(str(uuid.uuid5(RECORD_NAMESPACE, name)), seq, box)

    @property
    def urn(self) -> str:
        return f"urn:uuid:{self.uuid}"

    @property
    def name(self) -> str:
        return f"edge-agent audit record {self.box} seq {self.seq}"


# A fixed namespace for RecordRef uuids (uuid5 of the project's record URN).
RECORD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:edge-agent:audit-record")


def _detail(parent: ET.Element, key: str, value: object) -> None:
    # PS3.15 A.5: the value of a ParticipantObjectDetail is xs:base64Binary.
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    ET.SubElement(parent, "ParticipantObjectDetail", {
        "type": key, "value": base64.b64encode(text.encode("utf-8")).decode("ascii")})


def atna_message(rec: dict[str, Any], ref: RecordRef | None = None) -> ET.Element:
    """One PS3.15 A.5.1 AuditMessage for a decrypted record.

    ``ref`` adds the record itself as a participant object (Security Resource,
    its uuid as URI, its seq and, when no study object holds them, the record's
    details), so an audit repository can dedupe and cite it.
    """
    kind = events.kind_of(str(rec.get("event")))
    msg = ET.Element("AuditMessage")
    ev = ET.SubElement(msg, "EventIdentification", {
        "EventActionCode": str(rec.get("action", kind.action)),
        "EventDateTime": str(rec.get("time", "")),
        "EventOutcomeIndicator": str(rec.get("outcome_code", 0)),
    })
    _coded(ev, "EventID", kind.event_id)
    if kind.type_code is not None:
        _coded(ev, "EventTypeCode", kind.type_code)
    ET.SubElement(ev, "EventOutcomeDescription").text = (
        f"{rec.get('event')}: {rec.get('outcome')}")

    box = str(rec.get("box", ""))
    app = ET.SubElement(msg, "ActiveParticipant", {
        "UserID": f"edge-agent@{box}",
        "UserIsRequestor": "true" if kind.requestor == "box" else "false",
    })
    _coded(app, "RoleIDCode", kind.box_role)
    user = rec.get("user")
    source = rec.get("source")
    if user or source:
        attrs = {"UserID": str(user or source),
                 "UserIsRequestor": "true" if kind.requestor != "box" else "false"}
        if source:
            host = peer_host(str(source))
            attrs["NetworkAccessPointID"] = host
            # 2 = IP address (PS3.15 A.5.2.1), 1 = machine name.
            attrs["NetworkAccessPointTypeCode"] = "2" if looks_ip(host) else "1"
        part = ET.SubElement(msg, "ActiveParticipant", attrs)
        # A local operator has no transfer role; a peer is the other end of a transfer.
        if kind.requestor == "peer" or kind.box_role != events.ROLE_APPLICATION:
            _coded(part, "RoleIDCode", events.ROLE_SOURCE if kind.box_role
                   == events.ROLE_DESTINATION else events.ROLE_DESTINATION)

    site = box.split("/", 1)[0]
    src = ET.SubElement(msg, "AuditSourceIdentification",
                        {"AuditEnterpriseSiteID": site, "AuditSourceID": box})
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_TYPE})

    phi = rec.get("phi") or {}
    details = rec.get("details") or {}
    if phi.get("patient_id") or details.get("patient_ref"):
        pid = str(phi.get("patient_id") or details.get("patient_ref"))
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": pid,
            "ParticipantObjectTypeCode": "1",  # Person
            "ParticipantObjectTypeCodeRole": "1",  # Patient
        })
        ET.SubElement(po, "ParticipantObjectIDTypeCode", {
            "csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"})
        if phi.get("patient_name"):
            ET.SubElement(po, "ParticipantObjectName").text = str(phi["patient_name"])
    study = phi.get("study_uid") or details.get("study_ref")
    if study:
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(study),
            "ParticipantObjectTypeCode": "2",  # System Object
            "ParticipantObjectTypeCodeRole": "3",  # Report
        })
        ET.SubElement(po, "ParticipantObjectIDTypeCode", {
            "csd-code": "110180", "codeSystemName": "DCM",
            "originalText": "Study Instance UID"})
        for k, v in sorted(details.items()):
            _detail(po, str(k), v)
    if ref is not None:
        po = ET.SubElement(msg, "ParticipantObjectIdentification", {
            "ParticipantObjectID": ref.urn,
            "ParticipantObjectTypeCode": "2",  # System Object
            "ParticipantObjectTypeCodeRole": "13",  # Security Resource: the audit record
        })
        ET.SubElement(po, "ParticipantObjectIDTypeCode", {
            "csd-code": "12", "codeSystemName": "RFC-3881", "originalText": "URI"})
        ET.SubElement(po, "ParticipantObjectName").text = ref.name
        _detail(po, "seq", str(ref.seq))
        if not study:
            for k, v in sorted(details.items()):
                _detail(po, str(k), v)
    return msg


def peer_host(source: str) -> str:
    """The host part of a record's ``source`` (``AE@address``, or a bare address)."""
    return source.rsplit("@", 1)[-1]


def looks_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def iter_atna_xml(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield '<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n'
    for rec in records:
        yield ET.tostring(atna_message(rec), encoding="unicode") + "\n"
    yield "</AuditMessages>\n"


def write_atna_xml(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    recs = list(records)
    for chunk in iter_atna_xml(recs):
        out.write(chunk)
    return len(recs)
