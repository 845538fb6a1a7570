"""The SASL family of profiles (RFC 3080 §4.1): listener glue, initiator, throttle.

Most tests run two sessions in memory (twisted.test.iosim) on a task.Clock; the last ones
run TLS and then SASL over real loopback TCP with certificates the test makes.
"""

from __future__ import annotations

import base64
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from beepnet import ECHO_URI, EchoProfile, connect, listen, shutdown
from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import capturedLogs
from twisted.python.failure import Failure as TwistedFailure
from twisted.test import iosim
from zope.interface import implementer

from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import SASLProfile, authenticate, sasl_profiles
from imxp.beep.saslmech import (
    MAX_RESPONSE_OCTETS,
    AnonymousClient,
    ClientMechanism,
    ExternalClient,
    PeerRealm,
    PlainClient,
    SASLClientError,
    ScramSHA256Client,
    make_portal,
    profile_uri,
)
from imxp.beep.session import (
    TUNING_MESSAGE_SIZE,
    BEEPError,
    Channel,
    Profile,
    Role,
    Session,
    SessionConfig,
)
from imxp.beep.tls import TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.beep.users import ExternalChecker, FailureThrottle, UserStore
from imxp.certs import Issued, issue_client

PASSWORD = "correct horse battery"
SCRAM = "SCRAM-SHA-256"
ALL = (SCRAM, "PLAIN", "ANONYMOUS", "EXTERNAL")
HOST = "192.0.2.7"


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    users = UserStore(tmp_path / "users")
    users.add("alice", PASSWORD)
    return users


@pytest.fixture
def fred(test_ca: Issued) -> Issued:
    return issue_client(test_ca, "fred@a.test")


def portal_for(store: UserStore, realm: PeerRealm | None = None) -> Any:
    return make_portal([store, ExternalChecker(), AllowAnonymousAccess()], realm)


class Pair:
    """A listener and an initiator connected in memory; the listener sees ``host`` and has
    ``config``."""

    def __init__(
        self,
        profiles: Sequence[Profile],
        *,
        clock: task.Clock | None = None,
        host: str = HOST,
        certificate: Issued | None = None,
        tls: bool = False,
        config: SessionConfig | None = None,
    ) -> None:
        self.clock = clock or task.Clock()
        self.L = Session(Role.LISTENER, profiles, config, clock=self.clock)
        # What a TLS handshake would have set (Session.handshakeCompleted).
        self.L.peer_certificate = certificate.certificate if certificate else None
        self.L.tls_active = tls
        self.I = Session(Role.INITIATOR, (), clock=self.clock)
        peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.L,
            lambda: self.I,
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, peerAddress=peer),
            greet=False,
        )
        self.flush()

    def flush(self) -> None:
        for _ in range(10_000):
            if not self.pump.pump(advanceClock=False):
                return
        raise AssertionError("the sessions never went quiet")

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
        d = defer.ensureDeferred(coroutine)
        self.flush()
        return d

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def start(self, mechanism: str, content: bytes | None = None) -> Channel:
        """Start a SASL channel by hand, with ``content`` piggybacked as is."""
        d = self.I.start_channel([mgmt.ProfileElement(profile_uri(mechanism), content)])
        self.flush()
        return result(d)

    def send(self, channel: Channel, body: bytes, content_type: str = mgmt.BEEP_XML) -> Any:
        d = channel.send(Message(body, content_type))
        self.flush()
        return d


def result(d: defer.Deferred[Any]) -> Any:
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], TwistedFailure):
        box[0].raiseException()
    return box[0]


def failure(d: defer.Deferred[Any], kind: type[Exception] = BEEPError) -> Any:
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    assert isinstance(box[0], TwistedFailure), box[0]
    assert box[0].check(kind), box[0]
    return box[0].value


def error_of(content: bytes | None) -> tuple[int, str]:
    parsed = mgmt.parse_error(content or b"")
    assert parsed is not None, content
    return parsed.code, parsed.text


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class WithoutInitial:
    """A client mechanism that sends no initial response, leaving the first move to the
    server's (empty) challenge, as RFC 4422 §5 allows."""

    def __init__(self, inner: ClientMechanism) -> None:
        self.inner = inner
        self.name = inner.name

    def initial(self) -> bytes | None:
        return None

    def step(self, challenge: bytes) -> bytes:
        return self.inner.step(challenge)

    def verify_final(self, data: bytes | None) -> None:
        self.inner.verify_final(data)


def sasl_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "beep.sasl-failure"]


# -- offering (§4, §4.1.3) -------------------------------------------------------------


def test_greeting_offers_what_can_work(store, fred):
    portal = portal_for(store)
    pair = Pair(sasl_profiles(ALL, portal, scram_store=store))
    # PLAIN is offered before TLS (its exchange then says 538); EXTERNAL needs a certificate.
    assert pair.I.peer_greeting.profiles == tuple(map(profile_uri, ALL[:3]))
    pair = Pair(sasl_profiles(ALL, portal, scram_store=store), certificate=fred)
    assert pair.I.peer_greeting.profiles == tuple(map(profile_uri, ALL))
    pair = Pair(sasl_profiles(ALL, portal))
    assert profile_uri(SCRAM) not in pair.I.peer_greeting.profiles


def test_unknown_mechanism_is_a_configuration_error(store):
    with pytest.raises(ValueError):
        SASLProfile("DIGEST-MD6", portal_for(store))


# -- each mechanism succeeds ------------------------------------------------------------


def test_scram_succeeds_and_closes_its_channel(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    d = pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD), identity="alice"))
    assert result(d) == "alice"
    assert pair.L.authenticated_identity == "alice"
    assert pair.L.authenticated_mechanism == SCRAM
    assert pair.I.authenticated_identity == "alice"
    assert pair.I.authenticated_mechanism == SCRAM
    # The SASL channel was closed once the exchange was over.
    assert list(pair.L.channels) == [0] and list(pair.I.channels) == [0]


def test_plain_over_tls_succeeds(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), tls=True)
    d = pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True)))
    # Without identity= the initiator does not claim to know who it is to the peer.
    assert result(d) == ""
    assert pair.I.authenticated_identity is None
    assert pair.I.authenticated_mechanism == "PLAIN"
    assert pair.L.authenticated_identity == "alice"


def test_anonymous_succeeds(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    result(pair.run(authenticate(pair.I, AnonymousClient("trace@example.com"))))
    assert pair.L.authenticated_identity == "anonymous"
    assert pair.L.authenticated_mechanism == "ANONYMOUS"


def test_external_succeeds_with_the_certificate_identity(store, fred):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), certificate=fred)
    result(pair.run(authenticate(pair.I, ExternalClient())))
    assert pair.L.authenticated_identity == "fred@a.test"
    assert pair.L.authenticated_mechanism == "EXTERNAL"


def test_external_with_matching_authzid_succeeds(store, fred):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), certificate=fred)
    result(pair.run(authenticate(pair.I, ExternalClient("fred@a.test"))))
    assert pair.L.authenticated_identity == "fred@a.test"


@pytest.mark.parametrize(
    "client",
    [
        lambda: ScramSHA256Client("alice", PASSWORD),
        lambda: PlainClient("alice", PASSWORD, tls_active=True),
        lambda: AnonymousClient(),
    ],
)
def test_without_initial_response_the_server_challenges_first(store, client):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), tls=True)
    channel = pair.start("ANONYMOUS")
    # §4.1.1 (the CRAM-MD5 example) and RFC 4422 §5: an empty challenge in the start reply.
    assert channel.start_reply == b"<blob status='continue' />"
    result(pair.run(authenticate(pair.I, WithoutInitial(client()))))
    assert pair.L.authenticated_identity in ("alice", "anonymous")


# -- failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        lambda: ScramSHA256Client("alice", "wrong password"),
        lambda: PlainClient("alice", "wrong password", tls_active=True),
        lambda: ScramSHA256Client("nobody", PASSWORD),
        lambda: PlainClient("nobody", PASSWORD, tls_active=True),
    ],
    ids=["scram-password", "plain-password", "scram-unknown-user", "plain-unknown-user"],
)
def test_bad_credentials_get_535(store, client):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), tls=True)
    with capturedLogs() as events:
        error = failure(pair.run(authenticate(pair.I, client())))
    assert (error.code, error.text) == (535, "authentication failure")
    assert pair.L.authenticated_identity is None
    assert pair.I.authenticated_mechanism is None
    # Logged once, by mechanism and host, and never with the password.
    [event] = sasl_events(events)
    assert (event["mechanism"], event["peer"], event["code"]) == (client().name, HOST, 535)
    assert PASSWORD not in repr(events) and "wrong password" not in repr(events)
    # The session goes on: a good attempt on a new channel succeeds.
    result(pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True))))
    assert pair.L.authenticated_identity == "alice"


def test_scram_failure_is_an_err_on_the_channel(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    client = ScramSHA256Client("alice", "wrong password")
    channel = pair.start(SCRAM, b"<blob>" + b64(client.initial() or b"") + b"</blob>")
    status_blob = channel.start_reply or b""
    assert status_blob.startswith(b"<blob status='continue'>")
    challenge = base64.b64decode(status_blob[len(b"<blob status='continue'>") : -len(b"</blob>")])
    final = client.step(challenge)
    # §4.1.1's last example: ERR with <error code='535'> on the SASL channel.
    error = failure(pair.send(channel, b"<blob>" + b64(final) + b"</blob>"))
    assert error.code == 535


def test_plain_without_tls_gets_538_and_the_channel_is_created(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    channel = pair.start("PLAIN")
    # §4.1.1: a positive reply to start, with the error inside it.
    assert error_of(channel.start_reply)[0] == 538
    assert channel.number in pair.L.channels
    # A client that believes TLS is on is told the same, whatever it sent.
    client = PlainClient("alice", PASSWORD, tls_active=True)
    assert failure(pair.run(authenticate(pair.I, client))).code == 538
    assert pair.L.authenticated_identity is None


def test_plain_client_will_not_send_a_password_without_tls(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    failure(
        pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=False))),
        SASLClientError,
    )
    assert list(pair.I.channels) == [0]
    # Waiting for the server's first move, it hears 538 before it would send the password.
    careful = WithoutInitial(PlainClient("alice", PASSWORD, tls_active=False))
    assert failure(pair.run(authenticate(pair.I, careful))).code == 538


def test_external_without_certificate_is_not_offered(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), tls=True)
    error = failure(pair.run(authenticate(pair.I, ExternalClient())))
    assert error.code == 550
    assert list(pair.L.channels) == [0]


def test_external_authzid_mismatch_gets_537(store, fred):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), certificate=fred)
    error = failure(pair.run(authenticate(pair.I, ExternalClient("barney@a.test"))))
    assert error.code == 537
    assert pair.L.authenticated_identity is None


def test_external_identity_refused_by_policy_gets_535(store, fred):
    portal = make_portal([ExternalChecker(allowed={"wilma@a.test"})])
    pair = Pair(sasl_profiles(["EXTERNAL"], portal), certificate=fred)
    assert failure(pair.run(authenticate(pair.I, ExternalClient()))).code == 535


def test_anonymous_without_a_checker_gets_534(store):
    pair = Pair(sasl_profiles(["ANONYMOUS"], make_portal([store])))
    assert failure(pair.run(authenticate(pair.I, AnonymousClient()))).code == 534


def test_client_abort_by_hand(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    channel = pair.start(SCRAM)
    assert channel.start_reply == b"<blob status='continue' />"
    # §4.1.3: a client aborts with status='abort'; RFC 4422 §3.5: the outcome is failure.
    error = failure(pair.send(channel, b"<blob status='abort' />"))
    assert error.code == 535
    # The exchange is over on this channel.
    assert failure(pair.send(channel, b"<blob />")).code == 550
    assert pair.L.authenticated_identity is None


def test_client_aborts_when_the_server_asks_too_much(store):
    throttle = FailureThrottle(task.Clock(), base=1.0)
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store, throttle=throttle))
    client = ScramSHA256Client("alice", PASSWORD, max_iterations=1000)
    with capturedLogs() as events:
        failure(pair.run(authenticate(pair.I, client)), SASLClientError)
    [event] = sasl_events(events)
    assert event["code"] == 535 and "abort" in event["text"]
    assert pair.L.authenticated_identity is None
    assert list(pair.L.channels) == [0]
    # An abort is no guess at a password: not throttled.
    assert throttle.delay_for(HOST) == 0


class LyingProfile(Profile):
    """Claims SCRAM success without the server signature."""

    uri = profile_uri(SCRAM)

    def start(self, session: Session, channel: Channel, init: bytes | None) -> bytes:
        return b"<blob status='complete'>" + b64(b"v=bm90IGEgc2lnbmF0dXJl") + b"</blob>"


def test_unproven_server_success_ends_the_session():
    pair = Pair([LyingProfile()])
    d = pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD), identity="alice"))
    failure(d, SASLClientError)
    assert pair.I.authenticated_identity is None
    assert pair.I.transport is None and pair.L.transport is None


@pytest.mark.parametrize(
    "content,code",
    [
        (b"<blob", 500),
        (b"<!DOCTYPE blob [<!ENTITY a 'b'>]><blob>&a;</blob>", 500),
        (b"<response>AAAA</response>", 501),
        (b"<blob><x /></blob>", 501),
        (b"<blob status='done' />", 501),
        (b"<blob status='complete' />", 501),
        (b"<blob>@@@@</blob>", 501),
        (b"<blob>QUJD=</blob>", 501),
    ],
)
def test_malformed_blob_piggybacked_or_sent(store, content, code):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    with capturedLogs() as events:
        channel = pair.start(SCRAM, content)
        assert error_of(channel.start_reply)[0] == code
        channel = pair.start(SCRAM)
        assert failure(pair.send(channel, content)).code == code
    assert not any(e.get("log_failure") for e in events)
    assert [e["code"] for e in sasl_events(events)] == [code, code]
    # Nothing escaped: the session is fine and a proper attempt succeeds.
    result(pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD))))
    assert pair.L.authenticated_identity == "alice"


def test_oversized_or_mistyped_blob(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    channel = pair.start(SCRAM)
    assert failure(pair.send(channel, b"<blob />", "text/plain")).code == 500
    assert failure(pair.send(channel, b"<blob>" + b"QUJD" * 3000 + b"</blob>")).code == 501


# -- one authentication per session (§4) -----------------------------------------------


def test_second_authentication_is_refused(store):
    profiles = sasl_profiles(ALL, portal_for(store), scram_store=store)
    pair = Pair(profiles, tls=True)
    result(pair.run(authenticate(pair.I, AnonymousClient())))
    assert not any(p.offered(pair.L) for p in profiles)
    error = failure(pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True))))
    assert error.code == 550
    assert pair.L.authenticated_identity == "anonymous"


def test_blob_after_success_on_the_same_channel_is_refused(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    channel = pair.start("ANONYMOUS", b"<blob />")
    assert channel.start_reply == b"<blob status='complete' />"
    assert failure(pair.send(channel, b"<blob />")).code == 550


def test_concurrent_exchanges_only_one_wins(store):
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store))
    first, second = pair.start("ANONYMOUS"), pair.start("ANONYMOUS")
    d1 = first.send(Message(b"<blob />", mgmt.BEEP_XML))
    d2 = second.send(Message(b"<blob />", mgmt.BEEP_XML))
    pair.flush()
    assert result(d1).body == b"<blob status='complete' />"
    assert failure(d2).code == 550


# -- throttle and logout ---------------------------------------------------------------


def test_after_a_failure_the_next_attempt_waits_and_success_resets(store):
    clock = task.Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0)
    profiles = sasl_profiles(ALL, portal_for(store), scram_store=store, throttle=throttle)
    pair = Pair(profiles, clock=clock)
    # A failure is answered at once...
    error = failure(pair.run(authenticate(pair.I, ScramSHA256Client("alice", "wrong password"))))
    assert error.code == 535
    # ...and the next attempt is worked on base seconds later...
    d = pair.run(authenticate(pair.I, ScramSHA256Client("alice", "wrong password")))
    pair.advance(0.999)
    assert not d.called
    pair.advance(0.001)
    assert failure(d).code == 535
    # ...the one after that twice as long after the second failure.
    d = pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD)))
    pair.advance(1.999)
    assert pair.L.authenticated_identity is None
    pair.advance(0.001)
    result(d)
    assert pair.L.authenticated_identity == "alice"
    # Success forgets the address's failures: a new connection starts afresh.
    assert throttle.delay_for(HOST) == 0
    assert len(throttle) == 0
    again = Pair(profiles, clock=clock)
    d = again.run(authenticate(again.I, ScramSHA256Client("alice", "wrong password")))
    assert failure(d).code == 535


def test_other_hosts_failures_do_not_delay_this_one(store):
    clock = task.Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0)
    profiles = sasl_profiles(ALL, portal_for(store), scram_store=store, throttle=throttle)
    for _ in range(3):
        throttle.failed("198.51.100.1")
    pair = Pair(profiles, clock=clock, tls=True)
    d = pair.run(authenticate(pair.I, PlainClient("alice", "wrong", tls_active=True)))
    assert failure(d).code == 535
    d = pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True)))
    # Only this host's first failure counts here.
    pair.advance(0.999)
    assert not d.called
    pair.advance(0.001)
    result(d)


def test_failures_count_against_the_ipv6_64_and_the_log_names_the_address(store):
    clock = task.Clock()
    throttle = FailureThrottle(clock, base=1.0, cap=30.0)
    profiles = sasl_profiles(ALL, portal_for(store), scram_store=store, throttle=throttle)

    def waited(host: str) -> float:
        pair = Pair(profiles, clock=clock, host=host)
        with capturedLogs() as events:
            d = pair.run(authenticate(pair.I, ScramSHA256Client("alice", "wrong password")))
            waited = 0.0
            while not d.called:
                assert waited < 60, "never answered"
                pair.advance(0.5)
                waited += 0.5
        assert failure(d).code == 535
        (event,) = [e for e in events if e.get("event") == "beep.sasl-failure"]
        assert event["peer"] == host
        return waited

    # A guesser hopping from address to address within its /64 meets a growing delay...
    assert waited("2001:db8:1:2::a") == 0.0
    assert waited("2001:db8:1:2::b") == 1.0
    assert waited("2001:db8:1:2:ffff::c") == 2.0
    # ...while another site's /64 starts afresh.
    assert waited("2001:db8:1:3::a") == 0.0


# -- guessing is slowed before the work, not after it ---------------------------------


@implementer(ICredentialsChecker)
class CheckRecorder:
    """Passes password checks to ``store``, noting when each was made; with ``park``,
    holds each until the test lets it go (as a check in a thread takes its time)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: UserStore, clock: task.Clock, *, park: bool = False) -> None:
        self.store = store
        self.clock = clock
        self.park = park
        self.times: list[float] = []
        self.parked: list[tuple[Any, defer.Deferred[Any]]] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        self.times.append(self.clock.seconds())
        if not self.park:
            return self.store.requestAvatarId(credentials)
        d: defer.Deferred[Any] = defer.Deferred()
        self.parked.append((credentials, d))
        return d

    def release(self) -> None:
        credentials, d = self.parked.pop(0)
        self.store.requestAvatarId(credentials).chainDeferred(d)


def plain_blob(password: str, username: str = "alice") -> bytes:
    return b"<blob>" + b64(f"\0{username}\0{password}".encode()) + b"</blob>"


def plain_guesser(store: UserStore, clock: task.Clock, **throttle: Any) -> Any:
    """A PLAIN listener with a throttle on ``clock``, and what checks passwords for it."""
    checker = CheckRecorder(store, clock, park=throttle.pop("park", False))
    profiles = sasl_profiles(
        ["PLAIN"], make_portal([checker]), throttle=FailureThrottle(clock, **throttle)
    )
    return profiles, checker, profiles[0].throttle


@pytest.mark.parametrize("how", ["piggybacked on starts", "sent on open channels"])
def test_attempts_sent_at_once_on_one_session_are_checked_one_at_a_time(store, how):
    """The flood: guesses sent in parallel on one session's channels. One is checked;
    each other one is refused unchecked with 450, "requested action not taken (e.g., lock
    already in use)" (RFC 3080 §8), and the burst is logged once, not twice a guess."""
    clock = task.Clock()
    profiles, checker, _ = plain_guesser(store, clock, park=True)
    pair = Pair(profiles, clock=clock, tls=True)
    uri = profile_uri("PLAIN")
    # As many as the session's channels before login allow, but for one to log in after.
    guesses = pair.L.config.max_channels_unauthenticated - 1
    with capturedLogs() as events:
        if how == "piggybacked on starts":
            sent = [
                pair.I.start_channel([mgmt.ProfileElement(uri, plain_blob(f"guess {i}"))])
                for i in range(guesses)
            ]
        else:
            channels = [pair.start("PLAIN") for _ in range(guesses)]
            sent = [
                c.send(Message(plain_blob(f"guess {i}"), mgmt.BEEP_XML))
                for i, c in enumerate(channels)
            ]
        pair.advance(0)  # the listener yields to the reactor after frames_per_turn frames
        assert len(checker.parked) == 1
        checker.release()
        pair.flush()
    assert checker.times == [0.0]
    if how == "piggybacked on starts":
        codes = [error_of(result(d).start_reply)[0] for d in sent]
    else:
        codes = [failure(d).code for d in sent]
    assert codes == [535] + [450] * (guesses - 1)
    assert [e["event"] for e in events if str(e.get("event")).startswith("beep.sasl")] == [
        "beep.sasl-busy",
        "beep.sasl-failure",
    ]
    # Once the one at work is answered, the session may try again (after the delay).
    d = pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True)))
    pair.advance(1.0)
    checker.release()
    pair.flush()
    result(d)


def test_a_password_sent_before_the_delay_has_passed_waits_for_it(store):
    """The right password right behind a wrong one, without waiting for its answer: it
    is checked, and accepted, only once the delay the failure caused has passed."""
    clock = task.Clock()
    profiles, checker, _ = plain_guesser(store, clock)
    pair = Pair(profiles, clock=clock, tls=True)
    guess = pair.run(authenticate(pair.I, PlainClient("alice", "wrong", tls_active=True)))
    right = pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True)))
    assert pair.L.authenticated_identity is None
    assert checker.times == [0.0]
    pair.advance(0.999)
    assert pair.L.authenticated_identity is None
    pair.advance(0.001)
    assert pair.L.authenticated_identity == "alice"
    assert checker.times == [0.0, 1.0]
    result(right)
    assert failure(guess).code == 535


def test_guessing_rate_is_bounded_however_many_sessions_and_channels(store):
    """A guesser with 8 sessions from one address, each sending five guesses at once,
    and five more as soon as the first of them is answered: in a minute its passwords are
    checked one at a time, each after the delay its failures so far impose (1 s,
    doubling), as for a guesser who sends one at a time."""
    clock = task.Clock()
    profiles, checker, _ = plain_guesser(store, clock)
    sessions = [Pair(profiles, clock=clock, tls=True) for _ in range(8)]
    answered: list[defer.Deferred[Any] | None] = [None] * len(sessions)
    guesses = 0
    while clock.seconds() < 60:
        for n, pair in enumerate(sessions):
            last = answered[n]
            if last is None or last.called:
                answered[n] = None
                for _ in range(5):
                    guesses += 1
                    client = PlainClient("alice", f"guess {guesses}", tls_active=True)
                    d = pair.run(authenticate(pair.I, client))
                    d.addErrback(lambda f: f.trap(BEEPError))
                    answered[n] = answered[n] or d
        clock.advance(0.25)
        for pair in sessions:
            pair.flush()
    assert guesses > 10 * len(checker.times)
    assert checker.times == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]


def test_failures_on_one_session_slow_the_other_sessions_of_the_address(store):
    clock = task.Clock()
    profiles, checker, _ = plain_guesser(store, clock)
    guesser, user = (Pair(profiles, clock=clock, tls=True) for _ in range(2))
    guess = guesser.run(authenticate(guesser.I, PlainClient("alice", "wrong", tls_active=True)))
    login = user.run(authenticate(user.I, PlainClient("alice", PASSWORD, tls_active=True)))
    assert user.L.authenticated_identity is None
    user.advance(0.999)
    assert user.L.authenticated_identity is None
    user.advance(0.001)
    assert user.L.authenticated_identity == "alice"
    result(login)
    guesser.flush()
    assert failure(guess).code == 535
    # Guesses sent at once on three sessions of another address: checked one at a time.
    others = [Pair(profiles, clock=clock, tls=True, host="192.0.2.99") for _ in range(3)]
    checker.times.clear()
    start = clock.seconds()
    sent = [p.run(authenticate(p.I, PlainClient("alice", "x", tls_active=True))) for p in others]
    for _ in range(40):
        clock.advance(0.25)
        for p in others:
            p.flush()
    assert [t - start for t in checker.times] == [0.0, 1.0, 3.0]
    assert [failure(d).code for d in sent] == [535, 535, 535]


def test_a_user_who_mistyped_logs_in_after_the_short_first_delay(store):
    """A person retypes the password once the mistyped one is refused: accepted one
    second (the first delay) after the mistype. Failures decay, one a minute: someone who
    mistyped five times and comes back three minutes later waits 4 s, not the cap."""
    clock = task.Clock()
    profiles = sasl_profiles(["PLAIN"], portal_for(store), throttle=FailureThrottle(clock))

    def attempt(password: str) -> object:
        """A login on a new session once the last one is answered: its error code, or ""."""
        pair = Pair(profiles, clock=clock, tls=True)
        start = clock.seconds()
        d = pair.run(authenticate(pair.I, PlainClient("alice", password, tls_active=True)))
        while not d.called:
            assert clock.seconds() - start < 60, "never answered"
            pair.advance(0.25)
        d.addErrback(lambda f: f.trap(BEEPError) and f.value.code)
        return result(d)

    start = clock.seconds()
    assert attempt("correct horse batery") == 535
    assert attempt(PASSWORD) == ""
    assert clock.seconds() - start == 1.0
    # Five mistypes, a pause, one more, then the right one.
    for _ in range(5):
        assert attempt("correct horse batery") == 535
    clock.advance(180)
    start = clock.seconds()
    assert attempt("correct horse batery") == 535
    assert attempt(PASSWORD) == ""
    assert clock.seconds() - start == 4.0


def test_the_peer_table_stays_bounded_and_what_it_forgets_waits_no_more(store):
    """Many addresses, each with failures and an attempt waiting for its turn: the table
    keeps max_addresses of them; the waiting attempts of those it evicts are refused with
    454 (temporary authentication failure, RFC 3080 §8) unchecked, not kept."""
    clock = task.Clock()
    profiles, checker, throttle = plain_guesser(store, clock, max_addresses=4)
    waiting = []
    for i in range(10):
        host = f"198.51.100.{i}"
        guesser, user = (Pair(profiles, clock=clock, tls=True, host=host) for _ in range(2))
        guess = guesser.run(authenticate(guesser.I, PlainClient("alice", "x", tls_active=True)))
        login = user.run(authenticate(user.I, PlainClient("alice", PASSWORD, tls_active=True)))
        assert user.L.authenticated_identity is None
        waiting.append((user, login))
        assert len(throttle) <= 4
        guesser.flush()
        assert failure(guess).code == 535
    assert len(checker.times) == 10  # only the guesses: every login waits or was refused
    for user, login in waiting[:6]:
        user.flush()
        assert failure(login).code == 454
        assert user.L.authenticated_identity is None
    clock.advance(1)
    for user, login in waiting[6:]:
        user.flush()
        result(login)
        assert user.L.authenticated_identity == "alice"
    assert len(throttle) == 0


class RecordingRealm(PeerRealm):
    def __init__(self) -> None:
        super().__init__()
        self.logouts: list[str] = []

    def requestAvatar(self, avatarId: object, mind: object, *interfaces: Any) -> Any:
        iface, peer, _ = super().requestAvatar(avatarId, mind, *interfaces)
        return iface, peer, lambda: self.logouts.append(peer.identity)


def test_logout_runs_when_the_session_ends_and_the_factory_hook_stays(store):
    realm = RecordingRealm()
    pair = Pair(sasl_profiles(ALL, portal_for(store, realm), scram_store=store))
    calls: list[str] = []
    pair.L.on_lost = lambda session: calls.append("factory")
    result(pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD))))
    assert realm.logouts == []
    pair.I.disconnect()
    pair.flush()
    assert calls == ["factory"]
    assert realm.logouts == ["alice"]


# -- channels before and after login ----------------------------------------------------


def start_echoes(pair: Pair, count: int) -> list[defer.Deferred[Any]]:
    starts = [pair.I.start_channel([ECHO_URI]) for _ in range(count)]
    pair.flush()
    while not all(d.called for d in starts):
        pair.advance(0)  # the turns in which the listener takes up the starts it was sent
    return starts


def test_until_it_has_logged_in_a_peer_may_open_few_channels(store):
    """Each channel lets a peer leave a window of a message unfinished (RFC 3081 §3.1.4),
    so one that has not said who it is gets max_channels_unauthenticated, room for the
    tuning profiles' channels, and ERR 550 beyond (RFC 3080 §2.3.1.2). Once it has logged
    in it gets as many as max_channels allows, as an application using many needs."""
    profiles = [*sasl_profiles(ALL, portal_for(store), scram_store=store), EchoProfile()]
    pair = Pair(profiles, tls=True)
    allowed = pair.L.config.max_channels_unauthenticated
    *opened, refused = start_echoes(pair, allowed + 1)
    channels = [result(d) for d in opened]
    assert failure(refused).code == 550
    closed = channels[0].close()  # room for the login's channel
    pair.flush()
    result(closed)
    result(pair.run(authenticate(pair.I, PlainClient("alice", PASSWORD, tls_active=True))))
    assert all(isinstance(result(d), Channel) for d in start_echoes(pair, 4 * allowed))


def test_a_peer_whose_certificate_verified_needs_no_login_for_many_channels(fred):
    """A TLS client certificate that verified says who the peer is, as a relay's does on
    the mesh, where no SASL follows (RFC 3340 §4.5.2)."""
    pair = Pair([EchoProfile()], certificate=fred, tls=True)
    allowed = pair.L.config.max_channels_unauthenticated
    assert all(isinstance(result(d), Channel) for d in start_echoes(pair, 4 * allowed))


# -- messages before login ----------------------------------------------------------------


def test_the_longest_sasl_messages_come_well_within_a_relays_bound_before_login(store):
    """A relay takes no message longer than TUNING_MESSAGE_SIZE from a peer that has not
    logged in (SessionConfig.max_message_size_unauthenticated). The longest element the
    SASL profile takes, or one carrying the longest response a mechanism takes, is far
    shorter: it comes to the profile, whose answer is its own. What is longer than the
    bound is refused before it is all there."""
    config = SessionConfig(window=131072, max_message_size_unauthenticated=TUNING_MESSAGE_SIZE)
    pair = Pair(sasl_profiles(ALL, portal_for(store), scram_store=store), tls=True, config=config)

    def answer(mechanism: str, element: bytes) -> BEEPError:
        channel = pair.start(mechanism)
        sent = pair.send(channel, element)
        pair.advance(60)  # an attempt after a failure waits (FailureThrottle)
        return failure(sent)

    password = "x" * (MAX_RESPONSE_OCTETS - len("\0alice\0"))
    assert answer("PLAIN", plain_blob(password)).code == 535
    longest = b"<blob>" + b" " * (2 * MAX_RESPONSE_OCTETS - 13) + b"</blob>"
    taken = answer(SCRAM, longest)  # white space: the mechanism finds no GS2 header in it
    assert (taken.code, taken.text) == (501, "malformed GS2 header")
    refused = answer(SCRAM, b"<blob>" + b" " * TUNING_MESSAGE_SIZE + b"</blob>")
    assert refused.code == 554 and refused.text.endswith("before authentication")
    done = pair.run(authenticate(pair.I, ScramSHA256Client("alice", PASSWORD)))
    pair.advance(60)
    result(done)


# -- over real loopback TCP, after TLS ----------------------------------------------------


async def tls_pair(test_ca, server_cert, store, client: Issued | None = None):
    throttle = FailureThrottle(reactor, base=0.01, cap=0.05)
    tls = TLSProfile(server_options(server_cert("relay.a.test"), [test_ca.certificate]))
    sasl = sasl_profiles(ALL, portal_for(store), scram_store=store, throttle=throttle)
    listener = await listen([tls, *sasl])
    session = await connect(listener)
    return listener, session, client_options("relay.a.test", [test_ca.certificate], client)


@pytest_twisted.ensureDeferred
async def test_loopback_scram_failure_then_success(test_ca, server_cert, store):
    listener, session, options = await tls_pair(test_ca, server_cert, store)
    await start_tls(session, options)
    with pytest.raises(BEEPError) as refused:
        await authenticate(session, ScramSHA256Client("alice", "wrong password"))
    assert refused.value.code == 535
    scram = ScramSHA256Client("alice", PASSWORD)
    assert await authenticate(session, scram, identity="alice") == "alice"
    assert listener.sessions[0].authenticated_identity == "alice"
    await shutdown(listener, session)


@pytest_twisted.ensureDeferred
async def test_loopback_plain_refused_before_tls_then_accepted(test_ca, server_cert, store):
    listener, session, options = await tls_pair(test_ca, server_cert, store)
    careful = WithoutInitial(PlainClient("alice", PASSWORD, tls_active=session.tls_active))
    with pytest.raises(BEEPError) as refused:
        await authenticate(session, careful)
    assert refused.value.code == 538
    await start_tls(session, options)
    await authenticate(session, PlainClient("alice", PASSWORD, tls_active=session.tls_active))
    assert listener.sessions[0].authenticated_identity == "alice"
    assert listener.sessions[0].authenticated_mechanism == "PLAIN"
    await shutdown(listener, session)


@pytest_twisted.ensureDeferred
async def test_loopback_external_with_client_certificate(test_ca, server_cert, store, fred):
    listener, session, options = await tls_pair(test_ca, server_cert, store, client=fred)
    greeting = await start_tls(session, options)
    # The listener greets after the handshake, so it knows the certificate by then.
    assert profile_uri("EXTERNAL") in greeting.profiles
    await authenticate(session, ExternalClient())
    assert listener.sessions[0].authenticated_identity == "fred@a.test"
    await shutdown(listener, session)


@pytest_twisted.ensureDeferred
async def test_loopback_external_without_client_certificate(test_ca, server_cert, store):
    listener, session, options = await tls_pair(test_ca, server_cert, store)
    greeting = await start_tls(session, options)
    assert profile_uri("EXTERNAL") not in greeting.profiles
    with pytest.raises(BEEPError) as refused:
        await authenticate(session, ExternalClient())
    assert refused.value.code == 550
    assert listener.sessions[0].authenticated_identity is None
    await shutdown(listener, session)


def test_require_tls_keeps_every_mechanism_off_the_greeting_until_tls(store):
    """What a relay asks for: not even a username in the clear."""
    profiles = sasl_profiles(ALL, portal_for(store), scram_store=store, require_tls=True)
    pair = Pair(profiles)
    assert pair.I.peer_greeting.profiles == ()
    pair.L.tls_active = True
    assert all(p.offered(pair.L) for p in profiles if p.name in (SCRAM, "PLAIN", "ANONYMOUS"))
