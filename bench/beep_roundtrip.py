"""Pipelined BEEP MSG/RPY round trips per second over loopback TLS, beside a ceiling.

Run by hand (not part of the tests):

    python bench/beep_roundtrip.py [--seconds 5] [--size 1024] [--depth 64] [--window 131072]
                                   [--rounds 3]

The server runs in a subprocess so that client and server each have a core.
Two servers are measured in the same run, over the same TLS 1.2+/AEAD settings
and certificates:

* ``beep``: a BEEP listener with the TLS tuning profile and an echo profile;
  the client negotiates TLS, opens one channel and keeps ``--depth`` MSGs
  outstanding on it (pipelining, RFC 3080 §2.6.1).
* ``ceiling``: a minimal Twisted ``Int32StringReceiver`` echo over TLS with the
  same pipelining depth - the fastest request/response Twisted can do here.

The window defaults to what imxp's relays and clients offer (the ``window``
option, 131072 octets): pipelining needs room for the MSGs in flight, and 64 MSGs
of 1 KiB are just more than 65536. With ``--window 4096``, the least RFC 3081
§3.1.1 allows, three 1 KiB MSGs fit at once and the figure measures how fast SEQ
frames come back rather than the session.

Each round measures the ceiling and then BEEP; the round with the median ratio is
reported, so that a measure the machine slowed or starved (a virtual machine's speed
can change within seconds) does not decide the figure. Each side's CPU per round trip
is printed too: BEEP is bound by it, the echo is not.

Target (issue 2): BEEP round trips >= 50% of the ceiling on a 2-core machine.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import Int32StringReceiver

from bench.procstat import CPUMeter
from imxp.beep.message import Message
from imxp.beep.session import (
    ChannelHandler,
    Profile,
    Request,
    Role,
    SessionConfig,
    SessionFactory,
)
from imxp.beep.tls import TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.certs import create_ca, issue_server, load_certificates, load_issued
from imxp.config import Config

ECHO_URI = "http://imxp.test/bench-echo"


class _Echo(ChannelHandler):
    def message_received(self, request: Request) -> Message:
        return request.message


class _EchoProfile(Profile):
    uri = ECHO_URI

    def start(self, session, channel, init):  # type: ignore[no-untyped-def]
        channel.handler = _Echo()
        return None


class _EchoString(Int32StringReceiver):
    MAX_LENGTH = 1 << 24

    def stringReceived(self, string: bytes) -> None:
        self.sendString(string)


def serve(kind: str, certdir: Path, window: int, profile: bool) -> None:
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
            )
        ],
        redirectStandardIO=False,
    )
    identity = load_issued(certdir / "server.pem", certdir / "server.key")
    options = server_options(identity)
    if kind == "beep":
        config = SessionConfig(window=window, idle_timeout=None)
        factory = SessionFactory(Role.LISTENER, [TLSProfile(options), _EchoProfile()], config)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    else:
        factory = protocol.Factory.forProtocol(_EchoString)
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()

        def report() -> None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)

        reactor.addSystemEventTrigger("before", "shutdown", report)
    reactor.run()


async def _run_beep(
    port: int, certdir: Path, args: argparse.Namespace, cpu: CPUMeter
) -> tuple[float, int]:
    ca = load_certificates(certdir / "ca.pem")
    config = SessionConfig(window=args.window, idle_timeout=None)
    factory = SessionFactory(Role.INITIATOR, [], config)
    session = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await start_tls(session, client_options("bench.test", ca))
    channel = await session.start_channel([ECHO_URI])
    payload = Message(os.urandom(args.size), "application/octet-stream")
    done = defer.Deferred()
    count = 0
    deadline = 0.0

    def one(_: object = None) -> None:
        nonlocal count
        count += 1
        if time.perf_counter() < deadline:
            channel.send(payload).addCallbacks(one, lambda f: None)
        elif count and not done.called:
            done.callback(None)

    # warm up
    for _ in range(200):
        await channel.send(payload)
    count = 0
    cpu.start()
    start = time.perf_counter()
    deadline = start + args.seconds
    for _ in range(args.depth):
        channel.send(payload).addCallbacks(one, lambda f: None)
    await done
    elapsed = time.perf_counter() - start
    cpu.stop()
    session.disconnect()
    return elapsed, count


async def _run_ceiling(
    port: int, certdir: Path, args: argparse.Namespace, cpu: CPUMeter
) -> tuple[float, int]:
    ca = load_certificates(certdir / "ca.pem")
    done = defer.Deferred()
    state = {"count": 0, "deadline": 0.0, "counting": False}
    payload = os.urandom(args.size)

    class Client(Int32StringReceiver):
        MAX_LENGTH = 1 << 24

        def stringReceived(self, string: bytes) -> None:
            if state["counting"]:
                state["count"] += 1
                if time.perf_counter() >= state["deadline"]:
                    if not done.called:
                        done.callback(None)
                    return
            self.sendString(payload)

    endpoint = endpoints.wrapClientTLS(
        client_options("bench.test", ca), endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    client = await endpoint.connect(protocol.Factory.forProtocol(Client))
    state["counting"] = True
    cpu.start()
    start = time.perf_counter()
    state["deadline"] = start + args.seconds
    for _ in range(args.depth):
        client.sendString(payload)
    await done
    elapsed = time.perf_counter() - start
    cpu.stop()
    client.transport.loseConnection()
    return elapsed, int(state["count"])


def _start_server(
    kind: str, certdir: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen[str], int]:
    profile = ["--profile"] if args.profile and kind == "beep" else []
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            kind,
            "--certdir",
            str(certdir),
            "--window",
            str(args.window),
            *profile,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--window", type=int, default=Config().window)
    parser.add_argument(
        "--rounds", type=int, default=3, help="ceiling-then-BEEP rounds; the median is reported"
    )
    parser.add_argument("--serve", choices=["beep", "ceiling"])
    parser.add_argument("--certdir", type=Path)
    parser.add_argument(
        "--profile", action="store_true", help="print the BEEP server's cProfile to stderr"
    )
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.certdir, args.window, args.profile)
        return

    with tempfile.TemporaryDirectory() as tmp:
        certdir = Path(tmp)
        ca = create_ca("bench CA")
        (certdir / "ca.pem").write_bytes(ca.cert_pem())
        issue_server(ca, ["bench.test"]).write(certdir / "server.pem", certdir / "server.key")

        async def measure(_reactor: object) -> None:
            rounds: list[tuple[dict[str, float], dict[str, dict[str, float]]]] = []
            for _ in range(args.rounds):
                results: dict[str, float] = {}
                used: dict[str, dict[str, float]] = {}
                for kind, run in (("ceiling", _run_ceiling), ("beep", _run_beep)):
                    proc, port = _start_server(kind, certdir, args)
                    cpu = CPUMeter({"client": os.getpid(), "server": proc.pid})
                    try:
                        elapsed, count = await run(port, certdir, args, cpu)
                    finally:
                        proc.terminate()
                        proc.wait()
                    results[kind] = count / elapsed
                    used[kind] = cpu.per(count)
                rounds.append((results, used))
            _report(rounds, args)

        # task.react ends the process when measure() is done.
        task.react(lambda r: defer.ensureDeferred(measure(r)))


def _report(
    rounds: list[tuple[dict[str, float], dict[str, dict[str, float]]]], args: argparse.Namespace
) -> None:
    """Each round's figures, then the round with the median ratio.

    The machine's speed can change between two measures of a round; the median of
    several rounds is the figure that one slow or starved measure does not decide.
    """
    print(f"payload {args.size} octets, pipelining depth {args.depth}, window {args.window}")
    ratios = [results["beep"] / results["ceiling"] for results, _ in rounds]
    for number, (results, _) in enumerate(rounds, 1):
        print(
            f"round {number}: BEEP {results['beep']:,.0f}, echo {results['ceiling']:,.0f} "
            f"round trips/s, ratio {ratios[number - 1]:.0%}"
        )
    middle = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]
    results, used = rounds[middle]
    print(f"the median round ({middle + 1} of {len(rounds)}):")
    print(f"{'measure':<44}{'round trips/s':>16}{'CPU us/rt client':>18}{'server':>8}")
    for label, kind in (
        ("BEEP MSG/RPY over TLS, one channel", "beep"),
        ("ceiling: Int32StringReceiver echo over TLS", "ceiling"),
    ):
        client, server = used[kind]["client"] * 1e6, used[kind]["server"] * 1e6
        print(f"{label:<44}{results[kind]:>16,.0f}{client:>18.1f}{server:>8.1f}")
    print(f"ratio {ratios[middle]:.0%} (target >= 50%)")


if __name__ == "__main__":
    main()
