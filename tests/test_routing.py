"""Next-hop selection (RFC 3340 §3.1, RFC 2782, RFC 6125 §6.2.1) against a real DNS server."""

from __future__ import annotations

import errno
import gc
import io
import random
from collections import Counter

import pytest
import pytest_twisted
from dnsserver import SlowResolver, a, aaaa, srv
from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher, textFileLogObserver
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure

from imxp.apex.routing import (
    EDGE_PORT,
    EDGE_SERVICE,
    MAX_LOOKUPS,
    MESH_PORT,
    QUERY_TIMEOUT,
    NoRoute,
    Router,
    Target,
    open_session,
)

MESH = "_apex-mesh._tcp."


class NoDNS:
    """A resolver that fails the test if the router asks it anything."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the router used DNS ({name}) where no lookup was due")


class Counting:
    """Passes queries on to ``resolver`` and counts the SRV ones."""

    def __init__(self, resolver) -> None:
        self.resolver = resolver
        self.srv_queries: list[str] = []

    def lookupService(self, name: str):
        self.srv_queries.append(name)
        return self.resolver.lookupService(name)

    def __getattr__(self, name: str):
        return getattr(self.resolver, name)


def dns_router(dns_server, **kwargs) -> Router:
    kwargs.setdefault("clock", task.Clock())
    return Router(resolver=dns_server.resolver(timeout=(0.2,)), **kwargs)


async def no_route(router: Router, domain: str) -> NoRoute:
    with pytest.raises(NoRoute) as caught:
        await router.route(domain)
    assert caught.value.domain == domain
    return caught.value


def hosts(targets: list[Target]) -> list[str]:
    return [t.host for t in targets]


# -- domain literals ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ipv4_literal_goes_to_the_address_at_the_iana_port():
    router = Router(resolver=NoDNS())
    assert await router.route("[192.0.2.1]") == [
        Target("192.0.2.1", MESH_PORT, "192.0.2.1", "literal")
    ]


@pytest_twisted.ensureDeferred
async def test_ipv6_literal_on_the_edge_service_uses_the_edge_port():
    router = Router(service=EDGE_SERVICE, default_port=EDGE_PORT, resolver=NoDNS())
    assert await router.route("[IPv6:2001:DB8:0::1]") == [
        Target("2001:db8::1", EDGE_PORT, "2001:db8::1", "literal")
    ]


@pytest_twisted.ensureDeferred
async def test_literal_beats_smart_host():
    router = Router(smart_host="smart.example:1912", resolver=NoDNS())
    [target] = await router.route("[198.51.100.7]")
    assert target.source == "literal"


@pytest.mark.parametrize(
    "domain",
    [
        "[300.1.2.3]",  # not an address
        "[2001:db8::1]",  # IPv6 needs the "IPv6:" tag (RFC 5321 §4.1.3)
        "[192.0.2.1",
        "bad_name.test",
        "a..test",
        "-a.test",
        "",
        "x" * 64 + ".test",
        "192.0.2.1",  # an address without brackets is not a domain
    ],
)
@pytest_twisted.ensureDeferred
async def test_invalid_domain_is_a_permanent_no_route(domain):
    router = Router(resolver=NoDNS(), smart_host="smart.example")
    with capturedLogs() as events:
        failure = await no_route(router, domain)
    assert failure.permanent
    [event] = [e for e in events if e.get("event") == "apex.route-failed"]
    assert event["domain"] == domain
    assert event["permanent"] is True


# -- static routes and the smart host ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_static_route_exact_match_ignores_case_and_trailing_dot():
    router = Router(static_routes={"B.Test": "GW.Example:2912"}, resolver=NoDNS())
    # RFC 6125 §6.2.1: the relay reached must prove the destination domain.
    assert await router.route("b.TEST.") == [Target("gw.example", 2912, "b.test", "static")]


@pytest_twisted.ensureDeferred
async def test_static_route_for_subdomains():
    router = Router(
        static_routes={".corp.test": "gw.corp.test", ".eu.corp.test": "eu-gw.corp.test:1000"},
        smart_host="smart.example",
        resolver=NoDNS(),
    )
    assert await router.route("x.y.corp.test") == [
        Target("gw.corp.test", MESH_PORT, "x.y.corp.test", "static")
    ]
    # The nearest parent wins.
    [eu] = await router.route("paris.eu.corp.test")
    assert (eu.host, eu.port) == ("eu-gw.corp.test", 1000)
    # ".corp.test" is for the subdomains only; corp.test itself falls through.
    [own] = await router.route("corp.test")
    assert own.source == "smart-host"


@pytest_twisted.ensureDeferred
async def test_static_route_with_tls_name_and_ipv6_host():
    router = Router(
        static_routes={"a.test": "[2001:db8::5]:1912=gw.example", "b.test": "192.0.2.9"},
        resolver=NoDNS(),
    )
    assert await router.route("a.test") == [Target("2001:db8::5", 1912, "gw.example", "static")]
    assert await router.route("b.test") == [Target("192.0.2.9", MESH_PORT, "b.test", "static")]


def test_new_routes_take_over_from_the_next_data_and_a_bad_one_changes_nothing():
    """A reload (SIGHUP) hands the router the routes the file now has: a domain it has
    already routed goes the new way, not the way remembered for it."""
    router = Router(static_routes={"b.test": "old.example"}, resolver=NoDNS())
    assert router.known("b.test") == [Target("old.example", MESH_PORT, "b.test", "static")]
    router.use_routes({"b.test": "new.example:1912"}, "smart.example")
    assert router.known("b.test") == [Target("new.example", 1912, "b.test", "static")]
    [smart] = router.known("c.test") or []
    assert smart.source == "smart-host"
    with pytest.raises(ValueError, match=r"static route 'd\.test'"):
        router.use_routes({"b.test": "other.example", "d.test": "bad host:x"}, None)
    assert router.known("b.test") == [Target("new.example", 1912, "b.test", "static")]
    assert router.known("c.test") == [smart]


@pytest_twisted.ensureDeferred
async def test_smart_host_takes_what_has_no_static_route():
    router = Router(
        static_routes={"a.test": "relay.a.test"},
        smart_host="Smart.Example:1912",
        resolver=NoDNS(),
    )
    assert await router.route("elsewhere.test") == [
        Target("smart.example", 1912, "smart.example", "smart-host")
    ]
    [static] = await router.route("a.test")
    assert static.source == "static"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"static_routes": {"*": "smart.example"}},
        {"static_routes": {"a.test": "gw.example:0"}},
        {"static_routes": {"a.test": "gw.example:http"}},
        {"static_routes": {"bad_key.test": "gw.example"}},
        {"static_routes": {"[192.0.2.1]": "gw.example"}},
        {"static_routes": {"a.test": "gw.example=[192.0.2.1]"}},
        {"static_routes": {"a.test": "[2001:db8::1]x"}},
        {"smart_host": "smart.example:99999"},
        {"smart_host": "not a host"},
    ],
)
def test_bad_configuration_is_refused(kwargs):
    with pytest.raises(ValueError):
        Router(resolver=NoDNS(), **kwargs)


# -- SRV ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_srv_record(dns_server):
    dns_server.set(MESH + "a.test", srv(10, 0, 1912, "Relay.A.test"))
    router = dns_router(dns_server)
    # The TLS name is the source domain, not the SRV target (RFC 6125 §6.2.1).
    assert await router.route("A.test") == [Target("relay.a.test", 1912, "a.test", "srv")]


@pytest_twisted.ensureDeferred
async def test_edge_router_asks_for_the_edge_service(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "mesh.a.test"))
    dns_server.set("_apex-edge._tcp.a.test", srv(0, 0, 913, "edge.a.test"))
    router = dns_router(dns_server, service=EDGE_SERVICE, default_port=EDGE_PORT)
    assert hosts(await router.route("a.test")) == ["edge.a.test"]


@pytest_twisted.ensureDeferred
async def test_international_domain_is_looked_up_as_a_labels(dns_server):
    dns_server.set(MESH + "xn--bcher-kva.test", srv(0, 0, 912, "relay.xn--bcher-kva.test"))
    router = dns_router(dns_server)
    [target] = await router.route("Bücher.test")
    assert target.tls_name == "xn--bcher-kva.test"


@pytest_twisted.ensureDeferred
async def test_priorities_are_tried_in_ascending_order(dns_server):
    dns_server.set(
        MESH + "a.test",
        srv(20, 5, 912, "third.a.test"),
        srv(10, 5, 912, "first-a.a.test"),
        srv(30, 0, 912, "last.a.test"),
        srv(10, 5, 912, "first-b.a.test"),
    )
    router = dns_router(dns_server, rng=random.Random(1))
    firsts = set()
    for _ in range(50):
        order = hosts(await router.route("a.test"))
        assert sorted(order[:2]) == ["first-a.a.test", "first-b.a.test"]
        assert order[2:] == ["third.a.test", "last.a.test"]
        firsts.add(order[0])
    # Equal weights within a priority share the first place.
    assert firsts == {"first-a.a.test", "first-b.a.test"}


@pytest_twisted.ensureDeferred
async def test_weights_split_first_choices_in_proportion(dns_server):
    dns_server.set(MESH + "a.test", srv(10, 3, 912, "big.a.test"), srv(10, 1, 912, "small.a.test"))
    router = dns_router(dns_server, rng=random.Random(2782))
    firsts = Counter()
    for _ in range(4000):
        order = hosts(await router.route("a.test"))
        assert sorted(order) == ["big.a.test", "small.a.test"]
        firsts[order[0]] += 1
    # 3:1 asks for 75 % (standard deviation about 0.7 % at this count).
    assert 0.72 < firsts["big.a.test"] / 4000 < 0.78


@pytest_twisted.ensureDeferred
async def test_weight_zero_records_are_kept_but_rarely_first(dns_server):
    dns_server.set(
        MESH + "a.test",
        srv(10, 30, 912, "heavy.a.test"),
        srv(10, 10, 912, "light.a.test"),
        srv(10, 0, 912, "zero.a.test"),
    )
    router = dns_router(dns_server, rng=random.Random(3))
    firsts = Counter()
    for _ in range(4000):
        order = hosts(await router.route("a.test"))
        assert sorted(order) == ["heavy.a.test", "light.a.test", "zero.a.test"]
        firsts[order[0]] += 1
    # RFC 2782: "a very small chance"; here 1 in 41 draws (0..40).
    assert 0 < firsts["zero.a.test"] < 4000 * 0.05
    assert firsts["heavy.a.test"] > 2.5 * firsts["light.a.test"]


@pytest_twisted.ensureDeferred
async def test_all_weights_zero_share_the_load(dns_server):
    dns_server.set(MESH + "a.test", *(srv(0, 0, 912, f"r{i}.a.test") for i in range(3)))
    router = dns_router(dns_server, rng=random.Random(4))
    firsts = Counter()
    for _ in range(3000):
        firsts[(await router.route("a.test"))[0].host] += 1
    assert all(800 < n < 1200 for n in firsts.values()), firsts
    assert len(firsts) == 3


@pytest_twisted.ensureDeferred
async def test_srv_root_target_means_service_not_available(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 0, "."))
    dns_server.set("a.test", a("192.0.2.1"))  # an address does not bring the service back
    router = dns_router(dns_server)
    failure = await no_route(router, "a.test")
    assert failure.permanent
    assert "not available" in failure.reason


@pytest_twisted.ensureDeferred
async def test_root_target_among_others_is_skipped(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 0, "."), srv(5, 0, 912, "relay.a.test"))
    router = dns_router(dns_server)
    assert hosts(await router.route("a.test")) == ["relay.a.test"]


# -- no SRV records ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_srv_records_means_the_domain_itself(dns_server):
    dns_server.set("a.test", a("192.0.2.1"))
    dns_server.set("b.test", aaaa("2001:db8::2"))
    router = dns_router(dns_server)
    assert await router.route("a.test") == [Target("a.test", MESH_PORT, "a.test", "implicit")]
    assert await router.route("b.test") == [Target("b.test", MESH_PORT, "b.test", "implicit")]


@pytest_twisted.ensureDeferred
async def test_srv_name_with_other_records_only_is_no_srv(dns_server):
    # NODATA (the name exists, no SRV) rather than NXDOMAIN: the same fallback.
    dns_server.set(MESH + "a.test", a("192.0.2.99"))
    dns_server.set("a.test", a("192.0.2.1"))
    router = dns_router(dns_server)
    [target] = await router.route("a.test")
    assert target.source == "implicit"


@pytest_twisted.ensureDeferred
async def test_nonexistent_domain_is_permanent(dns_server):
    router = dns_router(dns_server)
    failure = await no_route(router, "nowhere.test")
    assert failure.permanent
    assert failure.reason == "no such domain"


@pytest_twisted.ensureDeferred
async def test_domain_without_srv_or_address_is_permanent(dns_server):
    dns_server.set("a.test", srv(0, 0, 25, "mail.a.test"))  # exists, but nothing to reach
    router = dns_router(dns_server)
    assert (await no_route(router, "a.test")).permanent


# -- DNS trouble -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dns_timeout_is_temporary(dns_server):
    router = dns_router(dns_server)
    await dns_server.stop()
    with capturedLogs() as events:
        failure = await no_route(router, "a.test")
    assert not failure.permanent
    assert "timeout" in failure.reason
    [event] = [e for e in events if e.get("event") == "apex.route-failed"]
    assert (event["domain"], event["permanent"]) == ("a.test", False)


@pytest_twisted.ensureDeferred
async def test_servfail_is_temporary_and_not_cached(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test"))
    dns_server.fail(MESH + "a.test")
    router = dns_router(dns_server)
    failure = await no_route(router, "a.test")
    assert not failure.permanent
    assert "SERVFAIL" in failure.reason
    dns_server.fail(MESH + "a.test", failing=False)
    # No clock advance needed: DNS trouble is not remembered.
    assert hosts(await router.route("a.test")) == ["relay.a.test"]


@pytest_twisted.ensureDeferred
async def test_servfail_on_the_address_check_is_temporary(dns_server):
    dns_server.fail("a.test")
    router = dns_router(dns_server)
    assert not (await no_route(router, "a.test")).permanent


@pytest_twisted.ensureDeferred
async def test_a_crash_in_the_lookup_fails_the_route_temporarily():
    class Garbled:
        """Answers an SRV query with a record that has no SRV payload."""

        def lookupService(self, name: str):
            return defer.succeed(([dns.RRHeader(name, dns.SRV, payload=None)], [], []))

    router = Router(resolver=Garbled(), clock=task.Clock())
    with capturedLogs() as events:
        failure = await no_route(router, "a.test")
        assert not failure.permanent
        # Not cached: the next delivery asks again (and, here, crashes again).
        assert not (await no_route(router, "a.test")).permanent
    assert len([e for e in events if e.get("log_failure") is not None]) == 2


# -- many domains at once ----------------------------------------------------------------


def failed_with(failure, kind):
    """An errback: the exception of ``kind`` as the result."""
    failure.trap(kind)
    return failure.value


class OutOfSockets:
    """twisted.names out of file descriptors half way through a lookup: the SRV query
    is answered (NXDOMAIN), the A query goes out, and the AAAA query cannot be sent -
    Resolver.lookupIPV6Address raises CannotListenError (EMFILE) instead of returning."""

    def __init__(self) -> None:
        self.a_queries: list[tuple[str, defer.Deferred]] = []

    def lookupService(self, name: str) -> defer.Deferred:
        return defer.fail(dns_error.DNSNameError(name))

    def lookupAddress(self, name: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.a_queries.append((name, d))
        return d

    def lookupIPV6Address(self, name: str) -> defer.Deferred:
        raise error.CannotListenError("", 0, OSError(errno.EMFILE, "Too many open files"))


def test_many_domains_at_once_are_looked_up_a_bounded_number_at_a_time():
    """One data may name a thousand domains, each an SRV, an A and an AAAA query: with a
    socket per query they ran out the relay's file descriptors. Now at most MAX_LOOKUPS
    domains are looked up at once (two queries each at most), the others waiting their
    turn; each still ends in its answer, which is cached."""
    slow = SlowResolver()
    clock = task.Clock()
    router = Router(resolver=slow, clock=clock)
    domains = [f"d{i}.nowhere.test" for i in range(10 * MAX_LOOKUPS)]
    routes = [router.route(d).addErrback(failed_with, NoRoute) for d in domains]

    assert len(slow.waiting) == MAX_LOOKUPS
    assert not any(r.called for r in routes)
    slow.answer_all()

    assert slow.most <= 2 * MAX_LOOKUPS
    assert len(slow.asked) == 3 * len(domains)  # SRV, A, AAAA: each domain once
    for domain, d in zip(domains, routes, strict=True):
        assert isinstance(d.result, NoRoute)
        assert (d.result.domain, d.result.reason, d.result.permanent) == (
            domain,
            "no such domain",
            True,
        )
    # The negative answers are cached (negative_ttl), and no timer is left behind.
    with pytest.raises(NoRoute):
        router.known(domains[0])
    assert len(slow.asked) == 3 * len(domains)
    assert clock.getDelayedCalls() == []


def test_lookups_waiting_for_their_turn_are_bounded_and_one_domain_waits_once():
    """Behind a resolver that never answers, the domains of data that kept coming waited
    for a turn without bound, in number and in time. Beyond ``max_waiting`` a domain is a
    temporary no route at once, logged once; data for a domain already waiting share its
    lookup and are not counted again."""
    slow = SlowResolver()
    clock = task.Clock()
    router = Router(resolver=slow, clock=clock, max_lookups=2, max_waiting=3)
    with capturedLogs() as events:
        let_in = [router.route(f"d{i}.nowhere.test") for i in range(5)]  # 2 asked, 3 waiting
        again = router.route("d4.nowhere.test")
        refused = router.route("d5.nowhere.test").addErrback(failed_with, NoRoute)

    assert refused.called, "a lookup waits for its turn behind max_waiting others"
    assert not refused.result.permanent
    assert refused.result.reason == "DNS lookup failed: too many lookups waiting"
    logged = [e for e in events if e.get("event") == "apex.route-failed"]
    assert [(e["domain"], e["permanent"]) for e in logged] == [("d5.nowhere.test", False)]
    assert not again.called and not any(d.called for d in let_in)
    assert slow.asked == [MESH + "d0.nowhere.test", MESH + "d1.nowhere.test"]

    slow.answer_all()  # each ends in its answer, the waiting ones asked in turn
    for d in [*let_in, again]:
        assert isinstance(d.addErrback(failed_with, NoRoute).result, NoRoute)
        assert d.result.reason == "no such domain"
    assert len(slow.asked) == 3 * 5


def test_no_lookup_waits_for_its_turn_longer_than_query_timeout():
    """A resolver slow enough that lookups take longer than QUERY_TIMEOUT (here each query
    answered just in time) kept the domains waiting behind them for many turns: a lookup
    that has not had its turn after QUERY_TIMEOUT is a temporary no route."""
    slow = SlowResolver()
    clock = task.Clock()
    router = Router(resolver=slow, clock=clock, max_lookups=1)
    first = router.route("first.nowhere.test").addErrback(failed_with, NoRoute)
    second = router.route("second.nowhere.test").addErrback(failed_with, NoRoute)
    clock.advance(QUERY_TIMEOUT - 1)
    name, srv_query = slow.waiting.pop(0)
    srv_query.errback(dns_error.DNSNameError(name))  # just in time; A and AAAA go out
    assert slow.asked == [MESH + "first.nowhere.test"] + ["first.nowhere.test"] * 2
    assert not first.called and not second.called

    clock.advance(1)
    # Said as what happened: it waited its turn, behind lookups that took that long.
    assert second.result.reason == (
        f"no DNS lookup slot within {QUERY_TIMEOUT:g} s: 1 lookups under way"
    )
    assert not second.result.permanent
    assert MESH + "second.nowhere.test" not in slow.asked
    slow.answer_all()
    assert first.result.reason == "no such domain"
    assert clock.getDelayedCalls() == []


def test_one_caller_giving_up_leaves_the_shared_lookup_to_the_others():
    """Data for one domain share its lookup, and each gives up at its own delivery
    deadline by cancelling its route. That must end its own wait only: the lookup goes
    on, a later route joins it rather than starting another, and each caller still
    waiting gets the answer - none an AlreadyCalledError, none a second query."""
    slow = SlowResolver()
    clock = task.Clock()
    router = Router(resolver=slow, clock=clock)
    first = router.route("slow.test")
    second = router.route("slow.test").addErrback(failed_with, NoRoute)
    first.cancel()
    assert isinstance(first.result, Failure) and first.result.check(defer.CancelledError)
    first.addErrback(lambda f: None)
    third = router.route("slow.test").addErrback(failed_with, NoRoute)
    assert router.lookups() == (1, 0)
    assert slow.asked == [MESH + "slow.test"]

    slow.answer_all()
    for d in (second, third):
        assert d.result.reason == "no such domain"
    assert slow.asked == [MESH + "slow.test"] + ["slow.test"] * 2
    assert router.lookups() == (0, 0)

    # Every caller gone before the answer: the answer is still cached for later ones.
    alone = router.route("alone.test")
    alone.cancel()
    alone.addErrback(lambda f: None)
    again = router.route("alone.test").addErrback(failed_with, NoRoute)
    again.cancel()
    again.addErrback(lambda f: None)
    slow.answer_all()
    assert slow.asked.count(MESH + "alone.test") == 1
    with pytest.raises(NoRoute, match="no such domain"):
        router.known("alone.test")
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_query_that_cannot_be_sent_fails_the_route_temporarily_and_quietly():
    """twisted.names raises at once when it cannot open a socket for a query. That was
    taken for a bug of the router (a critical traceback per domain, 451 "internal error in
    the router"), and the A query started before the AAAA one failed was left to end as
    an "Unhandled error in Deferred". It is DNS failing for now: a temporary no route (451
    for the recipients), logged as one event; the A query's answer is still awaited."""
    resolver = OutOfSockets()
    router = Router(resolver=resolver, clock=task.Clock())
    domains = ["x.nowhere.test", "y.nowhere.test", "z.nowhere.test"]
    with capturedLogs() as events:
        routes = [router.route(d) for d in domains]
        for name, query in resolver.a_queries:
            query.errback(dns_error.DNSNameError(name))
            # Taken by the lookup, not left to end as an unhandled error.
            assert not isinstance(query.result, Failure)
        resolver.a_queries.clear()
        failures = []
        for d in routes:
            with pytest.raises(NoRoute) as caught:
                await d
            failures.append(caught.value)
        del routes, d, query
        gc.collect()

    for domain, failure in zip(domains, failures, strict=True):
        assert not failure.permanent
        assert failure.reason == f"DNS lookup failed: cannot query {domain}: Too many open files"
    assert not [e for e in events if e.get("log_failure") is not None]
    logged = [e for e in events if e.get("event") == "apex.route-failed"]
    assert [(e["domain"], e["permanent"]) for e in logged] == [(d, False) for d in domains]


def test_a_query_never_answered_ends_after_query_timeout():
    """twisted.names, having failed to send a query, keeps it waiting for ever, and joins
    every later query of that name to it. Such a query must not hold a lookup's place (nor
    its domain's data) for ever: it is given up after QUERY_TIMEOUT, as a DNS timeout."""
    slow = SlowResolver()
    clock = task.Clock()
    router = Router(resolver=slow, clock=clock)
    with capturedLogs() as events:
        stuck = [
            router.route(f"stuck{i}.test").addErrback(failed_with, NoRoute)
            for i in range(MAX_LOOKUPS)
        ]
        after = router.route("after.test").addErrback(failed_with, NoRoute)
        assert MESH + "after.test" not in slow.asked

        clock.advance(QUERY_TIMEOUT - 1)
        assert not any(d.called for d in stuck)
        clock.advance(1)
        for i, d in enumerate(stuck):
            assert not d.result.permanent
            assert d.result.reason == f"DNS timeout looking up {MESH}stuck{i}.test"
        # Their places went to the next domain; a query given up on may still end, unheeded.
        assert slow.asked[-1] == MESH + "after.test"
        slow.answer_all()
        assert after.result.reason == "no such domain"
        del stuck, after, d
        gc.collect()
    assert not [e for e in events if e.get("log_failure") is not None]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_query_logs_no_protocol_start_and_stop(dns_server):
    """twisted.names makes a DNSDatagramProtocol per query, and Twisted logged each one's
    start and stop at info ("Starting protocol <twisted.names.dns.DNSDatagramProtocol
    object at 0x...>", "Stopping protocol ..."): two lines of every relay's log per query,
    whatever its log_level, that say nothing an operator can use. A query that fails is
    still logged, as apex.route-failed."""
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test"))
    router = dns_router(dns_server)
    with capturedLogs() as events:
        assert hosts(await router.route("a.test")) == ["relay.a.test"]
        await no_route(router, "nowhere.test")
        # The query's port is closed on the reactor's next turn, and its protocol stopped.
        await task.deferLater(reactor, 0, lambda: None)

    texts = [formatEvent(e) for e in events]
    assert not [t for t in texts if "DNSDatagramProtocol object" in t], texts
    failed = [e for e in events if e.get("event") == "apex.route-failed"]
    assert [e["domain"] for e in failed] == ["nowhere.test"]


@pytest_twisted.ensureDeferred
async def test_a_query_writes_no_port_start_and_close_to_the_relays_log(dns_server):
    """Each DNS query opens a UDP port of its own, and Twisted's UDP port wrote two lines
    for each ("DNSDatagramProtocol starting on 41234", "(UDP Port 41234 Closed)") to the
    relay's log - twistd's text observer, whatever log_level - with nothing an operator
    can use. Gone, and only those: another UDP port's lines and the route's failure stay."""
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test"))
    router = dns_router(dns_server)
    written = io.StringIO()
    observer = textFileLogObserver(written)  # what twistd writes the relay's log with
    globalLogPublisher.addObserver(observer)
    try:
        assert hosts(await router.route("a.test")) == ["relay.a.test"]
        await no_route(router, "nowhere.test")
        other = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        number = other.getHost().port
        await other.stopListening()
        # The queries' ports are closed on the reactor's next turn.
        await task.deferLater(reactor, 0, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observer)

    lines = written.getvalue().splitlines()
    ports = [line.split("] ", 1)[1] for line in lines if "starting on" in line or "Port" in line]
    assert ports == [f"DatagramProtocol starting on {number}", f"(UDP Port {number} Closed)"]
    assert any("no route to nowhere.test" in line for line in lines), lines


# -- the cache ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_answers_are_kept_for_the_smallest_ttl_of_the_set(dns_server):
    dns_server.set(
        MESH + "a.test",
        srv(10, 0, 912, "old-1.a.test", ttl=300),
        srv(20, 0, 912, "old-2.a.test", ttl=100),
    )
    clock = task.Clock()
    router = dns_router(dns_server, clock=clock)
    assert hosts(await router.route("a.test")) == ["old-1.a.test", "old-2.a.test"]
    dns_server.set(MESH + "a.test", srv(10, 0, 912, "new.a.test"))
    clock.advance(99)
    assert hosts(await router.route("a.test")) == ["old-1.a.test", "old-2.a.test"]
    clock.advance(2)
    assert hosts(await router.route("a.test")) == ["new.a.test"]


@pytest_twisted.ensureDeferred
async def test_weighted_order_is_redrawn_from_the_cache(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 1, 912, "x.a.test"), srv(0, 1, 912, "y.a.test"))
    counting = Counting(dns_server.resolver(timeout=(0.2,)))
    router = Router(resolver=counting, clock=task.Clock(), rng=random.Random(5))
    firsts = {hosts(await router.route("a.test"))[0] for _ in range(40)}
    assert firsts == {"x.a.test", "y.a.test"}
    assert counting.srv_queries == [MESH + "a.test"]


@pytest_twisted.ensureDeferred
async def test_negative_answers_are_kept_for_negative_ttl(dns_server):
    clock = task.Clock()
    router = dns_router(dns_server, clock=clock, negative_ttl=30)
    assert (await no_route(router, "a.test")).permanent
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test"))
    clock.advance(29)
    with capturedLogs() as events:
        assert (await no_route(router, "a.test")).permanent
    # Logged when it was learnt, not again on every use of the cache.
    assert not [e for e in events if e.get("event") == "apex.route-failed"]
    clock.advance(2)
    assert hosts(await router.route("a.test")) == ["relay.a.test"]


@pytest_twisted.ensureDeferred
async def test_zero_ttl_is_not_cached(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "old.a.test", ttl=0))
    router = dns_router(dns_server)
    assert hosts(await router.route("a.test")) == ["old.a.test"]
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "new.a.test"))
    assert hosts(await router.route("a.test")) == ["new.a.test"]


@pytest_twisted.ensureDeferred
async def test_cache_is_bounded_least_recently_used_first(dns_server):
    for name in ("a", "b", "c"):
        dns_server.set(f"{MESH}{name}.test", srv(0, 0, 912, f"old.{name}.test"))
    counting = Counting(dns_server.resolver(timeout=(0.2,)))
    router = Router(resolver=counting, clock=task.Clock(), max_cache=2)
    await router.route("a.test")
    await router.route("b.test")
    await router.route("a.test")  # a is now more recently used than b
    await router.route("c.test")  # evicts b
    assert len(counting.srv_queries) == 3
    await router.route("a.test")
    assert len(counting.srv_queries) == 3
    dns_server.set(MESH + "b.test", srv(0, 0, 912, "new.b.test"))
    assert hosts(await router.route("b.test")) == ["new.b.test"]
    assert len(counting.srv_queries) == 4


@pytest_twisted.ensureDeferred
async def test_concurrent_routes_share_one_lookup(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test"))
    counting = Counting(dns_server.resolver(timeout=(0.2,)))
    router = Router(resolver=counting, clock=task.Clock())
    results = await defer.gatherResults([router.route("a.test") for _ in range(5)])
    assert [hosts(r) for r in results] == [["relay.a.test"]] * 5
    assert counting.srv_queries == [MESH + "a.test"]


# -- describe ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_describe_srv_lists_records_in_priority_order(dns_server):
    dns_server.set(
        MESH + "a.test",
        srv(20, 0, 912, "backup.a.test", ttl=600),
        srv(10, 3, 1912, "main.a.test", ttl=300),
    )
    text = await dns_router(dns_server).describe("a.test")
    assert "SRV lookup of _apex-mesh._tcp.a.test" in text
    main = "priority 10 weight 3 port 1912 target main.a.test ttl 300"
    backup = "priority 20 weight 0 port 912 target backup.a.test ttl 600"
    assert text.index(main) < text.index(backup)
    assert "main.a.test:1912, backup.a.test:912" in text
    assert "TLS name a.test" in text


@pytest_twisted.ensureDeferred
async def test_describe_says_when_the_answer_is_cached(dns_server):
    dns_server.set(MESH + "a.test", srv(0, 0, 912, "relay.a.test", ttl=300))
    clock = task.Clock()
    router = dns_router(dns_server, clock=clock)
    assert "cache" not in await router.describe("a.test")
    clock.advance(100)
    assert "from cache, 200 s left" in await router.describe("a.test")


@pytest_twisted.ensureDeferred
async def test_describe_other_rules(dns_server):
    dns_server.set(MESH + "gone.test", srv(0, 0, 0, "."))
    dns_server.set("plain.test", a("192.0.2.1"))
    router = dns_router(
        dns_server, static_routes={".corp.test": "gw.example:2912"}, smart_host=None
    )
    static = await router.describe("x.corp.test")
    assert "static route '.corp.test'" in static
    assert "gw.example:2912" in static
    assert "TLS name x.corp.test" in static
    assert "domain literal" in await router.describe("[IPv6:2001:db8::1]")
    assert "[2001:db8::1]:912" in await router.describe("[IPv6:2001:db8::1]")
    assert "implicit route to plain.test:912" in await router.describe("plain.test")
    gone = await router.describe("gone.test")
    assert "target . " in gone
    assert "no route (permanent): service not available" in gone
    assert "no route (permanent)" in await router.describe("bad_name.test")
    smart = Router(smart_host="smart.example", resolver=NoDNS())
    assert "smart host smart.example:912" in await smart.describe("a.test")


@pytest_twisted.ensureDeferred
async def test_a_connection_attempt_given_up_is_a_cancellation() -> None:
    """A delivery deadline or a stopping relay cancels an attempt still connecting.
    Twisted's endpoints report that as ConnectingCancelledError, which the peer pool took
    for a bug of its own (451 "local error in processing", a critical traceback in the
    log) - or, HostnameEndpoint while it passed even an address through getaddrinfo, as a
    DNSLookupError. open_session makes it the CancelledError whoever cancelled expects."""
    from twisted.internet import protocol, reactor

    target = Target("127.0.0.1", 9, "b.test", "static")
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    attempt = defer.ensureDeferred(open_session(target, factory, reactor, timeout=5, resolver=None))
    attempt.cancel()
    with pytest.raises(defer.CancelledError):
        await attempt


@pytest_twisted.ensureDeferred
async def test_an_address_lookup_that_fails_for_now_is_not_called_no_records(dns_server):
    """The SRV target's A and AAAA lookups failed (SERVFAIL, a timeout): the link's
    warning said "no address records for relay.a.test", which sends an operator to the
    zone when it is the DNS server that is in trouble."""
    from twisted.internet import protocol

    factory = protocol.Factory.forProtocol(protocol.Protocol)
    resolver = dns_server.resolver()
    dns_server.fail("relay.a.test")
    failing = Target("relay.a.test", 912, "a.test", "SRV")
    with pytest.raises(error.DNSLookupError) as failed:
        await open_session(failing, factory, reactor, timeout=5, resolver=resolver)
    assert str(failed.value) == (
        "DNS lookup failed: DNS server failure (SERVFAIL) looking up relay.a.test."
    )
    # A name that has none is still told as such.
    empty = Target("empty.a.test", 912, "a.test", "SRV")
    with pytest.raises(error.DNSLookupError) as failed:
        await open_session(empty, factory, reactor, timeout=5, resolver=resolver)
    assert str(failed.value) == "DNS lookup failed: no address records for empty.a.test."


@pytest_twisted.ensureDeferred
async def test_an_address_lookup_that_cannot_be_sent_says_why_once() -> None:
    """Out of sockets for the AAAA query, and the A query has no records: the reason is
    ours (the relay's descriptors), told once - not "DNS lookup failed: DNS lookup
    failed: ..."."""
    from twisted.internet import protocol

    resolver = OutOfSockets()
    target = Target("relay.a.test", 912, "a.test", "SRV")
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    attempt = defer.ensureDeferred(
        open_session(target, factory, reactor, timeout=5, resolver=resolver)
    )
    [(_, query)] = resolver.a_queries
    query.callback(([], [], []))
    with pytest.raises(error.DNSLookupError) as failed:
        await attempt
    assert str(failed.value) == (
        "DNS lookup failed: cannot query relay.a.test: Too many open files."
    )
