"""Messages/s and latency end to end through two relays over TLS, beside a ceiling.

Run by hand (not part of the tests):

    python bench/relay_chain.py [--seconds 5] [--rounds 3] [--size 1024] [--depth 64]
                                [--endpoints 5000] [--load MSGS] [--profile]
                                [--skip rss|throughput|floor]

What is measured, all in one run:

* ``chain``: endpoint -> relay A -> relay B -> endpoint. fred@a.test is attached to A and
  barney@b.test to B, each by TLS, SASL SCRAM-SHA-256 and attach; A forwards to B over a
  TLS session with both certificates checked and an APEX channel bound as a.test. Each data
  carries ``--size`` octets of content and no statusRequest, and Content-IDs and a boundary
  of its own, as a client's data do; every hop answers each data with ``ok``.
* ``floor``: the same hops with BEEP alone: sender -> pass-through 1 -> pass-through 2 ->
  receiver, each hop a BEEP session tuned to TLS as the relays' are, each pass-through
  answering every MSG with ``ok`` and sending its payload on unread as a MSG of its own. It
  is the least any relay built on :mod:`imxp.beep` can spend per data, so what the chain
  spends above it is APEX's work: reading the data, deciding, and handing it on.
* ``ceiling``: the same hops with the least Twisted can do on them: sender -> forwarder 1 ->
  forwarder 2 -> receiver, ``Int32StringReceiver`` over TLS with the same certificates and
  settings (:mod:`imxp.beep.tlsctx`, a client certificate on the middle hop as between
  relays) and, as every BEEP session, without Nagle's delay (TCP_NODELAY), ``--size``
  octets per message. Each hop acknowledges each message to the hop before it, as each
  BEEP hop answers its MSG with ``ok``.

The processes of all three chains are started first. For each chain: the highest rate -
messages arriving at the recipient per second over ``--seconds`` after a second of warm-up,
with ``--depth`` messages in flight end to end (sent and not yet arrived: see
:func:`max_rate` for why end to end) - measured ``--rounds`` times, the chains in turn, and
the share of the ceiling taken in each round (the median is reported: on a shared machine
the rate of the same code drifts by half from one minute to the next); then latency at half
the median rate: sends paced by the clock, latency from the send to the receipt at the
recipient application, p50 and p99; for the floor and the ceiling, at the relay chain's
half load too (the same rate through hops that spend less per message: the part of the
tail that is the machine's); with ``--load``, latency again at that fixed rate (a
deployment's expected load, comparable from run to run as half of a drifting maximum is
not), for each chain whose highest rate reaches it, and the CPU each process spends per
message there: at the highest rates each chain batches as many messages per read and
write as its own rate gives it, so a slower chain also pays more per message for every
wake-up, read and write; at one rate for all, the difference is each hop's own work.
Then RSS per idle attached endpoint: a fresh relay's VmRSS (read from /proc by this
process) before and after ``--endpoints`` endpoints attach, each with its own BEEP session,
TLS, SCRAM and attach (all as subaddresses of one user, so that one verifier serves them
all), divided by their number; 8 logins run at once, and the time per login is printed too
(SCRAM's 4096 PBKDF2 rounds are paid by the client).

Each measure of rate or latency also reads the share of the machine's CPU time that the
hypervisor gave to other guests meanwhile (steal, from /proc/stat; 0 on bare metal): a
process that is ready to run waits for the host, and that wait is in every latency taken
then, the ceiling's too. The table gives its median and maximum per chain.

Process layout: each relay (and each pass-through or forwarder) runs in a process of its own
and the two endpoints in this one, so three busy processes share the machine's cores for
each chain under measure - two cores on the reference machine; the other chains' sit idle -
and this process's own share (the sender's and the receiver's BEEP, TLS and bookkeeping) is
in every figure alike. Relays log at ``warn``.

Targets (issue): chain >= 20% of the ceiling; p99 < 20 ms at half load; RSS per idle
endpoint <= 50 KB. ``--profile`` prints each relay's cProfile (own time, then cumulative)
to stderr when it stops, covering the throughput and latency measures.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, endpoints, protocol, reactor, task, threads
from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from bench.procstat import CPUMeter, StealMeter
from imxp import logs
from imxp.apex import wire
from imxp.apex.service import build_relay
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import ScramSHA256Client
from imxp.beep.session import (
    Channel,
    ChannelHandler,
    Profile,
    Request,
    Role,
    Session,
    SessionFactory,
)
from imxp.beep.tls import TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.beep.users import UserStore
from imxp.certs import create_ca, issue_server, load_certificates, load_issued
from imxp.config import Config, session_config

PASSWORD = "bench password"
# The deployment defaults of imxp.config (window, idle timeout and the other limits).
SESSION = session_config(Config())
LOOPBACK = "tcp:0:interface=127.0.0.1"
ACK = b"ok"
# Where the sequence number sits in the content: fixed width, so that the sender can
# patch an encoded template instead of encoding every data afresh.
SEQ_FIELD = b"seq=%012d;"
SEQ_RE = re.compile(rb"seq=(\d{12});")
# The BEEP floor's channels: a profile of this benchmark, not of APEX.
FLOOR_URI = "http://imxp.invalid/bench/floor"


def _quiet_logs() -> None:
    """Warnings and errors to stderr. The relay's per-data info events are left out where
    they are made, as in a relay configured with ``log_level = "warn"`` (and they stay out
    of the RSS figure); Twisted's own go no further than the filter."""
    logs.set_level("warn")
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
            )
        ],
        redirectStandardIO=False,
    )


def _raise_fd_limit() -> int:
    """As many descriptors as the hard limit allows: 5,000 sessions need 5,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _profile_until_shutdown(title: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()

    def report() -> None:
        profiler.disable()
        print(f"\n=== cProfile of {title}, own time ===", file=sys.stderr)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        print(f"=== cProfile of {title}, cumulative ===", file=sys.stderr)
        stats.sort_stats("cumulative").print_stats(40)
        sys.stderr.flush()

    reactor.addSystemEventTrigger("before", "shutdown", report)


# -- the subprocesses --------------------------------------------------------------------------


def serve_relay(args: argparse.Namespace) -> None:
    """A relay for ``--domain``; prints its edge and mesh ports, runs until SIGTERM."""
    _quiet_logs()
    _raise_fd_limit()
    certdir: Path = args.certdir
    domain: str = args.domain
    routes = dict(route.split("=", 1) for route in args.route)
    service = build_relay(
        domain=domain,
        identity=load_issued(certdir / f"{domain}.pem", certdir / f"{domain}.key"),
        trust=load_certificates(certdir / "ca.pem"),
        users=UserStore(certdir / f"{domain}.users", iterations=4096),
        edge_listen=[LOOPBACK],
        mesh_listen=[LOOPBACK],
        session_config=SESSION,
        reactor=reactor,
        routes=routes,
        # Every endpoint of the RSS measure comes from 127.0.0.1.
        max_sessions_per_peer=None,
    )

    def started(_: object) -> None:
        print(*(port.getHost().port for port in service.ports), flush=True)

    defer.ensureDeferred(service.startService()).addCallback(started)
    # As `twistd imxp` does (imxp/tap.py): startup objects leave the collector's sight.
    reactor.callWhenRunning(gc.freeze)
    if args.profile:
        _profile_until_shutdown(f"relay {domain} (pid {os.getpid()})")
    reactor.run()


class _Hop(Int32StringReceiver):
    """A connection of the ceiling: without Nagle's delay, as every BEEP session's."""

    MAX_LENGTH = 1 << 24

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]


class _Acked(_Hop):
    """Our connection to the next hop: only acknowledgements come back on it."""

    def stringReceived(self, string: bytes) -> None:
        pass


class _Forward(_Hop):
    """From the previous hop: acknowledge, and pass the message on unchanged."""

    next_hop: _Acked

    def stringReceived(self, string: bytes) -> None:
        self.sendString(ACK)
        self.next_hop.sendString(string)


def _serve_hop(
    args: argparse.Namespace, listen: Callable[[Any, Any, int, str], Awaitable[IListeningPort]]
) -> None:
    """A hop of the floor or the ceiling as ``--domain``: ``listen(identity, ca, port,
    name)`` connects to the next hop, ``--to`` PORT=NAME, and listens; prints its port."""
    _quiet_logs()
    certdir: Path = args.certdir
    ca = load_certificates(certdir / "ca.pem")
    identity = load_issued(certdir / f"{args.domain}.pem", certdir / f"{args.domain}.key")
    port, name = args.to.split("=", 1)

    async def start() -> None:
        listening = await listen(identity, ca, int(port), name)
        print(listening.getHost().port, flush=True)

    defer.ensureDeferred(start())
    reactor.callWhenRunning(gc.freeze)
    reactor.run()


def serve_forwarder(args: argparse.Namespace) -> None:
    """A ceiling forwarder: TLS listener, TLS client of the next hop with a client
    certificate (as relays are to each other)."""

    async def listen(identity: Any, ca: Any, port: int, name: str) -> IListeningPort:
        next_hop = endpoints.wrapClientTLS(
            client_options(name, ca, identity),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        downstream = await next_hop.connect(protocol.Factory.forProtocol(_Acked))

        class Forward(_Forward):
            next_hop = downstream

        factory = protocol.Factory.forProtocol(Forward)
        return reactor.listenSSL(0, factory, server_options(identity, ca), interface="127.0.0.1")

    _serve_hop(args, listen)


class _PassOn(ChannelHandler):
    """A floor hop: each MSG is answered ``ok`` and its payload sent on as it came."""

    def __init__(self, onward: Channel) -> None:
        self.onward = onward
        self.ok = wire.encode(wire.OK())

    def message_received(self, request: Request) -> Message:
        self.onward.send(request.message).addErrback(_report_failure)
        return self.ok


class _FloorProfile(Profile):
    uri = FLOOR_URI

    def __init__(self, handler: Callable[[], ChannelHandler]) -> None:
        self.handler = handler

    def start(self, session: Session, channel: Channel, init: bytes | None) -> None:
        channel.handler = self.handler()


def _floor_factory(identity: Any, ca: Any, handler: Callable[[], ChannelHandler]) -> SessionFactory:
    """A BEEP listener offering TLS tuning, as the relays do, and the floor profile."""
    profiles = [TLSProfile(server_options(identity, ca)), _FloorProfile(handler)]
    return SessionFactory(Role.LISTENER, profiles, SESSION)


async def _floor_channel(port: int, name: str, ca: Any, identity: Any = None) -> Channel:
    """A floor channel to ``port`` over a BEEP session tuned to TLS, ``name`` checked."""
    factory = SessionFactory(Role.INITIATOR, [], SESSION)
    session: Session = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        factory
    )
    await start_tls(session, client_options(name, ca, identity))
    return await session.start_channel([FLOOR_URI])


def serve_pass_through(args: argparse.Namespace) -> None:
    """A floor hop: BEEP listener, BEEP client of the next hop with a client certificate
    (as relays are to each other)."""

    async def listen(identity: Any, ca: Any, port: int, name: str) -> IListeningPort:
        onward = await _floor_channel(port, name, ca, identity)
        factory = _floor_factory(identity, ca, lambda: _PassOn(onward))
        return reactor.listenTCP(0, factory, interface="127.0.0.1")

    _serve_hop(args, listen)


# -- the measures, run in this process -----------------------------------------------------------


@dataclass
class _Books:
    """What was sent when, and what arrived."""

    sent_at: dict[int, float] = field(default_factory=dict)
    latencies: dict[int, float] = field(default_factory=dict)
    received: int = 0
    next_seq: int = 0
    #: Called after each arrival (the pipelined sender refills its window there).
    on_arrival: Callable[[], None] | None = None

    def arrived(self, seq: int) -> None:
        self.received += 1
        sent = self.sent_at.pop(seq, None)
        if sent is not None:
            self.latencies[seq] = time.perf_counter() - sent
        if self.on_arrival is not None:
            self.on_arrival()


class _Chain:
    """One chain under measure: ``send(seq)`` hands a message to the first hop and fires
    when that hop acknowledges it; the recipient calls ``books.arrived(seq)``.
    ``processes`` names the chain's processes (pid by name) whose CPU is measured."""

    books: _Books
    processes: dict[str, int]

    def send(self, seq: int) -> defer.Deferred[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Receiver(ChannelHandler):
    """barney's APEX channel: every data is answered ``ok`` and counted."""

    def __init__(self, books: _Books) -> None:
        self.books = books
        self.ok = wire.encode(wire.OK())

    def message_received(self, request: Request) -> Message:
        match = SEQ_RE.search(request.message.body)
        if match is not None:
            self.books.arrived(int(match.group(1)))
        return self.ok


async def _attach(
    port: int, domain: str, endpoint: str, ca: Any, handler: ChannelHandler
) -> tuple[Session, Channel]:
    """An endpoint application's start: TLS, SCRAM-SHA-256, attach (RFC 3340 §4.4.1)."""
    factory = SessionFactory(Role.INITIATOR, [], SESSION)
    session: Session = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        factory
    )
    await session.greeted()
    await start_tls(session, client_options(domain, ca))
    user = endpoint.split("@", 1)[0].split("/", 1)[0]
    await authenticate(session, ScramSHA256Client(user, PASSWORD), identity=user)
    attach = wire.encode(wire.Attach(endpoint, 1, [])).body
    channel = await session.start_channel([mgmt.ProfileElement(wire.APEX_URI, attach)], handler)
    answer = wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
    if isinstance(answer, wire.Error):
        raise SystemExit(f"attach as {endpoint} refused: {answer.code} {answer.text}")
    return session, channel


class _BEEPChain(_Chain):
    """fred@a.test sending to barney@b.test on ``channel``: at relay A in the chain, at the
    first pass-through in the floor."""

    def __init__(self, channel: Channel, books: _Books, size: int) -> None:
        self.books = books
        self.channel = channel
        filler = b"x" * max(0, size - len(SEQ_FIELD % 0))
        data = wire.Data(
            wire.Originator("fred@a.test", []),
            [wire.Recipient("barney@b.test", [])],
            [],
            content=wire.Content.from_bytes(SEQ_FIELD % 0 + filler, "application/octet-stream"),
        )
        template = wire.encode(data)
        # As a client's every data, each has Content-IDs and a boundary of its own: the
        # token the encoder made them from is swapped for one per data, as long.
        assert data.content is not None
        self.token = data.content.name.partition(".")[0]
        self.token_octets = self.token.encode()
        self.content_type = template.header("Content-Type") or ""
        self.head, found, self.tail = template.body.partition(SEQ_FIELD % 0)
        assert found, "the content is not in the encoded data as it is"
        assert self.token in self.content_type and self.token_octets in self.head

    def send(self, seq: int) -> defer.Deferred[Any]:
        token = f"{seq:0{len(self.token)}x}"
        body = (self.head + SEQ_FIELD % seq + self.tail).replace(self.token_octets, token.encode())
        return self.channel.send(Message(body, self.content_type.replace(self.token, token)))

    def close(self) -> None:
        self.channel.session.disconnect()


class _CeilingSender(_Hop):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.waiting: list[defer.Deferred[None]] = []
        self.first = 0

    def stringReceived(self, string: bytes) -> None:
        # Acknowledgements come back in order: the oldest message is the one acknowledged.
        d = self.waiting[self.first]
        self.first += 1
        if self.first > 4096:
            del self.waiting[: self.first]
            self.first = 0
        d.callback(None)


class _CeilingReceiver(_Hop):
    books: _Books

    def stringReceived(self, string: bytes) -> None:
        self.sendString(ACK)
        match = SEQ_RE.match(string)
        if match is not None:
            self.books.arrived(int(match.group(1)))


class _CeilingChain(_Chain):
    def __init__(self, sender: _CeilingSender, books: _Books, size: int) -> None:
        self.books = books
        self.sender = sender
        self.filler = b"x" * max(0, size - len(SEQ_FIELD % 0))

    def send(self, seq: int) -> defer.Deferred[Any]:
        d: defer.Deferred[None] = defer.Deferred()
        self.sender.waiting.append(d)
        self.sender.sendString(SEQ_FIELD % seq + self.filler)
        return d

    def close(self) -> None:
        self.sender.transport.loseConnection()


def _sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def _drain(chain: _Chain, timeout: float = 60.0) -> None:
    """Until everything sent has arrived (nothing is lost on either chain)."""
    deadline = time.perf_counter() + timeout
    while chain.books.received < chain.books.next_seq and time.perf_counter() < deadline:
        await _sleep(0.05)


async def max_rate(
    chain: _Chain, seconds: float, depth: int, warmup: float = 1.0
) -> tuple[float, dict[str, float], float]:
    """Messages per second arriving at the recipient with ``depth`` in flight end to end,
    the CPU seconds each of the chain's processes spent per message meanwhile, and the
    share of the machine's CPU time stolen by the hypervisor meanwhile.

    The window is end to end (sent, not yet at the recipient) rather than up to the first
    hop's acknowledgement: a relay says ``ok`` as soon as it has taken a data, so a window
    to the first hop only would fill relay A's queue towards B without bound and measure
    how fast A takes data in, not how fast the chain delivers it.
    """
    books = chain.books
    running = True

    def one() -> None:
        if running:
            seq = books.next_seq
            books.next_seq += 1
            chain.send(seq).addErrback(_report_failure)

    books.on_arrival = one
    for _ in range(depth):
        one()
    await _sleep(warmup)
    start, first = time.perf_counter(), books.received
    meter, steal = CPUMeter(chain.processes), StealMeter()
    meter.start()
    steal.start()
    await _sleep(seconds)
    elapsed, count = time.perf_counter() - start, books.received - first
    meter.stop()
    steal.stop()
    running = False
    books.on_arrival = None
    await _drain(chain)
    return count / elapsed, meter.per(count), steal.share


async def latency(
    chain: _Chain, rate: float, seconds: float
) -> tuple[float, float, int, float, dict[str, float]]:
    """p50 and p99 (seconds) of send -> receipt with sends paced at ``rate`` per second,
    the number of samples, the share of the machine's CPU time stolen meanwhile, and the
    CPU seconds each of the chain's processes spent per message."""
    books = chain.books
    books.latencies.clear()
    first = books.next_seq
    start = time.perf_counter()

    def tick() -> None:
        # Catch up with the clock rather than trust the tick interval: the reactor is busy.
        due = int((time.perf_counter() - start) * rate) - (books.next_seq - first)
        for _ in range(due):
            seq = books.next_seq
            books.next_seq += 1
            books.sent_at[seq] = time.perf_counter()
            chain.send(seq).addErrback(_report_failure)

    meter, steal = CPUMeter(chain.processes), StealMeter()
    meter.start()
    steal.start()
    pacer = task.LoopingCall(tick)
    pacer.start(0.002)
    await _sleep(seconds)
    pacer.stop()
    await _drain(chain)
    meter.stop()
    steal.stop()
    cpu = meter.per(books.next_seq - first)
    samples = sorted(books.latencies.values())
    if not samples:
        return float("nan"), float("nan"), 0, steal.share, cpu
    return (
        samples[len(samples) // 2],
        samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        len(samples),
        steal.share,
        cpu,
    )


def _report_failure(failure: Failure) -> None:
    print(f"send failed: {failure.getErrorMessage()}", file=sys.stderr)


# -- orchestration ---------------------------------------------------------------------------


async def _spawn(
    kind: str, domain: str, certdir: Path, *more: str, profile: bool = False
) -> tuple[subprocess.Popen[str], list[int]]:
    """Start ``bench/relay_chain.py --serve KIND --domain DOMAIN ...``; returns it and the
    ports it printed. The reactor goes on meanwhile: a hop may be starting a session with
    a listener of this process."""
    args = ["--serve", kind, "--domain", domain, "--certdir", str(certdir), *more]
    command = [sys.executable, __file__, *args, *(["--profile"] if profile else [])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = await threads.deferToThread(proc.stdout.readline)
    if not line:
        raise SystemExit(f"{' '.join(args)} did not start")
    return proc, [int(p) for p in line.split()]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait()


def _vm_rss(pid: int) -> int:
    """Resident set size of ``pid`` in octets (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _prepare(certdir: Path) -> None:
    """CA, relay certificates and user stores for a.test and b.test in ``certdir``."""
    ca = create_ca("bench CA")
    (certdir / "ca.pem").write_bytes(ca.cert_pem())
    for domain in ("a.test", "b.test"):
        issue_server(ca, [domain]).write(certdir / f"{domain}.pem", certdir / f"{domain}.key")
    for domain, users in (("a.test", ["fred", "idle"]), ("b.test", ["barney"])):
        store = UserStore(certdir / f"{domain}.users", iterations=4096)
        for user in users:
            store.add(user, PASSWORD)


@dataclass
class _Figures:
    # the highest rate of each round, and their median, per chain
    rounds: dict[str, list[float]] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    p50: dict[str, float] = field(default_factory=dict)
    p99: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    # p50 and p99 at the relay chain's half load, and at --load, per chain
    at_chain_half: dict[str, tuple[float, float]] = field(default_factory=dict)
    at_load: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the share of the machine's CPU time stolen by the hypervisor in each measure, per chain
    steal: dict[str, list[float]] = field(default_factory=dict)
    # CPU seconds per message at the highest rate, by process, per chain
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    # the same at --load: every chain at one rate, so that each spends per message what
    # its own work costs, not what the batching of a higher or lower rate makes it
    cpu_at_load: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_per_endpoint: float = float("nan")
    endpoints: int = 0
    login_seconds: float = float("nan")


async def _max_rates(
    chains: dict[str, _Chain], args: argparse.Namespace, figures: _Figures
) -> None:
    """Each chain's highest rate, ``--rounds`` times in turn, the order reversed every
    other round: the share of the ceiling is taken in each round, from measures a few
    seconds apart, so that a stretch in which the machine ran slower or faster than
    usual weighs on the chain and the ceiling alike. Each figure is the median of its
    rounds (CPU per message: the median of each process's)."""
    names = list(chains)
    rounds: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in names}
    for number in range(args.rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            rate, cpu, steal = await max_rate(chains[name], args.seconds, args.depth)
            rounds[name].append((rate, cpu))
            figures.steal.setdefault(name, []).append(steal)
            print(
                f"{name}: {rate:,.0f} msg/s (round {number + 1}; {steal:.0%} stolen)",
                file=sys.stderr,
            )
    for name, results in rounds.items():
        figures.rounds[name] = [rate for rate, _ in results]
        figures.rate[name] = statistics.median(figures.rounds[name])
        figures.cpu[name] = {
            process: statistics.median(cpu[process] for _, cpu in results)
            for process in results[0][1]
        }


async def _latencies(name: str, chain: _Chain, args: argparse.Namespace, figures: _Figures) -> None:
    async def latency_at(load: float) -> tuple[float, float, int, dict[str, float]]:
        p50, p99, n, steal, cpu = await latency(chain, load, args.seconds)
        figures.steal.setdefault(name, []).append(steal)
        print(
            f"{name}: at {load:,.0f} msg/s p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms "
            f"({n} samples; {steal:.0%} stolen)",
            file=sys.stderr,
        )
        return p50, p99, n, cpu

    rate = figures.rate[name]
    figures.p50[name], figures.p99[name], figures.samples[name], _ = await latency_at(rate / 2)
    # The relay chain's half load, for the others too: what the machine gives there to
    # hops that spend less per message.
    chain_half = figures.rate["chain"] / 2
    if name == "chain":
        figures.at_chain_half[name] = (figures.p50[name], figures.p99[name])
    elif chain_half <= rate:
        p50, p99, _, _ = await latency_at(chain_half)
        figures.at_chain_half[name] = (p50, p99)
    # Above a chain's highest rate its queue would grow for the whole measure.
    if args.load and args.load <= rate:
        p50, p99, _, figures.cpu_at_load[name] = await latency_at(args.load)
        figures.at_load[name] = (p50, p99)


#: What ends a chain's processes and connections, run in the reverse of the order added.
_Cleanup = list[Callable[[], Any]]


async def open_chain(certdir: Path, args: argparse.Namespace, cleanup: _Cleanup) -> _Chain:
    ca = load_certificates(certdir / "ca.pem")
    relay_b, (b_edge, b_mesh) = await _spawn("relay", "b.test", certdir, profile=args.profile)
    cleanup.append(lambda: _stop(relay_b))
    route = f"b.test=127.0.0.1:{b_mesh}"
    relay_a, (a_edge, _) = await _spawn(
        "relay", "a.test", certdir, "--route", route, profile=args.profile
    )
    cleanup.append(lambda: _stop(relay_a))
    books = _Books()
    receiver, _ = await _attach(b_edge, "b.test", "barney@b.test", ca, _Receiver(books))
    cleanup.append(receiver.disconnect)
    _, sending = await _attach(a_edge, "a.test", "fred@a.test", ca, ChannelHandler())
    chain = _BEEPChain(sending, books, args.size)
    cleanup.append(chain.close)
    chain.processes = {"relay A": relay_a.pid, "relay B": relay_b.pid, "endpoints": os.getpid()}
    return chain


async def _open_hops(
    kind: str,
    certdir: Path,
    receiving: IListeningPort,
    chain_to: Callable[[int], Awaitable[_Chain]],
    cleanup: _Cleanup,
) -> _Chain:
    """Two hops of ``kind`` (``--serve``) in front of ``receiving``, a listener of this
    process; ``chain_to(port)`` connects the sender to the first.

    The last hop runs the other way round from the relay chain's (there barney connects
    to relay B, here the second hop connects to the receiver): simpler, and TLS costs the
    same once the handshake is done."""
    cleanup.append(receiving.stopListening)
    where = receiving.getHost().port
    second, (second_port,) = await _spawn(kind, "b.test", certdir, "--to", f"{where}=b.test")
    cleanup.append(lambda: _stop(second))
    first, (first_port,) = await _spawn(kind, "a.test", certdir, "--to", f"{second_port}=b.test")
    cleanup.append(lambda: _stop(first))
    chain = await chain_to(first_port)
    cleanup.append(chain.close)
    chain.processes = {"relay A": first.pid, "relay B": second.pid, "endpoints": os.getpid()}
    return chain


async def open_floor(certdir: Path, args: argparse.Namespace, cleanup: _Cleanup) -> _Chain:
    ca = load_certificates(certdir / "ca.pem")
    books = _Books()
    identity = load_issued(certdir / "b.test.pem", certdir / "b.test.key")
    listening = reactor.listenTCP(
        0, _floor_factory(identity, ca, lambda: _Receiver(books)), interface="127.0.0.1"
    )

    async def chain_to(port: int) -> _Chain:
        return _BEEPChain(await _floor_channel(port, "a.test", ca), books, args.size)

    return await _open_hops("pass", certdir, listening, chain_to, cleanup)


async def open_ceiling(certdir: Path, args: argparse.Namespace, cleanup: _Cleanup) -> _Chain:
    ca = load_certificates(certdir / "ca.pem")
    books = _Books()

    class Receiver(_CeilingReceiver):
        pass

    Receiver.books = books
    identity = load_issued(certdir / "b.test.pem", certdir / "b.test.key")
    listening = reactor.listenSSL(
        0,
        protocol.Factory.forProtocol(Receiver),
        server_options(identity, ca),
        interface="127.0.0.1",
    )

    async def chain_to(port: int) -> _Chain:
        client = endpoints.wrapClientTLS(
            client_options("a.test", ca), endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        sender = await client.connect(protocol.Factory.forProtocol(_CeilingSender))
        return _CeilingChain(sender, books, args.size)

    return await _open_hops("forward", certdir, listening, chain_to, cleanup)


async def run_throughput(certdir: Path, args: argparse.Namespace, figures: _Figures) -> None:
    """The chains side by side, their processes all started first (those not under
    measure sit idle); then their highest rates in rounds, then their latencies."""
    cleanup: _Cleanup = []
    try:
        chains = {"ceiling": await open_ceiling(certdir, args, cleanup)}
        if "floor" not in args.skip:
            chains["floor"] = await open_floor(certdir, args, cleanup)
        chains["chain"] = await open_chain(certdir, args, cleanup)
        await _max_rates(chains, args, figures)
        for name, chain in chains.items():
            await _latencies(name, chain, args, figures)
    finally:
        for step in reversed(cleanup):
            await defer.maybeDeferred(step)


async def run_rss(certdir: Path, args: argparse.Namespace, figures: _Figures) -> None:
    """RSS of a fresh relay per idle attached endpoint."""
    ca = load_certificates(certdir / "ca.pem")
    limit = _raise_fd_limit()
    count = min(args.endpoints, limit - 64)
    if count < args.endpoints:
        print(f"fd limit {limit}: attaching {count} endpoints only", file=sys.stderr)
    relay, (edge, _) = await _spawn("relay", "a.test", certdir)
    sessions: list[Session] = []
    try:
        # One endpoint first, so that what any first session brings (imports, TLS context
        # caches, first SCRAM verifier lookup) is in the baseline.
        sessions.append((await _attach(edge, "a.test", "idle/0@a.test", ca, ChannelHandler()))[0])
        await _sleep(0.5)
        before = _vm_rss(relay.pid)
        start = time.perf_counter()
        numbers = iter(range(1, count + 1))

        async def worker() -> None:
            for n in numbers:
                attached = await _attach(edge, "a.test", f"idle/{n}@a.test", ca, ChannelHandler())
                sessions.append(attached[0])

        # A few logins at once: SCRAM and TLS cost CPU on both sides, more at once only queue.
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(8)])
        figures.login_seconds = (time.perf_counter() - start) / count
        await _sleep(1.0)
        after = _vm_rss(relay.pid)
        figures.endpoints = count
        figures.rss_per_endpoint = (after - before) / count
        print(
            f"rss: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB with {count} endpoints, "
            f"{figures.login_seconds * 1e3:.1f} ms per login",
            file=sys.stderr,
        )
    finally:
        for session in sessions:
            session.disconnect()
        _stop(relay)


def _round_shares(figures: _Figures, of: str) -> dict[str, list[float]]:
    """Each chain's rate as a share of ``of``'s, round by round."""
    return {
        name: [r / o for r, o in zip(rates, figures.rounds[of], strict=True)]
        for name, rates in figures.rounds.items()
    }


def _shares(figures: _Figures, of: str) -> dict[str, float]:
    """Each chain's rate as a share of ``of``'s: the median of the rounds' shares."""
    return {name: statistics.median(s) for name, s in _round_shares(figures, of).items()}


def _report(figures: _Figures, args: argparse.Namespace) -> None:
    """The table: each figure beside the BEEP floor's, the ceiling's and its target."""
    print()
    print(
        f"endpoint -> relay A -> relay B -> endpoint, TLS on every hop, {args.size}-octet "
        f"contents, {args.depth} in flight end to end"
    )
    print(
        f"3 busy processes (both endpoints here, each relay/hop its own) on "
        f"{os.cpu_count()} cores; {args.seconds:g} s per measure, highest rates in "
        f"{args.rounds} rounds"
    )
    names = [n for n in ("chain", "floor", "ceiling") if n in figures.rate]
    titles = {"chain": "relay chain", "floor": "BEEP floor", "ceiling": "ceiling"}
    print(f"{'measure':<46}" + "".join(f"{titles[n]:>14}" for n in names) + "   target")
    if names:
        share = _shares(figures, "ceiling")
        print(
            f"{'messages/s end to end (median of the rounds)':<46}"
            + "".join(f"{figures.rate[n]:>14,.0f}" for n in names)
            + f"   >= 20% of ceiling: {share['chain']:.1%}"
        )
        label = "  share of the ceiling (median of the rounds')"
        print(f"{label:<46}" + "".join(f"{share[n]:>14.1%}" for n in names))
        label = "  the relay chain's, round by round"
        by_round = _round_shares(figures, "ceiling")["chain"]
        print(f"{label:<46}  " + " ".join(f"{s:.1%}" for s in by_round))
        if "floor" in names:
            # What APEX costs on top of BEEP, whatever the forwarders' scheduling did.
            label = "  share of the BEEP floor"
            print(f"{label:<46}{_shares(figures, 'floor')['chain']:>14.1%}")
        half = "  half of it: the load for latency (msg/s)"
        print(f"{half:<46}" + "".join(f"{figures.rate[n] / 2:>14,.0f}" for n in names))
        for process in figures.cpu["chain"]:
            label = f"  CPU per message, {process} (us)"
            print(
                f"{label:<46}" + "".join(f"{figures.cpu[n][process] * 1e6:>14.0f}" for n in names)
            )
        for label, values, target in (("p50", figures.p50, ""), ("p99", figures.p99, "< 20 ms")):
            line = f"{f'latency {label} at half load (ms)':<46}" + "".join(
                f"{values[n] * 1e3:>14.2f}" for n in names
            )
            print(f"{line}   {target}".rstrip())
        if "chain" in names:
            _latency_row("p50 / p99 at chain's half load", figures.at_chain_half, names)
        if args.load:
            _latency_row(f"p50 / p99 at {args.load:,.0f} msg/s", figures.at_load, names)
            for process in figures.cpu["chain"]:
                label = f"  CPU per message at that load, {process} (us)"
                print(
                    f"{label:<46}"
                    + "".join(
                        f"{figures.cpu_at_load[n][process] * 1e6:>14.0f}"
                        if n in figures.cpu_at_load
                        else f"{'overloaded':>14}"
                        for n in names
                    )
                )
        label = "CPU time stolen by the hypervisor, median / max"
        print(
            f"{label:<46}"
            + "".join(
                f"{f'{statistics.median(figures.steal[n]):.0%} / {max(figures.steal[n]):.0%}':>14}"
                for n in names
            )
        )
    if figures.endpoints:
        print(
            f"{f'RSS per idle endpoint ({figures.endpoints:,} attached, KB)':<46}"
            # Under the relay chain's column; alone in the table under --skip throughput.
            f"{figures.rss_per_endpoint / 1024:>14.1f}{'':>{14 * max(0, len(names) - 1)}}"
            "   <= 50 KB"
        )
        print(
            f"{'login: TCP+TLS+SCRAM+attach, 8 at once (ms)':<46}"
            f"{figures.login_seconds * 1e3:>14.1f}"
        )


def _latency_row(title: str, at: dict[str, tuple[float, float]], names: list[str]) -> None:
    print(
        f"{f'latency {title} (ms)':<46}"
        + "".join(
            f"{'{:.2f} / {:.2f}'.format(*(t * 1e3 for t in at[n])):>14}"
            if n in at
            else f"{'overloaded':>14}"
            for n in names
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024, help="content octets per message")
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="highest rates measured, each chain in turn"
    )
    parser.add_argument("--endpoints", type=int, default=5000)
    parser.add_argument(
        "--load",
        type=float,
        help="also measure latency at this many msg/s (a deployment's expected load)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the relays' cProfile to stderr"
    )
    parser.add_argument(
        "--skip",
        choices=["rss", "throughput", "floor"],
        action="append",
        default=[],
        help="leave out",
    )
    # Internal: what the subprocesses are told.
    parser.add_argument("--serve", choices=["relay", "pass", "forward"])
    parser.add_argument("--domain")
    parser.add_argument("--certdir", type=Path)
    parser.add_argument("--route", action="append", default=[])
    parser.add_argument("--to")
    args = parser.parse_args()
    if args.serve == "relay":
        serve_relay(args)
        return
    if args.serve == "pass":
        serve_pass_through(args)
        return
    if args.serve == "forward":
        serve_forwarder(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        certdir = Path(tmp)
        _prepare(certdir)
        figures = _Figures()

        async def measure(_reactor: object) -> None:
            # This process's start-up objects leave the collector's sight as the relays'
            # do: a full collection among them paused both endpoints for up to 36 ms, a
            # tail in the latency of every chain that was none of the hops' doing.
            gc.freeze()
            if "throughput" not in args.skip:
                await run_throughput(certdir, args, figures)
            if "rss" not in args.skip:
                await run_rss(certdir, args, figures)
            _report(figures, args)

        # task.react ends the process when measure() is done.
        task.react(lambda r: defer.ensureDeferred(measure(r)))


if __name__ == "__main__":
    main()
