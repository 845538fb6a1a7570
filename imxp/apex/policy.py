"""APEX access policies (RFC 3340 §4.5): every "who may do what" decision of a relay.

Each administrative domain keeps its own house in order (§4.5): which
authenticated BEEP peer may attach as which endpoint, which peer may bind for
which domain, and whose data a peer may originate or relay. The identity
function is the default everywhere, as §4.5.1 and §4.5.2 describe; a relay
proves a domain with its TLS certificate, checked as RFC 6125 says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from imxp.apex.address import Endpoint, literal_address, normalise_domain

__all__ = ["AccessPolicy"]


class AccessPolicy:
    """The relay's provisioning for one administrative domain.

    ``known_local`` says whether a local part names an endpoint of this domain
    (a user in the SASL store); ``trusted_relays`` are domains whose relays may
    relay for any originator (§4.5.2, "trusted intermediaries"); ``refusals``
    maps a local recipient to the originators it takes no data from, each an
    endpoint (``fred@a.test``) or a whole domain (``@a.test``).
    """

    def __init__(
        self,
        domain: str,
        known_local: Callable[[str], bool],
        trusted_relays: Collection[str] = (),
        refusals: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.domain = domain
        self._known_local = known_local
        self.use(trusted_relays, refusals)

    def use(
        self, trusted_relays: Collection[str], refusals: Mapping[str, Collection[str]] | None
    ) -> None:
        """Decide by ``trusted_relays`` and ``refusals`` from now on (a reload). Raises
        ValueError, and changes nothing, for a malformed domain or endpoint."""
        # §2.2.1: domains in the one form they are compared in (A-labels, no final dot).
        trusted = frozenset(normalise_domain(d) for d in trusted_relays)
        self._refusals = {
            str(Endpoint.parse(recipient)): frozenset(
                f"@{normalise_domain(p[1:])}" if p.startswith("@") else str(Endpoint.parse(p))
                for p in patterns
            )
            for recipient, patterns in (refusals or {}).items()
        }
        self.trusted_relays = trusted

    def is_local(self, endpoint: Endpoint) -> bool:
        return endpoint.domain == self.domain

    def sasl_endpoint(self, authenticated: str) -> Endpoint | None:
        """The endpoint an authenticated SASL identity stands for: ``fred`` is
        ``fred@DOMAIN``; an identity with a domain is taken as it is."""
        text = authenticated if "@" in authenticated else f"{authenticated}@{self.domain}"
        try:
            return Endpoint.parse(text)
        except ValueError:
            return None

    def may_log_in_by_certificate(self, certified: str) -> bool:
        """SASL EXTERNAL (RFC 4422 Appendix A): whether a verified client certificate
        naming ``certified`` may log in as it. Only as an endpoint of this domain (the
        rfc822Name of ``imxp certs endpoint``) that is a user in the store: any
        certificate the trust store verifies - another domain's relay's, someone's at
        another domain, with a system bundle as ``tls_trust`` a public CA's for any
        mailbox of this domain - would otherwise be a login here, as ``evil.test@DOMAIN``
        or as a name nobody provisioned; and a user removed from the user file would log
        in again with the certificate they still hold."""
        if "@" not in certified:
            return False
        try:
            endpoint = Endpoint.parse(certified)
        except ValueError:
            return False
        return endpoint.domain == self.domain and self.exists(endpoint)

    def may_attach(
        self, authenticated: str | None, endpoint: Endpoint, *, anonymous: bool = False
    ) -> bool:
        """§4.5.1: the identity function, extended to subaddresses (§2.2).

        An ``anonymous`` login (SASL ANONYMOUS, RFC 4505) has a placeholder for its
        identity, ``anonymous``: it may attach as that endpoint or a subaddress of it,
        but never as an account's, or a peer without a password would attach as the
        user who has an account of that name and take the data sent to them."""
        if authenticated is None:
            return False
        allowed = self.sasl_endpoint(authenticated)
        if allowed is None or not endpoint.within(allowed):
            return False
        return not (anonymous and self.exists(endpoint))

    def exists(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` names an endpoint of this domain (a user in the store)."""
        return self._known_local(endpoint.address) or self._known_local(str(endpoint.base))

    def may_originate(self, attached: Collection[Endpoint], originator: Endpoint) -> bool:
        """§4.5.1: an application sends as an endpoint it is attached as (or a
        subaddress of one)."""
        return any(originator.within(endpoint) for endpoint in attached)

    def may_bind(self, certificate: x509.Certificate | None, domain: str) -> bool:
        """§4.5.2: a peer binds for a domain its TLS certificate proves (RFC 6125).

        A certificate with no DNS-ID or IP-ID at all (an endpoint's, with only an
        rfc822Name; RFC 6125 §6.4.4 leaves out the CN) or with a malformed one proves
        none, and service_identity says so with CertificateError, not VerificationError.
        """
        if certificate is None:
            return False
        try:
            literal = literal_address(domain)
            if literal is not None:
                verify_certificate_ip_address(certificate, ipaddress.ip_address(literal))
            else:
                verify_certificate_hostname(certificate, domain)
        except (VerificationError, CertificateError, ValueError):
            return False
        return True

    def may_relay(self, bound: Collection[str], originator: Endpoint) -> bool:
        """§4.5.2: a relay relays data of originators of the domains it is bound
        for, or of anyone if it is bound for a trusted intermediary."""
        return originator.domain in bound or any(d in self.trusted_relays for d in bound)

    def may_deliver(self, originator: Endpoint, recipient: Endpoint) -> bool:
        """§4.4.4.1 step 5.3: may the originator send data to the recipient?

        Until the access service of RFC 3341 keeps per-endpoint entries, local
        provisioning lists refusals; an endpoint without any accepts everyone.
        A subaddress inherits its endpoint's refusals, as recipient and as originator.
        The statusResponses of a domain's report service (§6.2) are answers the
        recipient asked for, about data it sent there: no refusal holds them back.
        """
        refused = self._refusals.get(str(recipient.base))
        if not refused or originator.is_report_service:
            return True
        return (
            str(originator) not in refused
            and str(originator.base) not in refused
            and f"@{originator.domain}" not in refused
        )
