"""imxp.beep.tlsctx over real loopback TCP: certificate checks, protocol floor, client certs.

Each test runs one line echo over TLS between a server built with ``server_options`` and a
client built with ``client_options`` (or a deliberately weak hand-made client), and looks at
what both sides saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from imxp.beep.tlsctx import client_options, peer_certificate, server_options
from imxp.certs import (
    Issued,
    client_identity,
    create_ca,
    issue_client,
    issue_server,
    self_signed,
)

# Guards against a hung handshake turning into a hung test run; not a timing assertion.
HANG_GUARD_SECONDS = 10

ServerCert = Callable[..., Issued]


@implementer(IHandshakeListener)
class EchoServer(LineReceiver):
    def __init__(self) -> None:
        self.handshook = False
        self.peer: x509.Certificate | None = None
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshook = True
        self.peer = peer_certificate(self.transport)

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


class EchoServerFactory(Factory):
    def __init__(self) -> None:
        self.accepted: DeferredQueue[EchoServer] = DeferredQueue()

    def buildProtocol(self, addr: object) -> EchoServer:
        protocol = EchoServer()
        protocol.factory = self
        self.accepted.put(protocol)
        return protocol


@implementer(IHandshakeListener)
class PingClient(LineReceiver):
    def __init__(self) -> None:
        self.reply: bytes | None = None
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.sendLine(b"ping")

    def lineReceived(self, line: bytes) -> None:
        self.reply = line
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


@implementer(IOpenSSLClientConnectionCreator)
class RecordingCreator:
    """Wraps a client creator to keep the OpenSSL connection for inspection afterwards."""

    def __init__(self, inner: IOpenSSLClientConnectionCreator) -> None:
        self.inner = inner
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self.connection = self.inner.clientConnectionForTLS(tlsProtocol)
        return self.connection


def legacy_context(version: int, ciphers: bytes) -> SSL.Context:
    """A context that speaks only ``version`` with only ``ciphers``.

    @SECLEVEL=0 because OpenSSL 3 otherwise refuses TLS < 1.2 and SHA-1 suites itself,
    which would make a refusal prove nothing about our settings.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.set_cipher_list(ciphers + b":@SECLEVEL=0")
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class LegacyClient:
    """A client offering only an outdated protocol version or cipher suites.

    It does not check the server's certificate: what is tested is whether the server
    agrees to talk to it at all.
    """

    def __init__(self, version: int, ciphers: bytes = b"ALL") -> None:
        self.ctx = legacy_context(version, ciphers)
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self.connection = SSL.Connection(self.ctx, None)
        return self.connection


@implementer(IOpenSSLServerConnectionCreator)
class PermissiveServer:
    """A server accepting ``LegacyClient``'s settings: the control for refusal tests."""

    def __init__(self, identity: Issued, version: int, ciphers: bytes = b"ALL") -> None:
        self.ctx = legacy_context(version, ciphers)
        self.ctx.use_certificate(identity.certificate)
        self.ctx.use_privatekey(identity.key)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.ctx, None)


@dataclass
class Outcome:
    reply: bytes | None
    client_reason: Failure
    client_connection: SSL.Connection
    server: EchoServer
    server_reason: Failure

    @property
    def succeeded(self) -> bool:
        return self.reply == b"ping" and self.client_reason.check(ConnectionDone) is not None

    @property
    def client_error(self) -> str:
        return openssl_reasons(self.client_reason)

    @property
    def server_error(self) -> str:
        """Why the server's side failed; for a refusal by the client, the alert it sent.

        A refusing peer names its reason in a TLS alert (RFC 8446 §6.2), which OpenSSL
        reports as "... alert <description>" on the receiving side.
        """
        return openssl_reasons(self.server_reason)


def openssl_reasons(reason: Failure) -> str:
    """The OpenSSL reason strings of an ``SSL.Error``, or "" for any other failure."""
    if not isinstance(reason.value, SSL.Error):
        return ""
    return "; ".join(str(entry[2]) for entry in reason.value.args[0])


async def exchange(
    server: IOpenSSLServerConnectionCreator,
    client: IOpenSSLClientConnectionCreator,
) -> Outcome:
    """Connect once over loopback, send one line, and report what both sides saw."""
    recording = client if isinstance(client, LegacyClient) else RecordingCreator(client)
    factory = EchoServerFactory()
    port = reactor.listenSSL(0, factory, server, interface="127.0.0.1")
    try:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, recording)
        protocol = PingClient()
        await connectProtocol(endpoint, protocol).addTimeout(HANG_GUARD_SECONDS, reactor)
        await protocol.done.addTimeout(HANG_GUARD_SECONDS, reactor)
        accepted = await factory.accepted.get().addTimeout(HANG_GUARD_SECONDS, reactor)
        await accepted.lost.addTimeout(HANG_GUARD_SECONDS, reactor)
    finally:
        await port.stopListening()
    assert recording.connection is not None
    assert protocol.reason is not None and accepted.reason is not None
    return Outcome(protocol.reply, protocol.reason, recording.connection, accepted, accepted.reason)


# --- the server's certificate, as checked by the client (RFC 6125) -------------------------


@pytest_twisted.ensureDeferred
async def test_certificate_naming_the_expected_host_verifies(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test")),
        client_options("relay.a.test", [test_ca.certificate]),
    )
    assert outcome.succeeded, outcome.client_reason
    assert outcome.client_connection.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    # No trust roots were given to the server, so it asked for no client certificate.
    assert outcome.server.handshook
    assert outcome.server.peer is None


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_host_is_refused(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test")),
        client_options("relay.b.test", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert outcome.client_reason.check(VerificationError), outcome.client_reason
    assert not outcome.server.handshook


@pytest_twisted.ensureDeferred
async def test_any_listed_name_verifies(test_ca: Issued, server_cert: ServerCert) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test", "a.test")),
        client_options("a.test", [test_ca.certificate]),
    )
    assert outcome.succeeded, outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_certificate_from_an_untrusted_ca_is_refused(test_ca: Issued) -> None:
    # Same subject name as the trusted CA: only the signature tells them apart.
    impostor_ca = create_ca("imxp test CA")
    outcome = await exchange(
        server_options(issue_server(impostor_ca, ["relay.a.test"])),
        client_options("relay.a.test", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert outcome.client_reason.check(SSL.Error), outcome.client_reason
    assert "alert unknown ca" in outcome.server_error, outcome.server_error
    assert not outcome.server.handshook


@pytest_twisted.ensureDeferred
async def test_expired_certificate_is_refused(test_ca: Issued) -> None:
    expired = issue_server(
        test_ca,
        ["relay.a.test"],
        days=1,
        valid_from=datetime.now(UTC) - timedelta(days=30),
    )
    outcome = await exchange(
        server_options(expired),
        client_options("relay.a.test", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert outcome.client_reason.check(SSL.Error), outcome.client_reason
    assert "alert certificate expired" in outcome.server_error, outcome.server_error


@pytest_twisted.ensureDeferred
async def test_no_trust_roots_means_the_platform_store_not_no_verification(
    server_cert: ServerCert,
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test")),
        client_options("relay.a.test", None),
    )
    assert outcome.reply is None
    assert outcome.client_reason.check(SSL.Error), outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_ip_address_names_a_domain_literal_relay(test_ca: Issued) -> None:
    with_ip = issue_server(test_ca, ["relay.a.test"], ips=["127.0.0.1"])
    outcome = await exchange(
        server_options(with_ip),
        client_options("127.0.0.1", [test_ca.certificate]),
    )
    assert outcome.succeeded, outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_ip_address_missing_from_certificate_is_refused(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test")),
        client_options("127.0.0.1", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert outcome.client_reason.check(VerificationError), outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_self_signed_development_certificate_verifies_when_trusted_itself() -> None:
    dev = self_signed(["relay.dev.test"])
    outcome = await exchange(
        server_options(dev),
        client_options("relay.dev.test", [dev.certificate]),
    )
    assert outcome.succeeded, outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_server_sends_its_chain_so_a_root_suffices(
    root_and_intermediate: tuple[x509.Certificate, Issued],
) -> None:
    root, intermediate = root_and_intermediate
    leaf = issue_server(intermediate, ["relay.c.test"])
    outcome = await exchange(
        server_options(leaf),
        client_options("relay.c.test", [root]),
    )
    assert outcome.succeeded, outcome.client_reason

    without_chain = Issued(leaf.certificate, leaf.key)
    outcome = await exchange(
        server_options(without_chain),
        client_options("relay.c.test", [root]),
    )
    assert outcome.reply is None
    assert "alert unknown ca" in outcome.server_error, outcome.server_error


@pytest_twisted.ensureDeferred
async def test_endpoint_certificate_cannot_serve(test_ca: Issued) -> None:
    # An endpoint certificate has only the clientAuth usage; it must not pass as a relay's.
    fred = issue_client(test_ca, "fred@a.test")
    outcome = await exchange(
        server_options(fred),
        client_options("a.test", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert "alert unsupported certificate" in outcome.server_error, outcome.server_error


# --- protocol version and cipher floor ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_1_1_client_is_refused(server_cert: ServerCert) -> None:
    relay = server_cert("relay.a.test")
    control = LegacyClient(SSL.TLS1_1_VERSION)
    outcome = await exchange(PermissiveServer(relay, SSL.TLS1_1_VERSION), control)
    if not outcome.succeeded:
        pytest.skip("this OpenSSL cannot negotiate TLS 1.1 at all; a refusal would prove nothing")
    assert control.connection is not None
    assert control.connection.get_protocol_version_name() == "TLSv1.1"

    outcome = await exchange(server_options(relay), LegacyClient(SSL.TLS1_1_VERSION))
    assert outcome.reply is None
    assert "alert protocol version" in outcome.client_error, outcome.client_reason
    assert not outcome.server.handshook


@pytest_twisted.ensureDeferred
async def test_tls_1_2_client_offering_only_cbc_sha1_suites_is_refused(
    server_cert: ServerCert,
) -> None:
    relay = server_cert("relay.a.test")
    cbc = b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"
    control = LegacyClient(SSL.TLS1_2_VERSION, cbc)
    outcome = await exchange(PermissiveServer(relay, SSL.TLS1_2_VERSION, cbc), control)
    assert outcome.succeeded, outcome.client_reason
    assert control.connection is not None
    assert control.connection.get_cipher_name() in cbc.decode().split(":")

    outcome = await exchange(server_options(relay), LegacyClient(SSL.TLS1_2_VERSION, cbc))
    assert outcome.reply is None
    assert "no shared cipher" in outcome.server_error, outcome.server_reason
    assert not outcome.server.handshook


@pytest_twisted.ensureDeferred
async def test_tls_1_2_client_gets_an_aead_suite(test_ca: Issued, server_cert: ServerCert) -> None:
    client = LegacyClient(SSL.TLS1_2_VERSION)
    outcome = await exchange(server_options(server_cert("relay.a.test")), client)
    assert outcome.succeeded, outcome.client_reason
    assert client.connection is not None
    cipher = client.connection.get_cipher_name()
    assert cipher.startswith("ECDHE-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


# --- client certificates, as seen by the server ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_presented_client_certificate_identifies_the_endpoint(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    fred = issue_client(test_ca, "fred@a.test")
    outcome = await exchange(
        server_options(server_cert("relay.a.test"), trust_roots=[test_ca.certificate]),
        client_options("relay.a.test", [test_ca.certificate], client=fred),
    )
    assert outcome.succeeded, outcome.client_reason
    assert outcome.server.peer == fred.certificate
    assert client_identity(outcome.server.peer) == "fred@a.test"


@pytest_twisted.ensureDeferred
async def test_client_certificate_is_optional_unless_required(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test"), trust_roots=[test_ca.certificate]),
        client_options("relay.a.test", [test_ca.certificate]),
    )
    assert outcome.succeeded, outcome.client_reason
    assert outcome.server.handshook
    assert outcome.server.peer is None


@pytest_twisted.ensureDeferred
async def test_required_client_certificate_missing_is_refused(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(
            server_cert("relay.a.test"),
            trust_roots=[test_ca.certificate],
            require_client_cert=True,
        ),
        client_options("relay.a.test", [test_ca.certificate]),
    )
    assert outcome.reply is None
    assert not outcome.server.handshook
    assert "alert certificate required" in outcome.client_error, outcome.client_reason


@pytest_twisted.ensureDeferred
async def test_optional_client_certificate_that_does_not_verify_is_refused(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    impostor = issue_client(create_ca("imxp test CA"), "fred@a.test")
    outcome = await exchange(
        server_options(server_cert("relay.a.test"), trust_roots=[test_ca.certificate]),
        client_options("relay.a.test", [test_ca.certificate], client=impostor),
    )
    assert outcome.reply is None
    assert not outcome.server.handshook
    assert outcome.server.peer is None
    assert "certificate verify failed" in outcome.server_error, outcome.server_reason


def code_signing_certificate(ca: Issued, name: str) -> Issued:
    """A certificate naming ``name`` whose extendedKeyUsage allows code signing only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key, ())


@pytest.mark.parametrize("server_auth_clients", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_server_auth_only_certificate_as_client_only_where_allowed(
    test_ca: Issued, server_cert: ServerCert, server_auth_clients: bool
) -> None:
    """Public CAs no longer put clientAuth in server certificates. Where allowed (a relay's
    mesh port), one still authenticates its relay; elsewhere it is refused as before."""
    peer = issue_server(test_ca, ["b.test"], client_auth=False)
    outcome = await exchange(
        server_options(
            server_cert("relay.a.test"),
            trust_roots=[test_ca.certificate],
            server_auth_clients=server_auth_clients,
        ),
        client_options("relay.a.test", [test_ca.certificate], client=peer),
    )
    if server_auth_clients:
        assert outcome.succeeded, outcome.client_reason
        assert outcome.server.peer == peer.certificate
    else:
        assert not outcome.server.handshook
        assert "certificate verify failed" in outcome.server_error, outcome.server_reason


@pytest_twisted.ensureDeferred
async def test_only_the_purpose_is_overlooked_for_server_auth_clients(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    """A certificate for another purpose (code signing), or a serverAuth one from a CA
    not trusted, is still refused."""
    server = server_options(
        server_cert("relay.a.test"), trust_roots=[test_ca.certificate], server_auth_clients=True
    )
    for peer in (
        code_signing_certificate(test_ca, "b.test"),
        issue_server(create_ca("another CA"), ["b.test"], client_auth=False),
    ):
        outcome = await exchange(
            server, client_options("relay.a.test", [test_ca.certificate], client=peer)
        )
        assert not outcome.server.handshook
        assert outcome.server.peer is None


@pytest_twisted.ensureDeferred
async def test_relay_certificate_also_authenticates_as_client(
    test_ca: Issued, server_cert: ServerCert
) -> None:
    outcome = await exchange(
        server_options(server_cert("relay.a.test"), trust_roots=[test_ca.certificate]),
        client_options("relay.a.test", [test_ca.certificate], client=server_cert("relay.b.test")),
    )
    assert outcome.succeeded, outcome.client_reason
    assert outcome.server.peer is not None
    assert client_identity(outcome.server.peer) == "relay.b.test"


# --- argument checks and helpers ------------------------------------------------------------


def test_requiring_client_certificates_needs_trust_roots(server_cert: ServerCert) -> None:
    with pytest.raises(ValueError):
        server_options(server_cert("relay.a.test"), require_client_cert=True)


def test_empty_trust_root_lists_are_rejected(server_cert: ServerCert) -> None:
    with pytest.raises(ValueError):
        server_options(server_cert("relay.a.test"), trust_roots=[])
    with pytest.raises(ValueError):
        client_options("relay.a.test", [])


def test_peer_certificate_of_a_plain_transport_is_none() -> None:
    assert peer_certificate(StringTransport()) is None
