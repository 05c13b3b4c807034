"""Annex E actions and options, resolved per attribute, each able to describe itself.

The generated Table E.1-1 gives a basic action per attribute and, per option,
an override (K keep or C clean).  ``resolve`` turns that into one concrete
action for the chosen options; the descriptions here are the single source of
docs/deid.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.deid.table import TABLE, ProfileRow

# Compound actions: the standard lets an implementation choose; we choose the
# least destructive member that keeps the IOD valid, since every member of
# the compound removes the identifying content equally well.
COMPOUND: dict[str, str] = {
    "Z/D": "D",
    "X/Z": "Z",
    "X/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U",
}

ACTION_TEXT: dict[str, str] = {
    "K": "keep the value (sequences are still processed item by item)",
    "X": "remove the attribute",
    "Z": "replace with a zero-length value (an empty sequence for SQ); Patient's Name "
    "gets the keyed patient pseudonym instead of staying empty",
    "D": "replace with a dummy value valid for the VR (Patient ID: the keyed patient "
    "pseudonym; UI: a keyed UID); for a sequence, keep it and process every item, "
    "replacing unlisted free text (ST, LT, UT, UC) inside with a dummy",
    "U": "replace each UID with a keyed 2.25 UID: the same original gives the same new UID "
    "in every instance, study and restart (sequences: process every item)",
    "C": "clean: keep the value with identifying content taken out (see the option that asked for it)",
    "Z/D": "compound: we apply D (a dummy keeps Type 1 attributes valid)",
    "X/Z": "compound: we apply Z (an empty value keeps Type 2 attributes valid); for a "
    "sequence we apply X, since an empty Type 3 sequence is invalid (except Acquisition "
    "Context Sequence, which is Type 2)",
    "X/D": "compound: we apply D (a dummy keeps Type 1 attributes valid)",
    "X/Z/D": "compound: we apply D (a dummy keeps Type 1 attributes valid)",
    "X/Z/U*": "compound: we keep the sequence and apply U to every UID inside it",
}

OPTION_TEXT: dict[str, tuple[str, str]] = {
    # option -> (DICOM code value in CID 7050, what our C / K does)
    "retain_safe_private": (
        "113111",
        "keep the private attributes listed as safe in Table E.3.10-1 (matched by group, "
        "element and private creator) and their private creator elements; all other "
        "private attributes are removed",
    ),
    "retain_uids": ("113110", "keep UIDs instead of replacing them"),
    "retain_device_identity": (
        "113109",
        "keep device identity attributes; AE titles (C) get a keyed token",
    ),
    "retain_institution_identity": ("113112", "keep institution names, addresses, departments"),
    "retain_patient_characteristics": (
        "113108",
        "keep sex, age, size, weight...; free-text characteristics (C) are scrubbed like descriptors",
    ),
    "retain_longitudinal_full_dates": ("113106", "keep dates and times unchanged"),
    "retain_longitudinal_modified_dates": (
        "113107",
        "shift every date (DA, and the date part of DT) by a keyed per-patient offset of "
        "30 to 3679 days into the past, so intervals within a patient stay exact; times "
        "are kept; dates that cannot be parsed are emptied",
    ),
    "clean_descriptors": (
        "113105",
        "keep descriptions and comments with the instance's identifiers (names and their "
        "parts, IDs, dates, institution...) and anything date-like or a number of 5+ digits "
        "replaced by '[removed]'; code strings that would change are emptied",
    ),
    "clean_structured_content": (
        "113104",
        "keep SR / acquisition-context content trees; free text inside is scrubbed as for "
        "descriptors, names, dates and UIDs inside follow their own rules",
    ),
    "clean_graphics": (
        "113103",
        "keep graphic annotations and overlays: overlay bitmaps are blanked (geometry kept), "
        "text inside is scrubbed; curves (50xx) are always removed",
    ),
}

CODE_MEANING: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}

SAFETY_NETS: tuple[str, ...] = (
    "Any person name (PN) not listed in Table E.1-1 is replaced by a dummy.",
    "Any date (DA, DT) not listed is treated like a listed date: dummy, kept or shifted "
    "according to the longitudinal options.",
    "Any UID not listed whose value is not a DICOM-registered UID (1.2.840.10008 root) is "
    "replaced by its keyed UID, unless the attribute names a class or transfer syntax.",
    "Group length elements (gggg,0000) are dropped (they would be wrong after changes).",
    "When Overlay Data (60xx,3000) is removed, the whole overlay group goes with it, so no "
    "incomplete overlay module is left; curve groups (50xx) are removed entirely.",
    "Private attributes are removed at every depth, including private sequences read as "
    "UN, together with their private creators.",
    "The file meta group is rebuilt: SOP Instance UID follows the dataset, source/sending "
    "AE titles and private information are dropped, and the preamble is zeroed.",
    "Encapsulated documents are always quarantined (their content cannot be checked).",
    "Clinical Trial Protocol Ethics Committee Name (Type 1C) is removed when its condition, "
    "the Approval Number, has been removed, so the output stays valid.",
)


@dataclass(frozen=True)
class Resolved:
    """The concrete action for one attribute under the chosen options."""

    action: str  # K, X, Z, D, U or C
    option: str | None  # the option that chose it, when one did
    name: str

    def describe(self) -> str:
        why = f" ({self.option})" if self.option else ""
        return f"{self.action}{why}: {ACTION_TEXT[self.action]}"


def resolve(row: ProfileRow, options: frozenset[str]) -> Resolved:
    # When several chosen options apply to one attribute, clean beats keep:
    # it is the more protective choice and still honours the keep intent.
    chosen = [(act, opt) for opt, act in row.options if opt in options]
    for want in ("C", "K"):
        for act, opt in chosen:
            if act == want:
                return Resolved(act, opt, row.name)
    return Resolved(COMPOUND.get(row.basic, row.basic), None, row.name)


def tag_int(tag: str) -> int | None:
    """'0008,0050' -> 0x00080050; masks and 'private' -> None."""
    if "x" in tag or tag == "private":
        return None
    group, elem = tag.split(",")
    return (int(group, 16) << 16) | int(elem, 16)


def rows_by_key() -> dict[str, ProfileRow]:
    return {r.tag: r for r in TABLE.rows}
