"""The one timer that ends hand-overs and deliveries nobody answers (imxp.apex.relay)."""

from __future__ import annotations

from dnsserver import SlowResolver
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from imxp.apex import wire
from imxp.apex.policy import AccessPolicy
from imxp.apex.relay import Relay, _Deadlines
from imxp.apex.routing import Router


def test_each_watched_deferred_is_cancelled_at_its_own_deadline_and_not_before() -> None:
    clock = task.Clock()
    deadlines = _Deadlines(clock, 10.0)
    first, answered, later = defer.Deferred(), defer.Deferred(), defer.Deferred()
    deadlines.watch(first)
    clock.advance(4)
    deadlines.watch(answered)
    deadlines.watch(later)
    answered.callback("ok")
    clock.advance(6)
    # The first is due; those watched 4 s later are not yet.
    assert first.called and later.called is False
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    clock.advance(3.9)
    assert not later.called
    clock.advance(0.1)
    assert later.called
    later.addErrback(lambda f: f.trap(defer.CancelledError))
    assert answered.result == "ok"
    # Nothing left to watch: no timer stays behind.
    assert clock.getDelayedCalls() == []


def test_answered_deferreds_are_not_kept_until_their_deadline() -> None:
    clock = task.Clock()
    deadlines = _Deadlines(clock, 60.0)
    for _ in range(10_000):
        d: defer.Deferred[str] = defer.Deferred()
        deadlines.watch(d)
        d.callback("ok")
    assert len(deadlines._watched) <= 1
    assert len(clock.getDelayedCalls()) == 1


def test_expire_all_ends_every_wait_at_once() -> None:
    # What a stopping relay does when shutdown_grace is over.
    clock = task.Clock()
    deadlines = _Deadlines(clock, 60.0)
    waiting = [defer.Deferred() for _ in range(3)]
    answered: defer.Deferred[str] = defer.Deferred()
    for d in [*waiting, answered]:
        deadlines.watch(d)
    answered.callback("ok")
    deadlines.expire_all()
    for d in waiting:
        assert d.called
        d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert answered.result == "ok"


def test_a_watch_made_while_expiring_does_not_put_off_earlier_deadlines() -> None:
    """A hand-over given up gives a verdict at once, whose report is delivered to the
    originator here and watched in turn: that watch, a whole timeout away, must not put
    off the data watched between the two (an operator's relay gave verdicts 35 s after a
    20 s delivery_timeout)."""
    clock = task.Clock()
    deadlines = _Deadlines(clock, 20.0)
    report: defer.Deferred[str] = defer.Deferred()
    first: defer.Deferred[str] = defer.Deferred(lambda d: deadlines.watch(report))
    deadlines.watch(first)
    clock.advance(5)
    second: defer.Deferred[str] = defer.Deferred()
    deadlines.watch(second)
    for d in (first, second, report):
        d.addErrback(lambda f: f.trap(defer.CancelledError))

    clock.advance(15)  # the first is due, and its report is watched from now
    assert first.called and not second.called
    clock.advance(5)  # the second is due 20 s after it was watched
    assert second.called and not report.called
    clock.advance(15)
    assert report.called


def test_a_reloaded_timeout_holds_for_new_watches_and_a_shorter_one_for_all() -> None:
    """A reload (SIGHUP) changes delivery_timeout. A longer one is for the data from then
    on; a shorter one also cuts the wait of what was watched already - were it left, the
    deadlines would no longer fall due in the order they came, and a new data's would
    wait behind the old ones'."""
    clock = task.Clock()
    deadlines = _Deadlines(clock, 60.0)
    old, newer, newest = defer.Deferred(), defer.Deferred(), defer.Deferred()
    for d in (old, newer, newest):
        d.addErrback(lambda f: f.trap(defer.CancelledError))
    deadlines.watch(old)  # due at 60
    clock.advance(10)
    deadlines.use_timeout(90.0)
    deadlines.watch(newer)  # due at 100
    clock.advance(50)
    assert old.called and not newer.called

    deadlines.use_timeout(5.0)  # newer is now due at 65 at the latest
    deadlines.watch(newest)  # due at 65 too
    clock.advance(4.9)
    assert not newer.called and not newest.called
    clock.advance(0.1)
    assert newer.called and newest.called
    assert clock.getDelayedCalls() == []


# -- a route that takes too long (imxp.apex.relay.Relay._forward_remote) -----------------


class Pool:
    """A peer pool whose next hops take each data and never answer; ``None`` as
    ``sent``: one the test expects no hand-over of."""

    def __init__(self, sent: list[tuple[list, float]] | None) -> None:
        self.sent = sent

    def send(self, targets: list, message: object, deadline: float) -> defer.Deferred:
        if self.sent is None:
            raise AssertionError(f"handed on to {targets} though the deadline had passed")
        self.sent.append((targets, deadline))
        return defer.Deferred()


def relay_behind(
    resolver: SlowResolver,
    clock: task.Clock,
    sent: list[tuple[list, float]] | None = None,
    **router: object,
) -> Relay:
    return Relay(
        "a.test",
        AccessPolicy("a.test", lambda local: True),
        Router(resolver=resolver, clock=clock, **router),  # type: ignore[arg-type]
        Pool(sent),  # type: ignore[arg-type]
        clock,
        delivery_timeout=60.0,
    )


def send(relay: Relay, *recipients: str) -> None:
    originator = wire.Originator("apex=report@a.test")
    content = wire.Content.from_bytes(b"hello", "text/plain")
    relay.send_internal(
        wire.Data(originator, [wire.Recipient(r) for r in recipients], content=content)
    )


def verdicts(events: list[dict]) -> dict[str, tuple[int, str]]:
    return {e["identity"]: (e["code"], e["text"]) for e in events if e["event"] == "apex.verdict"}


def test_data_waiting_for_a_route_get_their_verdict_at_the_delivery_deadline() -> None:
    """Behind a DNS server that does not answer, data waited for their route up to
    QUERY_TIMEOUT (90 s), and then their hand-over had delivery_timeout more: the client
    library, waiting REPORT_TIMEOUT (90 s), gave up on reports still to come. The wait for
    a route counts against delivery_timeout; giving up leaves the lookup to the data
    that came later, which get its answer."""
    dns = SlowResolver()
    clock = task.Clock()
    relay = relay_behind(dns, clock)
    with capturedLogs() as events:
        send(relay, "fred@slow.test")
        clock.advance(30)
        send(relay, "wilma@slow.test")
        clock.advance(29.9)
        assert relay.in_flight == 2 and verdicts(events) == {}
        clock.advance(0.1)
        assert verdicts(events) == {
            "fred@slow.test": (
                451,
                "no route to slow.test: no DNS answer within 60 s "
                "(1 lookups under way, 0 waiting for a turn)",
            )
        }
        dns.answer_all()  # the one lookup, still under way, answers the data still waiting
        assert verdicts(events)["wilma@slow.test"] == (
            550,
            "no route to slow.test: no such domain",
        )
    assert relay.in_flight == 0
    clock.advance(30)  # wilma's deadline passes with nothing left to give up on
    assert clock.getDelayedCalls() == []


def test_data_for_several_domains_are_not_handed_on_after_the_deadline() -> None:
    """A data for a domain routed at once and one whose lookup does not end: at the
    deadline each recipient has its 451, and the routed one is not handed on then, when
    there is no time left to wait for the next hop's answer."""
    dns = SlowResolver()
    clock = task.Clock()
    relay = relay_behind(dns, clock, static_routes={"fast.test": "relay.fast.test"}, max_lookups=1)
    with capturedLogs() as events:
        send(relay, "x@first.test")  # takes the one lookup slot
        send(relay, "fred@fast.test", "wilma@slow.test")
        clock.advance(60)
    assert verdicts(events) == {
        "x@first.test": (
            451,
            "no route to first.test: no DNS answer within 60 s "
            "(1 lookups under way, 1 waiting for a turn)",
        ),
        "fred@fast.test": (
            451,
            "not handed on to fast.test within 60 s: finding the next hops of this data "
            "took that long",
        ),
        "wilma@slow.test": (
            451,
            "no route to slow.test: no DNS answer within 60 s "
            "(1 lookups under way, 1 waiting for a turn)",
        ),
    }
    assert relay.in_flight == 0


def test_a_hand_over_after_a_slow_route_has_what_is_left_of_the_deadline() -> None:
    """A route found after 45 s leaves the hand-over 15 s, not a delivery_timeout more."""
    dns = SlowResolver()
    clock = task.Clock()
    sent: list[tuple[list, float]] = []
    relay = relay_behind(dns, clock, sent)
    with capturedLogs() as events:
        send(relay, "fred@slow.test")
        clock.advance(45)
        dns.answer_srv("relay.slow.test")
        assert [(t.host, deadline) for (t,), deadline in sent] == [("relay.slow.test", 60.0)]
        clock.advance(14.9)
        assert verdicts(events) == {}
        clock.advance(0.1)
    assert verdicts(events) == {
        "fred@slow.test": (451, "slow.test did not answer in time; outcome unknown")
    }
    assert relay.in_flight == 0


def test_data_for_several_domains_are_not_handed_on_once_the_stop_gave_up_on_them() -> None:
    """A stop whose grace is over gives every data still in flight its verdict at once
    (stop_waiting). A data for a domain routed at once and one whose lookup does not end
    got 451 for the second, but its first was then handed on - after the relay had given
    up waiting, and no longer watched: behind a next hop that does not answer, the data
    stayed in flight and the stop waited for it without end."""
    dns = SlowResolver()
    clock = task.Clock()
    sent: list[tuple[list, float]] = []
    relay = relay_behind(dns, clock, sent, static_routes={"fast.test": "relay.fast.test"})
    with capturedLogs() as events:
        send(relay, "fred@fast.test", "wilma@slow.test")
        clock.advance(5)
        relay.stop_waiting()
    assert sent == []
    assert {identity: code for identity, (code, _) in verdicts(events).items()} == {
        "fred@fast.test": 451,
        "wilma@slow.test": 451,
    }
    assert relay.in_flight == 0


def test_the_verdicts_a_stop_gives_say_that_the_relay_stopped() -> None:
    """What a stop whose grace is over gives up on is reported as that, not as a deadline
    that passed or a DNS server that did not answer: the sender, and the operator reading
    the log, would look for a fault that is not there."""
    dns = SlowResolver()
    clock = task.Clock()
    sent: list[tuple[list, float]] = []
    relay = relay_behind(dns, clock, sent, static_routes={"fast.test": "relay.fast.test"})
    with capturedLogs() as events:
        send(relay, "barney@fast.test")  # handed on; the next hop never answers
        send(relay, "fred@fast.test", "wilma@slow.test")
        clock.advance(5)
        relay.stop_waiting()
    assert len(sent) == 1
    assert verdicts(events) == {
        "barney@fast.test": (
            451,
            "fast.test had not answered when the relay stopped; outcome unknown",
        ),
        "fred@fast.test": (451, "not handed on to fast.test: the relay stopped first"),
        "wilma@slow.test": (451, "no route to slow.test: the relay stopped before DNS answered"),
    }
    assert relay.in_flight == 0
