"""``twistd -n imxp`` as an operator runs it: no configuration, then SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import endpoints, reactor, task

from imxp.apex.wire import APEX_URI
from imxp.beep.sasl import authenticate
from imxp.beep.saslmech import ScramSHA256Client, profile_uri
from imxp.beep.session import Role, Session, SessionFactory
from imxp.beep.tls import TLS_URI, start_tls
from imxp.beep.tlsctx import client_options
from imxp.beep.users import UserStore
from imxp.certs import load_certificates

EDGE_PORT = 9913  # the embedded default, on loopback
ROOT = Path(__file__).resolve().parent.parent


async def _until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.1, lambda: None)
        waited += 0.1


@pytest_twisted.ensureDeferred
async def test_twistd_imxp_runs_with_no_configuration_and_stops_on_sigterm(tmp_path: Path):
    log = tmp_path / "twistd.log"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "imxp",
            ],
            cwd=tmp_path,
            # The relay runs in a fresh directory; it must still find this checkout.
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await _until(lambda: log.read_text().count("listening on") >= 2, 30, "the listeners")
        state = tmp_path / "imxp-state"
        # First start: a development CA, a relay certificate and a user store, announced.
        text = log.read_text()
        for made in ("ca.pem", "relay.pem", "users"):
            assert (state / made).exists()
            assert str(state / made) in text
        assert oct((state).stat().st_mode & 0o777) == "0o700"
        UserStore(state / "users").add("fred", "a password for the test")

        factory = SessionFactory(Role.INITIATOR)
        where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", EDGE_PORT)
        session: Session = await where.connect(factory)
        greeting = await session.greeted()
        # Before TLS only TLS is on offer.
        assert greeting.profiles == (TLS_URI,)
        trust = load_certificates(state / "ca.pem")
        greeting = await start_tls(session, client_options("localhost", trust))
        assert APEX_URI in greeting.profiles
        assert profile_uri("SCRAM-SHA-256") in greeting.profiles
        # A user added while the relay runs can log in.
        scram = ScramSHA256Client("fred", "a password for the test")
        assert await authenticate(session, scram, identity="fred") == "fred"
        session.disconnect()

        # The imxp command, run where the relay runs, finds it with no --relay or --ca.
        imxp = [sys.executable, "-m", "imxp"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
            "IMXP_PASSWORD": "a password for the test",
        }
        listen = subprocess.Popen(
            [*imxp, "listen", "--as", "fred@localhost", "--count", "1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await _until(lambda: "fred@localhost attached" in log.read_text(), 30, "listen")
            send = subprocess.run(
                [*imxp, "send", "--from", "fred/cli@localhost", "--to", "fred@localhost", "hi"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (send.returncode, send.stdout) == (0, "fred@localhost: delivered (250)\n")
            out, _err = listen.communicate(timeout=30)
            assert out.decode().rstrip().endswith("fred/cli@localhost: hi")
        finally:
            if listen.poll() is None:
                listen.kill()
                listen.wait()

        relay.send_signal(signal.SIGTERM)
        await _until(lambda: relay.poll() is not None, 20, "the relay to exit")
        # twistd ends by re-raising the signal once shut down, as Unix daemons do;
        # systemd counts that as a clean stop.
        assert relay.returncode in (0, -signal.SIGTERM)
        text = log.read_text()
        assert "Received SIGTERM, shutting down" in text
        assert "Server Shut Down" in text
        assert "relay for localhost stopped" in text
        assert "Traceback" not in text
    finally:
        if relay.poll() is None:
            os.kill(relay.pid, signal.SIGKILL)
            relay.wait()
