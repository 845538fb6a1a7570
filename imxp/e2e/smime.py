"""S/MIME 4.0 (RFC 8551) around a MIME entity: sign, encrypt, verify, decrypt.

What comes from where:

* Signing is ``cryptography``'s PKCS7SignatureBuilder (CMS SignedData, RFC 5652 §5) with
  SHA-256, RSA or ECDSA keys, the content taken as exact octets ("binary": no line-end
  translation, RFC 8551 §3.1.1 - the CPIM entity already has CRLF and APEX is 8-bit
  clean, RFC 3923 §6.4). Detached, as ``multipart/signed`` (RFC 8551 §3.5.3), or opaque,
  as ``application/pkcs7-mime; smime-type=signed-data`` (§3.5.2).
* Verifying is done here: ``cryptography`` does not verify CMS signatures. The
  SignedData is read with ``asn1crypto`` (which ``scramp``, a dependency, brings in); the
  signature over the signed attributes, the contentType and messageDigest attributes
  (RFC 5652 §5.4, §11.1-§11.2) are checked with ``cryptography``'s primitives, and the
  signer's certificate is chained to the caller's trust anchors with
  ``cryptography.x509.verification`` (RFC 8550 §4).
* Encrypting is AuthEnvelopedData (RFC 5083) with AES-256-GCM (RFC 5084), built here:
  RFC 8551 §2.7 makes AES-GCM the MUST and demotes AES-CBC, which has no integrity
  protection (the EFAIL attacks), while ``cryptography``'s PKCS7EnvelopeBuilder makes
  only AES-CBC EnvelopedData. The content key goes to each recipient by RSAES-OAEP with
  SHA-256 (RFC 8551 §2.3 SHOULD+, RFC 4055 §4): recipients need RSA keys, since
  ECDH key agreement (RFC 5753) is not implemented.
* Decrypting reads AuthEnvelopedData with AES-GCM and, for interoperability,
  EnvelopedData with AES-CBC (noted as unprotected against tampering), with RSA key
  transport by OAEP or PKCS #1 v1.5.

:func:`imxp.certs.issue_smime` (re-exported here) makes a certificate fit for all of it
(RFC 8550 §4.4).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import ClassVar, TypeVar
from urllib.parse import unquote

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from imxp.apex.address import AddressError, Endpoint
from imxp.certs import Issued, issue_smime
from imxp.e2e.protect import (
    E2EError,
    MIMEError,
    Opened,
    base64_lines,
    build_multipart,
    decoded_body,
    is_one_of,
    param,
    split_entity,
    split_multipart,
)

__all__ = ["encrypt", "encryption_certificates", "issue_smime", "names", "open", "sign"]

_E = TypeVar("_E", bound=x509.ExtensionType)

_SIGNED_PROTOCOLS = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
# RFC 8551 §2.1: SHA-256 and SHA-512 are MUST; SHA-1 and MD5 are refused (collisions).
_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# OAEP's hash only needs preimage resistance, and SHA-1 is OAEP's default (RFC 4055 §4.1).
_OAEP_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {**_DIGESTS, "sha1": hashes.SHA1}
_CBC_KEY_SIZES = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32}
_GCM_KEY_SIZES = {"aes128_gcm": 16, "aes192_gcm": 24, "aes256_gcm": 32}
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_GCM_TAG = 16
# A shorter GCM tag makes forgery easier; RFC 5084 §3.1 allows 12 to 16 octets.
_MIN_GCM_TAG = 12
_CLOCK_SKEW = timedelta(minutes=5)
# asn1crypto and cryptography parse lazily, so malformed DER (a sender's fault, reported as
# such) surfaces from deep inside either as one of these.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


# DER tags (X.690 §8) and object identifiers of what :func:`encrypt` writes.
_INTEGER, _OCTET_STRING, _OBJECT_IDENTIFIER = 0x02, 0x04, 0x06
_SEQUENCE, _SET = 0x30, 0x31
_IMPLICIT_0, _EXPLICIT_0, _EXPLICIT_1 = 0x80, 0xA0, 0xA1
_NULL = b"\x05\x00"
_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"  # RFC 5083 §1.1
_DATA = "1.2.840.113549.1.7.1"  # RFC 5652 §4
_AES256_GCM = "2.16.840.1.101.3.4.1.46"  # RFC 5084 §3.1
_RSAES_OAEP = "1.2.840.113549.1.1.7"  # RFC 4055 §4.1
_MGF1 = "1.2.840.113549.1.1.8"  # RFC 4055 §2.2
_SHA256 = "2.16.840.1.101.3.4.2.1"  # RFC 5754 §2.2


class _GCMParameters(core.Sequence):
    """``GCMParameters`` (RFC 5084 §3.2), which asn1crypto does not define."""

    _fields: ClassVar = [("nonce", core.OctetString), ("icv_len", core.Integer, {"default": 12})]


class _Bad(Exception):
    """A signature that does not hold, with the reason."""


class _Unchecked(_Bad):
    """A signature that nothing here could check: no trust anchors were given."""


def _bad(e: _Bad | MIMEError) -> Opened:
    return Opened(b"", "bad-signature", reason=str(e), unchecked=isinstance(e, _Unchecked))


class _CannotDecrypt(Exception):
    """Encrypted content that this key cannot recover, with the reason."""


# -- certificates -----------------------------------------------------------------------------


# -- sending ------------------------------------------------------------------------------


def sign(entity: bytes, cert: Issued, detached: bool = True) -> bytes:
    """Sign the MIME entity ``entity`` as ``cert`` (RFC 8551 §3.5) with SHA-256.

    Detached gives ``multipart/signed`` with ``protocol="application/pkcs7-signature"``
    and ``micalg=sha-256`` (§3.5.3), the entity as its first part, octet for octet;
    otherwise ``application/pkcs7-mime; smime-type=signed-data`` (§3.5.2). The signer's
    certificate and chain go into the SignedData. Raises :class:`E2EError` for a key
    type CMS signing here does not support (Ed25519).
    """
    if not isinstance(cert.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise E2EError("S/MIME signing needs an RSA or ECDSA key")
    # Each builder step returns a new builder; add_certificate must come last, since
    # set_data and add_signer do not carry earlier certificates over.
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(entity)
        .add_signer(cert.certificate, cert.key, hashes.SHA256())
    )
    for extra in cert.chain:
        builder = builder.add_certificate(extra)
    options = [pkcs7.PKCS7Options.Binary]
    if detached:
        options.append(pkcs7.PKCS7Options.DetachedSignature)
    der = builder.sign(serialization.Encoding.DER, options)
    if not detached:
        return _pkcs7_mime("signed-data", der)
    signature = (
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n' + base64_lines(der)
    )
    return build_multipart(
        "signed",
        [("protocol", "application/pkcs7-signature"), ("micalg", "sha-256")],
        [entity, signature],
    )


def encrypt(entity: bytes, recipients: Sequence[x509.Certificate]) -> bytes:
    """Encrypt the MIME entity ``entity`` to ``recipients`` (RFC 8551 §3.3):
    ``application/pkcs7-mime; smime-type=authEnveloped-data`` (§3.2.2), AES-256-GCM,
    the key transported to each recipient's RSA key by RSAES-OAEP-SHA256.

    Raises :class:`E2EError` without recipients or for a recipient key that is not RSA.
    """
    if not recipients:
        raise E2EError("S/MIME encryption needs at least one recipient certificate")
    key = AESGCM.generate_key(256)
    nonce = os.urandom(12)  # RFC 5084 §3.2 recommends 12 octets
    sealed = AESGCM(key).encrypt(nonce, entity, None)
    # The DER is written directly: the structure is fixed, and building it with asn1crypto's
    # objects costs some milliseconds a message. It is read back with asn1crypto, and by
    # openssl in the tests.
    gcm = _tlv(_SEQUENCE, _oid(_AES256_GCM), _tlv(_SEQUENCE, _octets(nonce), _integer(_GCM_TAG)))
    transports = sorted(_key_transport(cert, key) for cert in recipients)  # X.690 §11.6
    envelope = _tlv(
        _SEQUENCE,
        _integer(0),  # version (RFC 5083 §2.1)
        _tlv(_SET, *transports),
        _tlv(_SEQUENCE, _oid(_DATA), gcm, _tlv(_IMPLICIT_0, sealed[:-_GCM_TAG])),
        _octets(sealed[-_GCM_TAG:]),  # mac
    )
    content_info = _tlv(_SEQUENCE, _oid(_AUTH_ENVELOPED_DATA), _tlv(_EXPLICIT_0, envelope))
    return _pkcs7_mime("authEnveloped-data", content_info)


def encryption_certificates(
    recipients: Sequence[str],
    certificates: Sequence[x509.Certificate],
    trust: tuple[x509.Certificate, ...] = (),
    now: datetime | None = None,
) -> list[x509.Certificate]:
    """The certificates among ``certificates`` to encrypt to for ``recipients``.

    For each recipient, those that name it or the endpoint it is a subaddress of
    (:func:`names`) and can be encrypted to now: within their validity, an RSA key,
    keyUsage (when present) allowing keyEncipherment (RFC 8550 §4.4.2), and, with
    ``trust``, a chain to it (the others given serve as intermediates) whose CAs' name
    constraints allow the recipient (RFC 5280 §4.2.1.10). The rest are left
    out - the CA of a chain file, an expired certificate beside its renewal, someone
    else's - since whoever holds one of their keys could read the message.

    Raises :class:`E2EError` naming a recipient for whom none is usable, and why.
    """
    now = now or datetime.now(UTC)
    chosen: list[x509.Certificate] = []
    for recipient in recipients:
        candidates = [c for c in certificates if names(c, recipient)]
        if not candidates:
            raise E2EError(f"no S/MIME certificate for {recipient} to encrypt to")
        problems = [_unusable(c, recipient, certificates, trust, now) for c in candidates]
        usable = [c for c, problem in zip(candidates, problems, strict=True) if problem is None]
        if not usable:
            why = "; ".join(p for p in problems if p is not None)
            raise E2EError(f"no usable S/MIME certificate for {recipient}: {why}")
        chosen += [c for c in usable if c not in chosen]
    return chosen


def names(certificate: x509.Certificate, endpoint: str) -> bool:
    """Whether an S/MIME certificate is for ``endpoint``'s user: an rfc822Name (RFC 8550
    §3) or ``im:`` URI (RFC 3923 §6.3) in its subjectAltName names the endpoint, or the
    endpoint it is a subaddress of (RFC 3340 §2.2)."""
    return is_one_of(endpoint, _names(certificate))


def _names(certificate: x509.Certificate) -> list[str]:
    """The addresses :func:`names` reads: the subjectAltName's rfc822Names and ``im:``
    URIs."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    uris = alternatives.value.get_values_for_type(x509.UniformResourceIdentifier)
    return alternatives.value.get_values_for_type(x509.RFC822Name) + [
        unquote(uri[3:]) for uri in uris if uri[:3].lower() == "im:"
    ]


def _unusable(
    cert: x509.Certificate,
    recipient: str,
    given: Sequence[x509.Certificate],
    trust: tuple[x509.Certificate, ...],
    now: datetime,
) -> str | None:
    """Why ``cert`` may not be encrypted to for ``recipient`` at ``now``; None when it
    may."""
    subject = cert.subject.rfc4514_string() or "a certificate without a subject"
    if now < cert.not_valid_before_utc:
        return f"{subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if now > cert.not_valid_after_utc:
        return f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        return f"{subject} has no RSA key, which imxp's S/MIME encryption needs"
    # Checked here as well as by the verifier: without trust anchors there is no chain.
    try:
        _encryption_usage(None, cert, _extension(cert, x509.KeyUsage))
        _email_protection(None, cert, _extension(cert, x509.ExtendedKeyUsage))
    except ValueError as e:
        return f"{subject}: {e}"
    if trust:
        try:
            chain = (
                _verifier(trust, now, _encryption_usage)
                .verify(cert, [c for c in given if c != cert])
                .chain
            )
        except VerificationError as e:
            return f"{subject} is not trusted: {e}"
        # As for a signer (_signer): the verifier does not hold im: URIs to the CAs' name
        # constraints, and one of them may be all that names the recipient.
        ours = [name for name in _names(cert) if is_one_of(recipient, [name])]
        if not any(all(_permits(ca, name) for ca in chain[1:]) for name in ours):
            return (
                f"{subject}: its CAs may not vouch for {recipient} (name constraints, "
                "RFC 5280 §4.2.1.10)"
            )
    return None


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_transport(cert: x509.Certificate, key: bytes) -> bytes:
    """KeyTransRecipientInfo (RFC 5652 §6.2.1) carrying ``key`` to ``cert``'s RSA key by
    RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 4055 §4.1, §2.1 sha256Identifier)."""
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise E2EError(f"{cert.subject.rfc4514_string()}: S/MIME encryption needs an RSA key")
    # Issuer and serial number exactly as the certificate encodes them.
    tbs = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))[
        "tbs_certificate"
    ]
    sha256 = _tlv(_SEQUENCE, _oid(_SHA256), _NULL)
    oaep = _tlv(
        _SEQUENCE,
        _oid(_RSAES_OAEP),
        _tlv(
            _SEQUENCE,
            _tlv(_EXPLICIT_0, sha256),
            _tlv(_EXPLICIT_1, _tlv(_SEQUENCE, _oid(_MGF1), sha256)),
        ),
    )
    return _tlv(
        _SEQUENCE,
        _integer(0),  # version: the recipient is named by issuer and serial number
        _tlv(_SEQUENCE, tbs["issuer"].dump(), tbs["serial_number"].dump()),
        oaep,
        _octets(public_key.encrypt(key, _OAEP)),
    )


def _tlv(tag: int, *contents: bytes) -> bytes:
    """One DER element: tag, definite length in the fewest octets, contents (X.690 §8.1,
    §10.1)."""
    body = b"".join(contents)
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _integer(value: int) -> bytes:
    """A non-negative INTEGER in the fewest octets (X.690 §8.3)."""
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _octets(value: bytes) -> bytes:
    return _tlv(_OCTET_STRING, value)


def _oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER (X.690 §8.19): the first two arcs as one, each in base 128."""
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    encoded = bytearray()
    for arc in (40 * first + second, *rest):
        septets = [arc & 0x7F]
        arc >>= 7
        while arc:
            septets.append(0x80 | (arc & 0x7F))
            arc >>= 7
        encoded += bytes(reversed(septets))
    return _tlv(_OBJECT_IDENTIFIER, bytes(encoded))


def _pkcs7_mime(smime_type: str, der: bytes) -> bytes:
    """An ``application/pkcs7-mime`` entity (RFC 8551 §3.2), base64 as in mail; carried
    over APEX it is decoded to binary (:func:`imxp.e2e.protect.content_from_entity`)."""
    return (
        f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n'
    ).encode("ascii") + base64_lines(der)


# -- receiving ----------------------------------------------------------------------------


def open(
    raw: bytes,
    *,
    trust: Sequence[x509.Certificate],
    key: Issued | None = None,
    now: datetime | None = None,
) -> Opened:
    """Verify and/or decrypt the S/MIME entity ``raw``; never raises for what it contains.

    Signatures must chain to one of ``trust`` at ``now`` (default: the current time);
    ``key`` decrypts. A signed entity inside an encrypted one (RFC 8551 §3.7) is verified
    too, giving "signed-encrypted". An entity that is not S/MIME is "plain".
    """
    return _open(raw, tuple(trust), key, now or datetime.now(UTC), decrypt=True)


def _open(
    raw: bytes,
    trust: tuple[x509.Certificate, ...],
    key: Issued | None,
    now: datetime,
    *,
    decrypt: bool,
) -> Opened:
    headers, body = split_entity(raw)
    media_type = headers.get_content_type()
    if media_type == "multipart/signed":
        protocol = (param(headers, "protocol") or "").lower()
        if protocol not in _SIGNED_PROTOCOLS:
            return Opened(b"", "bad-signature", reason=f"{protocol or 'no'} protocol, not S/MIME")
        try:
            content, signature = _detached_parts(headers, body)
            return _verified(signature, content, trust, now)
        except (MIMEError, _Bad) as e:
            return _bad(e)
    if media_type not in _PKCS7_MIME:
        return Opened(raw, "plain")
    try:
        der = decoded_body(headers, body)
        kind = _content_info(der)["content_type"].native
    except (MIMEError, _Bad) as e:
        # Without a readable ContentInfo nothing says whether it was signed or encrypted;
        # either way the content cannot be had.
        return Opened(b"", "cannot-decrypt", reason=str(e))
    if kind == "signed_data":
        try:
            return _verified(der, None, trust, now)
        except _Bad as e:
            return _bad(e)
    if kind not in ("enveloped_data", "authenticated_enveloped_data") or not decrypt:
        return Opened(b"", "cannot-decrypt", reason=f"unsupported CMS content type {kind}")
    try:
        plain, note = _decrypted(der, key)
    except _CannotDecrypt as e:
        return Opened(b"", "cannot-decrypt", reason=str(e), sent_encrypted=True)
    inner = _open(plain, trust, key, now, decrypt=False)
    if inner.status == "signed":
        return replace(inner, status="signed-encrypted", reason=note)
    if inner.status == "bad-signature":
        return replace(inner, reason=f"decrypted, but {inner.reason}", sent_encrypted=True)
    return Opened(plain, "encrypted", reason=note)


def _detached_parts(headers: Message, body: bytes) -> tuple[bytes, bytes]:
    """The signed content and the DER signature of a ``multipart/signed`` (RFC 8551
    §3.5.3): exactly two parts, the second ``application/pkcs7-signature``."""
    parts = split_multipart(body, param(headers, "boundary"))
    if len(parts) != 2:
        raise _Bad(f"multipart/signed has {len(parts)} parts, not 2 (RFC 1847 §2.1)")
    signature_headers, signature_body = split_entity(parts[1])
    if signature_headers.get_content_type() not in _SIGNED_PROTOCOLS:
        raise _Bad(f"the signature part is {signature_headers.get_content_type()}")
    return parts[0], decoded_body(signature_headers, signature_body)


def _content_info(der: bytes) -> cms.ContentInfo:
    """The ContentInfo (RFC 5652 §3) in ``der``; raises :class:`_Bad` if there is none."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        info["content_type"].native  # noqa: B018 - parsed lazily: force it here
    except (ValueError, TypeError) as e:
        raise _Bad(f"malformed CMS: {e}") from None
    return info


def _verified(
    der: bytes,
    detached: bytes | None,
    trust: tuple[x509.Certificate, ...],
    now: datetime,
) -> Opened:
    """Verify the SignedData in ``der`` over ``detached`` or its own content (RFC 5652
    §5.6); every signerInfo must hold, and the identities are those all their
    certificates name. Raises :class:`_Bad`."""
    if not trust:
        raise _Unchecked(
            "no S/MIME trust anchors to verify against "
            "(trust the signer's certificate authority to check such signatures)"
        )
    try:
        signed_data = _content_info(der)["content"]
        encap = signed_data["encap_content_info"]
        if encap["content_type"].native != "data":
            raise _Bad(f"signed content is {encap['content_type'].native}, not data")
        own = encap["content"]
        if detached is None:
            if isinstance(own, core.Void):
                raise _Bad("no content: a detached signature without the content it signs")
            content = own.native
        elif not isinstance(own, core.Void):
            raise _Bad("a detached signature that also carries content")
        else:
            content = detached
        certificates = [
            c.chosen for c in signed_data["certificates"] or () if c.name == "certificate"
        ]
        signers = list(signed_data["signer_infos"])
        if not signers:
            raise _Bad("SignedData without a signer")
        results = [_signer(si, content, certificates, trust, now) for si in signers]
        # RFC 3923 §6.3: the sender must be named in "the signer's certificate" - with
        # several signers, in each one's. Anyone who passes a signed message on can add a
        # SignerInfo of their own (RFC 5652 §5.1), which must not make it pass for theirs.
        named = [identities for _, identities, _ in results]
        identities = [i for i in named[0] if all(i in others for others in named[1:])]
        if len(results) > 1 and not identities:
            each = [n[0] if n else cert.subject.rfc4514_string() for cert, n, _ in results]
            raise _Bad(f"its signers' certificates name no identity in common ({'; '.join(each)})")
    except _MALFORMED as e:
        raise _Bad(f"malformed SignedData: {e}") from None
    first_cert, _, signed_at = results[0]
    return Opened(
        content,
        "signed",
        signer=identities[0] if identities else first_cert.subject.rfc4514_string(),
        fingerprint=first_cert.fingerprint(hashes.SHA256()).hex().upper(),
        signed_at=signed_at,
        identities=tuple(identities),
    )


def _signer(
    signer_info: cms.SignerInfo,
    content: bytes,
    certificates: list[asn1_x509.Certificate],
    trust: tuple[x509.Certificate, ...],
    now: datetime,
) -> tuple[x509.Certificate, list[str], datetime | None]:
    """Check one SignerInfo (RFC 5652 §5.3-§5.6); return its certificate, the identities
    it may vouch for (:func:`_identities` its chain allows) and its signingTime."""
    sid = signer_info["sid"]
    found = next((c for c in certificates if _identifies(sid, c)), None)
    if found is None:
        raise _Bad("the signer's certificate is not in the message")
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    digest_type = _DIGESTS.get(digest_name)
    if digest_type is None:
        raise _Bad(f"digest algorithm {digest_name} is not accepted")
    signed_at = None
    attributes = signer_info["signed_attrs"]
    if isinstance(attributes, core.Void):
        signed = content  # no signed attributes: the signature is over the content (§5.4)
    else:
        values: dict[str, object] = {}
        for attribute in attributes:
            name = attribute["type"].native
            if name in values:
                raise _Bad(f"signed attribute {name} appears twice (RFC 5652 §5.3)")
            values[name] = attribute["values"]
        content_type = _single(values, "content_type")
        if content_type is None or content_type.native != "data":
            raise _Bad("the contentType attribute is missing or is not data (RFC 5652 §11.1)")
        message_digest = _single(values, "message_digest")
        digest = hashes.Hash(digest_type())
        digest.update(content)
        if message_digest is None or not hmac.compare_digest(
            message_digest.native, digest.finalize()
        ):
            raise _Bad("the content does not match the signed messageDigest (RFC 5652 §11.2)")
        signing_time = _single(values, "signing_time")
        if signing_time is not None:
            when = signing_time.native
            # asn1crypto gives the year 0, which a datetime cannot hold, as another type.
            if not isinstance(when, datetime):
                raise _Bad(f"the signingTime attribute is no time: {when} (RFC 5652 §11.3)")
            signed_at = when.astimezone(UTC)
        # The signature covers the DER of the attributes as a SET OF, not as the [0]
        # IMPLICIT field they are sent in (§5.4): same octets, universal SET tag.
        signed = b"\x31" + attributes.dump()[1:]
    cert = x509.load_der_x509_certificate(found.dump())
    _check_signature(cert, signer_info, digest_type, signed)
    others = [x509.load_der_x509_certificate(c.dump()) for c in certificates if c is not found]
    try:
        chain = _verifier(trust, now).verify(cert, others).chain
    except VerificationError as e:
        raise _Bad(f"certificate {cert.subject.rfc4514_string()} is not trusted: {e}") from None
    # The verifier holds the subjectAltName's rfc822Names to the CAs' name constraints,
    # but not the im: and pres: URIs or the subject's emailAddress that name the signer
    # here as well: unchecked, a CA confined to one domain's addresses could vouch for
    # anyone's.
    identities = [i for i in _identities(cert) if all(_permits(ca, i) for ca in chain[1:])]
    return cert, identities, signed_at


def _permits(ca: x509.Certificate, identity: str) -> bool:
    """Whether the rfc822Name constraints of ``ca`` (RFC 5280 §4.2.1.10) allow the
    address ``identity``. A constraint is a mailbox, a host (all mailboxes there) or,
    with a leading ".", a domain (all hosts within it); an endpoint is matched by its
    user's address, whose subaddresses are the user's (RFC 3340 §2.2)."""
    constraints = _extension(ca, x509.NameConstraints)
    if constraints is None:
        return True
    try:
        user = Endpoint.parse(identity).base
    except AddressError:
        return False

    def matches(subtrees: Sequence[x509.GeneralName] | None) -> list[bool]:
        return [
            _rfc822_matches(name.value, user)
            for name in subtrees or ()
            if isinstance(name, x509.RFC822Name)
        ]

    permitted = matches(constraints.permitted_subtrees)
    return (not permitted or any(permitted)) and not any(matches(constraints.excluded_subtrees))


def _rfc822_matches(constraint: str, user: Endpoint) -> bool:
    """Whether one rfc822Name constraint covers ``user``: the local part exactly, the host
    without regard to case (RFC 5280 §4.2.1.10, §7.5)."""
    local, at, host = constraint.rpartition("@")
    host = host.lower()
    if at:
        return user.address == local and user.domain == host
    if host.startswith("."):
        return user.domain.endswith(host)
    return user.domain == host


def _single(values: dict[str, object], name: str) -> core.Asn1Value | None:
    """The one value of a signed attribute (RFC 5652 §11: each is single-valued)."""
    found = values.get(name)
    if found is None:
        return None
    if len(found) != 1:  # type: ignore[arg-type]
        raise _Bad(f"signed attribute {name} must have exactly one value")
    return found[0]  # type: ignore[index]


def _identifies(sid: cms.SignerIdentifier, cert: asn1_x509.Certificate) -> bool:
    """Whether ``sid`` (RFC 5652 §5.3) names ``cert``."""
    if sid.name == "issuer_and_serial_number":
        chosen = sid.chosen
        return (
            chosen["issuer"] == cert.issuer and chosen["serial_number"].native == cert.serial_number
        )
    return cert.key_identifier is not None and sid.chosen.native == cert.key_identifier


def _check_signature(
    cert: x509.Certificate,
    signer_info: cms.SignerInfo,
    digest_type: type[hashes.HashAlgorithm],
    signed: bytes,
) -> None:
    """Check the signature value with the certificate's key (RFC 5652 §5.6; RFC 8551
    §2.2: RSA PKCS #1 v1.5 and PSS, ECDSA, EdDSA)."""
    algorithm = signer_info["signature_algorithm"]
    name = algorithm.signature_algo
    signature = signer_info["signature"].native
    try:
        key = cert.public_key()
        if isinstance(key, rsa.RSAPublicKey) and name == "rsassa_pkcs1v15":
            key.verify(signature, signed, padding.PKCS1v15(), digest_type())
        elif isinstance(key, rsa.RSAPublicKey) and name == "rsassa_pss":
            params = algorithm["parameters"]
            pss_digest = _DIGESTS.get(params["hash_algorithm"]["algorithm"].native)
            mgf = params["mask_gen_algorithm"]
            mgf_digest = _DIGESTS.get(mgf["parameters"]["algorithm"].native)
            if pss_digest is None or mgf_digest is None or mgf["algorithm"].native != "mgf1":
                raise _Bad("unsupported RSASSA-PSS parameters")
            pss = padding.PSS(padding.MGF1(mgf_digest()), params["salt_length"].native)
            key.verify(signature, signed, pss, pss_digest())
        elif isinstance(key, ec.EllipticCurvePublicKey) and name == "ecdsa":
            key.verify(signature, signed, ec.ECDSA(digest_type()))
        elif isinstance(key, ed25519.Ed25519PublicKey) and name == "ed25519":
            key.verify(signature, signed)
        else:
            raise _Bad(f"signature algorithm {name} does not fit a {type(key).__name__}")
    except InvalidSignature:
        raise _Bad("the signature does not verify: the content or signature was altered") from None
    except UnsupportedAlgorithm as e:
        raise _Bad(f"unsupported signature: {e}") from None


def _verifier(
    trust: tuple[x509.Certificate, ...],
    now: datetime,
    usage: Callable[[Policy, x509.Certificate, x509.KeyUsage | None], None] | None = None,
) -> ClientVerifier:
    """A chain verifier to ``trust`` at ``now``, with the end-entity rules of RFC 8550
    §4.4.2 (keyUsage: for signing, unless ``usage`` says otherwise) and §4.4.4
    (extendedKeyUsage) in place of TLS's."""
    end_entity = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _email_protection)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, usage or _signing_usage)
        # RFC 8550 §3: the address may be in the subject's emailAddress instead.
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    )
    return (
        PolicyBuilder()
        .store(Store(list(trust)))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=end_entity)
        .build_client_verifier()
    )


def _email_protection(
    _policy: Policy | None, _cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None
) -> None:
    if usage is None:
        return
    if not {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(
        usage
    ):
        raise ValueError("extendedKeyUsage has neither emailProtection nor anyExtendedKeyUsage")


def _signing_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not (usage.digital_signature or usage.content_commitment):
        raise ValueError("keyUsage allows neither digitalSignature nor nonRepudiation")


def _encryption_usage(
    _policy: Policy | None, _cert: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    if usage is not None and not usage.key_encipherment:
        raise ValueError("keyUsage does not allow keyEncipherment")


def _identities(cert: x509.Certificate) -> list[str]:
    """The addresses a certificate is for: rfc822Name and ``im:``/``pres:`` URIs in the
    subjectAltName (RFC 8550 §3, RFC 3923 §6.3), then any subject emailAddress."""
    found: list[str] = []
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        found += names.get_values_for_type(x509.RFC822Name)
        for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
            scheme, colon, rest = uri.partition(":")
            if colon and scheme.lower() in ("im", "pres"):
                found.append(unquote(rest))
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if isinstance(attribute.value, str):
            found.append(attribute.value)
    return list(dict.fromkeys(found))


def _decrypted(der: bytes, key: Issued | None) -> tuple[bytes, str]:
    """The plaintext of EnvelopedData (RFC 5652 §6) or AuthEnvelopedData (RFC 5083) in
    ``der``, and a note on its protection. Raises :class:`_CannotDecrypt`."""
    if key is None:
        raise _CannotDecrypt("no S/MIME key to decrypt with")
    if not isinstance(key.key, rsa.RSAPrivateKey):
        raise _CannotDecrypt("decryption here needs an RSA key (key transport)")
    try:
        info = _content_info(der)
        authenticated = info["content_type"].native == "authenticated_enveloped_data"
        envelope = info["content"]
        content_key = _content_key(envelope["recipient_infos"], key)
        encrypted = envelope[
            "auth_encrypted_content_info" if authenticated else "encrypted_content_info"
        ]
        algorithm = encrypted["content_encryption_algorithm"]
        name = algorithm["algorithm"].native
        ciphertext = encrypted["encrypted_content"].native
        if ciphertext is None:
            raise _CannotDecrypt("the encrypted content is not in the message")
        if authenticated:
            return _gcm(envelope, algorithm, name, content_key, ciphertext), ""
        return _cbc(algorithm, name, content_key, ciphertext), (
            "AES-CBC without integrity protection: the content could have been altered "
            "unnoticed (RFC 8551 §2.7 prefers AES-GCM)"
        )
    except _Bad as e:
        raise _CannotDecrypt(str(e)) from None
    except _MALFORMED as e:
        raise _CannotDecrypt(f"malformed CMS envelope: {e}") from None


def _content_key(recipient_infos: cms.RecipientInfos, key: Issued) -> bytes:
    """The content-encryption key from the KeyTransRecipientInfo for ``key``'s
    certificate (RFC 5652 §6.2.1)."""
    ours = asn1_x509.Certificate.load(key.certificate.public_bytes(serialization.Encoding.DER))
    assert isinstance(key.key, rsa.RSAPrivateKey)
    for info in recipient_infos:
        if info.name != "ktri":
            continue
        transport = info.chosen
        rid = transport["rid"]
        if rid.name == "issuer_and_serial_number":
            chosen = rid.chosen
            if not (
                chosen["issuer"] == ours.issuer
                and chosen["serial_number"].native == ours.serial_number
            ):
                continue
        elif ours.key_identifier is None or rid.chosen.native != ours.key_identifier:
            continue
        algorithm = transport["key_encryption_algorithm"]
        name = algorithm["algorithm"].native
        if name == "rsaes_pkcs1v15":
            scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        elif name == "rsaes_oaep":
            params = algorithm["parameters"]
            digest = _OAEP_DIGESTS.get(params["hash_algorithm"]["algorithm"].native)
            mgf = params["mask_gen_algorithm"]
            mgf_digest = _OAEP_DIGESTS.get(mgf["parameters"]["algorithm"].native)
            if digest is None or mgf_digest is None or mgf["algorithm"].native != "mgf1":
                raise _CannotDecrypt("unsupported RSAES-OAEP parameters")
            label = params["p_source_algorithm"]["parameters"].native or None
            scheme = padding.OAEP(padding.MGF1(mgf_digest()), digest(), label)
        else:
            raise _CannotDecrypt(f"unsupported key transport {name}")
        try:
            return key.key.decrypt(transport["encrypted_key"].native, scheme)
        except ValueError:
            raise _CannotDecrypt("the content key does not decrypt with this key") from None
    subject = key.certificate.subject.rfc4514_string()
    raise _CannotDecrypt(f"not encrypted to this certificate ({subject})")


def _gcm(
    envelope: cms.AuthEnvelopedData,
    algorithm: object,
    name: str,
    content_key: bytes,
    ciphertext: bytes,
) -> bytes:
    """AES-GCM authenticated decryption (RFC 5084 §3; the authenticated attributes, when
    present, are the associated data as a DER SET OF, RFC 5083 §2.2)."""
    if _GCM_KEY_SIZES.get(name) != len(content_key):
        raise _CannotDecrypt(f"unsupported content encryption {name}, or a wrong key size")
    params = algorithm["parameters"].parse(_GCMParameters)  # type: ignore[index]
    nonce, tag = params["nonce"].native, envelope["mac"].native
    if len(tag) != params["icv_len"].native or len(tag) < _MIN_GCM_TAG or not nonce:
        raise _CannotDecrypt("bad AES-GCM parameters")
    attributes = envelope["auth_attrs"]
    associated = b"" if isinstance(attributes, core.Void) else b"\x31" + attributes.dump()[1:]
    decryptor = Cipher(
        algorithms.AES(content_key), modes.GCM(nonce, tag, min_tag_length=_MIN_GCM_TAG)
    ).decryptor()
    decryptor.authenticate_additional_data(associated)
    try:
        return decryptor.update(ciphertext) + decryptor.finalize()
    except InvalidTag:
        raise _CannotDecrypt("authentication failed: the encrypted content was altered") from None


def _cbc(algorithm: object, name: str, content_key: bytes, ciphertext: bytes) -> bytes:
    """AES-CBC decryption with PKCS #7 padding (RFC 3565 §2.3, RFC 5652 §6.3)."""
    if _CBC_KEY_SIZES.get(name) != len(content_key):
        raise _CannotDecrypt(f"unsupported content encryption {name}, or a wrong key size")
    iv = algorithm["parameters"].native  # type: ignore[index]
    if not isinstance(iv, bytes) or len(iv) != 16 or len(ciphertext) % 16:
        raise _CannotDecrypt("bad AES-CBC parameters")
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = block_padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise _CannotDecrypt("bad padding: wrong key, or the content was altered") from None
