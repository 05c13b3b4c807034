"""A decrypted audit record as a FHIR R4 AuditEvent (JSON), for audit
repositories that take FHIR instead of the DICOM PS3.15 A.5 XML.

The mapping follows the one FHIR documents from DICOM A.5: EventID -> type,
EventTypeCode -> subtype, EventActionCode -> action, EventOutcomeIndicator ->
outcome, ActiveParticipant -> agent, AuditSourceIdentification -> source,
ParticipantObjectIdentification -> entity.  The codes are the same DICOM
codes (events.py), so both formats mean the same thing.
"""

from __future__ import annotations

import json
from typing import Any

from . import events
from .export import AUDIT_SOURCE_TYPE, RecordRef, looks_ip, peer_host

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"


def _coding(code: events.Code) -> dict[str, str]:
    return {"system": DCM, "code": code.code, "display": code.meaning}


def _detail(key: str, value: object) -> dict[str, str]:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {"type": key, "valueString": text}


def audit_event(rec: dict[str, Any], ref: RecordRef | None = None) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource for a decrypted record (with its PHI)."""
    kind = events.kind_of(str(rec.get("event")))
    box = str(rec.get("box", ""))
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [_coding(kind.box_role)]},
        "who": {"identifier": {"value": f"edge-agent@{box}"}},
        "requestor": kind.requestor == "box",
    }]
    user, source = rec.get("user"), rec.get("source")
    if user or source:
        other: dict[str, Any] = {"who": {"identifier": {"value": str(user or source)}},
                                 "requestor": kind.requestor != "box"}
        if source:
            host = peer_host(str(source))
            other["network"] = {"address": host, "type": "2" if looks_ip(host) else "1"}
        if kind.requestor == "peer" or kind.box_role != events.ROLE_APPLICATION:
            role = (events.ROLE_SOURCE if kind.box_role == events.ROLE_DESTINATION
                    else events.ROLE_DESTINATION)
            other["type"] = {"coding": [_coding(role)]}
        agents.append(other)

    phi = rec.get("phi") or {}
    details = rec.get("details") or {}
    entities: list[dict[str, Any]] = []
    if phi.get("patient_id") or details.get("patient_ref"):
        patient: dict[str, Any] = {
            "what": {"identifier": {"value": str(phi.get("patient_id")
                                                 or details.get("patient_ref"))}},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        }
        if phi.get("patient_name"):
            patient["name"] = str(phi["patient_name"])
        entities.append(patient)
    study = phi.get("study_uid") or details.get("study_ref")
    if study:
        entities.append({
            "what": {"identifier": {"value": str(study)}},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
            "detail": [_detail(str(k), v) for k, v in sorted(details.items())],
        })
    if ref is not None:
        own = [_detail("seq", str(ref.seq))]
        if not study:
            own += [_detail(str(k), v) for k, v in sorted(details.items())]
        entities.append({
            "what": {"identifier": {"system": "urn:ietf:rfc:3986", "value": ref.urn}},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "13", "display": "Security Resource"},
            "name": ref.name,
            "detail": own,
        })

    resource: dict[str, Any] = {"resourceType": "AuditEvent"}
    if ref is not None:
        resource["id"] = ref.uuid
    resource.update({
        "type": _coding(kind.event_id),
        "action": str(rec.get("action", kind.action)),
        "recorded": str(rec.get("time", "")),
        "outcome": str(rec.get("outcome_code", 0)),
        "outcomeDesc": f"{rec.get('event')}: {rec.get('outcome')}",
        "agent": agents,
        "source": {
            "site": box.split("/", 1)[0],
            "observer": {"display": box},
            "type": [{"system": SOURCE_TYPE, "code": AUDIT_SOURCE_TYPE,
                      "display": "Application Server"}],
        },
    })
    if kind.type_code is not None:
        resource["subtype"] = [_coding(kind.type_code)]
    if entities:
        resource["entity"] = entities
    return resource


def encode(resource: dict[str, Any]) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
