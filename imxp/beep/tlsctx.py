"""TLS connection creators for BEEP's TLS transport security profile (RFC 3080 §3.1).

RFC 3080 §9 asks that a peer be configurable to refuse weak cipher suites, since a
man-in-the-middle may otherwise push the negotiation down to the weakest one offered.  This
module builds the OpenSSL settings both sides use, modernised as the design requires:

* TLS 1.2 is the minimum (TLS 1.3 preferred when both sides have it);
* TLS 1.2 suites are limited to AEAD ciphers with forward secrecy (ECDHE/DHE with AES-GCM
  or ChaCha20-Poly1305).  RFC 3340 §11 names TLS_RSA_WITH_3DES_EDE_CBC_SHA as the suite
  every APEX implementation must provide; it is deliberately not offered (no forward
  secrecy, 64-bit block cipher);
* the client checks the server certificate against the name it meant to reach, per
  RFC 6125 (done by Twisted with ``service_identity``);
* a server may ask for a client certificate without requiring one: a peer relay or an
  endpoint that presents one has it verified against the configured roots and can be
  identified with :func:`imxp.certs.client_identity`, one that presents none may still
  authenticate later with SASL.

Works with ``reactor.listenSSL``/``connectSSL``, the ``ssl:`` endpoints, and
``ITLSTransport.startTLS`` (which is what the TLS profile uses after ``<proceed/>``,
RFC 3080 §3.1.3.2).  A listener holding certificates for several names would choose one by
the ``serverName`` of the first ``start`` (RFC 3080 §2.3.1.2); these factories take one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ITransport

from imxp.certs import Issued

__all__ = [
    "CIPHER_STRING",
    "MINIMUM_TLS_VERSION",
    "client_options",
    "peer_certificate",
    "server_options",
]

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
"""Oldest TLS version accepted in either direction."""

CIPHER_STRING = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"
"""OpenSSL cipher string for TLS 1.2.  TLS 1.3 suites are all AEAD and stay enabled.

Twisted leaves DHE suites disabled unless DH parameters are configured, so in practice
this selects ECDHE with AES-GCM or ChaCha20-Poly1305.
"""

_ACCEPTABLE_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHER_STRING)


def server_options(
    identity: Issued,
    trust_roots: Sequence[x509.Certificate] | None = None,
    require_client_cert: bool = False,
    *,
    server_auth_clients: bool = False,
) -> ssl.CertificateOptions:
    """Connection creator for the accepting side of a TLS session.

    :param identity: the certificate (and its chain) and key this relay presents.
    :param trust_roots: CAs that client certificates are verified against.  When given, the
        server asks for a client certificate; a certificate that is presented but does not
        verify ends the handshake.  When None, no client certificate is asked for.
    :param require_client_cert: refuse clients that present no certificate.  Needs
        ``trust_roots``.
    :param server_auth_clients: also accept a client certificate whose extendedKeyUsage
        names serverAuth but not clientAuth: a relay's certificate from a public CA, which
        no longer issue clientAuth, presented when the relay connects to a peer.  Its
        chain, validity and names are checked as for any other.
    :raises ValueError: if ``require_client_cert`` is set without trust roots, or if
        ``trust_roots`` is empty.
    """
    options: dict[str, Any] = _identity_options(identity)
    if trust_roots is not None:
        if not trust_roots:
            raise ValueError("trust_roots is empty; pass None to not ask for client certificates")
        # CertificateOptions(trustRoot=...) always requires a peer certificate.  Asking for
        # an optional one (VERIFY_PEER without FAIL_IF_NO_PEER_CERT) is only reachable
        # through the older verify/caCerts/requireCertificate arguments.
        options.update(
            verify=True,
            caCerts=[crypto.X509.from_cryptography(c) for c in trust_roots],
            requireCertificate=require_client_cert,
        )
    elif require_client_cert:
        raise ValueError("require_client_cert needs trust_roots to verify the certificate")
    kind = _ServerAuthClients if server_auth_clients and trust_roots else ssl.CertificateOptions
    return kind(
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        acceptableCiphers=_ACCEPTABLE_CIPHERS,
        **options,
    )


class _ServerAuthClients(ssl.CertificateOptions):
    """CertificateOptions whose verification of client certificates lets serverAuth do.

    OpenSSL checks a client certificate for the sslclient purpose, which fails on an
    extendedKeyUsage without clientAuth (X509_V_ERR_INVALID_PURPOSE). That one error is
    overlooked where the certificate's extendedKeyUsage names serverAuth; every other
    check of the chain stays OpenSSL's.
    """

    _verify_set = False

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        # Once: a connection made earlier keeps the callback it was made with, which must
        # stay alive.
        if not self._verify_set:
            context.set_verify(context.get_verify_mode(), _server_auth_will_do)
            self._verify_set = True
        return context


_X509_V_ERR_INVALID_PURPOSE = 26


def _server_auth_will_do(
    _connection: SSL.Connection, certificate: crypto.X509, error: int, _depth: int, ok: int
) -> bool:
    if ok:
        return True
    if error != _X509_V_ERR_INVALID_PURPOSE:
        return False
    try:
        usage = certificate.to_cryptography().extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        )
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usage.value


def client_options(
    expected_hostname: str,
    trust_roots: Sequence[x509.Certificate] | None = None,
    client: Issued | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Connection creator for the initiating side of a TLS session.

    The server's certificate must chain to one of ``trust_roots`` and must name
    ``expected_hostname`` (a DNS name, or an IP address for a domain literal) as RFC 6125
    §6 describes: DNS-ID or IP-ID in the subjectAltName, never the CN.  The name is also
    sent as SNI when it is a DNS name.

    :param expected_hostname: the relay's or domain's name the caller set out to reach; for
        a relay found through SRV this is the domain queried, not the SRV target
        (RFC 6125 §6.2.1), unless configuration says otherwise.
    :param trust_roots: CAs to trust; None means the platform's trust store.
    :param client: the certificate and key to present if the server asks for one.
    :raises ValueError: if ``trust_roots`` is empty.
    """
    if trust_roots is None:
        trust_root = ssl.platformTrust()
    elif not trust_roots:
        raise ValueError("trust_roots is empty; pass None to use the platform trust store")
    else:
        trust_root = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in trust_roots]
        )
    extra: dict[str, Any] = {
        "raiseMinimumTo": MINIMUM_TLS_VERSION,
        "acceptableCiphers": _ACCEPTABLE_CIPHERS,
    }
    if client is not None:
        # Passed as raw key/certificate rather than optionsForClientTLS(clientCertificate=)
        # so that the chain can go along, which a PrivateCertificate cannot carry.
        extra.update(_identity_options(client))
    return ssl.optionsForClientTLS(
        expected_hostname, trustRoot=trust_root, extraCertificateOptions=extra
    )


def peer_certificate(transport: ITransport | None) -> x509.Certificate | None:
    """The certificate the TLS peer presented, or None.

    None when the transport is not TLS, the handshake has not completed, or the peer sent
    no certificate (a client the server did not require one from).  With the factories
    here a returned certificate has passed verification: the client always verifies the
    server's, and a server built with trust roots ends the handshake on a client
    certificate that does not verify.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    return cert.to_cryptography()


def _identity_options(identity: Issued) -> dict[str, Any]:
    # CertificateOptions hands these straight to SSL.Context.use_certificate/use_privatekey/
    # add_extra_chain_cert, which take cryptography objects since pyOpenSSL 24.3 and warn
    # that pyOpenSSL's own X509/PKey are deprecated there.  (Trust roots still go through
    # X509Store.add_cert, which only takes X509.)
    return {
        "privateKey": identity.key,
        "certificate": identity.certificate,
        "extraCertChain": list(identity.chain) or None,
    }
