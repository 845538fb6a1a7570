"""Endpoint and domain names (RFC 3340 §2.2) and their comparison (§2.2.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imxp.apex.address import (
    MAX_DOMAIN,
    MAX_LOCAL,
    AddressError,
    Endpoint,
    is_literal,
    literal_address,
    normalise_domain,
    report_endpoint,
)

SETTINGS = settings(max_examples=300, deadline=None)

# A token of §2.2: any character but C0/C1 controls, DEL, "/", "@" (and what XML cannot carry).
TOKEN = st.text(
    st.characters(
        blacklist_categories=("Cc", "Cs"),
        blacklist_characters="/@\ufffe\uffff",
    ),
    min_size=1,
    max_size=40,
)
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOMAIN = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(LABEL, min_size=0, max_size=3),
    st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True),
)


# --------------------------------------------------------------------------- RFC examples


@pytest.mark.parametrize(
    ("text", "address", "subaddress", "domain"),
    [
        ("fred@example.com", "fred", None, "example.com"),  # §4.4.1
        ("fred/appl=wb@example.com", "fred", "appl=wb", "example.com"),  # §2.2
        ("apex=report@example.com", "apex=report", None, "example.com"),  # §6.2
        ("barney@rubble.com", "barney", None, "rubble.com"),  # §5.1
        ("appl=pubsub/topic=fred@example.com", "appl=pubsub", "topic=fred", "example.com"),
        ("fred@[10.0.0.1]", "fred", None, "[10.0.0.1]"),  # §2.2 domain-literal
    ],
)
def test_rfc_examples(text: str, address: str, subaddress: str | None, domain: str) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.address, endpoint.subaddress, endpoint.domain) == (
        address,
        subaddress,
        domain,
    )
    assert str(endpoint) == text


def test_local_and_base() -> None:
    endpoint = Endpoint.parse("fred/appl=wb@example.com")
    assert endpoint.local == "fred/appl=wb"
    assert endpoint.base == Endpoint.parse("fred@example.com")
    plain = Endpoint.parse("fred@example.com")
    assert plain.base is plain
    assert plain.local == "fred"


def test_service_convention() -> None:
    """§2.2: local parts starting with "apex=" are reserved for services."""
    assert Endpoint.parse("apex=report@example.com").is_service
    assert Endpoint.parse("apex=presence/x@example.com").is_service
    assert not Endpoint.parse("fred@example.com").is_service
    assert not Endpoint.parse("apex@example.com").is_service
    assert report_endpoint("Example.COM") == Endpoint.parse("apex=report@example.com")


# --------------------------------------------------------------------------- comparison


def test_local_part_is_case_sensitive() -> None:
    """§2.2.1: "fred@example.com" and "Fred@example.com" are different endpoints."""
    assert Endpoint.parse("fred@example.com") != Endpoint.parse("Fred@example.com")


def test_domain_is_not_case_sensitive() -> None:
    a = Endpoint.parse("fred@Example.COM.")
    b = Endpoint.parse("fred@example.com")
    assert a == b
    assert hash(a) == hash(b)
    assert str(a) == "fred@example.com"


def test_direct_construction_normalises() -> None:
    assert Endpoint("fred", None, "EXAMPLE.com") == Endpoint.parse("fred@example.com")
    with pytest.raises(AddressError):
        Endpoint("fr/ed", None, "example.com")
    with pytest.raises(AddressError):
        Endpoint("fred", "", "example.com")


def test_within() -> None:
    """§4.5.1: authorised for fred@ means authorised for fred/appl=x@ too."""
    fred = Endpoint.parse("fred@example.com")
    assert fred.within(fred)
    assert Endpoint.parse("fred/appl=wb@example.com").within(fred)
    assert Endpoint.parse("fred/appl=wb@EXAMPLE.com").within(fred)
    assert not fred.within(Endpoint.parse("fred/appl=wb@example.com"))
    assert not Endpoint.parse("fred/a@example.com").within(Endpoint.parse("fred/b@example.com"))
    assert not Endpoint.parse("Fred/appl=wb@example.com").within(fred)
    assert not Endpoint.parse("fred@example.org").within(fred)
    assert not Endpoint.parse("freddy@example.com").within(fred)


# --------------------------------------------------------------------------- domains


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.Com.", "example.com"),
        ("localhost", "localhost"),
        ("a-b.c0.test", "a-b.c0.test"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8:0::1]", "[IPv6:2001:db8::1]"),
        ("[ipv6:::1]", "[IPv6:::1]"),
    ],
)
def test_normalise_domain(raw: str, normal: str) -> None:
    assert normalise_domain(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "example..com",
        ".example.com",
        "-example.com",
        "example-.com",
        "exa_mple.com",
        "exa mple.com",
        "a" * 64 + ".com",
        ".".join(["a" * 60] * 5),  # longer than 253
        "192.0.2.1",  # an IP address needs brackets
        "example.123",
        "[192.0.2.1",
        "[192.0.2.256]",
        "[01.0.2.1]",
        "[2001:db8::1]",  # IPv6 literals are tagged
        "[IPv6:192.0.2.1]",
        "[IPv6:fe80::1%eth0]",
        "[IPv6:]",
        "[]",
        "[x-tag:foo]",
        "bad\u0000.com",
        "☃\u200d.com",  # a joiner IDNA 2008 refuses in this context
    ],
)
def test_bad_domains(raw: str) -> None:
    with pytest.raises(AddressError):
        normalise_domain(raw)


def test_literals() -> None:
    assert is_literal("[192.0.2.1]")
    assert not is_literal("example.com")
    assert literal_address("[192.0.2.1]") == "192.0.2.1"
    assert literal_address("[IPv6:2001:db8:0:0::1]") == "2001:db8::1"
    assert literal_address("example.com") is None
    with pytest.raises(AddressError):
        literal_address("[bogus]")
    # AddressError is a ValueError, which callers that only know ValueError rely on.
    with pytest.raises(ValueError):
        literal_address("[bogus]")


# --------------------------------------------------------------------------- bad endpoints


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fred",
        "fred@",
        "@example.com",
        "fred@@example.com",
        "fr@ed@example.com",
        "fred/@example.com",
        "/appl@example.com",
        "fred/a/b@example.com",
        "fr\ted@example.com",
        "fred\x7f@example.com",
        "fred\x85@example.com",
        "fred\ud800@example.com",
        "fred@exa mple.com",
        "fred@192.0.2.1",
        "x" * (MAX_LOCAL + 1) + "@example.com",
        "é" * (MAX_LOCAL // 2 + 1) + "@example.com",  # the bound is on UTF-8 octets
        "x@" + "a" * 5000,
    ],
)
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(AddressError):
        Endpoint.parse(text)


def test_not_a_string() -> None:
    with pytest.raises(AddressError):
        Endpoint.parse(b"fred@example.com")  # type: ignore[arg-type]
    with pytest.raises(AddressError):
        normalise_domain(None)  # type: ignore[arg-type]


def test_tokens_allow_space_and_utf8() -> None:
    """The token of §2.2 includes %x20 and any UTF-8 character."""
    endpoint = Endpoint.parse("Fred Flintstone/ümlaut ☃@example.com")
    assert endpoint.address == "Fred Flintstone"
    assert endpoint.subaddress == "ümlaut ☃"


def test_bounds() -> None:
    assert Endpoint.parse("x" * MAX_LOCAL + "@example.com")
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == MAX_DOMAIN
    assert normalise_domain(longest) == longest


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(TOKEN, st.none() | TOKEN, DOMAIN)
def test_round_trip(address: str, subaddress: str | None, domain: str) -> None:
    endpoint = Endpoint(address, subaddress, domain)
    again = Endpoint.parse(str(endpoint))
    assert again == endpoint
    assert (again.address, again.subaddress) == (address, subaddress)
    assert again.within(endpoint.base)


@SETTINGS
@given(st.text(max_size=80))
def test_junk_never_escapes(text: str) -> None:
    try:
        endpoint = Endpoint.parse(text)
    except AddressError:
        return
    assert Endpoint.parse(str(endpoint)) == endpoint


def test_parses_are_remembered_and_refusals_repeated() -> None:
    """Parsed names are cached (immutable, so shareable); bad ones are refused every time."""
    assert Endpoint.parse("fred@A.Example.") is Endpoint.parse("fred@A.Example.")
    assert normalise_domain("Bücher.Example") == normalise_domain("Bücher.Example")
    for _ in range(2):
        with pytest.raises(AddressError):
            Endpoint.parse("fred@exa mple.com")
        with pytest.raises(AddressError):
            normalise_domain(["not", "a", "string"])  # type: ignore[arg-type]
        with pytest.raises(AddressError):
            Endpoint.parse(b"fred@example.com")  # type: ignore[arg-type]
