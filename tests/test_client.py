"""The edge client library against real relays on loopback (RFC 3340 §2.1).

Two domains, a.test (fred, wilma) and b.test (barney, bambam), each with a relay whose
certificate from the test CA names its domain. A real twisted.names server publishes
``_apex-edge._tcp.X.test`` (RFC 3340 §3.1) for the clients and ``_apex-mesh._tcp.X.test``
for the relays, each with ``X.test A 127.0.0.1``. Clients authenticate with SCRAM-SHA-256
unless a test says otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from apexnet import PASSWORD, RelayHandle, attach, forwarder_to, free_ports, start_relay
from cryptography.hazmat.primitives.serialization import Encoding
from dnsserver import DNSServer, a, srv
from test_readme import python_blocks
from twisted.internet import defer, endpoints, protocol, reactor, task, utils
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from imxp.apex import wire
from imxp.apex.address import Endpoint
from imxp.apex.service import USERS_LOOK_SECONDS
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    ChannelHandler,
    Request,
    Role,
    Session,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.users import UserStore
from imxp.certs import Issued, create_ca, issue_client, issue_server
from imxp.client import (
    Client,
    ClientError,
    Incoming,
    Outcome,
    Protection,
    Refusal,
    Termination,
    connect,
    edge,
)
from imxp.e2e import cpim
from imxp.e2e.protect import Keys

FRED = "fred@a.test"
WILMA = "wilma@a.test"
BARNEY = "barney@b.test"
BAMBAM = "bambam@b.test"  # a user of b.test who never attaches: 450
USERS = {"a.test": ("fred", "wilma"), "b.test": ("barney", "bambam")}
#: Reconnection backoff for the tests: quick, but still exponential.
BACKOFF = (0.05, 0.2)
#: Content a re-serialising layer would be likely to spoil.
BODY = bytes(range(256)) + b"\r\n--boundary\r\n\r\n" + "grüße, ☃".encode()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.02, lambda: None)


@dataclass
class Net:
    dns: DNSServer
    ca: Issued
    tmp: Path
    #: The relay serving each domain now.
    relays: dict[str, RelayHandle] = field(default_factory=dict)
    #: Every relay started, to stop them all in the end.
    handles: list[RelayHandle] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    def publish(self, domain: str, handle: RelayHandle) -> None:
        self.dns.set(f"_apex-edge._tcp.{domain}", srv(0, 0, handle.port("edge"), f"{domain}."))
        self.dns.set(f"_apex-mesh._tcp.{domain}", srv(0, 0, handle.port("mesh"), f"{domain}."))
        self.dns.set(domain, a("127.0.0.1"))

    async def start(self, domain: str, users: tuple[str, ...] = (), **settings: Any) -> RelayHandle:
        """A relay for ``domain`` (users as given, or those of USERS), published in DNS."""
        where = self.tmp / f"{domain}-{len(self.handles)}"
        where.mkdir()
        settings.setdefault("delivery_timeout", 10.0)
        settings.setdefault("shutdown_grace", 0.5)
        handle = await start_relay(
            domain,
            self.ca,
            where,
            users=users or USERS.get(domain, ()),
            resolver=self.dns.resolver(),
            **settings,
        )
        self.relays[domain] = handle
        self.handles.append(handle)
        self.publish(domain, handle)
        return handle

    async def connect(self, endpoint: str, **options: Any) -> Client:
        """``connect`` with the test's DNS, CA and password unless told otherwise."""
        if "client_certificate" not in options:
            options.setdefault("password", PASSWORD)
        options.setdefault("trust", [self.ca.certificate])
        options.setdefault("resolver", self.dns.resolver())
        options.setdefault("backoff", BACKOFF)
        client = await connect(endpoint, **options)
        self.clients.append(client)
        return client


@pytest_twisted.async_yield_fixture
async def net(test_ca: Issued, tmp_path: Path, dns_server: DNSServer) -> AsyncIterator[Net]:
    network = Net(dns_server, test_ca, tmp_path)
    await network.start("a.test")
    await network.start("b.test")
    yield network
    for client in network.clients:
        await client.close()
    for handle in network.handles:
        if handle.service.running:
            await handle.service.stopService()


class Inbox:
    """What an ``on_data`` callback saw."""

    def __init__(self) -> None:
        self.items: list[Incoming] = []

    def __call__(self, incoming: Incoming) -> None:
        self.items.append(incoming)

    async def wait(self, count: int = 1) -> list[Incoming]:
        await until(lambda: len(self.items) >= count)
        return self.items


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """The structured log events of the client library emitted during the test."""
    captured: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if str(event.get("event", "")).startswith("client."):
            captured.append(event)

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)


def codes(outcomes: dict[str, Outcome]) -> dict[str, int | None]:
    return {recipient: outcome.code for recipient, outcome in outcomes.items()}


def until_it_ends(client: Client) -> tuple[defer.Deferred[None], list[ClientError]]:
    """Iterate ``client.incoming()`` until it ends: fires then, with the ClientError it
    raised (if any) in the list."""
    errors: list[ClientError] = []

    async def consume() -> None:
        try:
            async for _incoming in client.incoming():
                pass
        except ClientError as e:
            errors.append(e)

    return defer.ensureDeferred(consume()), errors


# -- connecting and sending ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_across_domains_reports_each_recipient(net: Net) -> None:
    """fred finds his relay through SRV, barney his through host:port; one data to four
    recipients ends in four final outcomes (RFC 3340 §5.1, §6.2, §10)."""
    barney_inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(
        BARNEY, relay=f"127.0.0.1:{net.relays['b.test'].port('edge')}", on_data=barney_inbox
    )

    outcomes = await fred.send([BARNEY, BAMBAM, "nobody@b.test", WILMA], BODY)

    assert codes(outcomes) == {BARNEY: 250, BAMBAM: 450, "nobody@b.test": 550, WILMA: 450}
    assert outcomes[BARNEY].delivered and not outcomes[BARNEY].unknown
    assert outcomes["nobody@b.test"].text == "unknown endpoint identity"
    [incoming] = await barney_inbox.wait()
    assert incoming.originator == FRED
    assert incoming.recipients == [BARNEY]
    assert incoming.media_type == "text/plain"
    assert incoming.body == BODY  # exactly the octets fred sent


@pytest_twisted.ensureDeferred
async def test_protected_messages_sent_in_a_row_arrive_in_that_order(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat's lines, each protected in a thread: sent as each was done, they went in
    the order gpg finished them. Here the first takes longest; the order must hold."""
    started = 0

    def protecting(content: bytes, *args: object, **kwargs: object) -> tuple[str, bytes]:
        nonlocal started
        started += 1
        time.sleep(0.05 * (6 - started))  # the first is the slowest
        return "application/octet-stream", content

    monkeypatch.setattr(edge, "protect_cpim", protecting)
    inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=inbox)
    protect = Protection("sign", "pgp", Keys())

    await defer.gatherResults(
        [
            defer.ensureDeferred(fred.send_message([BARNEY], f"line {n}", protect=protect))
            for n in range(5)
        ]
    )

    texts = [cpim.parse(incoming.body).text() for incoming in await inbox.wait(5)]
    assert texts == [f"line {n}" for n in range(5)]


@pytest_twisted.ensureDeferred
async def test_media_type_and_headers_travel_with_the_content(net: Net) -> None:
    barney_inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=barney_inbox)

    outcomes = await fred.send(
        [BARNEY, "barney@B.TEST"],  # one recipient: domains compare case-insensitively
        b"<x/>",
        "application/xml",
        headers=[("Content-Description", "a test")],
    )

    assert codes(outcomes) == {BARNEY: 250}
    [incoming] = await barney_inbox.wait()
    assert incoming.media_type == "application/xml"
    assert ("Content-Description", "a test") in incoming.data.content.headers


@pytest_twisted.ensureDeferred
async def test_mistakes_in_a_send_are_named_before_anything_is_sent(net: Net) -> None:
    """One recipient given as a string, text given for bytes, no media type: said as such,
    not as "endpoint 'b' has no '@domain'", a str/bytes TypeError deep inside, or content
    whose receiver sees no media type but reads text/plain."""
    fred = await net.connect(FRED)
    with pytest.raises(TypeError, match=r"recipients is a list of endpoints: \['barney@b\.test'\]"):
        await fred.send(BARNEY, b"hello")
    with pytest.raises(TypeError, match=r"to is a list of endpoints"):
        await fred.send_message(BARNEY, "hello")
    with pytest.raises(TypeError, match="content is bytes"):
        await fred.send([BARNEY], "hello")  # type: ignore[arg-type]
    for media_type in ("", "text", "text/"):
        with pytest.raises(ValueError, match="is not type/subtype"):
            await fred.send([BARNEY], b"hello", media_type)
    # With parameters, it is a media type still.
    assert codes(await fred.send([BAMBAM], b"x", "text/plain; charset=utf-8")) == {BAMBAM: 450}


@pytest_twisted.ensureDeferred
async def test_a_timeout_or_text_of_the_wrong_kind_is_named_at_the_call(net: Net) -> None:
    """timeout=None failed deep inside, adding None to the clock; timeout=-1 on an
    assertion of the reactor's; send_message(to, b"...") on bytes having no encode().
    Each is said at the call, with what is expected, and nothing is sent."""
    barney = Inbox()
    await net.connect(BARNEY, on_data=barney)
    fred = await net.connect(FRED)
    for timeout in (None, "90", True):
        with pytest.raises(TypeError, match=r"timeout is seconds \(a number\), not "):
            await fred.send([BARNEY], b"x", timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"timeout is seconds \(a number\), not "):
            await fred.send_message([BARNEY], "x", timeout=timeout)  # type: ignore[arg-type]
    # 10**400 is finite as an int, but no float: the reactor's timers raised OverflowError.
    for timeout in (0, -1, float("nan"), float("inf"), 10**400):
        with pytest.raises(ValueError, match=r"timeout is seconds, more than 0 and finite, not "):
            await fred.send([BARNEY], b"x", timeout=timeout)
        with pytest.raises(ValueError, match=r"timeout is seconds, more than 0 and finite, not "):
            await fred.send_message([BARNEY], "x", timeout=timeout)
    with pytest.raises(
        TypeError, match=r"text is a str, not bytes \(content as bytes goes with send\(\)"
    ):
        await fred.send_message([BARNEY], b"hello")  # type: ignore[arg-type]

    assert codes(await fred.send([BARNEY], b"only this", timeout=5)) == {BARNEY: 250}
    assert [i.body for i in barney.items] == [b"only this"]


@pytest_twisted.ensureDeferred
async def test_a_report_that_does_not_come_in_time_is_unknown(net: Net) -> None:
    """The relay takes the data, but the recipient's application never answers it, so
    no final report can exist when the sender stops waiting: unknown, not a hang, and a
    late report does no harm."""
    fred = await net.connect(FRED)
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    answers: list[defer.Deferred[Message]] = []

    class Silent(ChannelHandler):
        def message_received(self, request: Request) -> defer.Deferred[Message]:
            answers.append(defer.Deferred())
            return answers[-1]

    barney.channel.handler = Silent()
    try:
        started = reactor.seconds()
        outcomes = await fred.send([BARNEY], b"are you there?", timeout=0.5)
        # Not a hang; and by the client's own timeout, not a relay's 451 (the text).
        assert reactor.seconds() - started < 10
        assert codes(outcomes) == {BARNEY: None}
        assert outcomes[BARNEY].unknown and not outcomes[BARNEY].delivered
        assert outcomes[BARNEY].text == "no status report within 0.5 s"
        # It did reach barney's application (on a slow host, after the client gave up).
        await until(lambda: len(answers) == 1)
    finally:
        barney.session.disconnect()
    # b's relay now reports 451 for barney; fred answers the late report and goes on.
    await task.deferLater(reactor, 0.2, lambda: None)
    assert codes(await fred.send([WILMA], b"still fine")) == {WILMA: 450}


@pytest_twisted.ensureDeferred
async def test_a_relay_that_does_not_know_the_outcome_reports_unknown(net: Net) -> None:
    """The relay hands the data to wilma's application, which never answers: by its
    delivery_timeout the relay reports 451 "... outcome unknown" (RFC 3340 §10 has no code
    for it). wilma may well have it, so it is unknown, not a failure to send again; its
    code and text stay as the relay gave them."""
    relay = await net.start("c.test", ("fred", "wilma"), delivery_timeout=0.3)
    fred = await net.connect("fred@c.test")
    wilma = await attach(relay, net.ca, "wilma@c.test")

    class Silent(ChannelHandler):
        def message_received(self, request: Request) -> defer.Deferred[Message]:
            return defer.Deferred()

    wilma.channel.handler = Silent()
    try:
        [outcome] = (await fred.send(["wilma@c.test"], b"are you there?", timeout=5)).values()
    finally:
        wilma.session.disconnect()

    assert (outcome.code, outcome.text) == (
        451,
        f"endpoint did not answer in time; {wire.OUTCOME_UNKNOWN}",
    )
    assert outcome.unknown and not outcome.delivered


def test_only_a_451_that_says_the_outcome_is_unknown_is_unknown() -> None:
    """The rule is the relay's wording (wire.OUTCOME_UNKNOWN) on a 451: any other 451 is
    a failure, and the same words under another code are that code's."""
    said = wire.outcome_unknown("the next hop answered with neither ok nor error")
    assert Outcome(BARNEY, 451, said).unknown
    assert not Outcome(BARNEY, 451, "the application failed to process the data").unknown
    assert not Outcome(BARNEY, 450, said).unknown
    assert Outcome(BARNEY, None, "no status report within 1 s").unknown


def test_by_default_the_sender_waits_out_a_relays_retries() -> None:
    """A relay that cannot reach the next hop keeps trying for up to its delivery_timeout
    and then reports 421; a sender that stopped waiting before that would only learn
    "unknown", and the report would bounce off it. So every default wait for reports -
    the library's and imxp send's and chat's - outlasts the relay's default."""
    import inspect

    from imxp.cli import build_parser
    from imxp.config import Config

    waits = [
        inspect.signature(Client.send).parameters["timeout"].default,
        inspect.signature(Client.send_message).parameters["timeout"].default,
    ]
    parser = build_parser()
    for line in (["send", "--from", FRED, "--to", BARNEY, "hi"], ["chat", "--as", FRED, BARNEY]):
        waits.append(parser.parse_args(line).timeout)
    assert min(waits) > Config.delivery_timeout


@pytest_twisted.ensureDeferred
async def test_thousands_of_sends_at_once_each_get_their_report(net: Net) -> None:
    """A bot that sends without awaiting each send pipelines more data than the relay's
    window takes; its answers to the reports coming back must not wait behind them."""
    fred = await net.connect(FRED)
    inbox = Inbox()
    await net.connect(BARNEY, on_data=inbox)
    bodies = [b"message %d" % n for n in range(2000)]

    outcomes = await defer.gatherResults(
        [defer.ensureDeferred(fred.send([BARNEY], body, timeout=30)) for body in bodies]
    )

    assert [codes(o) for o in outcomes] == [{BARNEY: 250}] * len(bodies)
    assert [i.body for i in await inbox.wait(len(bodies))] == bodies


@pytest_twisted.ensureDeferred
async def test_more_recipients_than_a_data_takes_go_in_several(net: Net) -> None:
    """A relay takes 1,000 recipients in a data (553 beyond); the library splits a longer
    list, and each recipient still has its own outcome."""
    fred = await net.connect(FRED)
    inbox = Inbox()
    await net.connect(BARNEY, on_data=inbox)
    strangers = [f"stranger{n}@b.test" for n in range(1500)]

    outcomes = await fred.send([*strangers[:1200], BARNEY, *strangers[1200:]], b"all hands")

    assert codes(outcomes) == {BARNEY: 250} | {s: 550 for s in strangers}
    [incoming] = await inbox.wait()
    assert incoming.body == b"all hands"


@pytest_twisted.ensureDeferred
async def test_a_send_in_several_data_that_fails_keeps_the_outcomes_of_those_that_went(
    net: Net,
) -> None:
    """The first data of a long send went and was reported on; the second was refused
    (421, the relay closing) and waits for the next connection, where the login is
    refused for good. The error says what became of the first data's recipients: told
    nothing, a caller would send to them again."""
    fred = await net.connect(FRED, backoff=(0.1, 0.1))
    relay = net.relays["a.test"]
    core = relay.service.relay
    taken = core.data

    def data(channel: Any, element: wire.Data, received: Any = None) -> wire.OK:
        if len(element.recipients) < wire.MAX_RECIPIENTS:  # the send's second data
            core.accepting = False
            try:
                return taken(channel, element, received)
            finally:
                core.accepting = True
        return taken(channel, element, received)

    core.data = data
    strangers = [f"stranger{n}@a.test" for n in range(wire.MAX_RECIPIENTS + 5)]
    sending = defer.ensureDeferred(fred.send(strangers, b"all hands", timeout=30))
    await until(lambda: len(fred._pending) == 1)  # the first data's reports are in
    UserStore(relay.users.path, iterations=4096).remove("fred")
    fred._connection.session.transport.abortConnection()

    with pytest.raises(ClientError) as raised:
        await sending
    assert raised.value.kind == "auth"
    assert codes(raised.value.outcomes) == dict.fromkeys(strangers[: wire.MAX_RECIPIENTS], 550)


@pytest_twisted.ensureDeferred
async def test_a_data_the_relay_refuses_gives_every_recipient_its_code(net: Net) -> None:
    # Without reconnect: with it, a 421 waits for the next connection (the test below).
    fred = await net.connect(FRED, reconnect=False)
    net.relays["a.test"].service.relay.accepting = False  # as while shutting down

    outcomes = await fred.send([BARNEY, WILMA], b"hello")

    assert codes(outcomes) == {BARNEY: 421, WILMA: 421}
    assert outcomes[BARNEY].text == "relay is shutting down"


@pytest_twisted.ensureDeferred
async def test_data_a_relay_shutting_down_refused_goes_on_the_next_connection(net: Net) -> None:
    """A relay shutting down refuses data with 421: it took none of it. Then it ends its
    sessions, and the client reconnects (to the relay restarted, or the domain's next):
    the data goes there, once, rather than ending 421 as if it had failed."""
    fred = await net.connect(FRED, backoff=(0.1, 0.1))
    barney = Inbox()
    await net.connect(BARNEY, on_data=barney)
    relay = net.relays["a.test"].service.relay
    relay.accepting = False
    session = fred._connection.session

    def shut_down(event: LogEvent) -> None:
        if event.get("event") == "client.send-again" and not relay.accepting:
            relay.accepting = True  # the relay that starts in its place
            reactor.callLater(0, session.transport.abortConnection)

    globalLogPublisher.addObserver(shut_down)
    try:
        outcomes = await fred.send([BARNEY], b"after the restart", timeout=10.0)
    finally:
        globalLogPublisher.removeObserver(shut_down)

    assert codes(outcomes) == {BARNEY: 250}
    assert fred._connection.session is not session
    assert [i.body for i in barney.items] == [b"after the restart"]


@pytest_twisted.ensureDeferred
async def test_a_failing_on_data_callback_is_reported_to_the_sender(net: Net) -> None:
    def broken(incoming: Incoming) -> None:
        raise RuntimeError("disk full")

    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=broken)

    outcomes = await fred.send([BARNEY], b"hello")

    assert codes(outcomes) == {BARNEY: 451}
    assert not outcomes[BARNEY].unknown  # the application said it failed


@pytest_twisted.ensureDeferred
async def test_data_a_failing_on_data_refused_reaches_no_iterator(net: Net) -> None:
    """451 is the application's answer as a whole: its sender may send it again, and an
    iterator that got the refused one too would then see it twice."""
    failing = [True]

    def sometimes(incoming: Incoming) -> None:
        if failing.pop(0):
            raise RuntimeError("disk full")

    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, on_data=sometimes)
    incoming = barney.incoming()
    failing.append(False)

    assert codes(await fred.send([BARNEY], b"first try")) == {BARNEY: 451}
    assert codes(await fred.send([BARNEY], b"second try")) == {BARNEY: 250}
    got = await defer.ensureDeferred(anext(incoming)).addTimeout(5, reactor)
    assert got.body == b"second try"


@pytest_twisted.ensureDeferred
async def test_an_async_on_data_bot_answers_while_awaiting_its_own_send(net: Net) -> None:
    """An ``async def`` on_data is run, not dropped as an unawaited coroutine; it may
    await a send of its own, whose report arrives on the very channel it is answering."""
    fred = await net.connect(FRED)
    answered: list[dict[str, int | None]] = []

    async def answer(incoming: Incoming) -> None:
        answered.append(codes(await bot.send([incoming.originator], b"yabba dabba doo to you")))

    bot = await net.connect(BARNEY, on_data=answer)
    incoming = fred.incoming()

    assert codes(await fred.send([BARNEY], b"yabba dabba doo")) == {BARNEY: 250}
    first = await defer.ensureDeferred(anext(incoming)).addTimeout(5, reactor)
    assert (first.originator, first.body) == (BARNEY, b"yabba dabba doo to you")
    await until(lambda: answered == [{FRED: 250}])


@pytest_twisted.ensureDeferred
async def test_the_readmes_client_example_runs_against_live_relays(net: Net) -> None:
    """The README's program, pointed at a.test's relay as its text says to, with barney a
    bot that answers: it prints his outcome, reads his answer, and closes."""
    (program,) = python_blocks("Building on imxp: the client library")
    (net.tmp / "ca.pem").write_bytes(net.ca.certificate.public_bytes(Encoding.PEM))
    asked = 'connect("fred@a.test", password="correct horse battery staple")'
    assert asked in program and PASSWORD == "correct horse battery staple"
    where = f"127.0.0.1:{net.relays['a.test'].port('edge')}"
    program = "from cryptography import x509\n" + program.replace(
        asked,
        f'{asked[:-1]}, relay="{where}", trust=x509.load_pem_x509_certificates('
        f'open("{net.tmp / "ca.pem"}", "rb").read()))',
    )
    (net.tmp / "example.py").write_text(program)

    async def answer(incoming: Incoming) -> None:
        message = incoming.message()
        assert message is not None
        await bot.send_message([incoming.originator], f"You said: {message.text()}")

    bot = await net.connect(BARNEY, on_data=answer)
    out, err, status = await utils.getProcessOutputAndValue(
        sys.executable,
        [str(net.tmp / "example.py")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).addTimeout(60, reactor)
    assert status == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("barney@b.test delivered "), lines
    assert lines[1:] == ["barney@b.test: You said: Yabba dabba doo!"], lines


@pytest_twisted.ensureDeferred
async def test_an_async_on_data_that_fails_at_once_is_reported_451(net: Net) -> None:
    async def broken(incoming: Incoming) -> None:
        raise RuntimeError("disk full")

    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=broken)

    assert codes(await fred.send([BARNEY], b"hello")) == {BARNEY: 451}


@pytest_twisted.ensureDeferred
async def test_an_async_on_data_that_fails_later_is_logged(net: Net, events) -> None:
    """Once it awaits, the data is the application's (250); what fails after that is
    the application's to log, and the library logs it."""

    async def broken(incoming: Incoming) -> None:
        await _sleep(0.01)
        raise RuntimeError("disk full")

    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=broken)

    assert codes(await fred.send([BARNEY], b"hello")) == {BARNEY: 250}
    await until(lambda: any(e["event"] == "client.on-data-failed" for e in events))
    [failed] = [e for e in events if e["event"] == "client.on-data-failed"]
    assert failed["originator"] == FRED
    assert failed["log_failure"].check(RuntimeError)


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("backoff", (0, 60), ValueError, r"each backoff delay is seconds, more than 0"),
        ("backoff", (10, 1.5), ValueError, r"first delay is longer than its longest"),
        ("backoff", 5, TypeError, r"backoff is \(first, longest\) delay in seconds, not 5"),
        ("connect_timeout", 0, ValueError, r"connect_timeout is seconds, more than 0"),
        ("connect_timeout", "30", TypeError, r"connect_timeout is seconds \(a number\)"),
        ("unclaimed_wait", -1, ValueError, r"unclaimed_wait is seconds, more than 0"),
        ("unclaimed_wait", float("inf"), ValueError, r"and finite, not inf"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_connect_refuses_delays_it_could_not_keep(
    net: Net, option: str, value: object, error: type[Exception], message: str
) -> None:
    """Refused at once, naming the parameter, rather than found out later: with a backoff
    of 0 a client of a relay that is down would try again without pause, as would every
    client of it; a connect_timeout of 0 fails every connection; a string fails deep in
    the reactor's timers after the client was made."""
    with pytest.raises(error, match=message):
        await net.connect(FRED, **{option: value})


@pytest_twisted.ensureDeferred
async def test_a_slow_async_on_data_is_refused_450_past_its_limit(net: Net, events) -> None:
    """A gateway's on_data awaits something slow (a database) for each data. With
    ``on_data_limit`` handlers running past their answer, more data is refused with 450
    at once and its handler never started, rather than answered 250 with ever more
    handlers, and their memory, behind the answer; once one ends, data is taken again.
    The refusal is the application's: an iterator made beside on_data does not get it."""
    gates: list[defer.Deferred[None]] = []
    handled: list[bytes] = []

    async def slow(incoming: Incoming) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        gates.append(gate)
        await gate
        handled.append(incoming.body)

    with pytest.raises(ValueError, match="at least 1"):
        await net.connect(BARNEY, on_data=slow, on_data_limit=0)
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, on_data=slow, on_data_limit=2)
    seen = barney.incoming()

    taken = [codes(await fred.send([BARNEY], b"slow %d" % n)) for n in range(2)]
    busy = await fred.send([BARNEY], b"one too many")

    assert taken == [{BARNEY: 250}] * 2
    assert codes(busy) == {BARNEY: 450}
    assert busy[BARNEY].text == "the application is busy: 2 data are still being handled"
    assert len(gates) == 2
    assert [e["originator"] for e in events if e["event"] == "client.data-busy"] == [FRED]

    gates[0].callback(None)
    assert codes(await fred.send([BARNEY], b"room again")) == {BARNEY: 250}
    for gate in gates[1:]:
        gate.callback(None)
    assert handled == [b"slow 0", b"slow 1", b"room again"]
    bodies = [(await defer.ensureDeferred(anext(seen))).body for _ in range(3)]
    assert bodies == [b"slow 0", b"slow 1", b"room again"]


@pytest_twisted.ensureDeferred
async def test_a_gateway_answering_when_done_tells_its_sender_how_the_handler_ended(
    net: Net, events
) -> None:
    """With ``answer_when_done``, the sender hears of a data once the gateway's handler
    has ended: 250 once it has handed the data on, 451 if it failed after awaiting,
    which answered early would have been 250 and the data lost with only a log line."""
    gates: list[defer.Deferred[None]] = []

    async def gateway(incoming: Incoming) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        gates.append(gate)
        await gate
        if incoming.body == b"cannot go on":
            raise RuntimeError("the other network is down")

    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=gateway, answer_when_done=True)

    handed_on = defer.ensureDeferred(fred.send([BARNEY], b"hello"))
    await until(lambda: len(gates) == 1)
    await _sleep(0.2)
    assert not handed_on.called  # the handler has not ended: no answer yet
    gates[0].callback(None)
    assert codes(await handed_on) == {BARNEY: 250}

    lost = defer.ensureDeferred(fred.send([BARNEY], b"cannot go on"))
    await until(lambda: len(gates) == 2)
    gates[1].callback(None)
    outcomes = await lost
    assert codes(outcomes) == {BARNEY: 451}
    assert outcomes[BARNEY].text == "the application failed to process the data"
    [failed] = [e for e in events if e["event"] == "client.on-data-failed"]
    assert failed["log_failure"].check(RuntimeError)


@pytest_twisted.ensureDeferred
async def test_a_gateway_refuses_data_with_the_code_that_says_why(net: Net, events) -> None:
    """A gateway that cannot hand a data on says why in the code its sender gets: 550 for
    a user the other network does not know (sending again will not help), 450 for one it
    cannot reach now; before its first await, or when it ends with answer_when_done.
    Logged as a refusal, not as a failure of the application."""

    def plain(incoming: Incoming) -> None:
        raise Refusal(550, "no such user on the other network")

    async def when_done(incoming: Incoming) -> None:
        await _sleep(0.01)
        raise Refusal(450, "the other network is down; try again later")

    with pytest.raises(ValueError, match="4xx or 5xx"):
        Refusal(250, "fine")
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=plain)
    await net.connect(WILMA, on_data=when_done, answer_when_done=True)

    outcomes = await fred.send([BARNEY, WILMA], b"hello")

    assert codes(outcomes) == {BARNEY: 550, WILMA: 450}
    assert outcomes[BARNEY].text == "no such user on the other network"
    assert outcomes[WILMA].text == "the other network is down; try again later"
    refused = [e for e in events if e["event"] == "client.data-refused"]
    assert sorted(e["code"] for e in refused) == [450, 550]
    assert not any(e["event"] == "client.on-data-failed" for e in events)


@pytest_twisted.ensureDeferred
async def test_a_bot_answering_when_done_may_await_its_own_sends_reports(net: Net) -> None:
    """The report of the bot's own send comes on the channel whose answer its handler
    holds: it is taken as it comes, so the handler ends, and then its data is answered."""
    answered: list[dict[str, int | None]] = []

    async def echo(incoming: Incoming) -> None:
        answered.append(codes(await bot.send([incoming.originator], b"echo: " + incoming.body)))

    fred_inbox = Inbox()
    fred = await net.connect(FRED, on_data=fred_inbox)
    bot = await net.connect(BARNEY, on_data=echo, answer_when_done=True)

    assert codes(await fred.send([BARNEY], b"hi", timeout=10.0)) == {BARNEY: 250}
    assert answered == [{FRED: 250}]
    assert [i.body for i in fred_inbox.items] == [b"echo: hi"]


@pytest_twisted.ensureDeferred
async def test_close_refuses_the_data_of_a_handler_it_cancels_when_answering_when_done(
    net: Net, events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler close() gives up on did not process its data: its sender hears 451,
    where a handler answered early would have had its data told 250 and dropped."""
    monkeypatch.setattr(edge, "_CLOSE_TIMEOUT", 0.3)
    started: list[Incoming] = []

    async def stuck(incoming: Incoming) -> None:
        started.append(incoming)
        await defer.Deferred()  # never fires

    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, on_data=stuck, answer_when_done=True)
    sent = defer.ensureDeferred(fred.send([BARNEY], b"hello"))
    await until(lambda: started)

    await defer.ensureDeferred(barney.close()).addTimeout(5, reactor)

    assert codes(await sent) == {BARNEY: 451}
    [cancelled] = [e for e in events if e["event"] == "client.handlers-cancelled"]
    assert cancelled["count"] == 1
    assert not any(e["event"] == "client.on-data-failed" for e in events)


@pytest_twisted.ensureDeferred
async def test_a_bot_answering_when_done_that_closes_from_its_handler_took_its_data(
    net: Net, events
) -> None:
    """A bot's "quit" handler that closes the client has its data answered 250 as it
    closes, rather than held by close(), which would wait for that answer and the
    handler for close()."""
    steps: list[str] = []

    async def bot(incoming: Incoming) -> None:
        await bot_client.close()
        steps.append("closed")

    fred = await net.connect(FRED)
    bot_client = await net.connect(BARNEY, on_data=bot, answer_when_done=True)
    quitting = defer.ensureDeferred(fred.send([BARNEY], b"quit"))

    assert codes(await quitting) == {BARNEY: 250}
    await until(lambda: steps == ["closed"])
    assert not any(e["event"] == "client.handlers-cancelled" for e in events)


@pytest_twisted.ensureDeferred
async def test_an_iterator_behind_on_data_is_told_what_it_missed(
    net: Net, events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An iterator beside on_data that has as many data unread as it may hold misses
    what on_data takes meanwhile: said once as it begins, and how many as it gets data
    again, rather than a silent gap in what it reads."""
    monkeypatch.setattr(edge, "_UNCLAIMED_LIMIT", 2)
    taken = Inbox()
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, on_data=taken)
    behind = barney.incoming()

    for n in range(5):
        assert codes(await fred.send([BARNEY], b"%d" % n)) == {BARNEY: 250}
    missed = [e for e in events if e["event"] == "client.data-missed"]
    assert len(missed) == 1
    assert [(await defer.ensureDeferred(anext(behind))).body for _ in range(2)] == [b"0", b"1"]
    assert codes(await fred.send([BARNEY], b"5")) == {BARNEY: 250}

    assert (await defer.ensureDeferred(anext(behind))).body == b"5"
    [ended] = [e for e in events if e["event"] == "client.data-missed-ended"]
    assert ended["count"] == 3
    assert len(taken.items) == 6


def _sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


# -- receiving ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_receive_through_the_async_iterator(net: Net) -> None:
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    received: list[Incoming] = []

    async def consume() -> None:
        async for incoming in barney.incoming():
            received.append(incoming)

    consuming = defer.ensureDeferred(consume())
    for n in range(3):
        assert codes(await fred.send([BARNEY], b"message %d" % n)) == {BARNEY: 250}
    await until(lambda: len(received) == 3)
    await barney.close()
    await consuming  # the iterator ends with the client

    assert [i.body for i in received] == [b"message 0", b"message 1", b"message 2"]
    # Status reports are the library's business, not the application's.
    assert all(i.originator == FRED for i in received)


@pytest_twisted.ensureDeferred
async def test_data_before_the_application_reads_waits_for_it(net: Net) -> None:
    """The README's program: send, then read the answer. A bot answers at once, so its
    answer arrives while the sender still waits for its report, before it reads."""
    fred = await net.connect(FRED)

    def answer(incoming: Incoming) -> None:
        defer.ensureDeferred(bot.send([incoming.originator], b"yabba dabba doo to you"))

    bot = await net.connect(BARNEY, on_data=answer)

    assert codes(await fred.send([BARNEY], b"yabba dabba doo")) == {BARNEY: 250}
    incoming = fred.incoming()
    first = await defer.ensureDeferred(anext(incoming)).addTimeout(5, reactor)
    assert (first.originator, first.body) == (BARNEY, b"yabba dabba doo to you")


@pytest_twisted.ensureDeferred
async def test_data_no_application_takes_is_refused_not_lost(net: Net, events) -> None:
    """An application that only sends (imxp send) never reads: data to it is answered
    450 once it has waited ``unclaimed_wait`` for a reader, so its sender is not told 250."""
    fred = await net.connect(FRED)
    await net.connect(BARNEY, unclaimed_wait=0.5)  # within the relay's delivery_timeout
    started = reactor.seconds()

    outcomes = await fred.send([BARNEY], b"anyone there?")

    assert codes(outcomes) == {BARNEY: 450}
    assert "no application took it" in outcomes[BARNEY].text
    assert reactor.seconds() - started >= 0.5
    assert [e["originator"] for e in events if e["event"] == "client.data-unclaimed"] == [FRED]


@pytest_twisted.ensureDeferred
async def test_data_for_an_iterator_no_longer_read_is_refused_past_a_bound(
    net: Net, events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's program reads one answer with anext() and keeps the iterator: what
    arrives after it is held for an iterator nobody reads. Past a bound it is refused
    with 450, not held (and reported 250) until the process ends."""
    monkeypatch.setattr(edge, "_UNCLAIMED_LIMIT", 3)
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    incoming = barney.incoming()
    first = defer.ensureDeferred(anext(incoming))
    assert codes(await fred.send([BARNEY], b"read")) == {BARNEY: 250}
    assert (await first).body == b"read"

    unread = [codes(await fred.send([BARNEY], b"unread %d" % n)) for n in range(4)]

    assert unread == [{BARNEY: 250}] * 3 + [{BARNEY: 450}]
    assert [e["originator"] for e in events if e["event"] == "client.data-unclaimed"] == [FRED]
    # What was held is still there for the iterator.
    held = [(await defer.ensureDeferred(anext(incoming))).body for _ in range(3)]
    assert held == [b"unread 0", b"unread 1", b"unread 2"]
    assert codes(await fred.send([BARNEY], b"read again")) == {BARNEY: 250}


@pytest_twisted.ensureDeferred
async def test_a_gateway_reading_slower_than_data_comes_is_told_why_data_is_refused(
    net: Net, events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's loop forwards each data into a slow sink. Past the bound of data
    unread, more is refused with 450, and the log names that cause - the loop is behind
    - rather than "neither incoming() nor on_data took it", which sends whoever reads the
    log looking for a missing reader."""
    monkeypatch.setattr(edge, "_UNCLAIMED_LIMIT", 3)
    fred = await net.connect(FRED)
    gateway = await net.connect(BARNEY)
    sink: defer.Deferred[None] = defer.Deferred()  # the sink takes nothing until it fires
    forwarded: list[bytes] = []

    async def forward() -> None:
        async for incoming in gateway.incoming():
            await sink
            forwarded.append(incoming.body)

    forwarding = defer.ensureDeferred(forward())
    taken = [codes(await fred.send([BARNEY], b"data %d" % n)) for n in range(4)]
    behind = await fred.send([BARNEY], b"one too many")

    assert taken == [{BARNEY: 250}] * 4  # one in the loop's hands, three waiting
    assert codes(behind) == {BARNEY: 450}
    [refused] = [e for e in events if e["event"] == "client.data-unclaimed"]
    assert refused["originator"] == FRED
    assert refused["why"] == "the incoming() iterators have 3 data unread"
    sink.callback(None)
    await until(lambda: len(forwarded) == 4)
    assert forwarded == [b"data %d" % n for n in range(4)]
    await gateway.close()
    await forwarding


@pytest_twisted.ensureDeferred
async def test_data_a_loop_left_unread_goes_to_the_next_iterator(net: Net, events) -> None:
    """A bot's loop takes its time over each data and then breaks (its "quit"): what came
    meanwhile was answered 250, so the next loop gets it, in order, rather than nobody."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    first: list[bytes] = []
    all_sent: defer.Deferred[None] = defer.Deferred()

    async def loop() -> None:
        async for incoming in barney.incoming():
            first.append(incoming.body)
            await all_sent
            break

    looping = defer.ensureDeferred(loop())
    for body in (b"quit", b"one", b"two"):
        assert codes(await fred.send([BARNEY], body)) == {BARNEY: 250}
    all_sent.callback(None)
    await looping

    again = barney.incoming()
    later = [
        (await defer.ensureDeferred(anext(again)).addTimeout(5, reactor)).body for _ in range(2)
    ]
    assert (first, later) == ([b"quit"], [b"one", b"two"])
    assert [e["count"] for e in events if e["event"] == "client.data-unread"] == [2]


@pytest_twisted.ensureDeferred
async def test_data_left_unread_when_the_client_closes_is_logged(net: Net, events) -> None:
    """A loop that breaks after one data, with two come at once (without a count, below):
    the second was answered 250 as it came, and nobody reads it. It cannot be refused
    any more; close() says so."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    all_sent: defer.Deferred[None] = defer.Deferred()

    async def listen_for_one() -> None:
        async for _incoming in barney.incoming():
            await all_sent
            break

    looping = defer.ensureDeferred(listen_for_one())
    for body in (b"one", b"two"):
        assert codes(await fred.send([BARNEY], body)) == {BARNEY: 250}
    all_sent.callback(None)
    await looping
    await barney.close()

    [dropped] = [e for e in events if e["event"] == "client.unread-dropped"]
    assert (dropped["count"], dropped["originators"]) == (1, [FRED])


@pytest_twisted.ensureDeferred
async def test_an_iterator_with_a_count_takes_no_more_than_it_yields(net: Net, events) -> None:
    """`imxp listen --count 1` with two data come at once, done right: the iterator made to
    take one takes one and ends by itself; the second is not answered 250 and left
    unread, but waits for the next iterator, as with none, which gets it."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    all_sent: defer.Deferred[None] = defer.Deferred()
    seen: list[bytes] = []

    async def listen_for_one() -> None:
        async for incoming in barney.incoming(count=1):
            seen.append(incoming.body)
            await all_sent

    looping = defer.ensureDeferred(listen_for_one())
    assert codes(await fred.send([BARNEY], b"one")) == {BARNEY: 250}
    two = defer.ensureDeferred(fred.send([BARNEY], b"two"))
    await until(lambda: sum(e["event"] == "client.data-received" for e in events) == 2)
    assert not two.called  # held for an iterator, not answered
    all_sent.callback(None)
    await looping
    assert seen == [b"one"]

    again = barney.incoming()
    assert (await defer.ensureDeferred(anext(again)).addTimeout(5, reactor)).body == b"two"
    assert codes(await two) == {BARNEY: 250}
    assert not [e for e in events if e["event"] in ("client.data-unread", "client.unread-dropped")]
    with pytest.raises(ValueError, match="count is at least 1"):
        barney.incoming(count=0)


@pytest_twisted.ensureDeferred
async def test_an_iterator_dropped_before_its_first_step_keeps_nothing(net: Net) -> None:
    """``it = client.incoming()`` and then no loop after all: what it was given, answered
    250, stayed with it, read by nobody, and no later iterator got it."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    dropped = barney.incoming()
    assert codes(await fred.send([BARNEY], b"for whoever reads")) == {BARNEY: 250}
    del dropped

    again = barney.incoming()
    arrived = await defer.ensureDeferred(anext(again)).addTimeout(5, reactor)
    assert arrived.body == b"for whoever reads"


@pytest_twisted.ensureDeferred
async def test_what_a_loop_left_unread_goes_only_to_iterators_that_lack_it(net: Net) -> None:
    """Two iterators: one made before the data came, one after. When the first ends
    unread, the second gets what came before it was made, and nothing twice."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    early = barney.incoming()
    assert (await _sent_and_read(fred, early, b"zero")) == b"zero"
    assert codes(await fred.send([BARNEY], b"one")) == {BARNEY: 250}
    late = barney.incoming()
    assert codes(await fred.send([BARNEY], b"two")) == {BARNEY: 250}

    await early.aclose()  # "one" and "two" unread; late has only "two"

    read = [(await defer.ensureDeferred(anext(late)).addTimeout(5, reactor)).body for _ in range(2)]
    assert read == [b"one", b"two"]
    assert codes(await fred.send([BARNEY], b"three")) == {BARNEY: 250}
    assert (await defer.ensureDeferred(anext(late)).addTimeout(5, reactor)).body == b"three"


async def _sent_and_read(sender: Client, iterator: AsyncIterator[Incoming], body: bytes) -> bytes:
    reading = defer.ensureDeferred(anext(iterator)).addTimeout(5, reactor)
    assert codes(await sender.send([BARNEY], body)) == {BARNEY: 250}
    return (await reading).body


@pytest_twisted.ensureDeferred
async def test_data_waiting_for_a_reader_is_dropped_with_its_session(net: Net) -> None:
    """Data waiting, unanswered, for a first iterator when the connection is lost: the
    relay has told its sender the outcome is unknown (451). Handed to an iterator made
    after the client reconnects, it would be read after that, and a sender that sends
    again on 451 would have it read twice."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, unclaimed_wait=30.0)
    sending = defer.ensureDeferred(fred.send([BARNEY], b"held"))
    await until(lambda: bool(barney._unclaimed))
    session = barney._connection.session
    session.transport.abortConnection()  # the network fails

    outcomes = await sending
    assert codes(outcomes) == {BARNEY: 451}
    await until(lambda: barney.connected and barney._connection.session is not session)
    incoming = barney.incoming()
    assert (await _sent_and_read(fred, incoming, b"after")) == b"after"


@pytest_twisted.ensureDeferred
async def test_data_waiting_for_a_reader_is_refused_when_the_client_closes(net: Net) -> None:
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, unclaimed_wait=30.0)
    sending = defer.ensureDeferred(fred.send([BARNEY], b"still there?"))
    await until(lambda: bool(barney._unclaimed))

    await barney.close()

    outcomes = await sending
    assert codes(outcomes) == {BARNEY: 450}
    assert outcomes[BARNEY].text == "the application ended before taking it"


@pytest_twisted.ensureDeferred
async def test_attach_a_subaddress_and_detach_it(net: Net) -> None:
    """RFC 3340 §2.2, §4.4.1: fred also attaches as fred/appl=im@a.test; data for it
    reaches him, and after detaching it is not attached any more (450)."""
    inbox = Inbox()
    fred = await net.connect(FRED, on_data=inbox)
    wilma = await net.connect(WILMA)
    subaddress = "fred/appl=im@a.test"

    await fred.attach(subaddress)
    assert fred.endpoints == (FRED, subaddress)
    assert codes(await wilma.send([subaddress], b"for the im app")) == {subaddress: 250}
    [incoming] = await inbox.wait()
    assert incoming.recipients == [subaddress]
    assert incoming.body == b"for the im app"

    await fred.detach(subaddress)
    assert fred.endpoints == (FRED,)
    assert codes(await wilma.send([subaddress], b"gone?")) == {subaddress: 450}
    # ... and fred can send as the subaddress only while attached as it.
    with pytest.raises(ValueError, match="not attached"):
        await fred.send([WILMA], b"x", originator=subaddress)


@pytest_twisted.ensureDeferred
async def test_attaching_the_same_endpoint_twice_at_once_attaches_it_once(net: Net) -> None:
    """A gateway attaches a subaddress from two places at once. Sent twice, the second
    attach would be refused (554, attached already) and the refusal taken for the end
    of the first: forgotten, not re-attached after a reconnection, not detachable."""
    fred = await net.connect(FRED, on_data=Inbox())
    wilma = await net.connect(WILMA)
    subaddress = "fred/appl=im@a.test"

    await defer.gatherResults(
        [defer.ensureDeferred(fred.attach(subaddress)) for _ in range(2)], consumeErrors=True
    ).addTimeout(5, reactor)

    assert fred.endpoints == (FRED, subaddress)
    assert codes(await wilma.send([subaddress], b"for the im app")) == {subaddress: 250}
    await fred.detach(subaddress)
    assert codes(await wilma.send([subaddress], b"gone?")) == {subaddress: 450}


@pytest_twisted.ensureDeferred
async def test_attaching_as_someone_else_is_refused(net: Net) -> None:
    fred = await net.connect(FRED)

    with pytest.raises(ClientError) as caught:
        await fred.attach("wilma/appl=im@a.test")

    assert caught.value.kind == "refused"
    assert caught.value.code == 537
    assert fred.endpoints == (FRED,)


@pytest_twisted.ensureDeferred
async def test_the_relays_terminate_is_answered(net: Net) -> None:
    """RFC 3340 §4.4.3: the relay ends the attachment; the client answers ok (which is
    what lets terminate_all finish) and says so through on_terminated."""
    terminations: list[Termination] = []
    fred = await net.connect(FRED, on_terminated=terminations.append)
    relay = net.relays["a.test"].service.relay

    await relay.terminate_all(537, "account suspended")

    assert terminations == [Termination((FRED,), 537, "account suspended")]
    assert fred.endpoints == ()  # ended on purpose: not re-attached
    assert relay.attached == {}


@pytest_twisted.ensureDeferred
async def test_an_async_on_terminated_runs(net: Net) -> None:
    terminations: list[Termination] = []

    async def ended(termination: Termination) -> None:
        await _sleep(0.01)
        terminations.append(termination)

    await net.connect(FRED, on_terminated=ended)

    await net.relays["a.test"].service.relay.terminate_all(537, "account suspended")

    await until(lambda: terminations == [Termination((FRED,), 537, "account suspended")])


@pytest_twisted.ensureDeferred
async def test_close_terminates_and_releases(net: Net) -> None:
    fred = await net.connect(FRED)
    relay = net.relays["a.test"].service.relay
    assert [str(e) for e in relay.attached] == [FRED]

    await fred.close()

    assert relay.attached == {}
    assert not fred.connected
    with pytest.raises(RuntimeError):
        await fred.send([WILMA], b"too late")
    assert [i async for i in fred.incoming()] == []


@pytest_twisted.ensureDeferred
async def test_close_ends_though_the_relay_stopped_answering(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay is frozen, or a network black hole lies between: the TCP connection
    stays open and nothing comes back, so neither the terminate, nor the release of the
    session, nor TLS's own close (RFC 8446 §6.1: close_notify) is ever answered. close()
    must still end, after its waits for the relay's answers, as a program that closes
    before it exits would otherwise never exit. The relay is reached through a TCP
    forwarder that the test then turns into a black hole."""
    monkeypatch.setattr(edge, "_CLOSE_TIMEOUT", 0.3)
    listening, forwarders = await forwarder_to(net.relays["a.test"].port("edge"))
    try:
        fred = await net.connect(FRED, relay=f"127.0.0.1:{listening.getHost().port}")
        for forwarder in forwarders:
            forwarder.dataReceived = lambda data: None  # type: ignore[method-assign]

        closing = defer.ensureDeferred(fred.close())
        # Polled, not addTimeout: cancelling close() would end the very wait under test.
        # The bound: close()'s two waits for the relay's answers, and one more.
        deadline = reactor.seconds() + 3 * edge._CLOSE_TIMEOUT + 5
        while not closing.called and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        assert closing.called, "close() waits for the frozen relay"
        await closing
        assert not fred.connected
    finally:
        await listening.stopListening()
        for forwarder in forwarders:
            forwarder.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_close_lets_a_running_on_data_handler_end_and_send(net: Net, events) -> None:
    """A bot is closed while its ``async def`` on_data still works on a data it took
    (answered 250). close() refuses new data (450), waits for the handler, which sends an
    answer of its own and gets its report over the connection still up, and only then
    lets go: the bot's answer is neither a RuntimeError nor left without its outcome."""
    gate: defer.Deferred[None] = defer.Deferred()
    answered: list[dict[str, int | None]] = []
    started: list[Incoming] = []

    async def bot(incoming: Incoming) -> None:
        started.append(incoming)
        await gate
        answered.append(codes(await barney.send([incoming.originator], b"bye")))

    fred_inbox = Inbox()
    fred = await net.connect(FRED, on_data=fred_inbox)
    barney = await net.connect(BARNEY, on_data=bot)
    assert codes(await fred.send([BARNEY], b"hello")) == {BARNEY: 250}

    closing = defer.ensureDeferred(barney.close())
    late = await fred.send([BARNEY], b"too late")
    assert not closing.called
    gate.callback(None)
    await closing.addTimeout(5, reactor)

    assert answered == [{FRED: 250}]
    assert [i.body for i in fred_inbox.items] == [b"bye"]
    assert codes(late) == {BARNEY: 450}
    assert late[BARNEY].text == "the application ended before taking it"
    assert [i.body for i in started] == [b"hello"]  # not started for the late one
    assert not any(e["event"] == "client.handlers-cancelled" for e in events)


@pytest_twisted.ensureDeferred
async def test_a_bot_that_says_goodbye_and_closes_from_its_handler_closes_at_once(
    net: Net, events
) -> None:
    """The usual end of a bot: on "quit" it answers, awaits the report, and closes the
    client from its own on_data. close() does not wait for that handler to end, which
    waits for close(), nor cancel it: the handler goes on after close() returns."""
    fred_inbox = Inbox()
    fred = await net.connect(FRED, on_data=fred_inbox)
    steps: list[str] = []

    async def bot(incoming: Incoming) -> None:
        await bot_client.send([incoming.originator], b"bye")
        await bot_client.close()
        steps.append("closed")

    bot_client = await net.connect(BARNEY, on_data=bot)
    assert codes(await fred.send([BARNEY], b"quit")) == {BARNEY: 250}
    await until(lambda: steps == ["closed"])

    assert [i.body for i in fred_inbox.items] == [b"bye"]
    assert not any(e["event"] == "client.handlers-cancelled" for e in events)


@pytest_twisted.ensureDeferred
async def test_close_cancels_an_on_data_handler_that_does_not_end(
    net: Net, events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that would await for ever does not hold close() up, nor stay pending
    for ever: past the grace it is cancelled, sees CancelledError where it waits, and
    close() says how many it cancelled (not each as an on_data failure)."""
    monkeypatch.setattr(edge, "_CLOSE_TIMEOUT", 0.3)
    seen: list[str] = []

    async def stuck(incoming: Incoming) -> None:
        try:
            await defer.Deferred()  # never fires
        except defer.CancelledError:
            seen.append("cancelled")
            raise

    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY, on_data=stuck)
    assert codes(await fred.send([BARNEY], b"hello")) == {BARNEY: 250}

    await defer.ensureDeferred(barney.close()).addTimeout(5, reactor)

    assert seen == ["cancelled"]
    assert not barney._handling
    [cancelled] = [e for e in events if e["event"] == "client.handlers-cancelled"]
    assert cancelled["count"] == 1
    assert not any(e["event"] == "client.on-data-failed" for e in events)
    with pytest.raises(RuntimeError):
        await barney.send([FRED], b"too late")


# -- instant messages (RFC 3862, draft-klyne) ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_instant_message_as_message_cpim(net: Net) -> None:
    inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=inbox)
    await net.connect(WILMA, on_data=inbox)

    outcomes = await fred.send_message([BARNEY], "Grüße ☃\r\nline two", cc=[WILMA], subject="hi")

    assert codes(outcomes) == {BARNEY: 250, WILMA: 250}
    for incoming in await inbox.wait(2):
        assert incoming.media_type == cpim.MEDIA_TYPE
        message = incoming.message()
        assert message is not None
        assert message.sender == FRED
        assert message.to == [BARNEY]
        assert message.cc == [WILMA]
        assert message.subject == "hi"
        assert message.text() == "Grüße ☃\r\nline two"
        assert message.date.tzinfo is not None


@pytest_twisted.ensureDeferred
async def test_a_gateway_sends_a_message_as_the_subaddress_it_speaks_for(net: Net) -> None:
    """A gateway attached as several subaddresses sends each message as the one it
    speaks for, From and originator alike, and has the reports for it; it could only
    build the message/cpim itself and send() it."""
    inbox = Inbox()
    await net.connect(FRED, on_data=inbox)
    gateway = await net.connect(BARNEY)
    irc = "barney/irc@b.test"
    await gateway.attach(irc)

    outcomes = await gateway.send_message([FRED], "from irc", originator=irc)
    with pytest.raises(ValueError, match=r"barney/xmpp@b\.test is not attached"):
        await gateway.send_message([FRED], "not this way", originator="barney/xmpp@b.test")

    assert codes(outcomes) == {FRED: 250}
    [incoming] = await inbox.wait(1)
    message = incoming.message()
    assert message is not None
    assert (incoming.originator, message.sender, message.text()) == (irc, irc, "from irc")


@pytest_twisted.ensureDeferred
async def test_plain_text_is_received_as_a_message_too(net: Net) -> None:
    inbox = Inbox()
    fred = await net.connect(FRED)
    await net.connect(BARNEY, on_data=inbox)

    await fred.send([BARNEY], "ça va?".encode("latin-1"), "text/plain; charset=iso-8859-1")
    await fred.send([BARNEY], b"\x00\x01", "application/octet-stream")

    text, binary = await inbox.wait(2)
    message = text.message()
    assert message is not None
    assert (message.sender, message.to, message.text()) == (FRED, [BARNEY], "ça va?")
    assert message.date == text.received
    assert binary.message() is None


# -- reconnecting -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconnects_and_reattaches_after_a_relay_restart(
    net: Net, events: list[LogEvent]
) -> None:
    """The relay of a.test stops (telling fred 421, RFC 3340 §4.4.3) and a new one starts
    on the same edge port. fred reconnects with backoff, attaches again as both of his
    endpoints, and a send made during the outage waits for that and is delivered."""
    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    inbox = Inbox()
    terminations: list[Termination] = []
    fred = await net.connect(FRED, on_data=inbox, on_terminated=terminations.append)
    await fred.attach("fred/appl=im@a.test")

    await old.service.stopService()
    assert terminations == [Termination((FRED, "fred/appl=im@a.test"), 421, "relay shutting down")]
    await until(lambda: not fred.connected)
    during = defer.ensureDeferred(fred.send(["fred/appl=im@a.test"], b"after", timeout=10))
    await task.deferLater(reactor, 0.3, lambda: None)  # a few failed attempts
    assert not during.called
    new = await net.start("a.test", edge_listen=listen)

    assert codes(await during) == {"fred/appl=im@a.test": 250}
    assert fred.connected
    assert sorted(str(e) for e in new.service.relay.attached) == ["fred/appl=im@a.test", FRED]
    [incoming] = await inbox.wait()
    assert incoming.recipients == ["fred/appl=im@a.test"]
    names = [e["event"] for e in events]
    assert "client.connection-lost" in names
    assert names.count("client.reconnect-scheduled") >= 2  # it backed off at least once


@pytest_twisted.ensureDeferred
async def test_sends_that_give_up_during_an_outage_are_not_kept(net: Net) -> None:
    """A gateway sending on while its relay is down: each send ends 421, not sent, at its
    timeout, and leaves nothing behind (20,000 such sends were all kept until the
    connection came back, and for ever when it did not)."""
    old = await net.start("a.test")
    fred = await net.connect(FRED, relay=f"127.0.0.1:{old.port('edge')}")
    await old.service.stopService()
    await until(lambda: not fred.connected)

    outcomes = [await fred.send([WILMA], b"anyone?", timeout=0.05) for _ in range(20)]

    assert {o[WILMA].code for o in outcomes} == {421}
    assert fred._waiting == {}


@pytest_twisted.ensureDeferred
async def test_an_endpoint_taken_meanwhile_leaves_the_others_reattached(
    net: Net, events: list[LogEvent]
) -> None:
    """fred, a gateway, is attached as himself and two subaddresses when his connection
    is lost; before he is back, another application of his takes one of them. On
    reconnecting the relay refuses that one (554, RFC 3340 §4.4.1 step 5): the others
    are attached again and receive, the one taken is reported through on_terminated,
    and reconnecting stops there (it failed whole, and again for ever, attaching none)."""
    im, gw = "fred/appl=im@a.test", "fred/appl=gw@a.test"
    inbox = Inbox()
    terminations: list[Termination] = []
    # The first attempt comes 0.5 s or more after the loss: the other application's turn.
    fred = await net.connect(
        FRED, on_data=inbox, on_terminated=terminations.append, backoff=(1.0, 1.0)
    )
    wilma = await net.connect(WILMA)
    await fred.attach(im)
    await fred.attach(gw)
    relay = net.relays["a.test"]

    fred._connection.session.transport.abortConnection()  # the network fails
    await until(lambda: {str(e) for e in relay.service.relay.attached} == {WILMA})
    other = await attach(relay, net.ca, im)
    try:
        assert not fred.connected, "fred came back before the other application attached"
        await until(lambda: fred.connected)

        assert [(t.endpoints, t.code) for t in terminations] == [((im,), 554)]
        assert fred.endpoints == (FRED, gw)
        assert codes(await wilma.send([FRED, gw], b"both?")) == {FRED: 250, gw: 250}
        assert codes(await wilma.send([im], b"for the other")) == {im: 250}
        assert [i.recipients for i in await inbox.wait(2)] == [[FRED], [gw]]
        assert [d.content.body for d in other.data] == [b"for the other"]
        names = [e["event"] for e in events]
        assert names.count("client.attach-refused") == 1
        attempts = names.count("client.reconnect-scheduled")
        await _sleep(1.2)  # more than the backoff: any further attempt would show
        assert [e["event"] for e in events].count("client.reconnect-scheduled") == attempts
    finally:
        other.session.disconnect()


@pytest_twisted.ensureDeferred
async def test_reconnecting_waits_for_the_relay_to_let_go_of_the_lost_session(
    net: Net, events: list[LogEvent]
) -> None:
    """Every endpoint refused with 554 on reconnecting: that may be the relay still
    holding the lost session's attachments, which it lets go of once it notices the loss
    (RFC 3340 §6.1.1), so the client tries again, and is attached as all of them then.
    An application here holds fred for the time the relay would."""
    terminations: list[Termination] = []
    fred = await net.connect(FRED, on_terminated=terminations.append, backoff=(1.0, 1.0))
    await fred.attach("fred/appl=im@a.test")
    relay = net.relays["a.test"]

    fred._connection.session.transport.abortConnection()
    await until(lambda: not relay.service.relay.attached)
    holders = [await attach(relay, net.ca, e) for e in (FRED, "fred/appl=im@a.test")]
    try:
        await until(lambda: any(e["event"] == "client.retry" for e in events))
        assert not fred.connected
    finally:
        for holder in holders:
            holder.session.disconnect()
    await until(lambda: fred.connected)

    assert fred.endpoints == (FRED, "fred/appl=im@a.test")
    assert terminations == []


@pytest_twisted.ensureDeferred
async def test_data_the_lost_session_never_carried_is_sent_on_the_next(net: Net) -> None:
    """Two sends as the connection fails. The first, larger than the relay's window, was
    partly written: it may have reached the relay, so it is not sent again (the relays
    promise nothing twice) and its outcome is unknown. The second waited whole behind it
    (NotSent: the relay never saw a byte of it), so it goes on the next session once fred
    has reconnected, and is delivered, once."""
    fred = await net.connect(FRED)
    barney = Inbox()
    await net.connect(BARNEY, on_data=barney)
    session = fred._connection.session

    partly = defer.ensureDeferred(fred.send([BARNEY], b"x" * 200_000, timeout=2.0))
    unsent = defer.ensureDeferred(fred.send([BARNEY], b"never went out", timeout=10.0))
    session.transport.abortConnection()  # the network fails before anything more is written

    assert codes(await unsent) == {BARNEY: 250}
    assert fred._connection.session is not session
    assert codes(await partly) == {BARNEY: None}
    assert [i.body for i in barney.items] == [b"never went out"]


@pytest_twisted.ensureDeferred
async def test_data_never_sent_and_no_reconnection_in_time_says_not_sent(net: Net) -> None:
    """As above, but the client is not back within the send's timeout: data it knows it
    never sent ends 421, said to be not sent, rather than "no status report" as if it
    might have been delivered."""
    fred = await net.connect(FRED, backoff=(5.0, 5.0))  # no new attempt within the test
    session = fred._connection.session

    partly = defer.ensureDeferred(fred.send([BARNEY], b"x" * 200_000, timeout=0.5))
    unsent = defer.ensureDeferred(fred.send([BARNEY], b"never went out", timeout=0.5))
    session.transport.abortConnection()

    outcomes = await unsent
    assert codes(outcomes) == {BARNEY: 421}
    assert outcomes[BARNEY].text.startswith("not sent: ")
    assert codes(await partly) == {BARNEY: None}


@pytest_twisted.ensureDeferred
async def test_an_attach_the_lost_session_cut_short_is_made_on_the_next(net: Net) -> None:
    """attach() under way as the connection fails is made again once fred is back. It
    sent again at once on the session going away, which failed at once, and so on: a
    loop that never yielded, and hung the reactor."""
    fred = await net.connect(FRED)
    session = fred._connection.session

    attaching = defer.ensureDeferred(fred.attach("fred/appl=im@a.test"))
    session.transport.abortConnection()
    await attaching.addTimeout(5, reactor)

    assert fred._connection.session is not session
    assert fred.endpoints == (FRED, "fred/appl=im@a.test")
    relay = net.relays["a.test"].service.relay
    assert sorted(str(e) for e in relay.attached) == ["fred/appl=im@a.test", FRED]


@pytest_twisted.ensureDeferred
async def test_without_reconnect_a_lost_connection_ends_the_client(net: Net) -> None:
    fred = await net.connect(FRED, reconnect=False)
    consuming, errors = until_it_ends(fred)
    await net.relays["a.test"].service.stopService()
    await consuming

    [error] = errors
    assert error.kind == "unreachable"
    assert error.message.startswith("lost the connection to the relay at a.test:")
    with pytest.raises(ClientError):
        await fred.send([WILMA], b"hello")


@pytest_twisted.ensureDeferred
async def test_reconnecting_gives_up_when_the_credentials_stop_working(net: Net) -> None:
    """The relay comes back without fred among its users: trying again and again would
    only be refused (and throttled), so the client stops and says why."""
    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    fred = await net.connect(FRED)
    consuming, errors = until_it_ends(fred)
    await old.service.stopService()
    await net.start("a.test", ("wilma",), edge_listen=listen)
    await consuming

    [error] = errors
    assert (error.kind, error.code) == ("auth", 535)
    with pytest.raises(ClientError, match=r"authentication failed for fred@a\.test"):
        await fred.send([WILMA], b"hello")


@pytest_twisted.ensureDeferred
async def test_close_while_reconnecting_ends_the_client_closed_whatever_the_attempt_meets(
    net: Net,
) -> None:
    """The application closes the client while an attempt to reconnect is under way, and
    that attempt then meets a refusal for good. The application asked for the end it got:
    ended() succeeds, as after any close, rather than fail with a refusal that came
    after it let go."""
    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    fred = await net.connect(FRED, backoff=(0.05, 0.05))
    await old.service.stopService()
    closing: list[defer.Deferred[None]] = []

    @provider(ILogObserver)
    def close_as_refused(event: LogEvent) -> None:
        # The relay refuses the password; its answer has not reached the client yet.
        if event.get("event") == "beep.sasl-failure" and not closing:
            closing.append(defer.ensureDeferred(fred.close()))

    globalLogPublisher.addObserver(close_as_refused)
    try:
        await net.start("a.test", ("wilma",), edge_listen=listen)
        await until(lambda: bool(closing), 10)
        await closing[0]
    finally:
        globalLogPublisher.removeObserver(close_as_refused)

    assert await fred.ended() is None


@pytest_twisted.ensureDeferred
async def test_reconnecting_gives_up_when_the_relay_takes_no_endpoints_any_more(
    net: Net,
) -> None:
    """The relay comes back with its mesh port where its edge port was (its configuration
    changed): it answers in BEEP but offers no SASL, and every attempt would meet that
    again. As for a password refused, the client stops and says why, not tries for ever."""
    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    fred = await net.connect(FRED, relay=f"127.0.0.1:{port}")
    consuming, errors = until_it_ends(fred)
    await old.service.stopService()
    await net.start("a.test", mesh_listen=listen)
    await consuming.addTimeout(10, reactor)

    [error] = errors
    assert (error.kind, error.code) == ("protocol", None)
    assert error.message.startswith(f"the relay at 127.0.0.1:{port} offers no SASL mechanism")
    with pytest.raises(ClientError, match="offers no SASL mechanism"):
        await fred.ended()


@pytest_twisted.ensureDeferred
async def test_reconnecting_tries_again_past_something_that_speaks_no_beep(
    net: Net, events: list[LogEvent]
) -> None:
    """Something that is no BEEP peer at the relay's port while the relay is away says
    nothing of what will listen there next: the client tries again, and is back once the
    relay is."""

    class HTTP(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    fred = await net.connect(FRED, relay=f"127.0.0.1:{port}")
    await old.service.stopService()
    where = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    http = await where.listen(protocol.Factory.forProtocol(HTTP))
    try:
        await until(
            lambda: any(
                "does not speak BEEP" in e["error"] for e in events if e["event"] == "client.retry"
            )
        )
    finally:
        await http.stopListening()
    await net.start("a.test", edge_listen=listen)

    await until(lambda: fred.connected)
    assert not fred.ended().called


@pytest_twisted.ensureDeferred
async def test_a_connect_cancelled_while_the_relay_has_not_greeted_lets_go_of_it(
    net: Net,
) -> None:
    """A program that gives up on connect() (its own timeout, a user's Ctrl-C) while the
    relay has not yet greeted ends the connection then, not at connect_timeout."""
    accepted: list[protocol.Protocol] = []
    lost: list[object] = []

    class Silent(protocol.Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

        def connectionLost(self, reason: object = None) -> None:
            lost.append(reason)

    where = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    silent = await where.listen(protocol.Factory.forProtocol(Silent))
    try:
        relay = f"127.0.0.1:{silent.getHost().port}"
        connecting = defer.ensureDeferred(net.connect(FRED, relay=relay, connect_timeout=600))
        await until(lambda: bool(accepted))
        connecting.cancel()
        with pytest.raises(defer.CancelledError):
            await connecting
        await until(lambda: bool(lost))
    finally:
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_ended_tells_an_on_data_bot_that_the_client_gave_up(net: Net) -> None:
    """A bot that takes its data with on_data reads no iterator that could raise: ended()
    is what it awaits, and it fails with the reason once the client gives up."""
    [port] = free_ports(1)
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    old = await net.start("a.test", edge_listen=listen)
    fred = await net.connect(FRED, on_data=Inbox())
    ending = fred.ended()
    assert not ending.called

    await old.service.stopService()
    await net.start("a.test", ("wilma",), edge_listen=listen)

    with pytest.raises(ClientError) as caught:
        await ending.addTimeout(10, reactor)
    assert (caught.value.kind, caught.value.code) == ("auth", 535)
    with pytest.raises(ClientError):
        await fred.ended()  # and again for anyone who asks later


@pytest_twisted.ensureDeferred
async def test_ended_fires_once_close_has_finished_and_a_second_close_waits(net: Net) -> None:
    fred = await net.connect(FRED)
    ending = fred.ended()
    first = defer.ensureDeferred(fred.close())
    second = defer.ensureDeferred(fred.close())
    assert not second.called  # the first is still releasing the session

    await second.addTimeout(5, reactor)
    # The relay has had the terminate and the release: fred is attached no more.
    assert ending.called
    assert FRED not in {str(e) for e in net.relays["a.test"].service.relay.attached}
    await first
    assert (await fred.ended()) is None


# -- SASL mechanisms ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_user_removed_from_the_user_file_is_logged_out(net: Net) -> None:
    """`imxp users remove fred` on a running relay: fred's application, logged in before,
    does not go on sending as fred. Its session ends within the relay's look at the file
    (USERS_LOOK_SECONDS); logging in again fails, and the client says so."""
    terminations: list[Termination] = []
    fred = await net.connect(FRED, on_terminated=terminations.append)
    ended, errors = until_it_ends(fred)
    wilma = await net.connect(WILMA, on_data=Inbox())
    relay = net.relays["a.test"]

    UserStore(relay.users.path, iterations=4096).remove("fred")  # as the command does
    await ended.addTimeout(USERS_LOOK_SECONDS + 5, reactor)

    assert [(t.code, t.text) for t in terminations] == [
        (421, "the password of fred was withdrawn or changed: log in again")
    ]
    assert [e.kind for e in errors] == ["auth"]
    with pytest.raises(ClientError):
        await fred.send([WILMA], b"still here?")
    assert FRED not in {str(e) for e in relay.service.relay.attached}
    assert codes(await wilma.send([FRED], b"fred?")) == {FRED: 550}  # the others go on


@pytest_twisted.ensureDeferred
async def test_a_user_removed_from_the_user_file_cannot_log_in_with_a_certificate(
    net: Net,
) -> None:
    """`imxp users remove wilma` locks out wilma's client certificate (SASL EXTERNAL) as it
    does her password: her session ends, and the certificate she still holds logs her in
    no more."""
    certificate = issue_client(net.ca, WILMA)
    wilma = await net.connect(WILMA, client_certificate=certificate)
    ended, errors = until_it_ends(wilma)
    relay = net.relays["a.test"]

    UserStore(relay.users.path, iterations=4096).remove("wilma")
    await ended.addTimeout(USERS_LOOK_SECONDS + 5, reactor)

    assert [e.kind for e in errors] == ["auth"]
    assert WILMA not in {str(e) for e in relay.service.relay.attached}
    with pytest.raises(ClientError) as refused:
        await net.connect(WILMA, client_certificate=certificate)
    assert refused.value.kind == "auth", refused.value


@pytest_twisted.ensureDeferred
async def test_a_new_password_logs_out_who_logged_in_with_the_old(net: Net) -> None:
    fred = await net.connect(FRED)
    ended, errors = until_it_ends(fred)

    UserStore(net.relays["a.test"].users.path, iterations=4096).set_password("fred", "n3w")
    await ended.addTimeout(USERS_LOOK_SECONDS + 5, reactor)

    assert [e.kind for e in errors] == ["auth"]
    again = await net.connect(FRED, password="n3w", on_data=Inbox())
    assert codes(await again.send([FRED], b"me again")) == {FRED: 250}


@pytest_twisted.ensureDeferred
async def test_a_user_file_the_relay_cannot_look_at_is_said_once(net: Net) -> None:
    """A user file the relay cannot stat (here a symlink loop) is logged as an error once,
    not at every look, and logs no one out."""
    fred = await net.connect(FRED)
    relay = net.relays["a.test"]
    relay.users.path.unlink()
    relay.users.path.symlink_to(relay.users.path)
    errors: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("event") == "imxp.users-unreadable":
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            relay.service._look_at_users(relay.users)
    finally:
        globalLogPublisher.removeObserver(observe)

    assert [e["error"] for e in errors] == [
        f"{relay.users.path}: cannot read: Too many levels of symbolic links"
    ]
    assert fred.connected and FRED in {str(e) for e in relay.service.relay.attached}


@pytest_twisted.ensureDeferred
async def test_plain_and_external(net: Net) -> None:
    """PLAIN (always over TLS) and EXTERNAL with a client certificate (RFC 4422 App. A)."""
    fred = await net.connect(FRED, mechanism="PLAIN", on_data=Inbox())
    wilma = await net.connect(
        WILMA, client_certificate=issue_client(net.ca, WILMA), on_data=Inbox()
    )

    assert codes(await fred.send([WILMA], b"hi")) == {WILMA: 250}
    assert codes(await wilma.send([FRED], b"hi")) == {FRED: 250}


@pytest.mark.parametrize(
    ("endpoint", "certificate"),
    [
        # Another domain's relay: its certificate verifies, and names evil.test.
        ("evil.test@a.test", lambda ca: issue_server(ca, ["evil.test"])),
        # Someone at another domain, attaching at this one as who they are.
        ("barney@b.test", lambda ca: issue_client(ca, "barney@b.test")),
        # A name of this domain with no account: with a system bundle as tls_trust, a
        # public CA's certificate for any mailbox there.
        ("nobody@a.test", lambda ca: issue_client(ca, "nobody@a.test")),
    ],
    ids=["relay-certificate", "another-domain", "no-account"],
)
@pytest_twisted.ensureDeferred
async def test_external_logs_in_only_endpoints_of_the_relays_domain(
    net: Net, endpoint: str, certificate: Callable[[Issued], Issued]
) -> None:
    """Every certificate the relay's trust store verifies passed SASL EXTERNAL: a relay's
    let its holder attach as evil.test@a.test, an endpoint nobody provisioned, and send
    as it; with a public CA bundle as tls_trust, anyone's certificate would, and one for
    any mailbox of the domain still logged in as a name with no account."""
    a = net.handles[0]
    with pytest.raises(ClientError) as refused:
        await net.connect(
            endpoint,
            client_certificate=certificate(net.ca),
            relay=f"127.0.0.1:{a.port('edge')}",
            tls_name="a.test",
        )
    assert refused.value.kind == "auth", refused.value
    assert not a.service.relay.attached


@pytest_twisted.ensureDeferred
async def test_a_relay_cannot_report_on_recipients_whose_data_it_never_saw(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c.test's relay, on the way to betty only, learns the transID it is asked to report
    under, and reports barney@b.test refused under it: with one transID for the whole
    data, the first final verdict won, and fred read "failed 550" for a delivered data."""
    c = (await net.start("c.test", users=("betty",))).service.relay
    deliver = c._deliver

    def forging(journey: Any, recipient: Any, endpoint: Any) -> Any:
        asked = journey.recipient_status.get(recipient.identity) or journey.status
        c.reports.report(journey.originator, asked.trans_id, [(BARNEY, 550, "forged")])
        return deliver(journey, recipient, endpoint)

    monkeypatch.setattr(c, "_deliver", forging)
    barney = Inbox()
    await net.connect(BARNEY, on_data=barney)
    fred = await net.connect(FRED)

    outcomes = await fred.send([BARNEY, "betty@c.test"], b"hi", timeout=5.0)
    assert codes(outcomes) == {BARNEY: 250, "betty@c.test": 450}
    assert len(barney.items) == 1


# -- many people behind one address ----------------------------------------------------------


async def anonymous_session(relay: RelayHandle) -> Session:
    """A BEEP session to the relay's edge port that never logs in."""
    factory = SessionFactory(Role.INITIATOR, [], SessionConfig(idle_timeout=None))
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port("edge"))
    return await where.connect(factory)


@pytest_twisted.ensureDeferred
async def test_the_per_address_limit_spares_the_sessions_that_logged_in(net: Net) -> None:
    """An office behind one NAT address: here, everyone on 127.0.0.1. Only the sessions
    that have not logged in yet could be anyone's, and only they are limited."""
    relay = await net.start("a.test", max_sessions_per_peer=2)
    people = [await net.connect(e) for e in (FRED, WILMA, "fred/phone@a.test")]
    assert all(p.connected for p in people)

    first, second, third = [await anonymous_session(relay) for _ in range(3)]
    await first.greeted()
    await second.greeted()
    with pytest.raises(BEEPError) as refused:  # §2.4: 421 instead of a greeting
        await third.greeted()
    assert refused.value.code == 421
    assert "too many sessions from 127.0.0.1" in refused.value.text

    # Once they are gone, one more person logs in: those who did never counted.
    for session in (first, second, third):
        session.disconnect()
        await session.when_closed()
    assert (await net.connect("wilma/phone@a.test")).connected


# -- errors a person can act on --------------------------------------------------------------


async def refused_with(net: Net, endpoint: str, **options: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await net.connect(endpoint, **options)
    assert "\n" not in caught.value.message
    return caught.value


@pytest_twisted.ensureDeferred
async def test_wrong_password(net: Net) -> None:
    error = await refused_with(net, FRED, password="wrong")
    assert error.kind == "auth"
    assert error.code == 535
    assert error.message == "authentication failed for fred@a.test (535): authentication failure"


@pytest_twisted.ensureDeferred
async def test_a_password_sasl_cannot_carry_is_an_auth_error(net: Net) -> None:
    """RFC 4013: SASLprep forbids control characters. No relay takes such a password,
    and the error says so as any refused login does, not as a bug of the library."""
    error = await refused_with(net, FRED, password="x\x01")
    assert error.kind == "auth"
    assert "control characters" in error.message


@pytest_twisted.ensureDeferred
async def test_unknown_domain(net: Net) -> None:
    error = await refused_with(net, "fred@nowhere.test")
    assert error.kind == "unknown-domain"
    assert error.message == "unknown domain nowhere.test: no such domain"


@pytest_twisted.ensureDeferred
async def test_unreachable_relay(net: Net) -> None:
    port = closed_port()
    error = await refused_with(net, FRED, relay=f"127.0.0.1:{port}")
    assert error.kind == "unreachable"
    assert error.message.startswith(f"cannot reach the relay for a.test at 127.0.0.1:{port}: ")

    # Two SRV targets, both dead: each one is tried, and both are named.
    ports = [closed_port(), closed_port()]
    net.dns.set("_apex-edge._tcp.a.test", *(srv(0, 1, p, "a.test.") for p in ports))
    error = await refused_with(net, FRED)
    assert error.kind == "unreachable"
    assert error.message.startswith("no relay for a.test answers: ")
    assert all(f"a.test:{p}" in error.message for p in ports)


@pytest_twisted.ensureDeferred
async def test_a_relay_address_where_something_else_listens(net: Net) -> None:
    """An HTTP server at the relay's address: the client says it does not speak BEEP,
    and why, rather than that the relay cannot be reached."""

    class HTTP(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    where = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await where.listen(protocol.Factory.forProtocol(HTTP))
    number = port.getHost().port
    try:
        error = await refused_with(net, FRED, relay=f"127.0.0.1:{number}")
    finally:
        await port.stopListening()
    assert error.kind == "protocol"
    assert error.message == (
        f"the relay at 127.0.0.1:{number} does not speak BEEP: poorly formed "
        "frame: unknown frame keyword b'HTTP/1.1'"
    )


@pytest_twisted.ensureDeferred
async def test_certificate_for_another_name(net: Net) -> None:
    """The relay's certificate names other.test, not the domain fred belongs to."""
    handle = await net.start("c.test", ("fred",), identity=issue_server(net.ca, ["other.test"]))
    error = await refused_with(net, "fred@c.test")
    assert error.kind == "tls"
    port = handle.port("edge")
    assert error.message == (
        f"TLS with the relay at c.test:{port} failed: its certificate is not valid for c.test"
        " (RFC 6125); if the relay is meant to be known by another name, say so as"
        " tls_name (--tls-name)"
    )
    # Told to expect that name, the same relay is fine.
    await net.connect("fred@c.test", tls_name="other.test")


@pytest_twisted.ensureDeferred
async def test_certificate_from_an_untrusted_ca(net: Net) -> None:
    """The client refuses the relay's certificate. The relay's operator, whose users call
    about it, learns why from the relay's log: OpenSSL's alert."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        error = await refused_with(net, FRED, trust=[create_ca("stranger").certificate])
        await until(lambda: any(e.get("event") == "beep.tls-failed" for e in seen))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert error.kind == "tls"
    assert "its certificate for a.test does not verify" in error.message
    [failed] = [e for e in seen if e.get("event") == "beep.tls-failed"]
    assert failed["peer"].startswith("127.0.0.1:")
    assert failed["reason"] == "tlsv1 alert unknown ca"


@pytest_twisted.ensureDeferred
async def test_attach_as_someone_else(net: Net) -> None:
    error = await refused_with(net, WILMA, username="fred")
    assert error.kind == "refused"
    assert error.code == 537
    assert error.message == (
        "the relay refused to attach wilma@a.test (537): fred may not attach as wilma@a.test"
    )


@pytest_twisted.ensureDeferred
async def test_mechanism_the_relay_does_not_offer(net: Net) -> None:
    await net.start("c.test", ("fred",), sasl_mechanisms=("SCRAM-SHA-256",))
    error = await refused_with(net, "fred@c.test", mechanism="PLAIN")
    assert error.kind == "auth"
    assert error.message.endswith("does not offer SASL PLAIN (it offers SCRAM-SHA-256)")


@pytest_twisted.ensureDeferred
async def test_the_relays_mesh_port_is_named_as_the_wrong_service(net: Net) -> None:
    """The relay-relay port (apex-mesh) offers no SASL: relays prove themselves with
    their certificates (RFC 3340 §4.5.2). An endpoint that reaches it is at the wrong
    service, which no password would change: it is told to use the edge port."""
    mesh = net.relays["a.test"].port("mesh")
    error = await refused_with(net, FRED, relay=f"127.0.0.1:{mesh}")
    assert error.kind == "protocol"
    assert error.code is None
    assert error.message == (
        f"the relay at 127.0.0.1:{mesh} offers no SASL mechanism, so no endpoint can log in"
        " there: it looks like a relay's mesh port (apex-mesh, for relays); endpoints"
        " connect to its edge port (apex-edge: 913, or 9913 in imxp's default configuration)"
    )


@pytest_twisted.ensureDeferred
async def test_relays_that_all_answer_but_take_no_endpoints_are_a_protocol_error(
    net: Net,
) -> None:
    """Both SRV targets of a.test are relays' mesh ports (a zone that names the wrong
    service): each is tried, and each answers in BEEP that no endpoint logs in there. The
    relays were reached: that is "protocol", both named, not "unreachable"."""
    first = net.relays["a.test"]
    second = await net.start("a.test")
    meshes = [first.port("mesh"), second.port("mesh")]
    net.dns.set("_apex-edge._tcp.a.test", *(srv(0, 1, p, "a.test.") for p in meshes))

    error = await refused_with(net, FRED)

    assert (error.kind, error.code) == ("protocol", None)
    assert error.message.startswith("no relay for a.test takes endpoints: ")
    assert all(f"a.test:{p} offers no SASL mechanism" in error.message for p in meshes)


@pytest_twisted.ensureDeferred
async def test_an_apex_channel_the_relay_closes_is_connected_and_attached_anew(
    net: Net, events
) -> None:
    """A relay may close the APEX channel and keep the BEEP session (RFC 3080
    §2.3.1.3); the attachments end with the channel (RFC 3340 §6.1.1). The client
    does not go on as if attached: it connects and attaches again."""
    fred = await net.connect(FRED)
    barney = Inbox()
    await net.connect(BARNEY, on_data=barney)
    relay = net.relays["a.test"].service.relay
    session = fred._connection.session
    attached = relay.attached[Endpoint.parse(FRED)]
    assert attached.channel is not None

    await attached.channel.close(200, "")
    await until(lambda: fred.connected and fred._connection.session is not session)

    assert codes(await fred.send([BARNEY], b"still here", timeout=10)) == {BARNEY: 250}
    assert [e["event"] for e in events if e["event"] == "client.channel-closed"] == [
        "client.channel-closed"
    ]


@pytest_twisted.ensureDeferred
async def test_an_endpoint_detached_while_reconnecting_stays_detached(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detach() during a reconnection, which attaches the endpoints wanted when it
    began: the relay is told to release the one detached, and data for it is refused."""
    sub = "barney/x@b.test"
    fred = await net.connect(FRED)
    got = Inbox()
    barney = await net.connect(BARNEY, on_data=got)
    await barney.attach(sub)
    session = barney._connection.session
    open_apex = edge.Client._open_apex
    detaching: list[defer.Deferred[None]] = []

    async def detach_meanwhile(self, connection, *, initial):  # type: ignore[no-untyped-def]
        opening = defer.ensureDeferred(open_apex(self, connection, initial=initial))
        if self is barney and not initial and not detaching:
            detaching.append(defer.ensureDeferred(barney.detach(sub)))
        return await opening

    monkeypatch.setattr(edge.Client, "_open_apex", detach_meanwhile)
    session.transport.abortConnection()
    await until(lambda: barney.connected and barney._connection.session is not session)
    await detaching[0]
    relay = net.relays["b.test"].service.relay
    await until(lambda: Endpoint.parse(sub) not in relay.attached)

    assert barney.endpoints == (BARNEY,)
    assert codes(await fred.send([sub], b"after detach", timeout=10)) == {sub: 450}
    assert got.items == []


# -- packaging ------------------------------------------------------------------------------


def test_an_installed_imxp_carries_its_type_hints(tmp_path: Path) -> None:
    """Applications built on the library run their type checker over their calls to
    connect() and Client: PEP 561 has a checker read an installed package's hints only
    when the package holds a ``py.typed`` marker, and otherwise treat every name of it
    as Any (mypy: "missing library stubs or py.typed marker"). What setuptools builds
    from the checkout, as pip installs it, must hold one."""
    root = Path(__file__).resolve().parent.parent
    setup = "from setuptools import setup; setup()"
    build = subprocess.run(
        [sys.executable, "-c", setup, "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    assert (tmp_path / "imxp" / "client" / "edge.py").is_file()
    assert (tmp_path / "imxp" / "py.typed").is_file()
