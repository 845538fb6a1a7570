"""S/MIME 4.0 (RFC 8551): imxp.e2e.smime against itself and against ``openssl cms``."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms, core, util
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from imxp.certs import Issued, create_ca, issue_client
from imxp.e2e import smime
from imxp.e2e.protect import (
    E2EError,
    base64_lines,
    build_multipart,
    content_from_entity,
    split_entity,
    split_multipart,
)

ENTITY = (
    b"Content-Type: message/cpim\r\n\r\n"
    b"From: <im:fred@a.test>\r\nTo: <im:barney@b.test>\r\nDateTime: 2024-05-01T12:00:00Z\r\n"
    b'\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\nYabba dabba doo! \xc3\xa9\r\n'
)
STATUSES = ("plain", "signed", "bad-signature", "encrypted", "signed-encrypted", "cannot-decrypt")


@pytest.fixture(scope="module")
def ca() -> Issued:
    return create_ca("imxp S/MIME test CA")


@pytest.fixture(scope="module")
def fred(ca: Issued) -> Issued:
    return smime.issue_smime(ca, "fred@a.test", rsa_bits=2048)


@pytest.fixture(scope="module")
def barney(ca: Issued) -> Issued:
    return smime.issue_smime(ca, "barney@b.test", rsa_bits=2048)


@pytest.fixture(scope="module")
def trust(ca: Issued) -> list[x509.Certificate]:
    return [ca.certificate]


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, ca: Issued, fred: Issued, barney: Issued
) -> Path:
    """The CA, Fred's and Barney's certificates and keys as PEM files, for openssl."""
    base = tmp_path_factory.mktemp("smime")
    (base / "ca.pem").write_bytes(ca.cert_pem())
    fred.write(base / "fred.pem", base / "fred.key")
    barney.write(base / "barney.pem", base / "barney.key")
    return base


def openssl(*args: str | Path, data: bytes = b"") -> bytes:
    return subprocess.run(
        ["openssl", "cms", *map(str, args)], input=data, capture_output=True, check=True, timeout=60
    ).stdout


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def der_of(protected: bytes) -> bytes:
    return content_from_entity(protected)[1]


# -- certificates ---------------------------------------------------------------------------


def test_issued_certificate_is_for_email_protection(fred: Issued, ca: Issued) -> None:
    cert = fred.certificate
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and key_usage.key_encipherment
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.RFC822Name) == ["fred@a.test"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["im:fred@a.test"]
    ec = smime.issue_smime(ca, "Wilma@A.Test", rsa_bits=None)
    assert not ec.certificate.extensions.get_extension_for_class(
        x509.KeyUsage
    ).value.key_encipherment
    assert smime.open(smime.sign(ENTITY, ec), trust=[ca.certificate]).signer == "Wilma@a.test"


# -- round trips ----------------------------------------------------------------------------


def test_detached_signature_round_trip(fred: Issued, trust: list[x509.Certificate]) -> None:
    protected = smime.sign(ENTITY, fred)
    headers, body = split_entity(protected)
    assert headers.get_content_type() == "multipart/signed"
    assert headers.get_param("protocol") == "application/pkcs7-signature"
    assert headers.get_param("micalg") == "sha-256"
    parts = split_multipart(body, headers.get_param("boundary"))
    assert parts[0] == ENTITY  # RFC 8551 §3.5.3: the first part is the content, untouched

    opened = smime.open(protected, trust=trust)
    assert opened.status == "signed"
    assert opened.entity == ENTITY
    assert opened.signer == "fred@a.test"
    assert opened.identities == ("fred@a.test",)
    assert opened.fingerprint == fred.certificate.fingerprint(hashes.SHA256()).hex().upper()
    assert opened.signed_at is not None
    assert abs(opened.signed_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_a_signing_time_that_is_no_time_is_a_bad_signature(
    fred: Issued, trust: list[x509.Certificate]
) -> None:
    """RFC 5652 §11.3's signingTime in the year 0, signed by a certificate the recipient
    trusts: asn1crypto gives it as a type that is no datetime, which the Report's
    signed_at promises, and `imxp listen --json` could not write. It is refused, named."""
    headers, body = split_entity(smime.sign(ENTITY, fred))
    content, signature = split_multipart(body, headers.get_param("boundary"))
    info = cms.ContentInfo.load(base64.b64decode(split_entity(signature)[1]))
    signer_info = info["content"]["signer_infos"][0]
    year_0 = core.GeneralizedTime(util.extended_datetime(0, 1, 1, tzinfo=UTC))
    attributes = cms.CMSAttributes(
        [a for a in signer_info["signed_attrs"] if a["type"].native != "signing_time"]
        + [
            cms.CMSAttribute(
                {"type": "signing_time", "values": [cms.Time({"generalized_time": year_0})]}
            )
        ]
    )
    signed = b"\x31" + attributes.dump(force=True)[1:]  # as a SET OF (RFC 5652 §5.4)
    signer_info["signed_attrs"] = attributes
    signer_info["signature"] = fred.key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    part = (
        b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\n" + base64_lines(info.dump(force=True))
    )
    params = [("protocol", "application/pkcs7-signature"), ("micalg", "sha-256")]

    opened = smime.open(build_multipart("signed", params, [content, part]), trust=trust)

    assert (opened.status, opened.signed_at) == ("bad-signature", None)
    assert opened.reason.startswith("the signingTime attribute is no time: 0000-01-01")


def test_opaque_signature_round_trip(fred: Issued, trust: list[x509.Certificate]) -> None:
    protected = smime.sign(ENTITY, fred, detached=False)
    headers, _ = split_entity(protected)
    assert headers.get_content_type() == "application/pkcs7-mime"
    assert headers.get_param("smime-type") == "signed-data"
    opened = smime.open(protected, trust=trust)
    assert (opened.status, opened.entity, opened.signer) == ("signed", ENTITY, "fred@a.test")


def test_encrypt_round_trip_is_aes_gcm(
    fred: Issued, barney: Issued, trust: list[x509.Certificate]
) -> None:
    protected = smime.encrypt(ENTITY, [barney.certificate, fred.certificate])
    headers, _ = split_entity(protected)
    assert headers.get_param("smime-type") == "authEnveloped-data"
    info = cms.ContentInfo.load(der_of(protected))
    envelope = info["content"]
    assert info["content_type"].native == "authenticated_enveloped_data"
    algorithm = envelope["auth_encrypted_content_info"]["content_encryption_algorithm"]
    assert algorithm["algorithm"].native == "aes256_gcm"
    transports = [ri.chosen["key_encryption_algorithm"]["algorithm"].native for ri in
                  envelope["recipient_infos"]]  # fmt: skip
    assert transports == ["rsaes_oaep", "rsaes_oaep"]

    for reader in (barney, fred):
        opened = smime.open(protected, trust=trust, key=reader)
        assert (opened.status, opened.entity, opened.signer) == ("encrypted", ENTITY, None)
        assert opened.reason == ""


def test_signed_then_encrypted(fred: Issued, barney: Issued, trust: list[x509.Certificate]) -> None:
    """RFC 8551 §3.7: sign first, then encrypt; opening verifies the inner signature too."""
    for detached in (True, False):
        protected = smime.encrypt(smime.sign(ENTITY, fred, detached), [barney.certificate])
        opened = smime.open(protected, trust=trust, key=barney)
        assert (opened.status, opened.entity, opened.signer) == (
            "signed-encrypted",
            ENTITY,
            "fred@a.test",
        )


def test_ecdsa_signer(ca: Issued, trust: list[x509.Certificate]) -> None:
    wilma = smime.issue_smime(ca, "wilma@a.test", rsa_bits=None)
    opened = smime.open(smime.sign(ENTITY, wilma), trust=trust)
    assert (opened.status, opened.signer) == ("signed", "wilma@a.test")
    with pytest.raises(E2EError, match="RSA"):
        smime.encrypt(ENTITY, [wilma.certificate])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey | rsa_keys.RSAPrivateKey
) -> x509.CertificateBuilder:
    """A certificate for ``key`` of ``subject`` from ``issuer``, valid from five minutes
    ago for 30 days, without extensions yet."""
    now = datetime.now(UTC) - timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
    )


def _ca(
    name: str,
    issuer: Issued | None,
    path_length: int,
    constraints: x509.NameConstraints | None = None,
) -> Issued:
    """A CA certificate as RFC 5280 §4.2.1.3 and §4.2.1.9 want it, confined to
    ``constraints`` (§4.2.1.10) when they are given."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer = issuer or Issued(x509.CertificateBuilder().subject_name(subject), key)  # type: ignore[arg-type]
    builder = (
        _builder(subject, issuer.certificate.subject if issuer else subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if constraints:
        builder = builder.add_extension(constraints, critical=True)
    return Issued(builder.sign(signer.key, hashes.SHA256()), key)


def test_intermediate_ca_chain_is_carried() -> None:
    root = _ca("imxp S/MIME root", None, 1)
    intermediate = _ca("imxp S/MIME sub-CA", root, 0)
    dino = smime.issue_smime(intermediate, "dino@a.test", rsa_bits=None)
    assert dino.chain == (intermediate.certificate,)
    opened = smime.open(smime.sign(ENTITY, dino), trust=[root.certificate])
    assert (opened.status, opened.signer) == ("signed", "dino@a.test")


def _issued_by(
    ca: Issued, names: list[x509.GeneralName], email: str | None = None, *, rsa: bool = False
) -> Issued:
    """An S/MIME certificate from ``ca`` with the subjectAltName ``names`` (none if empty)
    and, given ``email``, a subject emailAddress (RFC 8550 §3): for signing, and with
    ``rsa`` for encryption too."""
    key = (
        rsa_keys.generate_private_key(65537, 2048)
        if rsa
        else ec.generate_private_key(ec.SECP256R1())
    )
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, "signer")]
    if email:
        subject.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    builder = (
        _builder(x509.Name(subject), ca.certificate.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, rsa, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key, (ca.certificate,))


def test_a_ca_confined_to_a_domain_vouches_for_no_address_outside_it() -> None:
    """RFC 5280 §4.2.1.10: a sub-CA whose rfc822Name constraints confine it to a.test
    (an S/MIME CA "technically constrained" to one organisation's addresses). The chain
    verifier holds the rfc822Names of the subjectAltName to them; the im: URIs and the
    subject's emailAddress, which name the sender here too, must keep to them as well,
    or that CA could sign as anyone at any domain."""
    root = _ca("imxp S/MIME root", None, 1)
    permitted = x509.NameConstraints(
        permitted_subtrees=[x509.RFC822Name("a.test")], excluded_subtrees=None
    )
    confined = _ca("imxp S/MIME a.test CA", root, 0, permitted)
    boss = ENTITY.replace(b"fred@a.test", b"boss@b.test")
    for names, email in [
        ([x509.RFC822Name("wilma@a.test"), x509.UniformResourceIdentifier("im:boss@b.test")], None),
        ([x509.UniformResourceIdentifier("im:boss@b.test")], None),
        ([x509.RFC822Name("wilma@a.test")], "boss@b.test"),
        ([], "boss@b.test"),
    ]:
        opened = smime.open(
            smime.sign(boss, _issued_by(confined, names, email)), trust=[root.certificate]
        )
        assert opened.status == "signed"
        assert "boss@b.test" not in opened.identities
        assert opened.signer != "boss@b.test"
        assert opened.identities in ((), ("wilma@a.test",))

    # What it may vouch for, it does.
    inside = _issued_by(
        confined, [x509.UniformResourceIdentifier("im:fred/appl=im@a.test")], "fred@a.test"
    )
    opened = smime.open(smime.sign(ENTITY, inside), trust=[root.certificate])
    assert opened.identities == ("fred/appl=im@a.test", "fred@a.test")
    excluded = x509.NameConstraints(
        permitted_subtrees=None,
        excluded_subtrees=[x509.RFC822Name(".b.test"), x509.RFC822Name("boss@a.test")],
    )
    barred = _ca("imxp S/MIME CA with exclusions", root, 0, excluded)
    names = [
        x509.UniformResourceIdentifier(f"im:{who}")
        for who in ("boss/x@a.test", "x@sub.b.test", "x@b.test")
    ]
    opened = smime.open(smime.sign(ENTITY, _issued_by(barred, names)), trust=[root.certificate])
    assert opened.identities == ("x@b.test",)


def test_a_ca_confined_to_a_domain_is_not_encrypted_to_for_an_address_outside_it() -> None:
    """The sending side of the test above: a certificate for wilma@a.test from the CA
    confined to a.test, with im:barney@b.test too, is not encrypted to for barney, since
    whoever holds its key could read what was meant for him."""
    root = _ca("imxp S/MIME root", None, 1)
    permitted = x509.NameConstraints(
        permitted_subtrees=[x509.RFC822Name("a.test")], excluded_subtrees=None
    )
    confined = _ca("imxp S/MIME a.test CA", root, 0, permitted)
    foreign = _issued_by(
        confined,
        [x509.RFC822Name("wilma@a.test"), x509.UniformResourceIdentifier("im:barney@b.test")],
        rsa=True,
    )
    given = [foreign.certificate, confined.certificate]
    with pytest.raises(E2EError, match=r"for barney@b\.test: .*RFC 5280 §4\.2\.1\.10"):
        smime.encryption_certificates(["barney@b.test"], given, (root.certificate,))
    assert smime.encryption_certificates(["wilma@a.test"], given, (root.certificate,)) == [
        foreign.certificate
    ]


# -- what goes wrong --------------------------------------------------------------------------


def test_one_flipped_byte_in_signed_content_is_detected(
    fred: Issued, trust: list[x509.Certificate]
) -> None:
    protected = smime.sign(ENTITY, fred)
    opened = smime.open(flip(protected, protected.index(b"Yabba")), trust=trust)
    assert opened.status == "bad-signature"
    assert "messageDigest" in opened.reason
    assert opened.entity == b""


def test_one_flipped_byte_in_opaque_content_is_detected(
    fred: Issued, trust: list[x509.Certificate]
) -> None:
    der = der_of(smime.sign(ENTITY, fred, detached=False))
    tampered = flip(der, der.index(b"Yabba"))
    entity = b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n\r\n" + tampered
    assert smime.open(entity, trust=trust).status == "bad-signature"


def test_one_flipped_byte_in_ciphertext_is_detected(
    fred: Issued, barney: Issued, trust: list[x509.Certificate]
) -> None:
    der = der_of(smime.encrypt(ENTITY, [barney.certificate]))
    # The last octets before the 16-octet tag and its header are ciphertext.
    tampered = flip(der, len(der) - 30)
    entity = b"Content-Type: application/pkcs7-mime\r\n\r\n" + tampered
    opened = smime.open(entity, trust=trust, key=barney)
    assert opened.status == "cannot-decrypt"
    assert "altered" in opened.reason


def test_wrong_key_cannot_decrypt_cleanly(
    fred: Issued, barney: Issued, trust: list[x509.Certificate]
) -> None:
    protected = smime.encrypt(ENTITY, [barney.certificate])
    opened = smime.open(protected, trust=trust, key=fred)
    assert (opened.status, opened.entity) == ("cannot-decrypt", b"")
    assert "not encrypted to this certificate" in opened.reason
    assert smime.open(protected, trust=trust).status == "cannot-decrypt"


def test_signature_part_must_be_detached(fred: Issued, trust: list[x509.Certificate]) -> None:
    """An opaque SignedData where the detached signature goes is refused, whatever it
    carries: it would vouch for its own content, not for the part beside it."""
    opaque = der_of(smime.sign(ENTITY, fred, detached=False))
    detached = smime.sign(ENTITY.replace(b"Yabba", b"Pay me"), fred)
    signature_at = detached.index(b"Content-Type: application/pkcs7-signature")
    forged = (
        detached[:signature_at]
        + b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(opaque).replace(b"\n", b"\r\n")
        + detached[detached.index(b"\r\n--", signature_at) :]
    )
    opened = smime.open(forged, trust=trust)
    assert opened.status == "bad-signature"
    assert "also carries content" in opened.reason


def test_untrusted_signers_are_refused(fred: Issued, ca: Issued) -> None:
    other_ca = create_ca("someone else's CA")
    mallory = smime.issue_smime(other_ca, "fred@a.test", rsa_bits=None)
    opened = smime.open(smime.sign(ENTITY, mallory), trust=[ca.certificate])
    assert opened.status == "bad-signature"
    assert "not trusted" in opened.reason

    # RFC 8550 §4.4.4: a TLS client certificate is not for e-mail protection.
    client = issue_client(ca, "fred@a.test")
    opened = smime.open(smime.sign(ENTITY, client), trust=[ca.certificate])
    assert opened.status == "bad-signature"
    assert "emailProtection" in opened.reason

    expired = smime.issue_smime(
        ca, "fred@a.test", 1, rsa_bits=None, valid_from=datetime.now(UTC) - timedelta(days=3)
    )
    assert smime.open(smime.sign(ENTITY, expired), trust=[ca.certificate]).status == (
        "bad-signature"
    )
    assert "no S/MIME trust anchors" in smime.open(smime.sign(ENTITY, fred), trust=[]).reason


def test_ed25519_keys_cannot_sign(ca: Issued) -> None:
    ed = Issued(ca.certificate, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(E2EError, match="RSA or ECDSA"):
        smime.sign(ENTITY, ed)
    with pytest.raises(E2EError, match="at least one"):
        smime.encrypt(ENTITY, [])


JUNK = [
    b"",
    b"\x00\xff",
    b"Content-Type: text/plain\r\n\r\nplain",
    b"Content-Type: application/pkcs7-mime\r\n\r\n",
    b"Content-Type: application/pkcs7-mime\r\n\r\n\x30\x03\x06\x01\x00",
    b"Content-Type: application/pkcs7-mime\r\nContent-Transfer-Encoding: base64\r\n\r\n!!",
    b"Content-Type: application/pkcs7-mime\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n",
    b"Content-Type: application/pkcs7-mime\r\n\r\n\x30\x80\x06\x09\x2a\x86\x48\x86\xf7\x0d",
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"\r\n\r\n',
    b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=b\r\n'
    b"\r\n--b\r\nhi\r\n--b\r\nContent-Type: application/pkcs7-signature\r\n\r\n\x30\x00\r\n--b--",
    b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=b\r\n\r\n',
]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_gives_a_verdict_never_an_exception(
    barney: Issued, trust: list[x509.Certificate], junk: bytes
) -> None:
    opened = smime.open(junk, trust=trust, key=barney)
    assert opened.status in ("plain", "bad-signature", "cannot-decrypt")
    if opened.status != "plain":
        assert opened.reason and opened.entity == b""


BINARY_CMS = b"Content-Type: application/pkcs7-mime\r\n\r\n"


@pytest.fixture(scope="module")
def samples(fred: Issued, barney: Issued) -> list[bytes]:
    """Each kind of entity this module makes, CMS as binary DER as APEX carries it."""
    return [
        smime.sign(ENTITY, fred),
        BINARY_CMS + der_of(smime.sign(ENTITY, fred, detached=False)),
        BINARY_CMS + der_of(smime.encrypt(ENTITY, [barney.certificate])),
        BINARY_CMS + der_of(smime.encrypt(smime.sign(ENTITY, fred), [barney.certificate])),
    ]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_messages_never_raise(
    barney: Issued, trust: list[x509.Certificate], samples: list[bytes], data: st.DataObject
) -> None:
    sample = data.draw(st.sampled_from(samples))
    at = data.draw(st.integers(0, len(sample) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "byte"]))
    if how == "flip":
        mutated = flip(sample, at)
    elif how == "cut":
        mutated = sample[:at]
    else:
        mutated = sample[:at] + bytes([data.draw(st.integers(0, 255))]) + sample[at + 1 :]
    opened = smime.open(mutated, trust=trust, key=barney)
    assert opened.status in STATUSES
    if opened.status in ("signed", "encrypted", "signed-encrypted"):
        # Whatever still opens must be exactly what was protected.
        assert opened.entity == ENTITY


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_never_raise(
    barney: Issued, trust: list[x509.Certificate], junk: bytes
) -> None:
    for head in (b"Content-Type: application/pkcs7-mime\r\n\r\n", b""):
        assert smime.open(head + junk, trust=trust, key=barney).status in STATUSES


# -- interoperability with openssl cms --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "status", "reason"),
    [
        ([], "signed", ""),
        (["-nodetach"], "signed", ""),  # opaque
        (["-noattr"], "signed", ""),  # signature over the content itself (RFC 5652 §5.4)
        (["-keyopt", "rsa_padding_mode:pss"], "signed", ""),
        (["-md", "sha1"], "bad-signature", "sha1 is not accepted"),
        (["-nocerts"], "bad-signature", "certificate is not in the message"),
    ],
)
def test_openssl_signatures_verified_by_imxp(
    files: Path, trust: list[x509.Certificate], options: list[str], status: str, reason: str
) -> None:
    signer = ["-signer", files / "fred.pem", "-inkey", files / "fred.key"]
    opened = smime.open(openssl("-sign", *signer, *options, data=ENTITY), trust=trust)
    assert opened.status == status
    assert reason in opened.reason
    if status == "signed":
        assert (opened.entity, opened.signer) == (ENTITY, "fred@a.test")


@pytest.mark.parametrize(
    "options",
    [["-aes-256-gcm"], ["-aes-128-gcm", "-keyopt", "rsa_padding_mode:oaep"], ["-aes-256-cbc"]],
)
def test_openssl_encryption_decrypted_by_imxp(
    files: Path, barney: Issued, trust: list[x509.Certificate], options: list[str]
) -> None:
    made = openssl("-encrypt", *options[:1], "-recip", files / "barney.pem", *options[1:],
                   data=ENTITY)  # fmt: skip
    opened = smime.open(made, trust=trust, key=barney)
    assert (opened.status, opened.entity) == ("encrypted", ENTITY)
    if "cbc" in options[0]:
        assert "without integrity protection" in opened.reason


def test_openssl_sign_then_encrypt_opened_by_imxp(
    files: Path, barney: Issued, trust: list[x509.Certificate]
) -> None:
    signed = openssl("-sign", "-signer", files / "fred.pem", "-inkey", files / "fred.key",
                     data=ENTITY)  # fmt: skip
    made = openssl("-encrypt", "-aes-256-gcm", files / "barney.pem", data=signed)
    opened = smime.open(made, trust=trust, key=barney)
    assert (opened.status, opened.entity, opened.signer) == (
        "signed-encrypted",
        ENTITY,
        "fred@a.test",
    )


def test_openssl_3des_is_refused(
    files: Path, barney: Issued, trust: list[x509.Certificate]
) -> None:
    made = openssl("-encrypt", "-des3", files / "barney.pem", data=ENTITY)
    opened = smime.open(made, trust=trust, key=barney)
    assert opened.status == "cannot-decrypt"
    assert "tripledes" in opened.reason


def test_imxp_signatures_verified_by_openssl(files: Path, fred: Issued) -> None:
    # No -binary: openssl then splits the multipart by RFC 2046 (CRLF before the boundary
    # belongs to it); the entity is all CRLF already, so its canonical form is itself.
    for detached in (True, False):
        verified = openssl("-verify", "-CAfile", files / "ca.pem",
                           data=smime.sign(ENTITY, fred, detached))  # fmt: skip
        assert verified == ENTITY


def test_imxp_encryption_decrypted_by_openssl(files: Path, barney: Issued) -> None:
    decrypted = openssl(
        "-decrypt", "-recip", files / "barney.pem", "-inkey", files / "barney.key",
        data=smime.encrypt(ENTITY, [barney.certificate]),
    )  # fmt: skip
    assert decrypted == ENTITY


def test_imxp_der_is_what_openssl_reads(files: Path, fred: Issued) -> None:
    """The binary form carried over APEX is plain DER CMS."""
    der = der_of(smime.sign(ENTITY, fred, detached=False))
    out = openssl("-verify", "-inform", "DER", "-CAfile", files / "ca.pem", data=der)
    assert out == ENTITY
    assert (
        x509.load_pem_x509_certificate((files / "fred.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        in der
    )
