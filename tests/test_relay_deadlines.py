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
