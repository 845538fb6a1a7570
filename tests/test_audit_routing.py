"""Audit of next-hop routing and the peer pool (RFC 3340 §3.1, RFC 2782, RFC 6125).

Tests named ``test_defect_*`` fail because of a defect in imxp; the others cover rules the
existing tests did not.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from dnsserver import srv
from test_relay_restart import FakeSession
from twisted.internet import defer, protocol, reactor, task

from imxp.apex import peers, wire
from imxp.apex.peers import Link, LinkFailed, PeerPool, Verdict
from imxp.apex.routing import NoRoute, Router, Target
from imxp.apex.service import Credentials, _connect
from imxp.beep.message import Message
from imxp.beep.session import SessionConfig

MESH = "_apex-mesh._tcp."
FIRST = Target("relay1.b.test", 912, "b.test", "srv")
SECOND = Target("relay2.b.test", 912, "b.test", "srv")


class OkChannel:
    """Answers every data with ok."""

    def __init__(self) -> None:
        self._closing = False
        self.sent = 0
        #: Octets waiting to be written (PeerPool refuses data beyond its max_queued).
        self.queued_bytes = 0

    def send(self, message: Message) -> defer.Deferred[Message]:
        self.sent += 1
        return defer.succeed(wire.encode(wire.OK()))


class Connector:
    """Makes links to hosts as planned: per host, outcomes taken in turn (the last one
    repeats): a LinkFailed, "ok", or "hang" (an attempt that never completes)."""

    def __init__(self, plan: dict[str, list[object]]) -> None:
        self.plan = plan
        self.attempts: list[str] = []
        self.links: list[Link] = []

    async def __call__(self, target: Target) -> Link:
        self.attempts.append(target.host)
        outcomes = self.plan[target.host]
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if outcome == "hang":
            await defer.Deferred()
        link = Link(target, FakeSession(), OkChannel())  # type: ignore[arg-type]
        self.links.append(link)
        return link


def next_wake(clock: task.Clock) -> None:
    """Advance ``clock`` to its next delayed call."""
    clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())


# -- defects ----------------------------------------------------------------------------


def test_defect_permanent_failure_at_one_relay_still_tries_the_next_target() -> None:
    """RFC 2782 "Usage rules": the client tries the targets of the ordered list in turn.
    A refusal that belongs to one relay (its certificate does not prove the domain, RFC
    6125 §6.2.1; it refuses the BEEP session) says nothing about the domain's other relays,
    yet the pool gives up on the whole delivery with 554 at the first such target."""
    tls_failed = LinkFailed(554, "TLS with relay1.b.test:912 as b.test failed")
    connect = Connector({"relay1.b.test": [tls_failed], "relay2.b.test": ["ok"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)

    sending = pool.send([FIRST, SECOND], Message(b"data"), 60.0)
    clock.advance(1.0)

    assert connect.attempts[:2] == ["relay1.b.test", "relay2.b.test"]
    assert sending.result == Verdict(250, hop=SECOND.address)


@pytest_twisted.ensureDeferred
async def test_defect_next_hop_hanging_up_before_tls_is_not_a_permanent_failure(
    server_cert, test_ca
) -> None:
    """A next hop that greets and then drops the connection when asked to start TLS (it
    restarts, a middlebox resets) has shown no certificate at all; that is a lost
    connection, temporary like one lost while binding (421, retried), not 554 "TLS failed"
    (RFC 3340 §10: 5xx is permanent, the originator is told to give up)."""
    greeting = b"<greeting><profile uri='http://iana.org/beep/TLS' /></greeting>"
    body = b"Content-Type: application/beep+xml\r\n\r\n" + greeting
    frame = b"RPY 0 0 . 0 %d\r\n" % len(body) + body + b"END\r\n"

    class HangsUp(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(frame)

        def dataReceived(self, data: bytes) -> None:
            self.transport.loseConnection()

    class Relay:
        domain = "a.test"

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(HangsUp), interface="127.0.0.1")
    try:
        target = Target("127.0.0.1", port.getHost().port, "b.test", "static")
        config = SessionConfig(window=65536, idle_timeout=None)
        try:
            await _connect(
                target,
                Relay(),  # type: ignore[arg-type]
                Credentials(server_cert("a.test"), [test_ca.certificate]),
                config,
                reactor,
                5.0,
                None,
            )
        except LinkFailed as e:
            failed = e
        else:
            raise AssertionError("a link to a peer that hung up")
    finally:
        await port.stopListening()
    assert failed.code < 500, f"{failed.code} {failed.text}"


def test_defect_closing_pool_ends_the_retry_wait_at_once() -> None:
    """service.py's shutdown sets ``pool.closing`` after the grace period so that "what is
    still in flight reaches its verdict now"; data sleeping out a backoff (here 12.8 s,
    up to ``reconnect_max_delay``/``delivery_timeout`` in service) keeps the relay from
    stopping until the sleep ends, and then connects to the next hop once more."""
    connect = Connector({"relay1.b.test": [LinkFailed(421, "cannot connect")]})
    clock = task.Clock()
    pool = PeerPool(connect, clock, max_retry=30.0)
    sending = pool.send([FIRST], Message(b"data"), 300.0)
    for _ in range(6):
        next_wake(clock)
    attempts = len(connect.attempts)

    pool.closing = True
    clock.advance(0.01)

    assert sending.called, "the send waits out its backoff after the pool began closing"
    assert len(connect.attempts) == attempts, "connected again while closing"


def test_defect_no_link_is_opened_after_the_pool_closed() -> None:
    """PeerPool.close() releases every link and stops retrying; a send that was between
    attempts then opens a new session, which stays in the pool, never released."""
    connect = Connector({"relay1.b.test": [LinkFailed(421, "cannot connect"), "ok"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)
    pool.send([FIRST], Message(b"data"), 300.0)

    pool.close(2.0)
    clock.advance(10.0)

    assert all(link.session._gone for link in connect.links), "session left open"


def test_defect_one_data_timing_out_does_not_fail_another_sharing_its_connect() -> None:
    """Two data for a new next hop share one connection attempt. When the first data's
    delivery deadline cancels it (relay._Deadlines), the cancellation is handed to the
    second data too, whose deadline is far off: relay.py turns that CancelledError into
    451 "did not answer in time; outcome unknown" for its recipients at once."""
    connect = Connector({"relay1.b.test": ["hang"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)
    first = pool.send([FIRST], Message(b"one"), 60.0)
    clock.advance(30.0)
    second = pool.send([FIRST], Message(b"two"), 90.0)
    assert connect.attempts == ["relay1.b.test"]

    first.addErrback(lambda f: f.trap(defer.CancelledError))
    first.cancel()  # its deadline

    failed: list[object] = []
    second.addErrback(lambda f: failed.append(f.value))
    assert not any(isinstance(e, defer.CancelledError) for e in failed), failed


def test_defect_data_waiting_for_a_new_link_go_on_in_the_order_they_came() -> None:
    """What one originator sends in a row to a domain with no link yet waits for the
    connection. The data that set off the connection went on after all the others that
    waited meanwhile, so a chat's first message arrived after its later ones."""
    sent: list[bytes] = []

    class Recording(OkChannel):
        def send(self, message: Message) -> defer.Deferred[Message]:
            sent.append(message.body)
            return super().send(message)

    connected: defer.Deferred[None] = defer.Deferred()

    async def connect(target: Target) -> Link:
        await connected
        return Link(target, FakeSession(), Recording())  # type: ignore[arg-type]

    pool = PeerPool(connect, task.Clock())
    sendings = [pool.send([FIRST], Message(b"%d" % n), 60.0) for n in range(5)]
    connected.callback(None)

    assert sent == [b"0", b"1", b"2", b"3", b"4"]
    assert all(s.result == Verdict(250, hop=FIRST.address) for s in sendings)


def test_one_data_giving_up_leaves_the_connection_to_the_others_and_the_last_ends_it() -> None:
    connect = Connector({"relay1.b.test": ["hang"]})
    pool = PeerPool(connect, task.Clock())
    first = pool.send([FIRST], Message(b"one"), 60.0)
    second = pool.send([FIRST], Message(b"two"), 90.0)
    for sending in (first, second):
        sending.addErrback(lambda f: f.trap(defer.CancelledError))

    first.cancel()
    assert not second.called
    third = pool.send([FIRST], Message(b"three"), 90.0)
    third.addErrback(lambda f: f.trap(defer.CancelledError))
    assert connect.attempts == ["relay1.b.test"], "the attempt went on for the others"

    second.cancel()
    third.cancel()
    # Nobody waits any more: the half-made connection is given up, and a new data
    # connects afresh.
    pool.send([FIRST], Message(b"four"), 90.0)
    assert connect.attempts == ["relay1.b.test", "relay1.b.test"]


def test_a_next_hop_that_stops_reading_is_refused_data_beyond_max_queued() -> None:
    connect = Connector({"relay1.b.test": ["ok"]})
    pool = PeerPool(connect, task.Clock(), max_queued=1000)
    assert pool.send([FIRST], Message(b"one"), 60.0).result == Verdict(250, hop=FIRST.address)
    (link,) = connect.links
    link.channel.queued_bytes = 1001  # type: ignore[attr-defined]

    refused = pool.send([FIRST], Message(b"two"), 60.0).result
    assert refused.code == 450
    assert refused.text == "relay1.b.test:912 is not reading: 1001 octets wait for it"
    assert link.channel.sent == 1  # type: ignore[attr-defined]

    # The same for data that waited while the link was being made.
    busy = OkChannel()
    busy.queued_bytes = 1001

    async def connect_busy(target: Target) -> Link:
        return Link(target, FakeSession(), busy)  # type: ignore[arg-type]

    waiting = PeerPool(connect_busy, task.Clock(), max_queued=1000).send(
        [FIRST], Message(b"three"), 60.0
    )
    assert waiting.result.code == 450
    assert busy.sent == 0


class Connecting:
    """Connection attempts that wait until the test ends them: ``up()`` makes the last
    one a link, ``down()`` fails it."""

    def __init__(self, channel: type[OkChannel] = OkChannel) -> None:
        self.channel = channel
        self.attempts: list[defer.Deferred[None]] = []
        self.links: list[Link] = []

    async def __call__(self, target: Target) -> Link:
        attempt: defer.Deferred[None] = defer.Deferred()
        self.attempts.append(attempt)
        await attempt
        link = Link(target, FakeSession(), self.channel())  # type: ignore[arg-type]
        self.links.append(link)
        return link

    def up(self) -> Link:
        self.attempts[-1].callback(None)
        return self.links[-1]

    def down(self) -> None:
        self.attempts[-1].errback(LinkFailed(421, "cannot connect"))


def data(octets: int) -> Message:
    return Message(b"x" * octets)


def test_data_for_a_next_hop_still_connecting_beyond_max_queued_is_refused_at_once() -> None:
    """max_queued stops one next hop from filling the relay's memory, but only counted
    what waits on a link that is up. A next hop that takes the TCP connection and never
    greets had the relay take 800 data of 1000 KiB for it (RSS 50 -> 1619 MB), held until
    their deadlines. What waits for the connection counts too: beyond max_queued a data is
    refused with 450 at once, and those let in go on when the link comes up, in order."""
    connect = Connecting()
    pool = PeerPool(connect, task.Clock(), max_queued=1000)
    waiting = [pool.send([FIRST], data(400), 60.0) for _ in range(3)]  # 0, 400, 800 wait

    refused = pool.send([FIRST], data(400), 60.0)
    assert refused.called, "the data waits with more than max_queued octets before it"
    assert refused.result == Verdict(
        450, "relay1.b.test:912 is not connected yet: 1200 octets wait for it"
    )
    assert not any(d.called for d in waiting)
    assert len(connect.attempts) == 1

    link = connect.up()
    assert [d.result for d in waiting] == [Verdict(250, hop=FIRST.address)] * 3
    assert link.channel.sent == 3  # type: ignore[attr-defined]


def test_data_waiting_to_try_a_next_hop_again_count_against_max_queued() -> None:
    """Between attempts (backoff) a data waits for the next hop as much as during one."""
    connect = Connecting()
    clock = task.Clock()
    pool = PeerPool(connect, clock, max_queued=1000)
    waiting = [pool.send([FIRST], data(600), 60.0) for _ in range(2)]
    connect.down()  # both wait to try again
    assert not any(d.called for d in waiting)

    refused = pool.send([FIRST], data(600), 60.0)
    assert refused.called
    assert refused.result.code == 450
    assert "1200 octets wait" in refused.result.text

    next_wake(clock)
    connect.up()
    assert [d.result for d in waiting] == [Verdict(250, hop=FIRST.address)] * 2


class SlowChannel(OkChannel):
    """Answers each data with ok when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[defer.Deferred[Message]] = []

    def send(self, message: Message) -> defer.Deferred[Message]:
        self.sent += 1
        self.answers.append(defer.Deferred())
        return self.answers[-1]


def test_octets_waiting_for_a_next_hop_count_until_sent_or_given_their_verdict() -> None:
    connect = Connecting(SlowChannel)
    pool = PeerPool(connect, task.Clock(), max_queued=1000)

    def fill() -> list[defer.Deferred[Verdict]]:
        """Two data of 600 octets let in to wait; a third refused."""
        let_in = [pool.send([FIRST], data(600), 60.0) for _ in range(2)]
        assert not any(d.called for d in let_in)
        refused = pool.send([FIRST], data(600), 60.0)
        assert refused.called and refused.result.code == 450
        return let_in

    # Given their verdicts (here their deadlines, while connecting): counted no more.
    for d in fill():
        d.cancel()
        assert d.result.code == 421
    # Sent on the link that came up (their answers still to come): counted no more.
    second = fill()
    link = connect.up()
    assert link.channel.sent == 2  # type: ignore[attr-defined]
    link.session._gone = True  # type: ignore[attr-defined]
    fill()  # wait for a new connection: from nothing again
    assert len(connect.attempts) == 3
    for answer in link.channel.answers:  # type: ignore[attr-defined]
        answer.callback(wire.encode(wire.OK()))
    assert [d.result.code for d in second] == [250, 250]


@pytest_twisted.ensureDeferred
async def test_defect_service_not_available_is_cached_no_longer_than_its_ttl(dns_server):
    """RFC 2782: a lone SRV record with target "." says the service is not available; that
    is a record like any other, to be cached for its TTL (RFC 1035 §3.2.1, RFC 2181 §8).
    The router keeps it for ``negative_ttl`` (60 s) instead, so a domain that turns its
    service on again keeps getting permanent 550s from us after its TTL of 5 s ran out."""
    dns_server.set(MESH + "c.test", srv(0, 0, 0, ".", ttl=5))
    clock = task.Clock()
    router = Router(resolver=dns_server.resolver(timeout=(0.3,)), clock=clock)
    try:
        await router.route("c.test")
    except NoRoute as e:
        assert e.permanent
    else:
        raise AssertionError("route to a domain without the service")

    dns_server.set(MESH + "c.test", srv(10, 1, 912, "relay.c.test"))
    clock.advance(10.0)

    targets = await router.route("c.test")
    assert [t.host for t in targets] == ["relay.c.test"]


# -- rules that hold (not covered before) ---------------------------------------------


def test_concurrent_data_for_a_new_next_hop_share_one_connection() -> None:
    connect = Connector({"relay1.b.test": ["hang"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)
    waiting = defer.Deferred()

    async def slow(target: Target) -> Link:
        connect.attempts.append(target.host)
        await waiting
        link = Link(target, FakeSession(), OkChannel())  # type: ignore[arg-type]
        connect.links.append(link)
        return link

    pool._connect = slow
    sends = [pool.send([FIRST], Message(b"%d" % i), 60.0) for i in range(3)]
    waiting.callback(None)

    assert connect.attempts == ["relay1.b.test"]
    assert [d.result for d in sends] == [Verdict(250, hop=FIRST.address)] * 3
    assert connect.links[0].channel.sent == 3
    # The link is reused for later data.
    assert pool.send([FIRST], Message(b"later"), 60.0).result == Verdict(250, hop=FIRST.address)
    assert connect.attempts == ["relay1.b.test"]


def test_bind_refused_is_final_and_not_retried() -> None:
    """RFC 3340 §4.4.2: a next hop that refuses our bind (537) will not change its mind by
    being asked again; the verdict is the refusal, after one attempt."""
    refused = LinkFailed(537, "refused to bind us: access denied")
    connect = Connector({"relay1.b.test": [refused]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)

    sending = pool.send([FIRST], Message(b"data"), 60.0)

    assert sending.result.code == 537
    assert connect.attempts == ["relay1.b.test"]
    assert clock.getDelayedCalls() == []


def test_unreachable_next_hops_are_retried_with_bounded_backoff_until_the_deadline() -> None:
    """Every target in turn, then again after a doubling delay capped at max_retry; the
    temporary verdict (4xx) comes before the delivery deadline."""
    down = LinkFailed(421, "cannot connect")
    connect = Connector({"relay1.b.test": [down], "relay2.b.test": [down]})
    clock = task.Clock()
    pool = PeerPool(connect, clock, first_retry=0.2, max_retry=2.0)

    sending = pool.send([FIRST, SECOND], Message(b"data"), 20.0)
    delays = []
    while not sending.called:
        before = clock.seconds()
        next_wake(clock)
        delays.append(round(clock.seconds() - before, 3))

    assert delays[:5] == [0.2, 0.4, 0.8, 1.6, 2.0]
    assert max(delays) == 2.0
    assert clock.seconds() <= 20.0
    assert sending.result.code == 421
    assert connect.attempts[:4] == ["relay1.b.test", "relay2.b.test"] * 2


# -- a next hop that is down, with real sockets ----------------------------------------------


class ClosesAtOnce(protocol.Protocol):
    """A next hop that takes each TCP connection and drops it before greeting (a relay
    restarting behind a load balancer, a firewall that resets): a connection attempt that
    fails, temporarily (421), as a refused one does."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]
        self.transport.loseConnection()


class RealConnector:
    """``service._connect`` over real sockets, counting attempts and telling when none
    is under way (the pool's backoff runs on a task.Clock; the sockets on the reactor)."""

    def __init__(self, server_cert, test_ca) -> None:
        self.credentials = Credentials(server_cert("a.test"), [test_ca.certificate])
        self.busy = 0
        self.attempts = 0
        self._idle: list[defer.Deferred[None]] = []

    async def __call__(self, target: Target) -> Link:
        class Relay:
            domain = "a.test"

        self.attempts += 1
        self.busy += 1
        try:
            config = SessionConfig(window=65536, idle_timeout=None)
            return await _connect(target, Relay(), self.credentials, config, reactor, 5.0, None)  # type: ignore[arg-type]
        finally:
            self.busy -= 1
            if not self.busy:
                # Once the pool has the outcome: not from within the attempt.
                idle, self._idle = self._idle, []
                for d in idle:
                    reactor.callLater(0, d.callback, None)

    async def idle(self) -> None:
        """Until no connection attempt is under way."""
        if self.busy:
            d: defer.Deferred[None] = defer.Deferred()
            self._idle.append(d)
            await d


@pytest_twisted.ensureDeferred
async def test_defect_data_for_a_next_hop_that_is_down_share_its_attempts_and_backoff(
    server_cert, test_ca, events
) -> None:
    """Each data ran a connect-and-retry loop of its own: a next hop that was down got a
    connection attempt per data and retry (3,225 for 1,000 data in 10 s), each with an
    apex.link-failed warning. As a mail queue does it, the pool makes one attempt at a time
    per next hop, with one backoff for all that wait for it: here attempts at 0, 1, 3, 7,
    11, 15 and 19 s (doubling, at most 4 s apart) for 120 data arriving over 12 s, each
    attempt one warning, and each data its one verdict by its deadline."""
    factory = protocol.Factory.forProtocol(ClosesAtOnce)
    factory.accepted = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        target = Target("127.0.0.1", port.getHost().port, "b.test", "static")
        connect = RealConnector(server_cert, test_ca)
        clock = task.Clock()
        pool = PeerPool(connect, clock, first_retry=1.0, max_retry=4.0)
        sendings: list[defer.Deferred[Verdict]] = []
        for second in range(30):
            if second < 12:
                # Ten data a second, each with a deadline 10 s on.
                deadline = clock.seconds() + 10.0
                sendings += [pool.send([target], Message(b"data"), deadline) for _ in range(10)]
            await connect.idle()
            clock.advance(1.0)
            await connect.idle()
    finally:
        await port.stopListening()

    assert connect.attempts == 7
    assert factory.accepted == 7  # type: ignore[attr-defined]
    failed = [e for e in events if e["event"] == "apex.link-failed"]
    assert len(failed) == 7
    verdicts = [d.result for d in sendings]
    assert len(verdicts) == 120
    assert {v.code for v in verdicts} == {421}
    assert all("cannot connect" in v.text for v in verdicts)


def test_a_next_hop_in_its_backoff_is_passed_over_for_the_next_target_without_an_attempt() -> None:
    """RFC 2782: each target in turn. A data that comes while the first is backing off
    after a failed attempt goes straight to the second, as the data that saw it fail did."""
    down = LinkFailed(421, "cannot connect")
    connect = Connector({"relay1.b.test": [down], "relay2.b.test": ["ok"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)

    first = pool.send([FIRST, SECOND], Message(b"one"), 60.0)
    clock.advance(0.1)
    second = pool.send([FIRST, SECOND], Message(b"two"), 60.0)

    assert connect.attempts == ["relay1.b.test", "relay2.b.test"]
    assert first.result == second.result == Verdict(250, hop=SECOND.address)


def test_the_pool_remembers_a_bounded_number_of_next_hops_that_failed(monkeypatch) -> None:
    """What is kept of a next hop that failed outlives the data that waited for it (so
    that the next data do not try it again at once), but a relay that failed to reach a
    great many does not keep them all: the least recently failed go first, never one
    being connected to."""
    monkeypatch.setattr(peers, "MAX_REMEMBERED", 2)
    down = LinkFailed(421, "cannot connect")
    hosts = [f"relay{n}.b.test" for n in range(4)]
    connect = Connector({host: [down] for host in hosts} | {"slow.b.test": ["hang"]})
    pool = PeerPool(connect, task.Clock())
    slow = pool.send([Target("slow.b.test", 912, "b.test", "srv")], Message(b"x"), 60.0)
    for host in hosts:
        pool.send([Target(host, 912, "b.test", "srv")], Message(b"x"), 0.1)

    assert [key[0] for key in pool._hops] == ["slow.b.test", "relay3.b.test"]
    slow.cancel()


def test_the_pools_status_names_each_next_hop_linked_connecting_or_backing_off() -> None:
    """What an operator sees on SIGUSR1 (imxp.status-next-hop): which next hops have a
    link, which are being connected to, and which failed, with why and when the next
    attempt may be made; and the octets of data waiting for each."""
    down = LinkFailed(421, "cannot connect")
    slow = Target("slow.c.test", 912, "c.test", "srv")
    connect = Connector({"relay1.b.test": ["ok"], "relay2.b.test": [down], "slow.c.test": ["hang"]})
    clock = task.Clock()
    pool = PeerPool(connect, clock)
    pool.send([FIRST], Message(b"taken"), 60.0)
    failing = pool.send([SECOND], Message(b"12345"), 60.0)
    hanging = pool.send([slow], Message(b"123"), 60.0)
    clock.advance(0.05)

    linked, backing_off, connecting = sorted(pool.status(), key=lambda hop: hop.where)
    assert (linked.peer, linked.where, linked.state) == ("b.test", "relay1.b.test:912", "linked")
    assert (backing_off.where, backing_off.state) == ("relay2.b.test:912", "backing off")
    assert backing_off.failure == "421 cannot connect"
    assert backing_off.retry_in == pytest.approx(0.15)
    assert backing_off.queued == len(b"12345")
    assert (connecting.peer, connecting.state, connecting.queued) == ("c.test", "connecting", 3)
    assert str(backing_off) == (
        "b.test at relay2.b.test:912: backing off, 5 octets waiting, "
        "next attempt in 0.2 s after 421 cannot connect"
    )
    failing.cancel()
    hanging.cancel()


class AnsweringChannel(OkChannel):
    """Answers the data sent on it with ``answers`` in turn, then with ok."""

    def __init__(self, answers: list[Message]) -> None:
        super().__init__()
        self.answers = answers

    def send(self, message: Message) -> defer.Deferred[Message]:
        self.sent += 1
        return defer.succeed(self.answers.pop(0) if self.answers else wire.encode(wire.OK()))


@pytest.mark.parametrize(
    ("answer", "verdict", "sends"),
    [
        # RFC 3340 §10: 451 is a transient failure, whether an ERR or an error element
        # in an RPY (§4.4.4.1 step 5.2) says it: the data goes again, and is taken.
        (wire.encode(wire.Error(451, "busy, try later")), 250, 2),
        # A reply that says nothing of the data's fate: sent again, it might arrive twice.
        (Message(b"<greeting />", wire.BEEP_XML), 451, 1),
        (wire.encode(wire.Error(550, "no such endpoint")), 550, 1),
    ],
)
def test_a_refusal_in_a_positive_reply_is_judged_as_the_err_it_stands_for(
    answer: Message, verdict: int, sends: int
) -> None:
    channel = AnsweringChannel([answer])

    async def connect(target: Target) -> Link:
        return Link(target, FakeSession(), channel)  # type: ignore[arg-type]

    clock = task.Clock()
    sending = PeerPool(connect, clock).send([FIRST], Message(b"data"), 60.0)
    while clock.getDelayedCalls():
        next_wake(clock)

    assert sending.result.code == verdict
    assert channel.sent == sends
