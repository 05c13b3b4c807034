"""Every row of the committed Table E.1-1 (agent/deid/table.json), applied.

For each row a small instance carries the attribute with a recognisable canary
value of its VR (a sequence: one code item with a canary code value, code
meaning and instance UID), in three places:

- ``top``: in the main data set;
- ``nested``: in the item of a sequence the table does not list (so it is kept
  and the profile applies inside it);
- ``private``: in the item of a private sequence. Without options the whole
  private block goes; with the Retain Safe Private Option the sequence is a safe
  one (Table E.3.10-1), so it stays and the profile applies inside it.

The engine runs in strip mode without options and with each option the row
names (and in encrypt mode at the top level), and the test asserts that the
row's action happened by its definition in PS3.15 E.1.1: X the attribute is
absent; Z it is present and empty (a sequence: zero items); D it holds a dummy
valid for its VR (a sequence: exactly one item carrying nothing of the
original); U a new UID (a sequence: every instance UID inside replaced); K the
original value; C a cleaned value. For a compound action (X/Z/D...) every
member the standard allows passes, but whatever was applied must leave nothing
of the original behind. Test ids name the attribute keyword, so a row the
engine mishandles fails by name.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
from dataclasses import dataclass
from typing import Any

import pydicom
import pytest
from cryptography import x509
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from agent.deid import Deidentifier, DeidSettings
from agent.deid.reidentify import reidentify
from agent.deid.rules import tag_int
from agent.deid.table import TABLE, ProfileRow
from tests.helpers.deid import KEY, Recipient

CT = "1.2.840.10008.5.1.4.1.1.2"
BASE_STUDY = "1.2.826.0.1.3680043.10.1077.60.1"
BASE_SOP = "1.2.826.0.1.3680043.10.1077.60.2"
KEPT_SEQ = 0x00082218  # Anatomic Region Sequence: not in Table E.1-1, so kept and walked
PRIVATE_CREATOR = "Philips Imaging DD 001"
PRIVATE_SEQ = 0x2001105F  # (2001,xx5F) Stack Sequence: a safe private sequence (Table E.3.10-1)
PRIVATE_CREATOR_TAG = 0x20010010
PRIVATE_SAFE_OPTION = "retain_safe_private"
TEXT_VRS = {"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"}
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
MASK_IDS = {"private": "PrivateAttributes", "60xx,3000": "OverlayData",
            "60xx,4000": "OverlayComments", "50xx,xxxx": "CurveData"}


def _label(row: ProfileRow) -> str:
    if row.tag in MASK_IDS:
        return MASK_IDS[row.tag]
    tag = tag_int(row.tag)
    assert tag is not None
    return keyword_for_tag(tag) or row.tag.replace(",", "")


def _vr(tag: int) -> str:
    return str(dictionary_VR(tag)).split(" or ")[0]  # "US or SS" -> US


# ----------------------------------------------------------------- the canaries

@dataclass(frozen=True)
class Canary:
    tag: int
    vr: str
    value: Any
    needles: tuple[bytes, ...]  # must not be in the output once the value is gone
    uid_needles: tuple[bytes, ...] = ()  # the instance UIDs among them

    @property
    def element(self) -> DataElement:
        return DataElement(self.tag, self.vr, self.value)


def _date(n: int) -> str:
    return (dt.date(1931, 1, 1) + dt.timedelta(days=7 * n + 3)).strftime("%Y%m%d")


def canary(n: int, tag: int) -> Canary:
    vr = _vr(tag)
    mark = f"CNY{n:03d}Q"
    if vr in TEXT_VRS:
        return Canary(tag, vr, mark, (mark.encode(),))
    if vr == "PN":
        return Canary(tag, vr, f"CNYFAM{n:03d}^CNYGIV{n:03d}",
                      (f"CNYFAM{n:03d}".encode(), f"CNYGIV{n:03d}".encode()))
    if vr == "UR":
        return Canary(tag, vr, f"http://cny{n:03d}q.example/", (f"cny{n:03d}q".encode(),))
    if vr == "DA":
        return Canary(tag, vr, _date(n), (_date(n).encode(),))
    if vr == "DT":
        return Canary(tag, vr, _date(n) + "101010", (_date(n).encode(),))
    if vr == "TM":
        return Canary(tag, vr, f"1347{n % 60:02d}.{n:03d}", ())
    if vr == "UI":
        uid = f"1.2.826.0.1.3680043.10.1077.61.{n}"
        return Canary(tag, vr, uid, (uid.encode(),), (uid.encode(),))
    if vr == "AS":
        return Canary(tag, vr, "077Y", ())
    if vr == "DS":
        return Canary(tag, vr, "4711.25", ())
    if vr == "IS":
        return Canary(tag, vr, "4711", ())
    if vr in ("US", "SS"):
        return Canary(tag, vr, 4711, ())
    if vr in ("UL", "SL", "UV", "SV"):
        return Canary(tag, vr, 471147, ())
    if vr in ("FL", "FD"):
        return Canary(tag, vr, 4711.5, ())
    if vr == "AT":
        return Canary(tag, vr, 0x00184711, ())
    if vr in BINARY_VRS:
        raw = f"CNYB{n:03d}Q".encode()
        return Canary(tag, vr, raw, (raw,))
    assert vr == "SQ", vr
    item = Dataset()
    item.CodeValue = f"CNV{n:03d}Q"
    item.CodingSchemeDesignator = "99CNY"
    item.CodeMeaning = f"St Elsewhere CNM{n:03d}Q"
    item.ReferencedSOPClassUID = CT
    uid = f"1.2.826.0.1.3680043.10.1077.62.{n}"
    item.ReferencedSOPInstanceUID = uid
    return Canary(tag, vr, Sequence([item]),
                  (f"CNV{n:03d}Q".encode(), f"CNM{n:03d}Q".encode(), uid.encode()), (uid.encode(),))


def _base() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = BASE_SOP
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = BASE_SOP
    ds.StudyInstanceUID = BASE_STUDY
    ds.Modality = "CT"
    return ds


def _kept_item() -> Dataset:
    item = Dataset()
    item.CodeValue = "T-D1100"  # not listed: stays, so the item stays
    item.CodingSchemeDesignator = "SRT"
    return item


def _private_seq(item: Dataset) -> Dataset:
    ds = _base()
    block = ds.private_block(PRIVATE_SEQ >> 16, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SEQ & 0xFF, "SQ", Sequence([item]))
    return ds


def build(n: int, row: ProfileRow, context: str) -> tuple[Dataset, Canary]:
    """An instance carrying row ``n``'s attribute in ``context``, and its canary."""
    tag = tag_int(row.tag)
    assert tag is not None
    c = canary(n, tag)
    if context == "top":
        ds = _base()
        if tag >> 16 == 0x0002:
            ds.file_meta[tag] = c.element  # file meta attributes live in the meta group
            if tag == 0x00020003:
                ds.SOPInstanceUID = c.value  # the two always agree in a valid file
        else:
            ds[tag] = c.element
        return ds, c
    item = _kept_item()
    item[tag] = c.element
    if context == "nested":
        ds = _base()
        ds[KEPT_SEQ] = DataElement(KEPT_SEQ, "SQ", Sequence([item]))
        return ds, c
    assert context == "private"
    return _private_seq(item), c


# ------------------------------------------------------------------- the checks

def _empty(value: Any) -> bool:
    return value is None or value in ("", b"") or (isinstance(value, list | MultiValue) and not value)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | MultiValue) else [value]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b)
    return str(a) == str(b)


def _leaks(data: bytes, needles: tuple[bytes, ...]) -> list[bytes]:
    upper = data.upper()
    return [n for n in needles if n.upper() in upper]


def check(action: str, c: Canary, holder: Dataset | None, data: bytes, options: frozenset[str]) -> str | None:
    """None when the output shows ``action`` applied to the canary, else what is wrong."""
    elem = holder.get(c.tag) if holder is not None else None
    gone = _leaks(data, c.needles)
    if action == "X":
        if elem is not None:
            return f"X: still present: {elem!r}"
        return f"X: original content still in the output: {gone}" if gone else None
    if elem is None:
        return f"{action}: absent"
    value = elem.value
    if action == "Z":
        if c.vr == "SQ":
            return None if len(value) == 0 and not gone else f"Z: sequence not emptied: {elem!r}"
        # Z allows a zero-length or a dummy value; Patient's Name gets the patient token
        if not _empty(value) and _same(value, c.value):
            return f"Z: still the original: {elem!r}"
        return f"Z: original content still in the output: {gone}" if gone else None
    if action == "D":
        if c.vr == "SQ":
            if len(value) != 1:
                return f"D: a dummy sequence holds exactly one item, not {len(value)}: {elem!r}"
            return f"D: the dummy item carries the original: {gone}" if gone else None
        if _empty(value):
            return f"D: empty, not a dummy: {elem!r}"
        if _same(value, c.value):
            return f"D: still the original: {elem!r}"
        for v in _values(value):
            try:
                validate_value(c.vr, v, pydicom_config.RAISE)
            except (ValueError, TypeError) as exc:
                return f"D: dummy {v!r} is not valid for {c.vr}: {exc}"
        return f"D: original content still in the output: {gone}" if gone else None
    if action == "U":
        uid_leaks = _leaks(data, c.uid_needles)
        if uid_leaks:
            return f"U: original UID still in the output: {uid_leaks}"
        if c.vr == "SQ":
            if not len(value):
                return f"U: the sequence lost its items: {elem!r}"
            uids = [str(i.get("ReferencedSOPInstanceUID", "")) for i in value]
            return None if all(u.startswith("2.25.") for u in uids) else f"U: UIDs inside not replaced: {uids}"
        uids = [str(v) for v in _values(value)]
        if not uids or not all(u.startswith("2.25.") for u in uids):
            return f"U: not a keyed UID: {elem!r}"
        return None
    if action == "K":
        if c.vr == "SQ":
            if len(value) != 1 or value[0].get("CodeMeaning") != c.value[0].CodeMeaning:
                return f"K: sequence content not kept: {elem!r}"
            ref = str(value[0].get("ReferencedSOPInstanceUID", ""))
            want_uid = c.value[0].ReferencedSOPInstanceUID
            if "retain_uids" in options:
                return None if ref == want_uid else f"K: UID inside not retained: {ref}"
            # keeping a sequence still applies the profile inside it (UIDs are remapped)
            return None if ref.startswith("2.25.") else f"K: UID inside the kept sequence not keyed: {ref}"
        return None if _same(value, c.value) else f"K: not kept: {elem!r}"
    assert action == "C", action
    if c.vr in ("DA", "DT"):  # dates are cleaned by shifting them
        if _empty(value) or _same(value, c.value) or gone:
            return f"C: date not shifted: {elem!r}"
    return None


def allowed(row: ProfileRow, options: frozenset[str], vr: str) -> set[str]:
    """The actions PS3.15 allows for the row under the chosen options.

    An option's C wins over an option's K (the more protective of two options);
    a compound action allows each of its members (X/Z/U*: X, Z or U). A binary
    value (OB, OW, UN...) has no cleaned form, so C there must fall back to the
    row's basic action (docs/deid.md).
    """
    basic = set(row.basic.replace("*", "").split("/"))
    chosen = {act for opt, act in row.options if opt in options}
    if "C" in chosen:
        return basic if vr in BINARY_VRS else {"C"}
    if "K" in chosen:
        return {"K"}
    return basic


# ------------------------------------------------------------------ the engines

@functools.cache
def engine(options: frozenset[str]) -> Deidentifier:
    return Deidentifier(DeidSettings(options=options), KEY)


@functools.cache
def encrypt_engine(cert: x509.Certificate) -> Deidentifier:
    return Deidentifier(DeidSettings(mode="encrypt", recipients=(cert,)), KEY)


def run(engine_: Deidentifier, ds: Dataset) -> tuple[Dataset, bytes]:
    outcome = engine_.deidentify(ds)
    assert outcome.dataset is not None, outcome.quarantine_reason
    buf = io.BytesIO()
    outcome.dataset.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return pydicom.dcmread(io.BytesIO(data)), data  # as a receiver reads it


def _holder(out: Dataset, tag: int, context: str) -> Dataset | None:
    if context == "top":
        return out.file_meta if tag >> 16 == 0x0002 else out
    outer = KEPT_SEQ if context == "nested" else PRIVATE_SEQ
    if outer not in out:
        return None
    assert len(out[outer].value) == 1, "the kept sequence lost its item"
    item: Dataset = out[outer].value[0]
    return item


def assert_row(row: ProfileRow, c: Canary, out: Dataset, data: bytes, context: str,
               options: frozenset[str]) -> None:
    actions = allowed(row, options, c.vr)
    group = c.tag >> 16
    if group == 0x0000 or (group == 0x0002 and context != "top"):
        # command elements never belong in a data set, nor file meta elements in an
        # item: they are dropped wherever they are (docs/deid.md, "Beyond the table")
        actions = {"X"}
    holder = _holder(out, c.tag, context)
    problems = {a: check(a, c, holder, data, options) for a in sorted(actions)}
    assert any(p is None for p in problems.values()), (
        f"{row.tag} {row.name} ({row.basic}, {context}, options {sorted(options)}): "
        + "; ".join(f"{p}" for p in problems.values())
    )


# -------------------------------------------------------------------- the cases

def _cases() -> list[Any]:
    cases = []
    for n, row in enumerate(TABLE.rows):
        label = _label(row)
        contexts = ("top", "nested") if row.tag in MASK_IDS else ("top", "nested", "private")
        for context in contexts:
            if context == "private":
                option_sets: list[str | None] = [None, PRIVATE_SAFE_OPTION]
            else:
                option_sets = [None, *(o for o, _ in row.options)]
            for option in option_sets:
                cases.append(pytest.param(n, context, option, id=f"{label}-{context}-{option or 'basic'}"))
    return cases


CASES = _cases()


def test_every_row_has_cases() -> None:
    assert len({c.values[0] for c in CASES}) == len(TABLE.rows) == 621


@pytest.mark.parametrize(("n", "context", "option"), CASES)
def test_row_action_is_applied(n: int, context: str, option: str | None) -> None:
    row = TABLE.rows[n]
    options = frozenset({option}) if option else frozenset()
    if row.tag in MASK_IDS:
        _check_mask(n, row, context, options)
        return
    ds, c = build(n, row, context)
    out, data = run(engine(options), ds)
    if context == "private" and option is None:
        # no option keeps a private attribute: the whole private sequence goes
        assert PRIVATE_SEQ not in out and PRIVATE_CREATOR_TAG not in out
        assert _leaks(data, c.needles) == [], f"{row.name} inside a private sequence leaked"
        return
    if context == "private":  # the safe private sequence stays; the profile applies inside
        assert PRIVATE_SEQ in out and out[PRIVATE_CREATOR_TAG].value == PRIVATE_CREATOR
    assert_row(row, c, out, data, context, options)


@pytest.mark.parametrize(
    "n", [pytest.param(n, id=_label(r)) for n, r in enumerate(TABLE.rows) if r.tag not in MASK_IDS]
)
def test_row_action_in_encrypt_mode_keeps_the_original_for_the_recipient(
    n: int, recipient: Recipient
) -> None:
    row = TABLE.rows[n]
    ds, c = build(n, row, "top")
    out, data = run(encrypt_engine(recipient.cert), ds)
    assert "EncryptedAttributesSequence" in out
    assert_row(row, c, out, data, "top", frozenset())
    if c.tag >> 16 in (0x0000, 0x0002):
        # the meta group is rebuilt from the data set; command elements cannot be
        # stored in one: neither is enveloped
        return
    back = reidentify(out, recipient.key)
    assert c.tag in back, f"{row.name}: original not in the Encrypted Attributes Sequence"
    restored = back[c.tag].value
    if c.vr == "SQ":
        assert restored[0].CodeMeaning == c.value[0].CodeMeaning
    else:
        assert _same(restored, c.value)


# ------------------------------------------------------------------------ masks

def _mask_dataset(n: int, row: ProfileRow) -> tuple[Dataset, tuple[bytes, ...]]:
    """Elements for a mask row, in a fresh data set (to be placed top or nested)."""
    ds = Dataset()
    mark = f"CNY{n:03d}Q"
    if row.tag == "private":
        ds.add_new(0x00090010, "LO", "CNYCREATOR")
        ds.add_new(0x00091001, "LO", mark)
        ds.add_new(0x70530010, "LO", "Philips PET Private Group")
        ds.add_new(0x70531000, "DS", "1.5")  # safe (Table E.3.10-1): SUV factor
        return ds, (mark.encode(), b"CNYCREATOR")
    if row.tag == "50xx,xxxx":
        ds.add_new(0x50000022, "LO", mark)
        ds.add_new(0x50003000, "OB", b"CNYCURVE")
        return ds, (mark.encode(), b"CNYCURVE")
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"CNYBITS\x00")
    ds.add_new(0x60004000, "LT", mark)
    return ds, (b"CNYBITS", mark.encode()) if row.tag == "60xx,3000" else (mark.encode(),)


def _check_mask(n: int, row: ProfileRow, context: str, options: frozenset[str]) -> None:
    elems, needles = _mask_dataset(n, row)
    ds = _base()
    if context == "top":
        for e in elems:
            ds[e.tag] = e
    else:
        item = _kept_item()
        for e in elems:
            item[e.tag] = e
        ds[KEPT_SEQ] = DataElement(KEPT_SEQ, "SQ", Sequence([item]))
    out, data = run(engine(options), ds)
    holder = out if context == "top" else out[KEPT_SEQ].value[0]
    (act,) = allowed(row, options, "")
    where = f"{row.name} ({context}, options {sorted(options)})"
    if row.tag == "private":
        assert 0x00091001 not in holder and 0x00090010 not in holder, where
        assert _leaks(data, needles) == [], where
        if act == "C":  # only the safe attribute stays, with its creator
            assert holder[0x70531000].value == "1.5" and 0x70530010 in holder, where
        else:
            assert 0x70531000 not in holder, where
    elif row.tag == "50xx,xxxx":
        # curves are retired; the engine removes them even with Clean Graphics (docs/deid.md)
        assert not any(e.tag >> 16 == 0x5000 for e in holder), where
        assert _leaks(data, needles) == [], where
    elif act == "X":
        if row.tag == "60xx,3000":  # without its data the overlay module goes as a whole
            assert not any(e.tag >> 16 == 0x6000 for e in holder), where
        else:
            assert 0x60004000 not in holder, where
        assert _leaks(data, needles) == [], where
    elif row.tag == "60xx,3000":
        assert set(holder[0x60003000].value) == {0}, where  # the bits blanked
        assert holder[0x60000010].value == 8, where  # the geometry kept
    else:
        assert 0x60004000 in holder, where
