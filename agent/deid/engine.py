"""The de-identification engine: PS3.15 Annex E applied to one instance.

Elements are walked in the raw form pydicom read them in: an attribute the
profile keeps is copied without being decoded (pixel data is never copied or
decoded unless a pixel-clean rule needs it), so only attributes that change
cost anything.  Lookups are precomputed per option set at construction.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom import config as pydicom_config
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent import dicomraw
from agent.deid import burnedin
from agent.deid.envelope import envelope
from agent.deid.pseudonym import Pseudonymizer
from agent.deid.rules import CODE_MEANING, OPTION_TEXT, TYPE2_SEQUENCES, Resolved, resolve, tag_int
from agent.deid.settings import DeidSettings
from agent.deid.table import TABLE, ProfileRow
from agent.deid.values import (
    DUMMY_BY_VR,
    FREE_TEXT_VRS,
    MAX_LEN,
    Scrubber,
    name_terms,
    shift_date,
)
from agent.errors import DeidError

TextMode = Literal["keep", "scrub"]
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:edge-agent:deid").int)
IMPLEMENTATION_VERSION = "EDGE_AGENT_1"
_DATE_OPTIONS = ("retain_longitudinal_full_dates", "retain_longitudinal_modified_dates")
_CLEAN_OPTIONS = frozenset(
    {
        "clean_descriptors",
        "clean_structured_content",
        "clean_graphics",
        "retain_patient_characteristics",
    }
)
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PIXEL_DATA = 0x7FE00010
_REGISTERED_ROOT = "1.2.840.10008."
_ENCRYPTED_ATTRS = 0x04000500
_SCRUBBED_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_PHI_VRS = frozenset({"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT"})
# Values an option's clean (C) can work on; anything else gets the basic action.
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DATE_CLEANABLE_VRS = frozenset({"DA", "DT", "TM", "SH", "LO", "CS"})
# A removed attribute that is the condition of a Type 1C attribute the profile keeps
# or replaces by a dummy: it gets a dummy too, so the output stays valid (PS3.15 E.1.1
# leaves IOD integrity to the de-identifier). Clinical Trial Protocol Ethics Committee
# Name (D) is present exactly when its Approval Number (X) is.
_CONDITION_DUMMIED = {0x00120082: 0x00120081}  # Approval Number <- Ethics Committee Name
# A synthetic row for dates the table does not list (our safety net).
_UNLISTED_DATE = ProfileRow(
    tag="unlisted-date",
    name="date not listed in Table E.1-1",
    basic="D",
    options=(
        ("retain_longitudinal_full_dates", "K"),
        ("retain_longitudinal_modified_dates", "C"),
    ),
)


@dataclass(frozen=True)
class DeidOutcome:
    dataset: Dataset | None  # de-identified (None when quarantined)
    quarantine_reason: str | None
    phi: frozenset[str] = field(repr=False)  # originals for the egress guard; never log
    patient_ref: str
    study_ref: str

    def __repr__(self) -> str:
        state = "quarantined" if self.quarantine_reason else "ok"
        return (
            f"DeidOutcome({state}, patient_ref={self.patient_ref!r}, "
            f"study_ref={self.study_ref!r}, phi=<{len(self.phi)} values>)"
        )


@functools.lru_cache(maxsize=4096)
def _vr_of(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


@functools.lru_cache(maxsize=4096)
def _uid_attribute_is_class(tag: int) -> bool:
    keyword = keyword_for_tag(tag)
    return keyword.endswith(("ClassUID", "SyntaxUID")) or keyword in {
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "MappingResourceUID",
    }


@functools.lru_cache(maxsize=4096)
def _min_vm(tag: int) -> int:
    """The least number of values the dictionary allows (at least one): '2-2n' -> 2."""
    try:
        vm = str(dictionary_VM(tag))
    except KeyError:
        return 1
    m = re.match(r"\d+", vm)
    return max(1, int(m.group())) if m else 1


def _dummy_value(tag: int, vr: str) -> Any:
    """The VR's dummy, as many times as the attribute needs values (None: no dummy)."""
    dummy = DUMMY_BY_VR.get(vr)
    if dummy is None or isinstance(dummy, bytes):
        return dummy
    n = _min_vm(tag)
    return dummy if n == 1 else [dummy] * n


def _empty_like(ds: Dataset) -> Dataset:
    """An empty data set that will be written in the same encoding as ``ds``.

    An item keeps its parent's character set (what pydicom's reader gave the source
    item), so its original and current character sets agree and the writer can copy
    kept raw elements verbatim.
    """
    out = Dataset(parent_encoding=dicomraw.parent_encoding(ds))
    if None not in ds.original_encoding:
        implicit, little = ds.original_encoding
        out.set_original_encoding(implicit, little, ds.original_character_set)
    return out


def _elem_vr(elem: DataElement | RawDataElement) -> str:
    vr = elem.VR
    if vr is None or vr == "UN" or len(vr) != 2:
        return _vr_of(int(elem.tag))
    return str(vr)


def _fast_values(elem: DataElement | RawDataElement, vr: str) -> list[str] | None:
    """Text values of a raw ASCII element without pydicom's full conversion.

    Only for values we drop, replace or map (never for values we keep): it saves
    most of the per-instance cost; anything not plain ASCII takes the full path.
    """
    if not isinstance(elem, RawDataElement) or vr not in _PHI_VRS:
        return None
    raw = elem.value
    if not isinstance(raw, bytes) or not raw.isascii():
        return None
    text = raw.decode("ascii").strip("\x00 ")
    return [v.strip("\x00 ") for v in text.split("\\")] if text else []


# Text VRs whose ASCII values can be stored pre-encoded (no charset, no byte order).
_RAW_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


def _encoded_text(vr: str, value: Any) -> bytes | None:
    """The encoded value of a text element, or None when it is not plain ASCII text."""
    if value is None:
        return b""
    if type(value) is str:
        text = value
    elif type(value) is list and all(type(v) is str for v in value):
        text = "\\".join(value)
    else:
        return None
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return data


def _new(tag: int, vr: str, value: Any) -> DataElement | RawDataElement:
    """A replacement element; our values are valid by construction, so skip re-validation.

    Plain ASCII text is stored already encoded, exactly as pydicom would encode it:
    the writer copies the bytes verbatim, and reading the element decodes it as usual
    (ASCII is the same in every DICOM character set and byte order).
    """
    if vr in _RAW_TEXT_VRS:
        data = _encoded_text(vr, value)
        if data is not None:
            return RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)
    return DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


def _uid_value(ds: Dataset, tag: int) -> Any:
    """A UID element's value, read without converting the stored raw element in place."""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) and elem.value.isascii():
        return elem.value.decode("ascii").strip("\x00 ")
    value = ds[tag].value
    return str(value) if isinstance(value, str) else value


def _top_text(ds: Dataset, tag: int, keyword: str) -> str:
    """str(ds.<keyword>).strip() for a single-valued text attribute (empty when absent).

    A raw single ASCII value is decoded as pydicom would (trailing NUL/space padding
    removed) without converting the element in place; anything else takes pydicom's path.
    """
    elem = dicomraw.raw(ds, BaseTag(tag))
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if isinstance(raw, bytes) and raw.isascii() and b"\\" not in raw:
            return raw.decode("ascii").rstrip("\x00 ").strip()
    return str(ds.get(keyword, "") or "").strip()


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _pack(values: list[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class _Instance:
    """Per-instance state of one walk."""

    __slots__ = ("date_offset", "modified_tags", "patient_token", "phi", "scrubber", "sop_class")

    def __init__(self, patient_token: str, date_offset: int, sop_class: str) -> None:
        self.sop_class = sop_class
        self.phi: set[str] = set()
        self.scrubber: Scrubber | None = None
        self.date_offset = date_offset
        self.patient_token = patient_token
        self.modified_tags: list[int] = []


class Deidentifier:
    """Applies the configured profile; one instance per settings and key."""

    def __init__(self, settings: DeidSettings, pseudonym_key: bytes,
                 pseudonymizer: Pseudonymizer | None = None) -> None:
        settings.validate()
        self._settings = settings
        # Keyed (HMAC) by default; vault mode hands in agent/deid/vault.py's.
        self._pseudo = pseudonymizer or Pseudonymizer(pseudonym_key)
        opts = settings.options
        self._opts = opts
        self._rules: dict[int, Resolved] = {}
        masks: dict[str, Resolved] = {}
        for row in TABLE.rows:
            resolved = resolve(row, opts)
            tag = tag_int(row.tag)
            if tag is None:
                masks[row.tag] = resolved
            else:
                self._rules[tag] = resolved
        self._private = masks["private"]
        self._overlay_data = masks["60xx,3000"]
        self._overlay_comments = masks["60xx,4000"]
        self._unlisted_date = resolve(_UNLISTED_DATE, opts)
        # Sequences removed (X) except in the IODs where they are Type 2: emptied there.
        self._type2_in: dict[int, tuple[str, ...]] = {
            tag: prefixes
            for key, prefixes in TYPE2_SEQUENCES.items()
            if prefixes and (tag := tag_int(key)) is not None and self._rules[tag].action == "X"
        }
        self._unlisted_pn = Resolved("D", None, "person name not listed in Table E.1-1")
        self._unlisted_uid = Resolved("U", None, "UID not listed in Table E.1-1")
        self._overlay_text = Resolved("C", "clean_graphics", "overlay text")
        # (group, element low byte, creator) -> VR of the safe private attribute
        self._safe_private: dict[tuple[int, int, str], str] = {}
        if self._private.action == "C":
            self._safe_private = {(s.group, s.element_low, s.creator): s.vr for s in TABLE.safe_private}
        self._retain_uids = "retain_uids" in opts
        self._needs_scrubber = bool(opts & _CLEAN_OPTIONS)
        if "retain_longitudinal_full_dates" in opts:
            self._temporal = "UNMODIFIED"
        elif "retain_longitudinal_modified_dates" in opts:
            self._temporal = "MODIFIED"
        else:
            self._temporal = "REMOVED"
        self._method_text = self.method_text()
        self._codes = ("113100",) + tuple(
            OPTION_TEXT[o][0] for o in sorted(opts, key=lambda o: OPTION_TEXT[o][0])
        )

    def __repr__(self) -> str:
        return f"Deidentifier({self.describe()!r})"

    # ------------------------------------------------------------------ public
    def describe(self) -> str:
        opts = ", ".join(sorted(self._opts)) or "none"
        vault = "; pseudonyms: vault" if self._pseudo.kind == "vault" else ""
        return (f"PS3.15 E.1-1 Basic Profile ({TABLE.edition}) {self._settings.mode}; "
                f"options: {opts}{vault}")

    def method_text(self) -> str:
        """DeidentificationMethod value: short enough for one LO value (64 chars)."""
        return f"edge-agent PS3.15 E.1-1 {TABLE.edition} {self._settings.mode}"[:64]

    def deidentify(self, ds: Dataset) -> DeidOutcome:
        try:
            return self._deidentify(ds)
        except DeidError:
            raise
        except Exception as exc:  # noqa: BLE001 -- malformed input: one error family for callers
            raise DeidError(
                f"instance could not be de-identified ({type(exc).__name__})",
                hint="the instance is malformed; it is kept encrypted and not published",
            ) from exc

    # ----------------------------------------------------------------- internal
    def _deidentify(self, ds: Dataset) -> DeidOutcome:
        study_uid = _top_text(ds, 0x0020000D, "StudyInstanceUID")
        sop_uid = _top_text(ds, 0x00080018, "SOPInstanceUID")
        if not study_uid or not sop_uid or "SOPClassUID" not in ds:
            raise DeidError(
                "instance lacks StudyInstanceUID, SOPInstanceUID or SOPClassUID",
                hint="the sender produced a malformed instance; check the modality",
            )
        patient_identity = self._patient_identity(ds, study_uid)
        patient_ref = self._pseudo.token("patient", patient_identity)
        study_ref = self._pseudo.uid(study_uid) if not self._retain_uids else study_uid
        sop_class = _top_text(ds, 0x00080016, "SOPClassUID")
        state = _Instance(patient_ref, self._pseudo.date_offset_days(patient_identity), sop_class)
        if self._needs_scrubber:
            state.scrubber = Scrubber(self._top_level_terms(ds))

        risk = burnedin.burned_in_risk(ds)
        rule = None
        if risk is not None:
            rule = (
                None
                if burnedin.is_encapsulated_document(ds)
                else burnedin.matching_rule(ds, self._settings.pixel_clean)
            )
            if rule is None:
                self._collect_phi_only(ds, state)
                return DeidOutcome(None, risk, frozenset(state.phi), patient_ref, study_ref)

        out, _ = self._walk(ds, state, top=True, text_mode="keep")
        for condition, dependent in _CONDITION_DUMMIED.items():
            if dependent in out and condition in ds and condition not in out:
                vr = _vr_of(condition)
                out[condition] = _new(condition, vr, _dummy_value(condition, vr))
        codes = list(self._codes)
        self._file_meta(ds, out)
        if rule is not None:
            try:
                burnedin.black_out(out, rule)
            except Exception as exc:  # noqa: BLE001 -- any decoder failure: pixels unverifiable
                self._collect_phi_only(ds, state)
                reason = f"{risk}; pixel-clean rule matched but pixels not decodable ({type(exc).__name__})"
                return DeidOutcome(None, reason, frozenset(state.phi), patient_ref, study_ref)
            codes.append("113101")
        self._stamp(out, sorted(codes))
        if self._settings.mode == "encrypt":
            self._encrypt_originals(ds, out, state)
        return DeidOutcome(out, None, frozenset(state.phi), patient_ref, study_ref)

    def _patient_identity(self, ds: Dataset, study_uid: str) -> str:
        pid = _top_text(ds, _PATIENT_ID, "PatientID")
        issuer = _top_text(ds, 0x00100021, "IssuerOfPatientID")
        if pid:
            return f"id:{issuer}:{pid}"
        name = str(ds.get("PatientName", "") or "").strip()
        birth = str(ds.get("PatientBirthDate", "") or "").strip()
        if name:
            return f"name:{name}:{birth}"
        # Without any patient identity each study stands for its own patient.
        return f"study:{study_uid}"

    def _top_level_terms(self, ds: Dataset) -> list[str]:
        terms: list[str] = []
        for elem in ds.elements():
            tag = int(elem.tag)
            rule = self._rules.get(tag)
            if rule is None or rule.action in ("K", "C") or tag >> 16 & 1:
                continue
            vr = _elem_vr(elem)
            if vr not in _PHI_VRS or vr in ("UI", "SQ"):
                continue
            for v in _values(ds[tag].value):
                s = str(v)
                terms.extend(name_terms(s) if vr == "PN" else [s])
        return terms

    def _collect_phi_only(self, ds: Dataset, state: _Instance) -> None:
        """Quarantined instances are not published, but the guard still needs their PHI."""
        self._walk(ds, state, top=False, text_mode="keep")

    def _note(self, state: _Instance, vr: str, value: Any) -> None:
        if vr not in _PHI_VRS:
            return
        for v in _values(value):
            s = str(v).strip()
            if len(s) < 3:
                continue
            if vr == "PN":
                state.phi.update(t for t in name_terms(s) if len(t) >= 3)
            else:
                state.phi.add(s)

    def _note_raw_private(self, state: _Instance, elem: DataElement | RawDataElement) -> None:
        value = elem.value
        if isinstance(value, bytes) and 3 <= len(value) <= 256:
            text = value.decode("latin-1").strip("\x00 ")
            if len(text) >= 3 and text.isprintable():
                state.phi.add(text)
        elif isinstance(value, str) and len(value.strip()) >= 3:
            state.phi.add(value.strip())

    def _walk(self, ds: Dataset, state: _Instance, *, top: bool, text_mode: TextMode) -> tuple[Dataset, bool]:
        out = _empty_like(ds)
        changed = False
        kept_creators: set[int] = set()
        # Plain public elements go straight into the element dict: Dataset.__setitem__
        # only adds private-creator and sequence bookkeeping, which these do not need,
        # and it is the largest per-element cost of a walk.
        store = dicomraw.elements(out)
        for elem in ds.elements():
            tag = int(elem.tag)
            group = tag >> 16
            number = tag & 0xFFFF
            if group & 1:
                safe_vr = self._safe_private_vr(ds, group, number)
                if safe_vr is not None:
                    new, did_change = self._keep_private(ds, elem, tag, safe_vr, state, text_mode)
                else:
                    new, did_change = None, True
                    if number >= 0x0100 or number < 0x0010:
                        self._note_raw_private(state, elem)
                if new is not None:
                    out[tag] = new
                    kept_creators.add((group << 16) | (number >> 8))
                if did_change:
                    changed = True
                    if top:
                        state.modified_tags.append(tag)
                continue
            if number == 0 or group in (0x0000, 0x0002):
                # Group lengths are rebuilt or obsolete; command and file meta elements do
                # not belong in a data set (the meta group is rebuilt from the data set).
                if number:
                    self._note(state, _elem_vr(elem), ds[tag].value)
                    changed = True
                continue
            if 0x5000 <= group <= 0x501E:
                # Curves are retired; cleaning them has no safe meaning, so they go.
                self._note(state, _elem_vr(elem), ds[tag].value)
                changed = True
                if top:
                    state.modified_tags.append(tag)
                continue
            rule = self._rules.get(tag)
            vr = _elem_vr(elem)
            if rule is None and 0x6000 <= group <= 0x601E:
                rule = self._overlay_rule(number)
                if rule is None:
                    if self._overlay_data.action == "X":
                        changed = True  # the whole overlay goes with its data
                        if top:
                            state.modified_tags.append(tag)
                        continue
                    if vr in _SCRUBBED_TEXT_VRS:
                        rule = self._overlay_text
            if rule is None:
                rule = self._fallback(elem, vr, text_mode)
                if rule is None:
                    store[elem.tag] = self._copy(elem)
                    continue
            new, did_change = self._apply(ds, elem, tag, vr, rule, state, text_mode)
            if new is not None:
                if vr == "SQ":
                    out[tag] = new  # Dataset bookkeeping for nested encodings
                else:
                    store[new.tag] = new
            if did_change:
                changed = True
                if top:
                    state.modified_tags.append(tag)
        for creator in kept_creators:
            out[creator] = self._copy(ds.get_item(creator))
        return out, changed

    def _overlay_rule(self, number: int) -> Resolved | None:
        if number == 0x3000:
            return self._overlay_data
        if number == 0x4000:
            return self._overlay_comments
        return None

    def _safe_private_vr(self, ds: Dataset, group: int, number: int) -> str | None:
        """The VR of a safe private attribute to keep (Retain Safe Private), else None."""
        if not self._safe_private or group <= 0x0007 or group == 0xFFFF or number < 0x1000:
            return None
        creator_tag = (group << 16) | (number >> 8)
        if creator_tag not in ds:
            return None
        creator = ds[creator_tag].value
        if isinstance(creator, bytes):
            creator = creator.decode("latin-1")
        return self._safe_private.get((group, number & 0xFF, str(creator).strip()))

    def _keep_private(
        self,
        ds: Dataset,
        elem: DataElement | RawDataElement,
        tag: int,
        safe_vr: str,
        state: _Instance,
        text_mode: TextMode,
    ) -> tuple[DataElement | RawDataElement | None, bool]:
        """A safe private attribute: kept; a safe private sequence is processed item by item."""
        if safe_vr != "SQ" and _elem_vr(elem) != "SQ":
            return self._copy(elem), False
        full = ds[tag]
        if full.VR != "SQ":
            # A sequence we cannot read (UN without a known VR): its items cannot be
            # checked, so it goes like any private attribute.
            self._note_raw_private(state, elem)
            return None, True
        items = []
        changed = False
        for item in full.value:
            new_item, item_changed = self._walk(item, state, top=False, text_mode=text_mode)
            items.append(new_item)
            changed = changed or item_changed
        return DataElement(tag, "SQ", Sequence(items)), changed

    def _fallback(self, elem: DataElement | RawDataElement, vr: str, text_mode: TextMode) -> Resolved | None:
        """Safety nets for attributes the table does not list (None: keep as is)."""
        if vr == "SQ":
            return Resolved("K", None, "unlisted sequence")
        if vr == "PN":
            return self._unlisted_pn
        if vr in ("DA", "DT"):
            return self._unlisted_date
        if vr == "UI":
            if self._retain_uids or _uid_attribute_is_class(int(elem.tag)):
                return None
            return self._unlisted_uid
        if vr in FREE_TEXT_VRS and text_mode == "scrub":
            return Resolved("C", "clean_structured_content", "free text in a cleaned sequence")
        return None

    def _copy(self, elem: DataElement | RawDataElement) -> DataElement | RawDataElement:
        if isinstance(elem, RawDataElement):
            return elem  # an immutable tuple: sharing it cannot mutate the input
        value = elem.value
        if isinstance(value, MultiValue):
            value = list(value)
        return DataElement(elem.tag, elem.VR, value)

    def _apply(
        self,
        ds: Dataset,
        elem: DataElement | RawDataElement,
        tag: int,
        vr: str,
        rule: Resolved,
        state: _Instance,
        text_mode: TextMode,
    ) -> tuple[DataElement | RawDataElement | None, bool]:
        if vr == "SQ":
            return self._apply_sequence(ds, tag, rule, state, text_mode)
        if rule.action == "C" and rule.basic is not None and not self._cleanable(tag, vr, rule):
            rule = Resolved(rule.basic, None, rule.name)
        action = rule.action
        if action == "K":
            return self._copy(elem), False
        if action == "C":
            value = ds[tag].value
        elif action in ("X", "Z") and vr not in _PHI_VRS and tag != _PATIENT_NAME:
            value = None  # not noted (not a PHI VR), not used: no need to decode it
        else:
            value = _fast_values(elem, vr)
            if value is None:
                value = ds[tag].value
        self._note(state, vr, value)
        if action == "X":
            return None, True
        if action == "Z":
            if tag == _PATIENT_NAME:
                return _new(tag, vr, state.patient_token), True
            empty = "" if isinstance(DUMMY_BY_VR.get(vr), str) else None
            return _new(tag, vr, empty), True
        if action == "U" or (action == "D" and vr == "UI"):
            if self._retain_uids:
                return self._copy(elem), False
            registered_kept = rule is self._unlisted_uid
            new_uids = [
                str(v)
                if registered_kept and str(v).startswith(_REGISTERED_ROOT)
                else self._pseudo.uid(str(v))
                for v in _values(value)
                if str(v).strip()
            ]
            return _new(tag, vr, _pack(new_uids)), True
        if action == "D":
            if tag in (_PATIENT_ID, _PATIENT_NAME):
                return _new(tag, vr, state.patient_token), True
            if not _values(value):
                return _new(tag, vr, value), False
            return _new(tag, vr, _dummy_value(tag, vr)), True
        return self._clean(tag, vr, value, rule, state)

    def _apply_sequence(
        self, ds: Dataset, tag: int, rule: Resolved, state: _Instance, text_mode: TextMode
    ) -> tuple[DataElement | None, bool]:
        # PS3.15 E.1.1: the action of a sequence applies to the sequence and all of its
        # contents, so X, Z and D win over the actions of the attributes inside.
        action = rule.action
        seq = ds[tag].value
        if action in ("X", "Z", "D"):
            for item in seq:  # what goes still feeds the egress guard
                self._note_all(item, state)
            if action == "X" and not self._type2_here(tag, state):
                return None, True
            if action in ("X", "Z") or not len(seq):
                return DataElement(tag, "SQ", Sequence([])), len(seq) > 0
            return DataElement(tag, "SQ", Sequence([self._dummy_item(seq[0])])), True
        mode: TextMode = "scrub" if action == "C" else text_mode
        items = []
        changed = False
        for item in seq:
            new_item, item_changed = self._walk(item, state, top=False, text_mode=mode)
            items.append(new_item)
            changed = changed or item_changed
        return DataElement(tag, "SQ", Sequence(items)), changed

    def _type2_here(self, tag: int, state: _Instance) -> bool:
        """Whether a sequence removed elsewhere is Type 2 in this instance's IOD."""
        prefixes = self._type2_in.get(tag)
        return prefixes is not None and state.sop_class.startswith(prefixes)

    def _dummy_item(self, item: Dataset) -> Dataset:
        """The one item of a D sequence: the first item's structure, none of its values.

        Every public attribute gets the dummy of its VR (a sequence inside: the same,
        recursively), UIDs their keyed UID (registered DICOM UIDs, and all UIDs under
        Retain UIDs, stay); code strings the table does not list keep their value (the
        enumerations the IOD constrains); private, command, meta and group length
        elements are dropped.
        """
        out = _empty_like(item)
        for elem in item.elements():
            tag = int(elem.tag)
            group = tag >> 16
            if group & 1 or tag & 0xFFFF == 0 or group in (0x0000, 0x0002):
                continue
            vr = _elem_vr(elem).split(" or ")[0]  # an ambiguous dictionary VR: its first
            if vr == "SQ":
                inner = item[tag].value
                dummies = [self._dummy_item(inner[0])] if len(inner) else []
                out[tag] = DataElement(tag, "SQ", Sequence(dummies))
            elif vr == "CS" and tag not in self._rules:
                out[tag] = self._copy(elem)  # an enumeration the IOD constrains, not identifying
            elif vr == "UI":
                uids = [str(v) for v in _values(item[tag].value) if str(v).strip()]
                new_uids = [
                    u if self._retain_uids or u.startswith(_REGISTERED_ROOT) else self._pseudo.uid(u)
                    for u in uids
                ]
                out[tag] = _new(tag, vr, _pack(new_uids))
            else:
                value = _dummy_value(tag, vr)
                if value is not None:
                    out[tag] = _new(tag, vr, value)
        return out

    def _note_all(self, ds: Dataset, state: _Instance) -> None:
        """Every identifying-looking value of content that goes, at any depth."""
        for elem in ds.elements():
            tag = int(elem.tag)
            if tag >> 16 & 1:
                if tag & 0xFFFF >= 0x0100 or tag & 0xFFFF < 0x0010:
                    self._note_raw_private(state, elem)
                continue
            vr = _elem_vr(elem)
            if vr == "SQ":
                for item in ds[tag].value:
                    self._note_all(item, state)
            elif vr == "UI":
                self._note(state, vr, [u for u in _values(ds[tag].value) if not str(u).startswith(_REGISTERED_ROOT)])
            elif vr in _PHI_VRS:
                self._note(state, vr, ds[tag].value)

    def _cleanable(self, tag: int, vr: str, rule: Resolved) -> bool:
        """Whether the option's clean means anything for this value."""
        if tag >> 16 in range(0x6000, 0x601F, 2) and tag & 0xFFFF == 0x3000:
            return True  # overlay bits are blanked
        if rule.option in _DATE_OPTIONS:
            return vr in _DATE_CLEANABLE_VRS
        return vr not in _BINARY_VRS

    def _clean(
        self, tag: int, vr: str, value: Any, rule: Resolved, state: _Instance
    ) -> tuple[DataElement | RawDataElement | None, bool]:
        option = rule.option
        if option in _DATE_OPTIONS:
            if vr in ("DA", "DT"):
                shifted = [shift_date(str(v), state.date_offset) for v in _values(value)]
                return _new(tag, vr, _pack(shifted)), True
            return _new(tag, vr, value), False  # times/zones: whole-day shift keeps them
        if vr == "AE":
            tokens = [self._pseudo.token("ae", str(v)) for v in _values(value)]
            return _new(tag, vr, _pack(tokens)), True
        if tag >> 16 in range(0x6000, 0x601F, 2) and tag & 0xFFFF == 0x3000:
            blank = bytes(len(value)) if isinstance(value, bytes) else b""
            return _new(tag, vr, blank), True  # clean graphics: geometry stays, bits go
        if vr in ("LO", "LT", "SH", "ST", "UC", "UT", "PN", "CS"):
            scrubber = state.scrubber or Scrubber(())
            cleaned = []
            for v in _values(value):
                text = str(v)
                new = scrubber.scrub(text)
                if vr == "CS" and new != text:
                    new = ""
                limit = MAX_LEN.get(vr)
                cleaned.append(new[:limit] if limit else new)
            return _new(tag, vr, _pack(cleaned)), cleaned != [str(v) for v in _values(value)]
        return _new(tag, vr, value), False

    def _file_meta(self, ds: Dataset, out: Dataset) -> None:
        meta = FileMetaDataset()
        src = getattr(ds, "file_meta", None)
        ts: UID | None = None
        if src is not None:
            ts = src.get("TransferSyntaxUID")
        if ts is None:
            implicit = ds.original_encoding[0]
            if implicit:
                ts = ImplicitVRLittleEndian
            else:
                ts = ExplicitVRLittleEndian
        # File Meta Information Version 00 01, as every writer adds it (PS3.10 7.1).
        meta[0x00020001] = RawDataElement(BaseTag(0x00020001), "OB", 2, b"\x00\x01", 0, False, True)
        meta[0x00020002] = _new(0x00020002, "UI", _uid_value(out, 0x00080016))
        meta[0x00020003] = _new(0x00020003, "UI", _uid_value(out, 0x00080018))
        meta[0x00020010] = _new(0x00020010, "UI", str(ts))
        meta[0x00020012] = _new(0x00020012, "UI", IMPLEMENTATION_UID)
        meta[0x00020013] = _new(0x00020013, "SH", IMPLEMENTATION_VERSION)
        # Every element above is pre-encoded ASCII, valid in explicit VR little endian (the
        # file meta encoding): marked as such, writers copy them instead of re-encoding.
        meta.set_original_encoding(False, True, default_encoding)
        out.file_meta = meta
        out.preamble = b"\x00" * 128

    def _stamp(self, out: Dataset, codes: Iterable[str]) -> None:
        store = dicomraw.elements(out)  # plain public elements: see _walk
        for tag, vr, value in (
            (0x00120062, "CS", "YES"),
            (0x00120063, "LO", self._method_text),
            (0x00280303, "CS", self._temporal),
        ):
            store[BaseTag(tag)] = _new(tag, vr, value)
        items = []
        encoding = out.original_encoding
        for code in codes:
            item = Dataset(parent_encoding=out.original_character_set)
            if None not in encoding:
                item.set_original_encoding(encoding[0], encoding[1], out.original_character_set)
            item_store = dicomraw.elements(item)
            item_store[BaseTag(0x00080100)] = _new(0x00080100, "SH", code)
            item_store[BaseTag(0x00080102)] = _new(0x00080102, "SH", "DCM")
            item_store[BaseTag(0x00080104)] = _new(0x00080104, "LO", CODE_MEANING[code])
            items.append(item)
        out[0x00120064] = _new(0x00120064, "SQ", Sequence(items))

    def _encrypt_originals(self, ds: Dataset, out: Dataset, state: _Instance) -> None:
        """E.1.1: original values of every changed top-level attribute, enveloped."""
        originals = Dataset()
        if "SpecificCharacterSet" in ds:
            originals.SpecificCharacterSet = ds.SpecificCharacterSet
        for tag in state.modified_tags:
            if tag in (_PIXEL_DATA, _ENCRYPTED_ATTRS):
                continue  # pixels are never stored twice; old envelopes are not nested
            elem = ds[tag]
            originals[tag] = DataElement(elem.tag, elem.VR, elem.value)
        wrapper = Dataset()
        wrapper.ModifiedAttributesSequence = Sequence([originals])
        buf = DicomBytesIO()
        buf.is_little_endian = True
        buf.is_implicit_VR = False
        with pydicom_config.disable_value_validation():
            write_dataset(buf, wrapper)
        content = envelope(buf.getvalue(), self._settings.recipients)
        item = Dataset()
        item.EncryptedContentTransferSyntaxUID = ExplicitVRLittleEndian
        item.EncryptedContent = content
        out.EncryptedAttributesSequence = Sequence([item])
