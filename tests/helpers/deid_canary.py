"""PHI-canary corpus: pydicom sample files with a unique marker in every attribute
Table E.1-1 touches, in nested and private sequences (incl. private sequences
read as UN), overlays, curves, SR content, the file meta group and the preamble.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from agent.deid.rules import tag_int
from agent.deid.table import TABLE
from tests.helpers.deid import sample_path

STUDY_UID = "1.2.826.0.1.3680043.10.1077.1.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1077.1.2"
FOR_UID = "1.2.826.0.1.3680043.10.1077.1.3"
PATIENT_ID = "PIDMK4711Q"
PATIENT_NAME = "CANARYFAMILY^CANARYGIVEN"
SAFE_CREATOR = "Philips PET Private Group"
_SKIP = {0x0020000D, 0x0020000E, 0x00080018, 0x00200052, 0x00100010, 0x00100020}
_SKIP_GROUPS = {0x0000, 0x0002, 0x0028, 0x7FE0}
TEXT_VRS = {"AE", "CS", "LO", "SH", "ST", "LT", "UT", "UC", "PN"}


def sop_uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.10.1077.2.{i}"


@dataclass
class Canary:
    dataset: FileDataset
    text: dict[str, str] = field(default_factory=dict)  # marker -> where
    uids: dict[str, str] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)
    binary: dict[bytes, str] = field(default_factory=dict)


def _marker(i: int, n: int) -> str:
    return f"MK{i:02d}{n:04d}Q"


def _item(c: Canary, i: int, n: int, where: str) -> Dataset:
    item = Dataset()
    name = f"NEST{i:02d}{n:04d}Q"
    comment = f"CMT{i:02d}{n:04d}Q"
    uid = f"1.2.826.0.1.3680043.10.1077.9.{i}.{n}"
    item.PatientName = name
    item.ImageComments = comment
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = uid
    c.text[name] = f"{where} > PatientName"
    c.text[comment] = f"{where} > ImageComments"
    c.uids[uid] = f"{where} > ReferencedSOPInstanceUID"
    return item


def _date(i: int, n: int) -> str:
    return (dt.date(1931, 1, 1) + dt.timedelta(days=i * 1500 + n)).strftime("%Y%m%d")


def build(i: int, *, base: str = "CT_small.dcm") -> Canary:
    ds = pydicom.dcmread(sample_path(base))
    assert isinstance(ds, FileDataset)
    c = Canary(ds)
    for n, row in enumerate(TABLE.rows):
        tag = tag_int(row.tag)
        if tag is None or tag in _SKIP or tag >> 16 in _SKIP_GROUPS:
            continue
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            continue
        where = f"{row.tag} {row.name}"
        marker = _marker(i, n)
        if vr in TEXT_VRS:
            ds[tag] = DataElement(tag, vr, marker)
            c.text[marker] = where
        elif vr == "UR":
            ds[tag] = DataElement(tag, vr, f"http://{marker.lower()}.example/")
            c.text[marker] = where
        elif vr in ("DA", "DT"):
            value = _date(i, n)
            ds[tag] = DataElement(tag, vr, value if vr == "DA" else value + "101010")
            c.dates[value] = where
        elif vr == "UI":
            uid = f"1.2.826.0.1.3680043.10.1077.3.{i}.{n}"
            ds[tag] = DataElement(tag, vr, uid)
            c.uids[uid] = where
        elif vr == "SQ":
            ds[tag] = DataElement(tag, vr, Sequence([_item(c, i, n, where)]))
        elif vr in ("OB", "OW", "UN"):
            raw = f"BIN{marker}".encode()
            ds[tag] = DataElement(tag, vr, raw)
            c.binary[raw] = where
    # identity shared by the whole study (consistency checks)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "ISSUERMKQ"  # the same patient in every instance
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FOR_UID
    ds.SOPInstanceUID = sop_uid(i)
    ds.InstanceNumber = i + 1
    ds.BurnedInAnnotation = "NO"
    c.text["CANARYFAMILY"] = "PatientName"
    c.text["CANARYGIVEN"] = "PatientName"
    c.text[PATIENT_ID] = "PatientID"
    c.text["ISSUERMKQ"] = "IssuerOfPatientID"
    for u, w in ((STUDY_UID, "StudyInstanceUID"), (SERIES_UID, "Series"), (FOR_UID, "FoR")):
        c.uids[u] = w
    c.uids[sop_uid(i)] = "SOPInstanceUID"
    # a real cross-reference to the previous instance of the series
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = sop_uid(max(i - 1, 0))
    ds.ReferencedImageSequence = Sequence([ref])
    # descriptors quoting identifiers (what Clean Descriptors must take out)
    ds.StudyDescription = f"CT HEAD for CANARYFAMILY {PATIENT_ID}"
    ds.SeriesDescription = f"AXIAL {_date(i, 9999)} CANARYGIVEN"
    # SR-style content with free text, a name, a date and a UID
    content = []
    for vt, kw, value in (
        ("TEXT", "TextValue", f"SRTEXT{i:02d}Q said CANARYFAMILY"),
        ("PNAME", "PersonName", f"SRNAME{i:02d}Q"),
        ("DATE", "Date", _date(i, 9000)),
        ("UIDREF", "UID", f"1.2.826.0.1.3680043.10.1077.4.{i}"),
    ):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = vt
        code = Dataset()
        code.CodeValue = "121106"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Comment"
        item.ConceptNameCodeSequence = Sequence([code])
        setattr(item, kw, value)
        content.append(item)
    ds.ContentSequence = Sequence(content)
    c.text[f"SRTEXT{i:02d}Q"] = "ContentSequence > TextValue"
    c.text[f"SRNAME{i:02d}Q"] = "ContentSequence > PersonName"
    c.dates[_date(i, 9000)] = "ContentSequence > Date"
    c.uids[f"1.2.826.0.1.3680043.10.1077.4.{i}"] = "ContentSequence > UID"
    # overlay and curve groups
    rows, cols = int(ds.Rows), int(ds.Columns)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    bits = f"OVLBITS{i:02d}Q".encode()
    ds.add_new(0x60003000, "OW", bits + bytes(rows * cols // 8 - len(bits)))
    ds.add_new(0x60000022, "LO", f"OVLDESC{i:02d}Q CANARYFAMILY")
    ds.add_new(0x60001500, "LO", f"OVLLABEL{i:02d}Q")
    ds.add_new(0x60004000, "LT", f"OVLCMT{i:02d}Q")
    ds.add_new(0x50000022, "LO", f"CURVEDESC{i:02d}Q")
    ds.add_new(0x50003000, "OB", f"CURVEDAT{i:02d}Q".encode())
    c.binary[bits] = "OverlayData"
    c.binary[f"CURVEDAT{i:02d}Q".encode()] = "CurveData"
    for m, w in (
        (f"OVLDESC{i:02d}Q", "OverlayDescription"),
        (f"OVLLABEL{i:02d}Q", "OverlayLabel"),
        (f"OVLCMT{i:02d}Q", "OverlayComments"),
        (f"CURVEDESC{i:02d}Q", "CurveDescription"),
    ):
        c.text[m] = w
    # private block with a creator, text, binary and a private sequence
    ds.add_new(0x00090010, "LO", "MKCREATOR PRIV")
    ds.add_new(0x00091001, "LO", f"PRIVLO{i:02d}Q")
    ds.add_new(0x00091002, "OB", f"PRIVOB{i:02d}Q".encode())
    priv_item = Dataset()
    priv_item.PatientName = f"PRIVSEQ{i:02d}Q"
    ds.add_new(0x00091003, "SQ", Sequence([priv_item]))
    c.text["MKCREATOR"] = "private creator"
    c.text[f"PRIVLO{i:02d}Q"] = "private LO"
    c.binary[f"PRIVOB{i:02d}Q".encode()] = "private OB"
    c.text[f"PRIVSEQ{i:02d}Q"] = "private sequence (read as UN) > PatientName"
    # a safe private attribute (Table E.3.10-1) and an unsafe one in the same block
    ds.add_new(0x70530010, "LO", SAFE_CREATOR)
    ds.add_new(0x70531000, "DS", "1.5")
    ds.add_new(0x70531077, "LO", f"PRIVUNSAFE{i:02d}Q")
    c.text[f"PRIVUNSAFE{i:02d}Q"] = "unsafe private in a safe block"
    # file meta and preamble
    ds.file_meta.SourceApplicationEntityTitle = f"FMSRC{i:02d}Q"
    ds.file_meta.PrivateInformationCreatorUID = UID(f"1.2.826.0.1.3680043.10.1077.5.{i}")
    ds.file_meta.PrivateInformation = f"FMPRIV{i:02d}Q".encode()
    ds.preamble = f"PREAMBLE{i:02d}Q".encode().ljust(128, b"\0")
    c.text[f"FMSRC{i:02d}Q"] = "file meta SourceApplicationEntityTitle"
    c.uids[f"1.2.826.0.1.3680043.10.1077.5.{i}"] = "file meta PrivateInformationCreatorUID"
    c.binary[f"FMPRIV{i:02d}Q".encode()] = "file meta PrivateInformation"
    c.binary[f"PREAMBLE{i:02d}Q".encode()] = "preamble"
    c.dataset = _private_sequences_as_un(ds)
    return c


def _private_sequences_as_un(ds: FileDataset) -> FileDataset:
    """Round-trip through implicit VR so the private sequence comes back as UN bytes,
    as it does from a modality that sent implicit VR, then store as explicit VR."""
    preamble = ds.preamble
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(BytesIO(buf.getvalue()))
    back.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    back[0x50003000].VR = "OB"  # implicit VR cannot say OB or OW
    buf = BytesIO()
    back.save_as(buf, enforce_file_format=True)
    out = pydicom.dcmread(BytesIO(buf.getvalue()))
    out.preamble = preamble
    assert isinstance(out, FileDataset)
    return out


def to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def leaks(c: Canary, data: bytes, *, dates: bool = True) -> list[str]:
    upper = data.upper()
    found = [f"{m} ({w})" for m, w in c.text.items() if m.upper().encode() in upper]
    found += [f"{u} ({w})" for u, w in c.uids.items() if u.encode() in data]
    found += [f"{b!r} ({w})" for b, w in c.binary.items() if b in data]
    if dates:
        found += [f"{d} ({w})" for d, w in c.dates.items() if d.encode() in data]
    return found
