"""Encrypt mode: Encrypted Attributes Sequence round trip and interop with openssl / gdcmanon."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from agent.deid import Deidentifier, DeidSettings
from agent.deid.envelope import open_envelope
from agent.deid.reidentify import reidentify
from agent.errors import CryptoError, DeidError
from tests.helpers import deid_canary as dc
from tests.helpers import require_peer
from tests.helpers.deid import KEY, Recipient, make_recipient, sample_path


def _encrypted(recipients: tuple[Recipient, ...], c: dc.Canary) -> pydicom.Dataset:
    settings = DeidSettings(mode="encrypt", recipients=tuple(r.cert for r in recipients))
    out = Deidentifier(settings, KEY).deidentify(c.dataset).dataset
    assert out is not None
    # through bytes, as a recipient would receive it
    return pydicom.dcmread(io.BytesIO(dc.to_bytes(out)))


def test_round_trip_restores_every_original(recipient: Recipient) -> None:
    c = dc.build(5)
    deid = _encrypted((recipient,), c)
    assert deid.PatientIdentityRemoved == "YES"
    item = deid.EncryptedAttributesSequence[0]
    assert item.EncryptedContentTransferSyntaxUID == "1.2.840.10008.1.2.1"
    back = reidentify(deid, recipient.key)
    assert back.PatientIdentityRemoved == "NO"
    assert "EncryptedAttributesSequence" not in back
    src = c.dataset
    for elem in src:
        if elem.tag in (0x7FE00010, 0x00120062):
            continue
        assert elem.tag in back, elem.tag
        assert back[elem.tag].value == elem.value, elem.tag
    assert back.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
    assert back.PixelData == src.PixelData


def test_every_recipient_can_reidentify_and_others_cannot(
    recipient: Recipient, other_recipient: Recipient, tmp_path: Path
) -> None:
    c = dc.build(6)
    deid = _encrypted((recipient, other_recipient), c)
    for r in (recipient, other_recipient):
        assert reidentify(deid, r.key).PatientID == dc.PATIENT_ID
    stranger = make_recipient(tmp_path, "stranger")
    with pytest.raises(CryptoError):
        reidentify(deid, stranger.key)


def test_strip_output_cannot_be_reidentified(recipient: Recipient) -> None:
    out = Deidentifier(DeidSettings(), KEY).deidentify(dc.build(7).dataset).dataset
    assert out is not None
    with pytest.raises(DeidError):
        reidentify(out, recipient.key)


@pytest.mark.peer("openssl")
def test_openssl_decrypts_our_envelope(recipient: Recipient, tmp_path: Path) -> None:
    deid = _encrypted((recipient,), dc.build(8))
    der = tmp_path / "env.der"
    raw = bytes(deid.EncryptedAttributesSequence[0].EncryptedContent)
    der.write_bytes(raw)
    plain = subprocess.run(
        [
            require_peer("openssl"),
            "cms",
            "-decrypt",
            "-inform",
            "DER",
            "-binary",
            "-in",
            str(der),
            "-inkey",
            str(recipient.key_path),
        ],
        capture_output=True,
        check=True,
    ).stdout
    inner = pydicom.filereader.read_dataset(io.BytesIO(plain), is_implicit_VR=False, is_little_endian=True)
    assert inner.ModifiedAttributesSequence[0].PatientID == dc.PATIENT_ID


@pytest.mark.peer("openssl")
@pytest.mark.parametrize("cipher", ["-aes128", "-aes192", "-aes256", "-des3"])
@pytest.mark.parametrize("transport", ["pkcs1", "oaep"])
def test_we_open_openssl_envelopes(recipient: Recipient, cipher: str, transport: str) -> None:
    payload = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100 odd"  # odd length: DICOM pads it
    extra = ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"]
    der = subprocess.run(
        [
            require_peer("openssl"),
            "cms",
            "-encrypt",
            "-binary",
            "-outform",
            "DER",
            cipher,
            "-recip",
            str(recipient.cert_path),
            *(extra if transport == "oaep" else []),
        ],
        input=payload,
        capture_output=True,
        check=True,
    ).stdout
    assert open_envelope(der + b"\x00", recipient.key) == payload


@pytest.mark.peer("gdcmanon")
@pytest.mark.parametrize("cipher", ["--aes128", "--aes192", "--aes256", "--des3"])
def test_we_reidentify_gdcmanon_output(recipient: Recipient, tmp_path: Path, cipher: str) -> None:
    src = tmp_path / "in.dcm"
    shutil.copy(sample_path("CT_small.dcm"), src)
    out = tmp_path / "anon.dcm"
    subprocess.run(
        [
            require_peer("gdcmanon"),
            "-e",
            "-c",
            str(recipient.cert_path),
            cipher,
            "-i",
            str(src),
            "-o",
            str(out),
        ],
        capture_output=True,
        check=True,
    )
    anon = pydicom.dcmread(out)
    original = pydicom.dcmread(src)
    assert anon.PatientID != original.PatientID
    back = reidentify(anon, recipient.key)
    assert back.PatientID == original.PatientID
    assert back.PatientName == original.PatientName
    assert back.SOPInstanceUID == original.SOPInstanceUID


@pytest.mark.peer("gdcmanon")
def test_gdcmanon_reidentifies_our_output(recipient: Recipient, tmp_path: Path) -> None:
    c = dc.build(9)
    ours = tmp_path / "ours.dcm"
    ours.write_bytes(dc.to_bytes(_encrypted((recipient,), c)))
    back = tmp_path / "back.dcm"
    subprocess.run(
        [require_peer("gdcmanon"), "-d", "-k", str(recipient.key_path), "-i", str(ours), "-o", str(back)],
        capture_output=True,
        check=True,
    )
    restored = pydicom.dcmread(back)
    assert restored.PatientID == dc.PATIENT_ID
    assert restored.SOPInstanceUID == c.dataset.SOPInstanceUID
    assert restored.StudyInstanceUID == dc.STUDY_UID
