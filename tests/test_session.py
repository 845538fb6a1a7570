"""Two BEEP sessions talking in memory (twisted.test.iosim) on a task.Clock.

Covers RFC 3080 §2.3-§2.7 as the application sees it (greetings, start, close,
release, numbering, reply order, one-to-many, fragmentation, limits, timeouts)
and RFC 3081 §3 flow control, including backpressure towards the application.
A tap on each session's input records the frames it receives, so tests can
check what went over the wire as well as what the application saw.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

from twisted.internet import defer, interfaces, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from imxp.beep import mgmt
from imxp.beep.frames import ANS, ERR, MSG, NUL, RPY, Frame, FrameParser, SeqFrame
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    NotSent,
    Profile,
    Request,
    Role,
    Session,
    SessionClosed,
    SessionConfig,
    SessionFactory,
    peer_host,
    peer_network,
)

ECHO = "http://example.com/echo"
OTHER = "http://example.com/other"
NOPE = "http://example.com/nope"


class Handler(ChannelHandler):
    """Echoes the body. ``fail`` gets ERR 550, raised; ``refuse`` ERR 553, returned;
    ``boom`` raises a non-BEEP error, ``wrong`` returns what is no answer; ``many`` gets
    three ANS and a NUL, bodies starting ``slow`` wait for the test."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.received: list[bytes] = []
        self.pending: list[defer.Deferred[Message]] = []
        self.closed: list[Failure | None] = []
        self.decline_close = False

    def channel_opened(self, channel: Channel) -> None:
        self.channel = channel

    def message_received(self, request: Request) -> Message | defer.Deferred[Message] | None:
        body = request.message.body
        self.received.append(body)
        if body == b"fail":
            raise BEEPError(550, "nope")
        if body == b"boom":
            raise ValueError("a bug in the profile")
        if body == b"refuse":
            return BEEPError(553, "not this one")  # type: ignore[return-value]
        if body == b"wrong":
            return "a reply, mistaken for a Message"  # type: ignore[return-value]
        if body == b"many":
            for i in range(3):
                request.answer(Message(b"a%d" % i))
            request.done()
            return None
        if body.startswith(b"slow"):
            d: defer.Deferred[Message] = defer.Deferred()
            self.pending.append(d)
            return d
        return Message(body, request.message.content_type)

    def close_requested(self, code: int) -> None:
        if self.decline_close:
            raise BEEPError(550, "still working")

    def channel_closed(self, reason: Failure | None) -> None:
        self.closed.append(reason)


class Eager(Handler):
    """Sends a MSG as soon as its channel is open."""

    def channel_opened(self, channel: Channel) -> None:
        self.channel = channel
        self.first = channel.send(Message(b"hello from the listener"))


class EchoProfile(Profile):
    def __init__(
        self, uri: str = ECHO, offered: bool = True, handler: type[Handler] = Handler
    ) -> None:
        self.uri = uri
        self._offered = offered
        self._handler = handler
        self.inits: list[bytes | None] = []
        self.handlers: list[Handler] = []

    def offered(self, session: Session) -> bool:
        return self._offered

    def start(self, session: Session, channel: Channel, init: bytes | None) -> bytes | None:
        self.inits.append(init)
        handler = self._handler()
        self.handlers.append(handler)
        channel.handler = handler
        return None if init is None else init.upper()


class Tap:
    """Records the frames a session receives: (kind, channel, msgno, more, size, ansno)."""

    def __init__(self, session: Session) -> None:
        self.frames: list[tuple[bytes, int, int, bool, int, int | None]] = []
        self.seqs: list[SeqFrame] = []
        #: (kind, channel, msgno) of each frame and ("SEQ", channel) of each SEQ, in order.
        self.order: list[tuple[object, ...]] = []
        self._parser = FrameParser()
        receive = session.dataReceived

        def tapped(data: bytes) -> None:
            for frame in self._parser.feed(data):
                if isinstance(frame, SeqFrame):
                    self.seqs.append(frame)
                    self.order.append(("SEQ", frame.channel))
                else:
                    self.order.append((frame.kind, frame.channel, frame.msgno))
                    assert isinstance(frame, Frame)
                    self.frames.append(
                        (
                            frame.kind,
                            frame.channel,
                            frame.msgno,
                            frame.more,
                            len(frame.payload),
                            frame.ansno,
                        )
                    )
            receive(data)

        session.dataReceived = tapped  # type: ignore[method-assign]

    def of(self, kind: bytes, channel: int) -> list[tuple[bytes, int, int, bool, int, int | None]]:
        return [f for f in self.frames if f[0] == kind and f[1] == channel]


class Pair:
    """A listener and an initiator connected in memory."""

    def __init__(
        self,
        listener_profiles: Sequence[Profile] = (),
        initiator_profiles: Sequence[Profile] = (),
        listener_config: SessionConfig | None = None,
        initiator_config: SessionConfig | None = None,
        listener: Session | None = None,
        clock: task.Clock | None = None,
    ) -> None:
        self.clock = clock or task.Clock()
        self.L = listener or Session(
            Role.LISTENER, listener_profiles, listener_config, clock=self.clock
        )
        self.I = Session(Role.INITIATOR, initiator_profiles, initiator_config, clock=self.clock)
        self.closed = {"L": False, "I": False}
        for name, session in (("L", self.L), ("I", self.I)):
            session.when_closed().addCallback(lambda _, n=name: self.closed.__setitem__(n, True))
        self.to_L = Tap(self.L)
        self.to_I = Tap(self.I)
        #: greeted() as an application calls it, before anything arrives.
        self.greeted = self.I.greeted()
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.L, lambda: self.I, greet=False
        )
        self.flush()

    @property
    def sent_by_I(self) -> int:
        """Octets the initiator has written that the listener has not read yet."""
        return sum(len(chunk) for chunk in self.pump.clientIO.stream)

    def flush(self, limit: int = 200_000) -> None:
        """Deliver everything written, and the reactor turns a session yields to
        when a read brings many frames (calls due now; the clock does not move)."""
        for _ in range(limit):
            if self.pump.pump(advanceClock=False):
                continue
            now = self.clock.seconds()
            if not any(call.getTime() <= now for call in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("the sessions never went quiet")

    def start(self, *profiles: str | mgmt.ProfileElement, **kwargs: object) -> Channel:
        d = self.I.start_channel(list(profiles), **kwargs)  # type: ignore[arg-type]
        self.flush()
        return result(d)


def result(d: defer.Deferred[object]) -> object:
    """The result of a Deferred that must have fired successfully."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure(d: defer.Deferred[object], kind: type[Exception] = BEEPError) -> Exception:
    """The exception of a Deferred that must have failed with ``kind``."""
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    assert isinstance(box[0], Failure), box[0]
    assert box[0].check(kind), box[0]
    return box[0].value


def echo_pair(**kwargs: object) -> tuple[Pair, EchoProfile, Channel]:
    profile = EchoProfile()
    pair = Pair([profile], **kwargs)  # type: ignore[arg-type]
    channel = pair.start(ECHO)
    return pair, profile, channel


def raw_start(pair: Pair, number: int, uri: str = ECHO) -> defer.Deferred[Message]:
    """A start element sent as is on channel zero, bypassing the session's numbering."""
    start = mgmt.Start(number, (mgmt.ProfileElement(uri),))
    return pair.I.channels[0].send(Message(start.to_xml().encode(), mgmt.BEEP_XML))


# -- greetings and start (§2.3.1.1, §2.3.1.2) -------------------------------------------


def test_greetings_both_ways():
    pair = Pair(
        [EchoProfile(), EchoProfile(OTHER), EchoProfile(NOPE, offered=False)],
        [EchoProfile("http://example.com/callback")],
        listener_config=SessionConfig(features=("x-feature",), localize=("fr", "en")),
        initiator_config=SessionConfig(localize=("de",)),
    )
    assert pair.I.peer_greeting == mgmt.Greeting((ECHO, OTHER), ("x-feature",), ("fr", "en"))
    assert pair.L.peer_greeting == mgmt.Greeting(("http://example.com/callback",), (), ("de",))
    assert result(pair.I.greeted()) is pair.I.peer_greeting
    # Both greetings are RPY 0 0 and nothing else came first.
    assert pair.to_I.frames[0][:3] == (RPY, 0, 0)
    assert pair.to_L.frames[0][:3] == (RPY, 0, 0)


def test_start_picks_first_supported_profile_of_the_request():
    first, second = EchoProfile(ECHO), EchoProfile(OTHER)
    pair = Pair([first, second])
    channel = pair.start(NOPE, OTHER, ECHO)
    assert channel.number == 1 and channel.profile == OTHER
    assert pair.L.channels[1].profile == OTHER
    assert len(second.handlers) == 1 and first.handlers == []
    # Initiators number channels with odd numbers.
    assert pair.start(ECHO).number == 3


def test_piggybacked_init_both_ways():
    listener_side, initiator_side = EchoProfile(), EchoProfile()
    pair = Pair([listener_side], [initiator_side])
    channel = pair.start(mgmt.ProfileElement(NOPE), mgmt.ProfileElement(ECHO, b"hi"))
    assert listener_side.inits == [b"hi"] and channel.start_reply == b"HI"
    # The listener starts a channel towards the initiator: even-numbered.
    d = pair.L.start_channel([mgmt.ProfileElement(ECHO, b"<hello/>")])
    pair.flush()
    back = result(d)
    assert back.number == 2 and back.start_reply == b"<HELLO/>"
    assert initiator_side.inits == [b"<hello/>"]
    d = back.send(Message(b"ping"))
    pair.flush()
    assert result(d).body == b"ping"
    # Without init, no piggybacked reply.
    assert pair.start(ECHO).start_reply is None


def test_server_name_recorded_from_first_successful_start_only():
    pair = Pair([EchoProfile()])
    d = pair.I.start_channel([NOPE], server_name="wrong.example")
    pair.flush()
    assert failure(d).code == 550
    assert pair.L.server_name is None and pair.I.server_name is None
    pair.start(ECHO, server_name="relay.a.example")
    assert pair.L.server_name == "relay.a.example"
    assert pair.I.server_name == "relay.a.example"
    pair.start(ECHO, server_name="relay.b.example")
    assert pair.L.server_name == "relay.a.example"
    assert pair.I.server_name == "relay.a.example"


def test_server_name_of_a_later_start_counts_for_nothing():
    """RFC 3080 §2.3.1.2: only the first successful start's serverName is meaningful;
    when it had none, a later one is neither asked about nor recorded."""
    pair = Pair([EchoProfile()])
    asked: list[str] = []

    def refuse(name: str) -> bool:
        asked.append(name)
        return False

    pair.L.accept_server_name = refuse
    pair.start(ECHO)
    pair.start(ECHO, server_name="relay.b.example")
    assert (pair.L.server_name, pair.I.server_name, asked) == (None, None, [])


def test_refused_server_name_gives_550():
    profile = EchoProfile()
    pair = Pair([profile])
    pair.L.accept_server_name = lambda name: name == "relay.a.example"
    d = pair.I.start_channel([ECHO], server_name="relay.b.example")
    pair.flush()
    assert failure(d).code == 550
    assert profile.handlers == [] and pair.L.server_name is None
    assert set(pair.L.channels) == {0} and set(pair.I.channels) == {0}
    pair.start(ECHO, server_name="relay.a.example")
    assert pair.L.server_name == "relay.a.example"


def test_start_refused_unknown_profile():
    pair = Pair([EchoProfile()])
    d = pair.I.start_channel([NOPE, OTHER])
    pair.flush()
    error = failure(d)
    assert error.code == 550 and "unsupported" in error.text
    assert set(pair.I.channels) == {0} and set(pair.L.channels) == {0}
    # A profile the listener has but doesn't offer now is refused the same way.
    hidden = Pair([EchoProfile(NOPE, offered=False)])
    d = hidden.I.start_channel([NOPE])
    hidden.flush()
    assert failure(d).code == 550


def test_start_refused_wrong_parity():
    pair = Pair([EchoProfile()])
    d = raw_start(pair, 2)
    pair.flush()
    error = failure(d)
    assert error.code == 501 and "odd" in error.text
    assert set(pair.L.channels) == {0}
    # And a listener may not ask an initiator for an odd channel.
    back = Pair([], [EchoProfile()])
    start = mgmt.Start(1, (mgmt.ProfileElement(ECHO),))
    d = back.L.channels[0].send(Message(start.to_xml().encode(), mgmt.BEEP_XML))
    back.flush()
    error = failure(d)
    assert error.code == 501 and "even" in error.text


def test_start_refused_channel_in_use():
    pair, profile, channel = echo_pair()
    d = raw_start(pair, 1)
    pair.flush()
    assert failure(d).code == 550
    assert len(profile.handlers) == 1
    d = channel.send(Message(b"still mine"))
    pair.flush()
    assert result(d).body == b"still mine"


def test_start_refused_over_max_channels():
    profile = EchoProfile()
    pair = Pair([profile], listener_config=SessionConfig(max_channels=2))
    pair.start(ECHO)
    pair.start(ECHO)
    d = pair.I.start_channel([ECHO])
    pair.flush()
    assert failure(d).code == 550
    assert len(profile.handlers) == 2 and set(pair.L.channels) == {0, 1, 3}


# -- exchanges (§2.1.1, §2.6) -----------------------------------------------------------


def test_msgnos_and_rpy_err():
    pair, _profile, channel = echo_pair()
    replies = [channel.send(Message(body)) for body in (b"one", b"fail", b"three")]
    pair.flush()
    assert [(k, m) for k, _, m, *_ in pair.to_L.of(MSG, 1)] == [(MSG, 0), (MSG, 1), (MSG, 2)]
    assert [(f[0], f[2]) for f in pair.to_I.frames if f[1] == 1] == [
        (RPY, 0),
        (ERR, 1),
        (RPY, 2),
    ]
    assert result(replies[0]).body == b"one"
    error = failure(replies[1])
    assert (error.code, error.text) == (550, "nope")
    assert result(replies[2]).body == b"three"
    # Channel zero's msgno 0 is the greeting: the first start is MSG 0 1.
    assert pair.to_L.of(MSG, 0)[0][2] == 1


def test_profile_exception_gives_451_and_session_goes_on():
    pair, _profile, channel = echo_pair()
    with capturedLogs() as events:
        d = channel.send(Message(b"boom"))
        pair.flush()
    assert failure(d).code == 451
    assert any(e.get("event") == "beep.profile-failure" for e in events)
    assert not pair.closed["L"] and not pair.closed["I"]
    d = channel.send(Message(b"after"))
    pair.flush()
    assert result(d).body == b"after"
    assert pair.start(ECHO).number == 3


def test_a_profile_may_return_its_error_and_one_that_answers_wrongly_gives_451():
    """A BEEPError returned is an ERR as one raised is; anything else a profile returns is
    its fault, not the peer's: ERR 451, logged, and the session goes on."""
    pair, profile, channel = echo_pair()
    with capturedLogs() as events:
        refused, wrong = channel.send(Message(b"refuse")), channel.send(Message(b"wrong"))
        slow = channel.send(Message(b"slow"))
        pair.flush()
        profile.handlers[0].pending[0].callback(BEEPError(554, "later"))  # type: ignore[arg-type]
        pair.flush()
    errors = [failure(d) for d in (refused, wrong, slow)]
    assert [(e.code, e.text) for e in errors] == [  # type: ignore[attr-defined]
        (553, "not this one"),
        (451, "local error in processing"),
        (554, "later"),
    ]
    [fault] = [e for e in events if e.get("event") == "beep.profile-failure"]
    assert "answered with str" in str(fault["log_failure"].value)
    assert not pair.closed["L"] and not pair.closed["I"]
    after = channel.send(Message(b"after"))
    pair.flush()
    assert result(after).body == b"after"  # type: ignore[attr-defined]


def test_replies_go_in_msg_order_whatever_order_they_complete():
    pair, profile, channel = echo_pair()
    handler = profile.handlers[0]
    order: list[int] = []
    replies = [channel.send(Message(b"slow%d" % i)) for i in range(3)]
    for i, d in enumerate(replies):
        d.addCallback(lambda message, i=i: order.append(i) or message)
    pair.flush()
    assert len(handler.pending) == 3
    # The profile completes the last first: nothing may go before the first reply.
    handler.pending[2].callback(Message(b"r2"))
    pair.flush()
    handler.pending[1].callback(Message(b"r1"))
    pair.flush()
    assert order == [] and pair.to_I.of(RPY, 1) == []
    handler.pending[0].callback(Message(b"r0"))
    pair.flush()
    assert order == [0, 1, 2]
    assert [f[2] for f in pair.to_I.of(RPY, 1)] == [0, 1, 2]
    assert [result(d).body for d in replies] == [b"r0", b"r1", b"r2"]


def test_one_to_many_answers_then_nul():
    pair, _profile, channel = echo_pair()
    d = channel.send(Message(b"many"))
    pair.flush()
    assert [m.body for m in result(d)] == [b"a0", b"a1", b"a2"]
    assert [(f[0], f[5]) for f in pair.to_I.frames if f[1] == 1] == [
        (ANS, 0),
        (ANS, 1),
        (ANS, 2),
        (NUL, None),
    ]
    seen: list[tuple[bytes, int]] = []
    d = channel.send(Message(b"many"), on_answer=lambda m, n: seen.append((m.body, n)))
    pair.flush()
    assert result(d) == [] and seen == [(b"a0", 0), (b"a1", 1), (b"a2", 2)]


def test_answers_wait_behind_an_earlier_reply():
    pair, profile, channel = echo_pair()
    first = channel.send(Message(b"slow"))
    many = channel.send(Message(b"many"))
    pair.flush()
    assert not many.called and pair.to_I.of(ANS, 1) == []
    profile.handlers[0].pending[0].callback(Message(b"done"))
    pair.flush()
    assert result(first).body == b"done"
    assert [m.body for m in result(many)] == [b"a0", b"a1", b"a2"]
    assert [f[0] for f in pair.to_I.frames if f[1] == 1] == [RPY, ANS, ANS, ANS, NUL]


def _burst(pair: Pair, channel: Channel, count: int) -> list[defer.Deferred[Message]]:
    """``count`` MSGs reaching the listener in one read."""
    pair.I.pauseProducing()
    replies = [channel.send(Message(b"m%d" % i)) for i in range(count)]
    pair.I.resumeProducing()
    return replies


def test_a_read_of_many_frames_is_answered_a_slice_at_a_time():
    # The replies to the first frames leave before the rest is processed, so the peer
    # works on them meanwhile instead of the two taking turns.
    pair, profile, channel = echo_pair(
        listener_config=SessionConfig(window=65536, frames_per_turn=4)
    )
    replies = _burst(pair, channel, 10)
    pair.pump.pump(advanceClock=False)
    written = FrameParser().feed(b"".join(pair.pump.serverIO.stream))
    assert [f.kind for f in written if isinstance(f, Frame)] == [RPY] * 4
    assert profile.handlers[0].received == [b"m0", b"m1", b"m2", b"m3"]
    pair.flush()
    assert [result(d).body for d in replies] == [b"m%d" % i for i in range(10)]


def test_a_read_handed_over_in_pieces_is_still_answered_a_slice_at_a_time():
    # TLS passes a large read on one record at a time, all in one reactor turn, and a
    # record holds fewer frames than a slice: the slice counts across the pieces.
    pair, profile, channel = echo_pair(
        listener_config=SessionConfig(window=65536, frames_per_turn=4)
    )
    replies = _burst(pair, channel, 6)
    stream = pair.pump.clientIO.stream
    read = b"".join(stream)
    stream.clear()
    cut = len(read) // 2
    cut = read.index(b"END\r\n", cut) + 5
    pair.L.dataReceived(read[:cut])
    pair.L.dataReceived(read[cut:])
    assert profile.handlers[0].received == [b"m0", b"m1", b"m2", b"m3"]
    pair.flush()
    assert [result(d).body for d in replies] == [b"m%d" % i for i in range(6)]


def test_frames_waiting_for_their_turn_die_with_the_connection():
    pair, profile, channel = echo_pair(
        listener_config=SessionConfig(window=65536, frames_per_turn=4)
    )
    replies = _burst(pair, channel, 10)
    pair.pump.pump(advanceClock=False)
    pair.L.transport.loseConnection()
    pair.flush()
    # Only the first slice was acted on; the MSGs after it fail with the session.
    assert profile.handlers[0].received == [b"m0", b"m1", b"m2", b"m3"]
    assert [result(d).body for d in replies[:4]] == [b"m0", b"m1", b"m2", b"m3"]
    assert all(failure(d, SessionClosed) for d in replies[4:])


# -- fragmentation and limits (§2.2, §2.6.3, RFC 3081 §3.1.2) ----------------------------


def test_large_message_fragmented_under_the_default_window():
    pair, profile, channel = echo_pair()
    body = os.urandom(200 * 1024)
    d = channel.send(Message(body, "application/octet-stream"))
    pair.flush()
    reply = result(d)
    assert reply.body == body and reply.content_type == "application/octet-stream"
    assert profile.handlers[0].received == [body]
    frames = pair.to_L.of(MSG, 1)
    assert len(frames) > 200 * 1024 // 4096
    assert all(size <= 4096 for *_, size, _ in frames)
    assert [f[3] for f in frames] == [True] * (len(frames) - 1) + [False]


def test_a_message_waits_for_the_window_rather_than_being_cut_to_fit():
    # 64 MSGs of 1 KiB are more than a 64 KiB window: the last ones wait for the
    # listener's SEQ and go whole, in both directions (RFC 1122 §4.2.3.4).
    big = SessionConfig(window=65536)
    pair, profile, channel = echo_pair(listener_config=big, initiator_config=big)
    pair.flush()
    bodies = [os.urandom(1024) for _ in range(64)]
    pair.I.pauseProducing()
    replies = [channel.send(Message(body)) for body in bodies]
    pair.I.resumeProducing()
    pair.flush()
    assert [result(d).body for d in replies] == bodies
    assert profile.handlers[0].received == bodies
    for frames in (pair.to_L.of(MSG, 1), pair.to_I.of(RPY, 1)):
        size = frames[0][4]
        assert size > 1024 and [(f[3], f[4]) for f in frames] == [(False, size)] * 64


def test_replies_go_ahead_of_msgs_not_yet_begun():
    """A peer that has pipelined more MSGs than the window takes still answers the other
    side's MSGs at once, behind only the message it has begun (RFC 3080 §2.2.1) and in
    their order (§2.6.1): queued behind its own MSGs, the replies would wait for the
    peer to answer those, and a pipelining client owed its relay replies without bound."""
    profile = EchoProfile()
    pair = Pair([profile])
    d = pair.I.start_channel([ECHO], handler=Handler())
    pair.flush()
    channel = result(d)
    bodies = [bytes([65 + n]) * 6000 for n in range(4)]  # each more than the window
    replies = [channel.send(Message(body)) for body in bodies]
    listener = profile.handlers[0].channel
    pings = [listener.send(Message(b"ping %d" % n)) for n in range(2)]

    pair.flush()

    order = [frame for frame in pair.to_L.order if frame[:2] != ("SEQ", 1) and frame[1] == 1]
    assert order == [
        (MSG, 1, 0),  # begun before the pings arrived: finished first
        (MSG, 1, 0),
        (RPY, 1, 0),
        (RPY, 1, 1),
        *[(MSG, 1, msgno) for msgno in (1, 1, 2, 2, 3, 3)],
    ]
    assert [result(ping).body for ping in pings] == [b"ping 0", b"ping 1"]
    assert [result(reply).body for reply in replies] == bodies


def test_ten_megabyte_message():
    config = SessionConfig(max_message_size=16 << 20)
    pair, profile, channel = echo_pair(listener_config=config, initiator_config=config)
    body = os.urandom(10 << 20)
    d = channel.send(Message(body))
    pair.flush()
    assert result(d).body == body
    assert profile.handlers[0].received[0] == body
    assert all(f[4] <= 4096 for f in pair.to_L.of(MSG, 1))


def test_long_messages_on_more_channels_than_max_long_messages_all_arrive_whole():
    """Messages of max_message_size on twice max_long_messages channels at once: each
    arrives whole, and the listener never holds more of them unfinished than
    max_long_messages beyond a window per channel, the others waiting their turn
    (RFC 3081 §3.1) rather than stalling for good."""
    config = SessionConfig(max_message_size=256 * 1024)
    # The echo's reply has a Content-Type header more: the initiator takes larger ones.
    pair = Pair([EchoProfile()], listener_config=config)
    channels = [pair.start(ECHO) for _ in range(2 * config.max_long_messages)]
    size = config.max_message_size - len(Message().to_payload())
    bodies = [os.urandom(size) for _ in channels]
    replies = [channel.send(Message(body)) for channel, body in zip(channels, bodies, strict=True)]
    pair.flush()
    assert [result(d).body for d in replies] == bodies
    held = dict.fromkeys([c.number for c in channels], 0)
    peak = 0
    for kind, number, _msgno, more, octets, _ in pair.to_L.frames:
        if kind == MSG and number:
            held[number] = held[number] + octets if more else 0
            peak = max(peak, sum(held.values()))
    budget = config.max_long_messages * config.max_message_size
    assert config.max_message_size < peak <= budget + len(channels) * config.window


def test_message_over_the_limit_gets_pre_emptive_554():
    config = SessionConfig(max_message_size=100_000)
    pair, profile, channel = echo_pair(listener_config=config)
    with capturedLogs() as events:
        d = channel.send(Message(b"x" * 300_000))
        pair.flush()
    error = failure(d)
    assert error.code == 554
    assert any(e.get("event") == "beep.message-too-large" for e in events)
    assert profile.handlers[0].received == []
    frames = pair.to_L.of(MSG, 1)
    # §2.6.3: told early, the sender ends the message with an empty final frame.
    assert frames[-1][3:5] == (False, 0)
    assert sum(f[4] for f in frames) < 200_000
    # The channel goes on with the next message.
    d = channel.send(Message(b"small"))
    pair.flush()
    assert result(d).body == b"small"
    assert not pair.closed["L"]


def test_seq_frames_grow_the_peers_window():
    big = SessionConfig(window=65536)
    pair, _profile, channel = echo_pair(listener_config=big, initiator_config=big)
    body = os.urandom(300_000)
    d = channel.send(Message(body))
    pair.flush()
    assert result(d).body == body
    # Each side advertised 64K on the channel, after the reply that created it.
    assert any(s.channel == 1 and s.window == 65536 for s in pair.to_I.seqs)
    assert any(s.channel == 1 and s.window == 65536 for s in pair.to_L.seqs)
    # RFC 3081 §3.1.1: the listener's SEQ for the new channel follows the reply
    # that creates it (before it, the initiator would have to drop it).
    order = pair.to_I.order
    created = order.index((RPY, 0, 1))
    assert all(i > created for i, item in enumerate(order) if item == ("SEQ", 1))
    # So frames bigger than the initial 4096 flowed both ways.
    assert max(f[4] for f in pair.to_L.of(MSG, 1)) > 4096
    assert max(f[4] for f in pair.to_I.of(RPY, 1)) > 4096
    assert len(pair.to_L.of(MSG, 1)) < 300_000 // 4096


def test_channels_interleave_fairly():
    # Windows large enough for many frames at once: the order is the session's choice.
    pair = Pair(
        [EchoProfile()],
        listener_config=SessionConfig(window=65536),
        initiator_config=SessionConfig(frame_size=4096),
    )
    first, second = pair.start(ECHO), pair.start(ECHO)
    bodies = {1: os.urandom(100_000), 3: os.urandom(100_000)}
    # Both are ready at once (the transport was busy while the application sent).
    pair.flush()
    pair.I.pauseProducing()
    replies = {n: c.send(Message(bodies[n])) for n, c in ((1, first), (3, second))}
    pair.I.resumeProducing()
    pair.flush()
    assert {n: result(d).body for n, d in replies.items()} == bodies
    order = [f[1] for f in pair.to_L.frames if f[0] == MSG and f[1] in (1, 3)]
    last = {n: len(order) - 1 - order[::-1].index(n) for n in (1, 3)}
    firsts = {n: order.index(n) for n in (1, 3)}
    # Both progress: each starts before the other finishes, no long runs of one.
    assert firsts[1] < last[3] and firsts[3] < last[1]
    assert max(len(list(run)) for _, run in itertools.groupby(order)) <= 2


# -- close (§2.3.1.3) and release (§2.4) ------------------------------------------------


def test_close_waits_for_outstanding_replies():
    pair, profile, channel = echo_pair()
    handler = profile.handlers[0]
    own = Handler()
    channel.handler = own
    reply = channel.send(Message(b"slow"))
    pair.flush()
    closing = channel.close()
    pair.flush()
    # §2.3.1.3: no close while a MSG we sent is unanswered.
    assert not closing.called and pair.to_L.of(MSG, 0)[-1][2] == 1
    handler.pending[0].callback(Message(b"finally"))
    pair.flush()
    assert result(reply).body == b"finally"
    assert result(closing) is None
    assert 1 not in pair.I.channels and 1 not in pair.L.channels
    assert handler.closed == [None] and own.closed == [None]
    assert isinstance(failure(channel.send(Message(b"late")), NotSent), NotSent)


def test_close_goes_after_the_last_frame_of_the_reply_that_made_the_channel_idle():
    # §2.3.1.3: the listener closes its channel once it is idle, its reply to the
    # initiator's MSG sent. When the reply's last frame and the close leave in one
    # write, the close must follow it: ahead of it, the initiator would be asked to
    # close a channel on which it still awaits a reply.
    pair, profile, channel = echo_pair()
    reply = channel.send(Message(b"slow"))
    pair.flush()
    body = b"r" * 20_000
    pair.L.pauseProducing()
    profile.handlers[0].pending[0].callback(Message(body))
    closing = pair.L.channels[1].close()
    pair.L.resumeProducing()
    pair.flush()
    assert result(reply).body == body
    assert result(closing) is None and 1 not in pair.I.channels
    order = pair.to_I.order
    last_rpy = max(i for i, f in enumerate(order) if f[:2] == (RPY, 1))
    close = min(i for i, f in enumerate(order) if f[:2] == (MSG, 0))
    assert last_rpy < close


def test_close_crossing_a_msg_from_the_other_side():
    pair = Pair([EchoProfile()], [EchoProfile()])
    theirs = result(_flushed(pair, pair.L.start_channel([ECHO])))
    mine = pair.I.channels[theirs.number]
    assert isinstance(mine.handler, Handler)
    # The listener's MSG and the initiator's close cross on the wire.
    reply = theirs.send(Message(b"slow"))
    closing = mine.close()
    pair.flush()
    # The listener got close with its own MSG unanswered: it waits.
    assert not closing.called and theirs.number in pair.L.channels
    mine.handler.pending[0].callback(Message(b"answered"))
    pair.flush()
    assert result(reply).body == b"answered"
    assert result(closing) is None
    assert theirs.number not in pair.L.channels and theirs.number not in pair.I.channels


def test_both_peers_close_a_channel_at_once():
    pair, profile, channel = echo_pair()
    own = Handler()
    channel.handler = own
    theirs = pair.L.channels[1]
    # The two closes cross: each peer answers the other's with ok (§2.3.1.3).
    mine_closing, theirs_closing = channel.close(), theirs.close()
    pair.flush()
    assert result(mine_closing) is None and result(theirs_closing) is None
    # Each handler hears of it once.
    assert own.closed == [None] and profile.handlers[0].closed == [None]
    assert 1 not in pair.I.channels and 1 not in pair.L.channels
    assert pair.closed == {"L": False, "I": False}
    again = pair.start(ECHO)
    assert again.number == 1
    d = again.send(Message(b"new channel 1"))
    pair.flush()
    assert result(d).body == b"new channel 1"


def test_listener_profile_may_send_as_soon_as_its_channel_opens():
    profile = EchoProfile(handler=Eager)
    pair = Pair([profile])
    with capturedLogs() as events:
        d = pair.I.start_channel([ECHO], handler=Handler())
        pair.flush()
    channel = result(d)
    assert not any(e.get("event") == "beep.session-terminated" for e in events)
    # The MSG follows the reply that tells the initiator the channel exists.
    order = pair.to_I.order
    assert order.index((RPY, 0, 1)) < order.index((MSG, 1, 0))
    assert channel.handler.received == [b"hello from the listener"]
    assert result(profile.handlers[0].first).body == b"hello from the listener"


def _flushed(pair: Pair, d: defer.Deferred[object]) -> defer.Deferred[object]:
    pair.flush()
    return d


def test_close_declined_keeps_the_channel():
    pair, profile, channel = echo_pair()
    profile.handlers[0].decline_close = True
    closing = channel.close()
    pair.flush()
    error = failure(closing)
    assert (error.code, error.text) == (550, "still working")
    assert 1 in pair.I.channels and 1 in pair.L.channels
    d = channel.send(Message(b"still open"))
    pair.flush()
    assert result(d).body == b"still open"
    profile.handlers[0].decline_close = False
    closing = channel.close()
    pair.flush()
    assert result(closing) is None and 1 not in pair.L.channels


def test_release_closes_both_connections():
    pair, profile, channel = echo_pair()
    released = pair.I.close()
    pair.flush()
    assert result(released) is None
    assert pair.closed == {"L": True, "I": True}
    assert len(profile.handlers[0].closed) == 1
    # §2.4: release is "close" of channel zero, answered with "ok".
    assert [f[:3] for f in pair.to_I.frames][-1] == (RPY, 0, 2)
    assert failure(channel.send(Message(b"late")), SessionClosed)
    assert failure(pair.I.start_channel([ECHO]), SessionClosed)
    assert failure(pair.I.close(), SessionClosed)


def test_release_waits_for_busy_channels():
    pair, profile, channel = echo_pair()
    reply = channel.send(Message(b"slow"))
    pair.flush()
    released = pair.I.close()
    pair.flush()
    assert not released.called and not pair.closed["I"]
    profile.handlers[0].pending[0].callback(Message(b"ok"))
    pair.flush()
    assert result(reply).body == b"ok" and result(released) is None
    assert pair.closed == {"L": True, "I": True}


def test_a_msg_sent_while_the_peer_releases_the_session_is_known_never_written():
    # A relay shutting down releases its endpoints' sessions (§2.4). Data the endpoint
    # sends meanwhile is not written: NotSent, so the client sends it again on its next
    # session, rather than taking it for the relay's refusal of it (it was a 550).
    pair, profile, channel = echo_pair()
    pair.L.close()
    # Sent before the release reaches us, and answered only after it has.
    reply = channel.send(Message(b"slow"))
    pair.flush()
    assert not pair.closed["I"]
    assert isinstance(failure(channel.send(Message(b"late")), NotSent), NotSent)
    profile.handlers[0].pending[0].callback(Message(b"ok"))
    pair.flush()
    assert result(reply).body == b"ok"
    assert pair.closed == {"L": True, "I": True}


def test_release_declined():
    pair, profile, channel = echo_pair()
    profile.handlers[0].decline_close = True
    released = pair.I.close()
    pair.flush()
    assert failure(released).code == 550
    assert pair.closed == {"L": False, "I": False}
    d = channel.send(Message(b"still here"))
    pair.flush()
    assert result(d).body == b"still here"
    assert pair.start(ECHO).number == 3


# -- timers -----------------------------------------------------------------------------


def test_greeting_timeout_aborts_the_session():
    clock = task.Clock()
    session = Session(Role.LISTENER, [EchoProfile()], clock=clock)
    silent = Protocol()
    _, _, pump = iosim.connectedServerAndClient(lambda: session, lambda: silent, greet=False)
    pump.flush()
    greeted = session.greeted()
    closed = session.when_closed()
    clock.advance(29)
    pump.flush()
    assert not closed.called
    with capturedLogs() as events:
        clock.advance(1)
    pump.flush()
    assert closed.called
    assert any(e.get("event") == "beep.session-terminated" for e in events)
    failure(greeted, SessionClosed)


def test_idle_timeout_closes_an_idle_session():
    config = SessionConfig(idle_timeout=60)
    pair, _profile, _channel = echo_pair(listener_config=config)
    pair.clock.advance(59)
    pair.flush()
    assert not pair.closed["L"]
    with capturedLogs() as events:
        pair.clock.advance(2)
        pair.flush()
    assert pair.closed == {"L": True, "I": True}
    assert any(e.get("event") == "beep.idle-timeout" for e in events)


def test_idle_timeout_spares_a_busy_session():
    config = SessionConfig(idle_timeout=60)
    pair, profile, channel = echo_pair(listener_config=config)
    reply = channel.send(Message(b"slow"))
    pair.flush()
    pair.clock.advance(200)
    pair.flush()
    assert not pair.closed["L"]
    profile.handlers[0].pending[0].callback(Message(b"done"))
    pair.flush()
    assert result(reply).body == b"done"
    pair.clock.advance(61)
    pair.flush()
    assert pair.closed["L"]


def test_idle_timeout_spares_a_session_its_profile_keeps_open():
    """An application attached and waiting for data is quiet, not idle."""
    config = SessionConfig(idle_timeout=60)
    pair, profile, _channel = echo_pair(listener_config=config)
    handler = profile.handlers[0]
    handler.keeps_session_open = lambda: True  # type: ignore[method-assign]
    pair.clock.advance(300)
    pair.flush()
    assert not pair.closed["L"]
    handler.keeps_session_open = lambda: False  # type: ignore[method-assign]
    pair.clock.advance(61)
    pair.flush()
    assert pair.closed["L"]


def test_activity_postpones_the_idle_timeout():
    config = SessionConfig(idle_timeout=60)
    pair, _profile, channel = echo_pair(listener_config=config)
    for _ in range(5):
        pair.clock.advance(40)
        d = channel.send(Message(b"tick"))
        pair.flush()
        result(d)
    assert not pair.closed["L"]


# -- sessions per peer (§2.4 refusal) --------------------------------------------------------


def test_sessions_per_peer_limit_refuses_with_421():
    clock = task.Clock()
    factory = SessionFactory(Role.LISTENER, [EchoProfile()], clock=clock, max_sessions_per_peer=1)
    peer = IPv4Address("TCP", "192.0.2.9", 5000)
    first = Pair(listener=factory.buildProtocol(peer), clock=clock)
    assert first.I.peer_greeting is not None
    with capturedLogs() as events:
        second = Pair(listener=factory.buildProtocol(peer), clock=clock)
    error = failure(second.greeted)
    assert error.code == 421
    assert second.closed == {"L": True, "I": True}
    # An application that asks only now still learns why (§2.4).
    assert failure(second.I.greeted()).code == 421
    assert failure(second.I.start_channel([ECHO])).code == 421
    assert second.to_I.frames == [(ERR, 0, 0, False, second.to_I.frames[0][4], None)]
    kinds = {e.get("event") for e in events}
    assert {"beep.session-refused", "beep.session-refused-by-peer"} <= kinds
    # Another address is welcome meanwhile, and so is this one once the first is gone.
    other = Pair(listener=factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1)), clock=clock)
    assert other.I.peer_greeting is not None
    result(_flushed(first, first.I.close()))
    third = Pair(listener=factory.buildProtocol(peer), clock=clock)
    assert third.I.peer_greeting is not None


def test_peers_are_counted_by_ipv4_address_or_ipv6_64():
    """A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; they count as the IPv4
    address. An IPv6 host may use any address of its /64, so the /64 is one peer."""
    clock = task.Clock()
    factory = SessionFactory(Role.LISTENER, [EchoProfile()], clock=clock, max_sessions_per_peer=1)

    def greeted(address: IPv4Address | IPv6Address) -> bool:
        pair = Pair(listener=factory.buildProtocol(address), clock=clock)
        return pair.I.peer_greeting is not None

    assert greeted(IPv4Address("TCP", "192.0.2.9", 5000))
    assert not greeted(IPv6Address("TCP", "::ffff:192.0.2.9", 5001))
    assert greeted(IPv6Address("TCP", "2001:db8:1:2::a", 5000))
    assert not greeted(IPv6Address("TCP", "2001:db8:1:2:ffff::b", 5000))
    assert greeted(IPv6Address("TCP", "2001:db8:1:3::a", 5000))


def test_peer_is_shown_as_logs_and_limits_need_it():
    assert peer_host(IPv6Address("TCP", "::ffff:192.0.2.9", 1)) == "192.0.2.9"
    assert peer_host(IPv6Address("TCP", "2001:db8::1", 1)) == "2001:db8::1"
    assert peer_host(IPv4Address("TCP", "192.0.2.9", 1)) == "192.0.2.9"
    assert peer_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert peer_network("fe80::1%eth0") == "fe80::/64"
    assert peer_network("192.0.2.9") == "192.0.2.9"
    listener = Session(Role.LISTENER, [EchoProfile()], clock=task.Clock())
    iosim.connectedServerAndClient(
        lambda: listener,
        lambda: Session(Role.INITIATOR, (), clock=task.Clock()),
        serverTransportFactory=lambda p: iosim.FakeTransport(
            p, True, peerAddress=IPv6Address("TCP", "2001:db8::7", 4711)
        ),
        greet=False,
    )
    # With the port after a colon, an IPv6 address needs brackets to be read back.
    assert (listener.peer, listener.peer_host) == ("[2001:db8::7]:4711", "2001:db8::7")


# -- loss of the session -------------------------------------------------------------------


def test_pending_sends_fail_when_the_connection_drops():
    pair, profile, channel = echo_pair()
    waiting = channel.send(Message(b"slow"))
    pair.flush()
    queued = channel.send(Message(os.urandom(50_000)))
    starting = pair.I.start_channel([ECHO])
    assert channel.queued_bytes > 0 and not starting.called
    pair.L.transport.loseConnection()
    pair.flush()
    assert pair.closed == {"L": True, "I": True}
    failure(waiting, SessionClosed)
    failure(queued, SessionClosed)
    failure(starting, SessionClosed)
    assert channel.queued_bytes == 0
    reason = profile.handlers[0].closed
    assert len(reason) == 1 and reason[0] is not None and reason[0].check(SessionClosed)
    failure(channel.send(Message(b"after")), SessionClosed)
    # A late reply from the profile is dropped quietly.
    profile.handlers[0].pending[0].callback(Message(b"too late"))


# -- backpressure (RFC 3081 §3.1.4) -----------------------------------------------------------


@implementer(interfaces.IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_sender_is_bounded_by_the_window_when_the_peer_does_not_read():
    pair, profile, channel = echo_pair()
    producer = Producer()
    channel.register_producer(producer)
    high = pair.I.config.send_high_water
    body = b"m" * 10_240
    replies = []
    for _ in range(1000):
        replies.append(channel.send(Message(body)))
        # Paused exactly when the queue first passes the high-water mark.
        assert producer.events == (["pause"] if channel.queued_bytes > high else [])
    # Not pumped: only one window's worth of payload went to the transport.
    written = pair.sent_by_I
    assert 4096 < written <= 4096 + 200
    total = 1000 * (len(body) + 2)
    assert channel.queued_bytes == total - 4096
    assert producer.events == ["pause"]
    # The receiver reads again: everything drains, and the producer is resumed once.
    pair.flush()
    assert channel.queued_bytes == 0
    assert producer.events == ["pause", "resume"]
    assert all(result(d).body == body for d in replies)
    assert len(profile.handlers[0].received) == 1000


def test_producer_paused_when_crossing_high_water():
    config = SessionConfig(send_high_water=50_000)
    pair, _profile, channel = echo_pair(initiator_config=config)
    producer = Producer()
    channel.register_producer(producer)
    replies = [channel.send(Message(b"x" * 10_000)) for _ in range(5)]
    assert producer.events == []
    assert channel.queued_bytes <= 50_000
    replies.append(channel.send(Message(b"x" * 10_000)))
    assert channel.queued_bytes > 50_000 and producer.events == ["pause"]
    # Drained below half the high-water mark: resumed. Each step is a reactor turn.
    for _ in range(1000):
        if producer.events != ["pause"]:
            break
        pair.pump.pump(advanceClock=False)
        pair.clock.advance(0)
    assert producer.events == ["pause", "resume"]
    assert channel.queued_bytes <= 25_000
    pair.flush()
    assert len([result(d) for d in replies]) == 6
    channel.unregister_producer()


@implementer(interfaces.IPushProducer)
class SendingProducer(Producer):
    """Writes more as soon as it is resumed, as a producer streaming a file would."""

    def __init__(self, channel: Channel, bodies: list[bytes]) -> None:
        super().__init__()
        self.channel = channel
        self.bodies = bodies
        self.replies: list[defer.Deferred[Message]] = []

    def resumeProducing(self) -> None:
        super().resumeProducing()
        while self.bodies:
            self.replies.append(self.channel.send(Message(self.bodies.pop(0))))


def test_a_producer_resumed_while_frames_are_written_sends_after_them():
    # The channel's queue drains below the low-water mark in the middle of a batch of
    # frames: what the producer sends on being resumed must follow that batch on the
    # wire, or the peer sees sequence numbers out of order (RFC 3081 §3.1.4) and ends the
    # session.
    pair, profile, channel = echo_pair(
        initiator_config=SessionConfig(send_high_water=50_000),
        listener_config=SessionConfig(window=65_536),
    )
    producer = SendingProducer(channel, [b"after %d" % i for i in range(3)])
    channel.register_producer(producer)
    # The transport's buffer is full for a while: everything queues.
    pair.I.pauseProducing()
    replies = [channel.send(Message(b"x" * 10_000)) for _ in range(6)]
    assert producer.events == ["pause"]
    pair.I.resumeProducing()
    pair.flush()
    assert producer.events == ["pause", "resume"]
    assert pair.I.aborted is None and pair.L.aborted is None
    assert [result(d).body for d in replies + producer.replies] == [b"x" * 10_000] * 6 + [
        b"after %d" % i for i in range(3)
    ]
    assert profile.handlers[0].received[-3:] == [b"after %d" % i for i in range(3)]


def test_transport_pause_stops_frame_writes():
    pair, profile, channel = echo_pair()
    pair.I.pauseProducing()
    d = channel.send(Message(b"held back"))
    assert pair.sent_by_I == 0
    pair.flush()
    assert not d.called and profile.handlers[0].received == []
    assert channel.queued_bytes == len(b"\r\nheld back")
    pair.I.resumeProducing()
    assert pair.sent_by_I > 0
    pair.flush()
    assert result(d).body == b"held back"


def test_slow_profile_throttles_the_sender():
    pair, profile, channel = echo_pair()
    handler = profile.handlers[0]
    body = b"slow" + b"r" * 996
    replies = []
    # The application keeps sending while the profile answers nothing.
    for _ in range(5):
        replies += [channel.send(Message(body)) for _ in range(20)]
        pair.flush()
        pair.clock.advance(1)
        # Octets of unanswered MSGs stay charged against the window: the receiver
        # holds about a window's worth of requests, however much is sent.
        assert len(handler.received) <= 8
    held = len(handler.pending)
    assert held == len(handler.received) >= 3
    # The sender's window is closed; the rest waits on its side.
    assert pair.sent_by_I == 0
    assert channel.queued_bytes >= (100 - held - 5) * len(body)
    assert not any(d.called for d in replies)
    # The profile catches up: everything flows, in order, as the window reopens.
    answered = 0
    while answered < 100:
        pending, handler.pending = handler.pending, []
        assert 0 < len(pending) <= 8, "the sender stalled or the receiver buffered"
        for d in pending:
            d.callback(Message(b"done %d" % answered))
            answered += 1
        pair.flush()
    assert [result(d).body for d in replies] == [b"done %d" % i for i in range(100)]
    assert channel.queued_bytes == 0


def test_failing_on_answer_callback_does_not_end_the_session():
    """An exception in the application's on_answer is logged; the session goes on."""
    pair = Pair([EchoProfile()])
    channel = pair.start(ECHO)

    def broken(message: Message, ansno: int) -> None:
        raise RuntimeError("application bug")

    with capturedLogs() as events:
        d = channel.send(Message(b"many"), on_answer=broken)
        pair.flush()
    assert result(d) == []
    failures = [e for e in events if e.get("event") == "beep.application-failure"]
    assert len(failures) == 3
    reply = channel.send(Message(b"ping"))
    pair.flush()
    assert result(reply).body == b"ping"


def test_tiny_messages_to_a_slow_profile_are_throttled_not_aborted():
    """Requests cost at least window/max_pending_requests, so the window closes
    before a well-behaved peer reaches the pending-request limit."""
    profile = EchoProfile()
    pair = Pair([profile])
    channel = pair.start(ECHO)
    replies = [channel.send(Message(b"slow")) for _ in range(3000)]
    pair.flush()
    handler = profile.handlers[0]
    held = len(handler.pending)
    assert 0 < held < SessionConfig().max_pending_requests
    assert not pair.closed["L"] and not pair.closed["I"]
    while handler.pending:
        for d in handler.pending[:]:
            handler.pending.remove(d)
            d.callback(Message(b"done"))
        pair.flush()
    assert all(result(r).body == b"done" for r in replies)


class BigAnswers(Handler):
    """Answers ``answers please`` with a small, a too-big and another small answer."""

    def message_received(self, request: Request) -> Message | defer.Deferred[Message] | None:
        if request.message.body != b"answers please":
            return super().message_received(request)
        request.answer(Message(b"first"))
        request.answer(Message(b"x" * 20_000))
        request.answer(Message(b"last"))
        request.done()
        return None


def test_an_oversized_answer_fails_its_exchange_not_the_session():
    """Like an oversized RPY: 554 for that exchange, the session carries on."""
    pair = Pair(
        [EchoProfile(handler=BigAnswers)],
        initiator_config=SessionConfig(max_message_size=8192),
    )
    channel = pair.start(ECHO)
    with capturedLogs() as events:
        d = channel.send(Message(b"answers please"))
        pair.flush()
    assert failure(d).code == 554
    assert "beep.message-too-large" in {e.get("event") for e in events}
    assert not pair.closed["I"] and not pair.closed["L"]
    again = channel.send(Message(b"ping"))
    pair.flush()
    assert result(again).body == b"ping"
