"""End-to-end protection across the mesh: fred@a.test's client protects a CPIM message,
the relays of a.test and b.test carry it, barney@b.test's client opens and judges it.

RFC 3923 §3.1 is the model (the whole ``message/cpim`` signed and/or encrypted), with
OpenPGP (RFC 3156) from real gpg keyrings in temporary homes and S/MIME (RFC 8551) with
certificates from a test CA. Relays never touch content (RFC 3340 §4.4.4.1): what barney
receives is, octet for octet, what fred's client sent - unless a relay is malicious, and
then the change is detected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from test_client import Inbox, Net, codes
from test_e2e_pgp import make_keyrings, stop_agents

from imxp.apex import wire
from imxp.apex.address import Endpoint
from imxp.certs import Issued, create_ca
from imxp.client import Client, Incoming, Outcome, Protection, open_incoming
from imxp.e2e import cpim, smime
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import E2EError, Keys, Mode, ReplayCache, Scheme, protect_cpim

FRED, WILMA, BARNEY = "fred@a.test", "wilma@a.test", "barney@b.test"
TEXT = "Yabba dabba doo! grüße"
MODES = ["sign", "encrypt", "sign+encrypt"]
SCHEMES = ["pgp", "smime"]


@pytest.fixture(scope="module")
def keyrings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A GNUPGHOME each, with the public keys of the other two."""
    people = make_keyrings(
        tmp_path_factory.mktemp("gpg"),
        {
            FRED: [BARNEY, WILMA],
            BARNEY: [FRED, WILMA],
            WILMA: [FRED, BARNEY],
        },
    )
    yield {address: person.home for address, person in people.items()}
    stop_agents(people)


@pytest.fixture(scope="module")
def smime_ca() -> Issued:
    return create_ca("imxp S/MIME test CA")


@pytest.fixture(scope="module")
def certs(smime_ca: Issued) -> dict[str, Issued]:
    return {a: smime.issue_smime(smime_ca, a, rsa_bits=2048) for a in (FRED, BARNEY, WILMA)}


@pytest.fixture(scope="module")
def keys(keyrings: dict[str, Path], certs: dict[str, Issued], smime_ca: Issued) -> dict[str, Keys]:
    """Each person's keyring, S/MIME certificate, and the test CA as S/MIME trust anchor."""
    return {
        address: Keys(pgp=OpenPGP(home), smime=certs[address], trust=(smime_ca.certificate,))
        for address, home in keyrings.items()
    }


@pytest_twisted.async_yield_fixture
async def net(test_ca: Issued, tmp_path: Path, dns_server: DNSServer) -> AsyncIterator[Net]:
    """Relays for a.test and b.test, routing to each other through SRV records."""
    network = Net(dns_server, test_ca, tmp_path)
    await network.start("a.test")
    await network.start("b.test")
    yield network
    for client in network.clients:
        await client.close()
    for handle in network.handles:
        await handle.service.stopService()


def spy_on_send(client: Client, monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, str]]:
    """The (content, Content-Type) of each data ``client`` sends from now on."""
    sent: list[tuple[bytes, str]] = []
    send = client.send

    async def spying(
        recipients: Any, body: bytes, media_type: str = "text/plain", **kw: Any
    ) -> dict[str, Outcome]:
        sent.append((body, media_type))
        return await send(recipients, body, media_type, **kw)

    monkeypatch.setattr(client, "send", spying)
    return sent


def protection(
    mode: Mode, scheme: Scheme, keys: dict[str, Keys], certs: dict[str, Issued]
) -> Protection:
    """Fred's protection for a message to Barney."""
    recipients = [certs[BARNEY].certificate] if scheme == "smime" else []
    return Protection(mode, scheme, keys[FRED], recipients)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def malicious_relay(
    net: Net, monkeypatch: pytest.MonkeyPatch, where: Callable[[bytes], int]
) -> None:
    """Make b.test's relay flip one byte of the content body, at ``where(body)``, as it
    hands data to barney: what RFC 3340 §4.4.4.1 forbids, and protection must reveal."""
    relay = net.relays["b.test"].service.relay
    deliver = relay._deliver

    def tampering(journey: Any, recipient: Any, endpoint: Endpoint) -> Any:
        content = journey.data.content
        if content is not None and str(endpoint) == BARNEY:
            start = content.raw.index(b"\r\n\r\n") + 4  # the part's body, after its headers
            raw = flip(content.raw, start + where(content.raw[start:]))
            journey.data = replace(journey.data, content=replace(content, raw=raw))
        return deliver(journey, recipient, endpoint)

    monkeypatch.setattr(relay, "_deliver", tampering)


async def fred_to_barney(net: Net) -> tuple[Client, Inbox]:
    inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=inbox)
    return fred, inbox


# -- each mode across two relays -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest_twisted.ensureDeferred
async def test_each_mode_crosses_two_relays_byte_for_byte(
    net: Net,
    keys: dict[str, Keys],
    certs: dict[str, Issued],
    monkeypatch: pytest.MonkeyPatch,
    scheme: Scheme,
    mode: Mode,
) -> None:
    fred, inbox = await fred_to_barney(net)
    sent = spy_on_send(fred, monkeypatch)

    outcomes = await fred.send_message(
        [BARNEY], TEXT, protect=protection(mode, scheme, keys, certs)
    )

    assert codes(outcomes) == {BARNEY: 250}
    [incoming] = await inbox.wait()
    [(body, content_type)] = sent
    # Relays oblivious: the content and its full Content-Type, parameters included.
    assert incoming.body == body
    assert incoming.content_type == content_type
    encrypted = {"pgp": "multipart/encrypted", "smime": "application/pkcs7-mime"}[scheme]
    assert incoming.media_type == ("multipart/signed" if mode == "sign" else encrypted)
    if mode != "sign":
        # RFC 3923 §3.1: the CPIM headers are hidden too, not just the text.
        assert b"Yabba" not in body and FRED.encode() not in body

    report = await open_incoming(incoming, keys[BARNEY], replays=ReplayCache())
    assert (report.scheme, report.encrypted) == (scheme, mode != "sign")
    assert report.presentable and report.problems == [], report.problems
    if mode == "encrypt":
        assert (report.status, report.signer) == ("encrypted-and-decrypted", None)
    else:
        assert (report.status, report.signer) == ("signed-and-verified", FRED)
    assert report.cpim is not None
    assert (report.cpim.sender, report.cpim.to, report.cpim.text()) == (FRED, [BARNEY], TEXT)


@pytest_twisted.ensureDeferred
async def test_a_plain_message_is_plain(net: Net, keys: dict[str, Keys]) -> None:
    fred, inbox = await fred_to_barney(net)
    await fred.send_message([BARNEY], TEXT)
    [incoming] = await inbox.wait()
    report = incoming.open(keys[BARNEY])  # no gpg work to keep off the reactor
    assert (report.status, report.scheme, report.presentable) == ("plain", None, True)
    assert report.cpim is not None and report.cpim.text() == TEXT


# -- what must not be shown ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest_twisted.ensureDeferred
async def test_a_byte_flipped_by_a_relay_is_detected(
    net: Net,
    keys: dict[str, Keys],
    certs: dict[str, Issued],
    monkeypatch: pytest.MonkeyPatch,
    scheme: Scheme,
    mode: Mode,
) -> None:
    # In the signed text itself, or in the middle of the ciphertext.
    malicious_relay(
        net, monkeypatch, lambda body: body.index(b"Yabba") if mode == "sign" else len(body) // 2
    )
    fred, inbox = await fred_to_barney(net)
    sent = spy_on_send(fred, monkeypatch)

    await fred.send_message([BARNEY], TEXT, protect=protection(mode, scheme, keys, certs))

    [incoming] = await inbox.wait()
    [(body, _content_type)] = sent
    assert sum(a != b for a, b in zip(incoming.body, body, strict=True)) == 1
    report = await open_incoming(incoming, keys[BARNEY])
    expected = "signed-but-bad" if mode == "sign" else "cannot-decrypt"
    assert (report.status, report.presentable, report.cpim) == (expected, False, None)
    assert len(report.problems) == 1


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest_twisted.ensureDeferred
async def test_a_message_signed_by_someone_other_than_its_from_is_flagged(
    net: Net, keys: dict[str, Keys], scheme: Scheme
) -> None:
    """Wilma signs, with her own good key, a message that says it is from Fred."""
    inbox = Inbox()
    wilma = await net.connect(WILMA)
    await net.connect(BARNEY, on_data=inbox)
    forged = cpim.build(cpim.text_message(FRED, [BARNEY], "I owe Wilma a hundred clams"))
    content_type, body = protect_cpim(
        forged, "sign", scheme, keys[WILMA], signer=WILMA if scheme == "pgp" else None
    )

    assert codes(await wilma.send([BARNEY], body, content_type)) == {BARNEY: 250}

    [incoming] = await inbox.wait()
    report = await open_incoming(incoming, keys[BARNEY])
    assert (report.status, report.signer, report.presentable) == (
        "signed-and-verified",
        WILMA,
        False,
    )
    assert report.problems == [f"signer {WILMA} is not the From {FRED}"]


@pytest_twisted.ensureDeferred
async def test_fred_sending_with_wilmas_smime_certificate_is_flagged(
    net: Net, keys: dict[str, Keys], certs: dict[str, Issued]
) -> None:
    fred, inbox = await fred_to_barney(net)
    protect = Protection("sign", "smime", Keys(smime=certs[WILMA]))
    await fred.send_message([BARNEY], TEXT, protect=protect)
    [incoming] = await inbox.wait()
    report = await open_incoming(incoming, keys[BARNEY])
    assert (report.signer, report.presentable) == (WILMA, False)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest_twisted.ensureDeferred
async def test_decrypting_with_the_wrong_keys_fails_cleanly(
    net: Net, keys: dict[str, Keys], certs: dict[str, Issued], scheme: Scheme
) -> None:
    """Barney's client opens with Wilma's keyring (his public key, not his secret one)
    and her S/MIME key: cannot-decrypt, and no exception."""
    fred, inbox = await fred_to_barney(net)
    await fred.send_message([BARNEY], TEXT, protect=protection("sign+encrypt", scheme, keys, certs))
    [incoming] = await inbox.wait()
    report = await open_incoming(incoming, keys[WILMA])
    assert (report.status, report.presentable, report.cpim) == ("cannot-decrypt", False, None)
    assert report.problems[0].startswith("cannot decrypt: ")


@pytest_twisted.ensureDeferred
async def test_a_replayed_signed_message_is_flagged(
    net: Net, keys: dict[str, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same signed content delivered twice (RFC 3923 §6.9): the second is a replay."""
    fred, inbox = await fred_to_barney(net)
    sent = spy_on_send(fred, monkeypatch)
    await fred.send_message([BARNEY], TEXT, protect=Protection("sign", "pgp", keys[FRED]))
    [(body, content_type)] = sent
    await fred.send([BARNEY], body, content_type)
    first, again = await inbox.wait(2)

    replays = ReplayCache()
    reports = [await open_incoming(i, keys[BARNEY], replays=replays) for i in (first, again)]
    assert [r.presentable for r in reports] == [True, False]
    assert reports[1].problems[0].startswith(f"replayed: the same message from {FRED}")


# -- what cannot be protected is not sent ----------------------------------------------------


@pytest.mark.parametrize(
    ("protect", "recipients", "error"),
    [
        # Nobody's key in fred's keyring is bambam's.
        (lambda k, c: Protection("encrypt", "pgp", k[FRED]), ["bambam@b.test"], "bambam"),
        # Wilma's keyring has no secret key for the From, fred.
        (lambda k, c: Protection("sign", "pgp", k[WILMA]), [BARNEY], "cannot sign as fred"),
        # Barney's certificate is given, the cc's is not.
        (
            lambda k, c: Protection("encrypt", "smime", k[FRED], [c[BARNEY].certificate]),
            [BARNEY, WILMA],
            f"no S/MIME certificate for {WILMA}",
        ),
    ],
    ids=["pgp-no-recipient-key", "pgp-no-secret-key", "smime-no-recipient-certificate"],
)
@pytest_twisted.ensureDeferred
async def test_a_message_that_cannot_be_protected_is_not_sent(
    net: Net,
    keys: dict[str, Keys],
    certs: dict[str, Issued],
    monkeypatch: pytest.MonkeyPatch,
    protect: Callable[[dict[str, Keys], dict[str, Issued]], Protection],
    recipients: list[str],
    error: str,
) -> None:
    fred = await net.connect(FRED)
    sent = spy_on_send(fred, monkeypatch)
    with pytest.raises(E2EError, match=error):
        await fred.send_message(
            recipients[:1], TEXT, cc=recipients[1:], protect=protect(keys, certs)
        )
    assert sent == []


@pytest_twisted.ensureDeferred
async def test_smime_encrypts_only_to_the_recipients_certificates_among_those_given(
    net: Net,
    keys: dict[str, Keys],
    certs: dict[str, Issued],
    smime_ca: Issued,
) -> None:
    """A certificate file may hold more than the recipient's certificate: the CA's (a
    chain file), someone else's, an expired one beside its renewal. Only the usable ones
    naming a recipient are encrypted to: whoever holds another key cannot read it."""
    expired = smime.issue_smime(
        smime_ca, BARNEY, days=1, rsa_bits=2048, valid_from=datetime.now(UTC) - timedelta(days=9)
    )
    given = [
        smime_ca.certificate,
        certs[WILMA].certificate,
        expired.certificate,
        certs[BARNEY].certificate,
    ]
    fred, inbox = await fred_to_barney(net)
    outcomes = await fred.send_message(
        [BARNEY], TEXT, protect=Protection("encrypt", "smime", keys[FRED], given)
    )
    assert codes(outcomes) == {BARNEY: 250}
    [incoming] = await inbox.wait()
    report = await open_incoming(incoming, keys[BARNEY])
    assert (report.encrypted, report.presentable) == (True, True), report.problems
    for other in (keys[WILMA], replace(keys[BARNEY], smime=expired)):
        opened = await open_incoming(incoming, other)
        assert opened.status == "cannot-decrypt", opened


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda ca, _: smime.issue_smime(
                ca, BARNEY, days=1, rsa_bits=2048, valid_from=datetime.now(UTC) - timedelta(9)
            ),
            "expired on",
        ),
        (
            lambda ca, _: smime.issue_smime(
                ca, BARNEY, rsa_bits=2048, valid_from=datetime.now(UTC) + timedelta(days=2)
            ),
            "is not valid before",
        ),
        (lambda _, other: smime.issue_smime(other, BARNEY, rsa_bits=2048), "is not trusted"),
        (lambda ca, _: smime.issue_smime(ca, BARNEY, rsa_bits=None), "has no RSA key"),
    ],
    ids=["expired", "not-yet-valid", "untrusted", "not-rsa"],
)
@pytest_twisted.ensureDeferred
async def test_smime_does_not_encrypt_to_a_certificate_it_cannot_use(
    net: Net,
    keys: dict[str, Keys],
    smime_ca: Issued,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Issued, Issued], Issued],
    why: str,
) -> None:
    """RFC 8550 §4: a certificate outside its validity, not chaining to the sender's
    S/MIME trust anchors, or with a key imxp cannot encrypt to is not used; with no other
    for the recipient, nothing is sent and the error says why."""
    unusable = make(smime_ca, create_ca("a CA fred does not trust"))
    fred = await net.connect(FRED)
    sent = spy_on_send(fred, monkeypatch)
    protect = Protection("encrypt", "smime", keys[FRED], [unusable.certificate])
    with pytest.raises(E2EError, match=f"no usable S/MIME certificate for {BARNEY}: .*{why}"):
        await fred.send_message([BARNEY], TEXT, protect=protect)
    assert sent == []


def test_protection_refuses_unknown_modes_and_schemes(keys: dict[str, Keys]) -> None:
    with pytest.raises(ValueError, match="mode"):
        Protection("shout", "pgp", keys[FRED])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        Protection("sign", "rot13", keys[FRED])  # type: ignore[arg-type]


def test_incoming_without_a_content_type_is_text_plain() -> None:
    """RFC 2045 §5.2; and the full type otherwise, parameters included."""

    def incoming(content: wire.Content) -> Incoming:
        data = wire.Data(wire.Originator(FRED), [wire.Recipient(BARNEY)], content=content)
        return Incoming(FRED, [BARNEY], content.media_type, content.body, data)

    typed = wire.Content.from_bytes(b"x", 'multipart/signed; boundary="b"; protocol="p"')
    assert incoming(typed).content_type == 'multipart/signed; boundary="b"; protocol="p"'
    untyped = wire.Content("part", b"Content-ID: <x@y>\r\n\r\nhi", "x@y")
    assert incoming(untyped).content_type == "text/plain"
