"""A BEEP session over TCP (RFC 3080 §2.3-§2.7, RFC 3081).

:class:`Session` is a Twisted protocol wrapped around the sans-IO
:class:`~imxp.beep.frames.FrameParser`. It owns channel zero (greetings,
``start``, ``close``), numbers channels by role, keeps each channel's msgno
and seqno books, returns replies in the order their MSGs arrived, reassembles
and fragments messages, and runs RFC 3081 flow control in both directions.

Profiles plug in by URI through :class:`Profile`; each open channel is served
by a :class:`ChannelHandler`. Sending a MSG returns a Deferred of the reply.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from imxp import logs
from imxp.beep import mgmt
from imxp.beep.frames import (
    ANS,
    ERR,
    MAX_31,
    MSG,
    NUL,
    RPY,
    Frame,
    FrameError,
    FrameParser,
    SeqFrame,
    add_piece,
    serialize_frame,
    serialize_seq,
)
from imxp.beep.message import Message, MessageError
from imxp.beep.tlsctx import peer_certificate

__all__ = [
    "BEEPError",
    "Channel",
    "ChannelHandler",
    "Profile",
    "Request",
    "Role",
    "Session",
    "SessionClosed",
    "NotSent",
    "SessionConfig",
    "SessionFactory",
    "StartReply",
    "TUNING_MESSAGE_SIZE",
    "all_of",
]

_MOD = 1 << 32
_HALF = 1 << 31
# Channel-zero traffic is small XML (a profile's init content is <= 4K, §2.3.1.2).
_MAX_MGMT_MESSAGE = 65536

#: Room enough for every message of a peer that only tunes the session before it says who
#: it is (TLS and SASL, RFC 3080 §3.1, §4.1): a start carries at most 4096 octets of a
#: profile's content (§2.3.1.2), TLS's ready is no longer (imxp.beep.tls) and a SASL blob
#: at most 8192 (imxp.beep.sasl). A SessionConfig.max_message_size_unauthenticated for
#: those that need nothing more before login, as relays (RFC 3340 §3, §4.5).
TUNING_MESSAGE_SIZE = 65536


def all_of(waits: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    """Fires once every one of ``waits`` has; fails with the first failure itself (the
    session's end, as a rule), not gatherResults' wrapper of it, which a session logs as
    its profile's bug."""

    def unwrapped(failure: Failure) -> Failure:
        return failure.value.subFailure if failure.check(defer.FirstError) else failure

    return defer.gatherResults(waits, consumeErrors=True).addErrback(unwrapped)


def _mgmt(element: Any) -> Message:
    return Message(element.to_xml().encode("utf-8"), mgmt.BEEP_XML)


class Role(enum.Enum):
    """§2.1: who opened the TCP connection."""

    INITIATOR = "initiator"
    LISTENER = "listener"


class BEEPError(Exception):
    """A negative reply: a reply code of RFC 3080 §8 and a diagnostic."""

    def __init__(self, code: int, text: str = "", message: Message | None = None) -> None:
        super().__init__(f"{code} {text}".strip())
        self.code = code
        self.text = text
        self.message = message

    @classmethod
    def from_message(cls, message: Message) -> BEEPError:
        element = mgmt.parse_error(message.body) if message.content_type == mgmt.BEEP_XML else None
        if element is None:
            return cls(550, message.body[:200].decode("utf-8", "replace"), message)
        return cls(element.code, element.text, message)


class SessionClosed(Exception):
    """The session ended (or was tuned anew) before the exchange completed."""


class NotSent(SessionClosed):
    """The session or channel ended, or was closing, before any octet of our MSG was
    written: the peer never saw it, so sending it again cannot make it arrive twice."""


#: Unanswered keepalive probes after which the system takes the peer for gone.
KEEPALIVE_PROBES = 4


def _probe_after(transport: Any, seconds: float) -> None:
    """Keepalive probes after ``seconds`` of silence, spread over ``seconds`` more (where
    the system lets them be set: Linux, the BSDs, macOS).

    A peer that vanished without a word - a laptop closed, a phone moved from Wi-Fi to
    mobile data - holds its endpoints attached until its session is known to be gone:
    with the system's two hours, every attempt of the application to attach again from
    its new address meanwhile is refused with 554 (RFC 3340 §4.4.1 step 5), and data to
    it waits for a timeout.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    for option, value in (
        (idle, max(1, round(seconds))),
        (getattr(socket, "TCP_KEEPINTVL", None), max(1, round(seconds / KEEPALIVE_PROBES))),
        (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
    ):
        if option is not None:
            try:
                handle.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                return


def peer_host(address: Any) -> str:
    """The IP address of a Twisted peer ``address`` as text, ``"?"`` when it has none.

    A listener on ``tcp6:...:interface=\\:\\:`` takes IPv4 connections too (Linux's
    default), and sees them as ``::ffff:192.0.2.1`` (RFC 4291 §2.5.5.2); that is the
    IPv4 address here, so that logs and limits treat a peer alike on either listener.
    """
    host = str(getattr(address, "host", "?"))
    try:
        parsed = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else host


def address_text(address: Any) -> str:
    """A Twisted address as logs show it: ``192.0.2.1:4711``, ``[2001:db8::1]:4711`` (the
    brackets keep the port apart), or the address's own text when it has no port."""
    port = getattr(address, "port", None)
    if port is None:
        return str(address)
    return host_port(peer_host(address), port)


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets so that the port stands apart."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: The IPv6 prefix counted as one peer by the limits on anonymous sessions and failed logins.
IPV6_PEER_PREFIX = 64


def peer_network(host: str) -> str:
    """What limits against abuse count as one peer: an IPv4 address, or the /64 of an IPv6
    address. One host may be given a whole /64 (RFC 8273) and pick any address in it, so
    a limit per IPv6 address would limit nothing."""
    try:
        parsed = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if parsed.version == 4:
        return host
    return str(ipaddress.ip_network(f"{parsed}/{IPV6_PEER_PREFIX}", strict=False))


@dataclass
class SessionConfig:
    """Limits and timeouts of one session. Every value can be set by the deployment."""

    #: RFC 3081 §3.1.1: the receive window we offer on each channel.
    window: int = 4096
    #: Largest payload we put in one frame (further bounded by the peer's window).
    frame_size: int = 16384
    #: Largest reassembled message we accept; larger ones get a pre-emptive ERR 554.
    max_message_size: int = 1 << 20
    #: Largest message, reply or answer taken while the peer has not said who it is (see
    #: Session.peer_authenticated), and no more than half the window: longer ones are
    #: refused as for max_message_size, and none is one of the max_long_messages before
    #: then. None: max_message_size applies from the start. A peer that never logs in
    #: could otherwise make its session hold max_long_messages of max_message_size; one
    #: that only tunes the session before it does needs TUNING_MESSAGE_SIZE.
    max_message_size_unauthenticated: int | None = None
    #: Channels (besides zero) open at once; §2.3 asks for at least 257.
    max_channels: int = 257
    #: Channels (besides zero) open at once while the peer has not said who it is (see
    #: Session.peer_authenticated); more are refused with ERR 550. On each channel a peer
    #: may leave a window of a message unfinished (RFC 3081 §3.1.4): with max_channels of
    #: a relay's 128 KiB windows, a peer that never logged in made its session hold 34 MiB.
    #: Before TLS and SASL it needs channels for those tuning profiles only (RFC 3080 §3,
    #: §4): one for TLS, one for a SASL exchange, and room for a next attempt while the
    #: last one's channel is closing.
    max_channels_unauthenticated: int = 4
    #: MSGs received on one channel and not yet answered.
    max_pending_requests: int = 1024
    #: Messages longer than half their channel's window that the peer may be sending at
    #: once. The octets of a message not yet complete are charged against its channel's
    #: window as those of MSGs being processed are, so the peer can leave at most a window
    #: unfinished on each channel; only for this many messages at once is the window
    #: reopened as they arrive, up to max_message_size each, and the peer's other long
    #: messages wait, stalled by their windows (RFC 3081 §3.1), until one of these is
    #: complete. What a session holds of messages not yet complete is thus at most this
    #: many max_message_size plus a window per channel; reopened for all, each of 257
    #: channels could hold max_message_size, 257 MiB a session by default. 2: relays and
    #: applications carry their data on one channel, and a second lets a long message on
    #: another go at the same time, for 1 MiB more a session.
    max_long_messages: int = 2
    #: Seconds to wait for the peer's greeting.
    greeting_timeout: float = 30.0
    #: Seconds without any frame before an idle session is closed (None: never).
    idle_timeout: float | None = 600.0
    #: Seconds a closed TLS connection waits for the peer's close_notify before it is cut.
    #: Twisted's TLS keeps the socket open until the peer answers, and a peer that never
    #: does (a frozen relay, a black hole, or one that means harm) would hold it for ever.
    close_timeout: float = 5.0
    #: Seconds a connection may be silent before TCP keepalive probes begin; a peer that
    #: answers none of the KEEPALIVE_PROBES sent over as many seconds again is gone (None:
    #: the system's settings, two hours and more on Linux).
    keepalive: float | None = 60.0
    #: Frames acted on in one reactor turn before the replies so far are written. Fewer
    #: let the peer start on the replies sooner; more spend less per frame on writes and
    #: turns. In bench/relay_chain.py 6 cost 10% more CPU per data at a lower rate, 24
    #: gave the rate of 12, and 48 a lower and less steady one.
    frames_per_turn: int = 12
    #: Bytes queued on a channel before its registered producer is paused.
    send_high_water: int = 256 * 1024
    features: tuple[str, ...] = ()
    localize: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.window < 4096:
            # RFC 3081 §3.1.1: a peer unable to offer 4096 octets must decline the channel.
            raise ValueError("window must be at least 4096 octets")
        if self.frame_size < 1:
            raise ValueError("frame_size must be positive")
        if self.frames_per_turn < 1:
            raise ValueError("frames_per_turn must be positive")
        if self.close_timeout < 0:
            raise ValueError("close_timeout must not be negative")
        if self.max_long_messages < 1:
            # None could be longer than the window: the peer would wait for ever.
            raise ValueError("max_long_messages must be positive")
        if self.max_channels_unauthenticated < 1:
            # A peer could not even start TLS or SASL, and so never get more.
            raise ValueError("max_channels_unauthenticated must be positive")
        if (
            self.max_message_size_unauthenticated is not None
            and self.max_message_size_unauthenticated < 1
        ):
            raise ValueError("max_message_size_unauthenticated must be positive")


@dataclass(frozen=True)
class StartReply:
    """What :meth:`Profile.start` may return: the piggybacked content, and an action
    to run once the reply carrying it has been written (a tuning profile switches
    the transport then, RFC 3080 §3.1.3.2)."""

    content: bytes | None
    after_sent: Callable[[], None] | None = None


class ChannelHandler:
    """Serves one channel. The default refuses every MSG, as §2.7 allows."""

    def channel_opened(self, channel: Channel) -> None:
        """Called once the channel exists (before any of its frames arrive)."""

    def message_received(
        self, request: Request
    ) -> Message | BEEPError | defer.Deferred[Message] | defer.Deferred[BEEPError] | None:
        """Answer ``request``: return a reply (or a Deferred of one) for RPY, raise or
        return :class:`BEEPError` for ERR, or return None and use the request's methods
        (``answer``/``done`` for a one-to-many exchange)."""
        raise BEEPError(500, "this channel accepts no messages")

    def close_requested(self, code: int) -> None:
        """The peer asks to close the channel; raise BEEPError to decline (§2.3.1.3)."""

    def keeps_session_open(self) -> bool:
        """Whether a quiet session must stay open for this channel's sake (an
        application waiting for data); the idle timeout then spares it."""
        return False

    def channel_closed(self, reason: Failure | None) -> None:
        """The channel is gone: closed (reason None) or lost with the session."""

    def error_message(self, code: int, text: str) -> Message:
        """The payload of an ERR this profile sends. Defaults to §2.3.1.5's element."""
        return _mgmt(mgmt.Error(code, text))


class Profile:
    """A profile, registered on a session factory by its URI."""

    uri: str = ""

    def offered(self, session: Session) -> bool:
        """Whether the greeting lists this profile now (tuning profiles vanish once used)."""
        return True

    def start(
        self, session: Session, channel: Channel, init: bytes | None
    ) -> bytes | StartReply | defer.Deferred[Any] | None:
        """The peer asks for a channel with this profile. Set ``channel.handler``
        and return the content piggybacked in the reply (§2.3.1.2) - bytes, a
        :class:`StartReply`, or a Deferred of either - or raise :class:`BEEPError`
        to refuse."""
        raise NotImplementedError


class Request:
    """One MSG received on a channel, answered through this object in order (§2.6.1)."""

    __slots__ = (
        "_answers",
        "_buffer",
        "_dead",
        "_finished",
        "channel",
        "cost",
        "message",
        "msgno",
        "on_sent",
    )

    def __init__(self, channel: Channel, msgno: int, message: Message, cost: int) -> None:
        self.channel = channel
        self.msgno = msgno
        self.message = message
        self.cost = cost
        #: Run once the final frame of the reply has been written.
        self.on_sent: Callable[[], None] | None = None
        self._answers = 0
        self._finished = False
        # Set when the channel is gone: late replies are dropped, not errors.
        self._dead = False
        # Replies made before those to earlier MSGs were sent (§2.6.1).
        self._buffer: list[tuple[bytes, bytes, int | None]] | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def reply(self, message: Message) -> None:
        """A positive reply (RPY)."""
        self._final(RPY, message.to_payload())

    def error(self, code: int, text: str = "", message: Message | None = None) -> None:
        """A negative reply (ERR), by default the channel profile's error element."""
        if message is None:
            handler = self.channel.handler
            message = handler.error_message(code, text)
        self._final(ERR, message.to_payload())

    def answer(self, message: Message) -> int:
        """One ANS of a one-to-many exchange (§2.1.1); returns its ansno."""
        if self._dead:
            return -1
        if self._finished:
            raise RuntimeError("reply already complete")
        ansno = self._answers
        self._answers += 1
        self.channel._reply(self, ANS, message.to_payload(), ansno)
        return ansno

    def done(self) -> None:
        """The NUL ending a one-to-many exchange."""
        self._final(NUL, b"")

    def _final(self, kind: bytes, payload: bytes) -> None:
        if self._dead:
            return
        if self._finished:
            raise RuntimeError("reply already complete")
        if kind != NUL and self._answers:
            raise RuntimeError("a one-to-many exchange ends with done()")
        self._finished = True
        self.channel._reply(self, kind, payload, None)


# Marks an answer whose remaining frames are dropped because it grew too big.
# Of a peer that asked for tuning while we owe it replies: only SEQ frames may come.
_SEQ_ONLY = "seq-only"
# What an answer being reassembled is charged besides its octets.
_OPEN_ANSWER = 256


class _Outstanding:
    """A MSG we sent, waiting for its reply."""

    __slots__ = (
        "answers",
        "deferred",
        "kind",
        "on_answer",
        "parts",
        "partial",
        "sending",
        "size",
        "toobig",
    )

    def __init__(
        self, deferred: defer.Deferred[Any], on_answer: Callable[[Message, int], None] | None
    ) -> None:
        self.deferred = deferred
        self.on_answer = on_answer
        self.kind: bytes | None = None
        # The MSG itself while it is not completely written (for §2.6.3).
        self.sending: _OutMessage | None = None
        # The books below are set up by begin(), only for a reply that is not a single
        # RPY frame: most replies never need them.

    def begin(self) -> None:
        """Set up reassembly, at the first frame of a fragmented or one-to-many reply."""
        self.parts: list[bytes | bytearray] = []
        self.size = 0
        self.toobig = False
        self.answers: list[Message] = []
        # ansno -> frames of an answer being reassembled
        self.partial: dict[int, list[bytes | bytearray]] = {}

    def discard(self) -> None:
        """The one-to-many exchange has failed: keep nothing more of it (toobig)."""
        self.toobig = True
        self.partial = {}
        self.answers = []
        self.size = 0


class _OutMessage:
    """A message queued for sending, cut into frames as the peer's window allows."""

    __slots__ = ("ansno", "data", "kind", "msgno", "offset", "on_sent", "outstanding")

    def __init__(
        self,
        kind: bytes,
        msgno: int,
        data: bytes,
        ansno: int | None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.msgno = msgno
        self.data = data
        self.ansno = ansno
        self.offset = 0
        self.on_sent = on_sent
        self.outstanding: _Outstanding | None = None


class Channel:
    """One channel of a session: its profile, its handler, and both directions' books."""

    __slots__ = (
        "_announced",
        "_closing",
        "_held",
        "_idle_waiters",
        "_in_discard",
        "_in_long",
        "_in_msgno",
        "_in_parts",
        "_in_ready",
        "_in_size",
        "_last_kind",
        "_last_more",
        "_last_msgno",
        "_next_msgno",
        "_outstanding",
        "_producer",
        "_producer_paused",
        "_queue",
        "_queued_bytes",
        "_queued_answers",
        "_queued_replies",
        "_recv_limit",
        "_recv_seqno",
        "_reply_waiters",
        "_request_msgnos",
        "_requests",
        "_send_limit",
        "_send_seqno",
        "_send_window",
        "_window",
        "_window_dirty",
        "handler",
        "number",
        "profile",
        "session",
        "start_reply",
    )

    def __init__(
        self, session: Session, number: int, profile: str, handler: ChannelHandler
    ) -> None:
        self.session = session
        self.number = number
        self.profile = profile
        self.handler = handler
        #: Content the peer piggybacked on the reply to our ``start`` (§2.3.1.2).
        self.start_reply: bytes | None = None
        # Sending. RFC 3081 §3.1.1: the peer's window starts at 4096 whatever it offers.
        self._send_seqno = 0
        self._send_limit = 4096
        # The window the peer's last SEQ offered.
        self._send_window = 4096
        # Made a deque when first needed: most messages never queue (see _transmit), and
        # an empty deque costs 760 octets on each of a relay's many idle channels.
        self._queue: deque[_OutMessage] | tuple[()] = ()
        self._queued_bytes = 0
        # Replies to the peer's MSGs waiting to be written, and of them the ANS, which
        # the requests that owe them may have many of (see Session._msg_frame).
        self._queued_replies = 0
        self._queued_answers = 0
        self._in_ready = False
        # False while the reply to the peer's start is unwritten: the peer doesn't know
        # the channel yet, and a frame on it would be poorly formed (§2.2.1.1).
        self._announced = True
        self._window_dirty = False
        self._next_msgno = 1 if number == 0 else 0
        self._outstanding: dict[int, _Outstanding] = {}
        # Receiving.
        self._window = session.config.window
        self._recv_seqno = 0
        self._recv_limit = 4096
        self._last_more = False
        self._last_msgno = -1
        self._last_kind = b""
        self._in_msgno: int | None = None
        self._in_parts: list[bytes | bytearray] = []
        # Octets of the message being reassembled (0 when there is none, or it is dropped).
        self._in_size = 0
        self._in_discard = False
        # Whether that message is one of the session's max_long_messages (see _seq_for).
        self._in_long = False
        # A list, not a deque: few requests wait at once, and an empty list is 56 octets.
        self._requests: list[Request] = []
        self._request_msgnos: set[int] = set()
        # Octets of received MSGs still being processed, charged against the window.
        self._held = 0
        self._closing = False
        self._idle_waiters: list[defer.Deferred[None]] = []
        # Made a list when first needed, as _queue is: only a tuning request waits so.
        self._reply_waiters: list[defer.Deferred[None]] | tuple[()] = ()
        self._producer: interfaces.IPushProducer | None = None
        self._producer_paused = False

    def __repr__(self) -> str:
        return f"<Channel {self.number} {self.profile}>"

    # -- sending ---------------------------------------------------------

    def send(
        self, message: Message, on_answer: Callable[[Message, int], None] | None = None
    ) -> defer.Deferred[Any]:
        """Send a MSG.

        The Deferred fires with the RPY's :class:`Message`; for a one-to-many
        reply, with the list of ANS messages once NUL arrives (when ``on_answer``
        is given each answer goes there as it completes and the list is empty).
        A negative reply fails it with :class:`BEEPError`; a lost session with
        :class:`SessionClosed`, or :class:`NotSent` when no octet of it was written.
        """
        if self.session._gone:
            return defer.fail(NotSent("session is closed"))
        if self._closing:
            # Not the peer's refusal of this MSG: it never saw it (§2.3.1.3, §2.4).
            return defer.fail(NotSent("channel is closing"))
        outstanding = self._outstanding
        msgno = self._next_msgno
        # §2.2.1.1: a msgno differs from every MSG still awaiting its reply.
        while msgno in outstanding:
            msgno = (msgno + 1) & MAX_31
        self._next_msgno = (msgno + 1) & MAX_31
        d: defer.Deferred[Any] = defer.Deferred()
        pending = outstanding[msgno] = _Outstanding(d, on_answer)
        self._transmit(MSG, msgno, message.to_payload(), None, None, pending)
        return d

    def close(self, code: int = 200, text: str = "") -> defer.Deferred[None]:
        """Close this channel (§2.3.1.3) once it is idle."""
        return self.session._close_channel(self, code, text)

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted for sending but not yet written to the transport."""
        return self._queued_bytes

    def register_producer(self, producer: interfaces.IPushProducer) -> None:
        """Pause ``producer`` while more than ``send_high_water`` bytes wait to be sent."""
        self._producer = producer
        self._check_producer()

    def unregister_producer(self) -> None:
        self._producer = None

    def _check_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        high = self.session.config.send_high_water
        if not self._producer_paused and self._queued_bytes > high:
            self._producer_paused = True
            producer.pauseProducing()
        elif self._producer_paused and self._queued_bytes <= high // 2:
            self._producer_paused = False
            producer.resumeProducing()

    def _transmit(
        self,
        kind: bytes,
        msgno: int,
        data: bytes,
        ansno: int | None,
        on_sent: Callable[[], None] | None = None,
        outstanding: _Outstanding | None = None,
    ) -> None:
        """Send a message: at once as a single frame when nothing on this channel is
        queued before it and the peer's window takes it whole, otherwise through the
        queue, cut into frames as the window allows (RFC 3081 §3.1.4).

        Most messages are small and most windows open, so most take the first way and
        skip the queue's bookkeeping.

        In the queue a reply goes ahead of the MSGs not yet begun, after the replies
        before it (RFC 3080 §2.6.1 orders replies among themselves, and §2.2.1 only
        forbids cutting into a message begun). Behind our own MSGs it would wait for
        the peer to answer them, while the peer may be waiting for this reply, to a
        MSG of its own, before it opens its window again: a sender pipelining
        thousands of MSGs would leave its replies owed without bound.
        """
        session = self.session
        size = len(data)
        seqno = self._send_seqno
        if (
            not self._queue
            and (size == 0 or size <= (self._send_limit - seqno) % _MOD < _HALF)
            and size <= session.config.frame_size
            and self._announced
            # Nothing may be written ahead of the queues while the transport is full,
            # nor while tuning (but on channel zero), nor on a channel of the past.
            and not (session._paused or session._gone or (session._tuning and self.number))
            and session._channels.get(self.number) is self
            and session.transport is not None
        ):
            session._out.append(
                serialize_frame(kind, self.number, msgno, False, seqno, data, ansno)
            )
            self._send_seqno = (seqno + size) % _MOD
            if on_sent is not None:
                session._after_write.append(on_sent)
            if not session._in_receive:
                session._flush()
            return
        out = _OutMessage(kind, msgno, data, ansno, on_sent)
        if outstanding is not None:
            out.outstanding = outstanding
            outstanding.sending = out
        queue = self._queue
        if not isinstance(queue, deque):
            queue = self._queue = deque()
        if kind == MSG:
            queue.append(out)
        else:
            at = self._queued_replies
            if queue and queue[0].kind == MSG and queue[0].offset:
                at += 1  # a MSG begun is finished first
            if at < len(queue):
                queue.insert(at, out)
            else:
                queue.append(out)
            self._queued_replies += 1
            if kind == ANS:
                self._queued_answers += 1
        self._queued_bytes += size
        session._ready_channel(self)
        if self._producer is not None:
            self._check_producer()

    def _next_frame(self, frame_size: int) -> bytes | None:
        """The next frame of the head message within the peer's window, or None."""
        queue = self._queue
        assert isinstance(queue, deque)
        out = queue[0]
        avail = (self._send_limit - self._send_seqno) % _MOD
        if avail >= _HALF:
            avail = 0
        remaining = len(out.data) - out.offset
        n = min(remaining, avail, frame_size)
        if n == 0 and remaining:
            return None
        if n < remaining and n < frame_size and n < self._send_window // 2:
            # Silly window avoidance (RFC 1122 §4.2.3.4 applied to RFC 3081 §3.1.4's
            # windows): rather than cut a sliver off this message, wait for the SEQ
            # that acknowledges what is in flight, more than half the window. The
            # peer's profile could act on none of a sliver until the rest arrived.
            return None
        offset = out.offset
        chunk = out.data if (offset == 0 and n == remaining) else out.data[offset : offset + n]
        more = n < remaining
        frame = serialize_frame(
            out.kind, self.number, out.msgno, more, self._send_seqno, chunk, out.ansno
        )
        self._send_seqno = (self._send_seqno + n) % _MOD
        out.offset = offset + n
        self._queued_bytes -= n
        if not more:
            queue.popleft()
            if out.kind != MSG:
                self._queued_replies -= 1
                if out.kind == ANS:
                    self._queued_answers -= 1
            if out.outstanding is not None:
                out.outstanding.sending = None
            if out.on_sent is not None:
                self.session._after_write.append(out.on_sent)
        return frame

    def _reply_arrived_early(self, out: _OutMessage) -> None:
        """§2.6.3: a reply came before our MSG was fully sent; end it with an empty
        final frame. A reply to a MSG of which no frame was sent is poorly formed."""
        if out.offset == 0:
            raise FrameError(f"reply to msgno {out.msgno}, which was never sent")
        self._queued_bytes -= len(out.data) - out.offset
        out.data = out.data[: out.offset]
        # The empty frame needs no window: no SEQ need come to let it out.
        self.session._ready_channel(self)

    # -- replies to the peer's MSGs --------------------------------------

    def _reply(self, request: Request, kind: bytes, payload: bytes, ansno: int | None) -> None:
        requests = self._requests
        if requests and requests[0] is request:
            on_sent = request.on_sent if kind != ANS else None
            self._transmit(kind, request.msgno, payload, ansno, on_sent)
            if kind != ANS:
                self._request_done()
        else:
            # §2.6.1: replies go out in the order the MSGs arrived.
            if request._buffer is None:
                request._buffer = []
            request._buffer.append((kind, payload, ansno))

    def _request_done(self) -> None:
        requests = self._requests
        while requests and requests[0]._finished:
            done = requests.pop(0)
            self._request_msgnos.discard(done.msgno)
            self._held -= done.cost
            if requests and requests[0]._buffer:
                head = requests[0]
                buffered, head._buffer = head._buffer, None
                for kind, payload, ansno in buffered:
                    on_sent = head.on_sent if kind != ANS else None
                    self._transmit(kind, head.msgno, payload, ansno, on_sent)
        self.session._update_window(self)
        self._maybe_idle()

    # -- dispatch to the profile -------------------------------------------

    def _dispatch(self, request: Request) -> None:
        try:
            result = self.handler.message_received(request)
        except Exception:
            self._dispatch_failed(request, Failure())
            return
        if result is None:
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                lambda answer: None if request.finished else self._answer(request, answer),
                lambda f: self._dispatch_failed(request, f),
            )
        else:
            self._answer(request, result)

    def _answer(self, request: Request, answer: object) -> None:
        """Send what the profile answered: a Message as RPY, a BEEPError as ERR."""
        if isinstance(answer, Message):
            request.reply(answer)
        elif isinstance(answer, BEEPError):
            request.error(answer.code, answer.text, answer.message)
        else:
            # Not the peer's doing: a fault of the profile, which the peer hears as 451.
            wrong = TypeError(f"answered with {type(answer).__name__}, not Message or BEEPError")
            self._dispatch_failed(request, Failure(wrong))

    def _dispatch_failed(self, request: Request, failure: Failure) -> None:
        if request.finished or (self.session._gone and failure.check(SessionClosed)):
            # Nobody is left to answer: the session ended while the MSG was processed.
            return
        if failure.check(BEEPError):
            e = failure.value
            request.error(e.code, e.text, e.message)
            return
        self.session.log.failure(
            "profile {profile} failed on a MSG from {peer}",
            failure=failure,
            profile=self.profile,
            peer=self.session.peer,
            event="beep.profile-failure",
        )
        request.error(451, "local error in processing")

    # -- idleness, for close ---------------------------------------------

    def _busy(self) -> bool:
        """Whether we are at work on this channel: sending, awaiting a reply, answering."""
        return bool(self._queue or self._outstanding or self._requests)

    def _idle(self) -> bool:
        return not self._busy() and self._in_msgno is None

    def _when_idle(self) -> defer.Deferred[None]:
        if self._idle():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _replied(self) -> bool:
        return not self._requests and not self._queued_replies

    def _when_replied(self) -> defer.Deferred[None]:
        """Fires once every MSG the peer sent on this channel is answered and the
        answers are written: what a tuning request waits for (RFC 3080 §3.1.3.1, "wait
        until any pending replies have been generated and sent"). Unlike idleness, it
        asks nothing more of the peer, which sends nothing from its request on: neither
        the rest of a MSG it left unfinished, nor its replies to MSGs of ours."""
        if self._replied():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        if not self._reply_waiters:
            self._reply_waiters = []
        self._reply_waiters.append(d)  # type: ignore[union-attr]
        return d

    def _maybe_idle(self) -> None:
        if self._reply_waiters and self._replied():
            replied, self._reply_waiters = self._reply_waiters, ()
            for d in replied:
                d.callback(None)
        if self._idle_waiters and self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)


class _ManagementHandler(ChannelHandler):
    """Channel zero's profile (§2.3; registration in §6.1)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def message_received(self, request: Request) -> defer.Deferred[Message]:
        message = request.message
        if message.content_type != mgmt.BEEP_XML:
            raise BEEPError(500, f"channel zero carries {mgmt.BEEP_XML} only")
        try:
            element = mgmt.parse(message.body)
        except mgmt.MgmtError as e:
            raise BEEPError(e.code, e.text) from None
        if isinstance(element, mgmt.Start):
            return self.session._start_requested(element, request)
        if isinstance(element, mgmt.Close):
            return self.session._close_requested(element, request)
        raise BEEPError(501, f"unexpected {type(element).__name__.lower()} element in a MSG")


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class Session(Protocol):
    """One BEEP session (RFC 3080) over TCP (RFC 3081)."""

    log = logs.Logger()
    # Channels being closed for a poorly formed reply; a set of its own only when
    # one is, since a relay keeps thousands of sessions.
    _closing_poorly: frozenset[int] | set[int] = frozenset()

    def __init__(
        self,
        role: Role,
        profiles: Iterable[Profile] = (),
        config: SessionConfig | None = None,
        clock: interfaces.IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.role = role
        self.config = config or SessionConfig()
        self.clock = clock
        self.profiles: dict[str, Profile] = {p.uri: p for p in profiles}
        #: The authorised identity from SASL (RFC 3080 §4), None until then.
        self.authenticated_identity: str | None = None
        self.authenticated_mechanism: str | None = None
        #: True when the SASL login was ANONYMOUS (RFC 4505): ``authenticated_identity`` is
        #: then a placeholder that names nobody, and grants nothing by its name.
        self.authenticated_anonymously = False
        #: Where the listener side of SASL keeps its exchanges' turns (imxp.beep.sasl).
        self.sasl_turns: Any = None
        #: The peer's certificate (cryptography x509) once TLS is active.
        self.peer_certificate: Any = None
        self.tls_active = False
        #: The first successful start's serverName (§2.3.1.2).
        self.server_name: str | None = None
        # Whether a start succeeded: only the first one's serverName counts.
        self._started_once = False
        #: The peer's greeting, None until it arrives (again after each tuning reset).
        self.peer_greeting: mgmt.Greeting | None = None
        #: Decides whether we operate as a requested serverName (§2.3.1.2).
        self.accept_server_name: Callable[[str], bool] = lambda name: True
        #: Set by the factory for a listener that must refuse the session with 421 (§2.4).
        self.unavailable: str | None = None
        #: Called once when the connection is gone (the factory counts sessions).
        self.on_lost: Callable[[Session], None] | None = None
        #: Called when a peer has authenticated to this listener with SASL.
        self.on_authenticated: Callable[[Session], None] | None = None
        #: The peer's address as logs show it: ``192.0.2.1:4711`` or ``[2001:db8::1]:4711``.
        self.peer = "?"
        #: The peer's IP address alone, an IPv4 one unmapped (:func:`peer_host`).
        self.peer_host = "?"
        #: Why this side ended the session without a reply, if it did (:meth:`abort`).
        self.aborted: str | None = None
        #: True when it did so because the peer broke the protocol (§2.2.1.1): it speaks
        #: something other than BEEP, or BEEP badly; False for a timeout.
        self.violated = False
        self._gone = False
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._greeting_waiters: list[defer.Deferred[mgmt.Greeting]] = []
        self._after_write: list[Callable[[], None]] = []
        self._pending_seq: list[bytes] = []
        self._in_receive = False
        self._paused = False
        self._tuning = False
        self._peer_silent: bool | str = False
        self._generation = 0
        self._greet_on_handshake = False
        self._refusal: Failure | None = None
        self._request_overhead = -(-self.config.window // self.config.max_pending_requests)
        # Of max_long_messages, those not being received now (see _seq_for).
        self._long_left = self.config.max_long_messages
        # Whether a peer stalled for want of them was logged since one was last free.
        self._stall_logged = False
        # Whether a start was refused for max_channels_unauthenticated: logged once, since
        # a peer may ask again and again.
        self._start_refusal_logged = False
        # Likewise for a message over max_message_size_unauthenticated.
        self._early_refusal_logged = False
        self._greeting_timer: interfaces.IDelayedCall | None = None
        self._idle_timer: interfaces.IDelayedCall | None = None
        self._last_activity = 0.0
        # Frames received and not yet acted on (see _process).
        self._backlog: list[Frame | SeqFrame] | None = None
        self._turn_call: interfaces.IDelayedCall | None = None
        # What cuts a connection whose peer does not answer our close (see disconnect).
        self._cut_call: interfaces.IDelayedCall | None = None
        # Frames this session may still act on before it yields to the reactor.
        self._turn_budget = self.config.frames_per_turn
        self._reset_channels()

    # -- public API --------------------------------------------------------

    @property
    def channels(self) -> dict[int, Channel]:
        return self._channels

    @property
    def peer_authenticated(self) -> bool:
        """Whether the peer has said who it is: by a TLS certificate (RFC 3080 §3.1; the
        contexts of :mod:`imxp.beep.tlsctx` let none through that does not verify), or, to
        a listener, by logging in with SASL (§4.1). An initiator's SASL login says who the
        initiator is, not who its peer is."""
        if self.peer_certificate is not None:
            return True
        return self.role is Role.LISTENER and (
            self.authenticated_identity is not None or self.authenticated_mechanism is not None
        )

    def greeted(self) -> defer.Deferred[mgmt.Greeting]:
        """Fires with the peer's greeting (the new one, after a tuning reset)."""
        if self.peer_greeting is not None:
            return defer.succeed(self.peer_greeting)
        if self._refusal is not None:
            # §2.4: the listener's reason (e.g. 421) outlives the connection.
            return defer.fail(self._refusal)
        if self._gone:
            return defer.fail(SessionClosed("session is closed"))
        d: defer.Deferred[mgmt.Greeting] = defer.Deferred()
        self._greeting_waiters.append(d)
        return d

    def when_closed(self) -> defer.Deferred[None]:
        """Fires when the connection is gone."""
        if self._gone and self.transport is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        return d

    def start_channel(
        self,
        profiles: Sequence[str | mgmt.ProfileElement],
        handler: ChannelHandler | None = None,
        server_name: str | None = None,
    ) -> defer.Deferred[Channel]:
        """Ask the peer for a channel with one of ``profiles`` (§2.3.1.2).

        Fires with the new :class:`Channel`; the profile the peer chose is
        ``channel.profile`` and any piggybacked reply is ``channel.start_reply``.
        Fails with :class:`BEEPError` when the peer declines.
        """
        return defer.ensureDeferred(self._start_channel(profiles, handler, server_name))

    async def _start_channel(
        self,
        profiles: Sequence[str | mgmt.ProfileElement],
        handler: ChannelHandler | None,
        server_name: str | None,
    ) -> Channel:
        await self.greeted()
        candidates = tuple(
            p if isinstance(p, mgmt.ProfileElement) else mgmt.ProfileElement(p) for p in profiles
        )
        number = self._free_channel_number()
        # Hold the number until the reply arrives so a concurrent start cannot take it.
        self._reserved.add(number)
        generation = self._generation
        try:
            reply = await self._channels[0].send(_mgmt(mgmt.Start(number, candidates, server_name)))
        finally:
            self._reserved.discard(number)
        if reply.content_type != mgmt.BEEP_XML:
            raise BEEPError(500, "reply to start is not application/beep+xml")
        try:
            element = mgmt.parse(reply.body)
        except mgmt.MgmtError as e:
            raise BEEPError(e.code, e.text) from None
        if not isinstance(element, mgmt.ProfileElement) or element.uri not in {
            c.uri for c in candidates
        }:
            # §2.2.2.1: for the peer the channel is open now; carrying on, the two
            # would disagree about which channels exist.
            self.abort("reply to start names no profile we offered")
            raise BEEPError(501, "reply to start names a profile we did not offer")
        if self._gone or generation != self._generation:
            raise SessionClosed("session closed while starting a channel")
        if not self._started_once:
            self._started_once = True
            self.server_name = server_name
        channel = Channel(self, number, element.uri, handler or ChannelHandler())
        channel.start_reply = element.content
        self._channels[number] = channel
        channel.handler.channel_opened(channel)
        self._update_window(channel)
        return channel

    def close(self, code: int = 200, text: str = "") -> defer.Deferred[None]:
        """Release the session (§2.4) once every channel is idle, then disconnect."""
        return self._close_channel(self._channels[0], code, text)

    def disconnect(self) -> None:
        """Close the connection now, without the release handshake of §2.4.

        Use this rather than ``transport.loseConnection()``: the session is the
        transport's producer, and a TLS transport waits for its producer to go
        before it closes. A TLS connection whose peer does not answer our
        close_notify within ``config.close_timeout`` is cut then.
        """
        self._gone = True
        transport = self.transport
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()
            if self.transport is not None and self._cut_call is None:
                # Over TLS the connection stays until the peer's close_notify.
                self._cut_call = self.clock.callLater(self.config.close_timeout, self._cut)

    def _cut(self) -> None:
        self._cut_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def abort(self, reason: str, *, violation: bool = True) -> None:
        """Terminate without a reply, as §2.2.1.1 requires for poorly formed frames;
        ``violation`` False when the peer broke no rule but kept us waiting."""
        if self._gone:
            return
        self.aborted = reason
        self.violated = violation
        self.log.warn(
            "terminating BEEP session with {peer}: {reason}",
            peer=self.peer,
            reason=reason,
            event="beep.session-terminated",
        )
        self._gone = True
        if self.transport is not None:
            self.transport.abortConnection()

    # -- tuning (RFC 3080 §3 and §4.1) -------------------------------------

    def begin_tuning(self) -> None:
        """We are sending a tuning request (e.g. TLS ``ready``): nothing but channel
        zero may be sent until its reply (§3.1.3.1)."""
        self._tuning = True

    def end_tuning(self) -> None:
        """Our tuning request was declined; traffic flows again."""
        self._tuning = False
        self._flush()

    def expect_silence(self, *, seq_allowed: bool = False) -> None:
        """We accepted a peer's tuning request: it may send nothing more until the
        transport is switched (§3.1.3.2); anything else ends the session.

        ``seq_allowed`` while we still finish replies owed before the switch: the
        peer's SEQ frames may be what lets them out."""
        self._peer_silent = _SEQ_ONLY if seq_allowed else True

    def tuning_reset(
        self, switch: Callable[[], None], *, greet_after_handshake: bool = False
    ) -> None:
        """Close every channel, including zero, switch the transport, greet afresh.

        ``switch`` changes the transport (``transport.startTLS``); what is
        written after it - the new greeting - travels over the tuned transport
        (§3, §4.1). A listener may greet only once the TLS handshake is done
        (``greet_after_handshake``), so that its greeting can depend on the
        client certificate (SASL EXTERNAL is offered only with one).
        """
        if self._parser.buffered or self._backlog:
            self.abort("data received after a tuning request")
            return
        self._close_all_channels(Failure(SessionClosed("channels closed by a tuning reset")))
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        self._tuning = False
        self._peer_silent = False
        self._generation += 1
        self._reset_channels()
        switch()
        self._greet_on_handshake = greet_after_handshake
        if not greet_after_handshake:
            self._send_greeting()
        self._start_greeting_timer()

    def _reset_channels(self) -> None:
        self._parser = FrameParser(self.config.window)
        zero = Channel(self, 0, "", _ManagementHandler(self))
        # §2.2.1.1: the peer's greeting is a reply to a msgno 0 that is never sent.
        greeting = _Outstanding(defer.Deferred(), None)
        greeting.deferred.addCallbacks(self._got_greeting, self._greeting_refused)
        zero._outstanding[0] = greeting
        self._channels: dict[int, Channel] = {0: zero}
        self._reserved: set[int] = set()
        self._ready: deque[Channel] = deque()
        self._pending_seq = []
        self._out: list[bytes] = []
        self._dirty_windows: list[Channel] = []
        self.peer_greeting = None

    # -- Twisted protocol --------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.peer_host = peer_host(peer)
        self.peer = address_text(peer)
        try:
            transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
            # Sessions the idle timeout spares still notice a peer that vanished.
            transport.setTcpKeepAlive(True)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass
        if self.config.keepalive is not None:
            _probe_after(transport, self.config.keepalive)
        transport.registerProducer(self, True)
        self._last_activity = self.clock.seconds()
        if self.unavailable is not None and self.role is Role.LISTENER:
            self.log.warn(
                "refusing BEEP session from {peer}: {reason}",
                peer=self.peer,
                reason=self.unavailable,
                event="beep.session-refused",
            )
            refusal = _mgmt(mgmt.Error(421, self.unavailable)).to_payload()
            transport.write(serialize_frame(ERR, 0, 0, False, 0, refusal))
            self.disconnect()
            return
        self._send_greeting()
        self._update_window(self._channels[0])
        self._start_greeting_timer()
        if self.config.idle_timeout is not None:
            self._idle_timer = self.clock.callLater(self.config.idle_timeout, self._check_idle)

    def handshakeCompleted(self) -> None:
        self.peer_certificate = peer_certificate(self.transport)
        if self._greet_on_handshake:
            self._greet_on_handshake = False
            self._send_greeting()

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        self._last_activity = self.clock.seconds()
        try:
            frames = self._parser.feed(data)
        except FrameError as e:
            self.abort(f"poorly formed frame: {e}")
            return
        if self._backlog is not None:
            self._backlog.extend(frames)
            return
        self._process(frames)

    def _process(self, frames: list[Frame | SeqFrame]) -> None:
        """Act on received frames, at most ``frames_per_turn`` before yielding.

        A read can bring hundreds of frames. Answering them all before writing
        anything would leave the peer idle meanwhile and make the two take turns;
        instead the replies to each slice are written and the rest waits for the
        next reactor turn. Other sessions of the process get their turn in between,
        too. Reading is paused meanwhile, so what waits is at most what the last
        read brought, even from a peer that ignores its windows.

        The allowance is per turn, not per call: TLS hands a large read over one
        record (16 KiB) at a time, all in one turn, and a record holds fewer
        frames than a slice; counted per call, all of it would be acted on
        before anything was written, and the peers would take turns. So the
        first frames of a turn schedule the next, which renews the allowance.
        """
        budget = self._turn_budget
        if frames and budget == self.config.frames_per_turn:
            # The first frames of this turn: the next turn renews the allowance (and
            # takes up the backlog, if any).
            self._turn_call = self.clock.callLater(0, self._new_turn)
        if len(frames) > budget:
            self._backlog = frames[budget:]
            frames = frames[:budget]
            assert self.transport is not None
            self.transport.pauseProducing()
        self._turn_budget = budget - len(frames)
        generation = self._generation
        self._in_receive = True
        try:
            for frame in frames:
                if self._gone:
                    return
                if (self._peer_silent or generation != self._generation) and not (
                    self._peer_silent is _SEQ_ONLY
                    and generation == self._generation
                    and type(frame) is SeqFrame
                ):
                    # §3.1.3: nothing may follow a tuning request but the new transport.
                    self.abort("data received after a tuning request")
                    return
                if type(frame) is SeqFrame:
                    self._seq_received(frame)
                else:
                    self._frame_received(frame)  # type: ignore[arg-type]
        except FrameError as e:
            self.abort(f"poorly formed frame: {e}")
            return
        finally:
            self._in_receive = False
        self._flush()

    def _new_turn(self) -> None:
        """A reactor turn after one in which frames were acted on: a new allowance, and
        the frames that waited for it."""
        frames, self._backlog = self._backlog, None
        self._turn_call = None
        self._turn_budget = self.config.frames_per_turn
        if self._gone or not frames:
            return
        self._process(frames)
        if self._backlog is None and not self._gone and self.transport is not None:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._backlog = None
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        # Callbacks run below may call disconnect(); the transport is already gone.
        self.transport = None
        for timer in (self._greeting_timer, self._idle_timer, self._cut_call):
            if timer is not None and timer.active():
                timer.cancel()
        why = self.aborted or reason.getErrorMessage()
        lost = Failure(SessionClosed(f"session {'ended' if self.aborted else 'lost'}: {why}"))
        self._close_all_channels(lost)
        waiting, self._greeting_waiters = self._greeting_waiters, []
        for d in waiting:
            d.errback(lost)
        if self.on_lost is not None:
            self.on_lost(self)
        closed, self._closed_waiters = self._closed_waiters, []
        for d in closed:
            d.callback(None)

    # IPushProducer: the transport says when its buffer is full or drained.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        transport = self.transport
        if transport is not None and getattr(transport, "disconnecting", False):
            # The connection is closing under us: TLS closes it when the peer closes TLS
            # (close_notify). Twisted then waits for its producer to go before it closes,
            # and reads nothing meanwhile; had our writes been paused, this session would
            # never learn that it had ended (Twisted #8901).
            transport.unregisterProducer()
            return
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self._paused = True

    # -- frames in ---------------------------------------------------------

    def _seq_received(self, seq: SeqFrame) -> None:
        channel = self._channels.get(seq.channel)
        if channel is None:
            # A SEQ can cross our ok to the close of its channel: nothing to update.
            return
        if (channel._send_seqno - seq.ackno) % _MOD >= _HALF:
            raise FrameError(f"SEQ acknowledges octets never sent on channel {seq.channel}")
        channel._send_limit = (seq.ackno + seq.window) % _MOD
        channel._send_window = seq.window
        if channel._queue:
            self._ready_channel(channel)

    def _frame_received(self, frame: Frame) -> None:
        kind, number, msgno, more, seqno, payload, _ = frame
        if self.peer_greeting is None and (number or msgno or kind == MSG):
            # §2.4: each peer begins with its greeting (RPY, or a listener's ERR, 0 0).
            raise FrameError("session must begin with a greeting")
        channel = self._channels.get(number)
        if channel is None:
            raise FrameError(f"channel {number} does not exist")
        size = len(payload)
        expected = channel._recv_seqno
        if seqno != expected:
            raise FrameError(f"seqno {seqno} on channel {number}, expected {expected}")
        # RFC 3081 §3.1.2: never beyond the window we advertised.
        if size > (channel._recv_limit - expected) % _MOD:
            raise FrameError(f"{size} octets overrun the window of channel {number}")
        # §2.2.1.1: after a '*' frame only the same message may follow on this channel,
        # with the same keyword (MSG 0 then RPY 0 are two messages).
        if channel._last_more and (msgno != channel._last_msgno or kind != channel._last_kind):
            raise FrameError("frame interleaved into an incomplete message")
        channel._recv_seqno = (expected + size) % _MOD
        if more:
            channel._last_more = True
            channel._last_msgno = msgno
            channel._last_kind = kind
        else:
            channel._last_more = False
        # Only ever called while a batch is processed: the SEQ goes out after it.
        if not channel._window_dirty:
            channel._window_dirty = True
            self._dirty_windows.append(channel)
        if kind == MSG:
            self._msg_frame(channel, frame)
        else:
            self._reply_frame(channel, frame)

    def _msg_frame(self, channel: Channel, frame: Frame) -> None:
        msgno = frame.msgno
        if channel._in_msgno is None:
            if msgno in channel._request_msgnos:
                raise FrameError(f"msgno {msgno} reused before its reply was sent")
            if len(channel._requests) >= self.config.max_pending_requests:
                raise FrameError(f"more than {self.config.max_pending_requests} unanswered MSGs")
            owed = channel._queued_replies - channel._queued_answers
            if owed >= self.config.max_pending_requests:
                # Replies the peer leaves us unable to write (it opens no window for
                # them, or reads nothing) while it goes on asking: they would pile up
                # without bound. Closing our window instead could deadlock two peers
                # that each wait for the other's SEQ to write what they owe. The ANS of
                # one-to-many exchanges are not counted: one MSG may have any number.
                raise FrameError(f"{owed} replies owed that the peer does not take")
            limit = self._message_limit(channel)
            if not frame.more and len(frame.payload) <= limit:
                # The common case: a whole message in one frame.
                self._msg_complete(channel, msgno, frame.payload)
                return
            channel._in_msgno = msgno
            channel._in_parts = []
            channel._in_size = 0
            channel._in_discard = False
        else:
            limit = self._message_limit(channel)
        if not channel._in_discard:
            channel._in_size += len(frame.payload)
            if channel._in_size > limit:
                # §2.6.3: a pre-emptive negative reply; the rest of the MSG is ignored.
                channel._in_discard = True
                channel._in_parts = []
                self._unfinished_ended(channel)
                when = self._too_large(channel, limit, "refusing a message")
                self._new_request(channel, msgno, None, 0).error(
                    554, f"message exceeds the limit of {limit} octets{when}"
                )
            elif frame.payload:
                # An empty intermediate frame costs no window: kept, a peer could
                # send them without end.
                add_piece(channel._in_parts, frame.payload)
        if frame.more:
            return
        channel._in_msgno = None
        if channel._in_discard:
            # Refused, and answered, before it ended: a close may have waited for this.
            channel._maybe_idle()
            return
        parts, channel._in_parts = channel._in_parts, []
        self._unfinished_ended(channel)
        self._msg_complete(channel, msgno, b"".join(parts))

    def _unfinished_ended(self, channel: Channel) -> None:
        """The message ``channel`` was reassembling is complete, or dropped: its octets
        are no longer held as unfinished, and if it was a long one, another may be."""
        channel._in_size = 0
        if not channel._in_long:
            return
        channel._in_long = False
        self._long_left += 1
        self._stall_logged = False
        for other in self._channels.values():
            if other._in_size and not other._in_long:
                # Perhaps stalled for want of it (see _seq_for).
                self._update_window(other)

    def _msg_complete(self, channel: Channel, msgno: int, payload: bytes) -> None:
        # Each request is charged at least window/max_pending_requests, so the
        # window closes before a well-behaved peer can reach that limit.
        cost = min(len(payload), channel._window) + self._request_overhead
        try:
            message = Message.from_payload(payload)
        except MessageError as e:
            self._new_request(channel, msgno, None, cost).error(500, str(e))
            return
        channel._dispatch(self._new_request(channel, msgno, message, cost))

    def _new_request(
        self, channel: Channel, msgno: int, message: Message | None, cost: int
    ) -> Request:
        request = Request(channel, msgno, message or Message(), cost)
        channel._requests.append(request)
        channel._request_msgnos.add(msgno)
        channel._held += cost
        return request

    def _reply_frame(self, channel: Channel, frame: Frame) -> None:
        msgno = frame.msgno
        outstanding = channel._outstanding.get(msgno)
        kind = frame.kind
        if outstanding is None:
            raise FrameError(f"{kind.decode()} for msgno {msgno}, which awaits no reply")
        previous = outstanding.kind
        if (
            kind == RPY
            and previous is None
            and not frame.more
            and outstanding.sending is None
            and channel.number
            and len(frame.payload) <= self._message_limit(channel)
        ):
            # The common case: a whole RPY in one frame to a MSG completely sent.
            del channel._outstanding[msgno]
            if not _reply_complete(outstanding, RPY, frame.payload):
                self._poorly_formed_reply(channel)
            channel._maybe_idle()
            return
        greeting = channel.number == 0 and msgno == 0
        if greeting:
            if kind not in (RPY, ERR) or (kind == ERR and self.role is Role.LISTENER):
                raise FrameError("session must begin with a greeting")
        elif previous is None and outstanding.sending is not None:
            channel._reply_arrived_early(outstanding.sending)
        if previous is None:
            outstanding.begin()
        else:
            if kind == NUL:
                if previous != ANS:
                    raise FrameError("NUL after a reply that is not ANS")
                if outstanding.partial:
                    raise FrameError("NUL while an answer is incomplete")
            elif kind != previous:
                raise FrameError(f"{kind.decode()} continues a {previous.decode()} reply")
        outstanding.kind = kind
        if kind == ANS:
            self._answer_frame(channel, outstanding, frame)
            return
        if kind == NUL:
            del channel._outstanding[msgno]
            if outstanding.deferred.called:
                pass  # failed at a poorly formed answer
            elif outstanding.toobig:
                limit = self._message_limit(channel)
                when = self._limit_note(channel, limit)
                outstanding.deferred.errback(
                    BEEPError(554, f"an answer exceeded the limit of {limit} octets{when}")
                )
            else:
                outstanding.deferred.callback(outstanding.answers)
            channel._maybe_idle()
            return
        limit = self._message_limit(channel)
        if not outstanding.toobig:
            outstanding.size += len(frame.payload)
            if outstanding.size > limit:
                outstanding.toobig = True
                outstanding.parts = []
            elif frame.payload:
                add_piece(outstanding.parts, frame.payload)
        if frame.more:
            return
        del channel._outstanding[msgno]
        if outstanding.toobig:
            if not channel.number:
                self._poorly_formed_mgmt_reply(outstanding, f"reply over {limit} octets")
            when = self._too_large(channel, limit, "discarding a reply")
            outstanding.deferred.errback(
                BEEPError(554, f"reply exceeds the limit of {limit} octets{when}")
            )
        else:
            payload = b"".join(outstanding.parts)
            if not channel.number:
                problem = _mgmt_reply_problem(kind, payload)
                if problem is not None:
                    self._poorly_formed_mgmt_reply(outstanding, problem)
            if not _reply_complete(outstanding, kind, payload):
                self._poorly_formed_reply(channel)
        channel._maybe_idle()

    def _poorly_formed_reply(self, channel: Channel) -> None:
        """§2.2.2.1: a poorly formed reply on a profile's channel closes that channel
        (§2.3.1.3, once our other MSGs on it are answered); the session goes on."""
        if channel.number in self._closing_poorly:
            return
        if isinstance(self._closing_poorly, frozenset):
            self._closing_poorly = set()
        closing_poorly = self._closing_poorly
        closing_poorly.add(channel.number)
        self.log.warn(
            "poorly formed reply on channel {channel} from {peer}: closing the channel",
            channel=channel.number,
            peer=self.peer,
            event="beep.poorly-formed-reply",
        )
        closing = self._close_channel(channel, 500, "poorly formed reply")
        # Refused or cut short, the close leaves nothing more to do here.
        closing.addErrback(lambda _: None)
        closing.addBoth(lambda _: closing_poorly.discard(channel.number))

    def _poorly_formed_mgmt_reply(self, outstanding: _Outstanding, problem: str) -> NoReturn:
        """§2.2.2.1: a poorly formed reply on channel zero terminates the session."""
        reason = f"poorly formed reply on channel zero: {problem}"
        outstanding.deferred.errback(SessionClosed(reason))
        raise FrameError(reason)

    def _answer_frame(self, channel: Channel, outstanding: _Outstanding, frame: Frame) -> None:
        ansno = frame.ansno
        assert ansno is not None
        if outstanding.toobig:
            # The exchange has failed (554 at NUL): nothing more of it is kept.
            return
        parts = outstanding.partial.get(ansno)
        # What the exchange holds is bounded as one message is: the answers being
        # reassembled (each also charged for being open, since a peer may open any
        # number with empty frames) and, without on_answer, those complete.
        held = outstanding.size + len(frame.payload) + (_OPEN_ANSWER if parts is None else 0)
        limit = self._message_limit(channel)
        if held > limit:
            # As for an oversized RPY: this exchange fails (554 at NUL), not the session.
            self._too_large(channel, limit, "discarding answers")
            outstanding.discard()
            return
        outstanding.size = held
        if parts is None:
            parts = outstanding.partial[ansno] = []
        if frame.payload:
            add_piece(parts, frame.payload)
        if frame.more:
            return
        del outstanding.partial[ansno]
        if outstanding.on_answer is not None:
            # Handed to the application: no longer held here.
            outstanding.size -= _OPEN_ANSWER + sum(map(len, parts))
        else:
            outstanding.size -= _OPEN_ANSWER
        try:
            message = Message.from_payload(b"".join(parts))
        except MessageError as e:
            # The exchange fails now; what more of it comes is not kept.
            outstanding.deferred.errback(BEEPError(500, f"poorly formed answer: {e}"))
            outstanding.discard()
            self._poorly_formed_reply(channel)
            return
        if outstanding.on_answer is not None:
            try:
                outstanding.on_answer(message, ansno)
            except Exception:
                # The application's bug must not end the session for everyone on it.
                self.log.failure(
                    "on_answer callback failed on channel {channel}",
                    channel=channel.number,
                    event="beep.application-failure",
                )
        else:
            outstanding.answers.append(message)

    def _too_large(self, channel: Channel, limit: int, action: str) -> str:
        """Log that a message, reply or answer over ``limit`` octets is refused or
        discarded; returns :meth:`_limit_note` for the error's text."""
        note = self._limit_note(channel, limit)
        text = "{action} over {limit} octets on channel {channel} from {peer}"
        event = "beep.message-too-large"
        if note:
            if self._early_refusal_logged:
                return note
            # Once a session: a peer that has not said who it is may try again and again.
            self._early_refusal_logged = True
            text += ", which has not authenticated"
            event = "beep.message-too-large-unauthenticated"
        self.log.warn(
            text, action=action, limit=limit, channel=channel.number, peer=self.peer, event=event
        )
        return note

    def _limit_note(self, channel: Channel, limit: int) -> str:
        """What an error's text adds to ``limit``: that it is the limit before the peer
        authenticates, when it is (see :meth:`_message_limit`)."""
        return " before authentication" if limit < self._usual_limit(channel) else ""

    def _usual_limit(self, channel: Channel) -> int:
        """The longest message, reply or answer taken on ``channel`` from a peer that has
        authenticated."""
        return _MAX_MGMT_MESSAGE if channel.number == 0 else self.config.max_message_size

    def _message_limit(self, channel: Channel) -> int:
        """The longest message, reply or answer taken on ``channel`` now."""
        limit = self._usual_limit(channel)
        early = self._early_limit()
        return limit if early is None or early >= limit else early

    def _early_limit(self) -> int | None:
        """``max_message_size_unauthenticated`` as it applies now: None when it does not
        (there is none, or the peer has authenticated).

        No more than half the window: until the peer authenticates, no message of it is
        one of the ``max_long_messages`` for which the window is reopened as it arrives
        (see :meth:`_seq_for`), and one longer than the window would wait for ever. Half
        a window always gets its window, once the peer's MSGs being processed, whose
        octets are charged against it too, are answered."""
        bound = self.config.max_message_size_unauthenticated
        if bound is None or self.peer_authenticated:
            return None
        return min(bound, self.config.window // 2)

    # -- flow control out: SEQ (RFC 3081 §3.1.4) ---------------------------

    def _update_window(self, channel: Channel) -> None:
        """Offer the peer more window (RFC 3081 §3.1.4).

        While a batch of frames from the transport is being processed, the
        channel is only noted; one consolidating SEQ per channel goes out with
        the replies when the batch is done.
        """
        if self._in_receive:
            if not channel._window_dirty:
                channel._window_dirty = True
                self._dirty_windows.append(channel)
            return
        seq = self._seq_for(channel)
        if seq is not None:
            self._pending_seq.append(seq)
            self._flush()

    def _seq_for(self, channel: Channel) -> bytes | None:
        """The SEQ to send for ``channel`` now, if any.

        §3.1.4: a SEQ goes out whenever the window it would advertise is at
        least half the channel's buffer. Octets of complete MSGs still being
        processed stay charged against the window, so a slow profile throttles
        its peer rather than letting requests pile up in memory. The right edge
        never moves left (RFC 1122 §4.2.2.16, as §3.1.4 asks).

        So do the octets of a message not yet complete, up to half the window;
        beyond, the window is reopened for them only if the message is one of
        the session's ``max_long_messages``. Otherwise the peer waits, stalled,
        with a window's worth unfinished, until one of those is complete; a peer
        sending '*' frames on every channel and never the last can make the
        session hold no more. A peer that has not authenticated, where
        ``max_message_size_unauthenticated`` is set, has no long messages at all.
        """
        channel._window_dirty = False
        window = channel._window
        offer = window - channel._held
        unfinished = channel._in_size
        if unfinished and not channel._in_long:
            if offer - unfinished >= window // 2 or self._early_limit() is not None:
                # Before the peer authenticates no message is long: none is longer than
                # half the window (see _early_limit), and if the octets held of its MSGs
                # being processed leave too little room, it waits for them.
                offer -= unfinished
            elif self._long_left:
                self._long_left -= 1
                channel._in_long = True
            else:
                offer -= unfinished
                if not self._stall_logged and not self._gone:
                    self._stall_logged = True
                    self.log.warn(
                        "stalling {peer} on channel {channel}: {limit} messages longer than "
                        "the window are arriving already",
                        peer=self.peer,
                        channel=channel.number,
                        limit=self.config.max_long_messages,
                        event="beep.peer-stalled",
                    )
        if offer < window // 2 or self._gone or not channel._announced:
            return None
        new_limit = (channel._recv_seqno + offer) % _MOD
        gain = (new_limit - channel._recv_limit) % _MOD
        if gain == 0 or gain >= _HALF:
            return None
        channel._recv_limit = new_limit
        return serialize_seq(channel.number, channel._recv_seqno, offer)

    # -- frames out ---------------------------------------------------------

    def _ready_channel(self, channel: Channel) -> None:
        if not channel._in_ready:
            channel._in_ready = True
            self._ready.append(channel)
        if not self._in_receive:
            self._flush()

    def _flush(self) -> None:
        """Write what the peer's windows allow, a frame per ready channel in turn
        (RFC 3081 §3.1.4), SEQ frames first.

        What a drained queue sets off - a close waiting for its channel to be idle
        (§2.3.1.3), a producer resumed - may write at once; it waits until these frames
        are written, or it would go ahead of them: a close ahead of the reply that made
        its channel idle, or a channel's next frames ahead of its earlier ones, whose
        sequence numbers the peer would refuse.
        """
        if self._gone or self.transport is None:
            return
        parts: list[bytes] = []
        drained: list[Channel] | None = None
        if self._dirty_windows:
            dirty, self._dirty_windows = self._dirty_windows, []
            for channel in dirty:
                if self._channels.get(channel.number) is channel:
                    seq = self._seq_for(channel)
                    if seq is not None:
                        self._pending_seq.append(seq)
        if self._pending_seq and not self._tuning:
            parts, self._pending_seq = self._pending_seq, []
        if self._out:
            # Frames already numbered (see Channel._transmit) go before anything queued.
            parts += self._out
            self._out = []
        if not self._paused:
            ready = self._ready
            frame_size = self.config.frame_size
            tuning = self._tuning
            held: list[Channel] | None = None
            while ready:
                channel = ready.popleft()
                if tuning and channel.number:
                    # Only channel zero speaks while tuning (§3.1.3.1); the others keep
                    # their place until it ends: declined (end_tuning), or in a reset.
                    if held is None:
                        held = [channel]
                    else:
                        held.append(channel)
                    continue
                if not channel._queue or channel.session is not self or not channel._announced:
                    channel._in_ready = False
                    continue
                frame = channel._next_frame(frame_size)
                if frame is None:
                    channel._in_ready = False
                    continue
                parts.append(frame)
                if channel._queue:
                    ready.append(channel)
                else:
                    channel._in_ready = False
                if channel._idle_waiters or channel._reply_waiters or channel._producer is not None:
                    if drained is None:
                        drained = [channel]
                    elif channel not in drained:
                        drained.append(channel)
            if held is not None:
                ready.extend(held)
        if parts:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if self._after_write:
            hooks, self._after_write = self._after_write, []
            for hook in hooks:
                hook()
        if drained is not None:
            for channel in drained:
                channel._maybe_idle()
                if channel._producer is not None:
                    channel._check_producer()

    # -- channel management -------------------------------------------------

    def _send_greeting(self) -> None:
        profiles = tuple(uri for uri, p in self.profiles.items() if p.offered(self))
        greeting = mgmt.Greeting(profiles, self.config.features, self.config.localize)
        self._channels[0]._transmit(RPY, 0, _mgmt(greeting).to_payload(), None)

    def _start_greeting_timer(self) -> None:
        self._greeting_timer = self.clock.callLater(
            self.config.greeting_timeout,
            self.abort,
            f"no greeting within {self.config.greeting_timeout:g} s",
            violation=False,
        )

    def _got_greeting(self, message: Message) -> None:
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        try:
            if message.content_type != mgmt.BEEP_XML:
                raise mgmt.MgmtError(500, "greeting is not application/beep+xml")
            greeting = mgmt.parse(message.body)
            if not isinstance(greeting, mgmt.Greeting):
                raise mgmt.MgmtError(501, "first reply is not a greeting")
        except mgmt.MgmtError as e:
            self.abort(f"bad greeting: {e.text}")
            return
        self.peer_greeting = greeting
        waiting, self._greeting_waiters = self._greeting_waiters, []
        for d in waiting:
            d.callback(greeting)

    def _greeting_refused(self, failure: Failure) -> None:
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        if failure.check(BEEPError):
            e = failure.value
            self.log.warn(
                "BEEP peer {peer} refused the session: {code} {text}",
                peer=self.peer,
                code=e.code,
                text=e.text,
                event="beep.session-refused-by-peer",
            )
            self._refusal = failure
            self.disconnect()
        waiting, self._greeting_waiters = self._greeting_waiters, []
        for d in waiting:
            d.errback(failure)

    def _free_channel_number(self) -> int:
        # §2.3.1.2: initiators use odd numbers, listeners even.
        number = 1 if self.role is Role.INITIATOR else 2
        while number in self._channels or number in self._reserved:
            number += 2
        if number > MAX_31:
            raise BEEPError(550, "no channel numbers left")
        return number

    def _start_requested(self, start: mgmt.Start, request: Request) -> defer.Deferred[Message]:
        number = start.number
        peer_odd = self.role is Role.LISTENER
        if (number % 2 == 1) != peer_odd:
            parity = "odd" if peer_odd else "even"
            raise BEEPError(501, f"number attribute in <start> element must be {parity}-valued")
        if number in self._channels or number in self._reserved:
            raise BEEPError(550, f"channel {number} is already in use")
        channels = len(self._channels) - 1 + len(self._reserved)
        if channels >= self.config.max_channels:
            raise BEEPError(550, f"no more than {self.config.max_channels} channels")
        limit = self.config.max_channels_unauthenticated
        if channels >= limit and not self.peer_authenticated:
            if not self._start_refusal_logged:
                self._start_refusal_logged = True
                self.log.warn(
                    "refusing {peer} more than {limit} channels before it authenticates",
                    peer=self.peer,
                    limit=limit,
                    event="beep.start-refused",
                )
            raise BEEPError(550, f"no more than {limit} channels before authentication")
        if start.server_name is not None and not self._started_once:
            if not self.accept_server_name(start.server_name):
                raise BEEPError(550, f"will not act as {start.server_name}")
        for candidate in start.profiles:
            profile = self.profiles.get(candidate.uri)
            if profile is not None and profile.offered(self):
                return self._start_profile(start, profile, candidate, request)
        self.log.info(
            "declined start of channel {channel} from {peer}: no acceptable profile in {uris}",
            channel=number,
            peer=self.peer,
            uris=[c.uri for c in start.profiles],
            event="beep.start-declined",
        )
        raise BEEPError(550, "all requested profiles are unsupported")

    def _start_profile(
        self,
        start: mgmt.Start,
        profile: Profile,
        candidate: mgmt.ProfileElement,
        request: Request,
    ) -> defer.Deferred[Message]:
        number = start.number
        channel = Channel(self, number, profile.uri, ChannelHandler())
        channel._announced = False
        self._reserved.add(number)
        generation = self._generation

        def started(result: bytes | StartReply | None) -> Message:
            self._reserved.discard(number)
            if self._gone or generation != self._generation:
                raise SessionClosed("session closed during start")
            reply = result if isinstance(result, StartReply) else StartReply(result)
            if not self._started_once:
                self._started_once = True
                self.server_name = start.server_name
            self._channels[number] = channel
            after_sent = reply.after_sent

            def sent() -> None:
                if after_sent is not None:
                    after_sent()
                # A SEQ for the channel goes after the reply creating it: before, the
                # peer doesn't know the channel, drops the SEQ, and a window larger
                # than 4096 is never learnt (RFC 3081 §3.1.1, §3.1.3).
                if self._channels.get(number) is channel and generation == self._generation:
                    channel._announced = True
                    self._update_window(channel)
                    if channel._queue:
                        self._ready_channel(channel)

            request.on_sent = sent
            channel.handler.channel_opened(channel)
            return _mgmt(mgmt.ProfileElement(profile.uri, reply.content))

        def failed(f: Failure) -> Failure:
            self._reserved.discard(number)
            return f

        d = defer.maybeDeferred(profile.start, self, channel, candidate.content)
        return d.addCallbacks(started, failed)

    def _close_requested(self, close: mgmt.Close, request: Request) -> defer.Deferred[Message]:
        if close.number == 0:
            return self._release_requested(close, request)
        channel = self._channels.get(close.number)
        if channel is None:
            raise BEEPError(553, f"channel {close.number} is not open")
        channel.handler.close_requested(close.code)
        channel._closing = True
        generation = self._generation

        def idle(_: None) -> Message:
            self._remove_channel(channel, None)
            # §2.3.1.3: for the peer the channel is open until our ok reaches it, which
            # may wait behind earlier replies (§2.6.1): its number is not free until then.
            self._reserved.add(close.number)
            request.on_sent = lambda: self._reserved.discard(close.number)
            return _mgmt(mgmt.OK())

        def closed(failure: Failure) -> Message | Failure:
            if self._gone or generation != self._generation:
                return failure
            # Our own close of it got its ok meanwhile: the channel is closed, as the peer
            # asked; both peers closing at once each answer ok (§2.3.1.3).
            return _mgmt(mgmt.OK())

        return channel._when_idle().addCallbacks(idle, closed)

    def _release_requested(self, close: mgmt.Close, request: Request) -> defer.Deferred[Message]:
        others = list(self._channels.values())[1:]
        for channel in others:
            channel.handler.close_requested(close.code)
        for channel in others:
            channel._closing = True
        generation = self._generation

        def closed(failure: Failure) -> Failure | None:
            # Closed meanwhile, by our own close's ok (§2.3.1.3): as idle as it gets.
            return failure if self._gone or generation != self._generation else None

        def idle(_: object) -> Message:
            # §2.4: ok, then both peers close the connection.
            request.on_sent = self.disconnect
            return _mgmt(mgmt.OK())

        return all_of([c._when_idle().addErrback(closed) for c in others]).addCallback(idle)

    def _close_channel(self, channel: Channel, code: int, text: str) -> defer.Deferred[None]:
        if self._gone:
            return defer.fail(SessionClosed("session is closed"))
        if self._channels.get(channel.number) is not channel:
            return defer.fail(BEEPError(553, "channel is not open"))

        async def closing() -> None:
            if channel.number == 0:
                for other in list(self._channels.values())[1:]:
                    await other._when_idle()
            else:
                # §2.3.1.3: only once every MSG we sent on it is answered.
                await channel._when_idle()
                channel._closing = True
            try:
                reply = await self._channels[0].send(_mgmt(mgmt.Close(channel.number, code, text)))
            except BEEPError:
                channel._closing = False
                raise
            if not isinstance(mgmt.parse(reply.body), mgmt.OK):
                # §2.3.1.3: a close is answered by ok or an error; anything else is a
                # poorly formed reply on channel zero (§2.2.2.1).
                self.abort("reply to close is not ok")
                raise SessionClosed("reply to close is not ok")
            if channel.number == 0:
                self.disconnect()
            else:
                self._remove_channel(channel, None)

        return defer.ensureDeferred(closing())

    def _remove_channel(self, channel: Channel, reason: Failure | None) -> None:
        if self._channels.get(channel.number) is not channel:
            # Already gone: both peers closed it at once, each answering the other's close.
            return
        del self._channels[channel.number]
        channel._closing = True
        self._fail_channel(channel, reason or Failure(SessionClosed("channel closed")))
        try:
            channel.handler.channel_closed(reason)
        except Exception:
            self.log.failure(
                "channel_closed of profile {profile} failed",
                profile=channel.profile,
                event="beep.profile-failure",
            )

    def _fail_channel(self, channel: Channel, reason: Failure) -> None:
        outstanding, channel._outstanding = channel._outstanding, {}
        channel._queue = ()
        channel._queued_bytes = 0
        channel._queued_replies = 0
        channel._queued_answers = 0
        for request in channel._requests:
            request._dead = True
        channel._requests.clear()
        channel._request_msgnos.clear()
        channel._held = 0
        if channel._in_long:
            # Only when the session ends or is tuned (a channel is closed once idle, with
            # nothing unfinished), so no other channel is woken to take it.
            channel._in_long = False
            self._long_left += 1
        not_sent: Failure | None = None
        for pending in outstanding.values():
            if not pending.deferred.called:
                out = pending.sending
                if out is not None and out.offset == 0 and reason.check(SessionClosed):
                    # Still wholly in our queue: tell the sender it may safely retry.
                    if not_sent is None:
                        not_sent = Failure(NotSent(reason.getErrorMessage()))
                    pending.deferred.errback(not_sent)
                else:
                    pending.deferred.errback(reason)
        waiters, channel._idle_waiters = channel._idle_waiters, []
        replied, channel._reply_waiters = channel._reply_waiters, ()
        for d in [*waiters, *replied]:
            d.errback(reason)

    def _close_all_channels(self, reason: Failure) -> None:
        channels = list(self._channels.values())
        for channel in channels[1:]:
            self._remove_channel(channel, reason)
        # Failing channel zero also fails a greeting still awaited, and its waiters.
        self._fail_channel(channels[0], reason)

    # -- timers ----------------------------------------------------------------

    def _check_idle(self) -> None:
        timeout = self.config.idle_timeout
        if timeout is None or self._gone:
            return
        quiet = self.clock.seconds() - self._last_activity
        channels = list(self._channels.values())
        # A message the peer has begun and left unfinished is no work of ours: a session
        # whose only activity it is has had no traffic, and is idle.
        busy = any(c._busy() or c.handler.keeps_session_open() for c in channels[1:])
        if quiet >= timeout and not busy:
            unfinished = sum(c._in_msgno is not None for c in channels)
            self.log.info(
                "closing BEEP session with {peer} after {seconds:.0f}s idle"
                + (", unfinished messages from it: {unfinished}" if unfinished else ""),
                peer=self.peer,
                seconds=quiet,
                unfinished=unfinished,
                event="beep.idle-timeout",
            )
            self.disconnect()
            return
        delay = timeout - quiet if quiet < timeout else timeout
        self._idle_timer = self.clock.callLater(delay, self._check_idle)


def _mgmt_reply_problem(kind: bytes, payload: bytes) -> str | None:
    """What makes a reply on channel zero poorly formed, if anything: it must be one
    beep+xml element, an ``error`` exactly when the reply is an ERR."""
    try:
        message = Message.from_payload(payload)
        if message.content_type != mgmt.BEEP_XML:
            return "not application/beep+xml"
        element = mgmt.parse(message.body)
    except (MessageError, mgmt.MgmtError) as e:
        return str(e)
    if (kind == ERR) != isinstance(element, mgmt.Error):
        return f"{kind.decode()} carrying a {type(element).__name__.lower()} element"
    return None


def _reply_complete(outstanding: _Outstanding, kind: bytes, payload: bytes) -> bool:
    """Fire the Deferred of ``outstanding`` with its whole RPY, or fail it for an ERR.
    False when the reply is poorly formed (it fails with 500)."""
    try:
        message = Message.from_payload(payload)
    except MessageError as e:
        outstanding.deferred.errback(BEEPError(500, f"poorly formed reply: {e}"))
        return False
    if kind == RPY:
        outstanding.deferred.callback(message)
    else:
        outstanding.deferred.errback(BEEPError.from_message(message))
    return True


class SessionFactory(Factory):
    """Builds sessions of one role with a set of profiles, counting sessions per peer."""

    # Twisted's "Starting factory <...>" and "Stopping factory <...>" for every connection
    # a relay makes to a peer say nothing an operator can use; what happened is logged
    # by whoever connected, in words (imxp.apex.peers).
    noisy = False

    def __init__(
        self,
        role: Role,
        profiles: Sequence[Profile] = (),
        config: SessionConfig | None = None,
        clock: interfaces.IReactorTime | None = None,
        max_sessions_per_peer: int | None = 32,
        on_session: Callable[[Session], None] | None = None,
    ) -> None:
        self.role = role
        self.profiles = list(profiles)
        self.config = config or SessionConfig()
        self.clock = clock
        #: Sessions at once from one peer address that have not authenticated with SASL
        #: (listeners only; None: unlimited).
        self.max_sessions_per_peer = max_sessions_per_peer
        self.on_session = on_session
        self._per_peer: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> Session:
        """A session for the connection from ``addr``, refused with 421 (§2.4) if too many
        from its address are still anonymous. A session that authenticates with SASL
        counts no longer: it is a user's, and the many users behind one NAT address must
        not be limited as one peer is; until then it could be anyone's, many times over.
        So can a session that logged in with ANONYMOUS (RFC 4505), which still counts."""
        session = Session(self.role, self.profiles, self.config, self.clock)
        session.factory = self
        host = peer_network(peer_host(addr))
        count = self._per_peer.get(host, 0) + 1
        self._per_peer[host] = count
        limit = self.max_sessions_per_peer
        if self.role is Role.LISTENER and limit is not None and count > limit:
            session.unavailable = f"too many sessions from {host}"
        counted = True

        def uncount(_: Session) -> None:
            nonlocal counted
            if not counted:
                return
            counted = False
            remaining = self._per_peer.get(host, 1) - 1
            if remaining:
                self._per_peer[host] = remaining
            else:
                self._per_peer.pop(host, None)

        def authenticated(session: Session) -> None:
            if not session.authenticated_anonymously:
                uncount(session)

        session.on_lost = uncount
        session.on_authenticated = authenticated
        if self.on_session is not None:
            self.on_session(session)
        return session
