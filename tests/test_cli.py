"""The ``imxp`` command end to end, through ``python -m imxp`` in a subprocess.

Endpoint commands run against two relays in the test process (a.test with fred and wilma,
b.test with barney; see tests/clinet.py), found through SRV records of a real DNS server,
with TLS and SCRAM-SHA-256: the delivery status of each recipient, what a listener prints,
a chat on a pseudo-terminal, and each error a person can act on with its exit status and
its one line. Operator commands (certs, users, route, check) run against files in the
test's directory and the same relays.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from apexnet import PASSWORD, attach, start_relay
from clinet import Command, Net, start_net, until
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from imxp.apex import wire
from imxp.beep.users import UserStore
from imxp.certs import Issued, client_identity, create_ca, issue_server, load_issued
from imxp.cli import Exit, _ConnectionNotices, _outcome_text, build_parser, main
from imxp.client import Outcome, connect

FRED, WILMA, BARNEY = "fred@a.test", "wilma@a.test", "barney@b.test"
DOMAINS = ("a.test", "b.test")
STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"


@pytest_twisted.async_yield_fixture
async def net(test_ca: Issued, tmp_path: Path) -> AsyncIterator[Net]:
    running = await start_net(test_ca, tmp_path)
    yield running
    await running.close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(command: Command) -> str:
    """The one line a failed command prints: on stderr, ``imxp: ...``, no traceback."""
    lines = command.err.splitlines()
    assert len(lines) == 1, command
    assert lines[0].startswith("imxp: "), command
    return lines[0]


# -- help ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_help_documents_the_exit_codes(net: Net) -> None:
    command = await net.imxp("--help")
    assert command.status == 0, command
    for line in ("3     authentication failed", "4     unknown domain", "7     refused"):
        assert line in command.out


@pytest.mark.parametrize(
    "words",
    [
        ["send"],
        ["listen"],
        ["chat"],
        ["certs", "ca"],
        ["certs", "relay"],
        ["certs", "endpoint"],
        ["users", "add"],
        ["users", "remove"],
        ["users", "list"],
        ["route"],
        ["check"],
    ],
)
def test_every_subcommand_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # The parser the entry point uses, in-process: one subprocess per subcommand would
    # only measure Python's start-up eleven times.
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args([*words, "--help"])
    assert raised.value.code == 0
    assert f"usage: imxp {' '.join(words)}" in capsys.readouterr().out


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e400", "ninety"])
@pytest.mark.parametrize(
    "words", [["send", "--from", FRED, "--to", BARNEY], ["chat", "--as", FRED]]
)
def test_a_timeout_that_is_no_wait_is_a_usage_error(
    words: list[str], timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The library refuses such a timeout at the send, after the command has connected:
    said there, it was an internal error (or, for 0, every outcome unknown)."""
    peer = [BARNEY] if words[0] == "chat" else ["hello"]
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args([*words, "--timeout", timeout, *peer])
    assert raised.value.code == 2
    assert f"--timeout: seconds, more than 0 and finite, not {timeout}" in capsys.readouterr().err


def test_an_outcome_a_relay_does_not_know_is_printed_unknown() -> None:
    """A relay's 451 "... outcome unknown" is shown as unknown with the relay's words, not
    as "failed 451": the data has often arrived. Not delivered, it still makes send and
    chat exit 1."""
    unknown = Outcome(BARNEY, 451, "b.test did not answer in time; outcome unknown")
    failed = Outcome(BARNEY, 451, "the application failed to process the data")
    assert _outcome_text(unknown, 90) == "unknown (b.test did not answer in time; outcome unknown)"
    assert _outcome_text(failed, 90) == "failed 451 the application failed to process the data"


def test_a_media_type_that_is_none_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--type 'bad type' was taken, and the library's ValueError after connecting ended the
    command as "unexpected error: ValueError", exit 9: it is a bad argument (exit 2)."""
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(
            ["send", "--from", FRED, "--to", BARNEY, "--type", "bad type", "hello"]
        )
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "argument --type: media type 'bad type' is not type/subtype (RFC 2045 §5.1)" in err
    args = build_parser().parse_args(
        ["send", "--from", FRED, "--to", BARNEY, "--type", "text/plain; charset=utf-8", "hi"]
    )
    assert args.media_type == "text/plain; charset=utf-8"


def test_an_ipv6_relay_without_brackets_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """::1:9913 passed the command's check (its last colon ends the address) and the
    library read it otherwise: "unexpected error", exit 9. Which colon ends an IPv6
    address is said by brackets."""
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(
            ["send", "--from", FRED, "--to", BARNEY, "--relay", "::1:9913", "hi"]
        )
    assert raised.value.code == 2
    assert "written [ADDRESS]:PORT, not '::1:9913'" in capsys.readouterr().err
    args = build_parser().parse_args(
        ["send", "--from", FRED, "--to", BARNEY, "--relay", "[::1]:9913", "hi"]
    )
    assert args.relay == "[::1]:9913"


def test_an_error_is_one_line_whatever_it_quotes(capsys: pytest.CaptureFixture[str]) -> None:
    """What an error quotes (here a file name; a relay's diagnostic alike) cannot add a
    line of its own or send the terminal a control sequence."""
    forged = "/nonexistent/a\x1b[2Jb\nimxp: all is well.toml"
    assert main(["status", "--config", forged]) == 8
    err = capsys.readouterr().err
    assert err == (
        "imxp: /nonexistent/a\\x1b[2Jb\\x0aimxp: all is well.toml: cannot read: "
        "No such file or directory\n"
    )


def test_a_relay_ending_an_attachment_cannot_write_lines_of_its_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """listen and chat quote the relay's reason for a 421 terminate on stderr."""
    notices = _ConnectionNotices()
    notices(
        {
            "event": "client.terminated",
            "code": 421,
            "endpoints": [FRED],
            "text": "bye\nimxp: ok\x1b[8m",
        }
    )
    assert capsys.readouterr().err == (
        f"imxp: the relay ended the attachment of {FRED}: 421 bye\\x0aimxp: ok\\x1b[8m\n"
    )


# -- send and listen -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_reports_each_recipient_and_listeners_print_what_arrives(net: Net) -> None:
    barney = net.spawn("listen", "--as", BARNEY, "--json", "--count", "2")
    wilma = net.spawn("listen", "--as", WILMA, "--count", "1")
    await net.attached(BARNEY)
    await net.attached(WILMA)

    # Across domains and within one, with one recipient that does not exist: exit 1.
    text = "hello, grüße"
    first = await net.imxp(
        "send", "--from", FRED, "--to", BARNEY, "--to", WILMA, "--to", "nobody@b.test", text
    )
    assert first.status == 1, first
    assert first.out.splitlines() == [
        f"{BARNEY}: delivered (250)",
        f"{WILMA}: delivered (250)",
        "nobody@b.test: failed 550 unknown endpoint identity",
    ]
    assert first.err == ""

    # Raw content of another type, delivered to everyone: exit 0.
    content = bytes(range(256))
    (net.tmp / "blob").write_bytes(content)
    second = await net.imxp(
        "send",
        "--from",
        FRED,
        "--to",
        BARNEY,
        "--file",
        "blob",
        "--type",
        "application/octet-stream",
    )
    assert (second.status, second.out) == (0, f"{BARNEY}: delivered (250)\n"), second

    assert await barney.ended() == 0, barney
    cpim, raw = (json.loads(line) for line in barney.out.splitlines())
    assert cpim["originator"] == FRED
    # The relays hand each recipient its own copy; the message itself names all three.
    assert cpim["recipients"] == [BARNEY]
    assert cpim["media_type"] == "message/cpim"
    assert cpim["cpim"]["body"] == text
    assert cpim["cpim"]["sender"] == FRED
    assert cpim["cpim"]["to"] == [BARNEY, WILMA, "nobody@b.test"]
    assert raw["media_type"] == "application/octet-stream"
    assert base64.b64decode(raw["body_base64"]) == content
    assert "body" not in raw

    assert await wilma.ended() == 0, wilma
    assert re.fullmatch(rf"{STAMP} {FRED}: {text}\n", wilma.out), wilma


@pytest_twisted.ensureDeferred
async def test_listen_count_prints_every_message_its_senders_were_told_was_delivered(
    net: Net,
) -> None:
    """Three messages sent at once to `imxp listen --count 1`: one is printed, and only
    that one was delivered (250) as far as its sender knows; the others are refused
    (450), by the listener as it closes or by the relay once it has gone, not answered
    250 and dropped unread."""
    barney = net.spawn("listen", "--as", BARNEY, "--count", "1")
    await net.attached(BARNEY)
    fred = await connect(
        FRED, password=PASSWORD, trust=[net.ca.certificate], resolver=net.dns.resolver()
    )
    try:
        bodies = [b"m0", b"m1", b"m2"]
        outcomes = await defer.gatherResults(
            [defer.ensureDeferred(fred.send([BARNEY], body)) for body in bodies]
        )
    finally:
        await fred.close()
    assert await barney.ended() == 0, barney
    [printed] = barney.out.splitlines()
    codes = [outcome[BARNEY].code for outcome in outcomes]
    assert sorted(codes) == [250, 450, 450], outcomes
    assert printed.endswith(f": {bodies[codes.index(250)].decode()}")


@pytest_twisted.ensureDeferred
async def test_a_listener_whose_reader_has_gone_tells_the_sender_it_was_not_read(
    net: Net,
) -> None:
    """`imxp listen | head -n 1`: once head has gone, the next message cannot be printed.
    Its sender hears 451, not 250 for a message nobody saw, and listen ends saying why."""
    barney = net.spawn("listen", "--as", BARNEY)
    await net.attached(BARNEY)
    fred = await connect(
        FRED, password=PASSWORD, trust=[net.ca.certificate], resolver=net.dns.resolver()
    )
    try:
        seen = await fred.send([BARNEY], b"seen")
        await barney.output("seen")
        barney.transport.closeStdout()  # the reader of the pipe has gone
        unseen = await fred.send([BARNEY], b"nobody reads this")
    finally:
        await fred.close()
    assert seen[BARNEY].code == 250
    assert (unseen[BARNEY].code, unseen[BARNEY].text) == (
        451,
        "the listener could not print it: Broken pipe",
    )
    assert await barney.ended() == Exit.CONFIG, barney
    assert barney.err == "imxp: Broken pipe\n", barney


@pytest_twisted.ensureDeferred
async def test_what_a_sender_writes_cannot_rewrite_the_listeners_terminal(net: Net) -> None:
    """A message is the sender's text on someone else's terminal. A carriage return could
    print another sender's name over the real one, an escape sequence could retitle the
    terminal (or worse), a bidirectional override could reorder what is shown: each is
    shown as an escape. Tab, newline (CRLF too) and the rest of Unicode stay as they are."""
    wilma = net.spawn("listen", "--as", WILMA, "--count", "1")
    await net.attached(WILMA)
    text = "hi\r[2026-01-01 00:00:00] boss@a.test: pay\x1b]0;owned\x07 \u202egnp.exe\tgrüße\r\nbye"
    sent = await net.imxp("send", "--from", FRED, "--to", WILMA, text)
    assert sent.status == 0, sent
    assert await wilma.ended() == 0, wilma
    shown = wilma.out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u202e]", shown), repr(shown)
    first, second = shown.splitlines()
    assert first.endswith(
        "hi\\x0d[2026-01-01 00:00:00] boss@a.test: pay\\x1b]0;owned\\x07 \\u202egnp.exe\tgrüße"
    ), repr(first)
    assert re.fullmatch(rf"{STAMP} {FRED}: hi.*", first)
    assert second == "    bye"


@pytest_twisted.ensureDeferred
async def test_a_text_that_cannot_be_decoded_is_described_and_listen_goes_on(net: Net) -> None:
    """A sender chooses its text's charset and Content-Type parameters: one that names no
    text encoding (idna, undefined, an RFC 2231 value in one) is described by type and
    size, as binary content is, and the listener goes on to show what comes next, in
    either output form, rather than end (exit 9) with the rest answered 450."""
    cpim_head = f"From: <im:{FRED}>\r\nTo: <im:{BARNEY}>\r\nDateTime: 2026-11-23T00:00:00Z\r\n\r\n"
    hostile = {
        "idna.cpim": (
            "message/cpim",
            cpim_head + 'Content-Type: text/plain; charset="idna"\r\n\r\nhi',
        ),
        "undefined.txt": ('text/plain; charset="undefined"', "hi"),
        "rfc2231.txt": ("text/plain; protocol*=undefined''x", "hi"),
    }
    for form in ([], ["--json"]):
        barney = net.spawn("listen", "--as", BARNEY, *form, "--count", str(len(hostile) + 1))
        await net.attached(BARNEY)
        for name, (media_type, content) in hostile.items():
            (net.tmp / name).write_text(content)
            sent = await net.imxp(
                "send", "--from", FRED, "--to", BARNEY, "--file", name, "--type", media_type
            )
            assert sent.status == 0, sent
        sent = await net.imxp("send", "--from", FRED, "--to", BARNEY, "after them")
        assert sent.status == 0, sent
        assert await barney.ended() == 0, barney
        assert barney.err == ""
        lines = barney.out.splitlines()
        assert len(lines) == len(hostile) + 1, barney
        if form:
            assert json.loads(lines[-1])["cpim"]["body"] == "after them"
        else:
            assert lines[0].endswith(': [text/plain; charset="idna", 2 octets]'), lines
            assert lines[-1].endswith(f"{FRED}: after them"), lines


@pytest_twisted.ensureDeferred
async def test_a_file_without_type_is_labelled_by_its_name_or_its_content(net: Net) -> None:
    """Not text/plain for every file: a listener would print an image as text."""
    barney = net.spawn("listen", "--as", BARNEY, "--json", "--count", "3")
    await net.attached(BARNEY)
    files = {
        "photo.png": b"\x89PNG\r\n\x1a\n",
        "blob": bytes(range(256)),
        "notes": "grüße".encode(),
    }
    for name, content in files.items():
        (net.tmp / name).write_bytes(content)
        sent = await net.imxp("send", "--from", FRED, "--to", BARNEY, "--file", name)
        assert sent.status == 0, sent
    assert await barney.ended() == 0, barney
    types = [json.loads(line)["media_type"] for line in barney.out.splitlines()]
    assert types == ["image/png", "application/octet-stream", "text/plain"]


@pytest_twisted.ensureDeferred
async def test_listen_exits_cleanly_on_sigterm(net: Net) -> None:
    listen = net.spawn("listen", "--as", WILMA)
    await net.attached(WILMA)
    listen.signal("TERM")
    assert await listen.ended() == 0, listen
    assert listen.err == ""
    relay = net.relays["a.test"].service.relay
    await until(lambda: not relay.attached, "wilma to be detached")


@pytest_twisted.ensureDeferred
async def test_listen_says_when_its_connection_is_lost_and_made_again(net: Net) -> None:
    old = net.relays["b.test"]
    edge, mesh = old.port("edge"), old.port("mesh")
    listen = net.spawn("listen", "--as", BARNEY)
    await net.attached(BARNEY)
    await old.service.stopService()
    await until(lambda: "lost the connection" in listen.err, "the loss to be said")

    # Another relay for b.test on the same ports, with the same users.
    net.relays["b.test"] = await start_relay(
        "b.test",
        net.ca,
        net.tmp,
        identity=old.identity,
        edge_listen=[f"tcp:{edge}:interface=127.0.0.1"],
        mesh_listen=[f"tcp:{mesh}:interface=127.0.0.1"],
        resolver=net.dns.resolver(),
    )
    await net.attached(BARNEY)
    await until(lambda: listen.err.endswith("again\n"), "the return to be said")
    sent = await net.imxp("send", "--from", FRED, "--to", BARNEY, "welcome back")
    assert sent.status == 0, sent
    await listen.output("welcome back")
    listen.signal("TERM")
    assert await listen.ended() == 0, listen

    said = listen.err.splitlines()
    where = f"b.test:{edge}"
    assert said[:2] == [
        f"imxp: the relay ended the attachment of {BARNEY}: 421 relay shutting down",
        f"imxp: lost the connection to the relay at {where}; connecting again",
    ]
    # An attempt may have been made before the new relay listened: each reason is said once.
    assert all(line.startswith("imxp: cannot connect again yet: ") for line in said[2:-1])
    assert said[-1] == f"imxp: connected to the relay at {where} again"


@pytest_twisted.ensureDeferred
async def test_listen_and_chat_end_when_the_relay_ends_their_attachment(net: Net) -> None:
    listen = net.spawn("listen", "--as", BARNEY)
    chat = net.spawn("chat", "--as", WILMA, FRED, pty=True)
    await net.attached(BARNEY)
    await chat.output(f"chatting with {FRED}")

    # Ended for good (not 421, after which they would attach again): nothing more can
    # arrive, so neither waits on.
    await defer.gatherResults(
        [net.relays[d].service.relay.terminate_all(550, "removed by the operator") for d in DOMAINS]
    )
    assert await listen.ended() == 7, listen
    assert (
        one_error_line(listen)
        == f"imxp: {BARNEY} is no longer attached: 550 removed by the operator"
    )
    assert await chat.ended() == 7, chat
    assert f"imxp: {WILMA} is no longer attached: 550 removed by the operator" in chat.out


@pytest_twisted.ensureDeferred
async def test_a_refusal_cannot_print_a_verdict_of_its_own(net: Net) -> None:
    """The text of a failed outcome is the recipient application's or a relay's, perhaps
    another domain's. Its newline printed a line of its own in send's output and under
    chat's mark: here a "delivered" verdict for a recipient that was not delivered."""
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    forged = f"busy\n{WILMA}: delivered (250)"

    def refuse(request: Any) -> Any:
        return wire.encode(wire.Error(550, forged))

    barney.channel.handler.message_received = refuse
    try:
        sent = await net.imxp("send", "--from", FRED, "--to", BARNEY, "--to", WILMA, "hi")
        assert sent.status == 1, sent
        assert sent.out.splitlines() == [
            f"{BARNEY}: failed 550 busy\\x0a{WILMA}: delivered (250)",
            f"{WILMA}: failed 450 endpoint not attached",
        ], sent

        chat = net.spawn("chat", "--as", FRED, BARNEY)
        chat.write(b"hi\n")
        chat.transport.closeStdin()
        assert await chat.ended() == 1, chat
        marks = chat.out.splitlines()[1:]
        assert marks == [f"  ✗ 550 busy\\x0a{WILMA}: delivered (250) [hi]"], chat
    finally:
        barney.session.disconnect()


# -- errors ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_each_error_has_its_exit_code_and_one_line(net: Net) -> None:
    other_ca = net.tmp / "other-ca.pem"
    other_ca.write_bytes(create_ca("not the relays' CA").cert_pem())
    (net.tmp / "bad.toml").write_text('domain = "a.test"\nmax_hops = "many"\n')
    send = ("send", "--from", FRED, "--to", BARNEY, "hello")
    cases = {
        "wrong password": (3, net.spawn(*send, password="not the password")),
        "unknown domain": (
            4,
            net.spawn("send", "--from", "fred@nowhere.test", "--to", BARNEY, "hello"),
        ),
        "unreachable": (5, net.spawn(*send, "--relay", f"127.0.0.1:{closed_port()}")),
        "TLS": (6, net.spawn(*send, "--ca", str(other_ca))),
        # fred authenticates, but may not attach as wilma (RFC 3340 §4.5.1): 537.
        "refused": (7, net.spawn("listen", "--as", WILMA, "--username", "fred")),
        "bad config": (8, net.spawn("route", "a.test", "--config", "bad.toml")),
        "usage": (2, net.spawn("send", "--from", FRED, "hello")),
        "no password": (2, net.spawn(*send, password=None)),
    }
    await defer.gatherResults(
        [defer.ensureDeferred(command.ended()) for _code, command in cases.values()]
    )
    for case, (code, command) in cases.items():
        assert command.status == code, (case, command)
        assert "Traceback" not in command.err
        if case != "usage":  # argparse prints its usage text before its one line
            one_error_line(command)
            assert command.out == "", (case, command)
    assert "max_hops" in one_error_line(cases["bad config"][1])


@pytest_twisted.ensureDeferred
async def test_a_relay_of_localhost_on_other_ports_is_trusted_through_the_local_ca(
    net: Net, tmp_path: Path
) -> None:
    """For an endpoint @localhost the development CA in ./imxp-state is trusted also when
    --relay names another port; when that is not the relay's CA, the error says which CA
    was trusted and how to name the right one."""
    relay = await start_relay("localhost", net.ca, tmp_path, users=("fred",))
    try:
        where = f"127.0.0.1:{relay.port('edge')}"
        state = net.tmp / "imxp-state"
        state.mkdir()
        (state / "ca.pem").write_bytes(net.ca_file.read_bytes())
        send = ("send", "--relay", where, "--from", "fred/cli@localhost", "--to", "fred@localhost")
        # TLS, login and attach went well: fred@localhost is just not listening.
        sent = await net.imxp(*send, "hi", ca=False)
        assert (sent.status, sent.out) == (1, "fred@localhost: failed 450 endpoint not attached\n")

        create_ca("another development CA").write(state / "ca.pem", state / "ca.key")
        refused = await net.imxp(*send, "hi", ca=False)
        assert refused.status == 6, refused
        assert one_error_line(refused).endswith(
            f"(the CA trusted was {state / 'ca.pem'}; for a relay with another state_dir, "
            "give --ca with its ca.pem)"
        )
    finally:
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_sending_as_an_endpoint_that_listens_says_how_to_do_both(net: Net) -> None:
    listen = net.spawn("listen", "--as", WILMA, "--count", "1")
    await net.attached(WILMA)
    # One application at a time may attach as an endpoint (RFC 3340 §4.4.1 step 5).
    refused = await net.imxp("send", "--from", WILMA, "--to", WILMA, "hello me")
    assert refused.status == 7, refused
    assert one_error_line(refused) == (
        f"imxp: the relay refused to attach {WILMA} (554): {WILMA} is already attached (by "
        "another application; this one may attach as a subaddress of its own, such as "
        "wilma/cli@a.test)"
    )
    # As it says: the same login attaches as the subaddress, beside the listener.
    sent = await net.imxp("send", "--from", "wilma/cli@a.test", "--to", WILMA, "hello me")
    assert (sent.status, sent.out) == (0, f"{WILMA}: delivered (250)\n"), sent
    assert await listen.ended() == 0, listen
    assert "wilma/cli@a.test: hello me" in listen.out


@pytest_twisted.ensureDeferred
async def test_a_send_fed_nothing_sends_nothing(net: Net) -> None:
    """``producer | imxp send ...`` whose producer failed and wrote nothing: an empty
    message was sent, reported delivered, and the exit status was 0."""
    listen = net.spawn("listen", "--as", WILMA, "--count", "1")
    await net.attached(WILMA)
    for raw in ((), ("--raw",)):
        send = net.spawn("send", "--from", FRED, "--to", WILMA, *raw)
        send.transport.closeStdin()
        assert await send.ended() == 2, send
        assert one_error_line(send) == "imxp: nothing to send: standard input was empty"
    # The listener got nothing; what it takes next is the message that follows.
    sent = await net.imxp("send", "--from", FRED, "--to", WILMA, "after nothing")
    assert sent.status == 0, sent
    assert await listen.ended() == 0, listen
    assert f"{FRED}: after nothing" in listen.out, listen


@pytest_twisted.ensureDeferred
async def test_a_send_that_gives_up_part_way_prints_the_verdicts_it_has(net: Net) -> None:
    """More than 1,000 recipients go in several data. The relay is shutting down: it
    refuses the first data it reads with 421, and ends the session after the second,
    before the last are written, so the command gives up on those. Told only of the
    error, a person would not know which recipients are still to be sent to."""
    core = net.relays["a.test"].service.relay
    core.accepting = False
    taken = core.data
    seen = []

    def data(channel: Any, element: wire.Data, received: Any = None) -> wire.OK:
        seen.append(element)
        if len(seen) == 2:
            # After this turn, which writes the refusal.
            reactor.callLater(0, channel.session.disconnect)
        return taken(channel, element, received)

    core.data = data
    # Nine data of 45 KB: more than the relay reads and the window of 128 KiB beyond it.
    strangers = [f"stranger{n}@a.test" for n in range(8 * wire.MAX_RECIPIENTS + 5)]
    to = [arg for stranger in strangers for arg in ("--to", stranger)]
    sent = await net.imxp("send", "--from", FRED, *to, "all hands")
    relay_at = f"a.test:{net.relays['a.test'].port('edge')}"

    assert sent.status == 5, sent
    assert one_error_line(sent) == f"imxp: lost the connection to the relay at {relay_at}"
    lines = sent.out.splitlines()
    assert 2 * wire.MAX_RECIPIENTS <= len(lines) < len(strangers)
    assert [line.split(": ", 1)[0] for line in lines] == strangers[: len(lines)]
    verdicts = [line.split(": ", 1)[1] for line in lines]
    refused = "failed 421 relay is shutting down"
    assert verdicts[: 2 * wire.MAX_RECIPIENTS] == [refused] * (2 * wire.MAX_RECIPIENTS)
    # Any written in part when the session went may have reached the relay.
    unknown = f"unknown (no status report: lost the connection to the relay at {relay_at})"
    assert set(verdicts[2 * wire.MAX_RECIPIENTS :]) <= {refused, unknown}


# -- chat ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chat_on_a_terminal(net: Net) -> None:
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    chat = net.spawn("chat", "--as", FRED, BARNEY, pty=True)
    try:
        await chat.output(f"chatting with {BARNEY}")
        chat.write(b"hello barney\n")
        await chat.output("✓ [hello barney]")
        await barney.wait("data", 1)
        data = barney.data[0]
        assert data.originator.identity == FRED
        assert data.content is not None
        assert data.content.media_type == "message/cpim"
        assert b"hello barney" in data.content.body

        # A line arrives while fred could be typing: plain text, as another client sends.
        await barney.send([FRED], b"hi fred")
        await chat.output(f"{BARNEY}> hi fred")

        chat.write(b"/quit\n")
        assert await chat.ended() == 0, chat
    finally:
        barney.session.disconnect()


@pytest_twisted.ensureDeferred
async def test_chat_fed_from_a_pipe_marks_every_line_and_exits_as_send_does(net: Net) -> None:
    """Input ends at once, before any line has its report: each line's mark is still
    printed, and a line not delivered makes the exit status 1, as for ``imxp send``."""
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    try:
        chat = net.spawn("chat", "--as", FRED, BARNEY)
        chat.write(b"one\ntwo\nthree\n")
        chat.transport.closeStdin()
        assert await chat.ended() == 0, chat
        assert [line for line in chat.out.splitlines() if "[" in line] == [
            "  ✓ [one]",
            "  ✓ [two]",
            "  ✓ [three]",
        ], chat
        await barney.wait("data", 3)
    finally:
        barney.session.disconnect()

    failing = net.spawn("chat", "--as", FRED, "nobody@b.test")
    failing.write(b"anyone?\n")
    failing.transport.closeStdin()
    assert await failing.ended() == 1, failing
    assert "  ✗ 550 unknown endpoint identity [anyone?]" in failing.out, failing


@pytest_twisted.ensureDeferred
async def test_chat_sends_the_last_line_of_input_that_ends_without_a_newline(net: Net) -> None:
    """``printf 'one\ntwo' | imxp chat ...``: the input ends within its last line, which is
    a line all the same. It was dropped, neither sent nor marked, and the chat exited 0."""
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    try:
        chat = net.spawn("chat", "--as", FRED, BARNEY)
        chat.write(b"one\ntwo")
        chat.transport.closeStdin()
        assert await chat.ended() == 0, chat
        marks = sorted(line for line in chat.out.splitlines() if "[" in line)
        assert marks == ["  ✓ [one]", "  ✓ [two]"], chat
        await barney.wait("data", 2)
        assert any(b"two" in (data.content.body if data.content else b"") for data in barney.data)
    finally:
        barney.session.disconnect()


@pytest_twisted.ensureDeferred
async def test_chat_sends_a_line_longer_than_16_kib_and_the_lines_after_it(net: Net) -> None:
    """A pasted line past 16 KiB closed the chat's input: it and every line after it were
    dropped, neither sent nor marked, and the chat exited 0. The relays carry it."""
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    try:
        chat = net.spawn("chat", "--as", FRED, BARNEY)
        long = "x" * 20_000
        chat.write(f"{long}\nafter\n".encode())
        chat.transport.closeStdin()
        assert await chat.ended() == 0, chat
        marks = sorted(line for line in chat.out.splitlines() if "[" in line)
        assert marks == ["  ✓ [after]", f"  ✓ [{long[:39]}…]"], chat
        await barney.wait("data", 2)
        bodies = [data.content.body if data.content else b"" for data in barney.data]
        assert any(long.encode() in body for body in bodies), bodies
    finally:
        barney.session.disconnect()


@pytest_twisted.ensureDeferred
async def test_chat_does_not_send_a_line_that_is_not_utf8_as_if_it_were(net: Net) -> None:
    """A line in another encoding (Latin-1 "grüße") was sent with its octets replaced by
    U+FFFD, marked ✓ as delivered, and the chat exited 0: what arrived is not what was
    typed. As imxp send does, the line is refused; the chat goes on and exits 1."""
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    try:
        chat = net.spawn("chat", "--as", FRED, BARNEY)
        chat.write("grüße\n".encode("latin-1") + b"hello\n")
        chat.transport.closeStdin()
        assert await chat.ended() == 1, chat
        marks = sorted(line for line in chat.out.splitlines() if "[" in line)
        assert marks == ["  ✓ [hello]", "  ✗ not sent: not UTF-8 text [gr\ufffd\ufffde]"], chat
        # Every line sent had its report by the end: only hello was.
        [hello] = [data.content.body if data.content else b"" for data in barney.data]
        assert b"hello" in hello
    finally:
        barney.session.disconnect()


# -- certs -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_what_no_certificate_or_password_can_be_is_one_line_not_a_crash(net: Net) -> None:
    """Each was "unexpected error" (exit 9), or for the domain a certificate no relay would
    match: a validity past the year 9999, a relay name that is no DNS name, a password
    file that is not UTF-8."""
    made = await net.imxp("certs", "ca", "--out", "ca", "--name", "CA", "--days", "3000000")
    assert made.status == 2 and "days from" in one_error_line(made), made
    assert (await net.imxp("certs", "ca", "--out", "ca", "--name", "CA")).status == 0
    for name, said in (
        ("bad domain", "'bad domain' is not a DNS name"),
        ("[192.0.2.1]", "is an address literal"),
    ):
        made = await net.imxp("certs", "relay", "--ca", "ca", "--domain", name, "--out", "r")
        assert made.status == 2 and said in one_error_line(made), made
    assert not (net.tmp / "r" / "relay.pem").exists()
    (net.tmp / "password").write_bytes(b"\xffsecret\n")
    sent = await net.imxp(
        "send", "--from", FRED, "--to", BARNEY, "--password-file", "password", "hi"
    )
    assert (sent.status, one_error_line(sent)) == (8, "imxp: password: not UTF-8 text"), sent


@pytest_twisted.ensureDeferred
async def test_a_file_that_is_no_certificate_is_named_by_the_option_that_gave_it(
    net: Net,
) -> None:
    """A client certificate (--cert) or a CA's files (certs --ca) that could not be used
    were named as --smime-cert and --smime-key, options the command line did not have."""
    (net.tmp / "junk.pem").write_text("not a certificate\n")
    sent = await net.imxp(
        "send", "--from", FRED, "--to", BARNEY, "--cert", "junk.pem", "--key", "junk.pem", "hi"
    )
    assert sent.status == 8, sent
    assert one_error_line(sent).startswith("imxp: --cert junk.pem: "), sent

    assert (await net.imxp("certs", "ca", "--out", "ca", "--name", "CA")).status == 0
    assert (await net.imxp("certs", "ca", "--out", "other", "--name", "Other")).status == 0
    (net.tmp / "ca" / "ca.key").write_bytes((net.tmp / "other" / "ca.key").read_bytes())
    made = await net.imxp("certs", "relay", "--ca", "ca", "--domain", "a.test", "--out", "r")
    assert made.status == 8, made
    assert one_error_line(made).startswith(f"imxp: CA key {Path('ca', 'ca.key')}: "), made
    (net.tmp / "ca" / "ca.pem").write_text("not a certificate\n")
    made = await net.imxp("certs", "smime", "--ca", "ca", "--identity", FRED, "--out", "s")
    assert made.status == 8, made
    assert one_error_line(made).startswith(f"imxp: CA certificate {Path('ca', 'ca.pem')}: ")


@pytest_twisted.ensureDeferred
async def test_certs_make_a_ca_relay_and_endpoint_certificates_that_verify(net: Net) -> None:
    made = await net.imxp("certs", "ca", "--out", "ca", "--name", "Example CA")
    assert made.status == 0, made
    relay, endpoint = await defer.gatherResults(
        [
            defer.ensureDeferred(
                net.imxp("certs", "relay", "--ca", "ca", "--domain", "a.test", "--out", "relay")
            ),
            defer.ensureDeferred(
                net.imxp("certs", "endpoint", "--ca", "ca", "--identity", FRED, "--out", "fred")
            ),
        ]
    )
    assert relay.status == endpoint.status == 0, (relay, endpoint)

    ca = load_issued(net.tmp / "ca/ca.pem", net.tmp / "ca/ca.key")
    server = load_issued(net.tmp / "relay/relay.pem", net.tmp / "relay/relay.key")
    client = load_issued(net.tmp / f"fred/{FRED}.pem", net.tmp / f"fred/{FRED}.key")
    for issued in (server, client):
        issued.certificate.verify_directly_issued_by(ca.certificate)
    verify_certificate_hostname(server.certificate, "a.test")
    assert client_identity(client.certificate) == FRED
    for key in ("ca/ca.key", "relay/relay.key", f"fred/{FRED}.key"):
        assert (net.tmp / key).stat().st_mode & 0o777 == 0o600
        assert (net.tmp / key).parent.stat().st_mode & 0o777 == 0o700

    # Never overwritten by accident.
    before = (net.tmp / "relay/relay.pem").read_bytes()
    again = await net.imxp("certs", "relay", "--ca", "ca", "--domain", "b.test", "--out", "relay")
    assert again.status == 8
    assert "already exist" in one_error_line(again)
    assert (net.tmp / "relay/relay.pem").read_bytes() == before
    forced = await net.imxp(
        "certs", "relay", "--ca", "ca", "--domain", "b.test", "--out", "relay", "--force"
    )
    assert forced.status == 0, forced
    replaced = load_issued(net.tmp / "relay/relay.pem", net.tmp / "relay/relay.key")
    verify_certificate_hostname(replaced.certificate, "b.test")


@pytest_twisted.ensureDeferred
async def test_an_endpoint_certificate_logs_in_without_a_password(net: Net) -> None:
    # Issued from the CA the relays trust, it authenticates fred with SASL EXTERNAL.
    (net.tmp / "ca").mkdir()
    net.ca.write(net.tmp / "ca/ca.pem", net.tmp / "ca/ca.key")
    made = await net.imxp("certs", "endpoint", "--ca", "ca", "--identity", FRED, "--out", "fred")
    assert made.status == 0, made
    sent = await net.imxp(
        "send",
        "--from",
        FRED,
        "--to",
        "nobody@a.test",
        "--cert",
        f"fred/{FRED}.pem",
        "--key",
        f"fred/{FRED}.key",
        "hello",
        password=None,
    )
    # Attached and accepted: the relay's report on the one recipient is all that fails.
    assert (sent.status, sent.out) == (1, "nobody@a.test: failed 550 unknown endpoint identity\n")
    assert sent.err == ""


# -- users -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_users_add_list_remove_and_a_running_relay_sees_them(net: Net) -> None:
    # The file a.test's relay is running with.
    users = str(net.relays["a.test"].users.path)
    added = await net.imxp("users", "add", "dino", "--file", users, password="yabba dabba")
    assert added.status == 0, added
    assert "dino" in UserStore(users)
    listed = await net.imxp("users", "list", "--file", users)
    assert listed.out.splitlines() == ["dino", "fred", "wilma"]
    twice = await net.imxp("users", "add", "dino", "--file", users)
    assert twice.status == 1, twice

    # The relay accepts dino without a restart: the data is accepted and reported on.
    sent = await net.imxp(
        "send", "--from", "dino@a.test", "--to", BARNEY, "hi", password="yabba dabba"
    )
    assert (sent.status, sent.out) == (1, f"{BARNEY}: failed 450 endpoint not attached\n"), sent

    changed = await net.imxp("users", "password", "dino", "--file", users, password="pebbles")
    assert (changed.status, changed.out) == (0, f"new password for dino in {users}\n"), changed
    sent = await net.imxp("send", "--from", "dino@a.test", "--to", BARNEY, "hi", password="pebbles")
    assert sent.status == 1 and "450 endpoint not attached" in sent.out, sent

    removed = await net.imxp("users", "remove", "dino", "--file", users)
    assert removed.status == 0, removed
    assert "dino" not in UserStore(users)
    gone = await net.imxp("users", "remove", "dino", "--file", users)
    assert gone.status == 1, gone
    nobody = await net.imxp("users", "password", "dino", "--file", users, password="pebbles")
    assert nobody.status == 1 and "there is no user dino" in nobody.err, nobody


@pytest_twisted.ensureDeferred
async def test_users_named_as_endpoints_of_the_relays_domain_log_in_by_default(net: Net) -> None:
    # An operator names the user as its endpoint, through the relay's own configuration.
    config = str(relay_config(net, net.relays["a.test"].identity))
    added = await net.imxp("users", "add", "dino@A.test", "-c", config, password="yabba dabba")
    assert (added.status, added.out) == (
        0,
        f"added dino (dino@A.test) to {net.relays['a.test'].users.path}\n",
    )
    # The client's default login name for dino@a.test is dino, which is what is stored.
    sent = await net.imxp(
        "send", "--from", "dino@a.test", "--to", BARNEY, "hi", password="yabba dabba"
    )
    assert (sent.status, sent.out) == (1, f"{BARNEY}: failed 450 endpoint not attached\n"), sent
    again = await net.imxp("users", "add", "dino", "-c", config, password="yabba dabba")
    assert again.status == 1, again

    # Names that could never attach at a.test are refused, and nothing is stored.
    for name in ("dino@b.test", "dino/phone@a.test"):
        refused = await net.imxp("users", "add", name, "-c", config, password="yabba dabba")
        assert refused.status == 2, refused
        assert one_error_line(refused).startswith(f"imxp: {name}"), refused
    assert UserStore(net.relays["a.test"].users.path).usernames() == ["dino", "fred", "wilma"]

    # SASLprep (RFC 4013) stores ǅ as Dž: what is said is the name a login must use.
    titled = await net.imxp("users", "add", "\u01c5", "-c", config, password="yabba dabba")
    stored = "D\u017e"
    path = net.relays["a.test"].users.path
    assert (titled.status, titled.out) == (0, f"added {stored} (\u01c5) to {path}\n"), titled

    removed = await net.imxp("users", "remove", "dino@a.test", "-c", config)
    assert removed.status == 0, removed
    assert "dino" not in UserStore(net.relays["a.test"].users.path)


# -- route -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_route_shows_the_srv_targets(net: Net) -> None:
    dns = f"127.0.0.1:{net.dns.port}"
    mesh, edge, nowhere = await defer.gatherResults(
        [
            defer.ensureDeferred(net.imxp("route", "b.test", "--dns", dns)),
            defer.ensureDeferred(net.imxp("route", "b.test", "--edge", "--dns", dns)),
            defer.ensureDeferred(net.imxp("route", "nowhere.test", "--dns", dns)),
        ]
    )
    b = net.relays["b.test"]
    assert mesh.status == 0, mesh
    assert "SRV lookup of _apex-mesh._tcp.b.test" in mesh.out
    assert f"port {b.port('mesh')} target b.test" in mesh.out
    assert edge.status == 0, edge
    assert f"port {b.port('edge')} target b.test" in edge.out
    assert nowhere.status == 4, nowhere
    assert "no route (permanent): no such domain" in nowhere.out


# -- check -----------------------------------------------------------------------------------


def relay_config(
    net: Net, identity: Issued, *, peer_name: str = "", smart_host: bool = False
) -> Path:
    """A configuration for the running a.test relay, with ``identity`` as its certificate
    and a static route to b.test (whose certificate must name ``peer_name`` if given), or
    b.test's relay as its smart host instead."""
    a, b = net.relays["a.test"], net.relays["b.test"]
    identity.write(net.tmp / "a.pem", net.tmp / "a.key")
    path = net.tmp / "a.toml"
    hop = f"127.0.0.1:{b.port('mesh')}" + (f"={peer_name}" if peer_name else "")
    routes = f'smart_host = "{hop}"' if smart_host else f'[routes]\n"b.test" = "{hop}"'
    path.write_text(
        f"""
domain = "a.test"
edge_listen = ["tcp:{a.port("edge")}:interface=127.0.0.1"]
mesh_listen = ["tcp:{a.port("mesh")}:interface=127.0.0.1"]
state_dir = "state"
tls_certificate = "{net.tmp / "a.pem"}"
tls_key = "{net.tmp / "a.key"}"
tls_trust = ["{net.ca_file}"]
users_file = "{a.users.path}"

{routes}
"""
    )
    return path


async def run_check(net: Net, config: Path) -> Command:
    return await net.imxp("check", "--config", str(config), "--dns", f"127.0.0.1:{net.dns.port}")


def problems_in(command: Command | str) -> list[str]:
    out = command if isinstance(command, str) else command.out
    return [line for line in out.splitlines() if line.startswith("problem: ")]


@pytest_twisted.ensureDeferred
async def test_check_says_all_good_for_a_good_relay(net: Net) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    check = await net.imxp("check", "--config", str(config), "--dns", f"127.0.0.1:{net.dns.port}")
    assert check.status == 0, check
    assert "problem" not in check.out
    assert "peer b.test at 127.0.0.1" in check.out
    assert check.out.endswith("all good\n")


@pytest_twisted.ensureDeferred
async def test_check_names_an_ipv6_listener_it_cannot_reach_readably(net: Net) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        closed = s.getsockname()[1]
    text = config.read_text().replace(
        f'edge_listen = ["tcp:{net.relays["a.test"].port("edge")}:interface=127.0.0.1"]',
        f"edge_listen = ['tcp6:{closed}:interface=\\:\\:']",
    )
    config.write_text(text)
    check = await net.imxp("check", "--config", str(config), "--dns", f"127.0.0.1:{net.dns.port}")
    assert check.status == 1, check
    assert (
        f"problem: relay not running or not listening on tcp6:{closed}:interface=\\:\\: "
        f"([::1]:{closed}: connection refused)"
    ) in check.out


@pytest_twisted.ensureDeferred
async def test_check_reports_each_problem_with_its_fix(net: Net) -> None:
    config = relay_config(net, issue_server(net.ca, ["c.test"]), peer_name="wrong.test")
    check = await net.imxp("check", "--config", str(config), "--dns", f"127.0.0.1:{net.dns.port}")
    assert check.status == 1, check
    problems = [line for line in check.out.splitlines() if line.startswith("problem: ")]
    assert problems == [
        f"problem: certificate {net.tmp / 'a.pem'} does not name a.test: issue one for a.test "
        "(imxp certs relay --ca CA_DIR --domain a.test --out DIR)",
        problems[1],
    ], check.out
    assert problems[1].startswith("problem: peer b.test at 127.0.0.1:")
    assert "TLS verification failed" in problems[1]
    assert "its certificate does not name wrong.test" in problems[1]
    assert check.out.endswith("2 problems found\n")


@pytest_twisted.ensureDeferred
async def test_check_checks_the_smart_host_as_a_static_route(net: Net) -> None:
    # Without a name, the smart host's certificate must name its host: b.test's does not.
    unnamed = await run_check(
        net, relay_config(net, net.relays["a.test"].identity, smart_host=True)
    )
    hop = f"127.0.0.1:{net.relays['b.test'].port('mesh')}"
    assert problems_in(unnamed) == [
        f"problem: smart host {hop}: TLS verification failed: its certificate does not name "
        "127.0.0.1: give that relay a certificate for 127.0.0.1, or name the one it has in "
        "smart_host (host:port=name)"
    ], unnamed

    named = relay_config(net, net.relays["a.test"].identity, peer_name="b.test", smart_host=True)
    good = await run_check(net, named)
    assert good.status == 0, good
    assert f"ok: smart host {hop} proves b.test (TLS verified)\n" in good.out

    nowhere = closed_port()
    named.write_text(named.read_text().replace(hop, f"127.0.0.1:{nowhere}"))
    down = await run_check(net, named)
    assert problems_in(down) == [
        f"problem: smart host 127.0.0.1:{nowhere} unreachable (connection refused): correct "
        "smart_host or start that relay"
    ], down


def unreadable(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make ``path`` one this user may not read: a file (0600, another user's) or a
    directory (0700, another user's, as a relay's state_dir or /etc/letsencrypt/live), in
    which no file can even be looked at. The tests run as root, whom modes do not stop."""
    real_stat, real_open = Path.stat, Path.open

    def denied(self: Path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    def stat(self: Path, **kwargs: Any) -> os.stat_result:
        if path in self.parents:
            raise denied(self)
        return real_stat(self, **kwargs)

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path or path in self.parents:
            raise denied(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(Path, "open", open_)


async def check_here(net: Net, config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``imxp check`` in this process, where :func:`unreadable` applies: its output."""
    dns = f"127.0.0.1:{net.dns.port}"
    args = build_parser().parse_args(["check", "--config", str(config), "--dns", dns])
    status = await args.run(reactor, args)
    out = capsys.readouterr().out
    assert status == 1, out
    return out


def cannot_read(what: str, path: Path) -> str:
    return (
        f"problem: {what} {path} cannot be read by this user: run imxp check as the relay's "
        "user, or give this one read access"
    )


@pytest_twisted.ensureDeferred
async def test_check_reports_files_in_a_directory_it_may_not_enter_and_goes_on(
    net: Net, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    live, state = net.tmp / "live", net.tmp / "state"
    live.mkdir()
    state.mkdir()
    net.relays["a.test"].identity.write(live / "a.pem", live / "a.key")
    (live / "extra-ca.pem").write_bytes(net.ca.cert_pem())
    (state / "users").write_bytes(net.relays["a.test"].users.path.read_bytes())
    config.write_text(
        config.read_text()
        .replace(str(net.tmp / "a.pem"), str(live / "a.pem"))
        .replace(str(net.tmp / "a.key"), str(live / "a.key"))
        .replace(f'"{net.ca_file}"', f'"{net.ca_file}", "{live / "extra-ca.pem"}"')
        .replace(f'users_file = "{net.relays["a.test"].users.path}"\n', "")
    )
    unreadable(monkeypatch, live)
    unreadable(monkeypatch, state)
    out = await check_here(net, config, capsys)
    assert problems_in(out) == [
        cannot_read("certificate", live / "a.pem"),
        cannot_read("tls_trust file", live / "extra-ca.pem"),
        cannot_read("user file", state / "users"),
    ], out
    # The checks that need none of them still ran.
    assert "ok: a relay answers on tcp:" in out
    assert "SRV _apex-mesh._tcp.a.test" in out
    assert "peer b.test at 127.0.0.1:" in out
    assert out.endswith("3 problems found\n")


@pytest_twisted.ensureDeferred
async def test_check_says_a_key_it_may_not_read_cannot_be_read(
    net: Net, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    unreadable(monkeypatch, net.tmp / "a.key")
    out = await check_here(net, config, capsys)
    assert problems_in(out) == [cannot_read("key", net.tmp / "a.key")], out
    assert out.endswith("1 problem found\n")


@pytest_twisted.ensureDeferred
async def test_check_says_a_configuration_it_may_not_read_cannot_be_read(
    net: Net, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    unreadable(monkeypatch, config)
    out = await check_here(net, config, capsys)
    assert out == cannot_read("configuration", config) + "\n"


@pytest_twisted.ensureDeferred
async def test_check_expects_what_a_first_start_makes(net: Net) -> None:
    a = net.relays["a.test"]
    config = net.tmp / "first.toml"
    config.write_text(
        f"""
domain = "a.test"
edge_listen = ["tcp:{a.port("edge")}:interface=127.0.0.1"]
mesh_listen = ["tcp:{a.port("mesh")}:interface=127.0.0.1"]
state_dir = "first"
"""
    )
    checked = await run_check(net, config)
    assert checked.status == 0, checked
    state = net.tmp / "first"
    for note in (
        f"note: no relay certificate at {state / 'relay.pem'} yet: the relay makes a "
        "development certificate for a.test on first start",
        f"note: no development CA at {state / 'ca.pem'} yet: the relay makes one on first start",
        f"note: no user file at {state / 'users'} yet: the relay makes an empty one on first start",
    ):
        assert f"{note}\n" in checked.out, checked


@pytest_twisted.ensureDeferred
async def test_check_says_an_empty_tls_trust_stops_a_relay_with_its_own_certificate(
    net: Net,
) -> None:
    config = relay_config(net, net.relays["a.test"].identity)
    config.write_text(
        config.read_text().replace(f'tls_trust = ["{net.ca_file}"]', "tls_trust = []")
    )
    checked = await run_check(net, config)
    assert checked.status == 1, checked
    assert problems_in(checked) == [
        f"problem: tls_trust is empty and there is no development CA at "
        f"{net.tmp / 'state/ca.pem'}, which the relay makes only with a development "
        "certificate (tls_certificate and tls_key unset), so it will not start: set "
        "tls_trust to the PEM files of the CAs that peers' and endpoints' certificates chain "
        "to"
    ], checked


@pytest_twisted.ensureDeferred
async def test_check_reports_a_certificate_not_yet_valid(net: Net) -> None:
    valid_from = datetime.now(UTC) + timedelta(days=2)
    config = relay_config(net, issue_server(net.ca, ["a.test"], valid_from=valid_from))
    checked = await run_check(net, config)
    assert checked.status == 1, checked
    assert (
        f"problem: certificate {net.tmp / 'a.pem'} is not valid until "
        f"{valid_from:%Y-%m-%d %H:%M} UTC: check this machine's clock, or keep the "
        "certificate it replaces until then"
    ) in problems_in(checked), checked


class _NotBEEP(Protocol):
    """What another program on a relay's port says: an SSH server's banner."""

    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n")


@pytest_twisted.ensureDeferred
async def test_check_tells_another_program_on_a_listeners_port_from_no_relay(net: Net) -> None:
    other = reactor.listenTCP(0, Factory.forProtocol(_NotBEEP), interface="127.0.0.1")
    try:
        port = other.getHost().port
        config = relay_config(net, net.relays["a.test"].identity)
        edge = f"tcp:{net.relays['a.test'].port('edge')}:interface=127.0.0.1"
        config.write_text(config.read_text().replace(edge, f"tcp:{port}:interface=127.0.0.1"))
        checked = await run_check(net, config)
    finally:
        await other.stopListening()
    assert checked.status == 1, checked
    # Besides the SRV record naming the relay's edge port, no longer in edge_listen.
    [problem] = [line for line in problems_in(checked) if f"tcp:{port}:" in line]
    assert problem.startswith(
        f"problem: a program that does not speak BEEP answers on tcp:{port}:interface=127.0.0.1 "
        f"(127.0.0.1:{port}: session ended: "
    ), checked
    assert problem.endswith(f"): stop it, or give edge_listen another port than {port}"), checked
