"""Relays and endpoint applications on loopback, for integration tests.

A :class:`Mesh` runs several relays in this process, each with its own
certificate from the test CA and its own user store, listening on loopback
ports; routes come from a real DNS server (tests/dnsserver.py) or from static
routes. An :class:`App` is an endpoint application: TLS, SASL SCRAM-SHA-256,
attach, then data both ways, as RFC 3340's endpoint-relay mode describes.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.interfaces import IListeningPort
from twisted.protocols import portforward

from imxp.apex import options as apex_options
from imxp.apex import wire
from imxp.apex.service import RelayService, build_relay
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import ScramSHA256Client
from imxp.beep.session import (
    Channel,
    ChannelHandler,
    Request,
    Role,
    Session,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import start_tls
from imxp.beep.tlsctx import client_options
from imxp.beep.users import UserStore
from imxp.certs import Issued, issue_server

PASSWORD = "correct horse battery staple"
#: Where a relay listens unless told otherwise: a free loopback port chosen by the system.
LOOPBACK = "tcp:0:interface=127.0.0.1"
_trans_ids = itertools.count(1000)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now, for relays whose static routes
    must name each other's ports before any of them listens (a route cycle: A -> B -> A),
    or that restart on the port they had.

    They are taken below the system's ephemeral range: an outgoing connection (of this
    process or any other) never gets one as its local port, so a relay that stops and
    starts again finds its port still free, and a peer reconnecting meanwhile cannot
    connect to itself through it (TCP simultaneous open). Another listener could still
    take one first, which on a test machine is unlikely enough.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    rng = random.Random()
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            port = rng.randrange(10000, max(ephemeral, 10000 + 10 * count))
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


@dataclass
class RelayHandle:
    domain: str
    service: RelayService
    users: UserStore
    identity: Issued
    #: How many of ``service.ports`` are edge listeners (they come before the mesh ones).
    edge_listeners: int = 1

    def port(self, kind: str) -> int:
        """The port of the (first) ``edge`` or ``mesh`` listener."""
        index = 0 if kind == "edge" else self.edge_listeners
        return self.service.ports[index].getHost().port


async def start_relay(
    domain: str,
    ca: Issued,
    tmp: Path,
    *,
    identity: Issued | None = None,
    users: tuple[str, ...] = (),
    edge_listen: Sequence[str] = (LOOPBACK,),
    mesh_listen: Sequence[str] = (LOOPBACK,),
    **settings: Any,
) -> RelayHandle:
    """A relay for ``domain``, by default on loopback ports chosen by the system.

    ``edge_listen``/``mesh_listen`` name the listeners as endpoint strings, e.g.
    ``tcp:PORT:interface=127.0.0.1`` to start a relay again on the port of one that stopped.
    """
    store = UserStore(tmp / f"{domain}.users", iterations=4096)
    for name in users:
        store.add(name, PASSWORD)
    identity = identity or issue_server(ca, [domain])
    settings.setdefault("session_config", SessionConfig(window=65536, idle_timeout=None))
    service = build_relay(
        domain=domain,
        identity=identity,
        trust=[ca.certificate],
        users=store,
        edge_listen=list(edge_listen),
        mesh_listen=list(mesh_listen),
        reactor=reactor,
        **settings,
    )
    await service.startService()
    return RelayHandle(domain, service, store, identity, len(edge_listen))


class _AppChannel(ChannelHandler):
    """What the relay sends an application: data (answered ok) and terminate.

    The channel exists before the :class:`App` does, so it finds it in ``holder``.
    """

    def __init__(self, holder: dict[str, App]) -> None:
        self.holder = holder

    @property
    def app(self) -> App:
        return self.holder["app"]

    def message_received(self, request: Request) -> Message:
        element = wire.decode(request.message)
        if isinstance(element, wire.Data):
            self.app._received(element)
        elif isinstance(element, wire.Terminate):
            self.app.terminated.append(element)
        return wire.encode(wire.OK())


@dataclass
class App:
    """An endpoint application attached to its relay."""

    endpoint: str
    session: Session
    channel: Channel
    data: list[wire.Data] = field(default_factory=list)
    reports: list[wire.StatusResponse] = field(default_factory=list)
    terminated: list[wire.Terminate] = field(default_factory=list)
    #: Who sent each of ``reports`` (``apex=report@DOMAIN``), index for index.
    report_senders: list[str] = field(default_factory=list)
    _waiters: list[tuple[int, str, defer.Deferred[None]]] = field(default_factory=list)

    def _received(self, data: wire.Data) -> None:
        if data.originator.identity.startswith("apex=report@") and data.content is not None:
            self.reports.append(wire.decode_status_response(data.content.body))
            self.report_senders.append(data.originator.identity)
        else:
            self.data.append(data)
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            count, what, d = waiter
            if len(getattr(self, what)) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    async def wait(self, what: str, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` items are in ``data`` or ``reports``."""
        if len(getattr(self, what)) >= count:
            return
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((count, what, d))
        timer = reactor.callLater(timeout, d.cancel)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    def outcomes(self) -> dict[tuple[int, str], list[tuple[int, str]]]:
        """(transID, recipient) -> every (code, text) reported for it."""
        seen: dict[tuple[int, str], list[tuple[int, str]]] = {}
        for report in self.reports:
            for identity, code, text in report.destinations:
                seen.setdefault((report.trans_id, identity), []).append((code, text))
        return seen

    async def send(
        self,
        recipients: list[str],
        body: bytes = b"hello",
        *,
        status: bool = True,
        trans_id: int | None = None,
        originator: str | None = None,
    ) -> int:
        """Send data; returns the statusRequest transID. A refusal raises BEEPError."""
        trans_id = trans_id if trans_id is not None else next(_trans_ids)
        options = [apex_options.make_status_request(trans_id)] if status else []
        data = wire.Data(
            wire.Originator(originator or self.endpoint, []),
            [wire.Recipient(r, []) for r in recipients],
            options,
            content=wire.Content.from_bytes(body, "text/plain"),
        )
        await self.channel.send(wire.encode(data))
        return trans_id


async def attach(
    relay: RelayHandle,
    ca: Issued,
    endpoint: str,
    *,
    username: str | None = None,
    password: str = PASSWORD,
    host: str = "127.0.0.1",
) -> App:
    """Connect to the relay's edge port at ``host``, TLS, SCRAM, and attach as ``endpoint``."""
    factory = SessionFactory(Role.INITIATOR, [], SessionConfig(window=65536, idle_timeout=None))
    client = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
    where = client(reactor, host, relay.port("edge"))
    session: Session = await where.connect(factory)
    await session.greeted()
    await start_tls(session, client_options(relay.domain, [ca.certificate]))
    name = username or endpoint.split("@", 1)[0].split("/", 1)[0]
    await authenticate(session, ScramSHA256Client(name, password), identity=name)
    attach_xml = wire.encode(wire.Attach(endpoint, 1, [])).body
    holder: dict[str, App] = {}
    handler = _AppChannel(holder)
    channel = await session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, attach_xml)], handler=handler
    )
    answer = wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
    if isinstance(answer, wire.Error):
        session.disconnect()
        raise AttachRefused(answer.code, answer.text)
    app = App(endpoint, session, channel)
    holder["app"] = app
    return app


class AttachRefused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code


async def forwarder_to(port: int) -> tuple[IListeningPort, list[portforward.Proxy]]:
    """A TCP forwarder on loopback to ``port``, and the connections it makes: a test turns
    it into a black hole (each connection's ``dataReceived`` dropping what comes), as a
    peer frozen or a network that loses everything while the TCP connection stays open."""
    forwarders: list[portforward.Proxy] = []

    class Forwarders(portforward.ProxyFactory):
        def buildProtocol(self, addr: object) -> portforward.Proxy:
            forwarder = super().buildProtocol(addr)
            forwarders.append(forwarder)
            return forwarder

    listening = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Forwarders("127.0.0.1", port)
    )
    return listening, forwarders
