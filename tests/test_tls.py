"""TLS tuning (RFC 3080 §3.1) over real loopback TCP with certificates the test makes."""

from __future__ import annotations

import pytest
import pytest_twisted
from beepnet import ECHO_URI, EchoProfile, connect, listen, shutdown

from imxp.beep.message import Message
from imxp.beep.session import SessionClosed
from imxp.beep.tls import TLS_URI, TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.certs import client_identity, create_ca, issue_client


@pytest_twisted.ensureDeferred
async def test_tls_restarts_session_and_verifies_names(test_ca, server_cert):
    tls = TLSProfile(server_options(server_cert("relay.a.test"), [test_ca.certificate]))
    listener = await listen([tls, EchoProfile()])
    session = await connect(listener)
    assert TLS_URI in session.peer_greeting.profiles
    client = issue_client(test_ca, "fred@a.test")
    greeting = await start_tls(
        session, client_options("relay.a.test", [test_ca.certificate], client)
    )
    # §3: a new greeting after the handshake; TLS is no longer on offer.
    assert TLS_URI not in greeting.profiles
    assert ECHO_URI in greeting.profiles
    assert session.tls_active
    assert session.peer_certificate is not None
    server_side = listener.sessions[0]
    assert server_side.tls_active
    assert client_identity(server_side.peer_certificate) == "fred@a.test"
    channel = await session.start_channel([ECHO_URI])
    # Channel numbering restarted with the session: 1 again.
    assert channel.number == 1
    reply = await channel.send(Message(b"over TLS", "text/plain"))
    assert reply.body == b"over TLS"
    await shutdown(listener, session)


@pytest_twisted.ensureDeferred
async def test_wrong_name_is_refused(test_ca, server_cert):
    tls = TLSProfile(server_options(server_cert("relay.a.test"), [test_ca.certificate]))
    listener = await listen([tls, EchoProfile()])
    session = await connect(listener)
    with pytest.raises(SessionClosed):
        await start_tls(session, client_options("relay.b.test", [test_ca.certificate]))
    await session.when_closed()
    await shutdown(listener, session)


@pytest_twisted.ensureDeferred
async def test_untrusted_ca_is_refused(test_ca, server_cert):
    other_ca = create_ca("somebody else")
    tls = TLSProfile(server_options(server_cert("relay.a.test")))
    listener = await listen([tls, EchoProfile()])
    session = await connect(listener)
    with pytest.raises(SessionClosed):
        await start_tls(session, client_options("relay.a.test", [other_ca.certificate]))
    await shutdown(listener, session)
