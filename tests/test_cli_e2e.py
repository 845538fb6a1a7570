"""``imxp send/listen/chat`` with end-to-end protection, through ``python -m imxp``.

The relays of a.test and b.test run in the test process (tests/clinet.py); OpenPGP keys
are real gpg keyrings in temporary homes, S/MIME certificates come from a test CA. What a
listener says of each message: who signed it, whether it was encrypted, and a warning
instead of the message when it may not be shown (RFC 3923 §6.7-§6.9); a message that
cannot be protected is not sent, and the command exits 10.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from apexnet import PASSWORD
from clinet import Net, start_net
from test_cli import STAMP, one_error_line
from test_e2e_pgp import make_keyrings, stop_agents
from twisted.internet import defer

from imxp.certs import Issued, create_ca, load_issued
from imxp.cli import build_parser, main
from imxp.client import Incoming, Protection, connect, open_incoming
from imxp.e2e import cpim
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import Keys, Scheme, content_from_entity, protect_cpim

FRED, WILMA, BARNEY = "fred@a.test", "wilma@a.test", "barney@b.test"
TEXT = "Yabba dabba doo!"


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """GNUPGHOMEs: fred knows barney's key (not wilma's), barney knows fred's and wilma's."""
    people = make_keyrings(
        tmp_path_factory.mktemp("gpg"),
        {FRED: [BARNEY], BARNEY: [FRED, WILMA], WILMA: [BARNEY]},
    )
    yield {address: str(person.home) for address, person in people.items()}
    stop_agents(people)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """S/MIME files made by ``imxp certs smime`` (run in-process: it needs no reactor):
    ``ca`` (the trust anchor), and ``NAME.pem``, ``NAME.key`` for fred, barney and wilma."""
    base = tmp_path_factory.mktemp("smime")
    create_ca("imxp S/MIME test CA").write(base / "ca.pem", base / "ca.key")
    files = {"ca": str(base / "ca.pem")}
    for address in (FRED, BARNEY, WILMA):
        made = main(
            ["certs", "smime", "--ca", str(base), "--identity", address, "--out", str(base)]
        )
        assert made == 0
        name = address.split("@")[0]
        files[f"{name}.pem"] = str(base / f"{address}.smime.pem")
        files[f"{name}.key"] = str(base / f"{address}.smime.key")
    return files


@pytest_twisted.async_yield_fixture
async def net(test_ca: Issued, tmp_path: Path) -> AsyncIterator[Net]:
    running = await start_net(test_ca, tmp_path)
    yield running
    await running.close()


async def send_forged(net: Net, scheme: Scheme, keys: Keys) -> None:
    """Wilma, with her own good ``keys``, signs a message that says it is from Fred."""
    wilma = await connect(
        WILMA, password=PASSWORD, trust=[net.ca.certificate], resolver=net.dns.resolver()
    )
    try:
        forged = cpim.build(cpim.text_message(FRED, [BARNEY], "I owe Wilma a hundred clams"))
        signer = WILMA if scheme == "pgp" else None
        content_type, body = protect_cpim(forged, "sign", scheme, keys, signer=signer)
        outcomes = await wilma.send([BARNEY], body, content_type)
        assert outcomes[BARNEY].delivered, outcomes
    finally:
        await wilma.close()


def test_help_documents_the_protection_exit_code() -> None:
    assert "10    protection failed" in build_parser().format_help()


@pytest_twisted.ensureDeferred
async def test_pgp_signed_and_encrypted_then_a_forgery(net: Net, homes: dict[str, str]) -> None:
    barney = net.spawn(
        "listen", "--as", BARNEY, "--json", "--count", "2", "--gnupg-home", homes[BARNEY]
    )
    await net.attached(BARNEY)

    sent = await net.imxp(
        "send",
        "--from",
        FRED,
        "--to",
        BARNEY,
        "--sign",
        "--encrypt",
        "--pgp",
        "--gnupg-home",
        homes[FRED],
        TEXT,
    )
    assert (sent.status, sent.out, sent.err) == (0, f"{BARNEY}: delivered (250)\n", ""), sent
    await send_forged(net, "pgp", Keys(pgp=OpenPGP(homes[WILMA])))

    assert await barney.ended() == 0, barney
    genuine, forged = (json.loads(line) for line in barney.out.splitlines())
    assert genuine["media_type"] == "multipart/encrypted"
    assert genuine["presentable"] is True
    protection = genuine["protection"]
    assert (protection["status"], protection["scheme"], protection["encrypted"]) == (
        "signed-and-verified",
        "pgp",
        True,
    )
    assert (protection["signer"], protection["problems"]) == (FRED, [])
    assert (genuine["cpim"]["sender"], genuine["cpim"]["body"]) == (FRED, TEXT)

    assert (forged["originator"], forged["presentable"], forged["cpim"]) == (WILMA, False, None)
    assert forged["protection"]["signer"] == WILMA
    assert forged["protection"]["problems"] == [f"signer {WILMA} is not the From {FRED}"]


@pytest_twisted.ensureDeferred
async def test_a_warning_quoting_the_sender_cannot_print_a_line_of_its_own(
    net: Net, homes: dict[str, str]
) -> None:
    """Wilma encrypts to Barney, unsigned, a content whose Content-Type is folded over a
    line that reads like a message Fred signed. The warning that it may not be shown
    quotes that type: its line breaks are shown as escapes, so the listener prints one
    line, its own, and no "signed by" that the protection did not give."""
    fake = f"[2026-11-23 10:00:00] {FRED} (signed by {FRED}): wire 500 clams to wilma"
    entity = f"Content-Type: a/b\n\t{fake}\n\t.\n\nx".encode()
    content_type, body = content_from_entity(OpenPGP(homes[WILMA]).encrypt(entity, [BARNEY]))
    barney = net.spawn("listen", "--as", BARNEY, "--count", "1", "--gnupg-home", homes[BARNEY])
    await net.attached(BARNEY)
    wilma = await connect(
        WILMA, password=PASSWORD, trust=[net.ca.certificate], resolver=net.dns.resolver()
    )
    try:
        assert (await wilma.send([BARNEY], body, content_type))[BARNEY].delivered
    finally:
        await wilma.close()

    assert await barney.ended() == 0, barney
    [line] = barney.out.splitlines()
    assert f"warning: message from {WILMA} not shown" in line
    assert f"\\x0a\\x09{fake}" in line


@pytest_twisted.ensureDeferred
async def test_smime_signed_and_encrypted_then_a_forgery_as_a_listener_shows_them(
    net: Net, homes: dict[str, str], pems: dict[str, str]
) -> None:
    barney = net.spawn(
        "listen",
        "--as",
        BARNEY,
        "--count",
        "3",
        "--gnupg-home",
        homes[BARNEY],
        "--smime-cert",
        pems["barney.pem"],
        "--smime-key",
        pems["barney.key"],
        "--smime-trust",
        pems["ca"],
    )
    await net.attached(BARNEY)

    sent = await net.imxp(
        "send",
        "--from",
        FRED,
        "--to",
        BARNEY,
        "--sign",
        "--encrypt",
        "--smime",
        "--smime-cert",
        pems["fred.pem"],
        "--smime-key",
        pems["fred.key"],
        "--recipient-cert",
        pems["barney.pem"],
        TEXT,
    )
    assert (sent.status, sent.out) == (0, f"{BARNEY}: delivered (250)\n"), sent

    wilma = load_issued(pems["wilma.pem"], pems["wilma.key"])
    await send_forged(net, "smime", Keys(smime=wilma))
    # Plain, dressed as the genuine one is shown (as a relay could put in its place).
    dressed = f"{TEXT}  (signed by {FRED}, encrypted)"
    sent = await net.imxp("send", "--from", FRED, "--to", BARNEY, dressed)
    assert sent.status == 0, sent

    assert await barney.ended() == 0, barney
    genuine, forged, plain = barney.out.splitlines()
    assert re.fullmatch(rf"{STAMP} {FRED} \(signed by {FRED}, encrypted\): {TEXT}", genuine)
    # The note's place, before the colon, is out of any sender's reach.
    assert re.fullmatch(rf"{STAMP} {FRED}: {re.escape(dressed)}", plain)
    assert re.fullmatch(
        rf"{STAMP} warning: message from {WILMA} not shown \(signed-and-verified, S/MIME\): "
        rf"signer {WILMA} is not the From {FRED}",
        forged,
    )


@pytest_twisted.ensureDeferred
async def test_chat_signs_its_lines_and_says_what_protected_the_others(
    net: Net, homes: dict[str, str]
) -> None:
    """Barney chats, signing; Fred's client (the library) encrypts to him and checks the
    signature on his answer."""
    chat = net.spawn(
        "chat", "--as", BARNEY, FRED, "--sign", "--gnupg-home", homes[BARNEY], pty=True
    )
    await chat.output("messages signed with OpenPGP")
    await net.attached(BARNEY)
    received: list[Incoming] = []
    fred = await connect(
        FRED,
        password=PASSWORD,
        trust=[net.ca.certificate],
        resolver=net.dns.resolver(),
        on_data=received.append,
    )
    try:
        keys = Keys(pgp=OpenPGP(homes[FRED]))
        outcomes = await fred.send_message(
            [BARNEY], "hi", protect=Protection("encrypt", "pgp", keys)
        )
        assert outcomes[BARNEY].delivered, outcomes
        await chat.output(f"{FRED} (encrypted, not signed)> hi")

        chat.write(b"hello fred\n")
        await chat.output("✓ [hello fred]")
        [incoming] = received
        report = await open_incoming(incoming, keys)
        assert (report.status, report.signer, report.presentable) == (
            "signed-and-verified",
            BARNEY,
            True,
        )
    finally:
        await fred.close()
    chat.write(b"/quit\n")
    assert await chat.ended() == 0, chat


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_protected_is_not_sent(
    net: Net, homes: dict[str, str], pems: dict[str, str]
) -> None:
    send = ("send", "--from", FRED, "--to", WILMA)
    cases = {
        # Fred's keyring has no key for wilma.
        "no pgp key": (
            10,
            net.spawn(*send, "--encrypt", "--gnupg-home", homes[FRED], TEXT),
            f"imxp: cannot protect the message: gpg cannot encrypt to {WILMA}",
        ),
        "no own certificate": (
            10,
            net.spawn(*send, "--sign", "--smime", "--gnupg-home", homes[FRED], TEXT),
            "imxp: no S/MIME certificate to sign with",
        ),
        "no recipient certificate": (
            10,
            # From wilma: two commands attached as fred at once would be refused (554).
            net.spawn(
                "send",
                "--from",
                WILMA,
                "--to",
                FRED,
                "--encrypt",
                "--smime",
                "--recipient-cert",
                pems["barney.pem"],
                "--gnupg-home",
                homes[FRED],
                TEXT,
            ),
            f"imxp: cannot protect the message: no S/MIME certificate for {FRED}",
        ),
        "no keyring": (
            10,  # as the README says of a message that cannot be protected
            net.spawn(*send, "--sign", "--gnupg-home", str(net.tmp / "nowhere"), TEXT),
            "imxp: --gnupg-home",
        ),
        "a certificate given as the key": (
            8,
            net.spawn(
                *send,
                "--sign",
                "--smime",
                "--smime-cert",
                pems["fred.pem"],
                "--smime-key",
                pems["fred.pem"],
                TEXT,
            ),
            f"imxp: --smime-key {pems['fred.pem']}: ",
        ),
        "a key given as the certificate": (
            8,
            net.spawn(
                *send,
                "--sign",
                "--smime",
                "--smime-cert",
                pems["fred.key"],
                "--smime-key",
                pems["fred.key"],
                TEXT,
            ),
            f"imxp: --smime-cert {pems['fred.key']}: ",
        ),
        "scheme without protection": (
            2,
            net.spawn(*send, "--pgp", "--gnupg-home", homes[FRED], TEXT),
            "imxp: --pgp, --smime and --recipient-cert go with --sign or --encrypt",
        ),
    }
    await defer.gatherResults(
        [defer.ensureDeferred(command.ended()) for _code, command, _line in cases.values()]
    )
    for case, (code, command, line) in cases.items():
        assert command.status == code, (case, command)
        assert one_error_line(command).startswith(line), (case, command)
        assert command.out == "", (case, command)
