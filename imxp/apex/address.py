"""Endpoint and domain names (RFC 3340 §2.2) and how they compare (§2.2.1).

An endpoint is ``local@domain`` where ``local`` is ``address[/subaddress]``
and each of address and subaddress is a token of non-control characters
other than ``/`` and ``@`` (the ABNF of §2.2). The domain is "defined in
[RFC 2821]": a host name or an address literal such as ``[192.0.2.1]``.

Comparison follows §2.2.1: the local part is matched exactly (case-sensitive
UTF-8), while the domain is a DNS name and so compares case-insensitively.
Every :class:`Endpoint` therefore holds its domain in one normal form
(lower-case IDNA A-labels without a trailing dot, or a canonical literal),
so that plain equality and hashing implement the RFC's rule.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = [
    "AddressError",
    "Endpoint",
    "REPORT",
    "report_endpoint",
    "normalise_domain",
    "is_literal",
    "literal_address",
]

# §2.2 puts no bound on names; these keep a hostile peer from making us hash
# and store arbitrarily long keys. 256 octets is twice the local part SMTP
# allows (RFC 5321 §4.5.3.1.1); 253 is the longest DNS name in text form.
MAX_LOCAL = 256
MAX_DOMAIN = 253
# The longest text that could be a valid endpoint: local, "@", and the longest
# literal or name (a non-ASCII name may be longer than its A-label form).
_MAX_TEXT = MAX_LOCAL + 1 + 4 * MAX_DOMAIN

# token = 1*(%x20-2E / %x30-3F / %x41-7E / UTF-8): everything but C0 controls,
# DEL, "/" and "@". "UTF-8" excludes what UTF-8 cannot encode (surrogates); C1
# controls are control characters too, and U+FFFE/U+FFFF cannot travel in XML.
_TOKEN = re.compile(r"[^\x00-\x1f/@\x7f-\x9f\ud800-\udfff\ufffe\uffff]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# A relay meets the same few names over and over (each data's are parsed as it is
# decoded, routed and encoded), so parsed names are kept; bounded, since a peer
# chooses them.
_CACHED_NAMES = 1024

# The report service's well-known endpoint (§6.2).
REPORT = "apex=report"


class AddressError(ValueError):
    """A name that is not an endpoint or domain of RFC 3340 §2.2."""


def is_literal(domain: str) -> bool:
    """Whether ``domain`` is written as an address literal (``[...]``, RFC 5321 §4.1.3)."""
    return domain.startswith("[")


def literal_address(domain: str) -> str | None:
    """The IP address of a domain literal (``"192.0.2.1"`` for ``"[192.0.2.1]"``,
    ``"2001:db8::1"`` for ``"[IPv6:2001:db8::1]"``), or None for a host name.

    Raises :class:`AddressError` for a malformed literal.
    """
    if not is_literal(domain):
        return None
    return _literal(domain)[1]


def normalise_domain(domain: str) -> str:
    """The one form of a domain that equality uses (§2.2.1: domains are not case-sensitive).

    Host names become lower-case A-labels (IDNA 2008 with UTS #46 mapping)
    without a trailing dot; literals become ``[192.0.2.1]`` or
    ``[IPv6:2001:db8::1]`` in the canonical text form of the address.
    """
    if not isinstance(domain, str):
        raise AddressError("a domain must be a string")
    return _normalise_domain(domain)


@functools.lru_cache(maxsize=_CACHED_NAMES)
def _normalise_domain(domain: str) -> str:
    if is_literal(domain):
        return _literal(domain)[0]
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise AddressError("the domain is empty")
    if len(name) > 4 * MAX_DOMAIN:
        raise AddressError("the domain is too long")
    if name.isascii():
        ascii_name = name.lower()
    else:
        try:
            ascii_name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise AddressError(f"domain {name[:64]!r} is not a valid IDN: {e}") from None
    if len(ascii_name) > MAX_DOMAIN:
        raise AddressError(f"the domain is longer than {MAX_DOMAIN} characters")
    labels = ascii_name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AddressError(f"domain {ascii_name[:64]!r} has an invalid label {label[:64]!r}")
    # No top-level domain is all digits (RFC 3696 §2), so "192.0.2.1" is an IP
    # address written without brackets; routing it through DNS would only fail.
    if labels[-1].isdigit():
        raise AddressError(f"domain {ascii_name[:64]!r} looks like an IP address; write [{name}]")
    return ascii_name


def _literal(domain: str) -> tuple[str, str]:
    """(normal form, bare address) of an address literal (RFC 5321 §4.1.3)."""
    if not domain.endswith("]") or len(domain) > 64:
        raise AddressError(f"malformed address literal {domain[:64]!r}")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            # ipaddress accepts "%zone" suffixes; a zone means nothing off-link.
            if "%" in inner:
                raise ValueError("zone identifiers are not allowed")
            v6 = ipaddress.IPv6Address(inner[5:])
            return f"[IPv6:{v6.compressed}]", v6.compressed
        v4 = ipaddress.IPv4Address(inner)
    except ValueError as e:
        raise AddressError(f"malformed address literal {domain!r}: {e}") from None
    return f"[{v4}]", str(v4)


def _check_token(token: str, what: str) -> None:
    if not token:
        raise AddressError(f"the {what} is empty")
    if not _TOKEN.fullmatch(token):
        raise AddressError(
            f"the {what} {token[:64]!r} contains a control character, '/' or '@' (RFC 3340 §2.2)"
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An APEX endpoint ``address[/subaddress]@domain`` (RFC 3340 §2.2).

    Constructing one validates it and normalises the domain, so equality is
    the comparison of §2.2.1: exact local part, case-insensitive domain.
    """

    address: str
    subaddress: str | None
    domain: str

    def __post_init__(self) -> None:
        _check_token(self.address, "address")
        if self.subaddress is not None:
            _check_token(self.subaddress, "subaddress")
        if len(self.local.encode("utf-8")) > MAX_LOCAL:
            raise AddressError(f"the local part is longer than {MAX_LOCAL} octets")
        object.__setattr__(self, "domain", normalise_domain(self.domain))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``local@domain``; raises :class:`AddressError` saying what is wrong."""
        if not isinstance(text, str):
            raise AddressError("an endpoint must be a string")
        return cls._parse(text)

    @classmethod
    @functools.lru_cache(maxsize=_CACHED_NAMES)
    def _parse(cls, text: str) -> Endpoint:
        # Endpoints are immutable, so one may stand for every parse of its text.
        if len(text) > _MAX_TEXT:
            raise AddressError("the endpoint is too long")
        # Neither the local part nor a domain may contain "@", so the last one
        # separates them; an earlier one is reported by the token check.
        local, at, domain = text.rpartition("@")
        if not at:
            raise AddressError(f"endpoint {text[:64]!r} has no '@domain'")
        address, slash, subaddress = local.partition("/")
        return cls(address, subaddress if slash else None, domain)

    @property
    def local(self) -> str:
        """The local part: ``address`` or ``address/subaddress``."""
        if self.subaddress is None:
            return self.address
        return f"{self.address}/{self.subaddress}"

    @property
    def base(self) -> Endpoint:
        """The endpoint without its subaddress (§2.2, the "subaddress" convention)."""
        if self.subaddress is None:
            return self
        return Endpoint(self.address, None, self.domain)

    @property
    def is_service(self) -> bool:
        """Whether this is reserved for an APEX service (§2.2, the "apex=" convention)."""
        return self.address.startswith("apex=")

    @property
    def is_report_service(self) -> bool:
        """Whether this is a domain's report service, ``apex=report@domain`` (§6.2)."""
        return self.address == REPORT and self.subaddress is None

    def within(self, other: Endpoint) -> bool:
        """Whether this is ``other`` or a subaddress of it.

        §4.5.1: an application authorised to attach as ``fred@example.com``
        may also attach as ``fred/appl=wb@example.com``.
        """
        if self is other or self == other:
            return True
        return (
            other.subaddress is None
            and self.address == other.address
            and self.domain == other.domain
        )

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def report_endpoint(domain: str) -> Endpoint:
    """The report service of ``domain``: ``apex=report@domain`` (§6.2)."""
    return Endpoint(REPORT, None, domain)
