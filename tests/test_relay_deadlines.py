"""The one timer that ends hand-overs and deliveries nobody answers (imxp.apex.relay)."""

from __future__ import annotations

from twisted.internet import defer, task

from imxp.apex.relay import _Deadlines


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
