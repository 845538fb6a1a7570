"""Three relays on loopback, found through DNS SRV, TLS everywhere, endpoints with SASL.

The promise under test (DESIGN.md, "Principles"; RFC 3340 §5.1, §6.2): a relay answers
``ok`` only for data it takes responsibility for, and whenever the originator asked
(statusRequest), every recipient ends in exactly one final statusResponse - delivered
(250) or a reason, with the §10 code for it. Alongside it, the access rules of §4.5: an
application originates only as what it attached as (§4.5.1), a peer binds only for a
domain its certificate proves and relays only for that domain's originators (§4.5.2), a
next hop must prove the domain it is reached for (RFC 6125), and the hop limit of
RFC 3342 §4 turns a routing loop into one error report.

The mesh: relays for a.test (fred, wilma), b.test (barney, bambam) and c.test (betty),
each with a certificate from the test CA naming its domain; a real twisted.names server
serves ``_apex-mesh._tcp.X.test SRV 0 0 <mesh port> X.test.`` and ``X.test A 127.0.0.1``,
which every relay's router asks. The name checked in the next hop's certificate is the
domain, never the SRV target (RFC 6125 §6.2.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_twisted
from apexnet import App, RelayHandle, attach, forwarder_to, start_relay
from dnsserver import DNSServer, a, aaaa, srv, start_dns_server
from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from zope.interface import provider

from imxp.apex import options as apex_options
from imxp.apex import wire
from imxp.apex.address import Endpoint
from imxp.apex.service import LAST_ANSWERS
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    Role,
    Session,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import start_tls
from imxp.beep.tlsctx import client_options
from imxp.certs import Issued, issue_client, issue_server

USERS = {
    "a.test": ("fred", "wilma"),
    # bambam exists but never attaches: "not attached" (450).
    "b.test": ("barney", "bambam"),
    "c.test": ("betty",),
}
FRED = "fred@a.test"
WILMA = "wilma@a.test"
BARNEY = "barney@b.test"
BETTY = "betty@c.test"
#: Long enough that no verdict comes from a deadline on a slow host that steals the CPU
#: for seconds; tests of what a deadline does set SHORT_DEADLINE where they need it.
DELIVERY_TIMEOUT = 10.0
#: The deadline of tests that wait for one (a next hop's retries, one that never greets, an
#: endpoint that stops reading): still longer than a slow host's usual stall.
SHORT_DEADLINE = 3.0
#: Upper bound on waiting for the mesh to finish carrying what it accepted.
SETTLE = 30.0
#: Content that a re-serialising relay would be likely to spoil: every octet value, CRLFs,
#: something like a MIME boundary, non-ASCII text.
BODY = bytes(range(256)) + b"\r\n--boundary\r\n\r\n" + "grüße, ☃".encode()

Settings = dict[str, Any]


# -- the mesh ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One data an application sent with a statusRequest and the relay accepted."""

    app: App
    trans_id: int
    recipients: list[str]


@dataclass
class Mesh:
    dns: DNSServer
    ca: Issued
    relays: dict[str, RelayHandle] = field(default_factory=dict)
    apps: list[App] = field(default_factory=list)
    peers: list[Session] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def relay(self, domain: str) -> RelayHandle:
        return self.relays[domain]

    def publish(self, domain: str, port: int) -> None:
        """SRV for the domain's mesh service pointing at ``port`` on host ``domain``, and
        the host's address: RFC 3340 §3.1 through RFC 2782."""
        self.dns.set(f"_apex-mesh._tcp.{domain}", srv(0, 0, port, f"{domain}."))
        self.dns.set(domain, a("127.0.0.1"))

    async def attach(
        self, endpoint: str, *, tls_name: str | None = None, host: str = "127.0.0.1"
    ) -> App:
        """An application attached at its domain's relay (TLS, SCRAM-SHA-256, attach),
        connecting to ``host``.

        ``tls_name`` is the name the relay's certificate is checked for, when the test
        gave the relay a certificate for another name than its domain.
        """
        domain = endpoint.rsplit("@", 1)[1]
        handle = self.relays[domain]
        if tls_name is not None:
            # attach() checks the relay's certificate for ``relay.domain``.
            handle = dataclasses.replace(handle, domain=tls_name)
        app = await attach(handle, self.ca, endpoint, host=host)
        self.apps.append(app)
        return app

    async def send(self, app: App, recipients: list[str], body: bytes = BODY, **kw: Any) -> int:
        """``app.send`` with a statusRequest, remembered for the exactly-once check."""
        trans_id = await app.send(recipients, body, **kw)
        self.sent.append(Sent(app, trans_id, list(recipients)))
        return trans_id

    async def settle(self) -> None:
        """Until no relay carries any data any more.

        Every relay counts a data as in flight from before its ``ok`` until each recipient
        has a verdict there, and a report it sends counts before the data it reports on
        stops counting; an application's delivery ends when it has answered. So once all
        relays are idle at one moment, every report and data has reached its application.
        """
        deadline = reactor.seconds() + SETTLE
        while True:
            busy = [h.service.relay for h in self.relays.values() if h.service.relay.in_flight]
            if not busy:
                return
            left = deadline - reactor.seconds()
            assert left > 0, f"relays still busy: {[r.domain for r in busy]}"
            idle = defer.gatherResults([r.when_idle() for r in busy])
            timer = reactor.callLater(left, idle.cancel)
            try:
                await idle
            finally:
                if timer.active():
                    timer.cancel()

    async def close(self) -> None:
        """Applications and the test's fake relays go first, then each relay stops
        gracefully (RelayService.stopService)."""
        for app in self.apps:
            app.session.disconnect()
        for session in self.peers:
            session.disconnect()
        for handle in self.relays.values():
            await handle.service.stopService()

    def assert_exactly_once(self) -> None:
        """For every (transID, recipient) sent with a statusRequest, exactly one final
        statusResponse reached the originator; and nothing was reported that was not sent."""
        expected = {(s.app.endpoint, s.trans_id, r) for s in self.sent for r in s.recipients}
        for app in self.apps:
            for (trans_id, identity), entries in app.outcomes().items():
                assert (app.endpoint, trans_id, identity) in expected, (trans_id, identity)
                assert len(entries) == 1, f"{identity} reported {len(entries)} times: {entries}"
        for s in self.sent:
            for r in s.recipients:
                assert (s.trans_id, r) in s.app.outcomes(), f"no report for {r} ({s.trans_id})"


def outcome(app: App, trans_id: int) -> dict[str, tuple[int, str]]:
    """recipient -> its one (code, text) for ``trans_id``; fails on any duplicate."""
    found: dict[str, tuple[int, str]] = {}
    for (tid, identity), entries in app.outcomes().items():
        if tid == trans_id:
            assert len(entries) == 1, f"{identity} reported {len(entries)} times: {entries}"
            found[identity] = entries[0]
    return found


def codes(app: App, trans_id: int) -> dict[str, int]:
    return {identity: code for identity, (code, _text) in outcome(app, trans_id).items()}


def reporters(app: App, trans_id: int) -> set[str]:
    """Which report services answered for ``trans_id``."""
    return {
        sender
        for sender, report in zip(app.report_senders, app.reports, strict=True)
        if report.trans_id == trans_id
    }


def received(app: App) -> list[tuple[str, bytes]]:
    """(originator, content octets) of every data the application received."""
    out = []
    for data in app.data:
        assert data.content is not None
        out.append((data.originator.identity, data.content.body))
    return out


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MeshBuilder(Protocol):
    def __call__(self, **overrides: Settings | Callable[[Mesh], Settings]) -> Awaitable[Mesh]: ...


@contextlib.asynccontextmanager
async def meshes(
    test_ca: Issued,
    server_cert: Callable[..., Issued],
    tmp_path: Path,
    *,
    delivery_timeout: float = DELIVERY_TIMEOUT,
    shutdown_grace: float = 1.0,
    check_at_end: bool = True,
) -> AsyncIterator[MeshBuilder]:
    """``await build(**{"c.test": {...}})``: the three relays, each with the settings
    given for its domain on top of the defaults; a settings value may be a callable taking
    the Mesh (the relays started before, a.test first), for routes to their ports. With
    ``check_at_end`` every mesh is settled and its bookkeeping checked when done."""
    dns = start_dns_server()
    built: list[Mesh] = []

    async def build(**overrides: Settings | Callable[[Mesh], Settings]) -> Mesh:
        mesh = Mesh(dns, test_ca)
        built.append(mesh)
        for domain, users in USERS.items():
            extra = overrides.get(domain, {})
            settings: Settings = {
                "identity": server_cert(domain),
                "users": users,
                "resolver": dns.resolver(),
                "delivery_timeout": delivery_timeout,
                "shutdown_grace": shutdown_grace,
                **(extra(mesh) if callable(extra) else extra),
            }
            handle = await start_relay(domain, test_ca, tmp_path, **settings)
            mesh.relays[domain] = handle
            mesh.publish(domain, handle.port("mesh"))
        return mesh

    try:
        yield build
        if check_at_end:
            for mesh in built:
                await mesh.settle()
                # The bookkeeping promise holds for every test, whatever it checked itself.
                mesh.assert_exactly_once()
    finally:
        for mesh in built:
            await mesh.close()
        await dns.stop()


@pytest_twisted.async_yield_fixture
async def build_mesh(
    test_ca: Issued, server_cert: Callable[..., Issued], tmp_path: Path
) -> AsyncIterator[MeshBuilder]:
    async with meshes(test_ca, server_cert, tmp_path) as build:
        yield build


def named(events: list[LogEvent], name: str) -> list[LogEvent]:
    return [e for e in events if e["event"] == name]


# -- a relay played by the test ---------------------------------------------------------


@dataclass
class FakeRelay:
    """A BEEP session to a relay's mesh port, TLS with a certificate of the test's choice,
    and an APEX channel whose start carried a bind (RFC 3340 §4.2, §4.4.2)."""

    session: Session
    channel: Channel
    answer: wire.OK | wire.Error
    """The reply to the bind, piggybacked on the reply to the start."""

    async def send(
        self,
        originator: str,
        recipients: list[str],
        body: bytes = BODY,
        options: list[wire.Option] | None = None,
    ) -> None:
        """Data as a relay forwards it (no statusRequest); a refusal raises BEEPError."""
        data = wire.Data(
            wire.Originator(originator),
            [wire.Recipient(r) for r in recipients],
            # What a relay forwards carries the hop count of RFC 3342 §4.
            apex_options.with_data_hopping([], 8, 1) if options is None else options,
            content=wire.Content.from_bytes(body, "text/plain"),
        )
        await self.channel.send(wire.encode(data))


async def fake_relay(mesh: Mesh, at: str, certificate: Issued, bind_as: str) -> FakeRelay:
    """Connect to ``at``'s mesh port presenting ``certificate`` and bind as ``bind_as``,
    as imxp.apex.service._connect does."""
    handle = mesh.relays[at]
    factory = SessionFactory(Role.INITIATOR, [], SessionConfig(window=65536, idle_timeout=None))
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", handle.port("mesh"))
    session: Session = await where.connect(factory)
    mesh.peers.append(session)
    await session.greeted()
    await start_tls(session, client_options(at, [mesh.ca.certificate], certificate))
    bind = wire.encode(wire.Bind(bind_as, 1, [])).body
    channel = await session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, bind)], handler=ChannelHandler()
    )
    answer = wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
    assert isinstance(answer, wire.OK | wire.Error), answer
    return FakeRelay(session, channel, answer)


# -- delivery ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_to_b_delivered(build_mesh: MeshBuilder) -> None:
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)

    trans_id = await mesh.send(fred, [BARNEY])
    await mesh.settle()

    assert received(barney) == [(FRED, BODY)]
    assert codes(fred, trans_id) == {BARNEY: 250}
    # The final relay reports delivery; a's hand-over to b is no final verdict.
    assert reporters(fred, trans_id) == {"apex=report@b.test"}
    mesh.assert_exactly_once()


@pytest_twisted.ensureDeferred
async def test_a_status_request_for_every_hop_names_the_relay_that_took_the_data(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """targetHop "all" (RFC 3340 §5): a.test reports its hand-over too, naming the next hop
    that took the data, which is how an originator or operator follows a route; each
    relay's log says the same."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient(BARNEY)],
        [apex_options.make_status_request(41, target_hop="all")],
        content=wire.Content.from_bytes(BODY, "text/plain"),
    )
    await fred.channel.send(wire.encode(data))
    mesh.sent.append(Sent(fred, 41, [BARNEY]))
    await mesh.settle()

    assert received(barney) == [(FRED, BODY)]
    by_reporter = {
        sender: report.destinations
        for sender, report in zip(fred.report_senders, fred.reports, strict=True)
        if report.trans_id == 41
    }
    b_mesh = mesh.relay("b.test").port("mesh")
    assert by_reporter["apex=report@a.test"] == [
        (BARNEY, 250, f"relayed to b.test via b.test:{b_mesh}")
    ]
    assert by_reporter["apex=report@b.test"] == [(BARNEY, 250, "")]
    verdicts = [e for e in named(events, "apex.verdict") if e["identity"] == BARNEY]
    assert [formatEvent(e) for e in verdicts] == [
        f"{BARNEY} from {FRED}: 250 relayed to b.test via b.test:{b_mesh}",
        f"{BARNEY} from {FRED}: 250",
    ]
    # What is left for the fixture's exactly-once check: the final reports.
    finals = [
        (sender, report)
        for sender, report in zip(fred.report_senders, fred.reports, strict=True)
        if sender != "apex=report@a.test"
    ]
    fred.report_senders[:] = [sender for sender, _ in finals]
    fred.reports[:] = [report for _, report in finals]


@pytest_twisted.ensureDeferred
async def test_a_relay_stops_though_its_next_hop_stopped_answering(build_mesh: MeshBuilder) -> None:
    """The next hop is frozen (SIGSTOP), or a network black hole lies between: the TCP
    connection stays open and nothing comes back, so the release of our link is never
    answered. The stop must not wait for it, or systemd kills the relay at TimeoutStopSec.
    b.test is reached through a TCP forwarder that the test then turns into a black hole."""
    mesh = await build_mesh()
    listening, forwarders = await forwarder_to(mesh.relays["b.test"].port("mesh"))
    mesh.publish("b.test", listening.getHost().port)
    fred = await mesh.attach(FRED)
    await mesh.attach(BARNEY)
    await mesh.send(fred, [BARNEY])
    await mesh.settle()
    assert forwarders, "a.test did not reach b.test through the forwarder"
    for forwarder in forwarders:
        forwarder.dataReceived = lambda data: None  # type: ignore[method-assign]
    a = mesh.relays["a.test"].service

    stopping = defer.ensureDeferred(a.stopService())
    try:
        # The grace, then at most LAST_ANSWERS for each last step but the reports (nothing
        # is in flight): terminates, the release of links, that of sessions.
        # Polled, not addTimeout: cancelling the stop would end the very wait under test.
        deadline = reactor.seconds() + a.shutdown_grace + 3 * LAST_ANSWERS + 1
        while not stopping.called and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        assert stopping.called, "the stop waits for the frozen next hop"
    finally:
        await listening.stopListening()
        for forwarder in forwarders:
            forwarder.transport.loseConnection()
        await stopping


@pytest_twisted.ensureDeferred
async def test_over_ipv6_and_ipv4_on_one_dual_stack_listener(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """b.test listens on "::" as the production example does, and its host has only an
    AAAA record: a.test reaches it over IPv6, an endpoint attaches over IPv6 and another
    over IPv4, and logs show each peer's address as it is written."""
    dual_stack = ("tcp6:0:interface=\\:\\:",)
    mesh = await build_mesh(**{"b.test": {"edge_listen": dual_stack, "mesh_listen": dual_stack}})
    mesh.dns.set("b.test", aaaa("::1"))
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY, host="::1")
    bambam = await mesh.attach("bambam@b.test", host="127.0.0.1")

    trans_id = await mesh.send(fred, [BARNEY, "bambam@b.test"])
    await mesh.settle()

    assert received(barney) == received(bambam) == [(FRED, BODY)]
    assert codes(fred, trans_id) == {BARNEY: 250, "bambam@b.test": 250}
    peers = {e["endpoint"]: e["peer"] for e in named(events, "apex.attached")}
    assert peers[BARNEY].startswith("[::1]:")
    assert peers["bambam@b.test"].startswith("127.0.0.1:")
    (bound,) = [e for e in named(events, "apex.bound") if e["domain"] == "a.test"]
    assert bound["peer"].startswith("[::1]:")
    listening = [e["address"] for e in named(events, "imxp.listening")]
    assert f"[::]:{mesh.relay('b.test').port('mesh')}" in listening


@pytest_twisted.ensureDeferred
async def test_several_recipients_local_and_remote(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """One data for b, c, a local endpoint and the sender's own subaddress (§2.2): each
    gets it once, with the content intact, and each ends in one 250."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    # The same SASL user attached again, as a subaddress of itself (§4.5.1).
    fred_x = await mesh.attach("fred/appl=x@a.test")
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)
    betty = await mesh.attach(BETTY)
    recipients = [BARNEY, BETTY, WILMA, "fred/appl=x@a.test"]

    trans_id = await mesh.send(fred, recipients)
    await mesh.settle()

    for app in (fred_x, wilma, barney, betty):
        assert received(app) == [(FRED, BODY)], app.endpoint
    assert fred.data == []  # fred@a.test itself was no recipient
    assert codes(fred, trans_id) == dict.fromkeys(recipients, 250)
    assert reporters(fred, trans_id) == {
        "apex=report@a.test",  # wilma and fred/appl=x
        "apex=report@b.test",
        "apex=report@c.test",
    }
    assert named(events, "apex.refused") == []
    mesh.assert_exactly_once()


@pytest_twisted.ensureDeferred
async def test_inline_content_keeps_the_namespaces_declared_on_its_data(
    build_mesh: MeshBuilder,
) -> None:
    """Inline XML content may use a prefix that only ``data`` declares: each relay that
    writes the data anew for its share of the recipients writes the declaration too, so
    that every recipient reads the content as it was sent (§4.4.4.1)."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    apps = [await mesh.attach(who) for who in (WILMA, BARNEY, BETTY)]
    control = (
        f"<data content='#C' xmlns:x='urn:example:x'><originator identity='{FRED}'/>"
        + "".join(f"<recipient identity='{app.endpoint}'/>" for app in apps)
        + "<data-content Name='C'><x:note>hi</x:note></data-content></data>"
    )
    await fred.channel.send(Message(control.encode(), wire.BEEP_XML))
    await mesh.settle()

    for app in apps:
        [data] = app.data
        assert data.in_scope == (("xmlns:x", "urn:example:x"),), app.endpoint
        assert data.content is not None
        assert data.content.body == b"<x:note>hi</x:note>"


@pytest_twisted.ensureDeferred
async def test_a_hop_limit_is_written_only_into_data_handed_on(build_mesh: MeshBuilder) -> None:
    """RFC 3342 §4: data from an endpoint gets a.test's hop limit (``max_hops``, 16) as
    a.test hands it on, counted down for that hop; an application at a.test gets it with
    the options its originator wrote, as a final relay hands data over (§5)."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)

    trans_id = await mesh.send(fred, [WILMA, BARNEY])
    await mesh.settle()

    status = apex_options.make_status_request(trans_id)
    [local] = wilma.data
    assert local.options == [status]
    [remote] = barney.data
    assert remote.options == apex_options.with_data_hopping([status], 15, 1)
    assert codes(fred, trans_id) == {WILMA: 250, BARNEY: 250}


@pytest_twisted.ensureDeferred
async def test_burst_each_recipient_reported_once(build_mesh: MeshBuilder) -> None:
    """Many data at once over the same links, delivered or not: still one final report
    per (transID, recipient) and one copy per delivery."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)
    betty = await mesh.attach(BETTY)
    recipients = [BARNEY, BETTY, WILMA, "bambam@b.test", "nobody@c.test"]
    count = 25

    sends = [
        defer.ensureDeferred(mesh.send(fred, recipients, b"burst %d" % n)) for n in range(count)
    ]
    trans_ids = await defer.gatherResults(sends)
    await mesh.settle()

    for app in (wilma, barney, betty):
        assert sorted(body for _, body in received(app)) == sorted(
            b"burst %d" % n for n in range(count)
        )
    for trans_id in trans_ids:
        assert codes(fred, trans_id) == {
            BARNEY: 250,
            BETTY: 250,
            WILMA: 250,
            "bambam@b.test": 450,
            "nobody@c.test": 550,
        }
    mesh.assert_exactly_once()


# -- failures, each reported once --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_what_one_originator_sends_in_a_row_arrives_in_that_order(
    build_mesh: MeshBuilder,
) -> None:
    """A chat's messages, sent without waiting for each other's reports, the first ones
    while a.test has no link to b.test yet."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    wilma = await mesh.attach(WILMA)
    lines = [b"line %d" % n for n in range(100)]

    sends = [defer.ensureDeferred(mesh.send(fred, [BARNEY, WILMA], line)) for line in lines]
    await defer.gatherResults(sends)
    await mesh.settle()

    assert [body for _, body in received(barney)] == lines
    assert [body for _, body in received(wilma)] == lines


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_stops_reading_is_refused_data_beyond_max_queued(
    build_mesh: MeshBuilder,
) -> None:
    """wilma's application stops reading its connection. What the relay has already handed
    to her channel waits there, held back by her BEEP window; beyond ``max_queued`` octets
    her data is refused with 450 at once, instead of the relay holding all of it."""
    limit = 200_000
    mesh = await build_mesh(**{"a.test": {"max_queued": limit, "delivery_timeout": SHORT_DEADLINE}})
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    await mesh.attach(BARNEY)
    wilma.session.transport.pauseProducing()
    relay = mesh.relay("a.test").service.relay
    body = b"x" * 50_000

    trans_ids = [await mesh.send(fred, [WILMA], body) for _ in range(30)]
    queued = relay.attached[Endpoint.parse(WILMA)].channel.queued_bytes
    assert queued <= limit + len(body) + 1000
    await mesh.settle()

    verdicts = [outcome(fred, t)[WILMA] for t in trans_ids]
    refused = [v for v in verdicts if v[0] == 450]
    assert refused and all("endpoint is not reading" in text for _, text in refused)
    # What was queued before had no answer within the delivery timeout: outcome unknown.
    assert {code for code, _ in verdicts} == {450, 451}
    # Nobody else waits for her.
    other = await mesh.send(fred, [BARNEY], body)
    await mesh.settle()
    assert codes(fred, other) == {BARNEY: 250}

    # Her session was dropped at the deadline: reading again, she gets at most what
    # reached her connection before, never what still waited in the relay's queue.
    wilma.session.transport.resumeProducing()
    await wilma.session.when_closed()
    assert len(wilma.data) < len(verdicts) - len(refused)


@pytest_twisted.ensureDeferred
async def test_unknown_unattached_and_unreachable(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """§10 codes for each way a recipient fails, all in one data:

    * unknown endpoint at the final relay (550) and at our own (550);
    * known but not attached (450, temporary: it may attach later);
    * a domain DNS has never heard of (NXDOMAIN for SRV, A and AAAA): 550, no route;
    * a domain whose SRV points at a closed port: connection refused, retried until the
      delivery timeout, then a 4xx, since it may come back.
    """
    mesh = await build_mesh(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
    mesh.publish("dead.test", closed_port())
    fred = await mesh.attach(FRED)
    recipients = [
        "nobody@b.test",
        "bambam@b.test",
        "nobody@a.test",
        "someone@nowhere.test",
        "someone@dead.test",
    ]

    started = reactor.seconds()
    trans_id = await mesh.send(fred, recipients)
    await mesh.settle()

    found = outcome(fred, trans_id)
    assert {r: code for r, (code, _) in found.items()} == {
        "nobody@b.test": 550,
        "bambam@b.test": 450,
        "nobody@a.test": 550,
        "someone@nowhere.test": 550,
        # 421 "service not available": the next hop's, for now.
        "someone@dead.test": 421,
    }
    assert "cannot connect" in found["someone@dead.test"][1]
    # Retried (first after 0.2 s, then 0.4 s, ...) until the next retry would pass the
    # delivery timeout: not given up on at the first refusal. A lower bound only.
    assert reactor.seconds() - started >= 0.6
    assert found["someone@nowhere.test"][1] == "no route to nowhere.test: no such domain"
    assert found["bambam@b.test"][1] == "endpoint not attached"
    assert reporters(fred, trans_id) == {"apex=report@a.test", "apex=report@b.test"}
    mesh.assert_exactly_once()
    # While the data waited, the operator saw each attempt fail; the links that came up
    # are a.test's to b.test, and b.test's back for its reports.
    failed = named(events, "apex.link-failed")
    assert len(failed) >= 2
    assert {(e["peer"], e["code"]) for e in failed} == {("dead.test", 421)}
    assert all(e["log_level"] == LogLevel.warn and "cannot connect" in e["text"] for e in failed)
    assert sorted(e["peer"] for e in named(events, "apex.link-up")) == ["a.test", "b.test"]


@pytest_twisted.ensureDeferred
async def test_defect_data_queued_for_a_next_hop_that_is_down_do_not_storm_it(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """Every data ran its own connect-and-retry loop, so a next hop that was down got a
    connection attempt, and the operator an apex.link-failed warning, per data and retry:
    here some 35 for 30 data. As a mail queue does, the relay makes one attempt at a time
    for the next hop, with one backoff (0.2 s, then doubling) for all data waiting for it,
    and each data still ends in one report: 421, the next hop unreachable."""
    accepted: list[protocol.Protocol] = []

    class ClosesAtOnce(protocol.Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)
            self.transport.loseConnection()

    down = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(ClosesAtOnce)
    )
    try:
        mesh = await build_mesh(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
        mesh.publish("down.test", down.getHost().port)
        fred = await mesh.attach(FRED)
        trans_ids = [await mesh.send(fred, ["someone@down.test"]) for _ in range(30)]
        await mesh.settle()
    finally:
        await down.stopListening()

    for trans_id in trans_ids:
        code, text = outcome(fred, trans_id)["someone@down.test"]
        assert code == 421 and "cannot connect" in text, (code, text)
    mesh.assert_exactly_once()
    # Within the delivery timeout of 3 s the backoff allows attempts at 0, 0.2, 0.6 and
    # 1.4 s (and 3.0 s, for data sent late): far fewer than data. Each attempt that fails
    # is one warning, whether at the connection or at the DNS lookup before it; on a slow
    # host the last may still be under way when the last data's deadline passes, and is
    # given up with no data waiting for it, which is no failure of the next hop.
    failed = named(events, "apex.link-failed")
    assert 1 <= len(accepted) <= 6
    assert 1 <= len(failed) <= 6
    assert {e["peer"] for e in failed} == {"down.test"}


@pytest_twisted.ensureDeferred
async def test_a_next_hop_that_never_greets_ends_in_a_report_at_the_deadline(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """mute.test's relay takes the TCP connection and says nothing, so the delivery
    deadline comes while we wait for its greeting. Nothing was handed on, so the report
    says the next hop could not be reached (421), not "outcome unknown" nor a local error;
    and the half-made session does not stay open in no pool, to the peer's idle timeout."""
    connections: list[protocol.Protocol] = []

    class Mute(protocol.Protocol):
        def connectionMade(self) -> None:
            connections.append(self)

    mute = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Mute)
    )
    try:
        mesh = await build_mesh(**{"a.test": {"delivery_timeout": SHORT_DEADLINE}})
        mesh.publish("mute.test", mute.getHost().port)
        fred = await mesh.attach(FRED)
        trans_id = await mesh.send(fred, ["someone@mute.test"])
        await mesh.settle()
        assert outcome(fred, trans_id) == {"someone@mute.test": (421, "next hop unreachable")}
        assert named(events, "apex.internal-error") == []
        assert connections and all(not c.transport.connected for c in connections)
    finally:
        for c in connections:
            c.transport.abortConnection()
        await mute.stopListening()


@pytest_twisted.ensureDeferred
async def test_unroutable_domain_again_from_the_cache(build_mesh: MeshBuilder) -> None:
    """A domain without a route, asked for a second time, is answered from the negative
    cache without a lookup: the same 550 report, once, each time."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    for _ in range(2):
        trans_id = await mesh.send(fred, ["someone@nowhere.test"])
        await mesh.settle()
        assert outcome(fred, trans_id) == {
            "someone@nowhere.test": (550, "no route to nowhere.test: no such domain")
        }
        assert reporters(fred, trans_id) == {"apex=report@a.test"}
    mesh.assert_exactly_once()


class OutOfSockets:
    """The mesh's resolver, except that for names under nowhere.test an AAAA query
    cannot be sent: twisted.names raises CannotListenError (EMFILE) when it has no file
    descriptor left for the query's socket."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def lookupIPV6Address(self, name: str, *args: Any) -> defer.Deferred:
        if name.endswith(".nowhere.test"):
            raise error.CannotListenError("", 0, OSError(errno.EMFILE, "Too many open files"))
        return self.resolver.lookupIPV6Address(name, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolver, name)


@pytest_twisted.ensureDeferred
async def test_a_dns_query_that_cannot_be_sent_is_a_temporary_no_route(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """Out of sockets for DNS queries, a relay gave every such recipient 451 "internal
    error in the router" with a critical traceback each. DNS failing for now is a
    temporary no route: 451 with the reason, one route-failed event per domain, and the
    recipients whose domains are known go on as usual."""
    failures: list[LogEvent] = []

    @provider(ILogObserver)
    def tracebacks(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    mesh = await build_mesh(**{"a.test": lambda m: {"resolver": OutOfSockets(m.dns.resolver())}})
    fred = await mesh.attach(FRED)
    gone = [f"someone@d{i}.nowhere.test" for i in range(3)]
    globalLogPublisher.addObserver(tracebacks)
    try:
        trans_id = await mesh.send(fred, [*gone, BARNEY])
        await mesh.settle()
    finally:
        globalLogPublisher.removeObserver(tracebacks)

    found = outcome(fred, trans_id)
    for recipient in gone:
        domain = recipient.split("@")[1]
        reason = f"DNS lookup failed: cannot query {domain}: Too many open files"
        assert found[recipient] == (451, f"no route to {domain}: {reason}")
    assert found[BARNEY][0] == 450  # b.test was routed: barney is just not attached
    assert not failures, [formatEvent(e) for e in failures]
    failed = named(events, "apex.route-failed")
    assert sorted((e["domain"], e["permanent"]) for e in failed) == [
        (r.split("@")[1], False) for r in gone
    ]
    assert named(events, "apex.internal-error") == []
    mesh.assert_exactly_once()


# -- access policies (§4.5) -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_forged_originator_from_an_endpoint(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    """§4.5.1: fred, attached as fred@a.test, cannot send as wilma@a.test."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    wilma = await mesh.attach(WILMA)
    barney = await mesh.attach(BARNEY)

    with pytest.raises(BEEPError) as refused:
        await fred.send([BARNEY, WILMA], BODY, originator=WILMA)
    assert refused.value.code == 537
    await mesh.settle()

    assert barney.data == [] and wilma.data == [] and wilma.reports == []
    assert fred.reports == []  # refused before ok: the refusal is the answer, no report
    [event] = named(events, "apex.refused")
    assert (event["code"], event["mode"]) == (537, "endpoint-relay")

    # The refusal ends that operation only: the channel carries fred's own data on.
    trans_id = await mesh.send(fred, [BARNEY], b"as myself")
    await mesh.settle()
    assert codes(fred, trans_id) == {BARNEY: 250}
    assert received(barney) == [(FRED, b"as myself")]
    mesh.assert_exactly_once()


@pytest_twisted.ensureDeferred
async def test_forged_originator_from_a_relay(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """§4.5.2: a peer that proved b.test may bind as b.test and relay b.test's data, but
    not data from fred@a.test (a.test is not a trusted intermediary at c.test)."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    peer = await fake_relay(mesh, "c.test", server_cert("b.test"), "b.test")
    assert peer.answer == wire.OK()

    with pytest.raises(BEEPError) as refused:
        await peer.send(FRED, [BETTY], b"forged")
    assert refused.value.code == 537
    # The binding itself is fine: b.test's own originators pass.
    await peer.send(BARNEY, [BETTY], b"genuine")
    await mesh.settle()

    assert received(betty) == [(BARNEY, b"genuine")]
    assert [e["domain"] for e in named(events, "apex.bound")] == ["b.test"]
    [event] = named(events, "apex.refused")
    assert (event["code"], event["mode"]) == (537, "relay-relay")
    assert "fred@a.test" in event["text"]


@pytest_twisted.ensureDeferred
async def test_the_final_relay_hands_on_every_option_and_only_the_recipient_itself(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued]
) -> None:
    """§5: the final relay keeps the options as it hands data to an application; each
    application is named the only recipient, whether the data named one or several."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    betty_x = await mesh.attach("betty/appl=x@c.test")
    peer = await fake_relay(mesh, "c.test", server_cert("b.test"), "b.test")
    note = wire.Option("http://example.com/note", external=True, body="<note>hi</note>")
    options = [*apex_options.with_data_hopping([], 8, 1), note]

    await peer.send(BARNEY, [BETTY], b"alone", options)
    await peer.send(BARNEY, [BETTY, "betty/appl=x@c.test"], b"together", options)
    await mesh.settle()

    for app, bodies in ((betty, [b"alone", b"together"]), (betty_x, [b"together"])):
        assert [d.content.body for d in app.data if d.content] == bodies
        for data in app.data:
            assert [r.identity for r in data.recipients] == [app.endpoint]
            assert data.options == options


@pytest_twisted.ensureDeferred
async def test_a_peer_with_a_server_auth_only_certificate_binds(
    build_mesh: MeshBuilder, test_ca: Issued, events: list[LogEvent]
) -> None:
    """Public CAs now issue server certificates for serverAuth alone. A peer relay that
    presents one on the mesh port still proves its domain, binds and relays (§4.5.2)."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    certificate = issue_server(test_ca, ["b.test"], client_auth=False)
    peer = await fake_relay(mesh, "c.test", certificate, "b.test")
    assert peer.answer == wire.OK()
    assert peer.session.tls_active

    await peer.send(BARNEY, [BETTY], b"from b.test")
    await mesh.settle()
    assert received(betty) == [(BARNEY, b"from b.test")]
    assert [e["domain"] for e in named(events, "apex.bound")] == ["b.test"]


@pytest.mark.parametrize(
    "body", ["<dataHopping noMoreThan='many' />", "<hopping noMoreThan='3' />"]
)
@pytest_twisted.ensureDeferred
async def test_unreadable_hop_limit_from_a_relay_is_refused_before_ok(
    build_mesh: MeshBuilder,
    server_cert: Callable[..., Issued],
    events: list[LogEvent],
    body: str,
) -> None:
    """RFC 3342 §4: a hop limit the relay cannot read it cannot honour. The data is refused
    with 501 before ok, so the sending relay still answers for it; nothing is delivered
    and nothing fails inside the relay."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    peer = await fake_relay(mesh, "c.test", server_cert("b.test"), "b.test")
    [hopping] = apex_options.with_data_hopping([], 8, 1)
    unreadable = dataclasses.replace(hopping, body=body)

    with pytest.raises(BEEPError) as refused:
        await peer.send(BARNEY, [BETTY], b"x", options=[unreadable])
    assert refused.value.code == 501
    await mesh.settle()
    assert betty.data == []
    [event] = named(events, "apex.refused")
    assert event["code"] == 501
    assert named(events, "apex.internal-error") == []


@pytest_twisted.ensureDeferred
async def test_unreadable_hop_limit_from_an_endpoint_is_refused(
    build_mesh: MeshBuilder, events: list[LogEvent]
) -> None:
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    [hopping] = apex_options.with_data_hopping([], 3, 7)
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient(BARNEY)],
        [dataclasses.replace(hopping, body="<dataHopping reportErrors='maybe' />")],
        content=wire.Content.from_bytes(b"x", "text/plain"),
    )
    with pytest.raises(BEEPError) as refused:
        await fred.channel.send(wire.encode(data))
    assert refused.value.code == 501
    await mesh.settle()
    assert barney.data == []
    assert [e["code"] for e in named(events, "apex.refused")] == [501]


@pytest_twisted.ensureDeferred
async def test_a_fault_in_one_delivery_still_ends_every_recipient_once(
    build_mesh: MeshBuilder, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while carrying one recipient (here: delivering to wilma raises) is logged,
    that recipient gets 451, and the others still get their own verdicts, all reported."""
    mesh = await build_mesh()
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    await mesh.attach(WILMA)
    relay = mesh.relay("a.test").service.relay
    deliver = relay._deliver

    def faulty(journey: Any, recipient: wire.Recipient, endpoint: Any) -> Any:
        if recipient.identity == WILMA:
            raise RuntimeError("a bug")
        return deliver(journey, recipient, endpoint)

    monkeypatch.setattr(relay, "_deliver", faulty)
    trans_id = await mesh.send(fred, [WILMA, BARNEY, "nobody@a.test"])
    await mesh.settle()

    assert received(barney) == [(FRED, BODY)]
    assert codes(fred, trans_id) == {WILMA: 451, BARNEY: 250, "nobody@a.test": 550}
    assert len(named(events, "apex.internal-error")) == 1
    mesh.assert_exactly_once()


@pytest_twisted.ensureDeferred
async def test_unauthorised_bind(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """§4.5.2: a certificate for evil.test does not prove a.test; the bind piggybacked on
    the start is answered with 537 (§4.2), logged once, and the channel carries nothing."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    peer = await fake_relay(mesh, "c.test", server_cert("evil.test"), "a.test")

    assert isinstance(peer.answer, wire.Error)
    assert peer.answer.code == 537
    [event] = named(events, "apex.refused")
    assert (event["code"], event["mode"]) == (537, "relay-relay")
    assert named(events, "apex.bound") == []

    # Unbound, it relays for nobody.
    with pytest.raises(BEEPError) as refused:
        await peer.send(FRED, [BETTY])
    assert refused.value.code == 537
    await mesh.settle()
    assert betty.data == []


@pytest_twisted.ensureDeferred
async def test_a_bind_with_a_certificate_that_names_no_host_is_537(
    build_mesh: MeshBuilder, test_ca: Issued, events: list[LogEvent]
) -> None:
    """§4.5.2, RFC 6125 §6.4: an endpoint's certificate (an rfc822Name and nothing else)
    verifies on the mesh port but proves no domain. A bind with it, from anyone who holds
    one, is refused with 537 and logged once, as for a certificate of another domain:
    not a local error (451) with a traceback, which told the peer to try again."""
    mesh = await build_mesh()
    betty = await mesh.attach(BETTY)
    peer = await fake_relay(mesh, "c.test", issue_client(test_ca, BARNEY), "b.test")

    assert isinstance(peer.answer, wire.Error)
    assert peer.answer.code == 537
    [event] = named(events, "apex.refused")
    assert (event["code"], event["mode"]) == (537, "relay-relay")
    assert named(events, "beep.profile-failure") == []
    assert named(events, "apex.bound") == []

    with pytest.raises(BEEPError) as refused:
        await peer.send(BARNEY, [BETTY])
    assert refused.value.code == 537
    await mesh.settle()
    assert betty.data == []


@pytest_twisted.ensureDeferred
async def test_next_hop_with_a_wrong_certificate(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued]
) -> None:
    """RFC 6125 §6.2.1: found through SRV for c.test, the next hop must prove c.test; one
    that shows other.test gets no data, and the originator hears a 5xx from its own relay
    that says TLS failed. Other recipients of the same data are not held up."""
    mesh = await build_mesh(**{"c.test": {"identity": server_cert("other.test")}})
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)
    # betty's application knows its relay's certificate; the relays of a.test do not.
    betty = await mesh.attach(BETTY, tls_name="other.test")

    trans_id = await mesh.send(fred, [BETTY, BARNEY])
    await mesh.settle()

    found = outcome(fred, trans_id)
    code, text = found[BETTY]
    # 554 "transaction failed": a certificate that does not prove the domain will not
    # fix itself by retrying.
    assert code == 554
    assert "TLS" in text and "as c.test" in text
    assert found[BARNEY] == (250, "")
    assert reporters(fred, trans_id) == {"apex=report@a.test", "apex=report@b.test"}
    assert betty.data == []
    assert received(barney) == [(FRED, BODY)]
    mesh.assert_exactly_once()


# -- routing loops (RFC 3342 §4) ----------------------------------------------------------


def _loop(trusted: bool, server_cert: Callable[..., Issued]) -> dict[str, Any]:
    """a.test follows DNS for loop.test to b.test's relay (which DNS says serves it); b.test
    has a stale static route sending loop.test back to a.test's relay."""

    def b_settings(mesh: Mesh) -> Settings:
        a_mesh = mesh.relay("a.test").port("mesh")
        return {
            # The certificate proves loop.test, so a's TLS check passes: the loop is in the
            # routing, not in a refusal.
            "identity": server_cert("b.test", "loop.test"),
            "routes": {"loop.test": f"127.0.0.1:{a_mesh}=a.test"},
        }

    a_settings: Settings = {"max_hops": 4}
    if trusted:
        # fred@a.test's data comes back to a.test from b.test: only a trusted intermediary
        # may relay another domain's originators (§4.5.2).
        a_settings["trusted_relays"] = ("b.test",)
    return {"a.test": a_settings, "b.test": b_settings}


@pytest_twisted.ensureDeferred
async def test_routing_loop_ends_at_the_hop_limit(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """a -> b -> a -> b: the dataHopping count a set (max_hops 4) runs out at b, which
    reports 554 once; the relays then carry ordinary data as before."""
    mesh = await build_mesh(**_loop(True, server_cert))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    fred = await mesh.attach(FRED)
    barney = await mesh.attach(BARNEY)

    trans_id = await mesh.send(fred, ["x@loop.test"])
    await mesh.settle()

    code, text = outcome(fred, trans_id)["x@loop.test"]
    assert (code, "hop limit" in text) == (554, True)
    assert reporters(fred, trans_id) == {"apex=report@b.test"}
    # noMoreThan 4 is reduced before each hand-over and the data is not sent once it
    # reaches 0: a -> b, b -> a, a -> b, then b stops.
    hand_overs = [
        e
        for e in named(events, "apex.verdict")
        if e["identity"] == "x@loop.test" and e["code"] == 250
    ]
    assert len(hand_overs) == 3
    assert len(named(events, "apex.hop-limit")) == 1
    assert named(events, "apex.refused") == []

    after = await mesh.send(fred, [BARNEY], b"after the loop")
    await mesh.settle()
    assert codes(fred, after) == {BARNEY: 250}
    assert received(barney) == [(FRED, b"after the loop")]
    mesh.assert_exactly_once()


@pytest_twisted.ensureDeferred
async def test_routing_loop_cut_by_relay_policy(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """The same loop without a.test trusting b.test: a refuses fred@a.test's data coming
    back from b (537, §4.5.2), and b, whose hand-over failed, reports that once."""
    mesh = await build_mesh(**_loop(False, server_cert))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    fred = await mesh.attach(FRED)

    trans_id = await mesh.send(fred, ["x@loop.test"])
    await mesh.settle()

    assert codes(fred, trans_id) == {"x@loop.test": 537}
    assert reporters(fred, trans_id) == {"apex=report@b.test"}
    [event] = named(events, "apex.refused")
    assert (event["code"], event["mode"]) == (537, "relay-relay")
    assert named(events, "apex.hop-limit") == []
    mesh.assert_exactly_once()


@pytest.mark.parametrize("status_trans_id", [4243, 4242])
@pytest_twisted.ensureDeferred
async def test_hop_limit_reported_under_the_data_hopping_and_status_request_transids(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], status_trans_id: int
) -> None:
    """RFC 3342 §4 with RFC 3340 §5.1: an originator asking both for status and for
    hop-limit errors gets a report under each transID, and one alone when they are the
    same transID."""
    mesh = await build_mesh(**_loop(True, server_cert))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    fred = await mesh.attach(FRED)
    [hopping] = apex_options.with_data_hopping([], 3, 4242)
    hopping = dataclasses.replace(hopping, body=hopping.body.replace("false", "true"))
    status = apex_options.make_status_request(status_trans_id, "final")
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient("x@loop.test")],
        [status, hopping],
        content=wire.Content.from_bytes(b"round and round", "text/plain"),
    )
    await fred.channel.send(wire.encode(data))
    mesh.sent += [Sent(fred, t, ["x@loop.test"]) for t in {4242, status_trans_id}]
    await mesh.settle()

    failed = [("x@loop.test", 554, "hop limit reached (routing loop?)")]
    assert sorted((r.trans_id, r.destinations) for r in fred.reports) == [
        (t, failed) for t in sorted({4242, status_trans_id})
    ]


@pytest_twisted.ensureDeferred
async def test_hop_limit_reported_under_the_data_hopping_transid(
    build_mesh: MeshBuilder, server_cert: Callable[..., Issued], events: list[LogEvent]
) -> None:
    """RFC 3342 §4: an originator's dataHopping with reportErrors='true' gets the
    hop-limit report under the option's transID even without a statusRequest."""
    mesh = await build_mesh(**_loop(True, server_cert))
    mesh.dns.set(
        "_apex-mesh._tcp.loop.test", srv(0, 0, mesh.relay("b.test").port("mesh"), "b.test.")
    )
    fred = await mesh.attach(FRED)
    hopping = apex_options.with_data_hopping([], 3, 4242)
    hopping = [dataclasses.replace(hopping[0], body=hopping[0].body.replace("false", "true"))]
    assert apex_options.data_hopping(hopping)[1].report_errors
    data = wire.Data(
        wire.Originator(FRED),
        [wire.Recipient("x@loop.test")],
        hopping,
        content=wire.Content.from_bytes(b"round and round", "text/plain"),
    )
    await fred.channel.send(wire.encode(data))
    # The exactly-once check at teardown holds for this report too.
    mesh.sent.append(Sent(fred, 4242, ["x@loop.test"]))
    await mesh.settle()
    assert [(r.trans_id, r.destinations) for r in fred.reports] == [
        (4242, [("x@loop.test", 554, "hop limit reached (routing loop?)")])
    ]
    assert len(named(events, "apex.hop-limit")) == 1
