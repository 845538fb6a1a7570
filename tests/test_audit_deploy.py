"""Audit of the relay as operators deploy it: real ``twistd imxp`` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted
from apexnet import App, _AppChannel, free_ports
from clinet import until
from cryptography import x509
from twisted.internet import defer, endpoints, reactor, utils

from imxp.apex import options as apex_options
from imxp.apex import wire
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import ScramSHA256Client
from imxp.beep.session import Request, Role, Session, SessionConfig, SessionFactory
from imxp.beep.tls import start_tls
from imxp.beep.tlsctx import client_options
from imxp.beep.users import UserStore
from imxp.certs import issue_server, load_certificates, load_issued

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a password for the audit"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}


def _config(directory: Path, edge: int, mesh: int, extra: str = "") -> Path:
    path = directory / "relay.toml"
    path.write_text(
        f'edge_listen = ["tcp:{edge}:interface=127.0.0.1"]\n'
        f'mesh_listen = ["tcp:{mesh}:interface=127.0.0.1"]\n' + extra
    )
    return path


def _start(directory: Path, config: Path, *twistd: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = directory / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*TWISTD, "--nodaemon", "--pidfile=", *twistd, "imxp", "--config", str(config)],
            cwd=directory,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


class _Silent(_AppChannel):
    """An application that takes data and never answers it (until its session ends)."""

    def message_received(self, request: Request) -> Message | defer.Deferred[Message]:
        element = wire.decode(request.message)
        if isinstance(element, wire.Data):
            self.app._received(element)
            return defer.Deferred()
        return super().message_received(request)


async def _attach(port: int, ca: Path, endpoint: str, handler_class: type = _AppChannel) -> App:
    factory = SessionFactory(Role.INITIATOR, [], SessionConfig(window=65536, idle_timeout=None))
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    session: Session = await where.connect(factory)
    await session.greeted()
    await start_tls(session, client_options("localhost", load_certificates(ca)))
    name = endpoint.split("@", 1)[0]
    await authenticate(session, ScramSHA256Client(name, PASSWORD), identity=name)
    holder: dict[str, App] = {}
    attach_xml = wire.encode(wire.Attach(endpoint, 1, [])).body
    channel = await session.start_channel(
        [mgmt.ProfileElement(wire.APEX_URI, attach_xml)], handler=handler_class(holder)
    )
    answer = wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
    assert not isinstance(answer, wire.Error), answer
    app = App(endpoint, session, channel)
    holder["app"] = app
    return app


def _prepare_users(state: Path, *names: str) -> None:
    state.mkdir(mode=0o700)
    store = UserStore(state / "users", iterations=4096)
    for name in names:
        store.add(name, PASSWORD)


# -- shutdown ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_gives_unanswered_data_its_verdict_after_shutdown_grace(
    tmp_path: Path,
) -> None:
    """shutdown_grace is "seconds that data already accepted gets to reach a verdict"
    (README, Stopping; systemd's TimeoutStopSec must stay above it). Data handed to an
    application that does not answer must get its verdict, reported to the originator,
    once the grace is over - not only when delivery_timeout ends, long after systemd or
    the operator has killed the relay and with it the report."""
    edge, mesh = free_ports(2)
    _prepare_users(tmp_path / "imxp-state", "fred", "barney")
    config = _config(tmp_path, edge, mesh, "shutdown_grace = 1.0\ndelivery_timeout = 40.0\n")
    relay, log = _start(tmp_path, config)
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca = tmp_path / "imxp-state" / "ca.pem"
        barney = await _attach(edge, ca, "barney@localhost", _Silent)
        fred = await _attach(edge, ca, "fred@localhost")
        trans_id = 77
        data = wire.Data(
            wire.Originator("fred@localhost", []),
            [wire.Recipient("barney@localhost", [])],
            [apex_options.make_status_request(trans_id)],
            content=wire.Content.from_bytes(b"in flight", "text/plain"),
        )
        await fred.channel.send(wire.encode(data))
        await barney.wait("data", 1)

        relay.send_signal(signal.SIGTERM)
        # Barney's verdict (451 or 421) reaches fred once the grace is over.
        try:
            # Well before the delivery timeout (40 s), which would give a verdict too.
            await fred.wait("reports", 1, timeout=1.0 + 19.0)
        except defer.CancelledError:
            raise AssertionError("no report for barney 20 s after SIGTERM") from None
        assert fred.outcomes() == {
            (trans_id, "barney@localhost"): [
                (451, "endpoint had not answered when the relay stopped; outcome unknown")
            ]
        }
        # Not taken for an application that stopped answering, which has its session cut.
        assert "answered no data in time" not in log.read_text()
    finally:
        _stop(relay)


@pytest_twisted.ensureDeferred
async def test_sigterm_while_imxp_send_awaits_its_report_ends_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``imxp send`` to a domain whose relay refuses connections; SIGTERM while ours still
    retries it. When the grace is over the sender gets its 421, then detaches and closes
    its session just as the relay releases it, so the relay's stop ends inside its read
    of the sender's last frames. The rest of the reactor's shutdown must not run there:
    it disconnects every connection, that one too, under the TLS layer still reading it
    (an Unhandled Error in the log, AttributeError on bio_read).

    The operator, impatient, sends SIGTERM again: that is said in the log, not answered
    with twistd's ReactorNotRunning traceback. And the report, sent as the grace ends,
    is logged as the sender answered it, not as unanswered (451) by the stop's haste."""
    edge, mesh = free_ports(2)
    _prepare_users(tmp_path / "imxp-state", "fred")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refusing = s.getsockname()[1]
    extra = f'shutdown_grace = 1.0\n[routes]\n"b.test" = "127.0.0.1:{refusing}"\n'
    relay, log = _start(tmp_path, _config(tmp_path, edge, mesh, extra))
    send = None
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca = tmp_path / "imxp-state" / "ca.pem"
        argv = ["send", "--relay", f"127.0.0.1:{edge}", "--ca", str(ca)]
        argv += ["--from", "fred@localhost", "--to", "barney@b.test", "hi"]
        send = subprocess.Popen(
            [sys.executable, "-m", "imxp", *argv],
            env={**_env(), "IMXP_PASSWORD": PASSWORD},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # A connection attempt to b.test's relay has failed: the data is in flight.
        await until(lambda: "no link to b.test" in log.read_text(), "an attempt", 20)
        relay.send_signal(signal.SIGTERM)
        await until(lambda: "relay for localhost stopping" in log.read_text(), "stopping", 10)
        relay.send_signal(signal.SIGTERM)
        await until(lambda: send.poll() is not None, "imxp send to end", 10)
        assert "barney@b.test: failed 421" in send.stdout.read().decode()
        await until(lambda: relay.poll() is not None, "the relay to exit", 10)
        text = log.read_text()
        assert "relay for localhost stopped" in text
        assert "Unhandled Error" not in text and "Traceback" not in text, text
        assert "SIGTERM again: the relay is already stopping" in text
        assert "fred@localhost from apex=report@localhost: 250" in text
    finally:
        if send is not None and send.poll() is None:
            send.kill()
        _stop(relay)


class _Hung(_AppChannel):
    """An application that stopped answering (a suspended client: its TCP stays open)."""

    def message_received(self, request: Request) -> Message | defer.Deferred[Message]:
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_sigterm_exits_even_if_an_attached_application_does_not_answer(
    tmp_path: Path,
) -> None:
    """Nothing in flight; one attached application answers nothing, so not the terminate
    the relay sends it on the way out either. The relay must still exit soon after
    shutdown_grace (README, Stopping; systemd waits TimeoutStopSec and then kills), and a
    second SIGTERM must not be needed - here it does not help either."""
    edge, mesh = free_ports(2)
    _prepare_users(tmp_path / "imxp-state", "barney")
    config = _config(tmp_path, edge, mesh, "shutdown_grace = 1.0\n")
    relay, log = _start(tmp_path, config)
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca = tmp_path / "imxp-state" / "ca.pem"
        await _attach(edge, ca, "barney@localhost", _Hung)
        relay.send_signal(signal.SIGTERM)
        await until(lambda: relay.poll() is not None, "the relay to exit", 1.0 + 5.0)
        assert relay.returncode in (0, -signal.SIGTERM)
        assert "relay for localhost stopped" in log.read_text()
    finally:
        _stop(relay)


# -- reload --------------------------------------------------------------------------------


async def _presented(port: int, ca: Path) -> x509.Certificate:
    """The certificate the relay shows a new session on ``port``."""
    factory = SessionFactory(Role.INITIATOR, [], SessionConfig(idle_timeout=None))
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    session: Session = await where.connect(factory)
    try:
        await start_tls(session, client_options("localhost", load_certificates(ca)))
        return session.peer_certificate
    finally:
        session.disconnect()


@pytest_twisted.ensureDeferred
async def test_sighup_puts_a_renewed_certificate_to_work_without_a_restart(
    tmp_path: Path,
) -> None:
    """Certificates are renewed every few months (certbot's deploy hook, then `systemctl
    reload imxp`). SIGHUP reads them again for new sessions; the sessions already made go
    on, and a renewal that cannot be used is logged and changes nothing."""
    edge, mesh = free_ports(2)
    state = tmp_path / "imxp-state"
    _prepare_users(state, "fred")
    relay, log = _start(tmp_path, _config(tmp_path, edge, mesh))
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca_file = state / "ca.pem"
        fred = await _attach(edge, ca_file, "fred@localhost")
        first = await _presented(edge, ca_file)
        ca = load_issued(ca_file, state / "ca.key")

        # A key that is not the certificate's: not used, and the relay goes on as it was.
        (state / "relay.key").write_bytes(issue_server(ca, ["localhost"]).key_pem())
        relay.send_signal(signal.SIGHUP)
        await until(lambda: "SIGHUP: not reloaded" in log.read_text(), "the refusal", 10)
        assert "does not belong to the certificate" in log.read_text()
        assert (await _presented(edge, ca_file)).serial_number == first.serial_number

        renewed = issue_server(ca, ["localhost"], ips=["127.0.0.1"])
        renewed.write(state / "relay.pem", state / "relay.key")
        relay.send_signal(signal.SIGHUP)
        await until(lambda: "SIGHUP: reloaded" in log.read_text(), "the reload", 10)
        assert (await _presented(edge, ca_file)).serial_number == renewed.certificate.serial_number

        # fred's session, made with the first certificate, still carries data.
        data = wire.Data(
            wire.Originator("fred@localhost", []),
            [wire.Recipient("fred@localhost", [])],
            [],
            content=wire.Content.from_bytes(b"still here", "text/plain"),
        )
        reply = await fred.channel.send(wire.encode(data))
        assert isinstance(wire.decode(reply), wire.OK)
        await fred.wait("data", 1)
        assert relay.poll() is None
        assert "Traceback" not in log.read_text()
    finally:
        _stop(relay)


def _data(trans_id: int, recipient: str = "barney@localhost") -> wire.Data:
    return wire.Data(
        wire.Originator("fred@localhost", []),
        [wire.Recipient(recipient, [])],
        [apex_options.make_status_request(trans_id)],
        content=wire.Content.from_bytes(b"hello", "text/plain"),
    )


@pytest_twisted.ensureDeferred
async def test_sighup_applies_a_changed_configuration_and_names_what_takes_a_restart(
    tmp_path: Path,
) -> None:
    """An operator edits the file and runs `systemctl reload imxp`, as for Postfix or
    Prosody: access refusals and the log level change for the data that follows, without
    dropping the attached applications; an option that takes a restart is named, not
    silently ignored; and a file that does not parse changes nothing."""
    edge, mesh, closed = free_ports(3)
    _prepare_users(tmp_path / "imxp-state", "fred", "barney")
    # Never reached in this test: data for b.test is refused at the hop limit first.
    route = f'[routes]\n"b.test" = "127.0.0.1:{closed}"\n'
    config = _config(tmp_path, edge, mesh, route)
    relay, log = _start(tmp_path, config)
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca = tmp_path / "imxp-state" / "ca.pem"
        barney = await _attach(edge, ca, "barney@localhost")
        fred = await _attach(edge, ca, "fred@localhost")

        async def outcome(trans_id: int, recipient: str = "barney@localhost") -> int:
            # A verdict given at once is reported before the data's ok is sent.
            reports = len(fred.reports)
            await fred.channel.send(wire.encode(_data(trans_id, recipient)))
            await fred.wait("reports", reports + 1)
            report = fred.reports[-1]
            assert report.trans_id == trans_id
            ((_, code, _),) = report.destinations
            return code

        assert await outcome(1) == 250
        verdict = "barney@localhost from fred@localhost: 250"
        assert log.read_text().count(verdict) == 1

        refusal = '[refuse_data]\n"barney@localhost" = ["@localhost"]\n'
        _config(tmp_path, edge, mesh, "connect_timeout = 5.0\n" + refusal + route)
        relay.send_signal(signal.SIGHUP)
        # The warning is the reload's last line: the line before it may be read without it.
        await until(lambda: "takes a restart" in log.read_text(), "the reload", 10)
        text = log.read_text()
        assert "SIGHUP: reloaded" in text and "changed: refuse_data" in text
        assert "connect_timeout changed in" in text
        assert await outcome(2) == 537

        config.write_text("max_hops = \n")
        relay.send_signal(signal.SIGHUP)
        await until(lambda: "SIGHUP: not reloaded" in log.read_text(), "the refusal", 10)
        assert str(config) in log.read_text()
        assert await outcome(3) == 537

        _config(tmp_path, edge, mesh, 'log_level = "warn"\nmax_hops = 1\n' + route)
        relay.send_signal(signal.SIGHUP)
        await until(lambda: log.read_text().count("SIGHUP: reloaded") == 2, "the reload", 10)
        assert "changed: refuse_data, max_hops, log_level" in log.read_text()
        assert await outcome(4) == 250
        assert log.read_text().count(verdict) == 1
        assert len(barney.data) == 2
        # RFC 3342 §4: data entering the mesh here has the new hop limit, which one hop
        # spends (the default, 16, would have it sent on).
        assert await outcome(5, "barney@b.test") == 554
        assert "hop limit reached for data from fred@localhost to b.test" in log.read_text()
        assert relay.poll() is None
        assert "Traceback" not in log.read_text()
    finally:
        _stop(relay)


# twistd, with a log observer (--logger) that sends the process SIGHUP as twistd makes it:
# after the relay service is made and before the reactor runs, as `kill -HUP $(cat PIDFILE)`
# may just after twistd wrote its pid file, or systemd's kill -s HUP during a start.
_TWISTD_HUP_AT_START = (
    "import os, signal, sys\n"
    "from twisted.logger import textFileLogObserver\n"
    "def hup_at_start():\n"
    "    os.kill(os.getpid(), signal.SIGHUP)\n"
    "    return textFileLogObserver(sys.stdout)\n"
    "from twisted.scripts.twistd import run; run()\n"
)


@pytest_twisted.ensureDeferred
async def test_a_sighup_before_the_reactor_runs_reloads_instead_of_ending_the_relay(
    tmp_path: Path,
) -> None:
    """SIGHUP's default action ends a process. One that reaches the relay while it starts,
    before its handler is in place, must not end it (silently, and for systemd cleanly,
    so Restart=on-failure leaves it stopped): the relay starts and reloads once running."""
    edge, mesh = free_ports(2)
    config = _config(tmp_path, edge, mesh)
    log = tmp_path / "twistd.log"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            [
                *(sys.executable, "-c", _TWISTD_HUP_AT_START, "--nodaemon", "--pidfile="),
                *("--logger=__main__.hup_at_start", "imxp", "--config", str(config)),
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await until(
            lambda: relay.poll() is not None or "SIGHUP: reloaded" in log.read_text(),
            "the reload or the end of the relay",
            30,
        )
        assert relay.poll() is None, f"the relay ended with {relay.returncode}"
        assert log.read_text().count("listening on") == 2
        assert "Traceback" not in log.read_text()
    finally:
        _stop(relay)


# -- listeners -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sighup_with_a_shorter_delivery_timeout_cuts_the_waits_under_way(
    tmp_path: Path,
) -> None:
    """A relay waits 10 minutes for an application that has stopped answering; the
    operator lowers delivery_timeout and reloads. The data already waiting gets its
    verdict within the new timeout, not the old one, and the originator its report."""
    edge, mesh = free_ports(2)
    _prepare_users(tmp_path / "imxp-state", "fred", "barney")
    _config(tmp_path, edge, mesh, "delivery_timeout = 600.0\n")
    relay, log = _start(tmp_path, tmp_path / "relay.toml")
    try:
        await until(lambda: log.read_text().count("listening on") >= 2, "listeners", 20)
        ca = tmp_path / "imxp-state" / "ca.pem"
        barney = await _attach(edge, ca, "barney@localhost", _Silent)
        fred = await _attach(edge, ca, "fred@localhost")
        await fred.channel.send(wire.encode(_data(1)))
        await barney.wait("data", 1)

        _config(tmp_path, edge, mesh, "delivery_timeout = 1.0\n")
        relay.send_signal(signal.SIGHUP)
        await until(lambda: "SIGHUP: reloaded" in log.read_text(), "the reload", 10)
        assert "changed: delivery_timeout" in log.read_text()
        await fred.wait("reports", 1, timeout=10)
        ((_, code, text),) = fred.reports[0].destinations
        assert (code, text) == (451, "endpoint did not answer in time; outcome unknown")
        assert "takes a restart" not in log.read_text()
    finally:
        _stop(relay)


async def _for_a_next_hop_that_is_down(fred: App, log: Path) -> None:
    """fred sends a data for down.test, whose route leads to a closed port; it waits in
    flight once the relay has tried that next hop and failed."""
    data = wire.Data(
        wire.Originator("fred@localhost", []),
        [wire.Recipient("barney@down.test", [])],
        [],
        content=wire.Content.from_bytes(b"for later", "text/plain"),
    )
    assert isinstance(wire.decode(await fred.channel.send(wire.encode(data))), wire.OK)
    await until(lambda: "no link to down.test" in log.read_text(), "the failed link", 10)


@pytest_twisted.ensureDeferred
async def test_sigusr1_logs_what_the_relay_is_doing(tmp_path: Path) -> None:
    """An operator asks a running relay what it is doing, as Exim's exiwhat does: SIGUSR1
    logs its sessions, attached endpoints and data in flight, and each next hop with its
    link or its trouble - here one that refuses connections, with the data for it
    waiting - at any log level, and the relay goes on."""
    edge, mesh, closed = free_ports(3)
    _prepare_users(tmp_path / "imxp-state", "fred")
    extra = f'log_level = "warn"\n[routes]\n"down.test" = "127.0.0.1:{closed}"\n'
    relay, log = _start(tmp_path, _config(tmp_path, edge, mesh, extra))
    try:
        await until(lambda: "listening on" in log.read_text(), "listeners", 20)
        fred = await _attach(edge, tmp_path / "imxp-state" / "ca.pem", "fred@localhost")
        await _for_a_next_hop_that_is_down(fred, log)

        relay.send_signal(signal.SIGUSR1)
        await until(lambda: "status: next hop" in log.read_text(), "the status", 10)
        text = log.read_text()
        assert "status: sessions 1 (1 logged in); endpoints attached 1" in text
        assert "data in flight 1; next hops 1;" in text
        assert f"status: next hop down.test at 127.0.0.1:{closed}: backing off" in text
        assert relay.poll() is None
        assert "Traceback" not in text
    finally:
        _stop(relay)


async def _imxp(directory: Path, *args: str) -> tuple[int, str, str]:
    """Run the ``imxp`` command; its exit status, standard output and standard error."""
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, ["-m", "imxp", *args], env=_env(), path=str(directory)
    )
    return code, out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_imxp_status_and_imxp_reload_ask_the_running_relay(tmp_path: Path) -> None:
    """The operator asks the relay itself rather than reading its log, as with postqueue or
    prosodyctl: `imxp status` prints what it is doing, `--json` the same for a monitoring
    script, and `imxp reload` says what the reload changed, or exits 8 with the reason the
    relay refused the file while it goes on as it was; a mistake elsewhere in the file does
    not keep the command from finding the relay. Only the relay's user may ask (the
    socket's mode is 0600), and with the relay gone the command says no relay answers."""
    edge, mesh, closed = free_ports(3)
    _prepare_users(tmp_path / "imxp-state", "fred")
    extra = f'log_level = "warn"\n[routes]\n"down.test" = "127.0.0.1:{closed}"\n'
    config = _config(tmp_path, edge, mesh, extra)
    relay, log = _start(tmp_path, config)
    socket_path = tmp_path / "imxp-state" / "control"
    try:
        await until(lambda: socket_path.exists(), "the control socket", 20)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        fred = await _attach(edge, tmp_path / "imxp-state" / "ca.pem", "fred@localhost")
        await _for_a_next_hop_that_is_down(fred, log)

        code, out, err = await _imxp(tmp_path, "status", "--config", str(config))
        assert (code, err) == (0, "")
        assert "relay for localhost: up " in out and ", accepting data" in out
        assert "endpoints attached: 1 " in out and "data in flight: 1\n" in out
        assert f"down.test at 127.0.0.1:{closed}: backing off" in out
        code, out, err = await _imxp(tmp_path, "status", "--json", "--config", str(config))
        status = json.loads(out)
        assert status["attached"] == 1 and status["in_flight"] == 1
        assert [hop["state"] for hop in status["next_hops"]] == ["backing off"]

        config.write_text(
            config.read_text().replace("[routes]", "delivery_timeout = 30.0\n[routes]")
        )
        code, out, err = await _imxp(tmp_path, "reload", "--config", str(config))
        assert (code, err) == (0, "")
        assert out.startswith("imxp reload: reloaded ") and "changed: delivery_timeout" in out
        assert "imxp reload: reloaded" in log.read_text()

        # A file the command reads (it names the socket) but the relay cannot use.
        _config(tmp_path, edge, mesh, 'tls_certificate = "renewed.pem"\n')
        code, out, err = await _imxp(tmp_path, "reload", "--config", str(config))
        assert code == 8 and "not reloaded, the relay goes on as it was" in err
        assert "renewed.pem does not exist" in err
        code, out, err = await _imxp(tmp_path, "status", "--config", str(config))
        assert code == 0 and "data in flight: 1\n" in out

        # A mistake being edited, away from the options that name the socket: status still
        # answers, and the relay itself refuses the reload and names the option.
        config.write_text(config.read_text() + "delivry_timeout = 30.0\n")
        code, out, err = await _imxp(tmp_path, "status", "--config", str(config))
        assert (code, err) == (0, "") and "data in flight: 1\n" in out
        code, out, err = await _imxp(tmp_path, "reload", "--config", str(config))
        assert code == 8 and "not reloaded, the relay goes on as it was" in err
        assert f"{config}: unknown option 'delivry_timeout'" in err
        assert "did you mean 'delivery_timeout'?" in err

        relay.send_signal(signal.SIGTERM)
        await until(lambda: relay.poll() is not None, "the relay to stop", 30)
        assert not socket_path.exists()
        code, out, err = await _imxp(tmp_path, "status", "--config", str(config))
        assert code == 5 and f"no relay answers at {socket_path}" in err
        assert "Traceback" not in log.read_text()
    finally:
        _stop(relay)


@pytest_twisted.ensureDeferred
async def test_a_listen_address_in_use_stops_the_relay_with_an_error(tmp_path: Path) -> None:
    """Another process holds the edge port. The relay cannot serve its endpoints, so it must
    say so and exit non-zero (systemd then reports the failure) rather than run on, silent,
    with its mesh port never opened either."""
    edge, mesh = free_ports(2)
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", edge))
    holder.listen()
    relay, log = _start(tmp_path, _config(tmp_path, edge, mesh))
    try:
        await until(lambda: relay.poll() is not None, "the relay to give up", 10)
        assert relay.returncode != 0
        text = log.read_text()
        assert str(edge) in text
        assert "Traceback" not in text
    finally:
        holder.close()
        _stop(relay)


def test_a_listen_address_in_use_stops_a_daemonised_relay_too(tmp_path: Path) -> None:
    """The README's walk-through starts relays daemonised: twistd's first process waits for
    the daemon to say it started. It must hear of the failure and exit 1, leaving no pid
    file, rather than wait for ever."""
    edge, mesh = free_ports(2)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", edge))
        holder.listen()
        pidfile, log = tmp_path / "relay.pid", tmp_path / "relay.log"
        config = _config(tmp_path, edge, mesh)
        started = subprocess.run(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={log}", "imxp", "--config", str(config)],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            timeout=60,
        )
    assert started.returncode == 1
    assert "cannot listen on" in started.stderr.decode()
    assert f"cannot listen on tcp:{edge}:interface=127.0.0.1" in log.read_text()
    # twistd's daemon tells the first process of the failure, then removes its pid file
    # as it exits: on a busy host the first process may have ended in between.
    gone_by = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not pidfile.exists()


def test_tls_from_the_first_octet_is_refused_like_ssl(tmp_path: Path) -> None:
    """config.py refuses `ssl:` listeners because BEEP starts TLS inside the session; the
    `tls:` endpoint of Twisted is the same thing (TLS from the first octet, with SNI) and
    must be refused too, naming the option, instead of a relay no endpoint can speak to."""
    from imxp.config import ConfigError, load

    path = tmp_path / "relay.toml"
    path.write_text('edge_listen = ["tls:9913"]\n')
    try:
        config = load(path)
    except ConfigError as e:
        assert "edge_listen" in str(e)
    else:
        raise AssertionError(f"accepted {config.edge_listen!r}")
