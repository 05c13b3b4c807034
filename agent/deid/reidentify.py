"""Re-identification (PS3.15 E.1.2) for the holder of a recipient private key."""

from __future__ import annotations

import copy
from io import BytesIO

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ImplicitVRLittleEndian

from agent.deid.envelope import open_envelope
from agent.errors import CryptoError, DeidError


def _originals(item: Dataset, private_key: PrivateKeyTypes) -> Dataset:
    content = item.get("EncryptedContent")
    if not content:
        raise DeidError("an Encrypted Attributes item has no Encrypted Content")
    plain = open_envelope(bytes(content), private_key)
    syntax = str(item.get("EncryptedContentTransferSyntaxUID", "1.2.840.10008.1.2.1"))
    implicit = syntax == ImplicitVRLittleEndian
    try:
        inner = read_dataset(BytesIO(plain), is_implicit_VR=implicit, is_little_endian=True)
        seq = inner.ModifiedAttributesSequence
    except Exception as exc:
        raise DeidError(
            f"decrypted attributes are not a Modified Attributes Sequence ({type(exc).__name__})"
        ) from exc
    if len(seq) != 1:
        raise DeidError("Modified Attributes Sequence must hold exactly one item")
    first: Dataset = seq[0]
    return first


def reidentify(ds: Dataset, private_key: PrivateKeyTypes) -> Dataset:
    """A copy of ``ds`` with the original attribute values restored.

    Every Encrypted Attributes item this key can open is applied (the standard
    allows one per recipient); PatientIdentityRemoved becomes NO.
    """
    items = ds.get("EncryptedAttributesSequence")
    if not items:
        raise DeidError(
            "instance has no Encrypted Attributes Sequence",
            hint="it was de-identified in strip mode; the originals were never kept",
        )
    restored: Dataset | None = None
    errors: list[str] = []
    for item in items:
        try:
            restored = _originals(item, private_key)
            break
        except CryptoError as exc:
            errors.append(str(exc).splitlines()[0])
    if restored is None:
        raise CryptoError(
            "this key cannot open the instance's encrypted attributes: " + "; ".join(errors),
            hint="use the private key matching a recipient certificate of the de-identifying box",
        )
    out = copy.deepcopy(ds)
    for elem in restored:
        out[elem.tag] = elem
    del out.EncryptedAttributesSequence
    out.PatientIdentityRemoved = "NO"
    meta = getattr(out, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out
