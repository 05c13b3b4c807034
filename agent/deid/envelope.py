"""CMS EnvelopedData for the Encrypted Attributes Sequence (PS3.15 E.1.1, E.1.2).

Encryption uses cryptography's PKCS7EnvelopeBuilder (AES-256-CBC, RSA key
transport).  Decryption is our own on top of asn1crypto, because a re-identifier
must accept every envelope the standard allows (AES-128/192/256 and Triple-DES,
RSA PKCS#1 v1.5 or OAEP), and cryptography's pkcs7_decrypt_der does not.
"""

from __future__ import annotations

from asn1crypto import cms  # type: ignore[import-untyped,unused-ignore]
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from agent.errors import CryptoError

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_KEY_BYTES = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32, "tripledes_3key": 24}


def envelope(content: bytes, recipients: tuple[x509.Certificate, ...]) -> bytes:
    """DER EnvelopedData of ``content`` for every recipient (AES-256-CBC)."""
    if not recipients:
        raise CryptoError("no recipient certificate to encrypt the original attributes for")
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content)
    builder = builder.set_content_encryption_algorithm(algorithms.AES256)
    for cert in recipients:
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise CryptoError(
                "recipient certificate does not hold an RSA key",
                hint="DICOM re-identification recipients need RSA certificates",
            )
        builder = builder.add_recipient(cert)
    # Binary: without it the content is treated as text and line ends rewritten.
    return builder.encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary])


def _unwrap_key(ri: cms.KeyTransRecipientInfo, key: rsa.RSAPrivateKey) -> bytes:
    alg = ri["key_encryption_algorithm"]
    name = alg["algorithm"].native
    encrypted_key = ri["encrypted_key"].native
    if name in ("rsaes_pkcs1v15", "rsa"):
        return key.decrypt(encrypted_key, asym_padding.PKCS1v15())
    if name == "rsaes_oaep":
        params = alg["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        label = params["p_source_algorithm"]["parameters"].native or None
        if hash_name not in _HASHES or mgf_hash not in _HASHES:
            raise ValueError(f"unsupported OAEP hash {hash_name}/{mgf_hash}")
        return key.decrypt(
            encrypted_key,
            asym_padding.OAEP(
                mgf=asym_padding.MGF1(_HASHES[mgf_hash]()),
                algorithm=_HASHES[hash_name](),
                label=label,
            ),
        )
    raise ValueError(f"unsupported key transport {name}")


def _decrypt_content(eci: cms.EncryptedContentInfo, cek: bytes) -> bytes:
    alg = eci["content_encryption_algorithm"]
    name = alg["algorithm"].native
    if name not in _KEY_BYTES:
        raise CryptoError(f"unsupported content encryption {name} in the encrypted attributes")
    if len(cek) != _KEY_BYTES[name]:
        raise ValueError("content key has the wrong length for its cipher")
    iv = alg["parameters"].native
    block: algorithms.AES | TripleDES
    if name == "tripledes_3key":
        block = TripleDES(cek)
    else:
        block = algorithms.AES(cek)
    data = eci["encrypted_content"].native
    if not isinstance(data, bytes) or not isinstance(iv, bytes):
        raise CryptoError("encrypted attributes envelope has no content or IV")
    decryptor = Cipher(block, modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(block.block_size).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def open_envelope(der: bytes, private_key: PrivateKeyTypes) -> bytes:
    """Decrypt a CMS EnvelopedData with an RSA private key of one of its recipients.

    ``der`` may carry DICOM's trailing pad byte: parsing stops at the DER length.
    """
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise CryptoError("re-identification needs the recipient's RSA private key")
    try:
        info = cms.ContentInfo.load(bytes(der), strict=False)
        if info["content_type"].native != "enveloped_data":
            raise CryptoError("encrypted attributes are not a CMS EnvelopedData")
        env = info["content"]
        recipients = list(env["recipient_infos"])
        eci = env["encrypted_content_info"]
    except (ValueError, TypeError, KeyError) as exc:
        raise CryptoError(f"encrypted attributes are not valid CMS: {exc}") from None
    for choice in recipients:
        if choice.name != "ktri":
            continue
        try:
            cek = _unwrap_key(choice.chosen, private_key)
            return _decrypt_content(eci, cek)
        except ValueError:
            # Not our recipient (OpenSSL's implicit rejection yields a random key,
            # caught by the length or padding check): try the next one.
            continue
    raise CryptoError(
        "none of the envelope's recipients matches this private key",
        hint="use the private key of a certificate listed as a de-identification recipient",
    )
