"""The ``imxp`` command run as a subprocess against relays in the test process.

:func:`start_net` starts relays for a.test (users fred and wilma) and b.test (barney) on
loopback ports, each with a certificate from the test CA, and publishes both services of
each domain in a real DNS server (tests/dnsserver.py)::

    _apex-edge._tcp.a.test SRV 0 0 <edge port> a.test.
    _apex-mesh._tcp.a.test SRV 0 0 <mesh port> a.test.
    a.test A 127.0.0.1

The relays route to each other through that DNS. :meth:`Net.imxp` runs ``python -m imxp``
with ``--dns`` and ``--ca`` pointing at them, through ``reactor.spawnProcess`` so that the
reactor (and with it the relays) keeps running while the command does; ``pty=True`` gives
the command a pseudo-terminal as its standard input and output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apexnet import PASSWORD, RelayHandle, start_relay
from dnsserver import DNSServer, a, srv, start_dns_server
from twisted.internet import defer, error, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from imxp.certs import Issued

__all__ = ["Command", "Net", "ROOT", "start_net", "until"]

ROOT = Path(__file__).resolve().parent.parent
USERS = {"a.test": ("fred", "wilma"), "b.test": ("barney",)}
#: Upper bound for one command; far above what any takes on loopback.
COMMAND_TIMEOUT = 30.0
#: The subcommands that connect to a relay: they get the test's DNS server and CA.
CONNECTING = {"send", "listen", "chat"}


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait (without blocking the reactor) until ``predicate()`` holds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


class Command(ProcessProtocol):
    """A running ``imxp`` process: its output so far, and its exit status once it ends."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stdout = b""
        self.stderr = b""
        self.status: int | None = None
        self._ended: defer.Deferred[int] = defer.Deferred()

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def outReceived(self, data: bytes) -> None:
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.status = value.exitCode if value.exitCode is not None else -value.signal
        self._ended.callback(self.status)

    def write(self, data: bytes) -> None:
        """Type ``data`` (at the terminal, for a command given a pty)."""
        self.transport.write(data)

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    async def output(self, text: str, timeout: float = 15.0) -> None:
        """Until ``text`` has appeared on standard output."""
        try:
            await until(lambda: text in self.out, repr(text), timeout)
        except AssertionError:
            raise AssertionError(f"no {text!r} from {self!r}") from None

    async def ended(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """The exit status; a command still running after ``timeout`` is killed."""
        if self.status is not None:
            return self.status
        timer = reactor.callLater(timeout, self._kill)
        try:
            return await self._ended
        finally:
            if timer.active():
                timer.cancel()

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def __repr__(self) -> str:
        return f"<imxp {self.argv}: {self.status}\n{self.out}{self.err}>"


@dataclass
class Net:
    dns: DNSServer
    ca: Issued
    ca_file: Path
    tmp: Path
    relays: dict[str, RelayHandle] = field(default_factory=dict)
    running: list[Command] = field(default_factory=list)

    def spawn(
        self, *args: str, password: str | None = PASSWORD, pty: bool = False, ca: bool = True
    ) -> Command:
        """Start ``python -m imxp ARGS``; connecting commands get ``--dns`` and (unless not
        ``ca``) ``--ca``.

        ``password`` goes into IMXP_PASSWORD (None: the variable is unset).
        """
        argv = list(args)
        if argv and argv[0] in CONNECTING:
            trust = ["--ca", str(self.ca_file)] if ca else []
            argv[1:1] = ["--dns", f"127.0.0.1:{self.dns.port}", *trust]
        env = {k: v for k, v in os.environ.items() if k != "IMXP_PASSWORD"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env["PYTHONUTF8"] = "1"
        if password is not None:
            env["IMXP_PASSWORD"] = password
        command = Command(argv)
        executable = sys.executable
        reactor.spawnProcess(
            command,
            executable,
            [executable, "-m", "imxp", *argv],
            env=env,
            path=str(self.tmp),
            usePTY=pty,
        )
        self.running.append(command)
        return command

    async def imxp(self, *args: str, password: str | None = PASSWORD, ca: bool = True) -> Command:
        """Run ``python -m imxp ARGS`` to its end (see :meth:`spawn`)."""
        command = self.spawn(*args, password=password, ca=ca)
        await command.ended()
        return command

    async def attached(self, endpoint: str) -> None:
        """Until ``endpoint`` is attached at its relay."""
        relay = self.relays[endpoint.rsplit("@", 1)[1]].service.relay
        await until(lambda: any(str(e) == endpoint for e in relay.attached), f"{endpoint}")

    async def close(self) -> None:
        for command in self.running:
            if command.status is None:
                command._kill()
                await command.ended()
        for handle in self.relays.values():
            await handle.service.stopService()
        await self.dns.stop()


async def start_net(ca: Issued, tmp: Path) -> Net:
    """The two relays, published in a fresh DNS server; ``ca.pem`` of the test CA in tmp."""
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    net = Net(start_dns_server(), ca, ca_file, tmp)
    for domain, users in USERS.items():
        handle = await start_relay(
            domain,
            ca,
            tmp,
            users=users,
            resolver=net.dns.resolver(),
            delivery_timeout=5.0,
            shutdown_grace=1.0,
        )
        net.relays[domain] = handle
        net.dns.set(f"_apex-edge._tcp.{domain}", srv(0, 0, handle.port("edge"), f"{domain}."))
        net.dns.set(f"_apex-mesh._tcp.{domain}", srv(0, 0, handle.port("mesh"), f"{domain}."))
        net.dns.set(domain, a("127.0.0.1"))
    return net
