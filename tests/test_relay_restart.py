"""A relay in the middle of a chain restarted while data with statusRequest flows.

The promise under test (DESIGN.md, "Principles"; RFC 3340 §5.1, §6.2): whenever the
originator asks, every recipient ends in exactly one final statusResponse - delivered (250)
or a reason - nothing is dropped silently and nothing is delivered twice. Here it must hold
while the middle relay of ``a.test -> b.test -> c.test`` stops (``RelayService.stopService``:
421 for new data, ``shutdown_grace`` for accepted data) and a new relay for b.test starts
on the same mesh port, with fred sending 10,000 datagrams to betty all the while.

What the restart exercises: data B accepted before it stopped must still be delivered or
reported; data A hands to B while B refuses (421) or is away is retried by A's peer pool
until B is back (A's ``delivery_timeout`` outlasts the downtime); data in flight at the
instant of the restart must end one way only, never delivered and reported failed.

Routes are static, on loopback ports reserved before any relay listens (the routes form
cycles: A and C both name B, B names both of them):

* A routes c.test to B;
* B routes c.test to C, and a.test to A (its own failure reports go there);
* C routes a.test to B, not straight to A. Reports then cross the restarted relay too, so
  both directions ride over the restart: a report lost at B would show up as a transID
  without any report. It also is the chain as the mesh sees it when A and C cannot reach
  each other directly, which is what a relay in the middle is for.

Authorisation (RFC 3340 §4.5.2): B binds at C as b.test and relays fred@a.test's data, so C
lists b.test among its trusted intermediaries; B binds at A and relays apex=report@c.test's
reports, so A trusts b.test as well.

The three relays share this process and one core; the test is bound by their CPU time per
datagram (seven BEEP exchanges: three hops there, three back for the report, and fred's).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted
from apexnet import App, RelayHandle, attach, free_ports, start_relay
from test_session import echo_pair, failure, result
from twisted.internet import defer, reactor, task

from imxp.apex import wire
from imxp.apex.peers import Link, PeerPool, Verdict
from imxp.apex.routing import Target
from imxp.beep.message import Message
from imxp.beep.session import BEEPError, NotSent, SessionClosed
from imxp.certs import Issued

#: Datagrams fred sends; each is its own statusRequest transID (1..COUNT).
COUNT = 10_000
#: Sends awaiting A's ``ok`` at once (pipelining on fred's channel).
DEPTH = 100
#: B is restarted once betty has this many: well inside the flow, with plenty still to come.
RESTART_AT = COUNT // 4
#: Upper bound, in seconds, on each long wait (the rest of the sending, the last report).
SETTLE = 90.0

FRED = "fred@a.test"
BETTY = "betty@c.test"
REPORTER = "apex=report@c.test"

T = TypeVar("T")


def _listen(port: int) -> list[str]:
    return [f"tcp:{port}:interface=127.0.0.1"]


def _body(seq: int) -> bytes:
    return f"datagram {seq}".encode()


def _seq(data: wire.Data) -> int:
    assert data.content is not None
    return int(data.content.body.split()[-1])


async def _start_b(ca: Issued, tmp: Path, ports: dict[str, int]) -> RelayHandle:
    """A relay for b.test on its mesh port; each run of it gets a directory of its own."""
    tmp.mkdir()
    return await start_relay(
        "b.test",
        ca,
        tmp,
        mesh_listen=_listen(ports["b"]),
        routes={
            "c.test": f"127.0.0.1:{ports['c']}",
            "a.test": f"127.0.0.1:{ports['a']}",
        },
        # B's hand-overs and reports wait for their next hop as long as A's do.
        delivery_timeout=30.0,
        # Short, so that the restart is quick; long enough for B's backlog here.
        shutdown_grace=2.0,
    )


async def _send_all(fred: App, refused: list[tuple[int, BEEPError]]) -> None:
    """Fred sends 1..COUNT with DEPTH sends awaiting A's ok at any time."""
    sequence = iter(range(1, COUNT + 1))

    async def worker() -> None:
        for seq in sequence:
            try:
                await fred.send([BETTY], _body(seq), trans_id=seq)
            except BEEPError as e:
                # A itself never restarts, so it has no reason to refuse; noted for the
                # assertion below rather than raised here, to keep the other workers going.
                refused.append((seq, e))

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(DEPTH)])


async def _within(
    work: defer.Deferred[T], seconds: float, what: str, relays: list[RelayHandle]
) -> T:
    """``work``'s result, or a failure naming what hung and what each relay still carries."""
    try:
        return await work.addTimeout(seconds, reactor)
    except defer.TimeoutError:
        carrying = {r.domain: r.service.relay.in_flight for r in relays}
        raise AssertionError(f"{what} took over {seconds:g}s; data in flight: {carrying}") from None


async def _settled(fred: App, relays: list[RelayHandle]) -> None:
    """Until fred has a report for every transID and every relay is idle, or SETTLE."""
    deadline = reactor.seconds() + SETTLE
    while reactor.seconds() < deadline:
        reported = {report.trans_id for report in fred.reports}
        if len(reported) >= COUNT and all(not r.service.relay.in_flight for r in relays):
            # A duplicate would be in flight still: give the last hops a moment to show it.
            await task.deferLater(reactor, 0.5, lambda: None)
            if all(not r.service.relay.in_flight for r in relays):
                return
        await task.deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_restart_in_the_middle_of_a_chain_loses_and_duplicates_nothing(
    test_ca: Issued, tmp_path: Path
) -> None:
    ports = dict(zip("abc", free_ports(3), strict=True))
    a = await start_relay(
        "a.test",
        test_ca,
        tmp_path,
        users=("fred",),
        mesh_listen=_listen(ports["a"]),
        # B's certificate proves b.test, not c.test, the domain the data is for.
        routes={"c.test": f"127.0.0.1:{ports['b']}=b.test"},
        trusted_relays=["b.test"],
        # A's retries must outlast B's downtime (shutdown_grace + restart).
        delivery_timeout=30.0,
    )
    c = await start_relay(
        "c.test",
        test_ca,
        tmp_path,
        users=("betty",),
        mesh_listen=_listen(ports["c"]),
        routes={"a.test": f"127.0.0.1:{ports['b']}=b.test"},
        trusted_relays=["b.test"],
        # C's reports ride over B's downtime too.
        delivery_timeout=30.0,
    )
    b = await _start_b(test_ca, tmp_path / "b1", ports)
    relays = [a, b, c]
    fred = await attach(a, test_ca, FRED)
    betty = await attach(c, test_ca, BETTY)
    refused: list[tuple[int, BEEPError]] = []
    trouble: list[str] = []
    try:
        started = time.perf_counter()
        sending = defer.ensureDeferred(_send_all(fred, refused))
        await betty.wait("data", RESTART_AT, timeout=SETTLE)
        restart = time.perf_counter()
        in_flight = b.service.relay.in_flight
        # shutdown_grace, then at most 2 s for sessions to close: 10 s is plenty.
        await _within(b.service.stopService(), 10.0, "stopping B", relays)
        stopped = time.perf_counter()
        b = await _start_b(test_ca, tmp_path / "b2", ports)
        relays[1] = b
        await _within(sending, SETTLE, "sending", relays)
        sent = time.perf_counter()
        await _settled(fred, relays)
        finished = time.perf_counter()
    finally:
        for relay in relays:
            if relay.service.running:
                try:
                    await _within(relay.service.stopService(), 30.0, "stopping", relays)
                except AssertionError as e:
                    # Reported after the outcomes, which say more about what went wrong.
                    trouble.append(f"{relay.domain}: {e}")

    received = collections.Counter(_seq(data) for data in betty.data)
    outcomes = fred.outcomes()
    senders: dict[int, list[str]] = {}
    for report, sender in zip(fred.reports, fred.report_senders, strict=True):
        senders.setdefault(report.trans_id, []).append(sender)
    failures: collections.Counter[tuple[int, str]] = collections.Counter()
    missing, twice, wrong = [], [], []
    for seq in range(1, COUNT + 1):
        reported = outcomes.get((seq, BETTY), [])
        if not reported:
            missing.append(seq)
        elif len(reported) > 1:
            twice.append((seq, reported))
        elif reported[0][0] == 250:
            # Delivered: said by betty's relay, and betty has it, once.
            if received[seq] != 1 or senders[seq] != [REPORTER]:
                wrong.append((seq, reported, received[seq], senders[seq]))
        else:
            # Failed: then betty must not have it.
            failures[reported[0]] += 1
            if received[seq]:
                wrong.append((seq, reported, received[seq], senders[seq]))
    delivered = sum(1 for n in received.values() if n)
    print(
        f"\n{COUNT} datagrams: {delivered} delivered, {sum(failures.values())} failed, "
        f"{len(missing)} without a report; B held {in_flight} accepted data when stopped\n"
        f"wall {finished - started:.1f}s: B restarted at {restart - started:.1f}s, away "
        f"{stopped - restart:.1f}s; fred done sending at {sent - started:.1f}s"
    )
    for (code, text), n in failures.most_common():
        print(f"  {n} x {code} {text}")

    assert not refused, f"A refused {len(refused)} data, e.g. {refused[:3]}"
    assert not missing, f"{len(missing)} transIDs without a report, e.g. {missing[:10]}"
    assert not twice, f"{len(twice)} transIDs reported more than once, e.g. {twice[:3]}"
    assert not wrong, f"{len(wrong)} reports contradict what betty got, e.g. {wrong[:3]}"
    # A restart is temporary trouble: waiting may end in 4xx (e.g. an outcome left unknown
    # by a lost session), but a 5xx would be a temporary condition taken for a refusal.
    permanent = {f"{code} {text}": n for (code, text), n in failures.items() if code >= 500}
    assert not permanent, f"failed for good over a restart: {permanent}"
    assert max(received.values()) == 1, "betty received a datagram twice"
    assert set(received) <= set(range(1, COUNT + 1)), "betty received what fred never sent"
    assert set(outcomes) <= {(seq, BETTY) for seq in range(1, COUNT + 1)}, "reports on others"
    assert not trouble, trouble


# -- what a restarting next hop needs from the pool and the session, in memory -----------------


class FakeSession:
    """Just what PeerPool uses of a session."""

    def __init__(self) -> None:
        self._gone = False
        self.released = 0

    def when_closed(self) -> defer.Deferred[None]:
        return defer.Deferred()

    def close(self) -> defer.Deferred[None]:
        self.released += 1
        self._gone = True
        return defer.succeed(None)

    def disconnect(self) -> None:
        self._gone = True


class _FakeChannel:
    """Answers each send with the next of ``answers``: None for ``ok``, else the exception."""

    def __init__(self, session: FakeSession, *answers: Exception | None) -> None:
        self.session = session
        self.answers = list(answers)
        self._closing = False
        self.sent = 0
        #: Octets waiting to be written (PeerPool refuses data beyond its max_queued).
        self.queued_bytes = 0

    def send(self, message: Message) -> defer.Deferred[Message]:
        self.sent += 1
        answer = self.answers.pop(0)
        if answer is None:
            return defer.succeed(wire.encode(wire.OK()))
        if isinstance(answer, SessionClosed):
            self.session._gone = True
        return defer.fail(answer)


class _Next:
    """A next hop reached through links made in turn from ``channels``."""

    target = Target("127.0.0.1", 912, "b.test", "static")
    taken = Verdict(250, hop="127.0.0.1:912")

    def __init__(self, *channels: _FakeChannel) -> None:
        self.channels = list(channels)
        self.connects = 0
        self.clock = task.Clock()
        self.pool = PeerPool(self._connect, self.clock)

    async def _connect(self, target: Target) -> Link:
        channel = self.channels[self.connects]
        self.connects += 1
        return Link(target, channel.session, channel)  # type: ignore[arg-type]

    def send(self) -> Verdict:
        d = defer.ensureDeferred(self.pool.send([self.target], Message(b"data"), 60.0))
        self.clock.advance(1.0)  # past the first retry's delay
        return result(d)  # type: ignore[return-value]


def _channel(*answers: Exception | None) -> _FakeChannel:
    return _FakeChannel(FakeSession(), *answers)


def test_pool_retries_data_lost_with_a_session_before_any_octet_left() -> None:
    first, second = _channel(NotSent("session lost")), _channel(None)
    hop = _Next(first, second)
    assert hop.send() == _Next.taken
    assert hop.connects == 2


def test_pool_reports_data_lost_with_a_session_after_it_left_as_unknown() -> None:
    hop = _Next(_channel(SessionClosed("session lost")), _channel(None))
    verdict = hop.send()
    assert verdict.code == 451 and "unknown" in verdict.text
    assert hop.connects == 1, "retried data the next hop may have taken"


def test_pool_leaves_a_session_whose_peer_said_421_and_releases_it() -> None:
    first, second = _channel(BEEPError(421, "relay is shutting down")), _channel(None)
    hop = _Next(first, second)
    assert hop.send() == _Next.taken
    assert (first.sent, second.sent, hop.connects) == (1, 1, 2)
    assert first.session.released == 1


def test_pool_queues_nothing_on_a_channel_its_peer_is_closing() -> None:
    first, second = _channel(None, None), _channel(None)
    hop = _Next(first, second)
    assert hop.send() == _Next.taken
    first._closing = True  # the peer asked to release the session (RFC 3080 §2.3.1.3)
    assert hop.send() == _Next.taken
    assert (first.sent, second.sent) == (1, 1)


def test_session_lost_tells_msgs_never_written_from_msgs_under_way() -> None:
    pair, _profile, channel = echo_pair()
    # The first MSG outgrows the peer's window: part of it is written, the rest waits;
    # the second waits behind it, not one octet written.
    under_way = channel.send(Message(b"x" * 10_000))
    queued = channel.send(Message(b"y"))
    pair.I.disconnect()
    pair.flush()
    assert type(failure(under_way, SessionClosed)) is SessionClosed
    assert isinstance(failure(queued, NotSent), NotSent)


def test_a_msg_sent_once_the_session_is_gone_is_known_never_written() -> None:
    # A sender that learns of the loss only by sending (the client, racing its reconnect;
    # the relay, handing data to an application whose session just went) may send it again
    # on the next session: the peer never saw an octet of it.
    pair, _profile, channel = echo_pair()
    pair.I.disconnect()
    pair.flush()
    assert isinstance(failure(channel.send(Message(b"late")), NotSent), NotSent)


@pytest.mark.parametrize(
    "trouble",
    [
        NotSent("session lost"),
        SessionClosed("session lost"),
        BEEPError(421, "relay is shutting down"),
        BEEPError(450, "busy"),
        BEEPError(550, "no"),
    ],
)
def test_pool_judges_trouble_on_a_link_that_is_up_as_on_a_new_one(trouble: Exception) -> None:
    """Data for a link that is up skips the retry loop until something goes wrong; what
    goes wrong then means what it means on a new link."""
    fresh = _Next(_channel(trouble, None), _channel(None))
    used = _Next(_channel(None, trouble, None), _channel(None))
    assert used.send() == _Next.taken
    assert used.send() == fresh.send()
    assert used.connects == fresh.connects
    assert [c.sent for c in used.channels] == [fresh.channels[0].sent + 1, fresh.channels[1].sent]
