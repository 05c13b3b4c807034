"""What every result object shares: who issues it, its UIDs, its words and codes.

UIDs are keyed derivations (HMAC-SHA256 under the box's pseudonym key, label
``result-uid``) of the study pseudonym, the version, the object kind and the
model: a re-sent or rebuilt object keeps its SOP Instance UID, so a PACS sees a
duplicate, never a second copy.  Each kind has one series per study.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from highdicom import UID
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from agent import __version__
from agent.crypto import hmac_sha256

Kind = str  # "sr" | "gsps" | "sc" | "seg"
KINDS: tuple[Kind, ...] = ("sr", "gsps", "sc", "seg")

# High numbers keep the result series after the modality's own in a viewer's list.
SERIES_NUMBER: dict[Kind, int] = {"sr": 9901, "gsps": 9902, "sc": 9903, "seg": 9904}
SERIES_DESCRIPTION: dict[Kind, str] = {
    "sr": "AI result - not for diagnosis",
    "gsps": "AI explanation region - not for diagnosis",
    "sc": "AI key image - not for diagnosis",
    "seg": "AI segmentation - not for diagnosis",
}

DISCLAIMER = "AI - not for diagnosis"
MANUFACTURER = "edge-agent"

# Our own codes: PS3.16 8.2 lets a local scheme start with "99".  Every object that
# uses one says what it is in its Coding Scheme Identification Sequence.
LOCAL_SCHEME = "99EDGEAI"
LOCAL_SCHEME_NAME = "edge-agent AI result codes"


def local_code(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value[:16], scheme_designator=LOCAL_SCHEME, meaning=meaning[:64])


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME,
                                           responsible_organization=MANUFACTURER)]


@dataclass(frozen=True)
class Issuer:
    """The box as the author of result objects.  Its repr hides the key."""

    site: str
    device: str
    uid_key: bytes = field(repr=False)
    software: str = __version__

    @property
    def name(self) -> str:
        return f"edge-agent {self.site}/{self.device}"[:64]

    @property
    def serial(self) -> str:
        return f"{self.site}/{self.device}"[:64]

    def uid(self, *parts: str) -> UID:
        digest = hmac_sha256(self.uid_key, b"result-uid", *(p.encode() for p in parts))
        return UID("2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int))

    def device_uid(self) -> UID:
        """Device Observer UID of this box (TID 1004): stable per box."""
        return self.uid("device", self.site, self.device)

    def series_uid(self, study_ref: str, kind: Kind) -> UID:
        return self.uid("series", study_ref, kind)

    def instance_uid(self, study_ref: str, version: int, kind: Kind, model: str = "") -> UID:
        return self.uid("instance", study_ref, str(version), kind, model)


def statement(models: str) -> str:
    """The plain words every object carries."""
    return (f"{DISCLAIMER}. Automated output of an AI model ({models}) run by edge-agent. "
            "It is not a diagnosis and must be reviewed by a qualified clinician before "
            "any clinical use.")


def probability_text(p: float) -> str:
    return f"{p:.2f}"


def frame_number(ref: Dataset, frame: int) -> int | None:
    """1-based frame number for a multi-frame source, None for a single-frame one."""
    try:
        frames = int(ref.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return frame + 1 if frames > 1 else None
