"""Audit of the edge client library (imxp/client/edge.py) against real relays."""

from __future__ import annotations

import pytest
import pytest_twisted
import test_client
from apexnet import App, attach
from test_client import BARNEY, FRED, Net, codes, until, until_it_ends
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from imxp.apex.relay import APEXChannel
from imxp.beep.message import Message
from imxp.beep.session import BEEPError, ChannelHandler, Request
from imxp.client import ClientError, Incoming

#: The fixture of test_client.py: relays for a.test and b.test, published in a real DNS.
net = test_client.net


@pytest_twisted.ensureDeferred
async def test_close_ends_every_incoming_iterator(net: Net) -> None:
    """Two iterators waiting on incoming(): close() must end both (the docstring: "It
    ends when the client is closed")."""
    barney = await net.connect(BARNEY)
    ended: list[str] = []

    async def consume(name: str) -> None:
        async for _ in barney.incoming():
            pass
        ended.append(name)

    first = defer.ensureDeferred(consume("first"))
    second = defer.ensureDeferred(consume("second"))
    await barney.close()
    await task.deferLater(reactor, 0.2, lambda: None)
    try:
        assert sorted(ended) == ["first", "second"]
    finally:
        first.cancel()
        second.cancel()
        first.addErrback(lambda _: None)
        second.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_stops_does_not_take_data_from_another(net: Net) -> None:
    """One iterator stops after its first data; another, also waiting, must still get it."""
    fred = await net.connect(FRED)
    barney = await net.connect(BARNEY)
    got_a: list[Incoming] = []
    got_b: list[Incoming] = []

    async def first_only() -> None:
        async for incoming in barney.incoming():
            got_a.append(incoming)
            break

    async def every() -> None:
        async for incoming in barney.incoming():
            got_b.append(incoming)

    a = defer.ensureDeferred(first_only())
    b = defer.ensureDeferred(every())
    assert codes(await fred.send([BARNEY], b"one")) == {BARNEY: 250}
    await until(lambda: len(got_a) == 1)
    await task.deferLater(reactor, 0.2, lambda: None)
    await a
    try:
        assert [i.body for i in got_b] == [b"one"]
    finally:
        b.cancel()
        b.addErrback(lambda _: None)


class _Silent(ChannelHandler):
    """An application that never answers the data it receives."""

    def __init__(self) -> None:
        self.answers: list[defer.Deferred[Message]] = []

    def message_received(self, request: Request) -> defer.Deferred[Message]:
        self.answers.append(defer.Deferred())
        return self.answers[-1]


async def _silent_barney(net: Net) -> tuple[App, _Silent]:
    barney = await attach(net.relays["b.test"], net.ca, BARNEY)
    silent = _Silent()
    barney.channel.handler = silent
    return barney, silent


@pytest_twisted.ensureDeferred
async def test_close_with_a_send_waiting_for_its_report(net: Net) -> None:
    """close() while a send waits for its status report: the send gets its outcome now
    (as documented) and close() completes, releasing the session."""
    fred = await net.connect(FRED)
    barney, silent = await _silent_barney(net)
    try:
        sending = defer.ensureDeferred(fred.send([BARNEY], b"hello?", timeout=10))
        await until(lambda: len(silent.answers) == 1)
        closing = defer.ensureDeferred(fred.close())
        outcomes = await sending
        assert codes(outcomes) == {BARNEY: None}
        await closing  # RuntimeError: dictionary changed size during iteration
        assert net.relays["a.test"].service.relay.attached == {}
    finally:
        barney.session.disconnect()


@pytest_twisted.ensureDeferred
async def test_lost_connection_with_a_send_waiting_ends_the_iterators(net: Net) -> None:
    """Without reconnect, a lost connection ends the client: incoming() iterators raise
    ClientError and a waiting send returns - also when a send awaits its report."""
    fred = await net.connect(FRED, reconnect=False)
    barney, silent = await _silent_barney(net)
    consuming, errors = until_it_ends(fred)
    try:
        sending = defer.ensureDeferred(fred.send([BARNEY], b"hello?", timeout=10))
        await until(lambda: len(silent.answers) == 1)
        await net.relays["a.test"].service.stopService()
        await until(lambda: sending.called, timeout=3)
        await until(lambda: consuming.called, timeout=3)
        assert [e.kind for e in errors] == ["unreachable"]
    finally:
        barney.session.disconnect()
        consuming.cancel()
        consuming.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_send_keeps_its_timeout_when_the_relay_never_answers_the_data(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged relay that takes the data message but never answers it: send() must
    still return within its timeout (the missing outcomes unknown), not hang."""
    fred = await net.connect(FRED)
    stuck: list[defer.Deferred[Message]] = []

    def never(self: APEXChannel, request: Request) -> defer.Deferred[Message]:
        stuck.append(defer.Deferred())
        return stuck[-1]

    monkeypatch.setattr(APEXChannel, "message_received", never)
    sending = defer.ensureDeferred(fred.send([BARNEY], b"hello", timeout=0.5))
    try:
        await until(lambda: sending.called, timeout=3)
        assert codes(await sending) == {BARNEY: None}
    finally:
        sending.cancel()
        sending.addErrback(lambda _: None)
        monkeypatch.undo()
        for d in stuck:
            d.errback(BEEPError(451, "test over"))


class _GreetThenSilence(Protocol):
    """A "relay" that greets (offering TLS) and then never answers anything."""

    def connectionMade(self) -> None:
        payload = (
            b"Content-Type: application/beep+xml\r\n\r\n"
            b"<greeting><profile uri='http://iana.org/beep/TLS'/></greeting>\r\n"
        )
        self.transport.write(b"RPY 0 0 . 0 %d\r\n%sEND\r\n" % (len(payload), payload))


@pytest_twisted.ensureDeferred
async def test_connect_to_a_relay_that_stalls_after_its_greeting_ends(net: Net) -> None:
    """A relay that greets and then stalls (TLS never answered): connect() must give up
    with a ClientError rather than wait forever (on reconnecting, the client would never
    try again)."""
    factory = Factory.forProtocol(_GreetThenSilence)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    connecting = defer.ensureDeferred(
        net.connect(FRED, relay=f"127.0.0.1:{port.getHost().port}", connect_timeout=0.5)
    )
    connecting.addErrback(lambda f: f.value)  # a ClientError is the expected result
    try:
        await until(lambda: connecting.called, timeout=5)
        assert isinstance(connecting.result, ClientError)
    finally:
        connecting.cancel()
        await port.stopListening()
