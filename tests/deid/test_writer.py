"""agent.deid.writer writes exactly the bytes of pydicom's save_as(enforce_file_format=True):
on de-identified outputs (every option set, strip and encrypt, the canary corpus and every
sample file) and on the sample files as read (implicit/explicit VR, big endian, deflated,
encapsulated pixel data, undefined-length sequences and items, group lengths, odd values)."""

from __future__ import annotations

import copy
import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from agent.deid import OPTIONS, Deidentifier, DeidSettings, writer
from agent.errors import DeidError
from tests.deid.test_deid_samples import FILES
from tests.helpers import deid_canary as dc
from tests.helpers.deid import KEY, Recipient


def _pydicom(ds: Dataset) -> bytes | str:
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 -- compared with the writer's behaviour
        return f"raises {type(exc).__name__}"
    return buf.getvalue()


def _ours(ds: Dataset) -> bytes | str | None:
    try:
        return writer.encode(ds)
    except Exception as exc:  # noqa: BLE001
        return f"raises {type(exc).__name__}"


def _same_bytes(ds: Dataset) -> bool:
    """Our bytes == pydicom's for two independent copies of ``ds``; True when the fast
    path wrote them, False when it handed the dataset to pydicom."""
    theirs_ds = copy.deepcopy(ds)
    ours = _ours(ds)
    theirs = _pydicom(theirs_ds)
    if ours is None:
        return False
    if isinstance(theirs, str):  # pydicom refuses it: so must we (in some way)
        assert isinstance(ours, str), theirs
        return True
    assert ours == theirs
    return True


def test_sample_files_as_read_are_written_byte_identical() -> None:
    fast = total = 0
    for path in FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                list(ds)  # a lazily failing read fails here
            except Exception:  # noqa: BLE001 -- malformed sample files are not our input
                continue
            total += 1
            fast += _same_bytes(ds)
    assert total > 100
    assert fast > total // 2  # the fast path is really exercised


@pytest.mark.parametrize(
    "options",
    [
        frozenset(),
        frozenset(OPTIONS) - {"retain_longitudinal_full_dates"},
        frozenset(OPTIONS) - {"retain_longitudinal_modified_dates", "retain_uids"},
    ],
)
def test_deidentified_sample_files_are_written_byte_identical(options: frozenset[str]) -> None:
    engine = Deidentifier(DeidSettings(options=options), KEY)
    fast = total = slow = 0
    for path in FILES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                list(ds)
            except Exception:  # noqa: BLE001
                continue
            try:
                outcome = engine.deidentify(ds)
            except DeidError:
                continue
            if outcome.dataset is None:
                continue
            total += 1
            ts = outcome.dataset.file_meta.TransferSyntaxUID
            slow += ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
            fast += _same_bytes(outcome.dataset)
    assert total > 80
    assert fast == total - slow  # every other output takes the fast path


@pytest.mark.parametrize("mode", ["strip", "encrypt"])
def test_canary_outputs_byte_identical_and_leak_free(mode: str, recipient: Recipient) -> None:
    settings = DeidSettings(
        mode="encrypt" if mode == "encrypt" else "strip",
        recipients=(recipient.cert,) if mode == "encrypt" else (),
    )
    for options in (frozenset(), frozenset(OPTIONS) - {"retain_longitudinal_full_dates"}):
        engine = Deidentifier(DeidSettings(mode=settings.mode, recipients=settings.recipients, options=options), KEY)
        for i in range(3):
            c = dc.build(i)
            out = engine.deidentify(c.dataset).dataset
            assert out is not None
            assert _same_bytes(out)
            data = writer.encode(out)
            assert data is not None
            if not options:
                assert dc.leaks(c, data) == []


def test_save_writes_the_file(tmp_path: Path) -> None:
    c = dc.build(0)
    out = Deidentifier(DeidSettings(), KEY).deidentify(c.dataset).dataset
    assert out is not None
    expected = _pydicom(copy.deepcopy(out))
    writer.save(out, tmp_path / "a.dcm")
    assert (tmp_path / "a.dcm").read_bytes() == expected
    assert writer.instance_uid(out) == str(out.SOPInstanceUID)


def _from_scratch(ts: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["writer-test"])  # differs from the meta
    ds.StudyInstanceUID = "1.2.3.5"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"  # not ASCII: pydicom encodes it
    ds.PatientID = "ODD"  # odd length: padded
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.add_new(0x00291010, "OB", b"\x01\x02\x03")  # odd OB: padded with NUL
    ds.StudyComments = "x" * 70000  # LT over 64 KiB: pydicom writes UN (with a warning)
    item = Dataset()
    item.CodeValue = "1"
    item.is_undefined_length_sequence_item = True
    seq = DataElement(0x00081032, "SQ", Sequence([item, Dataset()]), is_undefined_length=True)
    ds[0x00081032] = seq
    ds.ReferencedImageSequence = Sequence([])
    ds.PixelData = b"\x00\x01" * 4
    ds.add_new(0x00080000, "UL", 0)  # a retired group length: never written
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_built_datasets_and_their_reread_copies(ts: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _same_bytes(_from_scratch(ts)) is (ts != ExplicitVRBigEndian)
        if ts == ExplicitVRBigEndian:
            assert writer.encode(_from_scratch(ts)) is None  # pydicom's own path
            return
        data = _pydicom(_from_scratch(ts))
        assert isinstance(data, bytes)
        again = pydicom.dcmread(io.BytesIO(data))
        assert _same_bytes(again)  # raw elements, undefined-length items, UN from LT
        for options in (frozenset(), frozenset(OPTIONS) - {"retain_longitudinal_full_dates"}):
            out = Deidentifier(DeidSettings(options=options), KEY).deidentify(
                pydicom.dcmread(io.BytesIO(data))
            ).dataset
            assert out is not None and _same_bytes(out)


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def test_odd_length_and_padded_raw_values_are_copied_as_pydicom_copies_them() -> None:
    """A sender's odd-length or space-padded values stay as read (pydicom copies raw
    values verbatim); the meta's UIDs follow the dataset's as dcmwrite makes them."""
    body = b"".join(
        [
            _explicit(0x00080016, b"UI", CTImageStorage.encode() + b" "),  # space-padded UID
            _explicit(0x00080018, b"UI", b"1.2.3.45"),
            _explicit(0x00100020, b"LO", b"ODD"),  # odd length, as sent
            _explicit(0x00200010, b"SH", b"  S1 "),
        ]
    )
    meta = b"".join(
        [
            _explicit(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00"),
            _explicit(0x00020003, b"UI", b"1.2.3.4\x00"),  # differs from the dataset's
            _explicit(0x00020010, b"UI", ExplicitVRLittleEndian.encode() + b"\x00"),
        ]
    )
    group = struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(meta))
    data = b"\x00" * 128 + b"DICM" + group + meta + body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _same_bytes(pydicom.dcmread(io.BytesIO(data)))
        ds = pydicom.dcmread(io.BytesIO(data))
        assert isinstance(ds.get_item(0x00100020), RawDataElement)
        out = writer.encode(ds)
    assert out is not None and b"LO\x03\x00ODD" in out and b"UI\x08\x001.2.3.45" in out
