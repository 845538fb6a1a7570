"""The TLS transport security profile, ``http://iana.org/beep/TLS`` (RFC 3080 §3.1).

A peer sends ``<ready />`` (piggybacked on ``start``, or as a MSG on the
channel); the other answers ``<proceed />``, both close every channel, the
transport switches to TLS (``transport.startTLS``, as STARTTLS does in
Twisted's SMTP) and each side greets afresh (§3). Modernised as DESIGN.md
says: TLS 1.2 or newer with AEAD ciphers (see :mod:`imxp.beep.tlsctx`), and
the initiator checks the listener's certificate against the name it meant to
reach (RFC 6125) through service_identity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.python.failure import Failure

from imxp.beep import mgmt, xmlsafe
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    Profile,
    Request,
    Session,
    SessionClosed,
    StartReply,
    all_of,
)

__all__ = ["TLS_URI", "TLSProfile", "start_tls"]

TLS_URI = "http://iana.org/beep/TLS"
_PROCEED = b"<proceed />"


def _parse_ready(content: bytes) -> None:
    """Accept a ``ready`` element (§3.1.3.1, DTD §7.2) or raise BEEPError 500/501."""
    try:
        element = xmlsafe.parse(content, max_size=mgmt.MAX_INIT)
    except xmlsafe.XMLError as e:
        raise BEEPError(500, str(e)) from None
    if element.tag != "ready" or len(element) or (element.text or "").strip():
        raise BEEPError(501, "expected an empty ready element")
    if element.get("version", "1") != "1":
        raise BEEPError(501, "version attribute poorly formed in <ready> element")


class _TLSChannel(ChannelHandler):
    """The channel when ``ready`` was not piggybacked: it arrives as a MSG (§3.1.1)."""

    def __init__(self, profile: TLSProfile, session: Session) -> None:
        self.profile = profile
        self.session = session

    def message_received(self, request: Request) -> defer.Deferred[Message]:
        _parse_ready(request.message.body)
        d = self.profile._proceed(self.session)

        def reply(after: Callable[[], None]) -> Message:
            request.on_sent = after
            return Message(_PROCEED, mgmt.BEEP_XML)

        return d.addCallback(reply)


class TLSProfile(Profile):
    """The listening side of TLS tuning.

    ``options`` is the server TLS configuration; ``by_server_name`` picks
    another one for the ``serverName`` of the session's first start (§2.3.1.2:
    "the desired server-side certificate when starting the TLS profile").
    """

    uri = TLS_URI

    def __init__(
        self,
        options: IOpenSSLServerConnectionCreator,
        by_server_name: Mapping[str, IOpenSSLServerConnectionCreator] | None = None,
    ) -> None:
        self.options = options
        self.by_server_name = dict(by_server_name or {})

    def offered(self, session: Session) -> bool:
        # §4.1: once SASL has succeeded, transport security may no longer begin.
        return not session.tls_active and session.authenticated_identity is None

    def start(
        self, session: Session, channel: Channel, init: bytes | None
    ) -> defer.Deferred[StartReply] | None:
        channel.handler = _TLSChannel(self, session)
        if init is None:
            return None
        try:
            _parse_ready(init)
        except BEEPError as e:
            # §3.1.1: the channel is created; the error travels inside the reply.
            return defer.succeed(StartReply(mgmt.encode_error(e.code, e.text)))
        return self._proceed(session).addCallback(lambda after: StartReply(_PROCEED, after))

    def _proceed(self, session: Session) -> defer.Deferred[Callable[[], None]]:
        # §3.1.3.1: replies already owed on other channels go out before we switch,
        # and the peer sends nothing more from its ready on: what it left unfinished,
        # or has not answered, it never will, and the switch ends.
        session.expect_silence(seq_allowed=True)
        others = [c for number, c in session.channels.items() if number and c.profile != TLS_URI]
        waits = all_of([c._when_replied() for c in others])

        def ready(_: object) -> Callable[[], None]:
            session.expect_silence()

            def switch() -> None:
                options = self.by_server_name.get(session.server_name or "", self.options)
                session.tls_active = True
                session.transport.startTLS(options)  # type: ignore[union-attr]

            def tune() -> None:
                session.tuning_reset(switch, greet_after_handshake=True)
                session.greeted().addErrback(_tls_failed, session)

            return tune

        return waits.addCallback(ready)


def _tls_failed(failure: Failure, session: Session) -> None:
    """The session ended before the peer's greeting over TLS. The peer knows why; this
    side's operator learns it only from this line: OpenSSL's reason when the handshake
    failed (a certificate one side would not accept, no common version or cipher), else
    that the peer went away, as a client does whose check of our name (RFC 6125) failed."""
    failure.trap(SessionClosed)
    text = str(failure.value)
    said = re.findall(r"'([^']+)'\)", text)  # [('SSL routines', '', 'tlsv1 alert unknown ca')]
    if said:
        message, reason = "TLS with {peer} failed: {reason}", "; ".join(said)
    else:
        message = (
            "TLS with {peer} ended before its greeting: {reason} (a peer hangs up so when "
            "this relay's certificate does not name what it wanted)"
        )
        reason = text
    session.log.warn(message, peer=session.peer, reason=reason, event="beep.tls-failed")


async def start_tls(
    session: Session,
    options: IOpenSSLClientConnectionCreator,
    server_name: str | None = None,
) -> mgmt.Greeting:
    """Negotiate TLS as the initiator; returns the listener's new greeting.

    Fails with :class:`BEEPError` when the peer declines, or with
    :class:`~imxp.beep.session.SessionClosed` when the handshake fails (a
    certificate that does not verify, or names another host, ends the
    connection: RFC 3080 §3 lets either peer terminate).
    """
    greeting = await session.greeted()
    if TLS_URI not in greeting.profiles:
        raise BEEPError(550, "peer does not offer TLS")
    # §3.1.3.1: after sending ready, nothing else until the reply.
    session.begin_tuning()
    try:
        channel = await session.start_channel(
            [mgmt.ProfileElement(TLS_URI, b"<ready />")], server_name=server_name
        )
        reply = channel.start_reply or b""
        try:
            element = xmlsafe.parse(reply, max_size=mgmt.MAX_INIT)
        except xmlsafe.XMLError as e:
            raise BEEPError(500, f"reply to ready is not XML: {e}") from None
        if element.tag == "error":
            parsed = mgmt.parse_error(reply)
            raise BEEPError(parsed.code if parsed else 500, parsed.text if parsed else "")
        if element.tag != "proceed":
            raise BEEPError(501, f"expected proceed, got {element.tag[:32]}")
    except BaseException:
        session.end_tuning()
        raise

    def switch() -> None:
        session.tls_active = True
        session.transport.startTLS(options)  # type: ignore[union-attr]

    session.tuning_reset(switch)
    return await session.greeted()
