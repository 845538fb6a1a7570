"""The SASL family of profiles, ``http://iana.org/beep/SASL/<MECHANISM>`` (RFC 3080 §4.1).

This is the glue between BEEP channels and the sans-IO mechanisms of
:mod:`imxp.beep.saslmech`: it carries challenges and responses in ``<blob>`` elements
(§4.1.2, DTD §7.3), base64 inside, and turns a mechanism's outcome into a reply.

Listener side: one :class:`SASLProfile` per configured mechanism (:func:`sasl_profiles`).
Creating the channel starts the exchange (§4.1.1); a ``<blob>`` piggybacked on ``start``
is the client's initial response. Without one, the server answers the start with a
challenge straight away - an empty one for the client-first mechanisms we have (RFC 4422
§5), as the CRAM-MD5 example of §4.1.1 shows for a server-first one. Challenges go back as
``<blob status='continue'>``, success as ``<blob status='complete'>`` and failure as an
``<error>``: inside the reply to ``start`` when it comes at once (the channel is created
all the same, §4.1.1), as ERR to a MSG later. Each channel carries one exchange; after a
failure or an abort the client starts a new channel.

Guessing is slowed before the work, not after it: a session has one exchange at work at a
time (another one's blob meanwhile gets 450), and each blob waits for its peer address's
turn at a :class:`~imxp.beep.users.FailureThrottle`, which after failures comes only once
their delay has passed, whichever session of the address the attempt comes on. Each
failure is logged once (``beep.sasl-failure``); refusals of a flood once per burst
(``beep.sasl-busy``, ``beep.sasl-throttled``).

Initiator side: :func:`authenticate` runs a :class:`~imxp.beep.saslmech.ClientMechanism`
over a new channel and closes that channel afterwards (RFC 3080 does not ask for it; it
keeps the channel count low, and the identity belongs to the session, not the channel).

None of our mechanisms negotiates a security layer, so there is no tuning reset here: the
session simply carries the authorised identity from then on (§4.1, "use of the
authorization identity").
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
from collections.abc import Callable, Iterable
from xml.etree.ElementTree import Element

from twisted.internet import defer
from twisted.python.failure import Failure as TwistedFailure

from imxp import logs
from imxp.beep import mgmt, xmlsafe
from imxp.beep.message import Message
from imxp.beep.saslmech import (
    MAX_RESPONSE_OCTETS,
    SCRAM_SHA_256,
    SERVER_MECHANISMS,
    Challenge,
    ClientMechanism,
    ISCRAMKeyStore,
    LoginPortal,
    SASLClientError,
    ServerMechanism,
    Success,
    profile_uri,
    server_mechanism,
)
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    Profile,
    Request,
    Session,
    SessionClosed,
    peer_network,
)
from imxp.beep.users import FailureThrottle, Throttled, Verdict
from imxp.certs import client_identity

__all__ = ["SASLProfile", "authenticate", "sasl_profiles"]

log = logs.Logger(namespace="imxp.beep.sasl")

_CONTINUE = "continue"
_COMPLETE = "complete"
_ABORT = "abort"
_STATUSES = (_CONTINUE, _COMPLETE, _ABORT)
# Base64 makes the longest response a mechanism accepts 4/3 as long; the rest is room for
# line breaks and markup. Anything longer is refused before it reaches the XML parser.
_MAX_BLOB_XML = 2 * MAX_RESPONSE_OCTETS


# -- the blob element (§4.1.2, §4.1.3, DTD §7.3) -------------------------------------------


def _encode_blob(data: bytes | None, status: str | None = None) -> bytes:
    attrs = "" if status is None else f" status='{status}'"
    if not data:
        return f"<blob{attrs} />".encode("ascii")
    return f"<blob{attrs}>{base64.b64encode(data).decode('ascii')}</blob>".encode("ascii")


def _parse_xml(content: bytes) -> Element:
    if len(content) > _MAX_BLOB_XML:
        raise BEEPError(501, f"SASL element longer than {_MAX_BLOB_XML} octets")
    try:
        return xmlsafe.parse(content, max_size=_MAX_BLOB_XML)
    except xmlsafe.XMLError as e:
        raise BEEPError(500, str(e)) from None


def _blob(element: Element) -> tuple[str, bytes]:
    """The status and decoded content of a ``blob`` element, or BEEPError 501."""
    if element.tag != "blob":
        raise BEEPError(501, f"expected a blob element, got {element.tag[:32]}")
    if len(element):
        raise BEEPError(501, "blob element may not contain elements")
    status = element.get("status", _CONTINUE)
    if status not in _STATUSES:
        raise BEEPError(501, f"status attribute {status[:16]!r} of blob is not one of the DTD's")
    try:
        # §4.1.2: always base64; whitespace is tolerated because line-wrapped blobs occur.
        data = base64.b64decode("".join((element.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise BEEPError(501, "blob content is not valid base64") from None
    return status, data


# -- listener side ---------------------------------------------------------------------


def _authenticated(session: Session) -> bool:
    return session.authenticated_identity is not None or session.authenticated_mechanism is not None


def _certificate_identity(session: Session) -> str | None:
    certificate = session.peer_certificate
    return client_identity(certificate) if certificate is not None else None


def _logout_when_closed(session: Session, logout: Callable[[], object]) -> None:
    """Run the cred realm's ``logout`` once the session is gone (Success.logout)."""

    def closed(_: object) -> None:
        try:
            logout()
        except Exception:
            log.failure(
                "SASL logout failed for {peer}", peer=session.peer, event="beep.sasl-logout"
            )

    # when_closed() rather than on_lost: that hook belongs to the factory's session count.
    session.when_closed().addCallback(closed)


class _State(enum.Enum):
    OPEN = "expecting a blob"
    BUSY = "working on a blob"
    ENDED = "failed or aborted"
    AUTHENTICATED = "authenticated"


class _Turns:
    """The SASL exchanges of one session, listener side: one at work at a time.

    An exchange is at work from a blob's arrival to its answer, the wait for its peer
    address's turn (:meth:`FailureThrottle.turn`) included. A blob of another exchange
    meanwhile ends that exchange with 450, "requested action not taken (e.g., lock already
    in use)" (RFC 3080 §8), unchecked: the lock is the session's one authentication
    (§4), and a client that waits for each answer, as RFC 4422 §3 has it, never meets it.
    Without this a client could have a password checked on each of its channels at once.
    """

    __slots__ = ("refused", "wait", "working")

    def __init__(self) -> None:
        self.working: _ServerExchange | None = None
        # The turn the one at work waits for, given up if the session goes.
        self.wait: defer.Deferred[Callable[[Verdict], None]] | None = None
        # Exchanges refused while this one works: the first is logged, not the burst.
        self.refused = 0

    def closed(self, _: object) -> None:
        wait, self.wait = self.wait, None
        if wait is not None:
            wait.cancel()


def _turns(session: Session) -> _Turns:
    turns = session.sasl_turns
    if turns is None:
        turns = session.sasl_turns = _Turns()
        session.when_closed().addCallback(turns.closed)
    return turns


class _ServerExchange(ChannelHandler):
    """One authentication exchange on one channel, server side (RFC 3080 §4.1.1-§4.1.3)."""

    def __init__(
        self, profile: SASLProfile, session: Session, mechanism: ServerMechanism, host: str
    ) -> None:
        self.profile = profile
        self.session = session
        self.mechanism = mechanism
        self.host = host
        self.state = _State.OPEN

    @functools.cached_property
    def network(self) -> str:
        """What the throttle counts as the peer: its address, the /64 for IPv6 (not
        worked out for the exchanges a flood has refused at once)."""
        return peer_network(self.host)

    def message_received(self, request: Request) -> defer.Deferred[Message]:
        if request.message.content_type != mgmt.BEEP_XML:
            raise BEEPError(500, f"SASL blobs travel as {mgmt.BEEP_XML}")
        d = self.respond(request.message.body)
        return d.addCallback(lambda blob: Message(blob, mgmt.BEEP_XML))

    def respond(self, content: bytes | None) -> defer.Deferred[bytes]:
        """The reply blob to the client's blob (None: a ``start`` without one).

        Fails with :class:`BEEPError` carrying the code of the ``<error>`` to send, or
        with :class:`SessionClosed` when the session went while the blob waited its turn.
        """
        if self.state is _State.AUTHENTICATED or _authenticated(self.session):
            # §4: "no additional attempts at authentication are allowed".
            return defer.fail(BEEPError(550, "already authenticated"))
        if self.state is _State.ENDED:
            return defer.fail(BEEPError(550, "this exchange has ended; start a new channel"))
        if self.state is _State.BUSY:
            return defer.fail(BEEPError(500, "the previous blob is not answered yet"))
        turns = _turns(self.session)
        if turns.working is not None:
            # Before the blob is even parsed: a flood of these should cost next to nothing.
            return defer.fail(self._busy(turns))
        response = None
        if content is not None:
            try:
                status, response = _blob(_parse_xml(content))
            except BEEPError as e:
                return defer.fail(self._end(e.code, e.text))
            if status == _ABORT:
                # RFC 4422 §3.5: an aborted exchange ends with the outcome failure.
                return defer.fail(self._end(535, "authentication aborted by the client"))
            if status == _COMPLETE:
                return defer.fail(self._end(501, "only the server sends status='complete'"))
        turns.working = self
        self.state = _State.BUSY
        return defer.ensureDeferred(self._work(turns, response))

    async def _work(self, turns: _Turns, response: bytes | None) -> bytes:
        """Wait for the address's turn, then step the mechanism: the throttle's delay
        comes before the work, so that what it slows is the checking of passwords."""
        end: Callable[[Verdict], None] | None = None
        verdict: Verdict = None
        try:
            throttle = self.profile.throttle
            if throttle is not None:
                turns.wait = throttle.turn(self.network)
                try:
                    end = await turns.wait
                except Throttled as e:
                    raise self._throttled(e) from None
                except defer.CancelledError:
                    self.state = _State.ENDED
                    raise SessionClosed("session closed while the exchange waited") from None
                finally:
                    turns.wait = None
                if self.session.transport is None:
                    # Gone before the wait began (closed() ran then): nobody to answer.
                    self.state = _State.ENDED
                    raise SessionClosed("session closed while the exchange waited")
            step = await self.mechanism.step(response)
            if isinstance(step, Challenge):
                self.state = _State.OPEN
                return _encode_blob(step.data, _CONTINUE)
            if isinstance(step, Success):
                verdict = True
                return self._succeeded(step)
            if end is not None:
                # Counted before it is logged, so that the log says the delay it causes.
                end, ending = None, end
                ending(False)
            raise self._end(step.code, step.text, step.reason, step.username)
        finally:
            if end is not None:
                end(verdict)
            if turns.working is self:
                turns.working = None
                turns.refused = 0

    def _succeeded(self, success: Success) -> bytes:
        session = self.session
        if _authenticated(session):
            # Another exchange got there first (§4: one success); not the peer's fault.
            success.logout()
            self.state = _State.ENDED
            raise BEEPError(550, "already authenticated")
        session.authenticated_identity = success.identity
        session.authenticated_mechanism = self.mechanism.name
        session.authenticated_anonymously = success.anonymous
        _logout_when_closed(session, success.logout)
        self.state = _State.AUTHENTICATED
        if session.on_authenticated is not None:
            session.on_authenticated(session)
        return _encode_blob(success.data, _COMPLETE)

    def _end(
        self, code: int, text: str, reason: str | None = None, username: str | None = None
    ) -> BEEPError:
        """End the exchange with an error, logged once (``reason`` for the log only).

        ``delay`` in the log is how long the address's next attempt will wait: only the
        mechanism's verdicts count against it (in :meth:`_work`), since malformed blobs and
        aborts tell a guesser nothing.
        """
        self.state = _State.ENDED
        throttle = self.profile.throttle
        log.warn(
            "SASL {mechanism} refused {username!r} from {peer}: {reason} ({code})"
            if username is not None
            else "SASL {mechanism} refused from {peer}: {reason} ({code})",
            mechanism=self.mechanism.name,
            username=username,
            peer=self.host,
            code=code,
            text=text,
            reason=reason or text,
            delay=throttle.delay_for(self.network) if throttle is not None else 0.0,
            event="beep.sasl-failure",
        )
        return BEEPError(code, text)

    def _busy(self, turns: _Turns) -> BEEPError:
        self.state = _State.ENDED
        turns.refused += 1
        if turns.refused == 1:
            log.warn(
                "SASL {mechanism} refused from {peer}: another exchange of the session is at "
                "work (450); further ones until it is done are not logged",
                mechanism=self.mechanism.name,
                peer=self.host,
                code=450,
                event="beep.sasl-busy",
            )
        return BEEPError(450, "another authentication exchange of this session is at work")

    def _throttled(self, refusal: Throttled) -> BEEPError:
        self.state = _State.ENDED
        if refusal.burst == 1:
            log.warn(
                "SASL {mechanism} refused from {peer}: too many attempts from {network} wait "
                "their turn (454); further ones until one has its turn are not logged",
                mechanism=self.mechanism.name,
                peer=self.host,
                network=self.network,
                code=454,
                event="beep.sasl-throttled",
            )
        # RFC 3080 §8: 454 temporary authentication failure.
        return BEEPError(454, "too many authentication attempts from this address; try later")


def _error_content(failure: TwistedFailure) -> bytes:
    failure.trap(BEEPError)
    error = failure.value
    return mgmt.encode_error(error.code, error.text)


class SASLProfile(Profile):
    """The listening side of one SASL mechanism's profile (RFC 3080 §4.1).

    ``portal`` decides who may log in (see :func:`imxp.beep.saslmech.make_portal`);
    ``scram_store`` gives SCRAM-SHA-256 its keys; ``throttle`` paces the attempts of one
    peer address by its failures (shared by all the profiles of a listener).

    Offered (in the greeting and at ``start``) until the session has an authenticated
    identity (§4); EXTERNAL only when the TLS client certificate names someone (§4.1.3);
    SCRAM-SHA-256 only with a key store. PLAIN is offered without TLS too, but its exchange
    is then refused with 538 (RFC 4616 §5), which tells the client what to do about it.
    """

    def __init__(
        self,
        name: str,
        portal: LoginPortal,
        *,
        scram_store: ISCRAMKeyStore | None = None,
        throttle: FailureThrottle | None = None,
        require_tls: bool = False,
    ) -> None:
        if name not in SERVER_MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {name!r}")
        self.name = name
        self.uri = profile_uri(name)
        self.portal = portal
        self.scram_store = scram_store
        self.throttle = throttle
        self.require_tls = require_tls

    def offered(self, session: Session) -> bool:
        if _authenticated(session):
            return False
        if self.require_tls and not session.tls_active:
            return False
        if self.name == "EXTERNAL":
            return _certificate_identity(session) is not None
        if self.name == SCRAM_SHA_256:
            return self.scram_store is not None
        return True

    def start(
        self, session: Session, channel: Channel, init: bytes | None
    ) -> defer.Deferred[bytes]:
        host = session.peer_host
        mechanism = server_mechanism(
            self.name,
            self.portal,
            tls_active=session.tls_active,
            external_identity=_certificate_identity(session),
            scram_store=self.scram_store,
            peer=host,
        )
        exchange = _ServerExchange(self, session, mechanism, host)
        channel.handler = exchange
        # §4.1.1: even when the exchange fails at once the channel is created, and the
        # error travels inside the reply.
        return exchange.respond(init).addErrback(_error_content)


def sasl_profiles(
    names: Iterable[str],
    portal: LoginPortal,
    *,
    scram_store: ISCRAMKeyStore | None = None,
    throttle: FailureThrottle | None = None,
    require_tls: bool = False,
) -> list[SASLProfile]:
    """One :class:`SASLProfile` per mechanism name, sharing portal, store and throttle.

    ``require_tls`` keeps every mechanism off the greeting until TLS is in
    place, as a relay wants: not even a username crosses in the clear.
    """
    return [
        SASLProfile(
            name,
            portal,
            scram_store=scram_store,
            throttle=throttle,
            require_tls=require_tls,
        )
        for name in names
    ]


# -- initiator side --------------------------------------------------------------------


def _server_reply(content: bytes | None) -> tuple[str, bytes]:
    """Status and data of the server's blob; its ``<error>`` raised as BEEPError."""
    if content is None:
        # A server that piggybacks nothing waits for our first blob: as an empty challenge.
        return _CONTINUE, b""
    element = _parse_xml(content)
    if element.tag == "error":
        parsed = mgmt.parse_error(content)
        if parsed is None:
            raise BEEPError(501, "poorly formed error element from the server")
        raise BEEPError(parsed.code, parsed.text)
    return _blob(element)


def _quietly(d: defer.Deferred[object]) -> None:
    # The exchange's result no longer depends on these; a session that went away is fine.
    d.addErrback(lambda f: f.trap(BEEPError, SessionClosed))


async def _exchange(channel: Channel, mechanism: ClientMechanism) -> None:
    content = channel.start_reply
    while True:
        status, data = _server_reply(content)
        if status == _COMPLETE:
            try:
                mechanism.verify_final(data)
            except SASLClientError:
                # The server claims success but did not prove itself (SCRAM's signature):
                # it now treats the session as ours, and we cannot trust what it says.
                channel.session.disconnect()
                raise
            return
        if status == _ABORT:
            raise BEEPError(501, "the server sent status='abort', which only clients send")
        try:
            response = mechanism.step(data)
        except SASLClientError:
            _quietly(channel.send(Message(_encode_blob(None, _ABORT), mgmt.BEEP_XML)))
            raise
        reply = await channel.send(Message(_encode_blob(response), mgmt.BEEP_XML))
        if reply.content_type != mgmt.BEEP_XML:
            raise BEEPError(500, f"reply to a blob is not {mgmt.BEEP_XML}")
        content = reply.body


async def authenticate(
    session: Session, mechanism: ClientMechanism, *, identity: str | None = None
) -> str:
    """Authenticate to the listener with ``mechanism`` (RFC 3080 §4.1, initiator side).

    Starts the mechanism's channel with the initial response piggybacked (§4.1.1),
    answers each ``continue`` blob with a MSG blob, and checks the server's success.
    Afterwards the channel is closed without waiting for the peer's ``ok``.

    ``identity`` is who we are authenticating as, if the caller knows it (EXTERNAL derives
    it from our certificate, ANONYMOUS has none); on success it is recorded as the
    session's ``authenticated_identity``, the mechanism as ``authenticated_mechanism``,
    and returned (an empty string when unknown).

    Raises :class:`BEEPError` when the listener refuses (the channel's start, or an
    ``<error>`` in a reply: 535 authentication failure, 538 TLS needed, ...), and
    :class:`~imxp.beep.saslmech.SASLClientError` when the server misbehaves; after a
    success the server could not prove (a bad SCRAM signature) the session is disconnected.
    """
    initial = mechanism.initial()
    content = None if initial is None else _encode_blob(initial)
    channel = await session.start_channel(
        [mgmt.ProfileElement(profile_uri(mechanism.name), content)]
    )
    try:
        await _exchange(channel, mechanism)
    finally:
        _quietly(channel.close())
    session.authenticated_mechanism = mechanism.name
    if identity is not None:
        session.authenticated_identity = identity
    return identity or ""
