"""The edge of the mesh: an application attached to its home relay (RFC 3340 §2.1).

:func:`connect` finds the relay of the endpoint's domain (SRV ``_apex-edge._tcp.DOMAIN``,
RFC 3340 §3.1, or a ``host:port`` given), starts TLS and checks the relay's certificate
for the domain (RFC 3080 §3.1, RFC 6125 §6.2.1), authenticates with SASL (RFC 3080 §4.1;
SCRAM-SHA-256 by default, PLAIN over TLS, EXTERNAL with a client certificate), and attaches
as the endpoint on an APEX channel (RFC 3340 §4.2, §4.4.1). The :class:`Client` it returns
sends data and waits for each recipient's final status report (§5.1, §6.2), receives data
through a callback or an async iterator (§4.4.4.2), answers the relay's terminate
(§4.4.3), and reconnects and re-attaches after a lost connection: an endpoint the relay
then refuses (554: another application attached as it meanwhile) goes to ``on_terminated``
as a :class:`Termination`, and the others work on.

Example (with Twisted's reactor running the coroutine)::

    from twisted.internet import defer, task

    from imxp.client import ClientError, connect


    async def main(reactor):
        try:
            client = await connect("fred@a.test", password="correct horse battery staple")
        except ClientError as e:
            raise SystemExit(f"imxp: {e}")  # one line: what went wrong, and with whom
        outcomes = await client.send_message(["barney@b.test"], "Yabba dabba doo!")
        for recipient, outcome in outcomes.items():
            print(recipient, "delivered" if outcome.delivered else outcome.code, outcome.text)
        async for incoming in client.incoming():
            message = incoming.message()  # message/cpim, or plain text as one
            if message is not None:
                print(f"{message.sender}: {message.text()}")
                break
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

End-to-end protection (RFC 3923's model: the whole ``message/cpim`` signed and/or
encrypted with OpenPGP, RFC 3156, or S/MIME, RFC 8551) is the endpoints' business, and
relays carry the result byte for byte: ``send_message(..., protect=Protection(...))``
protects what it sends, and :func:`open_incoming` (or :meth:`Incoming.open`) verifies and
decrypts what arrives, with a :class:`~imxp.e2e.protect.Report` saying what it found and
whether the message may be shown::

    from pathlib import Path

    from imxp.client import Protection, open_incoming
    from imxp.e2e.pgp import OpenPGP
    from imxp.e2e.protect import Keys, ReplayCache

    keys = Keys(pgp=OpenPGP(Path.home() / ".gnupg"))  # the user's keyring
    protect = Protection("sign+encrypt", "pgp", keys)
    await client.send_message(["barney@b.test"], "Yabba dabba doo!", protect=protect)
    replays = ReplayCache()  # recognises a signed message received twice (RFC 3923 §6.9)
    async for incoming in client.incoming():
        report = await open_incoming(incoming, keys, replays=replays)
        if report.presentable and report.cpim is not None:
            print(report.status, report.signer, report.cpim.text())
        else:
            print("not shown:", report.status, "; ".join(report.problems))

Errors a person can act on are :class:`ClientError` with a ``kind``: ``auth`` (wrong
password, mechanism not offered), ``unknown-domain`` (DNS says the domain does not exist),
``unreachable`` (no relay answers), ``tls`` (the relay's certificate does not verify or
names someone else), ``refused`` (the relay will not attach us as that endpoint),
``protocol`` (the relay speaks something else, or is at a service that is not for
endpoints: its mesh port, where no SASL is offered).
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import random
import secrets
import sys
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from cryptography import x509
from twisted.internet import defer, error, task, threads
from twisted.internet.interfaces import IDelayedCall, IResolver
from twisted.python.failure import Failure

from imxp import logs
from imxp.apex import wire
from imxp.apex.address import AddressError, Endpoint, literal_address
from imxp.apex.options import make_status_request
from imxp.apex.routing import EDGE_PORT, EDGE_SERVICE, NoRoute, Router, Target, open_session
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import (
    SCRAM_SHA_256,
    ClientMechanism,
    ExternalClient,
    PlainClient,
    SASLClientError,
    ScramSHA256Client,
    mechanism_name,
    profile_uri,
)
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    NotSent,
    Request,
    Role,
    Session,
    SessionClosed,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import start_tls
from imxp.beep.tlsctx import client_options
from imxp.certs import Issued
from imxp.config import Config
from imxp.e2e import cpim
from imxp.e2e.protect import (
    Keys,
    Mode,
    ReplayCache,
    Report,
    Scheme,
    open_message,
    protect_cpim,
)

__all__ = [
    "ERROR_KINDS",
    "ClientError",
    "Outcome",
    "Incoming",
    "Protection",
    "Termination",
    "Client",
    "REPORT_TIMEOUT",
    "check_timeout",
    "connect",
    "open_incoming",
]

log = logs.Logger(namespace="imxp.client")

#: How long :meth:`Client.send` waits for the final reports unless told otherwise. A relay
#: looks for a next hop (DNS) and keeps trying one it cannot reach, or waits for an
#: application's answer, for up to its ``delivery_timeout`` in all before it reports the
#: failure; waiting longer than the default one means such a failure arrives as what it
#: is (421 cannot connect, 451) rather than ending as unknown with its report bouncing off
#: a client that has gone.
REPORT_TIMEOUT = Config.delivery_timeout + 30.0

#: The kinds of :class:`ClientError`, one per thing a person would do differently.
ERROR_KINDS = frozenset({"auth", "unknown-domain", "unreachable", "tls", "refused", "protocol"})
#: RFC 3340 §10: "service not available", what a relay says as it shuts down.
_SERVICE_NOT_AVAILABLE = 421
#: How long close() waits for the ``on_data`` handlers still running to end, and then for
#: the relay's answers before it just disconnects (the session then cuts a connection the
#: relay does not close within its close_timeout).
_CLOSE_TIMEOUT = 5.0


class _Run:
    """An ``async def`` handler's run, as close() called from within it sees it: close()
    does not wait for the handler that called it to end."""

    def __init__(self) -> None:
        #: The Deferred of the run, once the handler has reached its first ``await``.
        self.going: defer.Deferred[None] | None = None
        #: Whether it called close().
        self.closed = False


# In an ``async def`` on_data handler, its run.
_HANDLER: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("handler", default=None)
#: Why data is refused (450) once the client is closing.
_ENDED = "the application ended before taking it"
#: Why data whose on_data failed is refused (451), and how the failure is logged.
_NOT_PROCESSED = "the application failed to process the data"
_ON_DATA_FAILED = "on_data failed for data from {originator}"
#: Seconds data waits, unanswered, for an ``incoming()`` iterator when neither one nor
#: ``on_data`` takes it: well within a relay's ``delivery_timeout``, so that its sender
#: hears 450 rather than "did not answer in time".
UNCLAIMED_WAIT = 10.0
#: Data that may wait so at once, or unread by one iterator; more is refused with 450.
_UNCLAIMED_LIMIT = 1000
#: How many ``async def`` on_data handlers may run at once past their data's answer,
#: unless told otherwise: as many data as an iterator may hold unread, answered 250 and
#: not yet done with, and so as much memory.
ON_DATA_LIMIT = _UNCLAIMED_LIMIT
#: Where a relay on imxp's default configuration (``edge_listen``) takes endpoints: the
#: port a person trying imxp out, who reached another, most likely meant.
_DEFAULT_EDGE_PORT = int(Config.edge_listen[0].split(":")[1])
#: How far a signed message's DateTime may be from now (RFC 3923 §6.9: five minutes).
_WINDOW = timedelta(minutes=5)


class ClientError(Exception):
    """A failure a person can act on: ``kind`` (one of :data:`ERROR_KINDS`) and a one-line
    ``message`` naming what failed and why; ``code`` is the relay's reply code (RFC 3340
    §10, RFC 3080 §8) when it gave one.

    Raised by :meth:`Client.send`, ``outcomes`` holds what is known of the recipients
    whose data had ended by then: a send to more than 1,000 recipients goes in several
    data, and those sent before the client gave up must not be sent again."""

    def __init__(self, kind: str, message: str, code: int | None = None) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown ClientError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.outcomes: dict[str, Outcome] = {}

    def copy(self) -> ClientError:
        """The same error as a new exception, to raise again without chaining tracebacks."""
        return ClientError(self.kind, self.message, self.code)


class Refusal(Exception):
    """Raised by ``on_data`` while its data's answer is not yet given (before its first
    ``await``, or all along with ``answer_when_done``): the data is refused with ``code``
    and ``text``, which reach its sender (RFC 3340 §4.4.4.2). A 4xx says the sender may
    try again later (450: busy), a 5xx that it would fail again (550: no such user
    beyond a gateway). Logged as ``client.data-refused``, not as a failure."""

    def __init__(self, code: int, text: str) -> None:
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"a refusal's code is a 4xx or 5xx reply code, not {code!r}")
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class _NotBEEP(ClientError):
    """``protocol``: what answers at a relay's address does not speak BEEP (RFC 3080
    §2.2), or, of several relays that all failed so, one did not. Unlike a relay that
    speaks BEEP and will not let endpoints log in or use APEX, which every relay of the
    domain would repeat, that says nothing of the others, nor of what listens there later
    (another service, while a relay restarts)."""

    def __init__(self, message: str) -> None:
        super().__init__("protocol", message)


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient of :meth:`Client.send`.

    ``code`` is the final reply code of the status report (RFC 3340 §6.2, §10), or the
    relay's refusal of the data operation itself, or 421 when the data could not be
    handed to the relay at all within the timeout; None when no final report arrived in
    time (the data may or may not have been delivered).

    :attr:`unknown` is true then, and also for a final report in which a relay says it
    does not know: it handed the data on (to the next relay, or to the recipient's
    application) and could not learn what became of it. §10 has no code for that, so an
    imxp relay reports 451 with a text ending "outcome unknown"
    (:data:`imxp.apex.wire.OUTCOME_UNKNOWN`), kept here as ``code`` and ``text``. Such
    data has often arrived: sending it again may deliver it twice. A relay of another
    implementation may word it otherwise, and its 451 then stands as a failure.
    """

    recipient: str
    code: int | None
    text: str = ""

    @property
    def delivered(self) -> bool:
        return self.code == 250

    @property
    def unknown(self) -> bool:
        return self.code is None or wire.says_outcome_unknown(self.code, self.text)


@dataclass(frozen=True)
class Incoming:
    """A data the relay delivered to this application (RFC 3340 §4.4.4.2).

    ``recipients`` are the endpoints of ours it was for; ``body`` is the content octets
    exactly as received and ``media_type`` their type, lower-case, without parameters
    (both empty for content referenced by a URI outside the payload, §4.1); ``data`` is
    the whole element, options included. ``originator`` is who the relays vouch for
    (each checks its peer may send as it, §4.5); a CPIM From inside the content is only
    what the sender wrote.
    """

    originator: str
    recipients: list[str]
    media_type: str
    body: bytes
    data: wire.Data
    received: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def content_type(self) -> str:
        """The content's full Content-Type, parameters included (a multipart's boundary,
        RFC 2046 §5.1.1; the protocol of RFC 1847 §2.1); ``text/plain`` for a part without
        one (RFC 2045 §5.2), empty when there is no content in the payload."""
        content = self.data.content
        if content is None:
            return ""
        if content.kind == "inline":
            return content.media_type
        return self._header("content-type") or "text/plain"

    def open(
        self,
        keys: Keys,
        *,
        replays: ReplayCache | None = None,
        now: datetime | None = None,
        window: timedelta = _WINDOW,
    ) -> Report:
        """Verify and/or decrypt the content with ``keys`` and judge it
        (:func:`~imxp.e2e.protect.open_message`, RFC 3923 §6.7-§6.9): a plain content is
        "plain"; a signed one is presentable only when signed by its CPIM From, dated
        within ``window`` of ``now``, addressed to the endpoint it was delivered to, and
        (given ``replays``) not seen before. Never raises for what was received.

        This runs gpg or the S/MIME cryptography in the calling thread; under the reactor
        use :func:`open_incoming`, which does it in a thread of the reactor's pool.
        """
        return open_message(
            self.content_type,
            self.body,
            keys,
            now=now,
            window=window,
            replays=replays,
            # A relay hands the application a data "containing only that recipient" (RFC
            # 3340 §4.4.4.1 step 5.3); the signed To or cc must name it.
            recipient=self.recipients[0] if self.recipients else None,
            transfer_encoding=self._header("content-transfer-encoding") or "binary",
        )

    def _header(self, name: str) -> str | None:
        content = self.data.content
        headers = content.headers if content is not None else []
        return next((value for key, value in headers if key.lower() == name), None)

    def message(self) -> cpim.CPIMMessage | None:
        """The instant message: a ``message/cpim`` content parsed (RFC 3862), a plain
        ``text/plain`` content as a message from the originator to the recipients dated
        when it arrived (draft-klyne §3.2), None for any other content. Raises
        :class:`~imxp.e2e.cpim.CPIMError` for a malformed message/cpim."""
        if self.media_type == cpim.MEDIA_TYPE:
            return cpim.parse(self.body)
        if self.media_type != "text/plain" or self.data.content is None:
            return None
        headers = self.data.content.headers
        content_type = self.content_type
        # Content-ID only names the part within the APEX payload (§4.1).
        others = [(n, v) for n, v in headers if n.lower() not in ("content-type", "content-id")]
        return cpim.CPIMMessage(
            sender=self.originator,
            to=list(self.recipients),
            date=self.received,
            content_type=content_type,
            body=self.body,
            content_headers=others,
        )


@dataclass(frozen=True)
class Protection:
    """How :meth:`Client.send_message` protects a message end to end: the whole
    ``message/cpim``, headers included, is signed, encrypted or both (``mode``), as RFC
    3923 §3.1 does for XMPP, with OpenPGP (RFC 3156) or S/MIME (RFC 8551) (``scheme``),
    using the sender's ``keys``.

    OpenPGP signs as the CPIM From and encrypts to its To and cc, each key found in
    ``keys.pgp`` by its address. S/MIME signs with ``keys.smime`` and encrypts to those
    of ``recipient_certificates`` that name a recipient (RFC 8550 §3) and can be used
    (:func:`imxp.e2e.smime.encryption_certificates`); every recipient needs one.
    Raises ValueError for an unknown ``mode`` or ``scheme``.
    """

    mode: Mode
    scheme: Scheme
    keys: Keys
    recipient_certificates: Sequence[x509.Certificate] = ()

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ValueError(f"unknown protection mode {self.mode!r}")
        if self.scheme not in get_args(Scheme):
            raise ValueError(f"unknown protection scheme {self.scheme!r}")
        # Frozen and hashable like the rest, whatever sequence was given.
        object.__setattr__(self, "recipient_certificates", tuple(self.recipient_certificates))


@dataclass(frozen=True)
class Termination:
    """The relay ended attachments (RFC 3340 §4.4.3), or refused one when re-attaching.

    ``code`` 421 is a relay shutting down: those endpoints are attached again on the next
    connection, so it is not the end of the application's attachment; any other code is."""

    endpoints: tuple[str, ...]
    code: int
    text: str


@dataclass(frozen=True)
class _Settings:
    password: str | None
    relay: str | None
    trust: tuple[x509.Certificate, ...] | None
    tls_name: str | None
    client_certificate: Issued | None
    mechanism: str
    username: str
    resolver: IResolver | None
    reactor: Any
    reconnect: bool
    backoff: tuple[float, float]
    connect_timeout: float
    unclaimed_wait: float
    on_data_limit: int
    answer_when_done: bool


def _key(identity: str) -> str:
    """An endpoint in the one form comparison uses (RFC 3340 §2.2.1)."""
    return str(Endpoint.parse(identity))


class _Connection:
    """One BEEP session with the relay and the attachments made on its APEX channel
    (transaction identifiers live as long as the channel, RFC 3340 §6.1.1)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.session: Session | None = None
        self.channel: Channel | None = None
        self.attached: dict[int, str] = {}
        self._trans_ids = itertools.count(1)

    def next_trans_id(self) -> int:
        while True:
            trans_id = next(self._trans_ids)
            if trans_id not in self.attached:
                return trans_id

    def trans_id_of(self, endpoint: str) -> int | None:
        return next((t for t, e in self.attached.items() if e == endpoint), None)


class _APEXHandler(ChannelHandler):
    """What the relay sends us on the APEX channel: data, and terminate."""

    def __init__(self, client: Client, connection: _Connection) -> None:
        self.client = client
        self.connection = connection

    def message_received(self, request: Request) -> Message | defer.Deferred[Message]:
        try:
            element = wire.decode(request.message)
        except wire.APEXError as e:
            log.warn(
                "malformed APEX message from the relay: {code} {text}",
                code=e.code,
                text=e.text,
                event="client.malformed",
            )
            raise BEEPError(e.code, e.text) from None
        answer = self.client._received(self.connection, element)
        if isinstance(answer, defer.Deferred):
            return answer.addCallback(wire.encode)
        return wire.encode(answer)

    def channel_closed(self, reason: Failure | None) -> None:
        session = self.connection.session
        if reason is not None or self.client._closing or session is None:
            return
        # The relay closed the APEX channel and kept the session (RFC 3080 §2.3.1.3):
        # every attachment ended with the channel (RFC 3340 §6.1.1). Ended once our ok
        # to that close is written, the session is lost as any other, and the client
        # connects and attaches anew.
        log.warn(
            "the relay at {where} closed the APEX channel: reconnecting",
            where=self.connection.where,
            event="client.channel-closed",
        )
        self.client._clock.callLater(0, session.disconnect)


class _Pending:
    """One :meth:`Client.send` waiting for the final status of each recipient.

    ``asked`` gives each statusRequest transID the recipients it asks about: one per
    recipient domain, so that a relay on the way to one domain, which sees that transID,
    cannot report on the recipients of another (whose data it never saw)."""

    def __init__(self, recipients: list[str], asked: dict[int, list[str]]) -> None:
        self.recipients = {_key(r): r for r in recipients}
        self.asked = {trans_id: {_key(r) for r in group} for trans_id, group in asked.items()}
        self.outcomes: dict[str, Outcome] = {}
        self.done: defer.Deferred[None] = defer.Deferred()
        self.missing = ""

    def report(
        self, trans_id: int, identity: str, code: int, text: str, reporter_domain: str
    ) -> None:
        try:
            key = _key(identity)
        except AddressError:
            return
        recipient = self.recipients.get(key)
        if recipient is None or recipient in self.outcomes or key not in self.asked[trans_id]:
            # Not ours, already final (the first final verdict stands), or reported
            # under another domain's transID by a relay that could only have guessed.
            return
        if 200 <= code < 300 and Endpoint.parse(key).domain != reporter_domain:
            # Only the recipient's own domain delivers; success elsewhere is a hand-over
            # to the next relay (a trace of targetHop 'all', §5.1), not the end.
            return
        self.outcomes[recipient] = Outcome(recipient, code, text)
        self._check()

    def settle_all(self, code: int, text: str) -> None:
        for recipient in self.recipients.values():
            self.outcomes.setdefault(recipient, Outcome(recipient, code, text))
        self._check()

    def give_up(self, why: str) -> None:
        self.missing = why
        if not self.done.called:
            self.done.callback(None)

    def result(self) -> dict[str, Outcome]:
        return {
            r: self.outcomes.get(r, Outcome(r, None, self.missing))
            for r in self.recipients.values()
        }

    def _check(self) -> None:
        if len(self.outcomes) == len(self.recipients) and not self.done.called:
            self.done.callback(None)


class _Inbox:
    """Data waiting for one :meth:`Client.incoming` iterator, each with the place it
    came in among all the client received (its arrival)."""

    def __init__(self, made: int, count: int | None = None) -> None:
        #: The arrival of the first data this iterator got as it came.
        self.made = made
        self.items: deque[tuple[int, Incoming]] = deque()
        self.waiter: defer.Deferred[Incoming | None] | None = None
        self.ended = False
        self.error: ClientError | None = None
        #: How many more data it takes; None: no end.
        self.room = count
        #: Data it did not get, being full, since it last got one.
        self.missed = 0

    @property
    def full(self) -> bool:
        return self.room == 0

    def put(self, arrival: int, item: Incoming) -> None:
        if self.room is not None:
            self.room -= 1
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(item)
        else:
            self.items.append((arrival, item))

    def put_first(self, earlier: list[tuple[int, Incoming]]) -> list[tuple[int, Incoming]]:
        """Data that came before this iterator was made, ahead of what it has, as many
        as it has room for; those it had none for."""
        rest: list[tuple[int, Incoming]] = []
        if self.room is not None:
            earlier, rest = earlier[: self.room], earlier[self.room :]
            self.room -= len(earlier)
        if earlier:
            self.items.extendleft(reversed(earlier))
            waiter, self.waiter = self.waiter, None
            if waiter is not None:
                waiter.callback(self.items.popleft()[1])
        return rest

    def end(self, error: ClientError | None) -> None:
        self.ended = True
        self.error = error
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self._finish(waiter)

    def get(self) -> defer.Deferred[Incoming | None]:
        d: defer.Deferred[Incoming | None] = defer.Deferred()
        if self.items:
            d.callback(self.items.popleft()[1])
        elif self.ended:
            self._finish(d)
        else:
            self.waiter = d
        return d

    def _finish(self, d: defer.Deferred[Incoming | None]) -> None:
        if self.error is not None:
            d.errback(self.error.copy())
        else:
            d.callback(None)


@dataclass
class _Unclaimed:
    """Data waiting for an ``incoming()`` iterator, and its answer to the relay."""

    arrival: int
    incoming: Incoming
    answer: defer.Deferred[wire.OK]
    timer: IDelayedCall | None = None

    def claimed(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class _Closed(Exception):
    """close() was called while a send waited for the connection."""


class Client:
    """An application attached to its relay; made by :func:`connect`."""

    def __init__(
        self,
        endpoint: str,
        settings: _Settings,
        on_data: Callable[[Incoming], Awaitable[None] | None] | None,
        on_terminated: Callable[[Termination], Awaitable[None] | None] | None,
    ) -> None:
        #: The endpoint this client attached as first, and sends as by default.
        self.endpoint = endpoint
        self._settings = settings
        self._clock = settings.reactor
        self._domain = Endpoint.parse(endpoint).domain
        self._on_data = on_data
        # The on_data handlers answered and still running (an async def past its first
        # await), at most on_data_limit of them.
        self._handling: set[defer.Deferred[None]] = set()
        # The answers of the data whose handlers run (answer_when_done), by handler.
        self._answers: dict[defer.Deferred[None], defer.Deferred[wire.OK]] = {}
        self._on_terminated = on_terminated
        self._router = (
            Router(
                service=EDGE_SERVICE,
                default_port=EDGE_PORT,
                resolver=settings.resolver,
                clock=settings.reactor,
            )
            if settings.relay is None
            else None
        )
        # What should be attached, in order: re-attached after a reconnection.
        self._wanted: list[str] = [endpoint]
        self._connection: _Connection | None = None
        self._pending: dict[int, _Pending] = {}
        # Those waiting for a connection, in the order they came (a dict as ordered set:
        # one that gives up, a send's timeout during an outage, leaves at once).
        self._waiting: dict[defer.Deferred[_Connection], None] = {}
        self._inboxes: list[_Inbox] = []
        # Data nobody has taken yet, unanswered, oldest first.
        self._unclaimed: deque[_Unclaimed] = deque()
        # Data answered 250 that an iterator, since ended, left unread: the next one's.
        self._unread: deque[tuple[int, Incoming]] = deque()
        # Data received so far (status reports aside): the next one's arrival.
        self._arrivals = 0
        # Endpoints being attached, and the calls that wait for the same attach.
        self._attaching: dict[str, list[defer.Deferred[None]]] = {}
        self._closing = False
        # close() has let go of the connection, after the on_data handlers' grace:
        # nothing more is sent.
        self._released = False
        self._closed = False
        self._ended: list[defer.Deferred[None]] = []
        self._protecting = defer.DeferredLock()
        self._failure: ClientError | None = None
        self._sleep: defer.Deferred[None] | None = None
        self._rng = random.Random()

    # -- public API ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a session with the relay is up right now."""
        return self._connection is not None

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints this client is attached as, or re-attaches as after reconnecting."""
        return tuple(self._wanted)

    async def attach(self, endpoint: str) -> None:
        """Attach as a further endpoint or a subaddress, e.g. ``fred/appl=im@a.test``
        (RFC 3340 §2.2, §4.4.1). Raises :class:`ClientError` ``refused`` when the relay
        says no (537 not authorised, 553 another domain, 554 attached elsewhere). Calls
        for an endpoint already being attached wait for that attach and share its end."""
        key = _key(endpoint)
        others = self._attaching.get(key)
        if others is not None:
            # Sent twice, the second attach would be refused (554, attached already),
            # and that refusal taken for the end of the first.
            same: defer.Deferred[None] = defer.Deferred()
            others.append(same)
            await same
            return
        others = self._attaching[key] = []
        try:
            await self._attach(key)
        except BaseException as e:
            del self._attaching[key]
            for d in others:
                d.errback(e.copy() if isinstance(e, ClientError) else e)
            raise
        del self._attaching[key]
        for d in others:
            d.callback(None)

    async def _attach(self, key: str) -> None:
        lost: _Connection | None = None
        while key not in self._wanted:
            try:
                connection = await self._ready(lost)
            except _Closed:
                raise RuntimeError("the client is closed") from None
            assert connection.channel is not None
            trans_id = connection.next_trans_id()
            try:
                await connection.channel.send(wire.encode(wire.Attach(key, trans_id)))
            except BEEPError as e:
                self._refused(key, e.code, e.text)
                raise ClientError(
                    "refused", f"the relay refused to attach {key} ({e.code}): {e.text}", e.code
                ) from None
            except SessionClosed:
                # Attached on the next connection, if the relay agrees then. Until the
                # session says it has closed, this lost one is still the current: sending
                # on it again would fail at once, and again, without end.
                lost = connection
                continue
            connection.attached[trans_id] = key
            self._wanted.append(key)
            log.info("attached as {endpoint}", endpoint=key, event="client.attached")

    async def detach(self, endpoint: str) -> None:
        """Release the attachment as ``endpoint`` (RFC 3340 §4.4.3)."""
        key = _key(endpoint)
        if key not in self._wanted:
            raise ValueError(f"not attached as {key}")
        self._wanted.remove(key)
        if self._connection is not None:
            await self._terminate(self._connection, key)

    async def _terminate(self, connection: _Connection, key: str) -> None:
        """Release the attachment as ``key`` made on ``connection``, if there is one."""
        trans_id = connection.trans_id_of(key)
        if connection.channel is None or trans_id is None:
            return
        try:
            await connection.channel.send(wire.encode(wire.Terminate(trans_id)))
        except BEEPError as e:
            # 550: the relay has already forgotten it - the outcome we wanted.
            log.info(
                "detaching {endpoint}: relay says {code} {text}",
                endpoint=key,
                code=e.code,
                text=e.text,
                event="client.detach-refused",
            )
        except SessionClosed:
            pass  # gone with the session, and not re-attached
        finally:
            # Data may arrive until the relay has processed the terminate: accept it.
            connection.attached.pop(trans_id, None)
        log.info("detached {endpoint}", endpoint=key, event="client.detached")

    async def send(
        self,
        recipients: Sequence[str],
        body: bytes,
        media_type: str = "text/plain",
        *,
        originator: str | None = None,
        timeout: float = REPORT_TIMEOUT,
        headers: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Outcome]:
        """Send ``body`` to ``recipients`` and return each one's :class:`Outcome`.

        The data carries a statusRequest with targetHop ``final`` and an unpredictable
        transID (RFC 3340 §5.1, §6.1.1); this waits until every recipient has its final
        statusResponse (§6.2) or ``timeout`` seconds have passed, after which the missing
        ones are unknown. If the relay refuses the data operation itself (e.g. 537),
        every recipient gets that code. During an outage the data waits for the
        reconnection, within the same timeout; so does data whose session was lost before
        an octet of it was written (the relay never saw it), or that the relay refused
        with 421 as it shut down, which then goes on the new session. Data that may have
        reached the relay is never sent again, as that could deliver it twice: its
        outcome is what the reports say, or unknown. Data not sent within the timeout
        ends 421, "not sent". More recipients than a relay takes in one data (1,000) go
        in several data at once. ``originator`` must be an endpoint this
        client is attached as (the default is :attr:`endpoint`): the reports go to it.
        ``headers`` are further MIME headers of the content part.

        Raises :class:`ClientError` when the client has given up on the relay (a lost
        connection without ``reconnect``, or a refusal on reconnecting; see
        :meth:`ended`), with the outcomes of the data of this send that had ended,
        RuntimeError once :meth:`close` has let go of the connection (at once, unless
        ``on_data`` handlers are still running: those may send until they end), and
        TypeError or ValueError, before anything is sent, for a ``timeout`` that is not a
        number of seconds more than 0 and finite.
        """
        if self._released:
            raise RuntimeError("the client is closed")
        _endpoints_not_one(recipients, "recipients")
        check_timeout(timeout)
        by_key: dict[str, str] = {}
        for recipient in recipients:
            by_key.setdefault(_key(recipient), recipient)  # the first spelling names it
        unique = list(by_key.values())
        if not unique:
            raise ValueError("no recipients")
        sender = self._sender(originator)
        content = wire.Content.from_bytes(body, media_type, headers)
        # A relay takes at most so many recipients in one data: more go in several.
        sending = [
            defer.ensureDeferred(
                self._send(sender, unique[at : at + wire.MAX_RECIPIENTS], content, timeout)
            )
            for at in range(0, len(unique), wire.MAX_RECIPIENTS)
        ]
        # Every batch is waited for: one that raises says nothing of the others.
        batches = await defer.DeferredList(sending, consumeErrors=True)
        outcomes = {recipient: o for ok, batch in batches if ok for recipient, o in batch.items()}
        for ok, result in batches:
            if not ok:
                if isinstance(result.value, ClientError):
                    result.value.outcomes = outcomes
                result.raiseException()
        return outcomes

    def _sender(self, originator: str | None) -> str:
        """The endpoint that sends as ``originator`` (by default :attr:`endpoint`);
        ValueError unless the client is attached as it."""
        sender = _key(originator) if originator is not None else self.endpoint
        if sender not in self._wanted:
            raise ValueError(f"{sender} is not attached: its status reports could not reach it")
        return sender

    async def _send(
        self, sender: str, unique: list[str], content: wire.Content, timeout: float
    ) -> dict[str, Outcome]:
        """One data from ``sender`` to ``unique``, and their outcomes.

        Status is asked for per recipient domain (a statusRequest in each recipient
        element, RFC 3340 §8.4, under one transID per domain): each relay on the way to a
        domain learns only that domain's transID, and reports under it count only for
        that domain's recipients. Data for one domain asks once, for the whole data."""
        by_domain: dict[str, list[str]] = {}
        for recipient in unique:
            by_domain.setdefault(Endpoint.parse(_key(recipient)).domain, []).append(recipient)
        taken: set[int] = set()
        asked = {self._new_trans_id(taken): group for group in by_domain.values()}
        if len(asked) == 1:
            [trans_id] = asked
            recipients = [wire.Recipient(r) for r in unique]
            options = [make_status_request(trans_id)]
        else:
            ids = {r: trans_id for trans_id, group in asked.items() for r in group}
            recipients = [wire.Recipient(r, [make_status_request(ids[r])]) for r in unique]
            options = []
        data = wire.Data(wire.Originator(sender), recipients, options, content=content)
        payload = wire.encode(data)
        pending = _Pending(unique, asked)
        for trans_id in asked:
            self._pending[trans_id] = pending
        deadline = self._clock.seconds() + timeout
        pending.missing = f"no status report within {timeout:g} s"
        # The outcome when no connection comes in time to send it on.
        unsent = f"not sent: no connection to the relay in {timeout:g} s"
        lost: _Connection | None = None
        try:
            while True:
                left = max(0.0, deadline - self._clock.seconds())
                try:
                    connection = await self._ready(lost).addTimeout(left, self._clock)
                except defer.TimeoutError:
                    pending.settle_all(421, unsent)
                    return pending.result()
                except _Closed:
                    pending.settle_all(421, "not sent: the client was closed")
                    return pending.result()
                assert connection.channel is not None
                try:
                    left = max(0.0, deadline - self._clock.seconds())
                    await connection.channel.send(payload).addTimeout(left, self._clock)
                except defer.TimeoutError:
                    # A relay that took the data may still deliver it: outcome unknown.
                    log.warn(
                        "relay did not answer data for transID {trans_id} in time",
                        trans_id=min(asked),
                        event="client.send-unanswered",
                    )
                    return pending.result()
                except BEEPError as e:
                    if e.code == 421 and self._settings.reconnect:
                        # §10: the relay is shutting down and did not take it; the one
                        # it restarts as, or the next the domain has, may.
                        log.info(
                            "relay closing, data for transID {trans_id} goes on the next"
                            " connection: {text}",
                            trans_id=min(asked),
                            text=e.text,
                            event="client.send-again",
                        )
                        lost = connection
                        unsent = (
                            f"not sent: {e.text}, and no other relay took it within {timeout:g} s"
                        )
                        continue
                    log.warn(
                        "relay refused data to {recipients}: {code} {text}",
                        recipients=unique,
                        code=e.code,
                        text=e.text,
                        event="client.data-refused",
                    )
                    pending.settle_all(e.code, e.text)
                except NotSent:
                    # Lost before an octet of it was written (or on a session the relay
                    # is closing): the relay never saw it, so the next session carries
                    # it, under the same transIDs, and it can arrive only once.
                    log.info(
                        "session lost before data for transID {trans_id} went out;"
                        " it goes on the next one",
                        trans_id=min(asked),
                        event="client.send-again",
                    )
                    lost = connection
                    unsent = (
                        "not sent: the connection to the relay was lost before it went out,"
                        f" and was not back within {timeout:g} s"
                    )
                    continue
                except SessionClosed:
                    # The relay may have taken the data before the session went: its
                    # reports can still reach us after re-attaching. Sending again could
                    # deliver twice.
                    log.warn(
                        "session lost while sending transID {trans_id}; waiting for reports",
                        trans_id=min(asked),
                        event="client.send-interrupted",
                    )
                break
            if not pending.done.called:
                left = max(0.0, deadline - self._clock.seconds())
                try:
                    await pending.done.addTimeout(left, self._clock)
                except defer.TimeoutError:
                    pass
            return pending.result()
        finally:
            for trans_id in asked:
                del self._pending[trans_id]

    async def send_message(
        self,
        to: Sequence[str],
        text: str,
        *,
        cc: Sequence[str] = (),
        subject: str | None = None,
        originator: str | None = None,
        timeout: float = REPORT_TIMEOUT,
        protect: Protection | None = None,
    ) -> dict[str, Outcome]:
        """Send ``text`` as an instant message: ``message/cpim`` (RFC 3862) from
        ``originator`` (as for :meth:`send`, by default :attr:`endpoint`) to ``to`` and
        ``cc`` as ``im:`` URIs, dated now (draft-klyne §2.2, §3). Every ``to`` and ``cc``
        endpoint receives it. A gateway attached as several subaddresses sends as the
        one it speaks for: the message's From is the originator the relays check.

        With ``protect``, the CPIM message is signed and/or encrypted whole (RFC 3923
        §3.1) before it is sent, as ``multipart/signed``, ``multipart/encrypted`` (RFC
        3156 §4-§5) or ``application/pkcs7-mime`` (RFC 8551 §3.2) content; the work is
        done in a thread of the reactor's pool. Raises
        :class:`~imxp.e2e.protect.E2EError`, before anything is sent, when it cannot be
        protected (no key or certificate for the sender or a recipient).

        ``text`` is a str (content already bytes goes with :meth:`send`); ``timeout`` is
        as for :meth:`send`, and a wrong one is said before any protecting is done.
        """
        _endpoints_not_one(to, "to")
        _endpoints_not_one(cc, "cc")
        if not isinstance(text, str):
            raise TypeError(
                f"text is a str, not {type(text).__name__}"
                " (content as bytes goes with send(), with its media type)"
            )
        check_timeout(timeout)
        sender = self._sender(originator)  # before any protecting is done
        message = cpim.text_message(sender, to, text, cc=cc, subject=subject)
        content, content_type = cpim.build(message), cpim.MEDIA_TYPE
        if protect is not None:
            content_type, content = await self._protect(content, [*to, *cc], protect)
        return await self.send(
            [*to, *cc], content, content_type, originator=sender, timeout=timeout
        )

    async def _protect(
        self, content: bytes, recipients: Sequence[str], protect: Protection
    ) -> tuple[str, bytes]:
        certificates = list(protect.recipient_certificates)
        if protect.scheme == "smime" and protect.mode != "sign":
            from imxp.e2e import smime

            # gpg refuses a recipient it has no key for; S/MIME has only the certificates
            # given: each recipient needs one, and only theirs may be encrypted to.
            certificates = smime.encryption_certificates(
                recipients, certificates, protect.keys.trust
            )
        # One at a time: each goes on to be sent as it is done, so that what was sent in
        # a row (a chat's lines) is sent in that order, not in the order gpg finished.
        return await self._protecting.run(
            threads.deferToThreadPool,
            self._clock,
            self._clock.getThreadPool(),
            protect_cpim,
            content,
            protect.mode,
            protect.scheme,
            protect.keys,
            recipients=certificates or None,
        )

    def incoming(self, count: int | None = None) -> AsyncIterator[Incoming]:
        """The data received from now on (status reports excluded), as an async iterator;
        the first one made also gets the data that waited for one (``unclaimed_wait``),
        and any made after an iterator ended (``break``) what that one left unread.

        It ends when the client is closed, and raises :class:`ClientError` when the
        connection is lost for good. Each call makes an iterator of its own; the
        ``on_data`` callback sees the same data.

        With ``count``, it takes that many data and ends once it has yielded them: a
        program that wants N messages gets them, and takes none it would not read. (An
        iterator answers each data 250 as it takes it; one ended by ``break`` with more
        taken leaves those to the iterators made later, or to none.) What comes once it
        has taken them is another iterator's or ``on_data``'s, or waits for one as
        without any.
        """
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise TypeError(f"count is a number of data, not {count!r}")
        if count is not None and count < 1:
            raise ValueError(f"count is at least 1, not {count}")
        inbox = _Inbox(self._arrivals, count)
        self._unread = deque(inbox.put_first(list(self._unread)))
        if self._closing or self._failure is not None:
            inbox.end(self._failure)
        else:
            self._inboxes.append(inbox)
            while self._unclaimed and not inbox.full:
                waiting = self._unclaimed.popleft()
                waiting.claimed()
                inbox.put(waiting.arrival, waiting.incoming)
                waiting.answer.callback(wire.OK())
            self._took(inbox)
        iterator = self._drain(inbox)
        # One dropped before its first step never runs _drain's finally: what it was
        # given, answered 250, would stay with it, read by nobody.
        weakref.finalize(iterator, self._forsaken, inbox).atexit = False
        return iterator

    def ended(self) -> defer.Deferred[None]:
        """Fires once :meth:`close` has finished, and fails with :class:`ClientError` once
        the client gives up on the relay for good: on reconnecting, credentials refused
        (``auth``), or relays that answer but take no endpoints (``protocol``: no SASL
        offered, APEX refused), which every further attempt would meet again; or the
        connection lost without ``reconnect``. An application that takes its data with
        ``on_data`` learns so of the end that an ``incoming()`` iterator raises."""
        if self._failure is not None:
            return defer.fail(self._failure.copy())
        if self._closed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._ended.append(d)
        return d

    async def close(self) -> None:
        """Take no more data, let the ``on_data`` handlers still running end, terminate
        every attachment (transID 0, RFC 3340 §4.4.3), then release the BEEP session (RFC
        3080 §2.4).

        From the call on, data is refused with 450 (RFC 3340 §4.4.4.2: its sender learns
        that the application did not take it), ``incoming()`` iterators end after what
        they hold, and the client does not reconnect. An ``async def`` ``on_data`` still
        running gets up to 5 seconds to end, with the connection still up: a bot's
        handler may send, and await the reports. One still running then is cancelled (a
        CancelledError at the ``await`` it is in; ``client.handlers-cancelled`` logs how
        many). Only then do sends still waiting get their outcome (unknown), and later
        ones raise RuntimeError. A relay that answers none of this (frozen, or behind a
        network black hole) holds close() up at most 5 seconds at each step. A second call
        returns when the first has finished."""
        if self._closing:
            if not self._closed:
                try:
                    await self.ended()
                except ClientError:
                    pass  # given up before closing: nothing more to wait for
            return
        self._closing = True
        if self._sleep is not None:
            self._sleep.cancel()
        # No connection comes any more: those waiting for one (sends during an outage)
        # hear so now, rather than after the handlers' grace.
        waiting, self._waiting = self._waiting, {}
        for d in waiting:
            if not d.called:
                d.errback(_Closed())
        # A copy: what each wakes runs at once and takes itself off these books.
        for inbox in list(self._inboxes):
            inbox.end(None)
        if self._unread:
            # Answered 250 as they came, they cannot be refused now: said, not hidden.
            log.warn(
                "closing with {count} data that an ended incoming() iterator left unread",
                count=len(self._unread),
                originators=sorted({incoming.originator for _, incoming in self._unread}),
                event="client.unread-dropped",
            )
            self._unread.clear()
        self._refuse_unclaimed(BEEPError(450, _ENDED))
        running = await self._handlers_ended()
        self._released = True
        if running:
            log.warn(
                "{count} on_data handlers still running after {timeout:g} s are cancelled",
                count=len(running),
                timeout=_CLOSE_TIMEOUT,
                event="client.handlers-cancelled",
            )
            for going in running:
                going.cancel()
        connection, self._connection = self._connection, None
        for pending in list(self._pending.values()):
            pending.give_up("the client was closed before a status report arrived")
        if connection is not None and connection.session is not None:
            session = connection.session
            try:
                assert connection.channel is not None
                terminate = wire.encode(wire.Terminate(0))
                await connection.channel.send(terminate).addTimeout(_CLOSE_TIMEOUT, self._clock)
                await session.close().addTimeout(_CLOSE_TIMEOUT, self._clock)
            except (BEEPError, SessionClosed, defer.TimeoutError):
                pass  # the relay goes away without the courtesies; so do we
            session.disconnect()  # cut after close_timeout if the relay does not answer
            await session.when_closed()
        log.info("client for {endpoint} closed", endpoint=self.endpoint, event="client.closed")
        self._closed = True
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    async def _handlers_ended(self) -> list[defer.Deferred[None]]:
        """Wait up to :data:`_CLOSE_TIMEOUT` for the ``on_data`` handlers still running to
        end: those still running then. A handler that called close() is not among them:
        it cannot end while it waits for close(), which would wait for it in vain."""
        caller = _HANDLER.get()
        if caller is not None:
            caller.closed = True
            # A handler that closes the client is done with its data, which would
            # otherwise wait for close(), and close() for the relay's ending the channel.
            answer = self._answers.pop(caller.going, None) if caller.going else None
            if answer is not None:
                answer.callback(wire.OK())
        others = [going for going in self._handling if caller is None or going is not caller.going]
        if not others:
            return []
        ended: defer.Deferred[None] = defer.Deferred()
        defer.DeferredList(others).addCallback(
            lambda _: None if ended.called else ended.callback(None)
        )
        try:
            await ended.addTimeout(_CLOSE_TIMEOUT, self._clock)
        except defer.TimeoutError:
            pass
        return [going for going in self._handling if caller is None or going is not caller.going]

    # -- connecting ------------------------------------------------------------------

    async def _targets(self) -> list[Target]:
        settings = self._settings
        domain = self._domain
        if settings.relay is not None:
            host, port = _host_port(settings.relay)
            name = settings.tls_name or literal_address(domain) or domain
            return [Target(host, port, name, "configured")]
        assert self._router is not None
        try:
            targets = await self._router.route(domain)
        except NoRoute as e:
            if e.permanent:
                raise ClientError(
                    "unknown-domain", f"unknown domain {domain}: {e.reason}"
                ) from None
            raise ClientError(
                "unreachable", f"cannot find the relay for {domain}: {e.reason}"
            ) from None
        if settings.tls_name is None:
            return targets
        return [Target(t.host, t.port, settings.tls_name, t.source) for t in targets]

    async def _establish(self, *, initial: bool) -> None:
        """Connect to the first relay that works, and attach as every wanted endpoint.

        A relay that cannot be reached, fails TLS, speaks no BEEP or offers no SASL gives
        way to the next candidate (the SRV order of RFC 2782); authentication and attach
        refusals end the attempt, as every relay of the domain would say the same. When
        every candidate failed, the error is a TLS failure if there was one, else the one
        failure or one naming them all: ``protocol`` if every relay answered, else
        ``unreachable``.
        """
        failures: list[ClientError] = []
        for target in await self._targets():
            try:
                connection = await self._connect(target, initial=initial)
            except ClientError as e:
                # A "protocol" with a code is the relay refusing APEX, as all of them would.
                if e.kind not in ("unreachable", "tls") and (e.kind, e.code) != ("protocol", None):
                    raise
                log.warn("{error}", error=e.message, event="client.connect-failed")
                failures.append(e)
                continue
            if self._closing:
                assert connection.session is not None
                connection.session.disconnect()
                return
            self._connected(connection)
            return
        tls = [e for e in failures if e.kind == "tls"]
        if tls or len(failures) == 1:
            raise (tls or failures)[0]
        reasons = "; ".join(e.message for e in failures)
        if all(e.kind == "protocol" for e in failures):
            # Every relay was reached and answered: not unreachable, but not for endpoints.
            message = f"no relay for {self._domain} takes endpoints: {reasons}"
            if any(isinstance(e, _NotBEEP) for e in failures):
                raise _NotBEEP(message)
            raise ClientError("protocol", message)
        raise ClientError("unreachable", f"no relay for {self._domain} answers: {reasons}")

    async def _connect(self, target: Target, *, initial: bool) -> _Connection:
        settings = self._settings
        where = target.address
        connection = _Connection(where)
        # The relays' default window (the option's default, not a Config made here): the
        # client's data and reports need the same room in flight.
        config = SessionConfig(
            window=Config.window, idle_timeout=None, greeting_timeout=settings.connect_timeout
        )
        factory = SessionFactory(Role.INITIATOR, [], config, settings.reactor)
        session: Session | None = None
        try:
            session = await open_session(
                target,
                factory,
                settings.reactor,
                timeout=settings.connect_timeout,
                resolver=settings.resolver,
            )
            await session.greeted()
        except (error.ConnectError, error.DNSLookupError, SessionClosed) as e:
            reason = str(e).rstrip(".")
            if session is not None and session.violated:
                # Something listens there, but what it says is not a BEEP greeting.
                raise _NotBEEP(
                    f"the relay at {where} does not speak BEEP: {session.aborted}"
                ) from None
            raise ClientError(
                "unreachable", f"cannot reach the relay for {self._domain} at {where}: {reason}"
            ) from None
        except BEEPError as e:
            raise ClientError(
                "unreachable",
                f"the relay at {where} refused a session ({e.code}): {e.text}",
                e.code,
            ) from None
        except BaseException:
            # Given up on (cancelled) before the greeting: the connection goes now, not
            # when the greeting's connect_timeout ends it.
            if session is not None:
                session.disconnect()
            raise
        connection.session = session
        # A relay that stalls after its greeting must not hold the client for ever
        # (on reconnecting, nothing else would end the wait): connect_timeout for each
        # of TLS, authentication and attaching, the session dropped when it passes.
        stalled = settings.reactor.callLater(settings.connect_timeout, session.disconnect)
        try:
            await self._secure(session, where, target.tls_name)
            stalled.reset(settings.connect_timeout)
            await self._authenticate(session, where)
            stalled.reset(settings.connect_timeout)
            await self._open_apex(connection, initial=initial)
        except BaseException:
            session.disconnect()
            raise
        finally:
            if stalled.active():
                stalled.cancel()
        return connection

    async def _secure(self, session: Session, where: str, name: str) -> None:
        """TLS with the relay's certificate checked for ``name`` (RFC 3080 §3.1, RFC 6125)."""
        settings = self._settings
        trust = list(settings.trust) if settings.trust is not None else None
        try:
            await start_tls(session, client_options(name, trust, settings.client_certificate))
        except SessionClosed as e:
            raise ClientError("tls", _tls_failure(where, name, str(e))) from None
        except BEEPError as e:
            raise ClientError(
                "tls", f"the relay at {where} would not start TLS ({e.code}): {e.text}", e.code
            ) from None

    async def _authenticate(self, session: Session, where: str) -> None:
        """SASL (RFC 3080 §4.1) with the configured mechanism."""
        settings = self._settings
        name = settings.mechanism
        greeting = session.peer_greeting
        offered = greeting.profiles if greeting is not None else ()
        if profile_uri(name) not in offered:
            others = [m for m in map(mechanism_name, offered) if m]
            if not others:
                # What tells the two services apart from here: on the relay-relay port
                # (apex-mesh, RFC 3340 §3.1) relays prove themselves by certificate
                # (§4.5.2), and no SASL is offered. An edge port offering none (a relay
                # that only relays) looks the same; neither is a matter of credentials.
                raise ClientError(
                    "protocol",
                    f"the relay at {where} offers no SASL mechanism, so no endpoint can log"
                    " in there: it looks like a relay's mesh port (apex-mesh, for relays);"
                    f" endpoints connect to its edge port (apex-edge: {EDGE_PORT}, or"
                    f" {_DEFAULT_EDGE_PORT} in imxp's default configuration)",
                )
            raise ClientError(
                "auth",
                f"the relay at {where} does not offer SASL {name}"
                f" (it offers {', '.join(others) or 'none'})",
            )
        mechanism: ClientMechanism
        try:
            if name == "EXTERNAL":
                mechanism, identity = ExternalClient(), None
            elif name == "PLAIN":
                assert settings.password is not None
                mechanism = PlainClient(settings.username, settings.password, tls_active=True)
                identity = settings.username
            else:
                assert settings.password is not None
                mechanism = ScramSHA256Client(settings.username, settings.password)
                identity = settings.username
        except ValueError as e:
            # Credentials SASLprep refuses (RFC 4013: control characters, say): no relay
            # would take them, nor will this one later.
            raise ClientError("auth", f"{e} (user {settings.username!r})") from None
        try:
            await authenticate(session, mechanism, identity=identity)
        except BEEPError as e:
            raise ClientError(
                "auth", f"authentication failed for {self.endpoint} ({e.code}): {e.text}", e.code
            ) from None
        except SASLClientError as e:
            raise ClientError(
                "auth", f"the relay at {where} did not prove it knows the credentials: {e}"
            ) from None
        except SessionClosed as e:
            raise ClientError(
                "unreachable", f"the relay at {where} went away during authentication: {e}"
            ) from None

    async def _open_apex(self, connection: _Connection, *, initial: bool) -> None:
        """The APEX channel, with the first attach riding on its start (RFC 3340 §4.2),
        then an attach for each further wanted endpoint.

        A refusal fails the first connection (:func:`connect` raises it). On reconnecting,
        an endpoint refused is given up and reported (:meth:`_refused`), and the others
        stay attached: one endpoint taken by another application must not keep a gateway
        from all the rest. Only a 554 while none is attached makes the attempt fail, to
        be tried again."""
        session = connection.session
        assert session is not None
        wanted = list(self._wanted)
        first = wanted[0] if wanted else None
        trans_id = connection.next_trans_id()
        init = wire.encode(wire.Attach(first, trans_id)).body if first else None
        try:
            channel = await session.start_channel(
                [mgmt.ProfileElement(wire.APEX_URI, init)],
                handler=_APEXHandler(self, connection),
            )
            answer = (
                wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
                if first is not None
                else None
            )
        except (BEEPError, wire.APEXError) as e:
            raise ClientError(
                "protocol",
                f"the relay at {connection.where} refused APEX ({e.code}): {e}",
                e.code,
            ) from None
        except SessionClosed as e:
            raise ClientError(
                "unreachable", f"the relay at {connection.where} went away: {e}"
            ) from None
        connection.channel = channel
        refusals: list[tuple[str, int, str]] = []
        if first is not None:
            if isinstance(answer, wire.Error):
                refusals.append((first, answer.code, answer.text))
            else:
                connection.attached[trans_id] = first
        for endpoint in wanted[1:]:
            trans_id = connection.next_trans_id()
            try:
                await channel.send(wire.encode(wire.Attach(endpoint, trans_id)))
            except BEEPError as e:
                refusals.append((endpoint, e.code, e.text))
                continue
            except SessionClosed as e:
                raise ClientError(
                    "unreachable", f"the relay at {connection.where} went away: {e}"
                ) from None
            connection.attached[trans_id] = endpoint
        # 554, attached already (§4.4.1 step 5), may be the relay still holding the
        # attachments of the session we lost, until it notices the loss. They all end
        # together, with its channel (§6.1.1): while none of ours is attached again, a
        # later attempt may succeed. Once one is, a 554 is another application's
        # attachment, and trying again would only be refused again.
        held = not connection.attached
        ending = [r for r in refusals if initial or (held and r[1] == 554)]
        for refusal in refusals:
            if refusal not in ending:
                self._refused(*refusal)
        if ending:
            endpoint, code, text = ending[0]
            raise ClientError(
                "refused", f"the relay refused to attach {endpoint} ({code}): {text}", code
            )

    def _connected(self, connection: _Connection) -> None:
        session = connection.session
        assert session is not None
        self._connection = connection
        for key in set(connection.attached.values()).difference(self._wanted):
            # Detached while this connection was being made, which attached it anyway.
            defer.ensureDeferred(self._terminate(connection, key))
        log.info(
            "attached to the relay at {where} as {endpoints}",
            where=connection.where,
            endpoints=[key for key in connection.attached.values() if key in self._wanted],
            event="client.connected",
        )
        waiting, self._waiting = self._waiting, {}
        for d in waiting:
            if not d.called:
                d.callback(connection)
        session.when_closed().addCallback(lambda _: self._lost(connection))

    def _lost(self, connection: _Connection) -> None:
        if self._connection is not connection:
            return
        self._connection = None
        # Data still waiting for an iterator came on this session, which can no longer
        # carry its answer: the relay has given it its verdict (451, outcome unknown).
        # Handed to an iterator now, it would be read after its sender was told that.
        self._refuse_unclaimed(SessionClosed("the session it came on was lost"))
        if self._closing:
            return
        log.warn(
            "lost the connection to the relay at {where}",
            where=connection.where,
            event="client.connection-lost",
        )
        if self._settings.reconnect:
            defer.ensureDeferred(self._reconnect()).addErrback(
                lambda f: log.failure("reconnecting crashed", f, event="client.internal-error")
            )
        else:
            self._fail(
                ClientError(
                    "unreachable", f"lost the connection to the relay at {connection.where}"
                )
            )

    async def _reconnect(self) -> None:
        """Connect again with exponential backoff and jitter, so that the clients of a
        restarted relay do not all come back in the same instant."""
        delay, longest = self._settings.backoff
        while not self._closing:
            wait = delay * self._rng.uniform(0.5, 1.0)
            log.info("reconnecting in {wait:.1f} s", wait=wait, event="client.reconnect-scheduled")
            self._sleep = task.deferLater(self._clock, wait, lambda: None)
            try:
                await self._sleep
            except defer.CancelledError:
                return
            finally:
                self._sleep = None
            try:
                await self._establish(initial=False)
                return
            except ClientError as e:
                if self._closing:
                    return  # closed meanwhile: the application chose this end, not the relay
                if _for_good(e):
                    # Trying again would meet the same answer for ever: a person has to act.
                    self._fail(e)
                    return
                log.warn("reconnecting failed: {error}", error=e.message, event="client.retry")
            delay = min(delay * 2, longest)

    def _fail(self, failure: ClientError) -> None:
        """No connection any more, for good: tell everyone who waits."""
        log.error(
            "client for {endpoint} gives up: {error}",
            endpoint=self.endpoint,
            error=failure.message,
            event="client.failed",
        )
        self._failure = failure
        waiting, self._waiting = self._waiting, {}
        for d in waiting:
            if not d.called:
                d.errback(failure.copy())
        for pending in list(self._pending.values()):
            pending.give_up(f"no status report: {failure.message}")
        inboxes, self._inboxes = self._inboxes, []
        for inbox in inboxes:
            inbox.end(failure)
        ended, self._ended = self._ended, []
        for d in ended:
            d.errback(failure.copy())

    def _ready(self, lost: _Connection | None = None) -> defer.Deferred[_Connection]:
        """The current connection, once there is one; not ``lost``, whose session has
        ended even while it is still current (its channels fail before the session
        says it has closed)."""
        if self._connection is not None and self._connection is not lost:
            return defer.succeed(self._connection)
        if self._failure is not None:
            return defer.fail(self._failure.copy())
        if self._closing:
            return defer.fail(_Closed())
        d: defer.Deferred[_Connection] = defer.Deferred(lambda d: self._waiting.pop(d, None))
        self._waiting[d] = None
        return d

    # -- receiving (RFC 3340 §4.4.3, §4.4.4.2, §6.2) ------------------------------------

    def _received(
        self, connection: _Connection, element: wire.APEXElement
    ) -> wire.OK | defer.Deferred[wire.OK]:
        if isinstance(element, wire.Data):
            return self._data(connection, element)
        if isinstance(element, wire.Terminate):
            return self._terminated(connection, element)
        # §2.1: a relay does not attach or bind at an application.
        raise BEEPError(537, f"an application accepts no {type(element).__name__.lower()}")

    def _data(self, connection: _Connection, data: wire.Data) -> wire.OK | defer.Deferred[wire.OK]:
        try:
            originator = Endpoint.parse(data.originator.identity)
        except AddressError as e:
            raise BEEPError(553, str(e)) from None
        if originator.is_report_service:
            return self._report(originator, data)
        attached = set(connection.attached.values())
        mine = []
        for recipient in data.recipients:
            try:
                if _key(recipient.identity) in attached:
                    mine.append(recipient.identity)
            except AddressError:
                continue
        if not mine:
            # §4.4.4.2 steps 2-3: no recipient we are attached as.
            raise BEEPError(550, "not attached as any recipient of this data")
        if self._closing:
            # The iterators have ended, and close() waits for the on_data handlers that
            # run to end, not for ones started meanwhile: nobody would take it.
            log.info(
                "data from {originator} refused: the client is closing",
                originator=data.originator.identity,
                event="client.data-closing",
            )
            raise BEEPError(450, _ENDED)
        content = data.content
        incoming = Incoming(
            originator=data.originator.identity,
            recipients=mine,
            media_type=content.media_type if content is not None else "",
            body=content.body if content is not None else b"",
            data=data,
        )
        log.info(
            "data from {originator} for {recipients} ({media_type}, {size} octets)",
            originator=incoming.originator,
            recipients=mine,
            media_type=incoming.media_type,
            size=len(incoming.body),
            event="client.data-received",
        )
        limit = self._settings.on_data_limit
        if self._on_data is not None and len(self._handling) >= limit:
            # Not waited for: the relay drops a session that leaves a data unanswered for
            # its delivery_timeout, and an answer held back holds back those of every
            # later data on the channel (RFC 3080 §2.6.1), the status reports the running
            # handlers may await among them. Refused, the sender may try again later, as
            # past an iterator's unread bound. Before any iterator gets it: the
            # application as a whole refused it.
            log.warn(
                "data from {originator} refused: {count} on_data handlers still running",
                originator=incoming.originator,
                count=limit,
                event="client.data-busy",
            )
            raise BEEPError(450, f"the application is busy: {limit} data are still being handled")
        arrival = self._arrivals
        self._arrivals += 1
        if not self._inboxes and self._on_data is None:
            return self._hold(arrival, incoming)
        answer: wire.OK | defer.Deferred[wire.OK] = wire.OK()
        if self._on_data is not None and self._settings.answer_when_done:
            answer = self._handled(incoming)
        elif self._on_data is not None and not self._call(
            self._on_data,
            incoming,
            _ON_DATA_FAILED,
            running=self._handling,
            refusable=True,
            originator=incoming.originator,
            event="client.on-data-failed",
        ):
            # The sender learns it was not processed, rather than a false 250; and as for
            # any refusal, before an iterator gets it: refused, it may well come again.
            raise BEEPError(451, _NOT_PROCESSED)
        taken = self._on_data is not None
        # A copy: a consumer that stops as it takes this leaves the list meanwhile.
        for inbox in list(self._inboxes):
            # An iterator kept but no longer read (as after one anext()) would hold
            # what arrives, answered 250, until the process ends.
            if len(inbox.items) < _UNCLAIMED_LIMIT:
                if inbox.missed:
                    self._caught_up(inbox)
                inbox.put(arrival, incoming)
                self._took(inbox)
                taken = True
            else:
                self._missing(inbox)
        if not taken:
            # Iterators exist and are read, only not as fast as data comes: not a
            # missing reader, which is what an operator would otherwise go looking for.
            self._unclaimed_refused(
                incoming, f"the incoming() iterators have {_UNCLAIMED_LIMIT} data unread"
            )
            raise BEEPError(450, f"the application is behind: {_UNCLAIMED_LIMIT} data wait unread")
        return answer

    def _handled(self, incoming: Incoming) -> wire.OK | defer.Deferred[wire.OK]:
        """``on_data`` run to its end before its data is answered (``answer_when_done``):
        250 once it returns; 451 if it fails, early or late, or is still running when
        :meth:`close` gives up on it, so that its sender learns it was not processed
        (RFC 3340 §4.4.4.2: the application's answer is the recipient's verdict)."""
        assert self._on_data is not None
        fields: dict[str, object] = {
            "originator": incoming.originator,
            "event": "client.on-data-failed",
        }
        failed = BEEPError(451, _NOT_PROCESSED)
        try:
            run = self._start(self._on_data, incoming)
        except Refusal as e:
            raise self._data_refused(e, fields) from None
        except Exception:
            log.failure(_ON_DATA_FAILED, **fields)
            raise failed from None
        if run is None or run.going is None:
            return wire.OK()
        going = run.going
        self._handling.add(going)
        answer: defer.Deferred[wire.OK] = defer.Deferred()
        if run.closed:
            # It closed the client before its first await: see _handlers_ended.
            answer.callback(wire.OK())
        else:
            self._answers[going] = answer

        def ended(result: object) -> None:
            self._handling.discard(going)
            self._answers.pop(going, None)
            if isinstance(result, Failure) and isinstance(result.value, Refusal):
                refusal = self._data_refused(result.value, fields)
                if not answer.called:
                    answer.errback(refusal)
            elif isinstance(result, Failure):
                self._failed_later(result, _ON_DATA_FAILED, fields, cancellable=True)
                if not answer.called:
                    answer.errback(failed)
            elif not answer.called:
                answer.callback(wire.OK())

        going.addBoth(ended)
        return answer

    def _call(
        self,
        callback: Callable[[Any], Awaitable[None] | None],
        argument: object,
        message: str,
        *,
        running: set[defer.Deferred[None]] | None = None,
        refusable: bool = False,
        **fields: object,
    ) -> bool:
        """Call the application's ``callback`` with ``argument``: False if it failed.

        An ``async def`` runs at once, up to its first ``await``, and a failure before
        then counts as a plain callback's does; rather than dropped unawaited, it then
        goes on by itself, in ``running`` until it ends. Awaiting it before answering
        would hold back the answers to every later data on the channel (RFC 3080 §2.6.1:
        replies go in order) for as long as it waits, e.g. for the status report of a
        data it sends. Every failure, early or late, is logged with ``message``, but for
        the cancellation of one :meth:`close` gave up waiting for, which it logs itself.
        If ``refusable``, a :class:`Refusal` before then is raised as the BEEPError that
        answers the data.
        """
        try:
            run = self._start(callback, argument)
        except Refusal as e:
            if not refusable:
                log.failure(message, **fields)
                return False
            raise self._data_refused(e, fields) from None
        except Exception:
            log.failure(message, **fields)
            return False
        if run is not None and run.going is not None:
            going = run.going
            going.addErrback(self._failed_later, message, fields, cancellable=running is not None)
            if running is not None:
                running.add(going)
                going.addBoth(lambda _: running.discard(going))
        return True

    @staticmethod
    def _data_refused(refusal: Refusal, fields: dict[str, object]) -> BEEPError:
        """What ``on_data`` refused with, as the answer to its data."""
        log.info(
            "data from {originator} refused by on_data: {code} {text}",
            originator=fields["originator"],
            code=refusal.code,
            text=refusal.text,
            event="client.data-refused",
        )
        return BEEPError(refusal.code, refusal.text)

    @staticmethod
    def _start(callback: Callable[[Any], Awaitable[None] | None], argument: object) -> _Run | None:
        """Call ``callback``, an ``async def`` up to its first ``await``: its run, if it
        goes on; None if it has ended; what it raised, if it failed so far."""
        result = callback(argument)
        if not inspect.isawaitable(result):
            return None
        run = _Run()
        # The coroutine runs in a copy of the context as it is now.
        token = _HANDLER.set(run)
        try:
            going = run.going = defer.ensureDeferred(result)  # type: ignore[arg-type]
        finally:
            _HANDLER.reset(token)
        if going.called:
            early: list[Failure] = []
            going.addErrback(early.append)
            if early:
                early[0].raiseException()
            return None
        return run

    def _failed_later(
        self, failure: Failure, message: str, fields: dict[str, object], *, cancellable: bool
    ) -> None:
        if cancellable and self._released and failure.check(defer.CancelledError):
            return  # close() cancelled it, and logged that once for all it cancelled
        log.failure(message, failure, **fields)

    def _hold(self, arrival: int, incoming: Incoming) -> defer.Deferred[wire.OK]:
        """Data that arrived with no ``incoming()`` iterator or ``on_data`` to take it:
        as when a program sends and only then reads, and the answer comes first. It waits
        for the first iterator, unanswered, for ``unclaimed_wait`` seconds; then it is
        refused with 450, so that its sender learns that nobody read it (RFC 3340
        §4.4.4.2: the application's answer is the recipient's verdict), not that it was
        delivered."""
        if len(self._unclaimed) >= _UNCLAIMED_LIMIT:
            self._unclaimed_refused(
                incoming, f"{_UNCLAIMED_LIMIT} data already wait for a first incoming() iterator"
            )
            raise BEEPError(450, "the application is not taking data")
        answer: defer.Deferred[wire.OK] = defer.Deferred()
        waiting = _Unclaimed(arrival, incoming, answer)
        waiting.timer = self._clock.callLater(
            self._settings.unclaimed_wait, self._unclaimed_expired, waiting
        )
        self._unclaimed.append(waiting)
        return answer

    def _refuse_unclaimed(self, reason: Exception) -> None:
        """Answer every data still waiting for a first iterator with ``reason``."""
        while self._unclaimed:
            waiting = self._unclaimed.popleft()
            waiting.claimed()
            waiting.answer.errback(reason)

    def _unclaimed_expired(self, waiting: _Unclaimed) -> None:
        self._unclaimed.remove(waiting)
        wait = self._settings.unclaimed_wait
        self._unclaimed_refused(
            waiting.incoming, f"neither incoming() nor on_data took it within {wait:g} s"
        )
        waiting.answer.errback(BEEPError(450, f"no application took it within {wait:g} s"))

    @staticmethod
    def _missing(inbox: _Inbox) -> None:
        """An iterator behind by as many data as it may hold does not get the data that
        others (on_data, another iterator) take: said as it begins, not for each."""
        if not inbox.missed:
            log.warn(
                "an incoming() iterator has {limit} data unread: it misses what on_data "
                "or other iterators take until it is read",
                limit=_UNCLAIMED_LIMIT,
                event="client.data-missed",
            )
        inbox.missed += 1

    @staticmethod
    def _caught_up(inbox: _Inbox) -> None:
        log.info(
            "an incoming() iterator gets data again, having missed {count}",
            count=inbox.missed,
            event="client.data-missed-ended",
        )
        inbox.missed = 0

    def _unclaimed_refused(self, incoming: Incoming, why: str) -> None:
        log.warn(
            "data from {originator} refused: {why}",
            originator=incoming.originator,
            why=why,
            event="client.data-unclaimed",
        )

    def _report(self, reporter: Endpoint, data: wire.Data) -> wire.OK:
        if data.content is None:
            raise BEEPError(501, "a status report without content")
        try:
            response = wire.decode_status_response(data.content.body)
        except wire.APEXError as e:
            log.warn(
                "malformed status report from {reporter}: {code} {text}",
                reporter=str(reporter),
                code=e.code,
                text=e.text,
                event="client.malformed-report",
            )
            raise BEEPError(e.code, e.text) from None
        log.info(
            "status report {trans_id} from {reporter}: {destinations}",
            trans_id=response.trans_id,
            reporter=str(reporter),
            destinations=response.destinations,
            event="client.report",
        )
        pending = self._pending.get(response.trans_id)
        if pending is not None:
            for identity, code, text in response.destinations:
                pending.report(response.trans_id, identity, code, text, reporter.domain)
        return wire.OK()

    def _terminated(self, connection: _Connection, terminate: wire.Terminate) -> wire.OK:
        if terminate.trans_id == 0:
            ended = list(connection.attached.values())
            connection.attached.clear()
        elif terminate.trans_id in connection.attached:
            ended = [connection.attached.pop(terminate.trans_id)]
        else:
            raise BEEPError(550, "unknown transaction-identifier")  # §4.4.3 step 2
        log.warn(
            "relay ended the attachment of {endpoints}: {code} {text}",
            endpoints=ended,
            code=terminate.code,
            text=terminate.text,
            event="client.terminated",
        )
        if terminate.code != _SERVICE_NOT_AVAILABLE:
            # Ended on purpose: not re-attached. A relay shutting down (421) is another
            # matter; the next connection attaches again.
            self._wanted = [e for e in self._wanted if e not in ended]
        self._notify(Termination(tuple(ended), terminate.code, terminate.text))
        return wire.OK()

    def _refused(self, endpoint: str, code: int, text: str) -> None:
        """An attach the relay refused: no longer wanted, and worth telling."""
        log.warn(
            "relay refused to attach {endpoint}: {code} {text}",
            endpoint=endpoint,
            code=code,
            text=text,
            event="client.attach-refused",
        )
        if endpoint in self._wanted:
            self._wanted.remove(endpoint)
            self._notify(Termination((endpoint,), code, text))

    def _notify(self, termination: Termination) -> None:
        if self._on_terminated is not None:
            self._call(
                self._on_terminated,
                termination,
                "on_terminated failed",
                event="client.on-terminated-failed",
            )

    # -- helpers ---------------------------------------------------------------------

    def _new_trans_id(self, taken: set[int]) -> int:
        """A transID in use neither by a data awaiting reports nor in ``taken``, which it
        joins. §6.1.1: unpredictable, so that a report for someone else's earlier data
        under the same endpoint is unlikely to match, and a relay that saw one of a data's
        transIDs cannot guess another."""
        while True:
            trans_id = secrets.randbelow(wire.MAX_TRANS_ID) + 1
            if trans_id not in self._pending and trans_id not in taken:
                taken.add(trans_id)
                return trans_id

    async def _drain(self, inbox: _Inbox) -> AsyncIterator[Incoming]:
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    return
                yield item
        finally:
            self._forsaken(inbox)

    def _took(self, inbox: _Inbox) -> None:
        """An iterator with all the data it was made to take takes no more; it ends once
        it has yielded them."""
        if inbox.full and inbox in self._inboxes:
            self._inboxes.remove(inbox)
            inbox.end(None)

    def _forsaken(self, inbox: _Inbox) -> None:
        """An iterator ended, or was dropped: what it did not read goes on to others.
        (Called twice for one: as it ends, and as it is collected.)"""
        if inbox in self._inboxes:
            self._inboxes.remove(inbox)
        if inbox.items and not self._closing:
            left = list(inbox.items)
            inbox.items.clear()
            self._left_unread(left)

    def _left_unread(self, left: list[tuple[int, Incoming]]) -> None:
        """An iterator left by ``break`` (a bot's "quit") or an exception had not read
        ``left``, answered 250 as it came: it goes to the iterators made since it came,
        which did not get it, or else to the next one made, rather than nowhere."""
        log.info(
            "an incoming() iterator ended with {count} data unread; iterators made later get them",
            count=len(left),
            event="client.data-unread",
        )
        had: set[int] = set()
        for other in list(self._inboxes):
            # It got those that came after it was made as they came.
            had.update(arrival for arrival, _ in left if arrival >= other.made)
            offered = [(arrival, item) for arrival, item in left if arrival < other.made]
            rest = other.put_first(offered)
            had.update(arrival for arrival, _ in offered[: len(offered) - len(rest)])
            self._took(other)
        # What no iterator has (none was made since it came, or those made have taken
        # their count) waits for the next one made.
        self._unread.extend((arrival, item) for arrival, item in left if arrival not in had)


def _for_good(error: ClientError) -> bool:
    """Whether every further attempt to reconnect would end as ``error`` did, so that a
    person has to act: what :meth:`Client._establish` raises at once, as every relay of
    the domain would say the same, or what every relay of it said.

    Credentials refused (and failed logins would be throttled by the relay), an attach
    refused, but for 554, which may be the relay still holding the lost session's
    attachments (RFC 3340 §6.1.1); and a relay that answers in BEEP but offers endpoints
    no SASL (RFC 3080 §4.1) or refuses APEX (RFC 3340 §4.2), as a relay restarted with
    another configuration, or a mesh port now where the edge port was, would for ever.
    Not a relay that cannot be reached, fails TLS, or is something that does not speak
    BEEP, any of which may be over by the next attempt.
    """
    if error.kind == "protocol":
        return not isinstance(error, _NotBEEP)
    return error.kind in ("auth", "refused") and error.code != 554


def check_timeout(timeout: float, name: str = "timeout") -> None:
    """Raise TypeError or ValueError unless ``timeout`` is what :meth:`Client.send` takes:
    seconds, more than 0, or the data could not even be handed to the relay, and finite
    as a float, as the reactor's timers need (an int beyond the largest float is not).
    None is not "no timeout": waiting for ever for a report that may never come is what
    the timeout is there to prevent (the default is :data:`REPORT_TIMEOUT`). ``name``
    is the parameter's, for the message."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} is seconds (a number), not {timeout!r}")
    if not 0 < timeout <= sys.float_info.max:  # NaN is neither; an int is compared exactly
        raise ValueError(f"{name} is seconds, more than 0 and finite, not {timeout!r}")


def _check_backoff(backoff: tuple[float, float]) -> None:
    """Raise TypeError or ValueError unless ``backoff`` is a first and a longest delay
    that :meth:`Client._reconnect` can use: with a delay of 0 a client of a relay that
    is down would try again without pause, and so would every other client of it."""
    if not isinstance(backoff, tuple | list) or len(backoff) != 2:
        raise TypeError(f"backoff is (first, longest) delay in seconds, not {backoff!r}")
    for delay in backoff:
        check_timeout(delay, "each backoff delay")
    if backoff[0] > backoff[1]:
        raise ValueError(f"backoff's first delay is longer than its longest: {backoff!r}")


def _endpoints_not_one(endpoints: Sequence[str], name: str) -> None:
    # A str is a sequence too: of one-letter "endpoints", each without a domain.
    if isinstance(endpoints, str):
        raise TypeError(f"{name} is a list of endpoints: [{endpoints!r}], not {endpoints!r}")


# One lock per replay cache: a ReplayCache is not thread-safe, and messages from one
# stream should be judged in the order they arrived.
_replay_locks: weakref.WeakKeyDictionary[ReplayCache, defer.DeferredLock] = (
    weakref.WeakKeyDictionary()
)


async def open_incoming(
    incoming: Incoming,
    keys: Keys,
    *,
    replays: ReplayCache | None = None,
    now: datetime | None = None,
    window: timedelta = _WINDOW,
    reactor: Any = None,
) -> Report:
    """:meth:`Incoming.open` in a thread of ``reactor``'s pool (default: the global
    reactor), so that gpg and the S/MIME cryptography do not hold up the reactor.

    Calls sharing ``replays`` take turns, in the order they were made.
    """
    if reactor is None:
        from twisted.internet import reactor

    def run() -> defer.Deferred[Report]:
        return threads.deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            incoming.open,
            keys,
            replays=replays,
            now=now,
            window=window,
        )

    if replays is None:
        return await run()
    lock = _replay_locks.setdefault(replays, defer.DeferredLock())
    return await lock.run(run)


def _host_port(relay: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[IPv6]:port``; the port defaults to 913 (§8.3)."""
    host, port = relay, str(EDGE_PORT)
    if relay.startswith("["):
        host, bracket, rest = relay[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"relay {relay!r} is not [address]:port")
        port = rest[1:] or port
    elif relay.count(":") == 1:
        host, port = relay.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"relay {relay!r} is not host:port")
    return host, int(port)


def _tls_failure(where: str, name: str, reason: str) -> str:
    """One line saying why the relay's certificate was not accepted."""
    if "Mismatch" in reason:
        return (
            f"TLS with the relay at {where} failed: its certificate is not valid for {name}"
            " (RFC 6125); if the relay is meant to be known by another name, say so as"
            " tls_name (--tls-name)"
        )
    if "certificate verify failed" in reason:
        return (
            f"TLS with the relay at {where} failed: its certificate for {name} does not verify"
            " (not issued by a trusted CA, expired, or not yet valid)"
        )
    return f"TLS with the relay at {where} failed, expecting a certificate for {name}: {reason}"


async def connect(
    endpoint: str,
    *,
    password: str | None = None,
    relay: str | None = None,
    trust: Sequence[x509.Certificate] | None = None,
    tls_name: str | None = None,
    client_certificate: Issued | None = None,
    mechanism: str | None = None,
    username: str | None = None,
    resolver: IResolver | None = None,
    reactor: Any = None,
    reconnect: bool = True,
    on_data: Callable[[Incoming], Awaitable[None] | None] | None = None,
    on_terminated: Callable[[Termination], Awaitable[None] | None] | None = None,
    backoff: tuple[float, float] = (1.0, 60.0),
    connect_timeout: float = 30.0,
    unclaimed_wait: float = UNCLAIMED_WAIT,
    on_data_limit: int = ON_DATA_LIMIT,
    answer_when_done: bool = False,
) -> Client:
    """Attach to the relay of ``endpoint``'s domain as ``endpoint`` (RFC 3340 §2.1).

    :param relay: ``host:port`` of the relay; by default the SRV records
        ``_apex-edge._tcp.DOMAIN`` (§3.1, RFC 2782) are tried in order, then the domain
        itself at port 913 (§8.3).
    :param trust: CA certificates the relay's certificate must chain to; None: the
        platform's trust store.
    :param tls_name: the name the relay's certificate must show; by default the domain
        of ``endpoint``, whichever host serves it (RFC 6125 §6.2.1).
    :param client_certificate: a TLS client certificate (:func:`imxp.certs.issue_client`).
    :param mechanism: SASL mechanism: "SCRAM-SHA-256" (the default), "PLAIN" (always over
        TLS here), or "EXTERNAL" (the default with a client certificate).
    :param username: SASL username; by default the endpoint's address (``fred`` for
        ``fred/appl=im@a.test``).
    :param resolver: DNS for SRV and address lookups; by default the system's servers.
    :param reactor: provides TCP and time; by default the global reactor.
    :param reconnect: after a lost connection, connect and attach again with backoff
        (``backoff``: first and longest delay in seconds), until a refusal that every
        further attempt would meet (see :meth:`Client.ended`); otherwise the client
        fails. An endpoint the relay then refuses to attach is no longer attached (see
        ``on_terminated``); the others are.
    :param on_data: called with each :class:`Incoming` data; raising makes the relay
        report 451 to its sender, and raising :class:`Refusal` its code. It may be an
        ``async def``: it runs up to its first ``await`` before the data is answered
        (raising there is the same), then goes on by itself, so that a bot may await its
        own sends in it; a failure after that is logged (``client.on-data-failed``), and
        its sender, told 250, does not learn of it, unless ``answer_when_done``. At most
        ``on_data_limit`` run so at once; :meth:`Client.close` gives those still running
        a few seconds to end, then cancels them.
    :param on_terminated: called with a :class:`Termination` when the relay ends
        attachments (§4.4.3) or refuses to re-attach one after a reconnection; it may be
        an ``async def`` too.
    :param connect_timeout: seconds for a TCP connection and the relay's greeting.
    :param unclaimed_wait: seconds data that arrives while no ``incoming()`` iterator
        and no ``on_data`` can take it waits for an iterator, unanswered, before it is
        refused with 450 (its sender is told that nobody read it); the first iterator
        made gets what waits.
    :param on_data_limit: how many ``async def`` ``on_data`` handlers may be running at
        once past their data's answer (a slow one awaiting a database, say). While so
        many run, further data is refused with 450 at once, ``on_data`` not called for
        it (``client.data-busy``), and its sender may try again later; an iterator past
        1,000 unread does the same. The data is not held unanswered until one ends: the
        relay would drop the session once it waited its ``delivery_timeout`` (60 s by
        default), and every later answer on the channel, status reports for the
        handlers' own sends among them, would wait behind it (RFC 3080 §2.6.1).
    :param answer_when_done: answer each data once its ``async def`` ``on_data`` has
        ended, not at its first ``await``: 250 once it returns, 451 if it fails or
        :meth:`Client.close` cancels it (one that calls close() itself has taken its
        data: 250). What a gateway that hands data on, or a bot that must not lose a
        message it was told it has, wants: its sender learns whether the data was
        processed. The cost: answers go in order (RFC 3080 §2.6.1), so every later data's
        answer waits for the slowest handler before it; a handler that runs past the
        relay's ``delivery_timeout`` (60 s by default) has the relay report its data, and
        those after it, failed (451) and drop the session, which the client makes again.
        Status reports of the handler's own sends are taken as they come, so it may
        await them.
    :raises ClientError: with the ``kind`` of failure (see the module documentation).
    :raises ValueError: for an ``endpoint`` or ``relay`` that is malformed, an
        ``on_data_limit`` less than 1, or a delay of ``backoff``, a ``connect_timeout``
        or an ``unclaimed_wait`` that is not more than 0 seconds and finite, or a first
        delay longer than the longest (TypeError for values of the wrong type).
    """
    if reactor is None:
        from twisted.internet import reactor
    parsed = Endpoint.parse(endpoint)
    if relay is not None:
        _host_port(relay)
    if isinstance(on_data_limit, bool) or not isinstance(on_data_limit, int):
        raise TypeError(f"on_data_limit is a number of handlers, not {on_data_limit!r}")
    if on_data_limit < 1:
        raise ValueError(f"on_data_limit is at least 1 handler, not {on_data_limit}")
    _check_backoff(backoff)
    check_timeout(connect_timeout, "connect_timeout")
    check_timeout(unclaimed_wait, "unclaimed_wait")
    chosen = mechanism or ("EXTERNAL" if client_certificate is not None else SCRAM_SHA_256)
    if chosen not in (SCRAM_SHA_256, "PLAIN", "EXTERNAL"):
        raise ValueError(f"SASL mechanism {chosen} is not supported here")
    if chosen == "EXTERNAL" and client_certificate is None:
        raise ClientError("auth", "SASL EXTERNAL needs a client certificate")
    if chosen != "EXTERNAL" and not password:
        raise ClientError("auth", f"SASL {chosen} needs a password for {parsed}")
    settings = _Settings(
        password=password,
        relay=relay,
        trust=tuple(trust) if trust is not None else None,
        tls_name=tls_name,
        client_certificate=client_certificate,
        mechanism=chosen,
        username=username or parsed.address,
        resolver=resolver,
        reactor=reactor,
        reconnect=reconnect,
        backoff=backoff,
        connect_timeout=connect_timeout,
        unclaimed_wait=unclaimed_wait,
        on_data_limit=on_data_limit,
        answer_when_done=answer_when_done,
    )
    client = Client(str(parsed), settings, on_data, on_terminated)
    await client._establish(initial=True)
    return client
