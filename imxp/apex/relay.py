"""The relay engine: attach, bind, terminate and data (RFC 3340 §4.4).

:class:`APEXProfile` puts the APEX profile on a BEEP session; each channel is
an :class:`APEXChannel` with the application (endpoint-relay mode) or relay
(relay-relay mode) on the other side. :class:`Relay` holds the attachments and
carries each data through the steps of §4.4.4.1: authorise the originator,
process per-data options, answer ``ok``, then deliver each local recipient
to its application and forward the others, grouped by next hop, to relays
found by :mod:`imxp.apex.routing`.

The promise kept here: a relay answers ``ok`` only for data it takes
responsibility for; from then on every recipient ends at this relay in a
verdict - delivered, handed to the next relay, or a failure with its code -
and when the originator asked (statusRequest, §5.1) the verdicts that end a
recipient's journey go back as statusResponses from ``apex=report`` (§6.2).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from imxp import logs
from imxp.apex import options as apex_options
from imxp.apex import wire
from imxp.apex.address import AddressError, Endpoint, normalise_domain
from imxp.apex.peers import PeerPool, Verdict
from imxp.apex.policy import AccessPolicy
from imxp.apex.routing import NoRoute, Router, Target
from imxp.apex.services.report import ReportService
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.session import (
    BEEPError,
    Channel,
    ChannelHandler,
    NotSent,
    Profile,
    Request,
    Session,
    SessionClosed,
)

__all__ = ["APEXChannel", "APEXProfile", "Mode", "Relay"]

_Party = TypeVar("_Party", wire.Originator, wire.Recipient)
# Characters of a diagnostic kept in a verdict (see Relay._verdict).
_MAX_DIAGNOSTIC = 200
#: Attachments one BEEP session may hold at once, over all its APEX channels. An
#: application may attach as any number of subaddresses of its endpoint (§2.2, §4.5.1),
#: and each is held until it is terminated or the session ends: without a bound, one
#: login (an anonymous one too) could have the relay hold ever more of them for as long
#: as it stays connected, which for an attached application may be months.
MAX_ATTACHMENTS = 1024
#: A hop limit in force (RFC 3342 §4): noMoreThan, the transID its option has or will
#: have, and reportErrors.
_HopLimit = tuple[int, int, bool]


class Mode(enum.Enum):
    """RFC 3340 §2.1."""

    EDGE = "endpoint-relay"
    MESH = "relay-relay"


class APEXChannel(ChannelHandler):
    """One APEX channel and the attachments or bindings made on it (§6.1.1:
    transaction identifiers live as long as the channel)."""

    def __init__(self, relay: Relay, session: Session, mode: Mode) -> None:
        self.relay = relay
        self.session = session
        self.mode = mode
        self.channel: Channel | None = None
        self.attachments: dict[int, Endpoint] = {}
        self.bindings: dict[int, str] = {}
        # The bindings this relay made on the channel, to a next hop (§4.4.2).
        self.bound: dict[int, str] = {}

    def channel_opened(self, channel: Channel) -> None:
        self.channel = channel

    def in_use(self, trans_id: int) -> bool:
        """§4.4.1 and §4.4.2 step 1: whether ``trans_id`` names an operation on this
        channel not yet terminated - the peer's, or the bind this relay made on it."""
        return trans_id in self.attachments or trans_id in self.bindings or trans_id in self.bound

    def message_received(self, request: Request) -> Message:
        return wire.encode(self.relay.handle(self, *self._decode(request.message)))

    def _decode(self, message: Message) -> tuple[Any, wire.Received | None]:
        try:
            return wire.decode_received(message)
        except wire.APEXError as e:
            self.relay.refused(self, e.code, e.text)
            raise BEEPError(e.code, e.text) from None

    def channel_closed(self, reason: Failure | None) -> None:
        self.relay.channel_gone(self)

    def keeps_session_open(self) -> bool:
        # An attached application may wait quietly for data for hours.
        return bool(self.attachments or self.bindings)

    @property
    def peer(self) -> str:
        return self.session.peer


class APEXProfile(Profile):
    """``http://iana.org/beep/APEX`` (§4.2), offered once TLS is in place."""

    uri = wire.APEX_URI

    def __init__(self, relay: Relay, mode: Mode, *, require_tls: bool = True) -> None:
        self.relay = relay
        self.mode = mode
        self.require_tls = require_tls

    def offered(self, session: Session) -> bool:
        return session.tls_active or not self.require_tls

    def start(self, session: Session, channel: Channel, init: bytes | None) -> bytes | None:
        handler = APEXChannel(self.relay, session, self.mode)
        channel.handler = handler
        handler.channel = channel
        if init is None:
            return None
        # §4.2: an attach or bind may ride on the start; its answer rides on the reply.
        try:
            reply = self.relay.handle(handler, *handler._decode(Message(init, mgmt.BEEP_XML)))
        except BEEPError as e:
            reply = wire.Error(e.code, e.text)
        return wire.encode(reply).body


class _Journey:
    """One data accepted by this relay, until every recipient has a verdict here."""

    __slots__ = (
        "data",
        "originator",
        "status",
        "hop_limit",
        "recipient_status",
        "reports",
        "settled",
        "received",
        "given_up",
    )

    def __init__(
        self,
        data: wire.Data,
        originator: Endpoint,
        status: wire.Option | None,
        hop_limit: _HopLimit,
        received: wire.Received | None = None,
    ) -> None:
        self.data = data
        self.originator = originator
        self.status = status
        self.hop_limit = hop_limit
        # Recipients with a statusRequest of their own (§8.4), which counts for them.
        self.recipient_status: dict[str, wire.Option] = {}
        # (transID, identity, code, text) of the verdicts to report
        self.reports: list[tuple[int, str, int, str]] = []
        # Recipients with a verdict here, final or a hand-over.
        self.settled: set[str] = set()
        # The data as it arrived, while a delivery or a hand-over may still send it on.
        self.received = received
        # The wait for its next hops was given up before its deadline (a stop, a
        # shorter delivery timeout): it is handed on no more.
        self.given_up = False


class Relay:
    """The relay of one administrative domain."""

    log = logs.Logger()

    def __init__(
        self,
        domain: str,
        policy: AccessPolicy,
        router: Router,
        pool: PeerPool,
        clock: IReactorTime,
        *,
        max_hops: int = 16,
        delivery_timeout: float = 60.0,
        max_queued: int = 16777216,
    ) -> None:
        self.domain = domain
        self.policy = policy
        self.router = router
        self.pool = pool
        self.clock = clock
        self.max_hops = max_hops
        self.delivery_timeout = delivery_timeout
        #: Octets waiting to be written to an application beyond which its data is refused.
        self.max_queued = max_queued
        self.reports = ReportService(domain, self.send_internal)
        self._deadlines = _Deadlines(clock, delivery_timeout)
        # The relay is stopping and gave up on what was still unanswered: the verdicts
        # then say so, rather than that a deadline passed.
        self._stopped_waiting = False
        self.attached: dict[Endpoint, APEXChannel] = {}
        self.accepting = True
        self.in_flight = 0
        self._idle_waiters: list[defer.Deferred[None]] = []

    # -- operations (§4.4) ---------------------------------------------------

    def handle(
        self, channel: APEXChannel, element: Any, received: wire.Received | None = None
    ) -> wire.OK:
        """Act on ``element``; ``received`` is how it arrived, when that is known."""
        if isinstance(element, wire.Data):
            return self.data(channel, element, received)
        if isinstance(element, wire.Attach):
            return self.attach(channel, element)
        if isinstance(element, wire.Bind):
            return self.bind(channel, element)
        if isinstance(element, wire.Terminate):
            return self.terminate(channel, element)
        return self._refuse(channel, 501, f"unexpected {type(element).__name__.lower()} element")

    def attach(self, channel: APEXChannel, attach: wire.Attach) -> wire.OK:
        """§4.4.1, steps 1-6."""
        if channel.in_use(attach.trans_id):
            return self._refuse(channel, 555, "transaction already in progress")
        if channel.mode is not Mode.EDGE:
            return self._refuse(channel, 537, "attach is for the endpoint-relay mode")
        endpoint = self._endpoint(channel, attach.endpoint)
        if endpoint.domain != self.domain:
            return self._refuse(channel, 553, f"this relay serves {self.domain}")
        identity = channel.session.authenticated_identity
        if identity is None:
            return self._refuse(channel, 530, "authentication required")
        anonymous = channel.session.authenticated_anonymously
        if not self.policy.may_attach(identity, endpoint, anonymous=anonymous):
            who = "an anonymous login" if anonymous else identity
            return self._refuse(channel, 537, f"{who} may not attach as {endpoint}")
        unknown = apex_options.check_must_understand(attach.options, final=True)
        if unknown is not None:
            return self._refuse(channel, 504, f"option {unknown.name} not implemented")
        if endpoint in self.attached:
            return self._refuse(channel, 554, f"{endpoint} is already attached")
        if _attachments_of(channel.session) >= MAX_ATTACHMENTS:
            # §10: 550, requested action not taken; room is made by a terminate (§4.4.3).
            return self._refuse(
                channel, 550, f"no more than {MAX_ATTACHMENTS} attachments on one session"
            )
        self.attached[endpoint] = channel
        channel.attachments[attach.trans_id] = endpoint
        self.log.info(
            "{endpoint} attached from {peer}",
            endpoint=str(endpoint),
            peer=channel.peer,
            event="apex.attached",
        )
        return wire.OK()

    def bind(self, channel: APEXChannel, bind: wire.Bind) -> wire.OK:
        """§4.4.2: a relay binds for a domain its certificate proves (§4.5.2)."""
        if channel.in_use(bind.trans_id):
            return self._refuse(channel, 555, "transaction already in progress")
        if channel.mode is not Mode.MESH:
            return self._refuse(channel, 537, "bind is for the relay-relay mode")
        # §2.2.1: one form of each domain, the form originators are compared in.
        domain = normalise_domain(bind.relay)
        if not self.policy.may_bind(channel.session.peer_certificate, domain):
            return self._refuse(channel, 537, f"certificate does not prove {domain}")
        unknown = apex_options.check_must_understand(bind.options, final=True)
        if unknown is not None:
            return self._refuse(channel, 504, f"option {unknown.name} not implemented")
        channel.bindings[bind.trans_id] = domain
        self.log.info(
            "relay for {domain} bound from {peer}",
            domain=domain,
            peer=channel.peer,
            event="apex.bound",
        )
        return wire.OK()

    def terminate(self, channel: APEXChannel, terminate: wire.Terminate) -> wire.OK:
        """§4.4.3: transID 0 ends every association made over the BEEP session."""
        if terminate.trans_id == 0:
            # Step 1: the application's, on whichever APEX channel of the session.
            unbound = []
            for handler in {channel, *_apex_channels(channel.session)}:
                if handler.relay is self:
                    self._release(handler, list(handler.attachments))
                    handler.bindings.clear()
                    unbound.extend(handler.bound.values())
                    handler.bound.clear()
            if unbound:
                # Our binding to the next hop too: as for step 3 below.
                self._unbound(channel, unbound[0])
            return wire.OK()
        if terminate.trans_id in channel.attachments:
            self._release(channel, [terminate.trans_id])
            return wire.OK()
        if channel.bindings.pop(terminate.trans_id, None) is not None:
            return wire.OK()
        domain = channel.bound.pop(terminate.trans_id, None)
        if domain is not None:
            self._unbound(channel, domain)
            return wire.OK()
        return self._refuse(channel, 550, "unknown transaction-identifier")

    def _unbound(self, channel: APEXChannel, domain: str) -> None:
        # Step 3, from the next hop: it takes no more data from us on this session.
        # What was sent on it still gets its answers; later data go on a new link.
        self.log.info(
            "{peer} ended our binding as {domain}",
            peer=channel.peer,
            domain=domain,
            event="apex.unbound",
        )
        self.pool.unbound(channel.session)

    def channel_gone(self, channel: APEXChannel) -> None:
        self._release(channel, list(channel.attachments))
        channel.bindings.clear()

    def _release(self, channel: APEXChannel, trans_ids: Iterable[int]) -> None:
        for trans_id in trans_ids:
            endpoint = channel.attachments.pop(trans_id)
            if self.attached.get(endpoint) is channel:
                del self.attached[endpoint]
                self.log.info("{endpoint} detached", endpoint=str(endpoint), event="apex.detached")

    def data(
        self, channel: APEXChannel, data: wire.Data, received: wire.Received | None = None
    ) -> wire.OK:
        """§4.4.4.1 steps 1-3; steps 4-5 run after ``ok`` is on its way."""
        if not self.accepting:
            return self._refuse(channel, 421, "relay is shutting down")
        originator = self._endpoint(channel, data.originator.identity)
        if channel.mode is Mode.EDGE:
            attached = list(channel.attachments.values())
            if not self.policy.may_originate(attached, originator):
                return self._refuse(channel, 537, f"not attached as {originator}")
        elif not self.policy.may_relay(list(channel.bindings.values()), originator):
            return self._refuse(channel, 537, f"peer may not relay for {originator}")
        elif originator.is_report_service and self._none_attached(data.recipients):
            # Not the peer's fault but the way reports wait for an application that is
            # away a moment (a restart): one line per attempt, not a warning for each.
            text = "endpoint not attached; try again later"
            self.log.info(
                "report from {peer} for {recipients} held back: {text}",
                peer=channel.peer,
                recipients=[recipient.identity for recipient in data.recipients],
                text=text,
                event="apex.report-held-back",
            )
            raise BEEPError(450, text)
        unknown = apex_options.check_must_understand(data.options, final=False)
        if unknown is not None:
            return self._refuse(channel, 504, f"option {unknown.name} not implemented")
        try:
            hopping = apex_options.data_hopping(data.options)
        except wire.APEXError as e:
            # RFC 3342 §4: a hop limit this relay cannot read, it cannot honour; refused
            # before ok, so the sender still answers for the data.
            return self._refuse(channel, e.code, e.text)
        status = apex_options.status_request(data.options)
        # §9.1: an option's transID is a UNIQID, and the reports these two options ask
        # for carry it; without one they could not be sent after ok. A statusRequest
        # may stand in the data and in its recipients (§8.4).
        unnumbered = status is not None and not status.trans_id
        for recipient in data.recipients:
            if recipient.options and not unnumbered:
                own = apex_options.status_request(recipient.options)
                unnumbered = own is not None and not own.trans_id
        if unnumbered:
            return self._refuse(channel, 501, "statusRequest option needs a transID")
        if hopping is not None and hopping[1].no_more_than and hopping[1].report_errors:
            if not hopping[0].trans_id:
                return self._refuse(channel, 501, "dataHopping reportErrors needs a transID")
        journey = _Journey(data, originator, status, self._hop_limit(hopping), received)
        self._start(journey)
        return wire.OK()

    def _none_attached(self, recipients: list[wire.Recipient]) -> bool:
        """Whether a report from another relay is for endpoints of this domain, none of
        them attached now: refused for now (450) rather than taken and given the verdict
        450, so that the relay that wrote it tries again until its delivery deadline.

        Taken, it would be lost: no report is made of a report (§6.2), and the promise of
        one final report per recipient to whoever asked for it (§5.1) would fail whenever
        the originator's application was away for a moment - its own relay restarting
        (the reports of what it sent just before come back while it attaches again), or
        its connection lost and made again."""
        for recipient in recipients:
            try:
                endpoint = Endpoint.parse(recipient.identity)
            except AddressError:
                return False
            if endpoint.domain != self.domain or endpoint.is_service:
                return False
            if self._application(endpoint, report=True) is not None:
                return False
            if not self.policy.exists(endpoint):
                return False  # 550 at once: no attempt later would find it
        return bool(recipients)

    def _application(self, endpoint: Endpoint, *, report: bool) -> APEXChannel | None:
        """The channel of the application attached as ``endpoint``; for a ``report``, of
        the one attached as its endpoint if nobody is attached as the subaddress (see
        :meth:`_deliver`)."""
        channel = self.attached.get(endpoint)
        if channel is None and report and endpoint.subaddress:
            channel = self.attached.get(endpoint.base)
        return channel

    def _hop_limit(self, hopping: tuple[wire.Option, apex_options.DataHopping] | None) -> _HopLimit:
        """The hop limit in force for a data with ``hopping``: its own, or this relay's
        ``max_hops``.

        RFC 3342 §4: a loop ends in an error report, not a storm. The option is
        optional and 0 means no limit, so a peer relay's data may carry none; a
        limit of our own keeps even two relays that trust each other from passing
        one data back and forth for ever. It is written into the data only as the
        data is handed on (:meth:`_forward`): an application here gets the data with
        the options it came with.
        """
        if hopping is None:
            return self.max_hops, 1, False
        option, limits = hopping
        if limits.no_more_than:
            return limits.no_more_than, option.trans_id, limits.report_errors
        return self.max_hops, option.trans_id or 1, False

    # -- carrying data (§4.4.4.1 step 5) ---------------------------------------
    #
    # Plain Deferred chains rather than coroutines: most steps finish at once (local
    # verdicts, cached routes), and a relay carries thousands of data a second.

    def _start(self, journey: _Journey) -> None:
        self.in_flight += 1
        d = _guarded(self._carry, journey)
        if d is None:
            self._journey_end(None, journey)
        else:
            d.addBoth(self._journey_end, journey)

    def _carry(self, journey: _Journey) -> defer.Deferred[None] | None:
        """Every recipient to its verdict here; None when all are in at once."""
        local: list[tuple[wire.Recipient, Endpoint]] = []
        remote: dict[str, list[tuple[wire.Recipient, Endpoint]]] = {}
        # Each endpoint with the identity it was first named by.
        seen: dict[Endpoint, str] = {}
        for recipient in journey.data.recipients:
            try:
                endpoint = Endpoint.parse(recipient.identity)
            except AddressError as e:
                if recipient.identity not in journey.settled:
                    self._verdict(journey, recipient.identity, 553, str(e), final=True)
                continue
            first = seen.get(endpoint)
            if first is not None:
                # One endpoint named twice (§2.2.1 compares domains without case) is one
                # recipient: delivered once, with one final report - also to a
                # statusRequest that only the second naming carried.
                own = apex_options.status_request(recipient.options)
                if own is not None and first not in journey.recipient_status:
                    journey.recipient_status[first] = own
                    # Handed on, the recipient is reported on by the relays after this
                    # one: the request goes with it, in the one naming that travels.
                    group = remote.get(endpoint.domain, [])
                    for i, (named, _) in enumerate(group):
                        if named.identity == first:
                            with_own = wire.Recipient(first, [*named.options, own])
                            group[i] = (with_own, endpoint)
                continue
            seen[endpoint] = recipient.identity
            here = endpoint.domain == self.domain
            if recipient.options or journey.data.originator.options or here:
                # Steps 4 and 5.1: per-originator and per-recipient options, and per-data
                # ones for the final relay (§5, targetHop final).
                if recipient.options:
                    own = apex_options.status_request(recipient.options)
                    if own is not None:
                        journey.recipient_status[recipient.identity] = own
                unknown = self._not_understood(journey.data, recipient, final=here)
                if unknown is not None:
                    text = f"option {unknown.name} not implemented"
                    self._verdict(journey, recipient.identity, 504, text, final=True)
                    continue
            if here:
                local.append((recipient, endpoint))
            else:
                remote.setdefault(endpoint.domain, []).append((recipient, endpoint))
        waiting = [
            _guarded(self._deliver, journey, recipient, endpoint) for recipient, endpoint in local
        ]
        if remote:
            waiting.append(_guarded(self._forward_remote, journey, remote))
        else:
            # Sent on where it goes; data waiting on its verdicts need not hold it.
            journey.received = None
        return _all(waiting)

    @staticmethod
    def _not_understood(
        data: wire.Data, recipient: wire.Recipient, *, final: bool
    ) -> wire.Option | None:
        """An option for this relay on the way to ``recipient`` that it must
        understand and does not (§5: an error in processing). Per-data options
        for every relay were checked before ok (step 2)."""
        for options in (recipient.options, data.originator.options, data.options if final else ()):
            unknown = apex_options.check_must_understand(options, final=final)
            if unknown is not None:
                return unknown
        return None

    def _deliver(
        self, journey: _Journey, recipient: wire.Recipient, endpoint: Endpoint
    ) -> defer.Deferred[None] | None:
        """§4.4.4.1 step 5.3: access check, then the attached application.

        An endpoint attached is one, whether or not an account stands behind it (an
        anonymous login's). A statusResponse to a subaddress attached by nobody goes to
        the application attached as its endpoint: that application may originate as
        any subaddress of it (§4.5.1), and is the one who asked.

        None when the verdict is in at once; else fires once it is."""
        identity = recipient.identity
        if endpoint.is_service:
            code, text = self._to_service(journey, endpoint)
            self._verdict(journey, identity, code, text, final=True)
            return None
        channel = self._application(endpoint, report=journey.originator.is_report_service)
        if channel is None and not self.policy.exists(endpoint):
            self._verdict(journey, identity, 550, "unknown endpoint identity", final=True)
            return None
        if not self.policy.may_deliver(journey.originator, endpoint):
            self._verdict(journey, identity, 537, "access denied", final=True)
            return None
        if channel is None or channel.channel is None:
            self._verdict(journey, identity, 450, "endpoint not attached", final=True)
            return None
        queued = channel.channel.queued_bytes
        if queued > self.max_queued:
            # An application that stops reading would have the relay hold all that is
            # sent to it; refused, its originators learn at once (and may try later).
            text = f"endpoint is not reading: {queued} octets already wait for it"
            self._verdict(journey, identity, 450, text, final=True)
            return None
        # A final relay keeps every option as it hands the data over (§5): data for this
        # one recipient alone goes on as it came, with no need to encode it again.
        data = journey.data
        received = journey.received
        if received is not None and received.data is data and len(data.recipients) == 1:
            message = received.message
        else:
            one = wire.Data(
                data.originator,
                [recipient],
                data.options,
                data.content_ref,
                data.content,
                data.in_scope,
            )
            message = wire.encode(one)
        return self._answer(channel.channel, message, journey, identity)

    def _to_service(self, journey: _Journey, endpoint: Endpoint) -> tuple[int, str]:
        """Data for a well-known endpoint of this domain (§6)."""
        if endpoint.address == ReportService.address:
            return self.reports.accept(journey.data)
        return 550, f"no service {endpoint.address} at {self.domain}"

    def _forward_remote(
        self, journey: _Journey, remote: dict[str, list[tuple[wire.Recipient, Endpoint]]]
    ) -> defer.Deferred[None] | None:
        """§4.4.4.1 step 5.2: recipients whose domains have the same next hops travel
        together, in one data per next hop.

        Each recipient has its verdict here within ``delivery_timeout`` of now, the time
        spent finding its next hop (DNS) included: the client library waits for reports
        only a little longer than that (imxp.client.REPORT_TIMEOUT)."""
        deadline = self.clock.seconds() + self.delivery_timeout
        domains = list(remote)
        if len(domains) == 1:
            domain = domains[0]
            try:
                known = self.router.known(domain)
            except NoRoute as e:
                self._no_route(journey, domain, remote[domain], e)
                return None
            if known is not None:
                sending = self._forward_routed([known], journey, domains, remote, deadline)
                if sending is not None and not sending.called:
                    # A next hop that took the MSG may never answer; the originator is
                    # still promised a final answer, as for an application that does
                    # not (_answer).
                    self._deadlines.watch(sending)
                return sending
        done = defer.ensureDeferred(self._route_and_forward(journey, domains, remote, deadline))
        if not done.called:
            self._deadlines.watch(done)
        return done

    async def _route_and_forward(
        self,
        journey: _Journey,
        domains: list[str],
        remote: dict[str, list[tuple[wire.Recipient, Endpoint]]],
        deadline: float,
    ) -> None:
        """Find the next hops of ``domains``, then hand the data on to them.

        Watched as a whole: a coroutine's Deferred fires only once all is done
        (_Deadlines takes one that has fired for one that is done), and cancelling it
        cancels what it waits on at the time, routes or hand-overs. A chain on the
        DeferredList of routes would not: once fired, it passes no cancel on to the
        hand-overs its callback waits on, so the deadline would end the data as failed
        and leave them waiting."""
        if len(domains) == 1:
            routes = [await self._route(journey, domains[0], remote[domains[0]])]
        else:
            routes = await defer.gatherResults(
                [self._route(journey, d, remote[d]) for d in domains]
            )
        forwarding = self._forward_routed(routes, journey, domains, remote, deadline)
        if forwarding is not None:
            await forwarding

    def _forward_routed(
        self,
        routes: list[list[Target] | None],
        journey: _Journey,
        domains: list[str],
        remote: dict[str, list[tuple[wire.Recipient, Endpoint]]],
        deadline: float,
    ) -> defer.Deferred[None] | None:
        if self.clock.seconds() >= deadline or journey.given_up:
            # The deadline passed while routes were awaited (those given up on had their
            # verdicts then: routes None): a hand-over begun now would be given up at once.
            # So when the wait was given up early: nothing watches a hand-over begun now.
            self._not_handed_on(journey, domains, routes, remote)
            return None
        if len(domains) == 1:
            # The usual data, for one domain: nothing to group.
            targets = routes[0]
            if targets is None:
                return None
            recipients = [recipient for recipient, _ in remote[domains[0]]]
            sending = _guarded(self._forward, journey, targets, domains[0], recipients, deadline)
            journey.received = None
            return sending
        hops: dict[frozenset[Target], tuple[list[Target], list[str], list[wire.Recipient]]] = {}
        for domain, targets in zip(domains, routes, strict=True):
            if targets is None:
                continue
            _, names, recipients = hops.setdefault(frozenset(targets), (targets, [], []))
            names.append(domain)
            recipients.extend(recipient for recipient, _ in remote[domain])
        waiting = [
            _guarded(self._forward, journey, targets, ", ".join(names), recipients, deadline)
            for targets, names, recipients in hops.values()
        ]
        # Every hand-over is written; data waiting on its verdicts need not hold it.
        journey.received = None
        return _all(waiting)

    def _not_handed_on(
        self,
        journey: _Journey,
        domains: list[str],
        routes: list[list[Target] | None],
        remote: dict[str, list[tuple[wire.Recipient, Endpoint]]],
    ) -> None:
        """451 for the recipients routed but not handed on by the deadline."""
        for domain, targets in zip(domains, routes, strict=True):
            if targets is None:
                continue  # its verdicts are in: no route
            text = (
                f"not handed on to {domain}: the relay stopped first"
                if self._stopped_waiting
                else f"not handed on to {domain} within {self.delivery_timeout:g} s: "
                "finding the next hops of this data took that long"
            )
            for recipient, _ in remote[domain]:
                self._verdict(journey, recipient.identity, 451, text, final=True)

    def _route(
        self, journey: _Journey, domain: str, group: list[tuple[wire.Recipient, Endpoint]]
    ) -> defer.Deferred[list[Target] | None]:
        """The next hops for ``domain``; without any, its recipients' verdicts."""

        def no_route(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                # The delivery deadline: the lookup goes on for others (Router.route).
                journey.given_up = True
                under_way, waiting = self.router.lookups()
                reason = (
                    "the relay stopped before DNS answered"
                    if self._stopped_waiting
                    else f"no DNS answer within {self.delivery_timeout:g} s "
                    f"({under_way} lookups under way, {waiting} waiting for a turn)"
                )
                self._no_route(journey, domain, group, NoRoute(domain, reason, False))
                return
            failure.trap(NoRoute)
            self._no_route(journey, domain, group, failure.value)

        return self.router.route(domain).addErrback(no_route)

    def _no_route(
        self,
        journey: _Journey,
        domain: str,
        group: list[tuple[wire.Recipient, Endpoint]],
        e: NoRoute,
    ) -> None:
        code = 550 if e.permanent else 451
        for recipient, _ in group:
            self._verdict(
                journey, recipient.identity, code, f"no route to {domain}: {e.reason}", final=True
            )

    def _forward(
        self,
        journey: _Journey,
        targets: list[Target],
        domain: str,
        recipients: list[wire.Recipient],
        deadline: float,
    ) -> defer.Deferred[None] | None:
        """Hand one data with ``recipients`` to the first of ``targets`` that takes it,
        trying until ``deadline``.

        None when the verdicts are in at once; else fires once they are."""
        no_more_than, trans_id, report_errors = journey.hop_limit
        left = no_more_than - 1
        if left <= 0:
            # RFC 3342 §4: the hop limit is spent; most likely a routing loop.
            self.log.warn(
                "hop limit reached for data from {originator} to {domain}",
                originator=str(journey.originator),
                domain=domain,
                event="apex.hop-limit",
            )
            reason = "hop limit reached (routing loop?)"
            for recipient in recipients:
                self._verdict(journey, recipient.identity, 554, reason, final=True)
            if report_errors:
                # RFC 3342 §4: reportErrors asks for a report under the option's own
                # transID, whether or not a statusRequest asked for one too; under the
                # statusRequest's own transID, it is the same report.
                reported = {(t, identity) for t, identity, _, _ in journey.reports}
                journey.reports.extend(
                    (trans_id, r.identity, 554, reason)
                    for r in recipients
                    if (trans_id, r.identity) not in reported
                )
            return None
        data = journey.data
        # The count goes on in the data's own dataHopping option, if it has one that
        # travels on, else in one of ours.
        options = apex_options.with_data_hopping(
            _forwarded(data.options), left, trans_id, report_errors
        )
        onward = wire.Data(
            _forwarded_party(data.originator),
            [_forwarded_party(r) for r in recipients],
            options,
            data.content_ref,
            data.content,
            data.in_scope,
        )
        sending = self.pool.send(targets, wire.encode_onward(onward, journey.received), deadline)
        return sending.addBoth(self._handed_on, journey, domain, recipients)

    def _handed_on(
        self,
        verdict: Verdict | Failure,
        journey: _Journey,
        domain: str,
        recipients: list[wire.Recipient],
    ) -> Failure | None:
        if isinstance(verdict, Failure):
            if not verdict.check(defer.CancelledError):
                return verdict
            late = (
                "had not answered when the relay stopped"
                if self._stopped_waiting
                else "did not answer in time"
            )
            verdict = Verdict(451, wire.outcome_unknown(f"{domain} {late}"))
        text = f"relayed to {domain} via {verdict.hop}" if verdict.ok else verdict.text
        for recipient in recipients:
            # Handed on: the next relay now answers for it, so this is not final.
            self._verdict(journey, recipient.identity, verdict.code, text, final=not verdict.ok)
        return None

    def _answer(
        self, channel: Channel, message: Message, journey: _Journey, identity: str
    ) -> defer.Deferred[None]:
        """The application's answer to a data handed to it on ``channel``, as
        ``identity``'s verdict."""
        sending = channel.send(message)
        self._deadlines.watch(sending)

        def answered(result: Message | list[Message] | Failure) -> Failure | None:
            if not isinstance(result, Failure):
                # §4.4.4.2: the application answers ok, or refuses (an error in an RPY is
                # read as the ERR it should have been).
                code, text = wire.reply_outcome(result, "endpoint")
            elif result.check(BEEPError):
                code, text = wire.refusal(result.value.code, result.value.text, "endpoint")
            elif result.check(defer.CancelledError) and self._stopped_waiting:
                # Its session ends with the others' as the relay stops.
                code, text = (
                    451,
                    wire.outcome_unknown("endpoint had not answered when the relay stopped"),
                )
            elif result.check(defer.CancelledError):
                code, text = 451, wire.outcome_unknown("endpoint did not answer in time")
                self._drop_unanswering(channel, identity)
            elif result.check(NotSent):
                code, text = 451, "endpoint's session was lost before it was sent; not delivered"
            elif result.check(SessionClosed):
                code, text = 451, wire.outcome_unknown("endpoint's session was lost")
            else:
                return result
            self._verdict(journey, identity, code, text, final=True)
            return None

        return sending.addBoth(answered)

    def _drop_unanswering(self, channel: Channel, identity: str) -> None:
        """An application answered no data to ``identity`` by its deadline. Replies come
        in order (RFC 3080 §2.6.1): whatever was sent it after waits as long, and what
        waits unsent would be delivered once it reads again, after its originator was
        told 451. Its session is dropped: data not yet sent is then never delivered
        (NotSent), and the application, when it is back, attaches again."""
        session = channel.session
        if session._gone:
            return
        self.log.warn(
            "{identity} answered no data in time: dropping its session",
            identity=identity,
            event="apex.endpoint-dropped",
        )
        session.disconnect()

    def _verdict(
        self, journey: _Journey, identity: str, code: int, text: str, *, final: bool
    ) -> None:
        """Record one recipient's verdict here; report it when asked (§5.1)."""
        journey.settled.add(identity)
        if len(text) > _MAX_DIAGNOSTIC:
            # A next hop's or an application's diagnostic goes into the report once per
            # recipient: unbounded, it could outgrow the largest message the originator
            # takes, and then the originator would hear about none of them.
            text = text[: _MAX_DIAGNOSTIC - 3] + "..."
        if logs.logged(LogLevel.info):
            self.log.info(
                "{identity} from {originator}: {outcome}",
                identity=identity,
                originator=str(journey.originator),
                outcome=f"{code} {text}" if text else str(code),
                code=code,
                text=text,
                final=final,
                event="apex.verdict",
            )
        status = journey.status
        if journey.recipient_status:
            status = journey.recipient_status.get(identity, status)
        if status is None:
            return
        # A journey that ends here is reported whatever targetHop says: the
        # originator is promised one final answer per recipient. A hand-over
        # is reported only to those who asked to trace every hop.
        if final or status.target_hop in ("this", "all"):
            journey.reports.append((status.trans_id, identity, code, text))

    def _send_reports(self, journey: _Journey) -> None:
        """One statusResponse per transID asked for (§6.2)."""
        by_trans_id: dict[int, list[tuple[str, int, str]]] = {}
        for trans_id, identity, code, text in journey.reports:
            by_trans_id.setdefault(trans_id, []).append((identity, code, text))
        for trans_id, reports in by_trans_id.items():
            self.reports.report(journey.originator, trans_id, reports)

    def send_internal(self, data: wire.Data) -> None:
        """Carry data this relay originates (reports). No report about a report."""
        try:
            originator = Endpoint.parse(data.originator.identity)
        except AddressError:
            return
        self._start(_Journey(data, originator, None, self._hop_limit(None)))

    def _carry_failed(self, failure: Failure, journey: _Journey) -> None:
        """A bug of ours: logged, and every recipient without a verdict yet gets 451, so
        that the originator still hears once about each (§4.4.4.1 step 5).

        The bug may have struck after the data was handed to an application or a next
        hop, and nothing here says whether it was: the 451 says the outcome is unknown,
        so that a sender does not take it for a failure, send again and deliver twice."""
        self.log.failure(
            "carrying data from {originator} failed",
            failure=failure,
            originator=str(journey.originator),
            event="apex.internal-error",
        )
        for recipient in journey.data.recipients:
            if recipient.identity not in journey.settled:
                text = wire.outcome_unknown("local error in processing")
                self._verdict(journey, recipient.identity, 451, text, final=True)

    def _journey_end(self, result: Failure | None, journey: _Journey) -> None:
        """Every recipient has its verdict here: the reports go, the journey ends."""
        try:
            if isinstance(result, Failure):
                self._carry_failed(result, journey)
            self._send_reports(journey)
        except Exception:
            self.log.failure(
                "ending the journey of data from {originator} failed",
                originator=str(journey.originator),
                event="apex.internal-error",
            )
        finally:
            self._journey_done()

    def _journey_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def use_delivery_timeout(self, timeout: float) -> None:
        """Give recipients ``timeout`` seconds for their verdicts from now on (a reload).
        A shorter one also holds for those already waiting: at most ``timeout`` from now."""
        self.delivery_timeout = timeout
        self._deadlines.use_timeout(timeout)

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no accepted data is still being carried."""
        if not self.in_flight:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # -- helpers -------------------------------------------------------------------

    def _endpoint(self, channel: APEXChannel, text: str) -> Endpoint:
        try:
            return Endpoint.parse(text)
        except AddressError as e:
            self._refuse(channel, 553, str(e))

    def _refuse(self, channel: APEXChannel, code: int, text: str) -> NoReturn:
        """Log the refusal once and answer it with an error (RFC 3340 §10)."""
        self.refused(channel, code, text)
        raise BEEPError(code, text)

    def refused(self, channel: APEXChannel, code: int, text: str) -> None:
        self.log.warn(
            "refused {mode} request from {peer}: {code} {text}",
            mode=channel.mode.value,
            peer=channel.peer,
            identity=channel.session.authenticated_identity,
            code=code,
            text=text,
            event="apex.refused",
        )

    def stop_waiting(self) -> None:
        """The relay is stopping: every hand-over and delivery still unanswered gets its
        verdict now, as when its deadline passes, with a text that says why."""
        self._stopped_waiting = True
        self._deadlines.expire_all()

    def applications(self) -> list[APEXChannel]:
        """The channel of each attached application, once however many endpoints it is
        attached as."""
        return list({id(c): c for c in self.attached.values()}.values())

    def terminate_all(
        self, code: int, text: str, session: Session | None = None
    ) -> defer.Deferred[None]:
        """Tell every attached application (or those of ``session``) its attachments
        end (§4.4.3)."""
        sends = []
        for channel in self.applications():
            if session is not None and channel.session is not session:
                continue
            if channel.channel is not None:
                message = wire.encode(wire.Terminate(0, code, text))
                sends.append(channel.channel.send(message).addErrback(lambda f: None))
            self._release(channel, list(channel.attachments))
        return defer.gatherResults(sends).addCallback(lambda _: None)


def _apex_channels(session: Session) -> Iterator[APEXChannel]:
    """The APEX channels of ``session``."""
    for channel in session.channels.values():
        if isinstance(channel.handler, APEXChannel):
            yield channel.handler


def _attachments_of(session: Session) -> int:
    """The attachments held on every APEX channel of ``session``."""
    return sum(len(handler.attachments) for handler in _apex_channels(session))


def _guarded(step: Callable[..., defer.Deferred[Any] | None], *args: Any) -> Any:
    """``step(*args)``, a failed Deferred if it raises: one recipient's trouble must not
    keep the others from their verdicts."""
    try:
        return step(*args)
    except Exception:
        return defer.fail()


def _all(waiting: list[defer.Deferred[Any] | None]) -> defer.Deferred[Any] | None:
    """Fires once every one of ``waiting`` has (None: nothing to wait for); fails with
    the first failure, but only then, so no verdict arrives after the journey ends.
    None when there is nothing to wait for."""
    pending = [d for d in waiting if d is not None]
    if not pending:
        return None
    if len(pending) == 1:
        return pending[0]

    def done(results: list[tuple[bool, Any]]) -> Failure | None:
        for ok, result in results:
            if not ok:
                return result  # type: ignore[no-any-return]
        return None

    return defer.DeferredList(pending, consumeErrors=True).addCallback(done)


class _Deadlines:
    """Cancels each watched Deferred not fired within ``timeout`` of being watched.

    One timer serves them all: with one timeout they fall due in the order they
    came, and most fire long before, so a relay carrying thousands of data a
    second spares a timed call for each.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._watched: deque[tuple[float, defer.Deferred[Any]]] = deque()
        self._timer: IDelayedCall | None = None

    def watch(self, d: defer.Deferred[Any]) -> None:
        watched = self._watched
        while watched and watched[0][1].called:
            watched.popleft()
        watched.append((self._clock.seconds() + self._timeout, d))
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._expire)

    def use_timeout(self, timeout: float) -> None:
        """Watch with ``timeout`` from now on. Were it shorter, what is watched from now
        would fall due before what was watched already: those are brought forward to now
        plus ``timeout`` at the latest, so that the deadlines stay in the order they came."""
        shorter = timeout < self._timeout
        self._timeout = timeout
        if not shorter or not self._watched:
            return
        now = self._clock.seconds()
        self._watched = deque((min(due, now + timeout), d) for due, d in self._watched)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, self._watched[0][0] - now), self._expire)

    def expire_all(self) -> None:
        watched, self._watched = self._watched, deque()
        for _, d in watched:
            if not d.called:
                d.cancel()

    def _expire(self) -> None:
        self._timer = None
        watched = self._watched
        now = self._clock.seconds()
        while watched and (watched[0][1].called or watched[0][0] <= now):
            _, d = watched.popleft()
            if not d.called:
                d.cancel()
        if self._timer is not None:
            # A cancel above gave a verdict whose report was delivered here, and that
            # delivery's watch set a timer for its own deadline, a whole timeout away:
            # the earlier deadlines still watched would wait for it.
            self._timer.cancel()
            self._timer = None
        if watched:
            self._timer = self._clock.callLater(watched[0][0] - now, self._expire)


def _forwarded(options: list[wire.Option]) -> list[wire.Option]:
    """The options that travel on to the next relay (§5: not ``this``)."""
    return [o for o in options if apex_options.forwarded(o)]


def _forwarded_party(party: _Party) -> _Party:
    """``party`` as the next relay gets it: the same object when all its options travel."""
    if not party.options:
        return party
    options = _forwarded(party.options)
    if len(options) == len(party.options):
        return party
    return type(party)(party.identity, options)
