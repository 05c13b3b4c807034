"""Annex E actions and options, resolved per attribute, each able to describe itself.

The generated Table E.1-1 gives a basic action per attribute and, per option,
an override (K keep or C clean).  ``resolve`` turns that into one concrete
action for the chosen options; the descriptions here are the single source of
docs/deid.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

from agent.deid.table import TABLE, ProfileRow

# Compound actions on a plain attribute: the standard lets an implementation
# choose the member the IOD needs; without the IOD's attribute types at hand we
# choose the least destructive member, since every member removes the
# identifying content equally well (a dummy or an empty value carries nothing
# of the original) and it keeps Type 1 and Type 2 attributes valid.
COMPOUND: dict[str, str] = {
    "Z/D": "D",
    "X/Z": "Z",
    "X/D": "D",
    "X/Z/D": "D",
    "X/Z/U*": "U",
}
# On a sequence the action applies to the sequence and all of its contents
# (PS3.15 E.1.1), and the standard's default, X, is what we choose: the
# sequences with a compound action are Type 3 in most IODs, and a dummy item
# would only keep an empty code or reference structure. Exceptions: a sequence
# Type 2 in an IOD is emptied there (TYPE2_SEQUENCES), and X/Z/U* keeps the
# references with their instance UIDs replaced.
SEQUENCE_COMPOUND: dict[str, str] = {
    "Z/D": "Z",
    "X/Z": "X",
    "X/D": "X",
    "X/Z/D": "X",
    "X/Z/U*": "U",
}
# Sequences with a compound action that are Type 2 in some IODs: row -> the SOP Class
# UID prefixes of those IODs (empty: every IOD that carries the sequence).
TYPE2_SEQUENCES: dict[str, tuple[str, ...]] = {
    "0040,0555": (),  # Acquisition Context Sequence
    # Referenced Performed Procedure Step Sequence: SR Document Series module (SR, KOS)
    "0008,1111": ("1.2.840.10008.5.1.4.1.1.88.",),
}

ACTION_TEXT: dict[str, str] = {
    "K": "keep the value; a sequence is kept and the profile is applied to every attribute "
    "of every item (UIDs inside get their keyed UID, names a dummy...)",
    "X": "remove the attribute; a sequence goes with every item and everything in it",
    "Z": "replace with a zero-length value; a sequence is emptied (zero items), whatever its "
    "items held; Patient's Name gets the keyed patient pseudonym instead of staying empty",
    "D": "replace with a dummy value valid for the VR (Patient ID: the keyed patient "
    "pseudonym; UI: a keyed UID); a sequence with items is replaced by exactly one dummy "
    "item (see Sequences below), an empty one stays empty",
    "U": "replace each UID with a keyed 2.25 UID: the same original gives the same new UID "
    "in every instance, study and restart (a sequence: kept, every item processed, so every "
    "instance UID inside is replaced)",
    "C": "clean: keep the value with identifying content taken out (see the option that asked "
    "for it); a value that cannot be cleaned (binary OB, OW, UN...) gets the attribute's basic "
    "action instead",
    "Z/D": "compound: we apply D (a dummy keeps Type 1 attributes valid); Z for a sequence",
    "X/Z": "compound: we apply Z (an empty value keeps Type 2 attributes valid); X for a "
    "sequence (an empty Type 3 sequence is invalid), except Acquisition Context Sequence, "
    "Type 2, which is emptied",
    "X/D": "compound: we apply D (a dummy keeps Type 1 attributes valid); X for a sequence",
    "X/Z/D": "compound: we apply D (a dummy keeps Type 1 attributes valid); X for a sequence, "
    "Z where it is Type 2 (Referenced Performed Procedure Step Sequence in SR documents)",
    "X/Z/U*": "compound: we keep the sequence and apply U to every UID inside it (the "
    "profile applies to everything else inside)",
}

SEQUENCES: tuple[str, ...] = (
    "PS3.15 E.1.1: the action of a sequence applies to the sequence and all of its "
    "contents, so it wins over the actions of the attributes inside: an attribute "
    "the table keeps (K, or not listed) disappears with a sequence that is removed, "
    "emptied or replaced. Examples: Institution Code Sequence (X/Z/D) and Operator "
    "Identification Sequence (X/D) are removed with their Code Value and Code Meaning; "
    "Issuer of the Specimen Identifier Sequence (Z) keeps zero items.",
    "X: the sequence is removed. Z: it is kept with zero items.",
    "D: a sequence with items becomes exactly one item built from the first original "
    "item: each public attribute in it is replaced by the dummy of its VR (the "
    "dictionary's minimum number of values, e.g. ANONYMIZED for LO, SH, PN and listed "
    "CS, 19000101 for DA, 000000 for TM, 0 for numbers, zero bytes for OB/OW); a sequence "
    "inside is replaced the same way (an empty one stays empty); UIDs get their keyed "
    "UID (registered DICOM UIDs such as SOP classes stay; with Retain UIDs all stay); "
    "code strings (CS) the table does not list keep their value, since they are the "
    "enumerations the IOD constrains (Value Type, Relationship Type...) and Table E.1-1 "
    "treats code strings as not identifying; private attributes and further items are "
    "dropped. The item therefore keeps the structure a Type 1 sequence needs and none of "
    "the original names, codes, texts, dates or numbers.",
    "K, U, C (and sequences the table does not list): the sequence stays and the profile "
    "is applied to every attribute of every item, at any depth, exactly as at the top "
    "level; C also cleans free text inside as the option says.",
    "An option's override applies to the sequence as a whole: with Retain Institution "
    "Identity, Institution Code Sequence is kept (and processed item by item); no option "
    "keeps a sequence the option does not name.",
    "Private sequences go with the private attributes; with Retain Safe Private, a safe "
    "private sequence (Table E.3.10-1) is kept and processed item by item like a kept "
    "public one; a safe private sequence whose items cannot be read (UN) is removed.",
    "In encrypt mode the whole original of every top-level sequence that changed, "
    "including one removed or replaced, goes into the Encrypted Attributes Sequence.",
)

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
    "Group length elements (gggg,0000) are dropped (they would be wrong after changes), "
    "and so are command elements (0000,eeee) and file meta elements (0002,eeee) found in "
    "the data set or in an item: neither belongs there, and the file meta group is rebuilt.",
    "When Overlay Data (60xx,3000) is removed, the whole overlay group goes with it, so no "
    "incomplete overlay module is left; curve groups (50xx) are removed entirely.",
    "Private attributes are removed at every depth, including private sequences read as "
    "UN, together with their private creators.",
    "The file meta group is rebuilt: SOP Instance UID follows the dataset, source/sending "
    "AE titles and private information are dropped, and the preamble is zeroed.",
    "Encapsulated documents are always quarantined (their content cannot be checked).",
    "An option's clean (C) of a value that has no cleaned form, a binary one (OB, OW, UN: "
    "Maker Note, Device Setting Description, Frame Origin Timestamp...), gives the "
    "attribute's basic action instead (removed, or a dummy where the table says D).",
    "Clinical Trial Protocol Ethics Committee Name (D) gets its dummy, and because it is "
    "Type 1C, present exactly when the Ethics Committee Approval Number is, an approval "
    "number in the input is replaced by a dummy too instead of being removed (X), so the "
    "output stays valid; neither dummy carries anything of the original.",
)


@dataclass(frozen=True)
class Resolved:
    """The concrete action for one attribute under the chosen options."""

    action: str  # K, X, Z, D, U or C
    option: str | None  # the option that chose it, when one did
    name: str
    basic: str | None = None  # for C: the action without options, where cleaning has no meaning

    def describe(self) -> str:
        why = f" ({self.option})" if self.option else ""
        return f"{self.action}{why}: {ACTION_TEXT[self.action]}"


@functools.lru_cache(maxsize=1024)
def is_sequence(tag: str) -> bool:
    """Whether a Table E.1-1 row names a sequence (SQ in the data dictionary)."""
    number = tag_int(tag)
    if number is None:
        return False
    try:
        return str(dictionary_VR(number)) == "SQ"
    except KeyError:
        return False


def basic_action(row: ProfileRow) -> str:
    """The row's action with no option chosen, compounds resolved."""
    if row.basic not in COMPOUND:
        return row.basic
    if is_sequence(row.tag):
        if TYPE2_SEQUENCES.get(row.tag) == () and "Z" in row.basic.split("/"):
            return "Z"
        return SEQUENCE_COMPOUND[row.basic]
    return COMPOUND[row.basic]


def resolve(row: ProfileRow, options: frozenset[str]) -> Resolved:
    # When several chosen options apply to one attribute, clean beats keep:
    # it is the more protective choice and still honours the keep intent.
    basic = basic_action(row)
    chosen = [(act, opt) for opt, act in row.options if opt in options]
    for want in ("C", "K"):
        for act, opt in chosen:
            if act == want:
                return Resolved(act, opt, row.name, basic if act == "C" else None)
    return Resolved(basic, None, row.name)


def tag_int(tag: str) -> int | None:
    """'0008,0050' -> 0x00080050; masks and 'private' -> None."""
    if "x" in tag or tag == "private":
        return None
    group, elem = tag.split(",")
    return (int(group, 16) << 16) | int(elem, 16)


def rows_by_key() -> dict[str, ProfileRow]:
    return {r.tag: r for r in TABLE.rows}
