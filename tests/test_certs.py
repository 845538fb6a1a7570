"""Unit tests for imxp.certs: what goes into certificates, and reading/writing them."""

from __future__ import annotations

import ipaddress
import os
import stat
import warnings
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imxp.certs import (
    Issued,
    client_identity,
    create_ca,
    issue_client,
    issue_server,
    load_certificates,
    load_issued,
    load_key_for,
    self_signed,
)


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def test_ca_is_a_root_limited_to_signing_end_entities(test_ca: Issued) -> None:
    cert = test_ca.certificate
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is True
    assert basic.value.path_length == 0
    usage = ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(test_ca.key.public_key())
    )
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(test_ca.key, ec.EllipticCurvePrivateKey)
    assert test_ca.key.curve.name == "secp256r1"
    assert test_ca.chain == ()


def test_ca_default_lifetime_is_ten_years() -> None:
    cert = create_ca("lifetime CA").certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650)
    assert cert.not_valid_before_utc <= datetime.now(UTC)


def test_server_certificate_names_usages_and_issuer(test_ca: Issued) -> None:
    issued = issue_server(test_ca, ["relay.a.test", "a.test"], ips=["192.0.2.1", "2001:db8::1"])
    cert = issued.certificate

    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["relay.a.test", "a.test"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    assert common_names(cert) == ["relay.a.test"]

    eku = list(ext(cert, x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert ext(cert, x509.KeyUsage).value.digital_signature

    assert cert.issuer == test_ca.certificate.subject
    cert.verify_directly_issued_by(test_ca.certificate)
    ca_ski = ext(test_ca.certificate, x509.SubjectKeyIdentifier).value
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=825)
    assert issued.chain == ()


def test_each_certificate_gets_a_fresh_key_and_serial(test_ca: Issued) -> None:
    first = issue_server(test_ca, ["relay.a.test"])
    second = issue_server(test_ca, ["relay.a.test"])
    assert first.certificate.serial_number != second.certificate.serial_number
    assert first.certificate.public_key() != second.certificate.public_key()


def test_server_names_are_stored_as_lowercase_a_labels(test_ca: Issued) -> None:
    cert = issue_server(test_ca, ["Relay.Bücher.TEST.", "*.bücher.test"]).certificate
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "relay.xn--bcher-kva.test",
        "*.xn--bcher-kva.test",
    ]


def test_server_names_must_be_a_non_empty_sequence(test_ca: Issued) -> None:
    with pytest.raises(TypeError):
        issue_server(test_ca, "relay.a.test")
    with pytest.raises(ValueError):
        issue_server(test_ca, [])


def test_name_too_long_for_cn_leaves_subject_empty_and_san_critical(test_ca: Issued) -> None:
    long_name = "r" * 60 + ".a.test"
    cert = issue_server(test_ca, [long_name]).certificate
    assert len(cert.subject) == 0
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_client_certificate_carries_the_address(test_ca: Issued) -> None:
    issued = issue_client(test_ca, "fred@a.test")
    cert = issued.certificate
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name) == [
        "fred@a.test"
    ]
    assert common_names(cert) == ["fred@a.test"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(test_ca.certificate)
    assert client_identity(cert) == "fred@a.test"


def test_client_address_with_subaddress_and_idn_domain(test_ca: Issued) -> None:
    cert = issue_client(test_ca, "fred/work@Bücher.test").certificate
    assert client_identity(cert) == "fred/work@xn--bcher-kva.test"


@pytest.mark.parametrize("identity", ["fred", "@a.test", "fred@", "frédéric@a.test"])
def test_client_identity_must_be_an_ascii_local_part_at_a_domain(
    test_ca: Issued, identity: str
) -> None:
    with pytest.raises(ValueError):
        issue_client(test_ca, identity)


def test_client_identity_of_a_relay_is_its_first_dns_name(test_ca: Issued) -> None:
    cert = issue_server(test_ca, ["relay.b.test", "b.test"]).certificate
    assert client_identity(cert) == "relay.b.test"


def _bare_certificate(subject: x509.Name) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_client_identity_falls_back_to_cn_then_none() -> None:
    named = _bare_certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy")]))
    assert client_identity(named) == "legacy"
    assert client_identity(_bare_certificate(x509.Name([]))) is None


def test_valid_from_override_makes_an_expired_certificate(test_ca: Issued) -> None:
    start = datetime.now(UTC) - timedelta(days=30)
    cert = issue_server(test_ca, ["relay.a.test"], days=1, valid_from=start).certificate
    assert cert.not_valid_before_utc == start.replace(microsecond=0)
    assert cert.not_valid_after_utc == (start + timedelta(days=1)).replace(microsecond=0)
    assert cert.not_valid_after_utc < datetime.now(UTC)


def test_valid_from_must_be_timezone_aware(test_ca: Issued) -> None:
    with pytest.raises(ValueError):
        issue_client(test_ca, "fred@a.test", valid_from=datetime(2020, 1, 1))


def test_self_signed_development_certificate() -> None:
    issued = self_signed(["relay.dev.test"], ips=["127.0.0.1"])
    cert = issued.certificate
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert ext(cert, x509.BasicConstraints).value.ca is False
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.dev.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = list(ext(cert, x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_leaf_from_an_intermediate_carries_the_intermediate_as_chain(
    root_and_intermediate: tuple[x509.Certificate, Issued],
) -> None:
    root, intermediate = root_and_intermediate
    leaf = issue_server(intermediate, ["relay.c.test"])
    assert leaf.chain == (intermediate.certificate,)
    leaf.certificate.verify_directly_issued_by(intermediate.certificate)
    assert leaf.cert_pem().count(b"BEGIN CERTIFICATE") == 2
    assert root not in leaf.chain


def test_write_then_load_round_trip(tmp_path, test_ca: Issued) -> None:
    issued = issue_client(test_ca, "fred@a.test")
    cert_path, key_path = tmp_path / "fred.crt", tmp_path / "fred.key"
    issued.write(cert_path, key_path)

    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert cert_path.read_bytes() == issued.cert_pem()
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8

    loaded = load_issued(cert_path, key_path)
    assert loaded.certificate == issued.certificate
    assert loaded.chain == ()
    assert loaded.key.private_numbers() == issued.key.private_numbers()


def test_write_tightens_an_existing_key_file(tmp_path, test_ca: Issued) -> None:
    key_path = tmp_path / "relay.key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    issue_server(test_ca, ["relay.a.test"]).write(tmp_path / "relay.crt", key_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert b"old" not in key_path.read_bytes()


def test_load_issued_keeps_the_chain(
    tmp_path, root_and_intermediate: tuple[x509.Certificate, Issued]
) -> None:
    _, intermediate = root_and_intermediate
    leaf = issue_server(intermediate, ["relay.c.test"])
    leaf.write(tmp_path / "fullchain.pem", tmp_path / "key.pem")
    loaded = load_issued(tmp_path / "fullchain.pem", tmp_path / "key.pem")
    assert loaded.certificate == leaf.certificate
    assert loaded.chain == (intermediate.certificate,)


def test_load_issued_rejects_a_key_of_another_certificate(tmp_path, test_ca: Issued) -> None:
    relay = issue_server(test_ca, ["relay.a.test"])
    other = issue_server(test_ca, ["relay.a.test"])
    (tmp_path / "relay.crt").write_bytes(relay.cert_pem())
    (tmp_path / "other.key").write_bytes(other.key_pem())
    with pytest.raises(ValueError, match="does not belong"):
        load_issued(tmp_path / "relay.crt", tmp_path / "other.key")


def test_a_key_read_for_certificates_already_read_names_whose_it_is_not(
    tmp_path, test_ca: Issued
) -> None:
    """Callers that read the certificate file first (a relay's start, imxp check, the
    CLI's --smime-cert) blame the key file alone; its error says whose key it is not."""
    relay = issue_server(test_ca, ["relay.a.test"])
    other = issue_server(test_ca, ["relay.b.test"])
    (tmp_path / "other.key").write_bytes(other.key_pem())
    with pytest.raises(ValueError) as refused:
        load_key_for([relay.certificate], tmp_path / "other.key")
    assert str(refused.value) == (
        f"the key in {tmp_path / 'other.key'} does not belong to the certificate of CN=relay.a.test"
    )
    (tmp_path / "relay.key").write_bytes(relay.key_pem())
    chain = [relay.certificate, test_ca.certificate]
    loaded = load_key_for(chain, tmp_path / "relay.key")
    assert (loaded.certificate, loaded.chain) == (relay.certificate, (test_ca.certificate,))


def test_load_certificates_reads_a_bundle_in_order(tmp_path, test_ca: Issued) -> None:
    other_ca = create_ca("other CA")
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(
        test_ca.certificate.public_bytes(serialization.Encoding.PEM)
        + other_ca.certificate.public_bytes(serialization.Encoding.PEM)
    )
    assert load_certificates(bundle) == [test_ca.certificate, other_ca.certificate]


# Starfield Root Certificate Authority - G2, in the system trust store of every major
# platform, with serial number 0.
STARFIELD_G2 = """\
-----BEGIN CERTIFICATE-----
MIID3TCCAsWgAwIBAgIBADANBgkqhkiG9w0BAQsFADCBjzELMAkGA1UEBhMCVVMx
EDAOBgNVBAgTB0FyaXpvbmExEzARBgNVBAcTClNjb3R0c2RhbGUxJTAjBgNVBAoT
HFN0YXJmaWVsZCBUZWNobm9sb2dpZXMsIEluYy4xMjAwBgNVBAMTKVN0YXJmaWVs
ZCBSb290IENlcnRpZmljYXRlIEF1dGhvcml0eSAtIEcyMB4XDTA5MDkwMTAwMDAw
MFoXDTM3MTIzMTIzNTk1OVowgY8xCzAJBgNVBAYTAlVTMRAwDgYDVQQIEwdBcml6
b25hMRMwEQYDVQQHEwpTY290dHNkYWxlMSUwIwYDVQQKExxTdGFyZmllbGQgVGVj
aG5vbG9naWVzLCBJbmMuMTIwMAYDVQQDEylTdGFyZmllbGQgUm9vdCBDZXJ0aWZp
Y2F0ZSBBdXRob3JpdHkgLSBHMjCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoC
ggEBAL3twQP89o/8ArFvW59I2Z154qK3A2FWGMNHttfKPTUuiUP3oWmb3ooa/RMg
nLRJdzIpVv257IzdIvpy3Cdhl+72WoTsbhm5iSzchFvVdPtrX8WJpRBSiUZV9Lh1
HOZ/5FSuS/hVclcCGfgXcVnrHigHdMWdSL5stPSksPNkN3mSwOxGXn/hbVNMYq/N
Hwtjuzqd+/x5AJhhdM8mgkBj87JyahkNmcrUDnXMN/uLicFZ8WJ/X7NfZTD4p7dN
dloedl40wOiWVpmKs/B/pM293DIxfJHP4F8R+GuqSVzRmZTRouNjWwl2tVZi4Ut0
HZbUJtQIBFnQmA4O5t78w+wfkPECAwEAAaNCMEAwDwYDVR0TAQH/BAUwAwEB/zAO
BgNVHQ8BAf8EBAMCAQYwHQYDVR0OBBYEFHwMMh+n2TB/xH1oo2Kooc6rB1snMA0G
CSqGSIb3DQEBCwUAA4IBAQARWfolTwNvlJk7mh+ChTnUdgWUXuEok21iXQnCoKjU
sHU48TRqneSfioYmUeYs0cYtbpUgSpIB7LiKZ3sx4mcujJUDJi5DnUox9g61DLu3
4jd/IroAow57UvtruzvE03lRTs2Q9GcHGcg8RnoNAX3FWOdt5oUwF5okxBDgBPfg
8n/Uqgr/Qh037ZTlZFkSIHc40zI+OIF1lnP6aI+xy84fxez6nH7PfrHxBy22/L/K
pL/QlwVKvOoYKAKQvVR4CSFx09F9HdkWsKlhPdAKACL8x3vLCWRFCztAgfd9fDL1
mMpYjn0q7pBZc2T5NnReJaH1ZgUufzkVqSr7UIuOhWn0
-----END CERTIFICATE-----
"""


def test_a_trust_bundle_with_a_root_of_serial_number_0_loads_without_a_warning(
    tmp_path,
) -> None:
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text(STARFIELD_G2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [root] = load_certificates(bundle)
    assert "Starfield Root Certificate Authority - G2" in root.subject.rfc4514_string()


def test_load_certificates_of_a_file_without_certificates_fails(tmp_path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"nothing here\n")
    with pytest.raises(ValueError):
        load_certificates(empty)
