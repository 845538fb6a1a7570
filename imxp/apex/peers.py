"""Links to next-hop relays: one bound BEEP session per next hop, reused.

A link is a BEEP session to the next hop, TLS-protected with that relay's
certificate checked against the domain (RFC 6125), and an APEX channel bound
as our domain (RFC 3340 §4.4.2). Data handed to :meth:`PeerPool.send` is
answered with the next hop's verdict. Temporary trouble (no connection, a 4xx
answer) is retried with backoff until the delivery deadline, since nothing was
accepted; a session lost while our data awaits its answer is not retried,
because the next hop may have taken it: that outcome is reported as unknown
rather than risking a second delivery - unless not one octet of it had been
written (:class:`~imxp.beep.session.NotSent`), which is retried. A next hop
that is going away (421, or closing the session) gets nothing more on that
session, so that its release completes with every data on it answered. Data
for a next hop with no link yet share one connection attempt and go on in the
order they came, as data on a link do. As a mail queue keeps one backoff per
destination, a next hop is tried by one attempt at a time, and after a failed
one not again before its backoff is out, whatever number of data wait for it:
they all wait for that next attempt. What waits for a next hop, on its link's
queue or for a link to it, is bounded by ``max_queued``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from imxp import logs
from imxp.apex import wire
from imxp.apex.routing import Target
from imxp.beep.message import Message
from imxp.beep.session import BEEPError, Channel, NotSent, Session, SessionClosed, host_port

__all__ = ["Link", "LinkFailed", "NextHopStatus", "PeerPool", "Verdict"]

#: Next hops that failed whose backoff the pool remembers once no data waits for them, so
#: that data coming later do not try them again at once; beyond it, the least recently
#: failed are forgotten. Data for other domains may name any next hop (SRV), so a relay
#: that once failed to reach many would otherwise keep them all.
MAX_REMEMBERED = 4096


log = logs.Logger(namespace="imxp.apex.peers")


class LinkFailed(Exception):
    """No bound session to a next hop could be made (nothing was sent)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Verdict:
    """The next hop's answer: 250 when it took the data (§4.4.4.1 step 5.2)."""

    code: int
    text: str = ""
    hop: str = ""
    """For 250, the next hop that took it (``host:port``)."""

    @property
    def ok(self) -> bool:
        return self.code == 250


@dataclass
class Link:
    """A bound APEX channel on a session to one next hop."""

    target: Target
    session: Session
    channel: Channel
    taken: Verdict = field(init=False)
    """The verdict of each data this next hop takes: made once, not per data."""

    def __post_init__(self) -> None:
        self.taken = Verdict(250, hop=self.target.address)


_UNREACHABLE = Verdict(421, "next hop unreachable")
# Who answered, in the texts of wire.reply_outcome and wire.refusal.
_NEXT_HOP = "the next hop"


def _taken(reply: Message | list[Message], link: Link) -> Verdict:
    """The reply of ``link``'s next hop as a verdict (:func:`wire.reply_outcome`): a
    refusal in it is raised as the ERR it is equivalent to, so that a 4xx in an
    ``error`` element is tried again as one in an ERR is (RFC 3340 §10). A reply that
    says nothing of the data's fate is final: sent again, it might be delivered twice."""
    code, text = wire.reply_outcome(reply, _NEXT_HOP)
    if code == 250:
        return link.taken
    if wire.says_outcome_unknown(code, text):
        return Verdict(code, text)
    raise BEEPError(code, text)


@dataclass(frozen=True)
class NextHopStatus:
    """What the pool knows of one next hop, as an operator asks for it (``imxp.status``)."""

    peer: str
    """The name its certificate must carry."""
    where: str
    """``host:port``."""
    state: str
    """``linked``, ``connecting``, or ``backing off`` after a failed attempt."""
    queued: int
    """Octets of data waiting for it: to be written to its link, or for a link."""
    failure: str = ""
    """While backing off: the failed attempt's code and text."""
    retry_in: float = 0.0
    """While backing off: seconds until the next attempt may be made."""

    def __str__(self) -> str:
        said = f"{self.peer} at {self.where}: {self.state}, {self.queued} octets waiting"
        if self.state == "backing off":
            said += f", next attempt in {self.retry_in:.1f} s after {self.failure}"
        return said


#: Makes a bound link to a target; fails with LinkFailed.
Connector = Callable[[Target], Awaitable[Link]]


class _Attempt:
    """One connection attempt to a next hop, and the data waiting for it, in order."""

    def __init__(self) -> None:
        self.task: Deferred[None] | None = None
        self.waiting: list[Deferred[Link]] = []

    def wait(self) -> Deferred[Link]:
        d: Deferred[Link] = Deferred(self._gave_up)
        self.waiting.append(d)
        return d

    def _gave_up(self, d: Deferred[Link]) -> None:
        # One data giving up (its deadline) must not end the attempt for the others;
        # once none waits, nothing needs the link, and a half-made session is dropped.
        if d in self.waiting:
            self.waiting.remove(d)
            if not self.waiting and self.task is not None:
                self.task.cancel()

    def settle(self, outcome: Link | Failure) -> None:
        """Answer the waiting data in the order they came. Each goes on at once, so one
        may give up another still waiting here; that one has its answer then."""
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            if not d.called:
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)


class _NextHop:
    """What the pool knows of one next hop it has no link to: the connection attempt
    under way, and after one failed, when the next may be made. A next hop that is down
    would otherwise get an attempt, and its operator a warning, per data and retry."""

    __slots__ = ("attempt", "delay", "failure", "retry_at", "timer", "waiting")

    def __init__(self, first_retry: float) -> None:
        self.attempt: _Attempt | None = None
        self.failure: LinkFailed | None = None
        """The last attempt's failure, if it failed: given, until ``retry_at``, to the
        data that come for it meanwhile, in place of an attempt of their own."""
        self.retry_at = 0.0
        self.delay = first_retry
        """How long the next failed attempt puts off the one after it."""
        self.waiting: list[Deferred[None]] = []
        """The data waiting for ``retry_at``, in the order they came."""
        self.timer: IDelayedCall | None = None

    def failed(self, failure: LinkFailed, now: float, max_retry: float) -> None:
        self.failure = failure
        self.retry_at = now + self.delay
        self.delay = min(self.delay * 2, max_retry)

    def backing_off(self, now: float) -> LinkFailed | None:
        """The last failure, anew, while no attempt may be made yet; else None."""
        failure = self.failure
        if failure is None or self.retry_at <= now:
            return None
        return LinkFailed(failure.code, failure.text)

    def wait(self, clock: IReactorTime) -> Deferred[None]:
        """Fires at ``retry_at``: one timer for every data waiting, which then go on in
        the order they came, so that the first makes the attempt and the others join it."""
        d: Deferred[None] = Deferred(self._gave_up)
        self.waiting.append(d)
        if self.timer is None:
            self.timer = clock.callLater(max(0.0, self.retry_at - clock.seconds()), self._due)
        return d

    def _gave_up(self, d: Deferred[None]) -> None:
        self.waiting.remove(d)
        if not self.waiting and self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _due(self) -> None:
        self.timer = None
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class _Unsent:
    """One data's octets while it waits for a next hop with no link to take it (on a
    connection attempt, or between attempts), counted for that next hop in ``totals``."""

    __slots__ = ("key", "size", "totals")

    def __init__(self, totals: dict[tuple[str, int, str], int], size: int) -> None:
        self.totals = totals
        self.size = size
        self.key: tuple[str, int, str] | None = None

    def wait_for(self, key: tuple[str, int, str] | None) -> None:
        """Count it for ``key`` from now on; None: it waits for no next hop any more."""
        if key == self.key:
            return
        if self.key is not None:
            left = self.totals.get(self.key, 0) - self.size
            if left > 0:
                self.totals[self.key] = left
            else:
                del self.totals[self.key]
        if key is not None:
            self.totals[key] = self.totals.get(key, 0) + self.size
        self.key = key


class PeerPool:
    """The links of one relay to its next hops."""

    def __init__(
        self,
        connect: Connector,
        clock: IReactorTime,
        *,
        first_retry: float = 0.2,
        max_retry: float = 5.0,
        max_queued: int = 16777216,
    ) -> None:
        self._connect = connect
        self._clock = clock
        self._first_retry = first_retry
        #: The longest backoff between attempts to reach a next hop (a reload changes it).
        self.max_retry = max_retry
        self._max_queued = max_queued
        self._links: dict[tuple[str, int, str], Link] = {}
        # The next hops being connected to, or that failed, the least recently failed
        # first: one attempt at a time each, and one backoff.
        self._hops: OrderedDict[tuple[str, int, str], _NextHop] = OrderedDict()
        # Octets of the data waiting for each next hop with no link to take them. Once
        # sent, a data counts in its link's channel's queued_bytes instead.
        self._unsent: dict[tuple[str, int, str], int] = {}
        self._closing = False
        # Sends waiting to try again: ended at once when the pool closes.
        self._waits: set[Deferred[None]] = set()

    @property
    def closing(self) -> bool:
        """True once the relay stops: no more retrying, no new links."""
        return self._closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self._closing = value
        if value:
            for wait in list(self._waits):
                wait.cancel()

    @staticmethod
    def _key(target: Target) -> tuple[str, int, str]:
        return (target.host.lower(), target.port, target.tls_name)

    def _usable(self, key: tuple[str, int, str]) -> Link | None:
        """The link to ``key`` if it can carry data now."""
        link = self._links.get(key)
        # A channel the peer is closing (e.g. it is shutting down) refuses new MSGs
        # locally with 550; that is no verdict of the next hop, so connect anew.
        if link is not None and not link.session._gone and not link.channel._closing:
            return link
        return None

    async def _link(self, target: Target, key: tuple[str, int, str]) -> Link:
        """A link to ``target`` (``key``); fails with LinkFailed."""
        link = self._usable(key)
        if link is not None:
            return link
        hop = self._hops.get(key)
        if hop is None:
            hop = self._hops[key] = _NextHop(self._first_retry)
        elif hop.attempt is not None:
            return await hop.attempt.wait()
        else:
            failure = hop.backing_off(self._clock.seconds())
            if failure is not None:
                raise failure
        # Data for the same next hop meanwhile wait on this one attempt.
        attempt = hop.attempt = _Attempt()
        waiting = attempt.wait()  # first: the attempt may end before ensureDeferred returns
        attempt.task = defer.ensureDeferred(self._establish(target, key, hop, attempt))
        return await waiting

    async def _establish(
        self, target: Target, key: tuple[str, int, str], hop: _NextHop, attempt: _Attempt
    ) -> None:
        """Connect to ``target`` for the data waiting on ``attempt``, and hand them the
        link in the order they came: the data that set it off among them, so that what
        an originator sends in a row to one domain reaches the next hop in that order."""
        try:
            link = await self._connect(target)
            if self._closing:
                link.session.disconnect()
                raise LinkFailed(421, "this relay is shutting down")
        except Exception as e:
            hop.attempt = None
            if isinstance(e, defer.CancelledError):
                # Every data waiting gave up (deadlines, a stop).
                self._forget(key, hop)
                failure = Failure(LinkFailed(421, "connection attempt given up"))
            else:
                failure = Failure()
                if isinstance(e, LinkFailed):
                    hop.failed(e, self._clock.seconds(), self.max_retry)
                    self._remember(key)
                    # Data waits on it and is tried again, if time allows, until its
                    # verdict: meanwhile this is the operator's only sign of trouble, one
                    # line per attempt however many data wait.
                    log.warn(
                        "no link to {peer} at {where}: {code} {text} ({waiting} data waiting)",
                        peer=target.tls_name,
                        where=target.address,
                        code=e.code,
                        text=e.text,
                        waiting=len(attempt.waiting),
                        event="apex.link-failed",
                    )
            attempt.settle(failure)
            return
        hop.attempt = None
        hop.failure = None
        self._forget(key, hop)
        self._links[key] = link
        log.info(
            "link to {peer} at {where} up",
            peer=target.tls_name,
            where=target.address,
            event="apex.link-up",
        )

        def gone(_: object) -> None:
            if self._links.get(key) is link:
                del self._links[key]

        link.session.when_closed().addCallback(gone)
        attempt.settle(link)

    def _forget(self, key: tuple[str, int, str], hop: _NextHop) -> None:
        """Drop ``hop`` when it has nothing to remember: no attempt, no failure. Data
        waiting for its retry are woken by its timer all the same."""
        if hop.attempt is None and hop.failure is None and self._hops.get(key) is hop:
            del self._hops[key]

    def _remember(self, key: tuple[str, int, str]) -> None:
        """Keep the failure of ``key``'s next hop, the most recent; forget the least recent
        beyond MAX_REMEMBERED, but never one being connected to (a second attempt would
        start beside it)."""
        self._hops.move_to_end(key)
        excess = len(self._hops) - MAX_REMEMBERED
        if excess > 0:
            idle = [k for k, hop in self._hops.items() if hop.attempt is None][:excess]
            for k in idle:
                del self._hops[k]

    def status(self) -> list[NextHopStatus]:
        """Each next hop with a link, a connection attempt, or a failure remembered."""
        now = self._clock.seconds()
        found = []
        for key, link in self._links.items():
            queued = link.channel.queued_bytes + self._unsent.get(key, 0)
            found.append(NextHopStatus(key[2], link.target.address, "linked", queued))
        for (host, port, name), hop in self._hops.items():
            if (host, port, name) in self._links:
                continue
            where, unsent = host_port(host, port), self._unsent.get((host, port, name), 0)
            if hop.attempt is not None or hop.failure is None:
                found.append(NextHopStatus(name, where, "connecting", unsent))
            else:
                failure = f"{hop.failure.code} {hop.failure.text}"
                retry_in = max(0.0, hop.retry_at - now)
                found.append(NextHopStatus(name, where, "backing off", unsent, failure, retry_in))
        return found

    def send(self, targets: list[Target], message: Message, deadline: float) -> Deferred[Verdict]:
        """Hand ``message`` (an encoded data) to the first next hop that takes it."""
        link = self._usable(self._key(targets[0])) if targets else None
        if link is None:
            return defer.ensureDeferred(self._send(targets, message, deadline))
        backlog = self._backlog(link)
        if backlog is not None:
            return defer.succeed(backlog)
        # The usual case, a link that is up to the first choice: no coroutine until
        # something goes wrong.
        return (
            link.channel.send(message)
            .addCallback(_taken, link)
            .addErrback(self._first_failed, targets, message, deadline, link)
        )

    def _first_failed(
        self, failure: Failure, targets: list[Target], message: Message, deadline: float, link: Link
    ) -> Verdict | Deferred[Verdict]:
        if failure.check(defer.CancelledError):
            self._abandon(link)
            return failure  # type: ignore[return-value]
        verdict, final = self._judge(failure, targets[0], link)
        if final:
            return verdict
        return defer.ensureDeferred(self._send(targets, message, deadline, skip=1, last=verdict))

    async def _send(
        self,
        targets: list[Target],
        message: Message,
        deadline: float,
        *,
        skip: int = 0,
        last: Verdict = _UNREACHABLE,
    ) -> Verdict:
        """Try ``targets`` in turn (the first ``skip`` of them already tried), again and
        again with backoff until ``deadline``.

        While ``message`` waits for a next hop with no link, it counts against that next
        hop's ``max_queued``: between attempts, against the one it waits to try."""
        unsent = _Unsent(self._unsent, len(message.body))
        try:
            return await self._try(targets, message, deadline, skip, last, unsent)
        finally:
            unsent.wait_for(None)

    async def _try(
        self,
        targets: list[Target],
        message: Message,
        deadline: float,
        skip: int,
        last: Verdict,
        unsent: _Unsent,
    ) -> Verdict:
        # The delay before this data goes again to a next hop that refused it for now on
        # its link; a next hop that could not be reached has a backoff of its own instead.
        delay = self._first_retry
        keys = [self._key(target) for target in targets]
        while True:
            tried = refused = 0
            # _first_failed: the first choice refused it for now, on its link.
            refused_for_now = skip > 0
            for target, key in zip(targets[skip:], keys[skip:], strict=True):
                if self._closing:
                    return last
                tried += 1
                if self._usable(key) is None:
                    crowded = self._crowded(target, key, unsent)
                    if crowded is not None:
                        return crowded
                try:
                    link = await self._link(target, key)
                except LinkFailed as e:
                    last = Verdict(e.code, f"{target.address}: {e.text}")
                    if e.code >= 500:
                        # This relay will not take us (its certificate, a refused bind);
                        # another of the domain's may (RFC 2782: each target in turn).
                        refused += 1
                    continue
                except defer.CancelledError:
                    # The deadline or the stop, while connecting: no next hop has the
                    # data, so its outcome is known - not handed on - and ``last`` says why.
                    return last
                unsent.wait_for(None)  # sent now, or refused: the link's queue counts it
                backlog = self._backlog(link)
                if backlog is not None:
                    return backlog
                try:
                    verdict = _taken(await link.channel.send(message), link)
                except (BEEPError, SessionClosed):
                    last, final = self._judge(Failure(), target, link)
                    if final:
                        return last
                    refused_for_now = True
                    continue
                except defer.CancelledError:
                    self._abandon(link)
                    raise
                return verdict
            if (tried and refused == tried and not skip) or self._closing:
                return last
            skip = 0
            # Whichever comes first: the next attempt at one of the next hops that could not
            # be reached (shared with every data waiting for it), or this data's own delay.
            at, first, hop = float("inf"), 0, None
            for index, key in enumerate(keys):
                candidate = self._hops.get(key)
                if candidate is not None and candidate.failure is not None:
                    if candidate.retry_at < at:
                        at, first, hop = candidate.retry_at, index, candidate
            if refused_for_now and self._clock.seconds() + delay < at:
                at, first, hop = self._clock.seconds() + delay, 0, None
            if at > deadline:
                return last
            crowded = self._crowded(targets[first], keys[first], unsent)
            if crowded is not None:
                return crowded
            if hop is None:
                wait = task.deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, self.max_retry)
            else:
                wait = hop.wait(self._clock)
            self._waits.add(wait)
            try:
                await wait
            except defer.CancelledError:
                # The deadline or the stop, between attempts: as while connecting.
                return last
            finally:
                self._waits.discard(wait)

    def _backlog(self, link: Link) -> Verdict | None:
        """450 when more than ``max_queued`` octets already wait for ``link``'s next hop:
        one that stops reading would otherwise have this relay hold all data for its
        domain. Its originators learn at once, and may try again later."""
        queued = link.channel.queued_bytes
        if queued <= self._max_queued:
            return None
        return Verdict(450, f"{link.target.address} is not reading: {queued} octets wait for it")

    def _crowded(
        self, target: Target, key: tuple[str, int, str], unsent: _Unsent
    ) -> Verdict | None:
        """``unsent`` is to wait for ``target``, which has no link to take it: 450 when
        more than ``max_queued`` octets already do, else it is counted for ``target``. A
        next hop that takes the TCP connection and never greets would otherwise have this
        relay hold all data for its domain until their deadlines. A data that waits
        already (for another of the domain's relays, or to try again after a failed
        attempt) was let in then, and is not refused on moving."""
        if unsent.key is None:
            waiting = self._unsent.get(key, 0)
            if waiting > self._max_queued:
                text = f"{target.address} is not connected yet: {waiting} octets wait for it"
                return Verdict(450, text)
        unsent.wait_for(key)
        return None

    def _judge(self, failure: Failure, target: Target, link: Link) -> tuple[Verdict, bool]:
        """What sending on ``link`` failing with ``failure`` says, and whether that is final."""
        if failure.check(BEEPError):
            code, text = wire.refusal(failure.value.code, failure.value.text, _NEXT_HOP)
            if code >= 500:
                return Verdict(code, text), True
            if code == 421:
                self._retire(link)
            return Verdict(code, text), False
        if failure.check(NotSent):
            # Lost before a single octet went out: the next hop never saw it.
            verdict = Verdict(421, f"{target.address}: session lost before sending")
            return verdict, False
        if failure.check(SessionClosed):
            return Verdict(451, wire.outcome_unknown("session to the next hop was lost")), True
        failure.raiseException()

    def _abandon(self, link: Link) -> None:
        """A data on ``link`` had no answer by its deadline (or the stop). Replies come
        in order (RFC 3080 §2.6.1), so every data sent on it after would wait as long:
        the link is dropped. Data on it not yet sent go again on a new one (NotSent);
        those sent are reported unknown (451)."""
        key = self._key(link.target)
        if self._links.get(key) is link:
            del self._links[key]
            log.warn(
                "{peer} at {where} answered no data in time: dropping the link",
                peer=link.target.tls_name,
                where=link.target.address,
                event="apex.link-dropped",
            )
        link.session.disconnect()

    def _retire(self, link: Link) -> None:
        """The next hop is going away (421, RFC 3340 §10): queue nothing more on this
        session, so that it falls idle and its release can complete with every data on it
        answered, instead of ending in a disconnect that leaves their outcome unknown.
        Later attempts connect anew (and are refused until the next hop is back)."""
        key = self._key(link.target)
        if self._links.get(key) is link:
            del self._links[key]
            link.session.close().addErrback(lambda f: link.session.disconnect())

    def unbound(self, session: Session) -> None:
        """The next hop at the other end of ``session`` ended the binding of its link
        (RFC 3340 §4.4.3): it is retired as for a 421."""
        for link in list(self._links.values()):
            if link.session is session:
                self._retire(link)

    def close(self, within: float) -> defer.Deferred[None]:
        """Release every link (RFC 3080 §2.4) and stop retrying. A next hop that has not
        let go within ``within`` seconds - it stopped answering, or a network black hole
        keeps our release from it - is disconnected: a stop must not wait on a peer."""
        self.closing = True  # ends the waits of sends between attempts
        links, self._links = list(self._links.values()), {}
        sessions = [link.session for link in links if not link.session._gone]
        releasing = defer.gatherResults(
            [s.close().addErrback(lambda f, s=s: s.disconnect()) for s in sessions]
        )

        def late(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            for session in sessions:
                session.disconnect()

        return releasing.addTimeout(within, self._clock).addCallbacks(lambda _: None, late)
