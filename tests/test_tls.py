"""TLS tuning (RFC 3080 §3.1) over real loopback TCP with certificates the test makes."""

from __future__ import annotations

import socket
import ssl

import pytest
import pytest_twisted
from beepnet import ECHO_URI, EchoProfile, connect, listen, shutdown
from twisted.internet import reactor, threads

from imxp.beep.message import Message
from imxp.beep.session import SessionClosed, SessionConfig
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


@pytest_twisted.ensureDeferred
async def test_a_peer_closing_tls_while_our_writes_wait_still_ends_the_session(
    test_ca, server_cert
):
    # A relay shutting down closes TLS while its endpoint's writes are paused (its TCP
    # buffer full). Twisted's TLS then closes the connection under the session, still its
    # paused producer; once the buffer drained the connection waited for it to go, reading
    # nothing, and the session never learned it had ended: a client never reconnected.
    config = SessionConfig(window=1 << 20, max_message_size=4 << 20)
    tls = TLSProfile(server_options(server_cert("relay.a.test"), [test_ca.certificate]))
    listener = await listen([tls, EchoProfile()], config)
    session = await connect(listener, config=config)
    await start_tls(session, client_options("relay.a.test", [test_ca.certificate]))
    channel = await session.start_channel([ECHO_URI])
    await channel.send(Message(b"warm", "text/plain"))
    # More than the transport buffers before it pauses its producer (64 KiB), at once.
    big = channel.send(Message(b"x" * (1 << 20), "application/octet-stream"))
    big.addErrback(lambda failure: failure.trap(SessionClosed))
    listener.sessions[-1].disconnect()
    closed = session.when_closed()
    # Not a measure of time: a session that never ends would leave the test waiting for ever.
    await closed.addTimeout(30, reactor)
    await big
    await shutdown(listener)


def _tls_then_silence(port: int) -> bool:
    """A peer that takes up TLS (RFC 3080 §3.1) and then says nothing more, not even the
    close_notify that answers ours. Whether the listener ended the TCP connection."""
    greeting = b"Content-Type: application/beep+xml\r\n\r\n<greeting />"
    start = (
        b"Content-Type: application/beep+xml\r\n\r\n<start number='1'><profile uri='"
        + TLS_URI.encode()
        + b"'><![CDATA[<ready />]]></profile></start>"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
        heard = b""
        while b"END\r\n" not in heard:
            heard += plain.recv(4096)
        plain.sendall(
            b"RPY 0 0 . 0 %d\r\n%sEND\r\n" % (len(greeting), greeting)
            + b"MSG 0 1 . %d %d\r\n%sEND\r\n" % (len(greeting), len(start), start)
        )
        heard = b""
        while b"<proceed" not in heard:
            heard += plain.recv(4096)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        secured = context.wrap_socket(plain, server_hostname="relay.a.test")
        secured.recv(4096)  # the listener's new greeting
        # From here on only the raw socket is read, so nothing answers the close_notify.
        with socket.socket(fileno=secured.detach()) as raw:
            raw.settimeout(30)
            try:
                while raw.recv(4096):
                    pass
            except TimeoutError:
                return False
            except ConnectionResetError:
                pass  # cut rather than closed: ended all the same
            return True


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_our_close_cannot_keep_the_connection(test_ca, server_cert):
    """Twisted's TLS closes the socket only once the peer answers our close_notify. A peer
    that goes silent after TLS, past the idle timeout, kept its connection, and a file
    descriptor of the relay's, for ever: enough of them and nobody could connect."""
    # The idle timeout leaves room for the handshake on a busy host; it is not measured.
    config = SessionConfig(idle_timeout=2.0, close_timeout=0.5)
    tls = TLSProfile(server_options(server_cert("relay.a.test"), [test_ca.certificate]))
    listener = await listen([tls, EchoProfile()], config)
    ended = await threads.deferToThread(_tls_then_silence, listener.address[1])
    assert ended
    [session] = listener.sessions
    await session.when_closed()
    await shutdown(listener)
