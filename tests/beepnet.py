"""Helpers for tests that run real BEEP sessions over loopback TCP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer, endpoints, reactor
from twisted.internet.interfaces import IListeningPort

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

ECHO_URI = "http://imxp.test/echo"


class Echo(ChannelHandler):
    """Replies with the body it received; ``fail`` gets an ERR 550."""

    def message_received(self, request: Request) -> Message:
        if request.message.body == b"fail":
            raise BEEPError(550, "asked to fail")
        return Message(request.message.body, request.message.content_type)


class EchoProfile(Profile):
    uri = ECHO_URI

    def start(self, session: Session, channel: Channel, init: bytes | None) -> bytes | None:
        channel.handler = Echo()
        return init


@dataclass
class Listener:
    port: IListeningPort
    factory: SessionFactory
    sessions: list[Session]

    @property
    def address(self) -> tuple[str, int]:
        addr = self.port.getHost()
        return addr.host, addr.port


async def listen(profiles: Sequence[Profile], config: SessionConfig | None = None) -> Listener:
    sessions: list[Session] = []
    factory = SessionFactory(Role.LISTENER, profiles, config, on_session=sessions.append)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    return Listener(port, factory, sessions)


async def connect(
    listener: Listener, profiles: Sequence[Profile] = (), config: SessionConfig | None = None
) -> Session:
    host, port = listener.address
    factory = SessionFactory(Role.INITIATOR, profiles, config)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port)
    session = await endpoint.connect(factory)
    await session.greeted()
    return session


async def shutdown(listener: Listener, *sessions: Session) -> None:
    for session in [*sessions, *listener.sessions]:
        if session.transport is not None:
            session.disconnect()
            await session.when_closed()
    await defer.maybeDeferred(listener.port.stopListening)
