"""X.509 certificate tooling: a small CA, relay certificates and endpoint certificates.

Used by the test suite, by the ``imxp certs`` command, and by a relay that creates a
development certificate on its first start.  Everything here is profiled after RFC 5280;
the names put into certificates are the ones RFC 6125 identity checks look at:

* a relay certificate carries one ``dNSName`` per domain or host name the relay answers for
  (RFC 6125 §6.4), optional ``iPAddress`` entries for domain literals, and both the
  ``serverAuth`` and ``clientAuth`` extended key usages, because relays authenticate each
  other with the same certificate whichever side opened the BEEP session;
* an endpoint certificate carries the endpoint's APEX address (``local@domain``,
  RFC 3340 §2.2) as an ``rfc822Name`` and is usable for ``clientAuth`` only.

Generated keys are ECDSA P-256 signed with SHA-256.  Keys loaded from files may also be
RSA or Ed25519, since certificates from a public CA often use RSA keys.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imxp.apex.address import AddressError, is_literal, normalise_domain

__all__ = [
    "Issued",
    "PrivateKey",
    "client_identity",
    "create_ca",
    "issue_client",
    "issue_smime",
    "issue_server",
    "load_certificates",
    "load_issued",
    "load_key_for",
    "self_signed",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""Private key types a certificate's key may have (generated keys are always P-256)."""

StrPath = str | os.PathLike[str]

# Peers' clocks drift; a certificate that only becomes valid "now" is refused by a peer whose
# clock is a little behind.  Back-dating notBefore slightly avoids that first-minute failure.
_CLOCK_SKEW = timedelta(minutes=5)

# RFC 5280 upper bound (ub-common-name) for the CN attribute.
_MAX_CN_LENGTH = 64


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key and the intermediates a peer needs to verify it.

    ``chain`` lists the issuing certificates from the one that signed ``certificate``
    upwards, excluding the trust anchor; it is empty for a certificate issued directly by a
    root CA or self-signed.  TLS sends it after the certificate (RFC 8446 §4.4.2).
    """

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """The certificate followed by its chain, PEM-encoded (a "fullchain" file)."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.chain)
        )

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: StrPath, key_path: StrPath) -> None:
        """Write :meth:`cert_pem` to ``cert_path`` and :meth:`key_pem` to ``key_path``.

        The key file is created with mode 0600; an existing key file is reset to 0600
        before the new key is written into it.
        """
        Path(cert_path).write_bytes(self.cert_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            # os.open's mode only applies to a newly created file.
            os.fchmod(f.fileno(), 0o600)
            f.write(self.key_pem())


def create_ca(common_name: str, days: int = 3650, *, valid_from: datetime | None = None) -> Issued:
    """Create a self-signed root CA that may sign end-entity certificates only.

    basicConstraints is CA:TRUE with pathLenConstraint 0 and keyUsage is keyCertSign and
    cRLSign (RFC 5280 §4.2.1.9, §4.2.1.3).

    :param valid_from: notBefore; defaults to a few minutes before now.  Tests pass a past
        time together with a small ``days`` to obtain an expired certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    if name is None:
        raise ValueError(f"CA common name must be 1 to {_MAX_CN_LENGTH} characters")
    not_before, not_after = _validity(days, valid_from)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue_server(
    ca: Issued,
    names: Sequence[str],
    days: int = 825,
    ips: Sequence[str] = (),
    *,
    valid_from: datetime | None = None,
    client_auth: bool = True,
) -> Issued:
    """Issue a relay certificate from ``ca``.

    Each of ``names`` becomes a ``dNSName`` (internationalised names are stored as
    A-labels, RFC 6125 §6.4.2) and each of ``ips`` an ``iPAddress`` subjectAltName; the CN
    is the first name.  extendedKeyUsage is serverAuth and clientAuth, so that the relay can
    present the certificate both when accepting and when opening a relay-to-relay session.

    :param valid_from: notBefore; see :func:`create_ca`.
    :param client_auth: False for serverAuth alone, as public CAs now issue server
        certificates; relays accept those from peers too (see ``server_auth_clients`` of
        :func:`imxp.beep.tlsctx.server_options`).
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not a single string")
    dns = [_dns_name(n) for n in names]
    if not dns:
        raise ValueError("a relay certificate needs at least one DNS name")
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return _issue(
        ca,
        common_name=dns[0],
        san=san,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH]
        + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else []),
        days=days,
        valid_from=valid_from,
    )


def issue_client(
    ca: Issued, identity: str, days: int = 825, *, valid_from: datetime | None = None
) -> Issued:
    """Issue an endpoint certificate for the APEX address ``identity`` (``local@domain``).

    The address is stored as the ``rfc822Name`` subjectAltName and as the CN; its domain is
    converted to A-labels.  extendedKeyUsage is clientAuth only: an endpoint never accepts
    TLS connections.

    :param valid_from: notBefore; see :func:`create_ca`.
    """
    address = _mailbox(identity)
    return _issue(
        ca,
        common_name=address,
        san=[x509.RFC822Name(address)],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
        valid_from=valid_from,
    )


def issue_smime(
    ca: Issued,
    address: str,
    days: int = 825,
    *,
    rsa_bits: int | None = 3072,
    valid_from: datetime | None = None,
) -> Issued:
    """Issue an S/MIME certificate for the endpoint ``address`` (``local@domain``).

    The address goes into the subjectAltName as an ``rfc822Name`` (RFC 8550 §3) and as an
    ``im:`` URI (RFC 3923 §6.3); extendedKeyUsage is emailProtection (RFC 8550 §4.4.4).
    With ``rsa_bits`` the key is RSA and keyUsage adds keyEncipherment, so the certificate
    can sign and be encrypted to; with ``rsa_bits=None`` it is ECDSA P-256 and can only
    sign (imxp's S/MIME encryption is RSA key transport).
    """
    address = _mailbox(address)
    return _issue(
        ca,
        common_name=address,
        san=[x509.RFC822Name(address), x509.UniformResourceIdentifier(f"im:{address}")],
        usages=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        days=days,
        valid_from=valid_from,
        key=rsa.generate_private_key(65537, rsa_bits) if rsa_bits else None,
    )


def _mailbox(identity: str) -> str:
    local, at, domain = identity.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"endpoint identity must look like local@domain: {identity!r}")
    if not local.isascii():
        # rfc822Name is an IA5String; internationalised mailboxes need RFC 8398's
        # SmtpUTF8Mailbox, which is not supported here.
        raise ValueError(f"the local part of {identity!r} must be ASCII")
    return f"{local}@{_dns_name(domain)}"


def self_signed(
    names: Sequence[str],
    days: int = 825,
    ips: Sequence[str] = (),
    *,
    valid_from: datetime | None = None,
) -> Issued:
    """Create a self-signed relay certificate for development.

    It carries the same names and usages as :func:`issue_server` and is not a CA; a peer
    trusts it by listing the certificate itself among its trust roots.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not a single string")
    dns = [_dns_name(n) for n in names]
    if not dns:
        raise ValueError("a relay certificate needs at least one DNS name")
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(dns[0]) or x509.Name([])
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    not_before, not_after = _validity(days, valid_from)
    certificate = (
        _leaf_builder(
            key,
            subject=name,
            san=san,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
            not_after=not_after,
        )
        .issuer_name(name)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def load_certificates(path: StrPath) -> list[x509.Certificate]:
    """Read every certificate from a PEM file (a CA bundle or a fullchain file), in order.

    :raises ValueError: if the file holds no PEM certificate.
    """
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        # Roots in every system bundle (Go Daddy and Starfield G2, among others) have serial
        # number 0, which RFC 5280 §4.1.2.2 forbids and cryptography warns of on each load:
        # a line on stderr at every start of a relay that trusts them. They are the trust
        # store's business, and OpenSSL verifies with them as it always has.
        warnings.filterwarnings(
            "ignore", "Parsed a serial number which wasn't positive", CryptographyDeprecationWarning
        )
        return x509.load_pem_x509_certificates(data)


def load_issued(cert_path: StrPath, key_path: StrPath) -> Issued:
    """Load a certificate with its key, as written by :meth:`Issued.write`.

    The first certificate in ``cert_path`` is the end-entity certificate; any further ones
    are its chain.

    :raises ValueError: if either file holds no PEM certificate or key, or the key does
        not belong to the certificate.
    :raises TypeError: if the key is of a type other than EC, RSA or Ed25519.
    """
    return load_key_for(load_certificates(cert_path), key_path)


def load_key_for(chain: Sequence[x509.Certificate], key_path: StrPath) -> Issued:
    """``chain`` (the end-entity certificate first, as :func:`load_certificates` reads it)
    with its key from ``key_path``. For callers that read the certificates first, so that
    what is wrong is told of the file that is wrong.

    :raises ValueError: if the file holds no PEM key, or one not of ``chain[0]``.
    :raises TypeError: if the key is of a type other than EC, RSA or Ed25519.
    """
    first, *rest = chain
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    if not isinstance(key, PrivateKey):
        raise TypeError(f"unsupported private key type {type(key).__name__} in {key_path}")
    if _spki(key.public_key()) != _spki(first.public_key()):
        raise ValueError(
            f"the key in {key_path} does not belong to the certificate of "
            f"{first.subject.rfc4514_string()}"
        )
    return Issued(first, key, tuple(rest))


def client_identity(cert: x509.Certificate) -> str | None:
    """The identity a peer's certificate claims, for authorisation decisions.

    That is the first ``rfc822Name`` (an endpoint's address), else the first ``dNSName`` (a
    relay), else the subject CN.  RFC 6125 §6.4.4 says to consult the CN only when the
    certificate has no subjectAltName of a supported type; this does the same.  Returns
    None when the certificate names nobody.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.RFC822Name, x509.DNSName):
            values = san.get_values_for_type(kind)
            if values:
                return values[0]
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _issue(
    ca: Issued,
    *,
    common_name: str,
    san: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
    valid_from: datetime | None,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days, valid_from)
    subject = _name(common_name) or x509.Name([])
    certificate = (
        _leaf_builder(
            key,
            subject=subject,
            san=san,
            usages=usages,
            not_before=not_before,
            not_after=not_after,
        )
        .issuer_name(ca.certificate.subject)
        .add_extension(_authority_key_identifier(ca.certificate), critical=False)
        .sign(ca.key, _signature_hash(ca.key))
    )
    # A root is the peer's trust anchor and is not sent; an intermediate CA and whatever
    # chain it came with must be, or peers that trust only the root cannot build a path.
    chain = () if _is_self_issued(ca.certificate) else (ca.certificate, *ca.chain)
    return Issued(certificate, key, chain)


def _leaf_builder(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    subject: x509.Name,
    san: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # An RSA key can also be encrypted to (S/MIME key transport).
        .add_extension(
            _key_usage(cert_sign=False, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # RFC 5280 §4.2.1.6: with an empty subject the SAN extension must be critical.
        .add_extension(x509.SubjectAlternativeName(san), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _key_usage(*, cert_sign: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; a separate digest must not be given.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _validity(days: int, valid_from: datetime | None) -> tuple[datetime, datetime]:
    if days <= 0:
        raise ValueError("days must be positive")
    if valid_from is None:
        not_before = datetime.now(UTC) - _CLOCK_SKEW
    elif valid_from.tzinfo is None:
        raise ValueError("valid_from must be timezone-aware")
    else:
        not_before = valid_from.astimezone(UTC)
    try:
        return not_before, not_before + timedelta(days=days)
    except OverflowError:
        # X.509 times end with the year 9999 (RFC 5280 §4.1.2.5), as Python's do.
        raise ValueError(f"{days} days from {not_before:%Y-%m-%d} is past the year 9999") from None


def _name(common_name: str) -> x509.Name | None:
    # Long DNS names fit in a dNSName but not in a CN; such a certificate simply has no CN.
    if not 0 < len(common_name) <= _MAX_CN_LENGTH:
        return None
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _dns_name(name: str) -> str:
    """``name`` as stored in a dNSName: lower case, A-labels, no trailing dot; a host name
    (RFC 3340 §2.2's domain, as relays compare it), or one below a ``*.`` wildcard.

    Raises ValueError for anything else: a certificate naming ``bad domain`` or an
    address (which is an ``iPAddress``) would be made, and no relay would ever match it.
    """
    wildcard, rest = ("*.", name[2:]) if name.startswith("*.") else ("", name)
    if is_literal(rest):
        raise ValueError(f"{name!r} is an address literal: an address is an IP name, not a DNS one")
    try:
        return wildcard + normalise_domain(rest)
    except AddressError as e:
        raise ValueError(f"{name!r} is not a DNS name: {e}") from None


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
