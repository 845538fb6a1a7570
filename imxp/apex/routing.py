"""The next hop towards an APEX domain: literals, static routes, a smart host, DNS SRV.

RFC 3340 §3.1 locates the relays of an administrative domain with the SRV algorithm of
RFC 2782, service ``apex-mesh`` (relay-relay, port 912 of §8.2) or ``apex-edge``
(endpoint-relay, port 913 of §8.3), protocol ``tcp``; a domain written as a literal
(``[192.0.2.1]``) is connected to directly at the IANA port. :class:`Router` applies, in
order:

1. domain literal -> the address itself at the default port (§3.1; §3.1 names the port of
   §8.2, which is what the default is for the mesh service; an edge router uses §8.3's);
2. a static route configured for the domain;
3. the smart host, when one is configured;
4. DNS: SRV records ordered as RFC 2782 says; without any, the domain's own address records
   at the default port (an "implicit" route, as mail falls back from MX to A).

Every candidate carries the name its TLS certificate must prove (RFC 6125 §6.2.1): for SRV
and implicit routes the source domain, never the SRV target, since the SRV answer is not
protected against a network attacker while the domain came from the address being served.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, error, udp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IResolver
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.names.client import createResolver
from twisted.python.failure import Failure

from imxp import logs
from imxp.apex.address import is_literal, literal_address, normalise_domain
from imxp.beep.session import host_port

__all__ = [
    "MESH_SERVICE",
    "EDGE_SERVICE",
    "MESH_PORT",
    "EDGE_PORT",
    "Target",
    "NoRoute",
    "Router",
    "is_ip_address",
]

MESH_SERVICE = "_apex-mesh._tcp"
EDGE_SERVICE = "_apex-edge._tcp"
MESH_PORT = 912  # RFC 3340 §8.2
EDGE_PORT = 913  # RFC 3340 §8.3

#: Lookups of uncached domains a Router has under way at once; the others wait their turn.
#: twisted.names opens a UDP socket per query, and a lookup has at most two queries out at
#: once (A and AAAA of an implicit route): at most 64 sockets, a sixteenth of the 1024
#: descriptors a service gets by default, the rest being left to the sessions. A resolver
#: answering in 50 ms still completes some 300 lookups a second (SRV, then A and AAAA),
#: and the usual data's domain is in the cache and waits for none.
MAX_LOOKUPS = 32
#: Lookups of uncached domains waiting for their turn past which a further domain is not
#: looked up but given a temporary no route at once (451): behind a resolver that never
#: answers, the domains of data that keep coming would otherwise queue without bound.
#: More than the domains one data may name (wire.MAX_RECIPIENTS), so that such a data, on a
#: cold cache, is never refused by it. None waits for its turn longer than QUERY_TIMEOUT
#: either: after that the resolver is too slow for the domains before it.
MAX_WAITING_LOOKUPS = 1024
#: The longest the router waits for one query. twisted.names gives up by itself after
#: 1+3+11+45 = 60 s, so this only ends a query that will never be answered: one the
#: resolver joined to an earlier query of the same name that it could not send (it keeps
#: that one waiting for ever), or a resolver's bug. Without it, such a query would hold
#: one of the MAX_LOOKUPS for good, and its domain's data would wait for ever.
QUERY_TIMEOUT = 90.0

log = logs.Logger(namespace="imxp.apex.routing")

# twisted.names makes a DNSDatagramProtocol for each query, inside its Resolver, and Twisted
# logs each one's start and stop at info: two lines per query in every relay's log, whatever
# its log_level (which governs imxp's own events only), that say nothing an operator can
# use. ``noisy`` is Twisted's switch for just those two lines, off for the class since the
# Resolver makes the instances; what goes wrong with a lookup is logged as apex.route-failed.
dns.DNSDatagramProtocol.noisy = False


class _UDPLog:
    """twisted.python.log as twisted.internet.udp uses it, less the two lines each DNS
    query's port logs: "DNSDatagramProtocol starting on N" and "(UDP Port N Closed)".

    Those come from the port itself, unconditionally (it has no ``noisy`` switch), at info,
    and go to twistd's own observer, which no log_level filters. Anything else - another
    UDP port's lines, an error reading a datagram - passes through.
    """

    def __init__(self, log: Any) -> None:
        self._log = log
        # Ports a DNS query started and has not closed: their close is the other line.
        self._dns_ports: set[str] = set()

    def msg(self, *message: object, **kw: object) -> None:
        text = message[0] if len(message) == 1 and not kw else None
        if isinstance(text, str):
            started = _DNS_PORT_STARTED.fullmatch(text)
            if started is not None:
                self._dns_ports.add(started[1])
                return
            closed = _PORT_CLOSED.fullmatch(text)
            if closed is not None and closed[1] in self._dns_ports:
                self._dns_ports.discard(closed[1])
                return
        self._log.msg(*message, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


_DNS_PORT_STARTED = re.compile(r"DNSDatagramProtocol starting on (\d+)")
_PORT_CLOSED = re.compile(r"\(UDP Port (\d+) Closed\)")
# Replaced where twisted.internet.udp looks it up: Twisted has no switch for those two
# lines, and the other way to them is a copy of its Port.
udp.log = _UDPLog(udp.log)  # type: ignore[assignment]


@dataclass(frozen=True)
class Target:
    """One place to try, in the order :meth:`Router.route` returns them."""

    host: str
    """Host name or IP address to connect to."""
    port: int
    tls_name: str
    """The name the peer's TLS certificate must match (RFC 6125 §6.2.1): the destination
    domain for SRV, implicit and (unless configured otherwise) static routes, the smart
    host's own name, the address for a literal."""
    source: str
    """Which rule produced it: "literal", "static", "smart-host", "srv" or "implicit"."""

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 address in brackets."""
        return host_port(self.host, self.port)


class _NotAsked(Exception):
    """The resolver could not send a query: it raised instead of answering with a
    Deferred (twisted.names does when it cannot open a socket, e.g. EMFILE)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class NoRoute(Exception):
    """No way to reach ``domain``.

    ``permanent`` failures (the domain does not exist, SRV says the service is not
    available, the name is not a domain) will not heal by waiting; temporary ones (DNS
    timeout, SERVFAIL) may.
    """

    def __init__(self, domain: str, reason: str, permanent: bool) -> None:
        kind = "permanent" if permanent else "temporary"
        super().__init__(f"no route to {domain}: {reason} ({kind})")
        self.domain = domain
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class _Hop:
    """A configured next hop: a static route's value or the smart host."""

    host: str
    port: int
    tls_name: str | None  # None: the rule's default (see Router)

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class _ServiceRecord:
    priority: int
    weight: int
    port: int
    target: str  # "" is the root, RFC 2782's "."
    ttl: int


@dataclass(frozen=True)
class _Answer:
    """What DNS said about one domain, as cached: SRV records, none (implicit), or a failure."""

    records: tuple[_ServiceRecord, ...]
    reason: str | None  # set when the answer is a failure
    permanent: bool
    expires: float  # clock time; an answer not to be cached expires when it arrives


class Router:
    """Finds the relays to try for a domain (RFC 3340 §3.1).

    ``static_routes`` maps a domain (or ``.parent`` for every domain below parent) to
    ``"host"``, ``"host:port"`` or ``"[IPv6]:port"``, optionally followed by ``=tlsname``.
    The TLS name of a static route defaults to the destination domain itself: the relay we
    reach must prove it may act for the domain the data is for, whichever host that is
    (RFC 6125 §6.2.1, the source domain); ``=tlsname`` names a gateway whose certificate
    carries its own name instead. The smart host takes the same form and gets every domain
    without a static route; its TLS name defaults to its host name, as it is a relay of our
    own choosing rather than one acting for the destination.

    DNS answers are cached for the smallest TTL of the SRV set; answers without usable SRV
    records (implicit routes, permanent failures) for ``negative_ttl``; temporary failures
    not at all, so that delivery resumes as soon as DNS does. At most ``max_cache`` domains
    are kept, the least recently used going first. Concurrent lookups for one domain share
    one query; at most ``max_lookups`` domains are looked up at once, the others waiting
    their turn (a data may name a thousand domains): at most ``max_waiting`` of them, and
    for no longer than ``query_timeout`` seconds, which is also the longest any query is
    waited for. A domain beyond ``max_waiting`` is a temporary no route ("too many lookups
    waiting"), and so is one that waited ``query_timeout`` for its turn ("no DNS lookup
    slot"). Cancelling what :meth:`route` returned stops that caller's wait only.
    """

    def __init__(
        self,
        *,
        service: str = MESH_SERVICE,
        default_port: int = MESH_PORT,
        static_routes: Mapping[str, str] | None = None,
        smart_host: str | None = None,
        resolver: IResolver | None = None,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
        negative_ttl: float = 60.0,
        max_cache: int = 10_000,
        max_lookups: int = MAX_LOOKUPS,
        max_waiting: int = MAX_WAITING_LOOKUPS,
        query_timeout: float = QUERY_TIMEOUT,
    ) -> None:
        """``resolver`` defaults to ``twisted.names.client.createResolver()`` (hosts file,
        cache, the servers of resolv.conf). Raises ValueError for a malformed static route or
        smart host.
        """
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._service = service
        self._default_port = default_port
        self._static, self._smart_host = self._configured_hops(static_routes, smart_host)
        self._resolver = resolver
        self._clock = clock
        self._rng = rng or random.Random()
        self._negative_ttl = negative_ttl
        self._max_cache = max_cache
        self._cache: OrderedDict[str, _Answer] = OrderedDict()
        self._pending: dict[str, list[Deferred[_Answer]]] = {}
        self._lookups = defer.DeferredSemaphore(max_lookups)
        self._max_waiting = max_waiting
        self._query_timeout = query_timeout
        # What _configured made of each domain: a relay routes every data it forwards.
        # Bounded like the answer cache; forgotten when the configured hops change.
        self._rules: dict[str, tuple[str, Target | None, str]] = {}

    def use_routes(self, static_routes: Mapping[str, str], smart_host: str | None) -> None:
        """Route by ``static_routes`` and ``smart_host`` from now on (a reload). Raises
        ValueError, and changes nothing, for a malformed one.

        DNS answers stay cached: they do not depend on the configuration. Data already on
        its way to a next hop goes on there."""
        self._static, self._smart_host = self._configured_hops(static_routes, smart_host)
        self._rules = {}

    def _configured_hops(
        self, static_routes: Mapping[str, str] | None, smart_host: str | None
    ) -> tuple[dict[str, _Hop], _Hop | None]:
        default_port = self._default_port
        static: dict[str, _Hop] = {}
        for key, value in (static_routes or {}).items():
            if key == "*":
                raise ValueError("a static route for '*' is what smart_host is for")
            if is_literal(key):
                raise ValueError(f"{key!r}: a domain literal always goes to its own address")
            try:
                if key.startswith("."):
                    pattern = "." + normalise_domain(key[1:])
                else:
                    pattern = normalise_domain(key)
                static[pattern] = _parse_hop(value, default_port)
            except ValueError as e:
                raise ValueError(f"static route {key!r} = {value!r}: {e}") from None
        try:
            smart = None if smart_host is None else _parse_hop(smart_host, default_port)
        except ValueError as e:
            raise ValueError(f"smart host {smart_host!r}: {e}") from None
        return static, smart

    def route(self, domain: str) -> Deferred[list[Target]]:
        """The candidates for ``domain`` in the order to try them; errback :class:`NoRoute`.

        SRV candidates are drawn afresh on every call, cached answer or not, so that the
        weights of RFC 2782 spread the load over successive deliveries.
        """
        try:
            name, targets = self._known(domain)
        except NoRoute as e:
            return defer.fail(e)
        if targets is not None:
            return defer.succeed(targets)
        return self._answer(name).addCallback(lambda answer: self._targets(name, answer))

    def known(self, domain: str) -> list[Target] | None:
        """What :meth:`route` gives, when that needs no lookup (a configured route, a
        literal, a fresh cached answer); None when it does. Raises :class:`NoRoute`.

        A relay routes every data it forwards, nearly always this way: no Deferred.
        """
        return self._known(domain)[1]

    def _known(self, domain: str) -> tuple[str, list[Target] | None]:
        try:
            name, target, _rule = self._configured(domain)
        except NoRoute as e:
            # Not a lookup, but a route that failed all the same: logged like one.
            _log_failure(domain, e.reason, e.permanent)
            raise
        if target is not None:
            return name, [target]
        cached = self._fresh(name)
        return name, None if cached is None else self._targets(name, cached)

    def lookups(self) -> tuple[int, int]:
        """(domains being looked up, domains waiting for their turn): what a caller that
        gave up waiting for :meth:`route` was behind."""
        lookups = self._lookups
        return lookups.limit - lookups.tokens, len(lookups.waiting)

    def describe(self, domain: str) -> Deferred[str]:
        """A human-readable account of how ``domain`` is routed and why (``imxp route``)."""
        return defer.ensureDeferred(self._describe(domain))

    async def _describe(self, domain: str) -> str:
        try:
            name, target, rule = self._configured(domain)
        except NoRoute as e:
            return f"{domain}: no route (permanent): {e.reason}"
        if target is not None:
            return f"{name}: {rule}\n  -> {target.address}, TLS name {target.tls_name}"
        cached = self._fresh(name)
        answer = cached or await self._answer(name)
        lines = [f"{name}: {rule}"]
        if cached is not None:
            left = cached.expires - self._clock.seconds()
            lines.append(f"  answer from cache, {left:.0f} s left")
        for r in sorted(answer.records, key=lambda r: (r.priority, -r.weight, r.target)):
            lines.append(
                f"  priority {r.priority} weight {r.weight} port {r.port} "
                f"target {r.target or '.'} ttl {r.ttl}"
            )
        if answer.reason is not None:
            kind = "permanent" if answer.permanent else "temporary"
            lines.append(f"  no route ({kind}): {answer.reason}")
            return "\n".join(lines)
        targets = self._targets(name, answer)
        if answer.records:
            order = ", ".join(t.address for t in targets)
            lines.append(f"  candidates in the order of this draw (RFC 2782): {order}")
        else:
            lines.append(
                f"  no SRV records: implicit route to {name}:{self._default_port} "
                "(the domain's own address records)"
            )
        lines.append(f"  TLS name {name} (RFC 6125 §6.2.1: the source domain)")
        return "\n".join(lines)

    def _configured(self, domain: str) -> tuple[str, Target | None, str]:
        """(normal name, the Target of rules 1-3 or None for DNS, the rule's description).

        Raises NoRoute (permanent) for a name that is neither a domain nor a literal.
        """
        rule = self._rules.get(domain)
        if rule is None:
            rule = self._rule(domain)
            if len(self._rules) >= self._max_cache:
                self._rules.clear()
            self._rules[domain] = rule
        return rule

    def _rule(self, domain: str) -> tuple[str, Target | None, str]:
        try:
            address = literal_address(domain)
            name = normalise_domain(domain)
        except ValueError as e:
            raise NoRoute(domain, str(e), permanent=True) from None
        if address is not None:
            rule = "domain literal: the address itself at the IANA port (RFC 3340 §3.1)"
            return name, Target(address, self._default_port, address, "literal"), rule
        static = self._static_route(name)
        if static is not None:
            key, hop = static
            target = Target(hop.host, hop.port, hop.tls_name or name, "static")
            return name, target, f"static route {key!r} -> {hop}"
        if self._smart_host is not None:
            hop = self._smart_host
            target = Target(hop.host, hop.port, hop.tls_name or hop.host, "smart-host")
            return name, target, f"smart host {hop}"
        return name, None, f"SRV lookup of {self._service}.{name} (RFC 3340 §3.1, RFC 2782)"

    def _static_route(self, name: str) -> tuple[str, _Hop] | None:
        """The static route for ``name``: an exact key, else the nearest ``.parent`` key."""
        if name in self._static:
            return name, self._static[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            key = "." + ".".join(labels[i:])
            if key in self._static:
                return key, self._static[key]
        return None

    def _targets(self, name: str, answer: _Answer) -> list[Target]:
        if answer.reason is not None:
            raise NoRoute(name, answer.reason, answer.permanent)
        if not answer.records:
            return [Target(name, self._default_port, name, "implicit")]
        usable = [r for r in answer.records if r.target]
        return [Target(r.target, r.port, name, "srv") for r in _rfc2782_order(usable, self._rng)]

    def _fresh(self, name: str) -> _Answer | None:
        answer = self._cache.get(name)
        if answer is None or answer.expires <= self._clock.seconds():
            return None
        self._cache.move_to_end(name)  # least recently used goes first when full
        return answer

    def _answer(self, name: str) -> Deferred[_Answer]:
        """The cached answer for ``name`` or, joining any lookup already under way, a new one."""
        cached = self._fresh(name)
        if cached is not None:
            return defer.succeed(cached)
        waiting = self._pending.get(name)
        first = waiting is None
        if waiting is None:
            waiting = self._pending[name] = []

        def leave(d: Deferred[_Answer]) -> None:
            # One data giving up (its delivery deadline) stops waiting alone: the lookup
            # goes on for the others, and later data, and its answer is cached. A canceller
            # of our own rather than none, so that the Deferred is let go of now, not
            # when the lookup ends; _settle skips it if it is already being settled.
            if self._pending.get(name) is waiting:
                waiting.remove(d)

        d: Deferred[_Answer] = Deferred(leave)
        waiting.append(d)
        if first:  # not "the only one waiting": those before it may all have left
            self._take_turn(name)
        return d

    def _take_turn(self, name: str) -> None:
        """Look ``name`` up now if fewer than max_lookups are under way, else when one
        ends - unless max_waiting wait already, or its turn is query_timeout away."""
        lookups = self._lookups
        if not lookups.tokens and len(lookups.waiting) >= self._max_waiting:
            self._settle(self._too_many(name), name)
            return
        turn = lookups.acquire()
        if not turn.called:
            turn.addTimeout(self._query_timeout, self._clock)
        turn.addCallbacks(
            self._start_lookup, self._no_turn, callbackArgs=(name,), errbackArgs=(name,)
        ).addBoth(self._settle, name)

    def _start_lookup(self, _turn: object, name: str) -> Deferred[_Answer]:
        def done(result: _Answer | Failure) -> _Answer | Failure:
            self._lookups.release()
            return result

        return defer.ensureDeferred(self._lookup(name)).addBoth(done)

    def _no_turn(self, failure: Failure, name: str) -> _Answer:
        failure.trap(defer.TimeoutError)
        # It did wait: what kept it waiting is lookups that take that long, not a queue
        # too long to join (_too_many).
        reason = (
            f"no DNS lookup slot within {self._query_timeout:g} s: "
            f"{self._lookups.limit} lookups under way"
        )
        return self._failure(name, reason, False)

    def _too_many(self, name: str) -> _Answer:
        # Our resolver's trouble, not the domain's: temporary, and not cached.
        return self._failure(name, "DNS lookup failed: too many lookups waiting", False)

    def _settle(self, result: _Answer | Failure, name: str) -> None:
        if isinstance(result, Failure):
            # A bug, not DNS (_lookup turns DNS errors into answers): fail these deliveries
            # for now rather than leave them waiting forever.
            log.failure(
                "routing lookup for {domain} crashed",
                result,
                domain=name,
                event="apex.internal-error",
            )
            result = _Answer((), "internal error in the router", False, self._clock.seconds())
        self._cache.pop(name, None)
        if result.expires > self._clock.seconds():
            self._cache[name] = result
            while len(self._cache) > self._max_cache:
                self._cache.popitem(last=False)
        for d in self._pending.pop(name):
            if not d.called:  # given up on by a callback of one before it
                d.callback(result)

    async def _lookup(self, name: str) -> _Answer:
        """Ask DNS: the SRV set of RFC 2782 ("Usage rules"), else the implicit route."""
        qname = f"{self._service}.{name}"
        try:
            answers, _authority, _additional = await self._ask(self._dns().lookupService, qname)
        except Exception as e:
            if not _nonexistent(e):
                return self._failure(name, _dns_reason(e, qname), permanent=False)
            # NXDOMAIN for the SRV name: no SRV records, whether or not the domain exists.
            answers = []
        records = tuple(
            _ServiceRecord(
                rr.payload.priority,
                rr.payload.weight,
                rr.payload.port,
                # A target that is no host name just fails to resolve when connecting.
                rr.payload.target.name.decode("ascii", "replace").rstrip(".").lower(),
                rr.ttl,
            )
            for rr in answers
            if rr.type == dns.SRV
        )
        if not records:
            return await self._implicit(name)
        now = self._clock.seconds()
        if not any(r.target for r in records):
            # RFC 2782: a single record with target "." means the service is decidedly not
            # available; a set of nothing but such records can mean nothing else.
            return self._failure(name, "service not available (SRV target '.')", True, records)
        return _Answer(records, None, False, now + min(r.ttl for r in records))

    async def _implicit(self, name: str) -> _Answer:
        """No SRV records: the domain itself, if it has address records (like mail's
        implicit MX, RFC 5321 §5.1), so that a misspelt domain fails now, permanently,
        instead of as a connection failure retried for days."""
        resolver = self._dns()
        # Both queries are started before either is awaited, so they run in parallel; each
        # is awaited, whatever became of the other.
        queries = [
            self._ask(resolver.lookupAddress, name),
            self._ask(resolver.lookupIPV6Address, name),
        ]
        found = False
        errors: list[Exception] = []
        for query in queries:
            try:
                answers, _authority, _additional = await query
            except Exception as e:
                errors.append(e)
                continue
            # A CNAME counts: the connector's own resolution follows it.
            found = found or any(rr.type in (dns.A, dns.AAAA, dns.CNAME) for rr in answers)
        if found:
            return _Answer((), None, False, self._clock.seconds() + self._negative_ttl)
        transient = [e for e in errors if not _nonexistent(e)]
        if transient:
            return self._failure(name, _dns_reason(transient[0], name), permanent=False)
        if len(errors) == len(queries):
            return self._failure(name, "no such domain", permanent=True)
        return self._failure(name, "no SRV and no address records", permanent=True)

    def _ask(self, lookup: Callable[[str], Deferred[Any]], qname: str) -> Deferred[Any]:
        """``lookup(qname)``, failing with :class:`_NotAsked` rather than raising when the
        query cannot be sent, and with a TimeoutError after ``query_timeout``."""
        try:
            query = lookup(qname)
        except Exception as e:
            return defer.fail(_NotAsked(e))
        if query.called:
            return query  # answered at once (a hosts file, a cache): nothing to time
        answer: Deferred[Any] = Deferred()

        def give_up() -> None:
            answer.errback(defer.TimeoutError(f"no answer for {qname}"))

        timer = self._clock.callLater(self._query_timeout, give_up)

        def answered(result: object) -> None:
            # Consumed here in any case: a query given up on must not end, later, as an
            # "Unhandled error in Deferred".
            if timer.active():
                timer.cancel()
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)

        query.addBoth(answered)
        return answer

    def _failure(
        self,
        name: str,
        reason: str,
        permanent: bool,
        records: tuple[_ServiceRecord, ...] = (),
    ) -> _Answer:
        """A failed lookup, logged once when it happens (not on each use of the cache)."""
        _log_failure(name, reason, permanent)
        ttl = self._negative_ttl if permanent else 0.0
        if records:
            # Records that say "not available" are records: kept no longer than their TTL.
            ttl = min(ttl, min(r.ttl for r in records))
        return _Answer(records, reason, permanent, self._clock.seconds() + ttl)

    def _dns(self) -> IResolver:
        # Made on first use: createResolver reads resolv.conf and schedules re-reads of it,
        # which a router with only static routes or a smart host has no use for.
        if self._resolver is None:
            self._resolver = createResolver()
        return self._resolver


def _log_failure(domain: str, reason: str, permanent: bool) -> None:
    log.warn(
        "no route to {domain}: {reason}",
        domain=domain,
        reason=reason,
        permanent=permanent,
        event="apex.route-failed",
    )


def _parse_hop(value: str, default_port: int) -> _Hop:
    """``host``, ``host:port`` or ``[IPv6]:port``, then optionally ``=tlsname``."""
    hostport, has_name, tls_name = value.strip().partition("=")
    if hostport.startswith("["):
        inner, _bracket, rest = hostport[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("expected [IPv6]:port")
        try:
            host = str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"{inner!r} is not an IPv6 address") from None
        colon, port_text = rest[:1], rest[1:]
    elif hostport.count(":") == 1:
        host_text, colon, port_text = hostport.partition(":")
        host = _host(host_text)
    else:
        host, colon, port_text = _host(hostport), "", ""
    if not colon:
        port = default_port
    elif port_text.isascii() and port_text.isdigit():
        port = int(port_text)
    else:
        # "host:" is more likely a port left out by mistake than a wish for the default.
        raise ValueError(f"port {port_text!r} is not a number")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return _Hop(host, port, _host(tls_name) if has_name else None)


def _host(text: str) -> str:
    """An IP address or a host name, in normal form."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        if is_literal(text):  # normalise_domain would take it, but it is no host name
            raise ValueError(f"{text!r} is not a host name or address") from None
        return normalise_domain(text)


def _rfc2782_order(records: Sequence[_ServiceRecord], rng: random.Random) -> list[_ServiceRecord]:
    """Order ``records`` as RFC 2782 ("The format of the SRV RR", Priority and Weight) says:
    ascending priority; within one priority, repeated weighted random selection.

    The RFC draws from 0..sum inclusive and takes the first record whose running sum is at
    least the draw, weight-0 records placed first: a draw of 0 is their "very small chance".
    When no weight-0 record is left we draw from 1..sum instead, because a 0 would otherwise
    land on the first record and skew the split the weights ask for by 1/(sum+1).
    """
    ordered: list[_ServiceRecord] = []
    for priority in sorted({r.priority for r in records}):
        unordered = [r for r in records if r.priority == priority]
        # "In any order": random, so that records of equal weight (all 0, say) share the load.
        rng.shuffle(unordered)
        unordered.sort(key=lambda r: r.weight != 0)  # stable: weight 0 first, still shuffled
        while unordered:
            total = sum(r.weight for r in unordered)
            draw = rng.randint(0 if unordered[0].weight == 0 else 1, total)
            running = 0
            for index, record in enumerate(unordered):
                running += record.weight
                if running >= draw:
                    ordered.append(unordered.pop(index))
                    break
    return ordered


def _nonexistent(e: Exception) -> bool:
    """NXDOMAIN, from a server (DNSNameError) or from a local authority."""
    return isinstance(e, dns_error.DNSNameError | dns_error.AuthoritativeDomainError)


_LOOKUP_FAILED = "DNS lookup failed: "


def _dns_reason(e: Exception, qname: str) -> str:
    if isinstance(e, _NotAsked):
        # Our side's trouble (out of sockets, say), not the domain's: temporary.
        cause = e.cause
        socket_error = getattr(cause, "socketError", None)
        if isinstance(socket_error, OSError) and socket_error.strerror:
            detail = socket_error.strerror
        else:
            detail = str(cause) or type(cause).__name__
        return f"{_LOOKUP_FAILED}cannot query {qname}: {detail}"
    if isinstance(e, defer.TimeoutError):
        return f"DNS timeout looking up {qname}"
    if isinstance(e, dns_error.DNSServerError):
        return f"DNS server failure (SERVFAIL) looking up {qname}"
    if isinstance(e, dns_error.DNSQueryRefusedError):
        return f"DNS query for {qname} refused"
    return f"DNS error looking up {qname}: {type(e).__name__}"


# -- connecting to a target ----------------------------------------------------------


async def open_session(
    target: Target,
    factory: IProtocolFactory,
    reactor: Any,
    *,
    timeout: float,
    resolver: IResolver | None,
) -> Any:
    """Connect to ``target``'s host, resolved through ``resolver`` when there is one.

    RFC 2782: the client looks up the SRV target's address records; they come from the
    DNS the SRV records came from, i.e. the relay's resolver (``dns_servers``), not the
    system's, which HostnameEndpoint would ask. Each address is tried in turn.
    """
    hosts = [target.host]
    if resolver is not None and not is_ip_address(target.host):
        hosts = await _addresses(resolver, target.host)
    failure: Exception | None = None
    for host in hosts:
        try:
            return await _endpoint(reactor, host, target.port, timeout).connect(factory)
        except error.ConnectingCancelledError:
            # The endpoint's word for its connect being cancelled (a delivery deadline, a
            # stop); its callers, awaiting us, expect the usual one.
            raise defer.CancelledError() from None
        except error.ConnectError as e:
            failure = e
    assert failure is not None
    raise failure


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A client endpoint for ``host``: for an address, straight to it - HostnameEndpoint
    would pass even an address through getaddrinfo in a thread, and a connect cancelled
    meanwhile would fail as a DNSLookupError rather than as cancelled."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name to resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _addresses(resolver: IResolver, host: str) -> list[str]:
    """The A then AAAA addresses of ``host``.

    :raises DNSLookupError: when there are none: why, if a lookup failed for now (a
        timeout, SERVFAIL), else that there are no records.
    """
    queries: list[Deferred[Any]] = []
    for lookup in (resolver.lookupAddress, resolver.lookupIPV6Address):
        # A query that cannot be sent (twisted.names raises then) fails like one that is
        # not answered, and leaves the other one awaited rather than orphaned.
        try:
            queries.append(lookup(host))
        except Exception as e:
            queries.append(defer.fail(_NotAsked(e)))
    results = await defer.DeferredList(queries, consumeErrors=True)
    addresses = []
    trouble: list[Exception] = []
    for ok, result in results:
        if not ok:
            if not _nonexistent(result.value):
                trouble.append(result.value)
            continue
        answers, _authority, _additional = result
        for rr in answers:
            # A CNAME chain comes with the records of its end, which are what count here.
            if rr.type == dns.A:
                addresses.append(rr.payload.dottedQuad())
            elif rr.type == dns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
    if not addresses:
        # A DNS server in trouble is no zone without records: the operator looks there.
        if not trouble:
            raise error.DNSLookupError(f"no address records for {host}")
        # DNSLookupError says "DNS lookup failed: " itself.
        raise error.DNSLookupError(_dns_reason(trouble[0], host).removeprefix(_LOOKUP_FAILED))
    return addresses
