"""A hostile or buggy BEEP peer, driven frame by frame (RFC 3080, RFC 3081).

Each test is a peer doing something the existing suites do not try: answering
channel-zero requests with the wrong element, sending a greeting that is no greeting,
opening many answers at once, sending empty intermediate frames without end, a
poorly formed reply on a profile's channel, talking after a TLS ``ready``. The
project rule: the error the RFC names (an ERR, or the session terminated per
§2.2.1.1 with one ``beep.session-terminated`` event), no unbounded memory, and
nothing that harms a session that keeps to the rules.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest
from test_session_wire import (
    OTP,
    RFC_I_GREETING,
    RFC_L_GREETING,
    RFC_RELEASE,
    RFC_START_TLS,
    RFC_START_TWO,
    TERMINATED,
    TLS,
    Recorder,
    RecordingProfile,
    Wire,
    greeted_listener,
    parse_one,
    transcribe,
)
from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from imxp.beep import mgmt
from imxp.beep.frames import ANS, ERR, MSG, NUL, RPY, Frame
from imxp.beep.message import Message
from imxp.beep.session import (
    TUNING_MESSAGE_SIZE,
    Channel,
    Profile,
    Role,
    SessionClosed,
    SessionConfig,
)
from imxp.beep.tls import TLSProfile, start_tls

REFUSED_BY_PEER = "beep.session-refused-by-peer"
XML_HEAD = b"Content-Type: application/beep+xml\r\n\r\n"


# -- helpers ------------------------------------------------------------------------------


def right_edge(wire: Wire, channel: int) -> int:
    """The peer's (the test's) send limit on ``channel``: the highest right edge our
    session has advertised, or RFC 3081 §3.1.1's initial 4096."""
    edges = [s.ackno + s.window for s in wire.seqs if s.channel == channel]
    return max([4096, *edges])


def listener_with_channel_1(profile: Profile, config: SessionConfig | None = None) -> Wire:
    wire = greeted_listener(profile, config=config)
    wire.feed_rfc(RFC_START_TWO, exact=True)
    reply = wire.read_one()
    assert (reply.kind, reply.channel) == (RPY, 0)
    assert 1 in wire.session.channels
    return wire


def initiator() -> Wire:
    wire = Wire(Role.INITIATOR)
    wire.read()
    wire.feed_rfc(RFC_L_GREETING, exact=True)
    assert wire.session.peer_greeting is not None
    return wire


def settle(wire: Wire) -> None:
    """Run the reactor turns a session yields to while it works through a long read."""
    for _ in range(100_000):
        now = wire.clock.seconds()
        if not any(c.getTime() <= now for c in wire.clock.getDelayedCalls()):
            return
        wire.clock.advance(0)


def retained(action: Callable[[], None]) -> int:
    """Octets of Python memory still allocated after ``action`` than before it."""
    return retained_after(action)[0]


def retained_after(*actions: Callable[[], None]) -> list[int]:
    """Octets of Python memory still allocated after each of ``actions`` than before the
    first (memory allocated before, and freed meanwhile, is not seen)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        grown = []
        for action in actions:
            action()
            gc.collect()
            grown.append(tracemalloc.get_traced_memory()[0] - before)
        return grown
    finally:
        tracemalloc.stop()


def terminated(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e.get("event") == TERMINATED]


def swallow(d: defer.Deferred[object]) -> list[object]:
    box: list[object] = []
    d.addBoth(box.append)
    return box


# -- a peer that keeps asking but never takes the replies ------------------------------


@pytest.mark.parametrize("how", ["never-sends-seq", "stops-reading"])
def test_replies_owed_to_a_peer_that_never_takes_them_stay_bounded(how: str) -> None:
    """A peer that opens no window for our replies (no SEQ), or reads nothing (our
    transport says it is full), while it goes on sending MSGs within its window: the
    replies we owe it cannot be written, and must not pile up without bound. Once
    max_pending_requests of them wait, the session ends (closing our window instead
    could deadlock two peers that each wait for the other's SEQ)."""
    config = SessionConfig(max_pending_requests=64)
    wire = listener_with_channel_1(RecordingProfile(OTP), config)  # echoes each MSG at once
    channel = wire.session.channels[1]
    if how == "stops-reading":
        wire.feed(b"SEQ 1 0 2147483647\r\n")  # a window as large as there is
        wire.session.pauseProducing()  # what the TCP transport does when its buffer fills
    body = b"\r\n" + b"x" * 98
    sent = 0
    with capturedLogs() as events:
        while not wire.aborted and sent < 1000:
            if wire.theirs[1] + len(body) > right_edge(wire, 1):
                break
            wire.send(MSG, 1, sent, body)
            wire.read()
            sent += 1
    assert wire.aborted, f"{sent} MSGs taken, {channel.queued_bytes} octets of replies queued"
    # The replies that fit the window the peer gave at the start (RFC 3081 §3.1.1's
    # 4096 octets) were written; 64 more were owed when the session ended.
    assert sent <= 4096 // (len(body) + 4) + 64 + 1
    assert len(terminated(events)) == 1


def test_replies_the_peer_takes_do_not_count_against_it() -> None:
    """The same traffic from a peer that takes its replies goes on for ever."""
    config = SessionConfig(max_pending_requests=64)
    wire = listener_with_channel_1(RecordingProfile(OTP), config)
    body = b"\r\n" + b"x" * 98
    for msgno in range(500):
        wire.send(MSG, 1, msgno, body)
        for frame in wire.read():
            assert frame.kind == RPY
        wire.feed(b"SEQ 1 %d 4096\r\n" % wire.ours[1])
    assert not wire.aborted


# -- poorly formed replies on channel zero (§2.2.2.1) -------------------------------------


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (RPY, XML_HEAD + b"<ok />"),
        (RPY, XML_HEAD + b"this is not XML"),
        (RPY, b"\r\n<profile uri='http://iana.org/beep/SASL/OTP' />"),
        (RPY, XML_HEAD + b"<profile uri='http://example.com/never-asked-for' />"),
        (RPY, b"no blank line ends these headers"),
        (ERR, b"\r\nnot an error element"),
    ],
    ids=["ok", "not-xml", "not-beep-xml", "profile-not-offered", "bad-mime", "err-not-xml"],
)
def test_poorly_formed_reply_to_start_terminates_the_session(kind: bytes, payload: bytes) -> None:
    """§2.2.2.1: "If a poorly-formed reply is received on channel zero, the session is
    terminated without generating a response". Carrying on leaves the two peers
    disagreeing about which channels exist (the peer answered RPY: for it, channel 1
    is open)."""
    wire = initiator()
    started = wire.session.start_channel([OTP])
    box = swallow(started)
    start = wire.read_one()
    assert (start.kind, start.channel) == (MSG, 0)
    with capturedLogs() as events:
        wire.send(kind, 0, start.msgno, payload)
    assert box, "the start is still waiting"
    assert wire.aborted, f"session goes on after {box[0]}"
    assert len(terminated(events)) == 1
    assert wire.read() == []


@pytest.mark.parametrize(
    "payload",
    [XML_HEAD + b"<greeting />", XML_HEAD + b"<error code='550'>no</error>", b"\r\nwhatever"],
    ids=["greeting", "error-in-rpy", "not-xml"],
)
def test_reply_to_close_that_is_not_ok_terminates_the_session(payload: bytes) -> None:
    """§2.3.1.3: a close is answered by ``ok`` (RPY) or ``error`` (ERR). Anything else in
    the RPY is a poorly formed reply on channel zero (§2.2.2.1), not an ``ok``: the
    session must end, and the channel must not be reported closed."""
    wire = initiator()
    started = wire.session.start_channel([OTP])
    start = wire.read_one()
    wire.send(RPY, 0, start.msgno, XML_HEAD + b"<profile uri='%s' />" % OTP.encode())
    channel = swallow(started)[0]
    assert isinstance(channel, Channel)
    box = swallow(channel.close())
    close = wire.read_one()
    assert mgmt.parse(Message.from_payload(close.payload).body) == mgmt.Close(1, 200)
    with capturedLogs() as events:
        wire.send(RPY, 0, close.msgno, payload)
    assert box and box[0] is not None, "close reported as done"
    assert wire.aborted
    assert len(terminated(events)) == 1


def oversized_greeting() -> bytes:
    return XML_HEAD + b"<greeting>" + b" " * 70000 + b"</greeting>"


@pytest.mark.parametrize(
    ("role", "payload"),
    [
        (Role.LISTENER, b"no blank line ends these headers"),
        (Role.INITIATOR, b"no blank line ends these headers"),
        (Role.INITIATOR, oversized_greeting()),
    ],
    ids=["listener-bad-mime", "initiator-bad-mime", "initiator-oversized"],
)
def test_poorly_formed_greeting_terminates_and_is_no_refusal(role: Role, payload: bytes) -> None:
    """A greeting RPY whose payload is poorly formed, or larger than channel zero takes,
    is a poorly formed reply on channel zero (§2.2.2.1): terminate, log
    ``beep.session-terminated``. It is not the peer refusing the session (§2.4's ERR):
    an initiator can't even refuse one, and the codes logged (500, 554) are ours."""
    # A window large enough for the oversized greeting to arrive in one frame.
    wire = Wire(role, config=SessionConfig(window=131072))
    wire.read()
    with capturedLogs() as events:
        wire.send(RPY, 0, 0, payload)
    assert [e for e in events if e.get("event") == REFUSED_BY_PEER] == []
    assert len(terminated(events)) == 1
    assert wire.aborted


# -- one-to-many replies whose answers never end ------------------------------------------


LIMIT = 16384


def waiting_for_answers() -> tuple[Wire, defer.Deferred[object]]:
    """Listener with channel 1 open, a max_message_size of LIMIT, and one MSG of ours
    (msgno 0) awaiting its reply."""
    wire = listener_with_channel_1(RecordingProfile(OTP), SessionConfig(max_message_size=LIMIT))
    pending = wire.session.channels[1].send(Message(b"tell me everything"))
    ours = wire.read_one()
    assert (ours.kind, ours.channel, ours.msgno) == (MSG, 1, 0)
    return wire, pending


@pytest.mark.parametrize("complete", [False, True], ids=["answers-left-open", "no-nul-ever"])
def test_answers_of_one_exchange_are_bounded_in_total(complete: bool) -> None:
    """Each ANS is held to max_message_size, but a peer can open any number of them at
    once (distinct ansnos, each left incomplete), or complete answers without ever
    sending the NUL; all of it stays in memory. 300 KB of answers to one MSG with a
    16 KiB message limit must not stay buffered."""
    wire, pending = waiting_for_answers()
    box = swallow(pending)
    chunk = b"\r\n" + b"a" * 998 if complete else b"a" * 1000

    def answers() -> None:
        edge = right_edge(wire, 1)
        for ansno in range(300):
            if wire.aborted or wire.theirs[1] + len(chunk) > edge:
                break
            wire.send(ANS, 1, 0, chunk, more=not complete, ansno=ansno)
            wire.read()
            edge = max(edge, right_edge(wire, 1))
            wire.seqs.clear()  # so that the test's own bookkeeping doesn't grow

    grown = retained(answers)
    assert wire.theirs[1] >= 100_000 or wire.aborted or box
    assert grown < 4 * LIMIT, f"{grown} octets kept for {wire.theirs[1]} octets of answers"


@pytest.mark.parametrize("kind", [MSG, RPY, ANS])
def test_empty_intermediate_frames_do_not_grow_memory(kind: bytes) -> None:
    """A zero-octet intermediate frame is well formed and costs no window, so a peer can
    send them without end: 25000 of them add nothing to the message, and must not
    add 25000 entries to a list of parts (a pointer each; a 1-octet frame costs a
    whole bytes object, so a message in 1-octet frames takes many times its size)."""
    wire, pending = waiting_for_answers()
    swallow(pending)
    ansno = 0 if kind == ANS else None
    # Our MSG 0 awaits the RPY/ANS; the peer's own MSG uses msgno 7.
    msgno = 7 if kind == MSG else 0
    one = wire.frame(kind, 1, msgno, b"", more=True, ansno=ansno)
    burst = one * 1000

    def flood() -> None:
        for _ in range(25):
            wire.feed(burst)
            settle(wire)

    grown = retained(flood)
    assert not wire.aborted
    assert grown < 48 * 1024, f"{grown} octets kept for 25000 empty frames"


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("kind", [MSG, RPY, ANS])
def test_a_message_in_tiny_frames_holds_memory_in_proportion_to_its_octets(
    kind: bytes, size: int
) -> None:
    """A message, reply or answer sent in frames of a few octets, left unfinished: what
    the session holds of it must be about its octets. Kept as one bytes object per frame
    in a list, each octet cost 10 to 30 more, so max_message_size on each of a session's
    channels cost that many times max_message_size."""
    wire, pending = waiting_for_answers()
    swallow(pending)
    ansno = 0 if kind == ANS else None
    msgno = 7 if kind == MSG else 0
    octets = LIMIT - 4096

    def trickle() -> None:
        sent = 0
        while sent < octets:
            room = min(right_edge(wire, 1) - wire.theirs[1], octets - sent)
            assert room >= size, "the window did not reopen"
            frames = []
            for _ in range(room // size):
                frames.append(wire.frame(kind, 1, msgno, b"x" * size, more=True, ansno=ansno))
                sent += size
            wire.feed(b"".join(frames))
            settle(wire)
            wire.read()
            wire.seqs[:-1] = []  # so that the test's own bookkeeping doesn't grow

    grown = retained(trickle)
    assert not wire.aborted
    assert grown < 2 * octets, f"{grown} octets kept for {octets} octets in {size}-octet frames"


# -- poorly formed replies on another channel (§2.2.2.1) ----------------------------------


@pytest.mark.parametrize("kind", [RPY, ANS])
def test_poorly_formed_reply_on_a_profile_channel_closes_that_channel(kind: bytes) -> None:
    """§2.2.2.1: "If a poorly-formed reply is received on another channel, then the
    channel must be closed using the procedure in Section 2.3.1.3": the session lives
    on (other channels are unharmed), our exchange fails at once, and a ``close`` for
    that channel goes out on channel zero once the exchange is over (§2.3.1.3: not
    while a MSG of ours awaits its reply, here the NUL)."""
    wire, pending = waiting_for_answers()
    box = swallow(pending)
    with capturedLogs() as events:
        wire.send(kind, 1, 0, b"no blank line ends these headers", ansno=0 if kind == ANS else None)
        settle(wire)
        assert box, "the exchange is still waiting"
        if kind == ANS:
            wire.send(NUL, 1, 0, b"")
            settle(wire)
    assert terminated(events) == [] and not wire.aborted
    ours = [f for f in wire.read() if (f.kind, f.channel) == (MSG, 0)]
    assert len(ours) == 1, "no close of channel 1 was sent"
    close = mgmt.parse(Message.from_payload(ours[0].payload).body)
    assert isinstance(close, mgmt.Close) and close.number == 1


# -- TLS: nothing may follow ready (§3.1.3.1) -----------------------------------------------


def test_frames_after_ready_while_replies_are_owed_terminate_the_session() -> None:
    """§3.1.3.1: the peer that sent ``ready`` "must not send any further traffic ...
    until a corresponding reply is received"; we first finish the replies we owe. The
    session already terminates a peer that talks after ready when ready is acted on at
    once; while it waits for a pending reply, a ``start`` sent after ready creates a
    channel and a MSG after ready reaches the profile."""
    recorder = RecordingProfile(OTP)
    wire = greeted_listener(TLSProfile(None), recorder)  # type: ignore[arg-type]
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read_one()
    handler = recorder.handlers[0]
    wire.send(MSG, 1, 0, b"\r\nslow")  # a reply we owe: ready must wait for it
    tls_start = parse_one(transcribe(RFC_START_TLS)).payload.replace(b"'1'", b"'3'")
    start_5 = parse_one(transcribe(RFC_START_TWO)).payload.replace(b"'1'", b"'5'")
    with capturedLogs() as events:
        wire.send(MSG, 0, 2, tls_start)
        assert wire.read() == [] and not wire.aborted
        wire.send(MSG, 0, 3, start_5)
        wire.send(MSG, 1, 1, b"\r\nafter ready")
    assert 5 not in wire.session.channels
    assert handler.received == [b"slow"]
    assert wire.aborted
    assert len(terminated(events)) == 1


@pytest.mark.parametrize("piggybacked", [True, False])
def test_a_peer_gone_while_ready_waits_for_replies_owed_logs_no_traceback(
    piggybacked: bool,
) -> None:
    """§3.1.3.1: ready waits for the replies we owe on other channels. A peer that hangs
    up meanwhile has ended nothing but its own session: that is no fault of the TLS
    profile, and no traceback ("profile ... failed", "Unhandled error in Deferred")
    may reach the operator's log."""
    recorder = RecordingProfile(OTP)
    wire = greeted_listener(TLSProfile(None), recorder)  # type: ignore[arg-type]
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read_one()
    wire.send(MSG, 1, 0, b"\r\nslow")  # a reply we owe: ready must wait for it
    with capturedLogs() as events:
        if piggybacked:
            tls_start = parse_one(transcribe(RFC_START_TLS)).payload.replace(b"'1'", b"'3'")
            wire.send(MSG, 0, 2, tls_start)
        else:
            start_3 = mgmt.Start(3, (mgmt.ProfileElement(TLS),)).to_xml().encode()
            wire.send(MSG, 0, 2, XML_HEAD + start_3)
            assert [(f.kind, f.channel) for f in wire.read()] == [(RPY, 0)]
            wire.send(MSG, 3, 0, XML_HEAD + b"<ready />")
        assert wire.read() == []  # waiting for the slow reply
        wire.session.connectionLost()
        gc.collect()
    assert [e for e in events if "log_failure" in e] == []


@pytest.mark.parametrize("left", ["its unfinished MSG", "our MSG unanswered"])
def test_ready_waits_for_the_replies_owed_not_for_what_the_peer_may_no_longer_send(
    left: str,
) -> None:
    """§3.1.3.1: we "wait until any pending replies have been generated and sent" before
    the proceed; the peer that sent ready sends nothing more. So neither the rest of a
    MSG it left unfinished nor its reply to a MSG of ours will ever come: waiting for
    them, the proceed never went, and the session, busy for ever, was spared even the
    idle timeout: any peer, before it said who it is, could hold one open for good."""
    recorder = RecordingProfile(OTP)
    wire = greeted_listener(TLSProfile(None), recorder)  # type: ignore[arg-type]
    switched: list[object] = []
    wire.transport.startTLS = switched.append  # type: ignore[attr-defined]
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read_one()
    ours: list[object] = []
    if left == "its unfinished MSG":
        wire.send(MSG, 1, 0, b"\r\nthe first half", more=True)
    else:
        ours = swallow(wire.session.channels[1].send(Message(b"ours")))
        assert [(f.kind, f.channel) for f in wire.read()] == [(MSG, 1)]
    tls_start = parse_one(transcribe(RFC_START_TLS)).payload.replace(b"'1'", b"'3'")

    wire.send(MSG, 0, 2, tls_start)

    [proceed] = wire.read()
    assert (proceed.kind, proceed.channel, proceed.msgno) == (RPY, 0, 2)
    assert b"proceed" in proceed.payload
    assert switched == [None]  # the transport switched to TLS
    assert recorder.handlers[0].received == []
    if ours:
        [lost] = ours
        assert isinstance(lost, Failure) and lost.check(SessionClosed)


# -- rules that held before the audit ------------------------------------------------------


def test_second_greeting_terminates_the_session() -> None:
    """§2.2.1.1: a reply to a msgno that awaits none; the greeting's msgno 0 is answered
    once."""
    wire = greeted_listener(RecordingProfile(OTP))
    with capturedLogs() as events:
        wire.feed_rfc(RFC_I_GREETING)
    assert wire.aborted and len(terminated(events)) == 1
    wire.feed_rfc(RFC_START_TWO)
    assert wire.read() == [] and 1 not in wire.session.channels


def test_a_shrunk_or_zero_window_is_never_overrun_and_regrowth_resumes() -> None:
    """RFC 3081 §3.1.2-§3.1.4: the peer may move the right edge left (RFC 1122 only says
    it SHOULD NOT) or offer a window of 0; what we send never passes the latest right
    edge, and sending resumes when it moves right again."""
    wire = listener_with_channel_1(RecordingProfile(OTP))
    channel = wire.session.channels[1]
    box = swallow(channel.send(Message(b"y" * 60000)))
    wire.feed(b"SEQ 1 0 8192\r\n")
    sent = sum(len(f.payload) for f in wire.read())
    assert 0 < sent <= 8192
    steps = [(sent, 0), (sent, 100), (sent - 10, 50), (sent, 2147483647)]
    for ackno, window in steps:
        edge = ackno + window
        wire.feed(b"SEQ 1 %d %d\r\n" % (ackno, window))
        frames: list[Frame] = wire.read()
        for f in frames:
            assert f.seqno + len(f.payload) <= edge, (ackno, window, f)
        sent += sum(len(f.payload) for f in frames)
        if window == 0:
            assert frames == []
    assert not wire.aborted
    assert sent == len(Message(b"y" * 60000).to_payload())
    assert not box  # the reply is still owed


@pytest.mark.parametrize(
    "xml",
    [
        b"<!DOCTYPE start [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>"
        b"<start number='1'><profile uri='&b;' /></start>",
        b"<!DOCTYPE start [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
        b"<start number='1'><profile uri='&x;' /></start>",
        b"<start number='2147483649'><profile uri='http://iana.org/beep/SASL/OTP' /></start>",
        b"<start number='1'><profile uri='http://iana.org/beep/SASL/OTP'><![CDATA["
        + b"z" * 5000
        + b"]]></profile></start>",
    ],
    ids=["entity-expansion", "external-entity", "number-over-2^31", "init-over-4K"],
)
def test_hostile_start_gets_an_error_reply_and_the_session_goes_on(xml: bytes) -> None:
    """§2.3.1.2/§2.3.1.5: a bad ``start`` is answered with ERR (500 for XML we refuse,
    501 for an invalid element); no channel, and the session carries on."""
    wire = greeted_listener(RecordingProfile(OTP), config=SessionConfig(window=16384))
    wire.send(MSG, 0, 1, XML_HEAD + xml)
    reply = wire.read_one()
    assert (reply.kind, reply.channel, reply.msgno) == (ERR, 0, 1)
    error = mgmt.parse(Message.from_payload(reply.payload).body)
    assert isinstance(error, mgmt.Error) and error.code in (500, 501)
    assert list(wire.session.channels) == [0]
    wire.feed_rfc(RFC_START_TWO.replace("MSG 0 1", "MSG 0 2"))
    assert wire.read_one().kind == RPY and 1 in wire.session.channels


def test_nothing_is_answered_after_the_release_ok() -> None:
    """§2.4: after ``ok`` to a release the connection closes; whatever the peer still
    sends is not acted on."""
    wire = greeted_listener(RecordingProfile(OTP))
    wire.feed_rfc(RFC_RELEASE)
    assert wire.read_one().kind == RPY and wire.hung_up
    wire.feed_rfc(RFC_START_TWO.replace("MSG 0 1", "MSG 0 2"))
    assert wire.read() == [] and 1 not in wire.session.channels


# -- messages begun and never finished (RFC 3081 §3.1) ------------------------------------

STALLED = "beep.peer-stalled"


def fill_unfinished(wire: Wire, channels: list[int], target: int) -> dict[int, int]:
    """Send '*' frames of one MSG on each of ``channels``, up to ``target`` octets each, as
    far as the session's windows let: the octets sent on each, all of them held unfinished."""
    sent = dict.fromkeys(channels, 0)
    progress = True
    while progress:
        progress = False
        for number in channels:
            room = min(right_edge(wire, number) - wire.theirs[number], target - sent[number])
            if room > 0:
                first = b"\r\n" if not sent[number] else b""
                wire.send(MSG, number, 0, first + b"x" * (room - len(first)), more=True)
                sent[number] += room
                progress = True
        wire.read()
    return sent


def test_unfinished_messages_on_many_channels_hold_no_more_than_the_budget() -> None:
    """A peer that begins a MSG on each of many channels with '*' frames and never sends
    the last (logged in: one that has not gets few channels, see below): the window is
    reopened as they arrive
    for max_long_messages of them, each of which may grow to max_message_size; every
    other stalls once a window's worth is held unfinished, where it could grow to
    max_message_size too. One beep.peer-stalled event says so; the session goes on, and
    when a long message ends a stalled one may grow in its place."""
    config = SessionConfig(max_message_size=65536, max_long_messages=2)  # a 4096 window
    wire = greeted_listener(RecordingProfile(OTP), config=config)
    wire.session.authenticated_identity = "mallory"  # as SASL sets it
    channels = [1 + 2 * n for n in range(8)]
    for number in channels:
        start = mgmt.Start(number, (mgmt.ProfileElement(OTP),))
        wire.send(MSG, 0, number, XML_HEAD + start.to_xml().encode())
    assert [f.kind for f in wire.read()] == [RPY] * len(channels)
    target = config.max_message_size - 1000
    with capturedLogs() as events:
        sent = fill_unfinished(wire, channels, target)
    budget = config.max_long_messages * config.max_message_size
    assert sum(sent.values()) <= budget + len(channels) * config.window, sent
    long = [number for number in channels if sent[number] == target]
    stalled = [number for number in channels if number not in long]
    assert len(long) == config.max_long_messages
    assert all(right_edge(wire, number) <= config.window for number in stalled)
    assert len([e for e in events if e.get("event") == STALLED]) == 1
    assert not wire.aborted

    wire.send(MSG, long[0], 0, b"")  # the end of one long message
    assert [(f.kind, f.channel) for f in wire.read()] == [(RPY, long[0])]
    grown = [number for number in stalled if right_edge(wire, number) > config.window]
    assert len(grown) == 1
    fill_unfinished(wire, grown, target - sent[grown[0]])
    assert wire.theirs[grown[0]] >= target and not wire.aborted


def test_a_session_whose_only_activity_is_an_unfinished_message_is_idle() -> None:
    """idle_timeout is about traffic: a peer that sends part of a MSG and then nothing
    holds the session no longer than one that sends nothing, while frames of the message
    still coming keep it open as any traffic does."""
    config = SessionConfig(idle_timeout=60)
    wire = listener_with_channel_1(RecordingProfile(OTP), config)
    for _ in range(3):
        wire.send(MSG, 1, 0, b"\r\npart", more=True)
        wire.clock.advance(40)
    assert not wire.hung_up
    with capturedLogs() as events:
        wire.clock.advance(21)
    assert wire.hung_up
    (idle,) = [e for e in events if e.get("event") == "beep.idle-timeout"]
    assert idle["unfinished"] == 1


def test_a_close_waiting_for_a_refused_message_to_end_is_answered() -> None:
    """A MSG over max_message_size gets its ERR 554 before it ends (§2.6.3), and a peer may
    ask to close the channel before the frame that ends it: a sender whose message was
    answered has nothing more outstanding there. The close waits for that frame, since
    the channel has a message in progress (§2.3.1.3), and then gets its ok."""
    config = SessionConfig(max_message_size=8192)
    wire = listener_with_channel_1(RecordingProfile(OTP), config)
    refusal: list[Frame] = []
    while not refusal:
        room = right_edge(wire, 1) - wire.theirs[1]
        wire.send(MSG, 1, 0, b"x" * min(room, 1000), more=True)
        refusal = wire.read()
    assert [(f.kind, f.channel) for f in refusal] == [(ERR, 1)]
    close = mgmt.Close(1, 200).to_xml().encode()
    wire.send(MSG, 0, 2, XML_HEAD + close)
    assert wire.read() == []  # the message on channel 1 is still in progress
    wire.send(MSG, 1, 0, b"")
    (ok,) = wire.read()
    assert (ok.kind, ok.channel, ok.msgno) == (RPY, 0, 2)
    assert isinstance(mgmt.parse(Message.from_payload(ok.payload).body), mgmt.OK)
    assert 1 not in wire.session.channels and not wire.aborted


@pytest.mark.parametrize("number", [1, 0], ids=["close", "release"])
def test_a_close_waiting_for_a_channel_our_own_close_ended_is_answered_ok(number: int) -> None:
    """§2.3.1.3: both peers may ask to close a channel. When the peer's close of it, or
    its release of the session (§2.4), waits for the channel to be idle (here a MSG of
    the peer's crossing our close is unfinished) and our own close's ok ends the channel
    meanwhile, the channel is closed as the peer asked: its close gets an ok, not a 451
    for a "failed" profile with a traceback in the operator's log."""
    wire = listener_with_channel_1(RecordingProfile(OTP))
    with capturedLogs() as events:
        closing = swallow(wire.session.channels[1].close())
        [ours] = wire.read()
        assert b"<close number='1'" in ours.payload
        wire.send(MSG, 1, 0, b"\r\nthe first half", more=True)  # crosses our close
        wire.send(MSG, 0, 2, XML_HEAD + mgmt.Close(number, 200).to_xml().encode())
        assert wire.read() == []  # the peer's close waits for its message to end
        wire.send(RPY, 0, ours.msgno, XML_HEAD + b"<ok />")
        [answer] = wire.read()
    assert closing == [None] and 1 not in wire.session.channels
    assert (answer.kind, answer.channel, answer.msgno) == (RPY, 0, 2)
    assert isinstance(mgmt.parse(Message.from_payload(answer.payload).body), mgmt.OK)
    assert [e for e in events if "log_failure" in e] == []
    assert not wire.aborted
    assert wire.hung_up == (number == 0)  # §2.4: a released session ends after the ok


# -- a peer that has not said who it is (RFC 3080 §3, §4) ----------------------------------

START_REFUSED = "beep.start-refused"


def test_a_peer_that_has_not_authenticated_may_open_few_channels() -> None:
    """Before TLS a relay offers the TLS profile alone, and a peer could start as many
    channels of it as max_channels allows: on each it may leave a window of a message
    unfinished (RFC 3081 §3.1.4), so with the relays' 128 KiB windows one session that never
    said who it is held 34 MiB. Beyond max_channels_unauthenticated its starts get ERR 550
    (RFC 3080 §2.3.1.2), one beep.start-refused event says so, and the session goes on,
    holding of unfinished messages a window on each channel it has, beside the
    max_long_messages that any session may be sending."""
    config = SessionConfig(window=131072)
    wire = greeted_listener(TLSProfile(None), config=config)  # type: ignore[arg-type]
    allowed = config.max_channels_unauthenticated
    channels = [1 + 2 * n for n in range(allowed + 8)]
    with capturedLogs() as events:
        for msgno, number in enumerate(channels, 1):
            start = mgmt.Start(number, (mgmt.ProfileElement(TLS),))
            wire.send(MSG, 0, msgno, XML_HEAD + start.to_xml().encode())
    replies = wire.read()
    assert [f.kind for f in replies] == [RPY] * allowed + [ERR] * 8
    codes = {mgmt.parse(Message.from_payload(f.payload).body).code for f in replies[allowed:]}
    assert codes == {550}
    assert len([e for e in events if e.get("event") == START_REFUSED]) == 1
    assert terminated(events) == [] and not wire.aborted
    opened = channels[:allowed]
    assert sorted(wire.session.channels) == [0, *opened]

    sent = fill_unfinished(wire, opened, config.max_message_size - 1000)
    budget = config.max_long_messages * config.max_message_size + allowed * config.window
    assert sum(sent.values()) <= budget, sent


# -- long messages from a peer that has not said who it is ---------------------------------

EARLY_REFUSED = "beep.message-too-large-unauthenticated"


def relay_like(**settings: int) -> SessionConfig:
    """A relay's session limits: its window and max_message_size, and the bound on messages
    before authentication that build_relay sets."""
    return SessionConfig(
        window=131072, max_message_size_unauthenticated=TUNING_MESSAGE_SIZE, **settings
    )


def start(wire: Wire, numbers: list[int], uri: str = OTP) -> None:
    for number in numbers:
        element = mgmt.Start(number, (mgmt.ProfileElement(uri),))
        wire.send(MSG, 0, 1000 + number, XML_HEAD + element.to_xml().encode())
    assert [(f.kind, f.channel) for f in wire.read()] == [(RPY, 0)] * len(numbers)


def send_in_frames(
    wire: Wire, number: int, msgno: int, payload: bytes, frame: int = 1000
) -> list[Frame]:
    """``payload`` as a MSG in frames of ``frame`` octets, each within the window; the
    frames the session wrote meanwhile."""
    written: list[Frame] = []
    sent = 0
    while sent < len(payload):
        room = right_edge(wire, number) - wire.theirs[number]
        assert room > 0, f"the window closed after {sent} octets"
        chunk = payload[sent : sent + min(room, frame)]
        sent += len(chunk)
        wire.send(MSG, number, msgno, chunk, more=sent < len(payload))
        written += wire.read()
    return written


def error_text(frame: Frame) -> tuple[int, str]:
    element = mgmt.parse(Message.from_payload(frame.payload).body)
    assert isinstance(element, mgmt.Error)
    return element.code, element.text


def test_a_peer_that_has_not_authenticated_sends_no_message_longer_than_its_bound() -> None:
    """A relay takes TLS and SASL from a peer that has not said who it is and nothing else,
    none of it longer than TUNING_MESSAGE_SIZE. A longer MSG, however many frames it comes
    in, gets the pre-emptive ERR 554 of one over max_message_size (RFC 3080 §2.6.3), saying
    that it is the limit before authentication; it is logged once a session, the rest of
    the message is dropped, and the session and its other channels go on. Once the peer
    has logged in, max_message_size applies."""
    config = relay_like()
    profile = RecordingProfile(OTP)
    wire = greeted_listener(profile, config=config)
    start(wire, [1, 3])
    limit = TUNING_MESSAGE_SIZE
    body = b"\r\n" + b"x" * limit  # the headers' CRLF makes it one octet too many
    with capturedLogs() as events:
        refusals = send_in_frames(wire, 1, 0, body) + send_in_frames(wire, 3, 0, body)
        wire.send(MSG, 1, 1, b"\r\nstill here")
        (answer,) = wire.read()
    assert [(f.kind, f.channel, f.msgno) for f in refusals] == [(ERR, 1, 0), (ERR, 3, 0)]
    for refusal in refusals:
        assert error_text(refusal) == (
            554,
            f"message exceeds the limit of {limit} octets before authentication",
        )
    assert (answer.kind, answer.channel, answer.payload) == (RPY, 1, b"\r\nre:still here")
    assert [e["limit"] for e in events if e.get("event") == EARLY_REFUSED] == [limit]
    assert [e for e in events if e.get("event") == "beep.message-too-large"] == []
    assert terminated(events) == [] and not wire.aborted
    assert [h.received for h in profile.handlers] == [[b"still here"], []]

    # One of the bound exactly is taken, on a channel that refused one.
    replies = send_in_frames(wire, 3, 1, body[:limit])
    assert {(f.kind, f.channel) for f in replies} == {(RPY, 3)}
    assert profile.handlers[1].received == [body[2:limit]]

    wire.session.authenticated_identity = "alice"  # as SASL sets it (imxp.beep.sasl)
    long = b"\r\n" + b"y" * (config.max_message_size - 2)
    (reply,) = send_in_frames(wire, 1, 2, long, frame=16384)
    assert (reply.kind, reply.channel) == (RPY, 1)
    assert profile.handlers[0].received[-1] == long[2:]


def test_a_peer_that_has_not_authenticated_has_no_long_messages() -> None:
    """The window is reopened as they arrive for max_long_messages messages longer than
    half of it (RFC 3081 §3.1.4); none of them is a message of a peer that has not said
    who it is. Here one begins a message while a MSG being processed holds half the window
    of its channel: the message waits for that MSG's answer rather than take the one long
    message there is, which the peer has for another once it has logged in."""
    config = SessionConfig(window=16384, max_message_size_unauthenticated=8192, max_long_messages=1)
    profile = RecordingProfile(OTP)
    wire = greeted_listener(profile, config=config)
    start(wire, [1, 3])
    wire.send(MSG, 1, 0, b"\r\nslow" + b"x" * 8184)  # 8192 octets, held while processed
    wire.send(MSG, 1, 1, b"\r\n" + b"y" * 98, more=True)
    assert wire.read() == []
    with capturedLogs() as events:
        wire.session.authenticated_identity = "alice"  # as SASL sets it
        long = b"\r\n" + b"z" * 49998
        (reply,) = send_in_frames(wire, 3, 0, long, frame=4096)
    assert (reply.kind, reply.channel) == (RPY, 3)
    assert [e for e in events if e.get("event") == STALLED] == []

    profile.handlers[0].pending[0].callback(Message(b"done"))
    wire.send(MSG, 1, 1, b"y" * 100)
    assert [(f.kind, f.channel, f.msgno) for f in wire.read()] == [(RPY, 1, 0), (RPY, 1, 1)]
    assert not wire.aborted


def test_what_a_peer_that_has_not_authenticated_makes_a_session_hold_is_bounded() -> None:
    """A peer that never logs in begins a message on channel zero and on each channel it
    may open before then, and sends as much of each as it is let: at the bound the session
    holds about that many bounds, and beyond, each is refused and the rest dropped as it
    comes. Without the bound, two of them grew to max_message_size and every other to a
    window: 2.3 MiB a session with a relay's limits, 74 MiB for the max_sessions_per_peer
    sessions of one address; with it, 0.3 MiB and 10 MiB."""
    config = relay_like()
    wire = greeted_listener(TLSProfile(None), config=config)  # type: ignore[arg-type]
    opened = [1 + 2 * n for n in range(config.max_channels_unauthenticated)]
    start(wire, opened, TLS)
    channels = [0, *opened]
    refusals: list[Frame] = []
    held: dict[int, int] = {}
    dropped: dict[int, int] = {}
    bound = TUNING_MESSAGE_SIZE
    rest = config.max_message_size - bound - 1

    def up_to_the_bound() -> None:
        held.update(fill_unfinished(wire, channels, bound))

    def beyond() -> None:
        for number in channels:
            wire.send(MSG, number, 0, b"x", more=True)
        refusals.extend(wire.read())
        dropped.update(fill_unfinished(wire, channels, rest))

    with capturedLogs() as events:
        holding, after = retained_after(up_to_the_bound, beyond)
    assert held == dict.fromkeys(channels, bound)
    assert len(channels) * bound < holding < 1.25 * len(channels) * bound
    assert [(f.kind, f.channel) for f in refusals] == [(ERR, n) for n in channels]
    assert {error_text(f)[0] for f in refusals} == {554}
    assert dropped == dict.fromkeys(channels, rest)
    assert after < 0.1 * len(channels) * bound, (holding, after)
    assert len([e for e in events if e.get("event") == EARLY_REFUSED]) == 1
    assert terminated(events) == [] and not wire.aborted


# -- exchanges that must not stall or clash -------------------------------------------------


def test_a_msg_cut_short_by_an_early_reply_ends_with_an_empty_frame_needing_no_window() -> None:
    """RFC 3080 §2.6.3: the peer answered (here refused) a MSG we had not finished
    sending; we end it with an empty final frame. That frame takes no window, so it must
    go out with no SEQ from the peer; else the channel stays busy and never closes."""
    wire = listener_with_channel_1(RecordingProfile(OTP))
    channel = wire.session.channels[1]
    swallow(channel.send(Message(b"x" * 10000)))
    first = wire.read_one()
    assert (first.kind, first.more, len(first.payload)) == (MSG, True, 4096)
    assert wire.read() == []  # the window the peer offered is used up

    wire.send(ERR, 1, 0, XML_HEAD + b"<error code='554'>too big</error>")
    frames = wire.read()
    closing = swallow(channel.close())

    assert [(f.kind, f.msgno, f.more, f.payload) for f in frames] == [(MSG, 0, False, b"")]
    [close] = wire.read()
    assert close.channel == 0 and b"<close number='1'" in close.payload
    assert closing == []  # waits for the peer's ok


def test_traffic_held_back_while_tls_is_asked_for_flows_when_the_peer_declines() -> None:
    """§3.1.3.1: while our ``ready`` waits for its reply we send nothing else; once the
    peer declines, what profiles queued meanwhile goes out."""
    wire = initiator()
    started = swallow(wire.session.start_channel([OTP]))
    start = wire.read_one()
    wire.send(RPY, 0, start.msgno, XML_HEAD + f"<profile uri='{OTP}' />".encode())
    [channel] = started
    asking = swallow(defer.ensureDeferred(start_tls(wire.session, object())))  # type: ignore[arg-type]
    ready = wire.read_one()
    swallow(channel.send(Message(b"hello")))  # type: ignore[attr-defined]
    assert wire.read() == []

    wire.send(ERR, 0, ready.msgno, XML_HEAD + b"<error code='550'>not now</error>")

    assert asking  # the refusal reached the caller
    assert [(f.kind, f.channel) for f in wire.read()] == [(MSG, 1)]


class ManyAnswers(Recorder):
    """Answers "all" with 1,500 ANS (§2.1.1, one-to-many), anything else with RPY."""

    def message_received(self, request):  # type: ignore[no-untyped-def]
        if request.message.body == b"all":
            for i in range(1500):
                request.answer(Message(b"answer %04d ........." % i))
            request.done()
            return None
        return Message(b"re:" + request.message.body)


class ManyAnswersProfile(RecordingProfile):
    def start(self, session, channel, init):  # type: ignore[no-untyped-def]
        channel.handler = ManyAnswers()
        return None


def test_one_to_many_answers_waiting_for_the_window_are_one_reply_owed() -> None:
    """The bound on replies owed that the peer does not take (max_pending_requests)
    counts exchanges: one MSG answered by many ANS waiting for the peer's window is one,
    and the peer's next MSG is no protocol error."""
    wire = greeted_listener(ManyAnswersProfile(OTP))
    wire.feed_rfc(RFC_START_TWO, exact=True)
    wire.read()
    wire.send(MSG, 1, 0, b"\r\nall")
    assert sum(f.kind == ANS for f in wire.read()) < 1024  # the rest wait for the window

    wire.send(MSG, 1, 1, b"\r\nnext")

    assert not wire.aborted


class NeverStarts(Profile):
    uri = "http://imxp.test/never"

    def start(self, session, channel, init):  # type: ignore[no-untyped-def]
        return defer.Deferred()


def test_the_number_of_a_channel_being_closed_is_not_started_again_before_our_ok() -> None:
    """§2.3.1.3: the channel the peer closes stays open for it until our ok arrives;
    an ok waiting behind an earlier reply (§2.6.1) keeps the number from a new start."""
    wire = greeted_listener(RecordingProfile(OTP), NeverStarts())
    started = swallow(wire.session.start_channel([OTP]))
    start = wire.read_one()
    wire.send(RPY, 0, start.msgno, XML_HEAD + f"<profile uri='{OTP}' />".encode())
    assert started and 2 in wire.session.channels
    wire.send(
        MSG,
        0,
        1,
        XML_HEAD + mgmt.Start(1, (mgmt.ProfileElement(NeverStarts.uri),)).to_xml().encode(),
    )
    wire.send(MSG, 0, 2, XML_HEAD + mgmt.Close(2, 200).to_xml().encode())
    assert wire.read() == []  # the ok waits behind the reply to the start

    swallow(wire.session.start_channel([OTP]))
    [again] = wire.read()

    assert b"<start number='4'" in again.payload
