"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import settings
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from imxp.certs import Issued, create_ca, issue_server

# A property holds or not however long an example takes: Hypothesis's default deadline of
# 200 ms per example measures the machine, and a loaded CI runner exceeds it at random.
settings.register_profile("imxp", deadline=None)
settings.load_profile("imxp")


@pytest.fixture(scope="session")
def test_ca() -> Issued:
    """A root CA that every certificate issued by the test suite chains to."""
    return create_ca("imxp test CA")


@pytest.fixture(scope="session")
def server_cert(test_ca: Issued) -> Callable[..., Issued]:
    """``server_cert("relay.a.test", ...)``: a relay certificate from ``test_ca``.

    Certificates are cached per tuple of names for the whole session, since key generation
    dominates the cost of TLS tests.
    """
    cache: dict[tuple[str, ...], Issued] = {}

    def issue(*names: str) -> Issued:
        if names not in cache:
            cache[names] = issue_server(test_ca, names)
        return cache[names]

    return issue


@pytest.fixture(scope="session")
def root_and_intermediate() -> tuple[x509.Certificate, Issued]:
    """A root CA certificate and an intermediate CA (with key) that it signed.

    Built by hand because :func:`imxp.certs.create_ca` makes roots with pathLen 0, which
    cannot have intermediates; real deployments with public CAs do have them.
    """
    now = datetime.now(UTC) - timedelta(minutes=5)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imxp test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imxp test sub-CA")]))
        .issuer_name(root_name)
        .public_key(mid_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(mid_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return root, Issued(mid, mid_key)


pytest_plugins = ["dnsserver"]


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """The structured log events (those with an ``event`` key) emitted during the test."""
    captured: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if "event" in event:
            captured.append(event)

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)
