"""The de-identification engine: PS3.15 Annex E applied to one instance.

Elements are walked in the raw form pydicom read them in: an attribute the
profile keeps is copied without being decoded (pixel data is never copied or
decoded unless a pixel-clean rule needs it), so only attributes that change
cost anything.  Lookups are precomputed per option set at construction.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom import config as pydicom_config
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.deid import burnedin
from agent.deid.envelope import envelope
from agent.deid.pseudonym import Pseudonymizer
from agent.deid.rules import CODE_MEANING, OPTION_TEXT, Resolved, resolve, tag_int
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

TextMode = Literal["keep", "dummy", "scrub"]
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
# X/Z sequences: an empty Type 3 sequence is invalid (1-n items), so they are removed,
# except those that are Type 2 in the IODs that carry them.
_TYPE2_SEQUENCES = frozenset({0x00400555})  # Acquisition Context Sequence
# Type 1C attributes whose condition is another attribute the profile removes.
_CONDITIONAL_ON = {0x00120081: 0x00120082}  # Ethics Committee Name <- Approval Number
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
    elem = ds._dict.get(BaseTag(tag))
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

    __slots__ = ("date_offset", "modified_tags", "patient_token", "phi", "scrubber")

    def __init__(self, patient_token: str, date_offset: int) -> None:
        self.phi: set[str] = set()
        self.scrubber: Scrubber | None = None
        self.date_offset = date_offset
        self.patient_token = patient_token
        self.modified_tags: list[int] = []


class Deidentifier:
    """Applies the configured profile; one instance per settings and key."""

    def __init__(self, settings: DeidSettings, pseudonym_key: bytes) -> None:
        settings.validate()
        self._settings = settings
        self._pseudo = Pseudonymizer(pseudonym_key)
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
        self._remove_not_empty: frozenset[int] = frozenset(
            tag
            for row in TABLE.rows
            if row.basic == "X/Z"
            and (tag := tag_int(row.tag)) is not None
            and _vr_of(tag) == "SQ"
            and tag not in _TYPE2_SEQUENCES
        )
        self._unlisted_pn = Resolved("D", None, "person name not listed in Table E.1-1")
        self._unlisted_uid = Resolved("U", None, "UID not listed in Table E.1-1")
        self._overlay_text = Resolved("C", "clean_graphics", "overlay text")
        self._safe_private: frozenset[tuple[int, int, str]] = frozenset()
        if self._private.action == "C":
            self._safe_private = frozenset((s.group, s.element_low, s.creator) for s in TABLE.safe_private)
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
        return f"PS3.15 E.1-1 Basic Profile ({TABLE.edition}) {self._settings.mode}; options: {opts}"

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
        state = _Instance(patient_ref, self._pseudo.date_offset_days(patient_identity))
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
        for dependent, condition in _CONDITIONAL_ON.items():
            if dependent in out and condition not in out:
                del out[dependent]
                state.modified_tags.append(dependent)
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
        # An item keeps its parent's character set (what pydicom's reader gave the source
        # item), so its original and current character sets agree and the writer can copy it.
        out = Dataset(parent_encoding=ds._parent_encoding)
        if None not in ds.original_encoding:
            # Same encoding as the source lets pydicom write kept raw elements verbatim.
            implicit, little = ds.original_encoding
            out.set_original_encoding(implicit, little, ds.original_character_set)
        changed = False
        kept_creators: set[int] = set()
        # Plain public elements go straight into the element dict: Dataset.__setitem__
        # only adds private-creator and sequence bookkeeping, which these do not need,
        # and it is the largest per-element cost of a walk.
        store = out._dict
        for elem in ds.elements():
            tag = int(elem.tag)
            group = tag >> 16
            number = tag & 0xFFFF
            if group & 1:
                if self._private_kept(ds, group, number, kept_creators):
                    out[tag] = self._copy(elem)
                else:
                    if number >= 0x0100 or number < 0x0010:
                        self._note_raw_private(state, elem)
                    changed = True
                    if top:
                        state.modified_tags.append(tag)
                continue
            if number == 0 or group == 0x0002:
                continue  # group lengths (and stray meta elements) are rebuilt or obsolete
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

    def _private_kept(self, ds: Dataset, group: int, number: int, creators: set[int]) -> bool:
        if not self._safe_private or group <= 0x0007 or group == 0xFFFF or number < 0x1000:
            return False
        creator_tag = (group << 16) | (number >> 8)
        if creator_tag not in ds:
            return False
        creator = ds[creator_tag].value
        if isinstance(creator, bytes):
            creator = creator.decode("latin-1")
        key = (group, number & 0xFF, str(creator).strip())
        if key in self._safe_private:
            creators.add(creator_tag)
            return True
        return False

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
        if vr in FREE_TEXT_VRS and text_mode != "keep":
            if text_mode == "dummy":
                return Resolved("D", None, "free text in a replaced sequence")
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
        action = rule.action
        if vr == "SQ":
            return self._apply_sequence(ds, tag, rule, state, text_mode)
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
            return _new(tag, vr, DUMMY_BY_VR.get(vr, None)), True
        return self._clean(tag, vr, value, rule, state)

    def _apply_sequence(
        self, ds: Dataset, tag: int, rule: Resolved, state: _Instance, text_mode: TextMode
    ) -> tuple[DataElement | None, bool]:
        action = rule.action
        seq = ds[tag].value
        if action == "X":
            for item in seq:  # removed content still feeds the egress guard
                self._walk(item, state, top=False, text_mode="keep")
            return None, True
        if action == "Z":
            for item in seq:
                self._walk(item, state, top=False, text_mode="keep")
            if tag in self._remove_not_empty:
                return None, True
            return DataElement(tag, "SQ", Sequence([])), len(seq) > 0
        mode: TextMode = text_mode
        if action == "D":
            mode = "dummy"
        elif action == "C":
            mode = "scrub"
        items = []
        changed = False
        for item in seq:
            new_item, item_changed = self._walk(item, state, top=False, text_mode=mode)
            items.append(new_item)
            changed = changed or item_changed
        return DataElement(tag, "SQ", Sequence(items)), changed

    def _clean(
        self, tag: int, vr: str, value: Any, rule: Resolved, state: _Instance
    ) -> tuple[DataElement | RawDataElement | None, bool]:
        option = rule.option
        if option in _DATE_OPTIONS:
            if vr in ("DA", "DT"):
                shifted = [shift_date(str(v), state.date_offset) for v in _values(value)]
                return _new(tag, vr, _pack(shifted)), True
            if vr in ("TM", "SH", "LO", "CS"):
                return _new(tag, vr, value), False  # times/zones: whole-day shift keeps them
            return None, True
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
        if vr in ("OB", "OW", "UN"):
            return None, True  # binary content cannot be cleaned, so it goes
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
        store = out._dict  # plain public elements: see _walk
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
            item_store = item._dict
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
