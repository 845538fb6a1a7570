"""One BEEP session driven frame by frame: the test is the peer, writing raw bytes.

The exchanges of RFC 3080 §2.3.1 and §2.4 are transcribed as printed; what the
session writes is parsed with :class:`~imxp.beep.frames.FrameParser` and compared
element by element (the RFC pretty-prints its XML; attribute quoting and
whitespace may differ). Sequence numbers of what the session writes are checked
exactly against the octets it has written. Then every session-level rule of
§2.2.1.1 for poorly formed frames: the session ends without a reply, logs one
``beep.session-terminated`` event, and processes nothing more.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Callable
from xml.etree import ElementTree

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from imxp.beep import mgmt
from imxp.beep.frames import ANS, ERR, MSG, NUL, RPY, Frame, FrameParser, SeqFrame, serialize_frame
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    Profile,
    Request,
    Role,
    Session,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import TLSProfile

OTP = "http://iana.org/beep/SASL/OTP"
TLS = "http://iana.org/beep/TLS"
ECHO = "http://example.com/echo"
BEEP_XML = "application/beep+xml"
TERMINATED = "beep.session-terminated"

# -- transcriptions of RFC 3080 ------------------------------------------------

# §2.3.1.1 / §2.4
RFC_L_GREETING = """
    L: RPY 0 0 . 0 110
    L: Content-Type: application/beep+xml
    L:
    L: <greeting>
    L:    <profile uri='http://iana.org/beep/TLS' />
    L: </greeting>
    L: END
"""
RFC_I_GREETING = """
    I: RPY 0 0 . 0 52
    I: Content-Type: application/beep+xml
    I:
    I: <greeting />
    I: END
"""
# §2.3.1.2
RFC_START_TWO = """
    C: MSG 0 1 . 52 178
    C: Content-Type: application/beep+xml
    C:
    C: <start number='1'>
    C:    <profile uri='http://iana.org/beep/SASL/OTP' />
    C:    <profile uri='http://iana.org/beep/SASL/ANONYMOUS' />
    C: </start>
    C: END
"""
RFC_START_REPLY = """
    S: RPY 0 1 . 221 87
    S: Content-Type: application/beep+xml
    S:
    S: <profile uri='http://iana.org/beep/SASL/OTP' />
    S: END
"""
RFC_START_EVEN = """
    C: MSG 0 1 . 52 120
    C: Content-Type: application/beep+xml
    C:
    C: <start number='2'>
    C:    <profile uri='http://iana.org/beep/SASL/OTP' />
    C: </start>
    C: END
"""
RFC_START_EVEN_ERROR = """
    S: ERR 0 1 . 221 127
    S: Content-Type: application/beep+xml
    S:
    S: <error code='501'>number attribute
    S: in &lt;start&gt; element must be odd-valued</error>
    S: END
"""
RFC_START_TLS = """
    C: MSG 0 1 . 52 158
    C: Content-Type: application/beep+xml
    C:
    C: <start number='1'>
    C:    <profile uri='http://iana.org/beep/TLS'>
    C:        <![CDATA[<ready />]]>
    C:    </profile>
    C: </start>
    C: END
"""
RFC_START_TLS_REPLY = """
    S: RPY 0 1 . 110 121
    S: Content-Type: application/beep+xml
    S:
    S: <profile uri='http://iana.org/beep/TLS'>
    S:     <![CDATA[<proceed />]]>
    S: </profile>
    S: END
"""
# §2.3.1.5, with number='1': the RFC's example asks an initiator for channel 2,
# which its own parity rule (§2.3.1.2) answers with 501, not 550.
RFC_START_FOO = """
    I: MSG 0 1 . 52 115
    I: Content-Type: application/beep+xml
    I:
    I: <start number='1'>
    I:    <profile uri='http://iana.org/beep/FOO' />
    I: </start>
    I: END
"""
RFC_START_FOO_ERROR = """
    L: ERR 0 1 . 221 105
    L: Content-Type: application/beep+xml
    L:
    L: <error code='550'>all requested profiles are
    L: unsupported</error>
    L: END
"""
# §2.3.1.3
RFC_CLOSE_1 = """
    C: MSG 0 2 . 235 71
    C: Content-Type: application/beep+xml
    C:
    C: <close number='1' code='200' />
    C: END
"""
RFC_CLOSE_OK = """
    S: RPY 0 2 . 392 46
    S: Content-Type: application/beep+xml
    S:
    S: <ok />
    S: END
"""
RFC_CLOSE_ERROR = """
    S: ERR 0 2 . 392 79
    S: Content-Type: application/beep+xml
    S:
    S: <error code='550'>still working</error>
    S: END
"""
# §2.4
RFC_REFUSAL = """
    L: ERR 0 0 . 0 60
    L: Content-Type: application/beep+xml
    L:
    L: <error code='421' />
    L: END
"""
RFC_RELEASE = """
    C: MSG 0 1 . 52 60
    C: Content-Type: application/beep+xml
    C:
    C: <close code='200' />
    C: END
"""
RFC_RELEASE_OK = """
    S: RPY 0 1 . 264 46
    S: Content-Type: application/beep+xml
    S:
    S: <ok />
    S: END
"""
RFC_RELEASE_ERROR = """
    S: ERR 0 1 . 264 79
    S: Content-Type: application/beep+xml
    S:
    S: <error code='550'>still working</error>
    S: END
"""


def transcribe(text: str) -> bytes:
    """A frame as the RFC prints it, one line per CRLF line, the "X: " prefixes
    removed. The printed size must match the payload (so the transcription is
    right)."""
    lines = [line.split(":", 1)[1][1:] for line in textwrap.dedent(text).strip().splitlines()]
    header, payload_lines, trailer = lines[0], lines[1:-1], lines[-1]
    assert trailer == "END"
    payload = "".join(f"{line}\r\n" for line in payload_lines).encode()
    fields = header.split(" ")
    assert int(fields[5]) == len(payload), f"transcription of {header!r}"
    return header.encode() + b"\r\n" + payload + b"END\r\n"


def parse_one(data: bytes) -> Frame:
    frames = FrameParser().feed(data)
    assert len(frames) == 1 and isinstance(frames[0], Frame)
    return frames[0]


# Attribute defaults of the DTD in RFC 3080 §7.1.
DTD_DEFAULTS = {
    "greeting": {"localize": "i-default"},
    "profile": {"encoding": "none"},
    "close": {"number": "0"},
}


def canonical(element: ElementTree.Element) -> tuple[object, ...]:
    """An element with DTD defaults filled in, its text whitespace-normalised and
    pretty-printing ignored."""
    attributes = {**DTD_DEFAULTS.get(element.tag, {}), **element.attrib}
    text = " ".join((element.text or "").split())
    children = tuple(canonical(child) for child in element)
    return (element.tag, tuple(sorted(attributes.items())), text, children)


def xml_of(payload: bytes) -> tuple[object, ...]:
    message = Message.from_payload(payload)
    assert message.content_type == BEEP_XML
    return canonical(ElementTree.fromstring(message.body))


# -- the test as a peer ----------------------------------------------------------


class Wire:
    """A session on a StringTransport; the test writes the peer's frames."""

    def __init__(
        self,
        role: Role = Role.LISTENER,
        profiles: tuple[Profile, ...] = (),
        config: SessionConfig | None = None,
        session: Session | None = None,
    ) -> None:
        self.clock = task.Clock()
        self.session = session or Session(role, profiles, config, clock=self.clock)
        self.transport = StringTransport()
        self._parser = FrameParser()
        # Next seqno per channel: of what the session writes, and of what we feed.
        self.ours: defaultdict[int, int] = defaultdict(int)
        self.theirs: defaultdict[int, int] = defaultdict(int)
        self.seqs: list[SeqFrame] = []
        self.pending: defer.Deferred[Message] | None = None
        self.session.makeConnection(self.transport)

    def read(self) -> list[Frame]:
        """Data frames written since the last read (SEQ frames go to ``seqs``). Each
        frame's seqno must be exactly the count of octets written before it."""
        data = self.transport.value()
        self.transport.clear()
        frames = []
        for frame in self._parser.feed(data):
            if isinstance(frame, SeqFrame):
                self.seqs.append(frame)
                continue
            assert frame.seqno == self.ours[frame.channel], frame
            self.ours[frame.channel] += len(frame.payload)
            frames.append(frame)
        return frames

    def read_one(self) -> Frame:
        frames = self.read()
        assert len(frames) == 1, frames
        return frames[0]

    def feed(self, data: bytes) -> None:
        """``data`` as one read, and the rest of that reactor turn: the calls due now,
        as the reactor makes them before it reads again."""
        self.session.dataReceived(data)
        self.clock.advance(0)

    def feed_rfc(self, text: str, exact: bool = False) -> None:
        """Feed a transcribed frame at the peer's running seqno: where the RFC's
        printed seqno counts octets of exchanges left out, ours replaces it
        (``exact``: the printed one is right and is checked to be)."""
        frame = parse_one(transcribe(text))
        if exact:
            assert frame.seqno == self.theirs[frame.channel]
        self.send(frame.kind, frame.channel, frame.msgno, frame.payload, frame.more)

    def frame(
        self,
        kind: bytes,
        channel: int,
        msgno: int,
        payload: bytes,
        more: bool = False,
        ansno: int | None = None,
        seqno: int | None = None,
    ) -> bytes:
        """A frame at the peer's running seqno, which it advances."""
        if seqno is None:
            seqno = self.theirs[channel]
        self.theirs[channel] = seqno + len(payload)
        return serialize_frame(kind, channel, msgno, more, seqno, payload, ansno)

    def send(
        self,
        kind: bytes,
        channel: int,
        msgno: int,
        payload: bytes,
        more: bool = False,
        ansno: int | None = None,
    ) -> None:
        self.feed(self.frame(kind, channel, msgno, payload, more, ansno))

    def expect_rfc(self, text: str) -> Frame:
        """The next frame written matches the transcription: the same keyword,
        channel, msgno and continuation, an equivalent element, and our own seqno."""
        ours = self.read_one()
        printed = parse_one(transcribe(text))
        assert (ours.kind, ours.channel, ours.msgno, ours.more, ours.ansno) == (
            printed.kind,
            printed.channel,
            printed.msgno,
            printed.more,
            printed.ansno,
        )
        assert xml_of(ours.payload) == xml_of(printed.payload)
        return ours

    @property
    def aborted(self) -> bool:
        # StringTransport.abortConnection sets ``disconnected``; loseConnection doesn't.
        return self.transport.disconnected

    @property
    def hung_up(self) -> bool:
        return self.transport.disconnecting and not self.transport.disconnected


class Recorder(ChannelHandler):
    """Replies ``re:<body>`` at once, or holds a Deferred for bodies starting ``slow``."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.pending: list[defer.Deferred[Message]] = []
        self.closed: list[object] = []
        self.decline_close: str | None = None

    def message_received(self, request: Request) -> Message | defer.Deferred[Message]:
        body = request.message.body
        self.received.append(body)
        if body.startswith(b"slow"):
            d: defer.Deferred[Message] = defer.Deferred()
            self.pending.append(d)
            return d
        return Message(b"re:" + body)

    def close_requested(self, code: int) -> None:
        if self.decline_close is not None:
            raise BEEPError(550, self.decline_close)

    def channel_closed(self, reason: object) -> None:
        self.closed.append(reason)


class RecordingProfile(Profile):
    def __init__(self, uri: str, reply: Callable[[bytes | None], bytes | None] = lambda i: None):
        self.uri = uri
        self.reply = reply
        self.inits: list[bytes | None] = []
        self.handlers: list[Recorder] = []

    def start(self, session: Session, channel: Channel, init: bytes | None) -> bytes | None:
        self.inits.append(init)
        handler = Recorder()
        self.handlers.append(handler)
        channel.handler = handler
        return self.reply(init)


def greeted_listener(*profiles: Profile, config: SessionConfig | None = None) -> Wire:
    wire = Wire(Role.LISTENER, profiles, config)
    wire.read()
    wire.feed_rfc(RFC_I_GREETING, exact=True)
    assert wire.read() == []
    return wire


# -- greetings (§2.3.1.1, §2.4) -------------------------------------------------


def test_listener_greets_first_with_its_profiles():
    wire = Wire(Role.LISTENER, (RecordingProfile(TLS),))
    first = wire.read_one()
    assert (first.kind, first.channel, first.msgno, first.more, first.seqno) == (
        RPY,
        0,
        0,
        False,
        0,
    )
    message = Message.from_payload(first.payload)
    assert message.header("Content-Type") == BEEP_XML
    assert xml_of(first.payload) == xml_of(parse_one(transcribe(RFC_L_GREETING)).payload)
    greeted = wire.session.greeted()
    assert not greeted.called
    wire.feed_rfc(RFC_I_GREETING, exact=True)
    assert greeted.result == mgmt.Greeting()
    assert wire.read() == [] and not wire.transport.disconnecting


def test_initiator_greets_and_reads_the_listener_greeting_as_printed():
    wire = Wire(Role.INITIATOR)
    first = wire.read_one()
    assert (first.kind, first.channel, first.msgno, first.seqno) == (RPY, 0, 0, 0)
    assert xml_of(first.payload) == xml_of(parse_one(transcribe(RFC_I_GREETING)).payload)
    wire.feed_rfc(RFC_L_GREETING, exact=True)
    assert wire.session.peer_greeting == mgmt.Greeting((TLS,))


def test_greeting_carries_features_and_localize():
    config = SessionConfig(features=("x-one", "x-two"), localize=("fr", "en-GB"))
    wire = Wire(Role.INITIATOR, config=config)
    greeting = mgmt.parse(Message.from_payload(wire.read_one().payload).body)
    assert greeting == mgmt.Greeting((), ("x-one", "x-two"), ("fr", "en-GB"))


# -- start (§2.3.1.2, §2.3.1.5) -----------------------------------------------------


def test_rfc_start_exchange_picks_the_supported_profile():
    otp = RecordingProfile(OTP)
    wire = greeted_listener(otp)
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.expect_rfc(RFC_START_REPLY)
    assert otp.inits == [None]
    assert wire.session.channels[1].profile == OTP


def test_rfc_start_with_even_number_from_initiator_is_501():
    otp = RecordingProfile(OTP)
    wire = greeted_listener(otp)
    wire.feed_rfc(RFC_START_EVEN, exact=True)
    wire.expect_rfc(RFC_START_EVEN_ERROR)
    assert otp.inits == [] and 2 not in wire.session.channels
    assert not wire.transport.disconnecting


def test_rfc_start_with_unsupported_profile_is_550():
    wire = greeted_listener(RecordingProfile(OTP))
    wire.feed_rfc(RFC_START_FOO, exact=True)
    wire.expect_rfc(RFC_START_FOO_ERROR)
    assert 1 not in wire.session.channels


def test_rfc_start_with_piggybacked_init_as_initiator():
    """Our session asks; the listener's reply is fed exactly as printed."""
    wire = Wire(Role.INITIATOR)
    wire.read()
    wire.feed_rfc(RFC_L_GREETING, exact=True)
    d = wire.session.start_channel([mgmt.ProfileElement(TLS, b"<ready />")])
    wire.expect_rfc(RFC_START_TLS)
    wire.feed_rfc(RFC_START_TLS_REPLY, exact=True)
    channel = d.result
    assert channel.number == 1 and channel.profile == TLS
    assert channel.start_reply == b"<proceed />"


def test_rfc_start_with_piggybacked_init_as_listener():
    tls = RecordingProfile(TLS, lambda init: b"<proceed />" if init == b"<ready />" else None)
    wire = greeted_listener(tls)
    wire.feed_rfc(RFC_START_TLS, exact=True)
    wire.expect_rfc(RFC_START_TLS_REPLY)
    assert tls.inits == [b"<ready />"]


# -- close (§2.3.1.3) and release (§2.4) ---------------------------------------------


def listener_with_channel_1() -> tuple[Wire, Recorder]:
    otp = RecordingProfile(OTP)
    wire = greeted_listener(otp)
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read_one()
    return wire, otp.handlers[0]


def test_rfc_close_ok():
    wire, handler = listener_with_channel_1()
    wire.feed_rfc(RFC_CLOSE_1)
    wire.expect_rfc(RFC_CLOSE_OK)
    assert 1 not in wire.session.channels
    assert handler.closed == [None]
    assert not wire.transport.disconnecting


def test_rfc_close_error():
    wire, handler = listener_with_channel_1()
    handler.decline_close = "still working"
    wire.feed_rfc(RFC_CLOSE_1)
    wire.expect_rfc(RFC_CLOSE_ERROR)
    assert 1 in wire.session.channels and handler.closed == []
    # The channel still works.
    wire.send(MSG, 1, 0, b"\r\nhello")
    reply = wire.read_one()
    assert (reply.kind, reply.channel, reply.msgno) == (RPY, 1, 0)
    assert Message.from_payload(reply.payload).body == b"re:hello"


def test_close_waits_for_the_reply_owed_on_the_channel():
    wire, handler = listener_with_channel_1()
    wire.send(MSG, 1, 0, b"\r\nslow")
    assert wire.read() == []
    wire.feed_rfc(RFC_CLOSE_1)
    # §2.3.1.3: the reply to the outstanding MSG goes out before "ok".
    assert wire.read() == []
    handler.pending[0].callback(Message(b"done"))
    reply, ok = wire.read()
    assert (reply.kind, reply.channel, reply.msgno) == (RPY, 1, 0)
    assert (ok.kind, ok.channel, ok.msgno) == (RPY, 0, 2)
    assert xml_of(ok.payload) == xml_of(parse_one(transcribe(RFC_CLOSE_OK)).payload)


def test_rfc_release_ok_then_connection_closed():
    wire = greeted_listener()
    wire.feed_rfc(RFC_RELEASE, exact=True)
    wire.expect_rfc(RFC_RELEASE_OK)
    # RFC 3081 §2: the peer sending "ok" issues the TCP CLOSE (not an ABORT).
    assert wire.hung_up


def test_release_waits_for_the_replies_owed():
    wire, handler = listener_with_channel_1()
    wire.send(MSG, 1, 0, b"\r\nslow")
    wire.feed_rfc(RFC_RELEASE.replace("MSG 0 1", "MSG 0 2"))
    assert wire.read() == [] and not wire.transport.disconnecting
    handler.pending[0].callback(Message(b"done"))
    reply, ok = wire.read()
    assert (reply.kind, reply.channel, reply.msgno) == (RPY, 1, 0)
    assert (ok.kind, ok.channel, ok.msgno) == (RPY, 0, 2)
    assert xml_of(ok.payload) == xml_of(parse_one(transcribe(RFC_RELEASE_OK)).payload)
    assert wire.hung_up


def test_rfc_release_declined_keeps_the_session():
    wire, handler = listener_with_channel_1()
    handler.decline_close = "still working"
    wire.feed_rfc(RFC_RELEASE.replace("MSG 0 1", "MSG 0 2"))
    ours = wire.read_one()
    assert (ours.kind, ours.channel, ours.msgno) == (ERR, 0, 2)
    assert xml_of(ours.payload) == xml_of(parse_one(transcribe(RFC_RELEASE_ERROR)).payload)
    assert not wire.transport.disconnecting
    wire.send(MSG, 1, 0, b"\r\nstill there?")
    assert Message.from_payload(wire.read_one().payload).body == b"re:still there?"


def test_initiator_releases_and_hangs_up_on_ok():
    wire = Wire(Role.INITIATOR)
    wire.read()
    wire.feed_rfc(RFC_L_GREETING, exact=True)
    closed = wire.session.close()
    close = wire.read_one()
    assert (close.kind, close.channel, close.msgno) == (MSG, 0, 1)
    assert xml_of(close.payload) == xml_of(parse_one(transcribe(RFC_RELEASE)).payload)
    wire.feed_rfc(RFC_RELEASE_OK)
    assert closed.called and closed.result is None
    assert wire.hung_up


def test_initiator_receives_421_refusal():
    wire = Wire(Role.INITIATOR)
    greeted = wire.session.greeted()
    # §2.4: the initiator sends its greeting regardless; it is ignored.
    wire.expect_rfc(RFC_I_GREETING)
    with capturedLogs() as events:
        wire.feed_rfc(RFC_REFUSAL, exact=True)
    failure = greeted.result
    greeted.addErrback(lambda f: None)
    assert failure.check(BEEPError) and failure.value.code == 421
    assert wire.hung_up
    assert [e["event"] for e in events if "event" in e] == ["beep.session-refused-by-peer"]
    # Nothing more is processed.
    wire.feed(wire.frame(MSG, 0, 1, parse_one(transcribe(RFC_START_TWO)).payload))
    assert wire.read() == []


def test_factory_refuses_with_421_instead_of_greeting():
    factory = SessionFactory(Role.LISTENER, [RecordingProfile(OTP)], max_sessions_per_peer=1)
    addr = IPv4Address("TCP", "192.0.2.7", 4000)
    factory.clock = task.Clock()
    first = Wire(session=factory.buildProtocol(addr))
    assert first.read_one().kind == RPY
    second = Wire(session=factory.buildProtocol(addr))
    refusal = second.read_one()
    assert (refusal.kind, refusal.channel, refusal.msgno, refusal.more, refusal.seqno) == (
        ERR,
        0,
        0,
        False,
        0,
    )
    assert mgmt.parse(Message.from_payload(refusal.payload).body).code == 421
    assert second.hung_up
    second.feed_rfc(RFC_I_GREETING, exact=True)
    assert second.read() == []


# -- poorly formed frames (§2.2.1.1) end the session -----------------------------------


def established() -> tuple[Wire, Recorder]:
    """Listener with channel 1 open and one MSG of ours (msgno 0) awaiting a reply."""
    wire, handler = listener_with_channel_1()
    wire.pending = wire.session.channels[1].send(Message(b"ping"))
    wire.pending.addErrback(lambda f: None)
    ours = wire.read_one()
    assert (ours.kind, ours.channel, ours.msgno) == (MSG, 1, 0)
    return wire, handler


def no_such_channel(wire: Wire) -> bytes:
    return wire.frame(MSG, 3, 0, b"\r\nhi")


def msgno_reused_before_reply(wire: Wire) -> bytes:
    wire.send(MSG, 1, 0, b"\r\nslow")
    return wire.frame(MSG, 1, 0, b"\r\nagain")


def reply_to_msgno_never_sent(wire: Wire) -> bytes:
    return wire.frame(RPY, 1, 5, b"\r\npong")


def reply_after_reply_complete(wire: Wire) -> bytes:
    wire.send(RPY, 1, 0, b"\r\npong")
    assert wire.pending.result.body == b"pong"
    return wire.frame(RPY, 1, 0, b"\r\npong again")


def msg_then_rpy_same_msgno(wire: Wire) -> bytes:
    # Legal alone: the peer's own MSG 0 in progress, our MSG 0 awaiting its RPY.
    wire.send(MSG, 1, 0, b"\r\npart", more=True)
    return wire.frame(RPY, 1, 0, b"\r\npong")


def rpy_then_msg_same_msgno(wire: Wire) -> bytes:
    wire.send(RPY, 1, 0, b"\r\npo", more=True)
    return wire.frame(MSG, 1, 0, b"\r\nhello")


def rpy_then_err(wire: Wire) -> bytes:
    wire.send(RPY, 1, 0, b"\r\npo", more=True)
    return wire.frame(ERR, 1, 0, b"")


def nul_after_rpy(wire: Wire) -> bytes:
    wire.send(RPY, 1, 0, b"\r\npo", more=True)
    return wire.frame(NUL, 1, 0, b"")


def ans_then_rpy(wire: Wire) -> bytes:
    wire.send(ANS, 1, 0, b"\r\nanswer", ansno=0)
    return wire.frame(RPY, 1, 0, b"\r\npong")


def interleaved_into_incomplete_message(wire: Wire) -> bytes:
    wire.send(MSG, 1, 1, b"\r\nfirst half", more=True)
    return wire.frame(MSG, 1, 2, b"\r\nanother")


def wrong_seqno(wire: Wire) -> bytes:
    return wire.frame(MSG, 1, 0, b"\r\nhi", seqno=7)


def window_overrun(wire: Wire) -> bytes:
    # A MSG still being processed keeps its octets charged, so the window left
    # (4096 - 3001) is under half the buffer and earns no SEQ: 3000 + 1500 > 4096.
    wire.send(MSG, 1, 0, b"\r\nslow" + b"a" * 2994)
    assert all(seq.channel != 1 for seq in wire.seqs)
    return wire.frame(MSG, 1, 1, b"\r\n" + b"b" * 1498, seqno=3000)


def frame_larger_than_any_window(wire: Wire) -> bytes:
    return wire.frame(MSG, 1, 0, b"\r\n" + b"a" * 5000)


def seq_acknowledging_unsent_octets(wire: Wire) -> bytes:
    sent = wire.ours[1]
    wire.feed(b"SEQ 1 %d 4096\r\n" % sent)  # acknowledging what was sent is fine
    assert not wire.transport.disconnecting
    return b"SEQ 1 %d 4096\r\n" % (sent + 1)


def nul_with_payload(wire: Wire) -> bytes:
    return b"NUL 1 0 . 0 2\r\n\r\nEND\r\n"


def garbage(wire: Wire) -> bytes:
    return b"HELLO there\r\n"


def bad_trailer(wire: Wire) -> bytes:
    return b"MSG 1 0 . 0 4\r\n\r\nhiEND!\r\n"


VIOLATIONS = [
    no_such_channel,
    msgno_reused_before_reply,
    reply_to_msgno_never_sent,
    reply_after_reply_complete,
    msg_then_rpy_same_msgno,
    rpy_then_msg_same_msgno,
    rpy_then_err,
    nul_after_rpy,
    ans_then_rpy,
    interleaved_into_incomplete_message,
    wrong_seqno,
    window_overrun,
    frame_larger_than_any_window,
    seq_acknowledging_unsent_octets,
    nul_with_payload,
    garbage,
    bad_trailer,
]


def assert_terminated(wire: Wire, events: list[dict[str, object]]) -> None:
    assert wire.aborted
    assert wire.read() == [] and wire.transport.value() == b""
    terminated = [e for e in events if e.get("event") == TERMINATED]
    assert len(terminated) == 1, events


def assert_dead(wire: Wire, handler: Recorder | None = None) -> None:
    """After the abort nothing is processed: a start that would be answered isn't,
    and MSGs on channel 1 reach no handler."""
    seen = list(handler.received) if handler else []
    start = parse_one(transcribe(RFC_START_TWO)).payload.replace(b"'1'", b"'5'")
    wire.feed(wire.frame(MSG, 0, 7, start))
    if handler is not None:
        wire.feed(wire.frame(MSG, 1, 9, b"\r\nanyone?", seqno=0))
    assert wire.transport.value() == b""
    assert 5 not in wire.session.channels
    if handler is not None:
        assert handler.received == seen


@pytest.mark.parametrize("violation", VIOLATIONS, ids=lambda f: f.__name__)
def test_poorly_formed_frame_terminates_without_reply(violation):
    wire, handler = established()
    bad = violation(wire)
    wire.read()
    wire.transport.clear()
    assert not wire.transport.disconnecting
    with capturedLogs() as events:
        wire.feed(bad)
    assert_terminated(wire, events)
    assert_dead(wire, handler)


def test_frames_after_the_bad_one_in_the_same_read_are_ignored():
    wire, handler = established()
    good = wire.frame(MSG, 1, 1, b"\r\nafter")
    with capturedLogs() as events:
        wire.feed(wire.frame(MSG, 9, 0, b"\r\nbad") + good)
    assert_terminated(wire, events)
    assert handler.received == []


@pytest.mark.parametrize("position", [1, 3], ids=["same-slice", "next-slice"])
def test_frames_after_a_tls_ready_end_the_session_whichever_slice_they_are_in(position):
    # §3.1.3: after ready, nothing but the new transport. With 4 frames acted on per
    # reactor turn, the frame after ready is in the same slice or waits for the next.
    otp = RecordingProfile(OTP)
    wire = greeted_listener(
        TLSProfile(None),
        otp,
        config=SessionConfig(frames_per_turn=4),  # type: ignore[arg-type]
    )
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read_one()
    handler = otp.handlers[0]
    before = [wire.frame(MSG, 1, n, b"\r\nm%d" % n) for n in range(position)]
    tls_start = parse_one(transcribe(RFC_START_TLS)).payload.replace(b"'1'", b"'3'")
    ready = wire.frame(MSG, 0, 2, tls_start)
    after = wire.frame(MSG, 1, position, b"\r\nafter")
    with capturedLogs() as events:
        wire.feed(b"".join(before) + ready + after)
        wire.clock.advance(0)
    assert wire.aborted
    assert [e["reason"] for e in events if e.get("event") == TERMINATED] == [
        "data received after a tuning request"
    ]
    assert handler.received == [b"m%d" % n for n in range(position)]


def fresh_listener() -> Wire:
    wire = Wire(Role.LISTENER, (RecordingProfile(OTP),))
    wire.read()
    return wire


@pytest.mark.parametrize(
    "first",
    [
        # A MSG before the peer's greeting (§2.4: each peer greets immediately).
        lambda w: w.frame(MSG, 0, 1, parse_one(transcribe(RFC_START_TWO)).payload),
        # A reply on channel zero that isn't msgno 0.
        lambda w: w.frame(RPY, 0, 1, parse_one(transcribe(RFC_I_GREETING)).payload),
        # A greeting element that isn't one.
        lambda w: w.frame(RPY, 0, 0, parse_one(transcribe(RFC_RELEASE_OK)).payload),
        # msgno 0 but ANS.
        lambda w: w.frame(ANS, 0, 0, parse_one(transcribe(RFC_I_GREETING)).payload, ansno=0),
        # §2.4: only a listener may refuse a session; from the initiator it's poorly formed.
        lambda w: w.frame(ERR, 0, 0, parse_one(transcribe(RFC_REFUSAL)).payload),
        # Another channel before the greeting.
        lambda w: w.frame(MSG, 1, 0, b"\r\nhi"),
    ],
    ids=["msg", "rpy-msgno-1", "not-a-greeting", "ans", "err-to-listener", "other-channel"],
)
def test_first_frame_not_a_greeting_terminates(first):
    wire = fresh_listener()
    with capturedLogs() as events:
        wire.feed(first(wire))
    assert_terminated(wire, events)
    assert wire.session.peer_greeting is None
    assert_dead(wire)


def test_greeting_timeout_aborts():
    wire = fresh_listener()
    greeted = wire.session.greeted()
    wire.clock.advance(29)
    assert not wire.transport.disconnecting
    with capturedLogs() as events:
        wire.clock.advance(2)
    assert_terminated(wire, events)
    assert not greeted.called
    wire.session.connectionLost()
    assert isinstance(greeted.result.value, Exception)
    greeted.addErrback(lambda f: None)


# -- limits ----------------------------------------------------------------------------


def test_too_large_msg_on_channel_zero_gets_pre_emptive_554():
    wire = greeted_listener(RecordingProfile(OTP))
    limit = 4096  # RFC 3081 §3.1.1: the initial window
    total = 70000  # channel zero's limit is 64K
    payload = b"Content-Type: application/beep+xml\r\n\r\n" + b"<" * (total - 38)
    offset = 0
    err_at = None
    while offset < len(payload):
        room = limit - wire.theirs[0]
        assert room > 0, "the session stopped opening its window"
        chunk = payload[offset : offset + min(room, 4096)]
        offset += len(chunk)
        wire.send(MSG, 0, 1, chunk, more=offset < len(payload))
        for frame in wire.read():
            assert err_at is None, "one reply only"
            assert (frame.kind, frame.channel, frame.msgno) == (ERR, 0, 1)
            assert mgmt.parse(Message.from_payload(frame.payload).body).code == 554
            err_at = offset
        for seq in wire.seqs:
            if seq.channel == 0:
                limit = seq.ackno + seq.window
    # §2.6.3: the negative reply went before the final frame, once 64K was passed.
    assert err_at is not None and 65536 < err_at < len(payload)
    assert not wire.transport.disconnecting
    # The session goes on: a start is answered.
    wire.feed_rfc(RFC_START_TWO.replace("MSG 0 1", "MSG 0 2"))
    reply = wire.read_one()
    assert (reply.kind, reply.msgno) == (RPY, 2)
    assert 1 in wire.session.channels


def test_larger_window_is_advertised_after_the_frame_creating_the_channel():
    """RFC 3081 §3.1.1: every channel starts at 4096; a SEQ offers more. The SEQ for
    a new channel must follow the reply to ``start``, or the peer can't apply it."""
    wire = Wire(Role.LISTENER, (RecordingProfile(OTP),), SessionConfig(window=65536))
    kinds = [
        (f.kind, f.channel) if isinstance(f, Frame) else ("SEQ", f.channel, f.ackno, f.window)
        for f in FrameParser().feed(wire.transport.value())
    ]
    assert kinds == [(RPY, 0), ("SEQ", 0, 0, 65536)]
    wire.transport.clear()
    wire.feed_rfc(RFC_I_GREETING, exact=True)
    wire.feed_rfc(RFC_START_TWO, exact=True)
    kinds = [
        (f.kind, f.channel) if isinstance(f, Frame) else ("SEQ", f.channel, f.ackno, f.window)
        for f in FrameParser().feed(wire.transport.value())
    ]
    # Channel zero's own window is topped up as its frames arrive (§3.1.4).
    kinds = [k for k in kinds if k[:2] != ("SEQ", 0)]
    assert kinds == [(RPY, 0), ("SEQ", 1, 0, 65536)]
    # The peer may now send 64K on channel 1 in one frame.
    wire.transport.clear()
    wire.feed(b"SEQ 1 0 65536\r\n")
    wire.send(MSG, 1, 0, b"\r\n" + b"z" * 60000)
    assert not wire.transport.disconnecting
    reply = wire.read()
    assert [f.more for f in reply] == [True] * (len(reply) - 1) + [False]
    payload = b"".join(f.payload for f in reply)
    assert Message.from_payload(payload).body == b"re:" + b"z" * 60000
