"""The audit event catalogue: edge-agent event names mapped to ATNA vocabulary.

Codes come from DICOM PS3.16 (CID 400 Audit Event ID, CID 401 Audit Event Type
Code, CID 402 Active Participant Role ID) as used by PS3.15 A.5 / RFC 3881, so
an exported record means the same thing to a hospital's audit repository as it
does to us.  Unknown event names are never dropped: they are recorded as a
generic "Application Activity" so a typo in a caller loses no evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActionCode = Literal["C", "R", "U", "D", "E"]

# PS3.15 A.5.1 EventOutcomeIndicator values.
OUTCOMES: dict[str, int] = {
    "success": 0,
    "minor_failure": 4,
    "serious_failure": 8,
    "major_failure": 12,
}


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
PROCEDURE_RECORD = _dcm("110111", "Procedure Record")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
LOCAL_SERVICE_STARTED = _dcm("110141", "Local Service Operation Started")

ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")


@dataclass(frozen=True)
class EventKind:
    """How one edge-agent event name is expressed in ATNA terms."""

    name: str
    event_id: Code
    type_code: Code | None
    action: ActionCode
    # Who initiated it: a remote peer (source), a local Unix user, or the box itself.
    requestor: Literal["peer", "user", "box"] = "box"
    # Receiving is Destination for the box; sending results is Source.
    box_role: Code = ROLE_APPLICATION
    description: str = ""


Requestor = Literal["peer", "user", "box"]


def _k(name: str, eid: Code, tcode: Code | None, action: ActionCode, desc: str, *,
       requestor: Requestor = "box", box_role: Code = ROLE_APPLICATION) -> EventKind:
    return EventKind(name, eid, tcode, action, requestor, box_role, desc)


CATALOGUE: dict[str, EventKind] = {k.name: k for k in (
    _k("association.accepted", USER_AUTHENTICATION, LOGIN, "E",
       "a DICOM peer's association passed the AE title / address allowlist",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("association.rejected", SECURITY_ALERT, NODE_AUTHENTICATION, "E",
       "a DICOM peer's association was refused (allowlist, rate or TLS)",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("instance.received", INSTANCES_TRANSFERRED, None, "C",
       "an instance was made durable in the encrypted inbox",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("instance.duplicate", INSTANCES_TRANSFERRED, None, "R",
       "an identical instance arrived again and was acknowledged without storing",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("instance.conflict", INSTANCES_TRANSFERRED, None, "U",
       "an instance with a known SOP Instance UID but different content arrived",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("study.completed", INSTANCES_ACCESSED, None, "R",
       "a study was assembled after its quiet period or a bound"),
    _k("deid.applied", INSTANCES_ACCESSED, None, "C",
       "de-identification created the pseudonymised copy of a study"),
    _k("instance.quarantined", INSTANCES_ACCESSED, None, "U",
       "an instance was held back (burned-in text risk or de-identification failure)"),
    _k("inference.done", INSTANCES_ACCESSED, None, "E",
       "a model ran on de-identified pixels and produced a result"),
    _k("inference.failed", INSTANCES_ACCESSED, None, "E",
       "a model failed or timed out on a study"),
    _k("model.refused", SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E",
       "a model package failed its hash or signature check"),
    _k("model.changed", SECURITY_ALERT, SOFTWARE_CONFIGURATION, "U",
       "a model was installed, activated or rolled back"),
    _k("message.published", EXPORT, None, "R",
       "a de-identified message left the box over MQTT", box_role=ROLE_SOURCE),
    _k("egress.blocked", SECURITY_ALERT, RESTRICTED_FUNCTION, "E",
       "the egress guard stopped a message that matched PHI"),
    _k("security.alert", SECURITY_ALERT, None, "E",
       "any other security-relevant anomaly"),
    _k("config.loaded", SECURITY_ALERT, SECURITY_CONFIGURATION, "R",
       "the configuration file was loaded and validated"),
    _k("cli.action", SECURITY_ALERT, LOCAL_SERVICE_STARTED, "E",
       "an operator ran an edge-agent command", requestor="user"),
    _k("key.rotated", SECURITY_ALERT, SECURITY_CONFIGURATION, "U",
       "a key was rotated and data keys re-wrapped", requestor="user"),
    _k("cert.changed", SECURITY_ALERT, SECURITY_CONFIGURATION, "U",
       "a TLS certificate or CA was installed or replaced", requestor="user"),
    _k("audit.exported", AUDIT_LOG_USED, None, "R",
       "audit records were exported (an audited access)", requestor="user"),
    _k("audit.retention", AUDIT_LOG_USED, None, "D",
       "expired audit days were crypto-shredded"),
    _k("audit.log_replaced", SECURITY_ALERT, None, "E",
       "the box had an audit log that is now missing or another one: a new log began"),
    _k("audit.over_budget", SECURITY_ALERT, None, "E",
       "the audit store is over its byte budget but nothing is old enough to shred"),
    _k("audit.events_lost", SECURITY_ALERT, None, "E",
       "audit events could not be kept while the store failed (with their count)"),
    _k("results.link_written", INSTANCES_ACCESSED, None, "C",
       "the encrypted link from a study's pseudonym to its originals was stored"),
    _k("results.link_shredded", INSTANCES_ACCESSED, None, "D",
       "a result link was crypto-shredded (released, or past its retention)"),
    _k("results.sent", INSTANCES_TRANSFERRED, None, "R",
       "a result object was sent to a PACS destination with C-STORE (every attempt, with "
       "its outcome: stored, retry, refused, unreachable, dead-letter)",
       box_role=ROLE_SOURCE),
    _k("commitment.report", INSTANCES_TRANSFERRED, None, "R",
       "a PACS sent a storage commitment report (N-EVENT-REPORT) on its own association",
       requestor="peer", box_role=ROLE_SOURCE),
    _k("mpps.n_create", PROCEDURE_RECORD, None, "C",
       "a modality created a Modality Performed Procedure Step (N-CREATE), or was refused",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("mpps.n_set", PROCEDURE_RECORD, None, "U",
       "a modality updated, completed or discontinued its procedure step (N-SET), or was "
       "refused", requestor="peer", box_role=ROLE_DESTINATION),
    _k("commitment.request", INSTANCES_TRANSFERRED, None, "R",
       "a modality asked the box to commit instances (storage commitment N-ACTION)",
       requestor="peer", box_role=ROLE_DESTINATION),
    _k("commitment.report_sent", INSTANCES_TRANSFERRED, None, "R",
       "the box sent its storage commitment report to the modality (same or new "
       "association)", box_role=ROLE_DESTINATION),
    _k("commitment.report_undeliverable", INSTANCES_TRANSFERRED, None, "R",
       "a storage commitment report could not be delivered (AE not in [[dicom.known_aes]], "
       "or unreachable)", box_role=ROLE_DESTINATION),
    _k("results.committed", INSTANCES_TRANSFERRED, None, "R",
       "a PACS destination answered a storage commitment request for a result object",
       box_role=ROLE_SOURCE),
    _k("results.exported", EXPORT, None, "R",
       "result objects carrying PHI were written to files by an operator", requestor="user"),
    _k("quarantine.viewed", INSTANCES_ACCESSED, None, "R",
       "a privacy officer rendered a quarantined instance's pixels", requestor="user"),
    _k("quarantine.released", INSTANCES_ACCESSED, None, "U",
       "a privacy officer released a quarantined instance (pixel-clean rule or "
       "attestation)", requestor="user"),
    _k("quarantine.purged", INSTANCES_ACCESSED, None, "D",
       "a quarantined instance was crypto-shredded (officer, release or retention)"),
    _k("review.verdict", APPLICATION_ACTIVITY, None, "U",
       "a reviewer's verdict on a result was taken, ignored (a replay) or refused",
       requestor="user"),
    _k("review.viewed", INSTANCES_ACCESSED, None, "R",
       "a local reviewer opened a result's box-local record", requestor="user"),
    _k("review.escalated", SECURITY_ALERT, None, "E",
       "a flagged result waited longer than [review] escalate_after for a verdict"),
    _k("performance.alert", SECURITY_ALERT, None, "E",
       "a model's measured performance in a subgroup fell below its threshold or apart "
       "from the rest"),
    _k("daemon.started", APPLICATION_ACTIVITY, APPLICATION_START, "E",
       "the daemon started"),
    _k("daemon.stopped", APPLICATION_ACTIVITY, APPLICATION_STOP, "E",
       "the daemon stopped"),
)}

UNKNOWN = EventKind("application.activity", APPLICATION_ACTIVITY, None, "E",
                    description="an event name not in this catalogue")


def kind_of(event: str) -> EventKind:
    return CATALOGUE.get(event, UNKNOWN)


def outcome_code(outcome: str) -> int:
    """Map an outcome word to the ATNA indicator; anything unknown is a minor failure."""
    return OUTCOMES.get(outcome, 4)
