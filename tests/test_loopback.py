"""Real BEEP sessions over loopback TCP, TLS-tuned with certificates the test makes.

What RFC 3080/3081 promise a user of the library, shown end to end on real sockets:
several channels at once with replies in order (RFC 3080 §2.6.1), one-to-many exchanges
(ANS/NUL, §2.6.2), a 10 MB message with the 4096-octet window in force (RFC 3081 §3.1),
a receiver that stops reading or answering (what the sender buffers stays bounded by the
window), and the refusals a listener makes on real connections: 421 (§2.4), garbage
(§2.2.1.1), a peer that never greets. Every session but the refused ones runs over TLS
(RFC 3080 §3.1) with the listener's certificate verified against the test's CA.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted
from beepnet import ECHO_URI, EchoProfile, Listener
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from imxp.beep.frames import ANS, Frame, FrameParser
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    Profile,
    Request,
    Role,
    Session,
    SessionClosed,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.certs import create_ca, issue_client, issue_server

SERVER_NAME = "relay.a.test"
#: RFC 3081 §3.1.1: the window every channel starts with, and SessionConfig's default.
WINDOW = 4096
MiB = 1 << 20

DELAYED_URI = "http://imxp.test/delayed-echo"
ANSWERS_URI = "http://imxp.test/answers"
SINK_URI = "http://imxp.test/sink"
HOLD_URI = "http://imxp.test/hold"


# -- profiles ---------------------------------------------------------------------------


class ServedBy(Profile):
    """A profile whose channels are each served by a new handler from ``make``;
    ``handlers`` keeps them for the test to inspect."""

    def __init__(self, uri: str, make: Callable[[], ChannelHandler]) -> None:
        self.uri = uri
        self.make = make
        self.handlers: list[Any] = []

    def start(self, session: Session, channel: Channel, init: bytes | None) -> None:
        channel.handler = self.make()
        self.handlers.append(channel.handler)


class DelayedEcho(ChannelHandler):
    """Echoes a MSG after the seconds its ``Delay`` header names; ``finished`` lists the
    bodies in the order the profile finished them, before the session orders the replies."""

    def __init__(self) -> None:
        self.finished: list[bytes] = []

    def message_received(self, request: Request) -> defer.Deferred[Message]:
        body = request.message.body

        def finish() -> Message:
            self.finished.append(body)
            return Message(body, "application/octet-stream")

        return task.deferLater(reactor, float(request.message.header("Delay", "0")), finish)


def answer_body(ansno: int, size: int) -> bytes:
    """The body of ANS ``ansno``: ``size`` octets, different for every ansno."""
    stamp = b"%d:" % ansno
    return (stamp * (size // len(stamp) + 1))[:size]


class Answers(ChannelHandler):
    """A MSG listing sizes (``b"100 70000 0"``) gets one ANS of each size, a reactor turn
    apart so that other channels' traffic interleaves, then NUL (§2.6.2)."""

    def message_received(self, request: Request) -> None:
        sizes = [int(s) for s in request.message.body.split()]

        async def answer() -> None:
            for ansno, size in enumerate(sizes):
                request.answer(Message(answer_body(ansno, size), "application/octet-stream"))
                await sleep(0)
            request.done()

        defer.ensureDeferred(answer())


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


class Sink(ChannelHandler):
    """Replies with the SHA-256 of the body: the sender checks what arrived without the
    message travelling back."""

    def message_received(self, request: Request) -> Message:
        return Message(digest(request.message.body), "text/plain")


class Hold(ChannelHandler):
    """An application that stops answering: every MSG waits until :meth:`release`, after
    which it answers like :class:`Sink`."""

    def __init__(self) -> None:
        self.held: list[tuple[bytes, defer.Deferred[Message]]] = []
        self.released = False

    def message_received(self, request: Request) -> Message | defer.Deferred[Message]:
        body = request.message.body
        if self.released:
            return Message(digest(body), "text/plain")
        d: defer.Deferred[Message] = defer.Deferred()
        self.held.append((body, d))
        return d

    def release(self) -> None:
        self.released = True
        held, self.held = self.held, []
        for body, d in held:
            d.callback(Message(digest(body), "text/plain"))


class PushRecorder:
    """An IPushProducer standing for the application feeding a channel."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class RawPeer(Protocol):
    """A TCP client that is no BEEP peer: it writes ``send`` on connecting (nothing, if
    empty) and records what it reads and when it is disconnected."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.port = 0
        self.received = b""
        #: Fires with the exception that ended the connection.
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def connectionMade(self) -> None:
        self.port = self.transport.getHost().port  # type: ignore[union-attr]
        if self.send:
            self.transport.write(self.send)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(reason.value)


# -- sessions on loopback -----------------------------------------------------------------


@dataclass
class Net:
    """The listeners and connections of one test, all torn down at its end, even when it
    fails."""

    test_ca: Any
    server_cert: Callable[..., Any]
    listeners: list[Listener] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    raw: list[RawPeer] = field(default_factory=list)
    #: Every log event while the test runs.
    log: list[dict[str, Any]] = field(default_factory=list)

    async def __aenter__(self) -> Net:
        globalLogPublisher.addObserver(self.log.append)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._teardown()
        finally:
            globalLogPublisher.removeObserver(self.log.append)

    def events(self, name: str, port: int | None = None) -> list[dict[str, Any]]:
        """The log events called ``name``; only those about the connection from local
        ``port`` if given."""
        return [
            e
            for e in self.log
            if e.get("event") == name and (port is None or e.get("peer", "").endswith(f":{port}"))
        ]

    async def _teardown(self) -> None:
        for session in [*self.sessions, *(s for lst in self.listeners for s in lst.sessions)]:
            transport: Any = session.transport
            if transport is not None:
                closed = session.when_closed()
                session.disconnect()
                # A peer that stopped reading would hold a graceful close forever.
                timer = reactor.callLater(2, transport.abortConnection)
                await closed
                if timer.active():
                    timer.cancel()
        for peer in self.raw:
            if peer.transport is not None and peer.connected:
                peer.transport.abortConnection()  # type: ignore[attr-defined]
        for listener in self.listeners:
            await defer.maybeDeferred(listener.port.stopListening)

    async def listen(
        self,
        profiles: list[Profile],
        config: SessionConfig | None = None,
        tls: IOpenSSLServerConnectionCreator | None = None,
        **factory_kw: Any,
    ) -> Listener:
        """A listener offering TLS (by default with a certificate for SERVER_NAME, not
        asking for the client's) and ``profiles``."""
        tuning = TLSProfile(tls or server_options(self.server_cert(SERVER_NAME)))
        sessions: list[Session] = []
        factory = SessionFactory(
            Role.LISTENER, [tuning, *profiles], config, on_session=sessions.append, **factory_kw
        )
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        listener = Listener(await endpoint.listen(factory), factory, sessions)
        self.listeners.append(listener)
        return listener

    async def connect_plain(
        self, listener: Listener, config: SessionConfig | None = None
    ) -> Session:
        """A TCP connection to ``listener``; its greeting may not have arrived yet."""
        host, port = listener.address
        factory = SessionFactory(Role.INITIATOR, (), config)
        session = await endpoints.TCP4ClientEndpoint(reactor, host, port).connect(factory)
        self.sessions.append(session)
        return session

    async def connect(
        self,
        listener: Listener,
        config: SessionConfig | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> Session:
        """A session to ``listener`` tuned by TLS; by default the listener's certificate
        is verified against the test CA for SERVER_NAME and no client certificate sent."""
        session = await self.connect_plain(listener, config)
        await start_tls(session, tls or client_options(SERVER_NAME, [self.test_ca.certificate]))
        assert session.tls_active
        return session

    async def raw_client(self, listener: Listener, send: bytes = b"") -> RawPeer:
        peer = RawPeer(send)
        host, port = listener.address
        factory = Factory.forProtocol(lambda: peer)
        await endpoints.TCP4ClientEndpoint(reactor, host, port).connect(factory)
        self.raw.append(peer)
        return peer


@pytest.fixture
def net(test_ca: Any, server_cert: Callable[..., Any]) -> Net:
    return Net(test_ca, server_cert)


def server_side(listener: Listener, client: Session) -> Session:
    """The listener's session at the other end of ``client``'s connection."""
    port = client.transport.getHost().port  # type: ignore[union-attr]
    (session,) = [s for s in listener.sessions if s.peer.endswith(f":{port}")]
    return session


class FrameSpy:
    """Parses a copy of what ``session`` receives with a FrameParser of its own and keeps
    the frames of channels other than zero. Install it while no frame is in flight to
    the session (e.g. right after TLS), so the copy begins on a frame boundary."""

    def __init__(self, session: Session) -> None:
        self.parser = FrameParser()
        self.frames: list[Frame] = []
        receive = session.dataReceived

        def spy(data: bytes) -> None:
            self.frames += [f for f in self.parser.feed(data) if type(f) is Frame and f.channel]
            receive(data)

        session.dataReceived = spy  # type: ignore[method-assign]

    @property
    def largest(self) -> int:
        return max(len(f.payload) for f in self.frames)


def write_buffer(session: Session) -> int:
    """Octets ``session`` wrote that the kernel has not taken yet: Twisted's TCP write
    buffer and, under TLS, cleartext the TLS layer is still holding."""
    transport: Any = session.transport
    buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    tls = transport.protocol  # startTLS puts the TLS layer between transport and session
    if tls is not session:
        buffered += sum(len(b) for b in tls._appSendBuffer)
    return buffered


class Sampler:
    """Records ``measure()`` every few milliseconds while the reactor runs."""

    def __init__(self, measure: Callable[[], int]) -> None:
        self.measure = measure
        self.samples: list[int] = []
        self.loop = task.LoopingCall(lambda: self.samples.append(self.measure()))
        self.loop.start(0.005)

    def stop(self) -> int:
        """Stops sampling; returns the largest value seen."""
        self.loop.stop()
        return max(self.samples)


async def within(d: defer.Deferred[Any], seconds: float) -> Any:
    """``d``'s result; fails the test with TimeoutError if it takes longer."""
    return await d.addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def payload(tag: str, size: int) -> bytes:
    """``size`` random octets (at least the tag) beginning with ``tag|``."""
    head = tag.encode() + b"|"
    return head + os.urandom(max(0, size - len(head)))


# -- several channels at once ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_channels_at_once_replies_match_and_keep_each_channels_order(net: Net) -> None:
    profile = ServedBy(DELAYED_URI, DelayedEcho)
    async with net:
        # The client says who it is neither by SASL nor by a certificate: the listener
        # must let it have this many channels all the same.
        config = SessionConfig(max_channels_unauthenticated=5)
        listener = await net.listen([profile], config)
        client = await net.connect(listener)
        channels = await defer.gatherResults(
            [client.start_channel([DELAYED_URI]) for _ in range(5)]
        )
        assert sorted(c.number for c in channels) == [1, 3, 5, 7, 9]
        per_channel = 12
        sizes = [10, 300, 5000, 20000]  # some larger than the window: sent in fragments
        arrived: dict[int, list[int]] = {c.number: [] for c in channels}
        sends: list[tuple[bytes, defer.Deferred[Message]]] = []
        for i in range(per_channel):
            for channel in channels:
                body = payload(f"{channel.number}/{i}", sizes[i % len(sizes)])
                # Earlier MSGs take the profile longer: it finishes them out of order.
                delay = (per_channel - i) * 0.01
                d = channel.send(Message(body, headers=[("Delay", f"{delay:.3f}")]))
                d.addCallback(lambda reply, n=channel.number, i=i: arrived[n].append(i) or reply)
                sends.append((body, d))
        replies = await within(defer.gatherResults([d for _, d in sends]), 10)
        assert [r.body for r in replies] == [body for body, _ in sends]
        # §2.6.1: each channel's replies come in the order its MSGs were sent...
        assert arrived == {c.number: list(range(per_channel)) for c in channels}
        # ...though the profile finished later ones first.
        for handler in profile.handlers:
            order = [int(body.split(b"|")[0].split(b"/")[1]) for body in handler.finished]
            assert sorted(order) == list(range(per_channel))
            assert order != sorted(order)


# -- one-to-many exchanges --------------------------------------------------------------------


ANSWER_SIZES = [100, 9000, 0, 70000, WINDOW, WINDOW + 1, 30000, 7]


@pytest.mark.parametrize("streamed", [True, False], ids=["on_answer", "list"])
@pytest_twisted.ensureDeferred
async def test_answers_arrive_in_order_then_nul_amid_other_traffic(
    net: Net, streamed: bool
) -> None:
    async with net:
        listener = await net.listen([ServedBy(ANSWERS_URI, Answers), EchoProfile()])
        client = await net.connect(listener)
        spy = FrameSpy(client)
        answers_channel = await client.start_channel([ANSWERS_URI])
        echo_channel = await client.start_channel([ECHO_URI])
        events: list[tuple[str, int]] = []
        echoes: list[defer.Deferred[Message]] = []
        streamed_answers: list[tuple[int, bytes]] = []

        def on_answer(message: Message, ansno: int) -> None:
            events.append(("ANS", ansno))
            streamed_answers.append((ansno, message.body))
            if ansno == 0:
                # Traffic on another channel while the answers are still coming.
                for i in range(20):
                    d = echo_channel.send(Message(payload(f"echo{i}", 3000)))
                    echoes.append(d.addCallback(lambda m, i=i: events.append(("echo", i)) or m))

        request = Message(b" ".join(b"%d" % size for size in ANSWER_SIZES))
        if streamed:
            exchange = answers_channel.send(request, on_answer=on_answer)
        else:
            exchange = answers_channel.send(request)
            # The list form gives nothing before NUL; the other channel runs meanwhile.
            for i in range(20):
                d = echo_channel.send(Message(payload(f"echo{i}", 3000)))
                echoes.append(d.addCallback(lambda m, i=i: events.append(("echo", i)) or m))
        fired: list[object] = []
        exchange.addCallback(lambda result: fired.append(result) or events.append(("NUL", 0)))
        await within(exchange, 10)
        await within(defer.gatherResults(echoes), 10)

        expected = [answer_body(n, size) for n, size in enumerate(ANSWER_SIZES)]
        assert len(fired) == 1
        if streamed:
            # Each answer delivered once, in ansno order; the Deferred fires with no list.
            assert streamed_answers == list(enumerate(expected))
            assert fired == [[]]
        else:
            assert [m.body for m in fired[0]] == expected  # type: ignore[union-attr]
        # The NUL comes after every answer, and the echo channel was served meanwhile.
        nul = events.index(("NUL", 0))
        assert [e for e in events[nul:] if e[0] == "ANS"] == []
        assert ("echo", 0) in events[:nul]
        # Answers larger than the window went in fragments, none over the window.
        ans_frames = [f for f in spy.frames if f.kind == ANS]
        assert any(f.more for f in ans_frames)
        assert spy.largest <= WINDOW


# -- a 10 MB message with windows in force -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ten_megabytes_echoed_intact_in_frames_within_the_window(net: Net) -> None:
    config = SessionConfig(max_message_size=16 * MiB)
    assert config.window == WINDOW
    async with net:
        listener = await net.listen([EchoProfile()], config)
        client = await net.connect(listener, config)
        server = server_side(listener, client)
        to_server, to_client = FrameSpy(server), FrameSpy(client)
        channel = await client.start_channel([ECHO_URI])
        body = os.urandom(10 * 1000 * 1000)
        reply = await within(channel.send(Message(body)), 20)
        assert hashlib.sha256(reply.body).digest() == hashlib.sha256(body).digest()
        # RFC 3081 §3.1.2: no frame beyond the 4096-octet window, in either direction.
        for spy in (to_server, to_client):
            assert sum(len(f.payload) for f in spy.frames) > len(body)
            assert len(spy.frames) >= len(body) // WINDOW
            assert spy.largest <= WINDOW


# -- a receiver that stops reading, or stops answering ---------------------------------------


def shrink_send_buffer(session: Session, size: int = 16384) -> None:
    """A small kernel send buffer: once the peer stops reading (its receive buffer is not
    grown then), the kernel soon takes no more, and the rest of what the session writes
    shows in Twisted's buffer. Under TLS the session's transport is still the TCP
    connection: startTLS wraps it in place."""
    tcp: Any = session.transport
    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


@pytest.mark.parametrize("window", [WINDOW, MiB], ids=["window-4096", "window-1MiB"])
@pytest_twisted.ensureDeferred
async def test_receiver_stops_reading_sender_buffers_stay_bounded(net: Net, window: int) -> None:
    config = SessionConfig(window=window, max_message_size=2 * MiB)
    async with net:
        listener = await net.listen([ServedBy(SINK_URI, Sink)], config)
        client = await net.connect(listener, config)
        server = server_side(listener, client)
        channel = await client.start_channel([SINK_URI])
        # A round trip: the receiver's window (its SEQ after the start) is known.
        assert (await channel.send(Message(b"warm-up"))).body == digest(b"warm-up")
        shrink_send_buffer(client)

        # The receiving peer stops reading its socket.
        server.transport.pauseProducing()  # type: ignore[union-attr]
        producer = PushRecorder()
        channel.register_producer(producer)
        bodies = [payload(f"m{i}", MiB) for i in range(16)]
        total = sum(len(b) for b in bodies)
        sampler = Sampler(lambda: write_buffer(client))
        sends = [channel.send(Message(body)) for body in bodies]
        await sleep(0.5)
        largest = sampler.stop()

        # RFC 3081 §3.1: no more than the window leaves the channel unacknowledged, so
        # what the sender's transport buffers is bounded by the window (plus frame and
        # TLS record overhead), not by what the application gave it. The rest waits in
        # the channel, where the application sees it, and its producer was paused.
        bound = window + 64 * 1024
        assert largest < bound, f"{largest} octets in the sender's transport buffer"
        assert channel.queued_bytes > total - bound
        assert producer.events == ["pause"]
        assert not any(d.called for d in sends)
        if window > WINDOW:
            # The kernel's buffers were full: the window, not the kernel, bounded the sender.
            assert largest > 0, "the kernel took everything: the test shows nothing"

        server.transport.resumeProducing()  # type: ignore[union-attr]
        replies = await within(defer.gatherResults(sends), 15)
        assert [r.body for r in replies] == [digest(b) for b in bodies]
        assert producer.events == ["pause", "resume"]
        assert channel.queued_bytes == 0


@pytest_twisted.ensureDeferred
async def test_receiver_stops_answering_requests_held_stay_within_a_window(net: Net) -> None:
    profile = ServedBy(HOLD_URI, Hold)
    async with net:
        listener = await net.listen([profile])
        client = await net.connect(listener)
        channel = await client.start_channel([HOLD_URI])
        (hold,) = profile.handlers
        bodies = [payload(f"m{i}", 1000) for i in range(300)]
        total = sum(len(b) for b in bodies)
        sampler = Sampler(lambda: write_buffer(client))
        sends = [channel.send(Message(body)) for body in bodies]
        await sleep(0.3)
        largest = sampler.stop()

        # Unanswered MSGs stay charged against the receiver's window (RFC 3081 §3.1.4):
        # the peer's application holds about a window's worth, the sender the rest.
        held = sum(len(body) for body, _ in hold.held)
        assert 0 < held <= 2 * WINDOW, f"receiver holds {len(hold.held)} requests, {held} octets"
        assert largest < 64 * 1024
        assert channel.queued_bytes > total - 2 * WINDOW

        hold.release()
        replies = await within(defer.gatherResults(sends), 10)
        assert [r.body for r in replies] == [digest(b) for b in bodies]


# -- refusals over real TCP ---------------------------------------------------------------------


async def exchange_works(channel: Channel, tag: str) -> None:
    """A few echoes, fragmented and in flight together, come back intact."""
    bodies = [payload(f"{tag}{i}", 5000) for i in range(5)]
    replies = await within(defer.gatherResults([channel.send(Message(b)) for b in bodies]), 5)
    assert [r.body for r in replies] == bodies


def local_port(session: Session) -> int:
    return session.transport.getHost().port  # type: ignore[union-attr]


def keepalive_of(session: Session) -> tuple[int, int, int, int]:
    """SO_KEEPALIVE, and the idle time, interval and count of the probes, of the socket."""
    # getHandle() is the TLS connection by now; tcp.Connection keeps the socket as well.
    handle: socket.socket = session.transport.socket  # type: ignore[union-attr]
    return (
        handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux's keepalive options")
@pytest_twisted.ensureDeferred
async def test_a_peer_that_vanished_is_found_out_in_minutes_not_hours(net: Net) -> None:
    """Both ends probe a silent connection after SessionConfig.keepalive (60 s) and give it
    up after 4 unanswered probes over 60 s more, rather than the system's 2 h 11 min: an
    application whose network changed under it may attach again as itself."""
    async with net:
        listener = await net.listen([EchoProfile()])
        initiator = await net.connect(listener)
        [accepted] = listener.sessions
        assert keepalive_of(initiator) == keepalive_of(accepted) == (1, 60, 15, 4)

        # None leaves the system's settings as they were.
        system = socket.socket()
        default_idle = system.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        system.close()
        other = await net.connect(listener, SessionConfig(keepalive=None))
        assert keepalive_of(other)[:2] == (1, default_idle)


@pytest_twisted.ensureDeferred
async def test_session_over_the_per_peer_limit_gets_421(net: Net) -> None:
    async with net:
        listener = await net.listen([EchoProfile()], max_sessions_per_peer=1)
        first = await net.connect(listener)
        channel = await first.start_channel([ECHO_URI])

        # §2.4: instead of its greeting the listener answers ERR 421, then hangs up.
        second = await net.connect_plain(listener)
        port = local_port(second)
        with pytest.raises(BEEPError) as refused:
            await within(second.greeted(), 5)
        assert refused.value.code == 421
        await within(second.when_closed(), 5)
        assert len(net.events("beep.session-refused", port)) == 1
        await exchange_works(channel, "first")

        # The refused connection does not count: once the first session is gone, a new
        # one is welcome.
        first.disconnect()
        await first.when_closed()
        third = await net.connect(listener)
        await exchange_works(await third.start_channel([ECHO_URI]), "third")


@pytest.mark.parametrize(
    "garbage",
    [b"HELLO\r\n\r\n", b"RPY 0 0 . 0 5\r\nhelloXXXXX\r\n", b"\x16\x03\x01\x02\x00\x01" * 50],
    ids=["text", "bad-trailer", "tls-hello-bytes"],
)
@pytest_twisted.ensureDeferred
async def test_garbage_peer_is_cut_off_healthy_session_unaffected(net: Net, garbage: bytes) -> None:
    async with net:
        listener = await net.listen([EchoProfile()])
        healthy = await net.connect(listener)
        channel = await healthy.start_channel([ECHO_URI])
        bodies = [payload(f"h{i}", 20000) for i in range(10)]
        # An exchange in progress while the garbage arrives.
        sends = [channel.send(Message(b)) for b in bodies]
        peer = await net.raw_client(listener, garbage)
        await within(peer.lost, 5)
        # The listener greeted it, then hung up on it without a reply (§2.2.1.1), and
        # said why once.
        assert peer.received.startswith(b"RPY 0 0 . 0 ")
        assert peer.received.endswith(b"END\r\n") and peer.received.count(b"END\r\n") == 1
        (terminated,) = net.events("beep.session-terminated", peer.port)
        assert "poorly formed" in terminated["reason"]
        # The other session never noticed.
        replies = await within(defer.gatherResults(sends), 5)
        assert [r.body for r in replies] == bodies
        await exchange_works(channel, "after")
        assert net.events("beep.session-terminated", local_port(healthy)) == []


@pytest.mark.parametrize(
    "send", [b"", b"RPY 0 0 . 0 200\r\nContent-Type: appl"], ids=["silent", "partial"]
)
@pytest_twisted.ensureDeferred
async def test_peer_that_never_greets_is_dropped_after_the_timeout(net: Net, send: bytes) -> None:
    # Long enough for the healthy session's TLS handshake and greeting on a busy host
    # (0.2 s was not, once, in a CI run with much of the CPU stolen).
    config = SessionConfig(greeting_timeout=1.0)
    async with net:
        listener = await net.listen([EchoProfile()], config)
        healthy = await net.connect(listener, config)
        channel = await healthy.start_channel([ECHO_URI])
        peer = await net.raw_client(listener, send)
        started = reactor.seconds()
        # Not at once, and not never; the reason says it was the greeting's timeout.
        await within(peer.lost, 10)
        assert reactor.seconds() - started >= 0.9
        assert peer.received.startswith(b"RPY 0 0 . 0 ")
        (terminated,) = net.events("beep.session-terminated", peer.port)
        assert "greeting" in terminated["reason"]
        await sleep(1.1)  # past the greeting timeout: the greeted session stays
        await exchange_works(channel, "healthy")


# -- certificates refused ------------------------------------------------------------------


def expired(issue: Callable[..., Any], *args: Any) -> Any:
    """``issue(*args)``, but valid only for ten days that ended twenty days ago."""
    long_ago = datetime.now(UTC) - timedelta(days=30)
    return issue(*args, days=10, valid_from=long_ago)


@pytest.mark.parametrize(
    "case",
    ["expired-server-cert", "client-cert-from-another-ca", "expired-client-cert", "no-client-cert"],
)
@pytest_twisted.ensureDeferred
async def test_bad_certificate_ends_the_session_listener_serves_on(
    net: Net, test_ca: Any, server_cert: Callable[..., Any], case: str
) -> None:
    """RFC 3080 §3.1 / RFC 6125: a certificate that does not verify ends the session at
    the handshake (a wrong name and an unknown CA are in test_tls.py); the listener goes
    on serving good peers."""
    roots = [test_ca.certificate]
    good_server = server_options(server_cert(SERVER_NAME), roots, require_client_cert=True)
    good_client = client_options(SERVER_NAME, roots, issue_client(test_ca, "fred@a.test"))
    server, client = good_server, good_client
    if case == "expired-server-cert":
        server = server_options(expired(issue_server, test_ca, [SERVER_NAME]))
    elif case == "client-cert-from-another-ca":
        other = issue_client(create_ca("somebody else"), "fred@a.test")
        client = client_options(SERVER_NAME, roots, other)
    elif case == "expired-client-cert":
        client = client_options(SERVER_NAME, roots, expired(issue_client, test_ca, "fred@a.test"))
    else:
        client = client_options(SERVER_NAME, roots)
    async with net:
        listener = await net.listen([EchoProfile()], tls=server)
        with pytest.raises(SessionClosed):
            await within(defer.ensureDeferred(net.connect(listener, tls=client)), 5)
        # Both ends are gone, and the listener took no identity from the peer.
        await within(net.sessions[-1].when_closed(), 5)
        await within(listener.sessions[0].when_closed(), 5)
        assert listener.sessions[0].peer_certificate is None
        if case != "expired-server-cert":
            session = await net.connect(listener, tls=good_client)
            await exchange_works(await session.start_channel([ECHO_URI]), "good")
