"""A real twisted.names DNS server on loopback, serving records that the test sets.

Usage, through the ``dns_server`` fixture (registered in conftest.py)::

    async def test_x(dns_server):
        dns_server.set("_apex-mesh._tcp.a.test", srv(10, 1, 912, "relay.a.test"))
        dns_server.set("a.test", a("192.0.2.1"))
        resolver = dns_server.resolver()          # twisted.names.client.Resolver -> this server
        ...
        dns_server.set("a.test")                  # no records at the name: NXDOMAIN again
        dns_server.fail("b.test")                 # SERVFAIL for queries of exactly b.test
        await dns_server.stop()                   # silence: queries now time out

The server is authoritative for one zone (``test.`` by default): a name inside it without
records gets NXDOMAIN, a name with records but none of the asked type gets an empty answer
(NODATA) with the SOA, as a real authoritative server answers. Records can be changed at any
time; every query sees the current set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.interfaces import IListeningPort
from twisted.names import authority, client, dns, server
from twisted.names import error as dns_error

__all__ = ["DNSServer", "SlowResolver", "a", "aaaa", "dns_server", "srv", "start_dns_server"]

# Asked again once: a host that steals the CPU for a while must not turn an answer on
# loopback into a lookup failure. Tests of DNS timeouts give a short one of their own.
DEFAULT_TIMEOUT = (1.0, 3.0)


def srv(priority: int, weight: int, port: int, target: str, ttl: int = 300) -> dns.Record_SRV:
    """An SRV record (RFC 2782); ``target="."`` says the service is not available."""
    # The root is the empty name; Twisted's text-to-name conversion refuses ".".
    return dns.Record_SRV(priority, weight, port, b"" if target == "." else target, ttl=ttl)


def a(address: str, ttl: int = 300) -> dns.Record_A:
    return dns.Record_A(address, ttl=ttl)


def aaaa(address: str, ttl: int = 300) -> dns.Record_AAAA:
    return dns.Record_AAAA(address, ttl=ttl)


class Zone(authority.FileAuthority):
    """An in-memory authority whose records the test edits while it is being served.

    FileAuthority holds the answering logic (NXDOMAIN vs. NODATA, SOA in empty answers);
    ``loadFile`` is its hook for filling ``soa`` and ``records``, here from nothing.
    """

    def loadFile(self, filename: str) -> None:
        # FileAuthority passes its constructor argument through: here, the zone's origin.
        origin = filename.encode("ascii")
        self.soa = (
            origin,
            dns.Record_SOA(
                mname=b"ns." + origin,
                rname=b"hostmaster." + origin,
                serial=1,
                minimum=60,
                expire=60,
                ttl=60,
            ),
        )
        self.records = {}


class _Factory(server.DNSServerFactory):
    """Answers SERVFAIL for the names in ``failing`` before the zone is consulted.

    The stock factory logs an error for every SERVFAIL it produces, which is noise for a
    failure the test asked for.
    """

    def __init__(self, zone: Zone) -> None:
        super().__init__(authorities=[zone])
        self.failing: set[bytes] = set()

    def handleQuery(self, message, protocol, address):
        if message.queries and message.queries[0].name.name.lower() in self.failing:
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().handleQuery(message, protocol, address)


class DNSServer:
    """A running server: UDP and TCP on the same loopback port."""

    def __init__(self, zone: Zone, factory: _Factory, udp: IListeningPort, tcp: IListeningPort):
        self.zone = zone
        self._factory = factory
        self._ports = [udp, tcp]
        self.port: int = udp.getHost().port

    def set(self, name: str, *records: dns.IEncodableRecord) -> None:
        """Make ``records`` the complete set at ``name``; no records removes the name."""
        key = dns.domainString(name).lower()
        if records:
            self.zone.records[key] = list(records)
        else:
            self.zone.records.pop(key, None)

    def fail(self, name: str, failing: bool = True) -> None:
        """Answer SERVFAIL to every query for ``name`` (or stop doing so)."""
        key = dns.domainString(name).lower()
        if failing:
            self._factory.failing.add(key)
        else:
            self._factory.failing.discard(key)

    def resolver(self, timeout: Sequence[float] = DEFAULT_TIMEOUT) -> client.Resolver:
        """A non-caching stub resolver that asks only this server."""
        return client.Resolver(servers=[("127.0.0.1", self.port)], timeout=tuple(timeout))

    async def stop(self) -> None:
        """Stop listening; later queries to :attr:`port` go unanswered and time out."""
        ports, self._ports = self._ports, []
        for port in ports:
            await port.stopListening()


def start_dns_server(
    records: Mapping[str, Iterable[dns.IEncodableRecord]] | None = None, origin: str = "test"
) -> DNSServer:
    """Start a server authoritative for ``origin`` with ``records`` (name -> records)."""
    zone = Zone(origin)
    factory = _Factory(zone)
    # TCP must share the UDP port number, since a resolver has one port per server (it
    # retries over TCP when a UDP answer is truncated); a taken TCP port means try again.
    for _attempt in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
        except error.CannotListenError:
            udp.stopListening()
            continue
        dns_server = DNSServer(zone, factory, udp, tcp)
        for name, rrs in (records or {}).items():
            dns_server.set(name, *rrs)
        return dns_server
    raise RuntimeError("no loopback port free for both UDP and TCP")


@pytest_twisted.async_yield_fixture
async def dns_server():
    """A :class:`DNSServer` for the ``test.`` zone, empty to begin with, stopped afterwards."""
    running = start_dns_server()
    yield running
    await running.stop()


class SlowResolver:
    """A resolver whose queries wait until the test answers them, in the order they were
    asked, as a slow DNS server's do - or for ever, as a black hole's; it counts the
    queries under way, each of which would hold a UDP socket in twisted.names."""

    def __init__(self) -> None:
        self.waiting: list[tuple[str, defer.Deferred]] = []
        self.asked: list[str] = []
        self.most = 0

    def _query(self, name: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.asked.append(name)
        self.waiting.append((name, d))
        self.most = max(self.most, len(self.waiting))
        return d

    lookupService = lookupAddress = lookupIPV6Address = _query

    def answer_all(self) -> None:
        """NXDOMAIN for every query under way."""
        while self.waiting:
            name, d = self.waiting.pop(0)
            d.errback(dns_error.DNSNameError(name))

    def answer_srv(self, target: str) -> None:
        """The oldest query under way answered with one SRV record naming ``target``."""
        name, d = self.waiting.pop(0)
        record = dns.Record_SRV(0, 0, 912, target)
        d.callback(([dns.RRHeader(name, dns.SRV, payload=record, ttl=300)], [], []))
