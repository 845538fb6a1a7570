"""SASL mechanisms, client against server in memory (RFC 4505, 4616, 5802/7677, 4422 App. A)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.python.failure import Failure as TwistedFailure
from zope.interface import implementer

from imxp.beep.saslmech import (
    MAX_RESPONSE_OCTETS,
    AnonymousClient,
    AnonymousServer,
    Challenge,
    ExternalClient,
    ExternalServer,
    Failure,
    ISCRAMKeyStore,
    PlainClient,
    PlainServer,
    SASLClientError,
    SCRAMCredentials,
    ScramSHA256Client,
    ScramSHA256Server,
    Step,
    StoredKeys,
    Success,
    available_mechanisms,
    make_portal,
    mechanism_name,
    profile_uri,
    server_mechanism,
)
from imxp.beep.users import ExternalChecker, UserStore

PASSWORD = "correct horse battery"
CERT_ID = "relay.a.test"


def result(d: Deferred[Step]) -> Step:
    """The result of an already-fired Deferred; a mechanism must never errback."""
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert not isinstance(out[0], TwistedFailure), out[0]
    step = out[0]
    assert isinstance(step, Challenge | Success | Failure)
    return step


def run(server, client) -> Step:
    """Drive a whole exchange the way the profile glue will."""
    step = result(server.step(client.initial()))
    rounds = 0
    while isinstance(step, Challenge):
        rounds += 1
        assert rounds < 10
        step = result(server.step(client.step(step.data)))
    if isinstance(step, Success):
        client.verify_final(step.data)
    return step


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    s = UserStore(tmp_path / "users")
    s.add("alice", PASSWORD)
    return s


@pytest.fixture
def portal(store: UserStore):
    return make_portal([store, ExternalChecker()])


def scram(portal, store, **kw) -> ScramSHA256Server:
    return ScramSHA256Server(portal, store, **kw)


def manual_client_final(
    password: str, client_first_bare: str, server_first: str, gs2: bytes = b"n,,"
) -> str:
    """An independent RFC 5802 §3 computation of client-final-message."""
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2).decode()},r={attrs['r']}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}"


# ---------------------------------------------------------------------------- SCRAM-SHA-256


def test_scram_success(portal, store):
    step = run(scram(portal, store), ScramSHA256Client("alice", PASSWORD))
    assert isinstance(step, Success)
    assert step.identity == "alice" and not step.anonymous
    assert step.data is not None and step.data.startswith(b"v=")


def test_scram_rfc7677_vector(tmp_path):
    """RFC 7677 §3: the exact messages of the SCRAM-SHA-256 example exchange."""
    store = UserStore(tmp_path / "users")
    store.add("user", "pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    server = scram(
        make_portal([store]), store, nonce_factory=lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    client = ScramSHA256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    first = client.initial()
    assert first == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    challenge = result(server.step(first))
    assert challenge == Challenge(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final = client.step(challenge.data)
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    done = result(server.step(final))
    assert done == Success("user", b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    client.verify_final(done.data)


def test_scram_without_initial_response(portal, store):
    server, client = scram(portal, store), ScramSHA256Client("alice", PASSWORD)
    assert result(server.step(None)) == Challenge(b"")
    step = result(server.step(client.step(b"")))
    assert isinstance(step, Challenge)
    done = result(server.step(client.step(step.data)))
    assert isinstance(done, Success) and done.identity == "alice"
    client.verify_final(done.data)


def test_scram_y_flag_is_accepted_without_channel_binding(portal, store):
    """RFC 5802 §6: 'y' only fails when the server supports channel binding; we don't."""
    server = scram(portal, store)
    bare = "n=alice,r=clientnonce"
    challenge = result(server.step(f"y,,{bare}".encode()))
    assert isinstance(challenge, Challenge)
    final = manual_client_final(PASSWORD, bare, challenge.data.decode(), gs2=b"y,,")
    assert isinstance(result(server.step(final.encode())), Success)


def test_scram_wrong_password(portal, store):
    step = run(scram(portal, store), ScramSHA256Client("alice", "wrong"))
    assert isinstance(step, Failure) and step.code == 535


def test_scram_unknown_user_looks_like_a_wrong_password(portal, store):
    wrong = run(scram(portal, store), ScramSHA256Client("alice", "wrong"))
    unknown = run(scram(portal, store), ScramSHA256Client("mallory", "whatever"))
    assert unknown == wrong
    assert unknown.code == 535
    assert unknown.text == wrong.text
    # The peer cannot tell, but the operator can: the glue logs these.
    assert (unknown.username, unknown.reason) == ("mallory", "unknown user")
    assert (wrong.username, wrong.reason) != ("alice", "unknown user")


def server_first_for(portal, store, username: str) -> dict[str, str]:
    step = result(scram(portal, store).step(f"n,,n={username},r=abcdef".encode()))
    assert isinstance(step, Challenge)
    return dict(part.split("=", 1) for part in step.data.decode().split(","))


def test_scram_unknown_user_salt_is_stable_and_per_user(portal, store, tmp_path):
    first = server_first_for(portal, store, "mallory")
    assert server_first_for(portal, store, "mallory")["s"] == first["s"]
    assert server_first_for(portal, store, "trudy")["s"] != first["s"]
    # The same shape as a real user's reply: same salt length and iteration count.
    real = server_first_for(portal, store, "alice")
    assert len(base64.b64decode(real["s"])) == len(base64.b64decode(first["s"]))
    assert real["i"] == first["i"]
    # And stable across a restart: the secret lives with the user file.
    reopened = UserStore(tmp_path / "users")
    assert server_first_for(make_portal([reopened]), reopened, "mallory")["s"] == first["s"]


def test_scram_authzid_refused(portal, store):
    step = result(scram(portal, store).step(b"n,a=bob,n=alice,r=abcdef"))
    assert isinstance(step, Failure) and step.code == 537


def test_scram_channel_binding_request_refused(portal, store):
    step = result(scram(portal, store).step(b"p=tls-server-end-point,,n=alice,r=abcdef"))
    assert isinstance(step, Failure) and step.code == 504


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"", 501),
        (b"garbage", 501),
        (b"n,,", 501),
        (b"n,,x=1", 501),
        (b"n,,r=abc,n=alice", 501),
        (b"q,,n=alice,r=abc", 501),
        (b"n,x,n=alice,r=abc", 501),
        (b"\xff\xfe", 501),
        (b"n,,n=al=ice,r=abc", 501),
        (b"n,,n=alice,r=ab,c", 501),
        (b"n,,m=ext,n=alice,r=abc", 504),
    ],
)
def test_scram_garbage_client_first(portal, store, message, code):
    step = result(scram(portal, store).step(message))
    assert step == Failure(code, step.text)


def start_scram(portal, store) -> tuple[ScramSHA256Server, str]:
    server = scram(portal, store)
    step = result(server.step(b"n,,n=alice,r=clientnonce"))
    assert isinstance(step, Challenge)
    return server, step.data.decode()


@pytest.mark.parametrize(
    "final",
    [
        "garbage",
        "c=biws,r={r}",
        "r={r},c=biws,p=AAAA",
        "c=biws,r={r},p=!!notbase64!!",
        "c=biws,r={r},p=AAAA",
        "c=eSws,r={r},p=" + "A" * 43 + "=",
        "\udcff",
    ],
)
def test_scram_garbage_client_final(portal, store, final):
    server, server_first = start_scram(portal, store)
    nonce = dict(p.split("=", 1) for p in server_first.split(","))["r"]
    data = final.format(r=nonce).encode("utf-8", "surrogateescape")
    step = result(server.step(data))
    assert isinstance(step, Failure) and step.code in (501, 535)


def test_scram_wrong_nonce(portal, store):
    """Even a proof that is valid for the nonce it names fails if the nonce is not ours."""
    server, server_first = start_scram(portal, store)
    forged = server_first.replace("r=clientnonce", "r=clientnonceX", 1)
    final = manual_client_final(PASSWORD, "n=alice,r=clientnonce", forged)
    step = result(server.step(final.encode()))
    assert isinstance(step, Failure) and step.code == 535


def test_scram_manual_proof_is_accepted(portal, store):
    """Our independent computation agrees with the server, so the tests above test it."""
    server, server_first = start_scram(portal, store)
    final = manual_client_final(PASSWORD, "n=alice,r=clientnonce", server_first)
    assert isinstance(result(server.step(final.encode())), Success)


def test_scram_client_detects_forged_server_signature(portal, store):
    server, client = scram(portal, store), ScramSHA256Client("alice", PASSWORD)
    challenge = result(server.step(client.initial()))
    done = result(server.step(client.step(challenge.data)))
    assert isinstance(done, Success)
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(SASLClientError):
        client.verify_final(forged)


@pytest.mark.parametrize("final", [None, b"", b"e=invalid-proof", b"\xff", b"garbage"])
def test_scram_client_refuses_success_without_good_signature(portal, store, final):
    server, client = scram(portal, store), ScramSHA256Client("alice", PASSWORD)
    challenge = result(server.step(client.initial()))
    result(server.step(client.step(challenge.data)))
    with pytest.raises(SASLClientError):
        client.verify_final(final)


def test_scram_client_accepts_server_final_as_challenge(portal, store):
    server, client = scram(portal, store), ScramSHA256Client("alice", PASSWORD)
    challenge = result(server.step(client.initial()))
    done = result(server.step(client.step(challenge.data)))
    assert client.step(done.data) == b""
    client.verify_final(None)


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"r=abcdefXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=9999999",
        b"r=abcdefXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
        b"r=abcdefXYZ,s=short,i=4096",
        b"e=unknown-user",
        b"garbage",
        b"\xff",
    ],
)
def test_scram_client_refuses_bad_server_first(server_first):
    client = ScramSHA256Client("alice", PASSWORD, nonce="abcdef")
    client.initial()
    with pytest.raises(SASLClientError):
        client.step(server_first)


def test_scram_without_checker_for_scram_credentials(store):
    """The portal is the authority: without a SCRAM checker, nobody gets in with SCRAM."""
    portal = make_portal([ExternalChecker()])
    step = run(scram(portal, store), ScramSHA256Client("alice", PASSWORD))
    assert isinstance(step, Failure) and step.code == 534


@implementer(ISCRAMKeyStore)
class BrokenStore:
    def scram_keys(self, username: str) -> Deferred[StoredKeys | None]:
        return fail(OSError("database down"))

    def decoy_keys(self, username: str) -> StoredKeys:
        raise AssertionError("not reached")


def test_scram_store_error_is_a_temporary_failure(portal):
    with capturedLogs() as events:
        step = result(scram(portal, BrokenStore()).step(b"n,,n=alice,r=abcdef"))
    assert step == Failure(454, step.text)
    assert any(e.get("log_failure") is not None for e in events)


def test_scram_credentials_check():
    creds = SCRAMCredentials("alice", b"msg", b"\x00" * 32)
    assert creds.check_stored_key(b"\x01" * 32) is False
    assert "alice" in repr(creds) and "\\x00" not in repr(creds)


# ---------------------------------------------------------------------------------- PLAIN


def plain(portal, tls=True) -> PlainServer:
    return PlainServer(portal, tls_active=tls)


def test_plain_success(portal):
    step = run(plain(portal), PlainClient("alice", PASSWORD, tls_active=True))
    assert step == Success("alice")


def test_plain_authzid_same_as_authcid(portal):
    step = run(plain(portal), PlainClient("alice", PASSWORD, authzid="alice", tls_active=True))
    assert step == Success("alice")


def test_plain_authzid_mismatch(portal):
    step = run(plain(portal), PlainClient("alice", PASSWORD, authzid="bob", tls_active=True))
    assert isinstance(step, Failure) and step.code == 537


def test_plain_authzid_checked_only_after_authentication(portal):
    step = run(plain(portal), PlainClient("alice", "wrong", authzid="bob", tls_active=True))
    assert isinstance(step, Failure) and step.code == 535


def test_plain_wrong_password_and_unknown_user(portal):
    wrong = run(plain(portal), PlainClient("alice", "wrong", tls_active=True))
    unknown = run(plain(portal), PlainClient("mallory", PASSWORD, tls_active=True))
    assert isinstance(wrong, Failure) and wrong.code == 535
    assert unknown == wrong


def test_plain_without_initial_response(portal):
    server = plain(portal)
    assert result(server.step(None)) == Challenge(b"")
    assert result(server.step(b"\x00alice\x00" + PASSWORD.encode())) == Success("alice")


@pytest.mark.parametrize("response", [None, b"\x00alice\x00" + PASSWORD.encode()])
def test_plain_requires_tls(portal, response):
    step = result(plain(portal, tls=False).step(response))
    assert isinstance(step, Failure) and step.code == 538


def test_plain_client_refuses_without_tls():
    with pytest.raises(SASLClientError):
        PlainClient("alice", PASSWORD, tls_active=False).initial()


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"alice" + PASSWORD.encode(),
        b"\x00alice" + PASSWORD.encode(),
        b"\x00alice\x00pass\x00word",
        b"\x00\xffalice\x00pw",
        b"\x00alice\x00",
        b"\x00\x00pw",
        b"\x00" * 3,
    ],
)
def test_plain_malformed(portal, response):
    step = result(plain(portal).step(response))
    assert isinstance(step, Failure) and step.code == 501


def test_plain_saslprep_applies_to_presented_strings(portal, store):
    """RFC 4616 §2 / RFC 4013: U+00AD maps to nothing, so "al\\xadice" is alice."""
    message = "\x00al\u00adice\x00".encode() + PASSWORD.encode()
    assert result(plain(portal).step(message)) == Success("alice")


def test_plain_prohibited_characters_fail_verification(portal):
    step = result(plain(portal).step(b"\x00alice\x00pass\x07word"))
    assert isinstance(step, Failure) and step.code == 535


def test_failure_log_has_no_password(portal):
    """A refusal is not logged here (the glue logs it once, from the step) and what is
    there for the log carries no password."""
    secret = "Sup3r-Secret-Guess"
    with capturedLogs() as events:
        step = run(plain(portal), PlainClient("alice", secret, tls_active=True))
    assert isinstance(step, Failure) and step.code == 535
    assert step.username == "alice"
    assert [e for e in events if e.get("code") == 535] == []
    assert secret not in repr(events) and secret not in repr(step)


# ------------------------------------------------------------------------------- ANONYMOUS


def test_anonymous_success_with_anonymous_checker(store):
    portal = make_portal([store, AllowAnonymousAccess()])
    step = run(AnonymousServer(portal), AnonymousClient("sirhc"))
    assert isinstance(step, Success) and step.anonymous


def test_anonymous_without_trace_and_without_initial_response(store):
    server = AnonymousServer(make_portal([AllowAnonymousAccess()]))
    assert result(server.step(None)) == Challenge(b"")
    step = result(server.step(b""))
    assert isinstance(step, Success) and step.anonymous


def test_anonymous_refused_without_anonymous_checker(portal):
    step = run(AnonymousServer(portal), AnonymousClient())
    assert isinstance(step, Failure) and step.code == 534


@pytest.mark.parametrize(
    "trace",
    ["x" * 256, "bad\x07bell", "a\nb", "\ue000private", "\u05d0mixed", "\u05d0mixed\u05d0"],
)
def test_anonymous_bad_trace(trace):
    server = AnonymousServer(make_portal([AllowAnonymousAccess()]))
    step = result(server.step(trace.encode("utf-8")))
    assert isinstance(step, Failure) and step.code == 501
    with pytest.raises(ValueError):
        AnonymousClient(trace)


def test_anonymous_trace_limits():
    portal = make_portal([AllowAnonymousAccess()])
    # 255 characters of up to four octets each are fine (RFC 4505 §2 note).
    assert isinstance(result(AnonymousServer(portal).step(("\U0001f600" * 255).encode())), Success)
    step = result(AnonymousServer(portal).step(b"\xc3"))
    assert isinstance(step, Failure) and step.code == 501


# -------------------------------------------------------------------------------- EXTERNAL


def external(portal, identity=CERT_ID) -> ExternalServer:
    return ExternalServer(portal, external_identity=identity)


def test_external_derives_identity(portal):
    assert run(external(portal), ExternalClient()) == Success(CERT_ID)


def test_external_matching_authzid(portal):
    assert run(external(portal), ExternalClient(CERT_ID)) == Success(CERT_ID)


def test_external_without_initial_response(portal):
    server = external(portal)
    assert result(server.step(None)) == Challenge(b"")
    assert result(server.step(b"")) == Success(CERT_ID)


def test_external_authzid_mismatch(portal):
    step = run(external(portal), ExternalClient("relay.b.test"))
    assert isinstance(step, Failure) and step.code == 537


@pytest.mark.parametrize("response", [None, b""])
def test_external_without_client_certificate(portal, response):
    step = result(external(portal, identity=None).step(response))
    assert isinstance(step, Failure) and step.code == 534


def test_external_identity_refused_by_policy(store):
    portal = make_portal([ExternalChecker({"relay.b.test"})])
    step = run(external(portal), ExternalClient())
    assert isinstance(step, Failure) and step.code == 535


def test_external_bad_utf8(portal):
    step = result(external(portal).step(b"\xff"))
    assert isinstance(step, Failure) and step.code == 501


# ---------------------------------------------------------------------------- common rules


def all_servers(portal, store):
    return [
        AnonymousServer(make_portal([AllowAnonymousAccess()])),
        PlainServer(portal, tls_active=True),
        ScramSHA256Server(portal, store),
        ExternalServer(portal, external_identity=CERT_ID),
    ]


def test_step_after_completion_fails(portal, store):
    for server in all_servers(portal, store):
        first = result(server.step(b"\x00\x00"))
        assert not isinstance(first, Challenge)
        again = result(server.step(b""))
        assert isinstance(again, Failure) and again.code == 500


def test_overlong_response(portal, store):
    for server in all_servers(portal, store):
        step = result(server.step(b"a" * (MAX_RESPONSE_OCTETS + 1)))
        assert isinstance(step, Failure) and step.code == 501


class ExplodingChecker:
    credentialInterfaces = ExternalChecker.credentialInterfaces

    def requestAvatarId(self, credentials):
        raise RuntimeError("bug")


def test_checker_exception_is_a_temporary_failure():
    server = external(make_portal([ExplodingChecker()]))
    step = result(server.step(b""))
    assert step == Failure(454, step.text)


def test_unauthorized_login_is_535():
    class No:
        credentialInterfaces = ExternalChecker.credentialInterfaces

        def requestAvatarId(self, credentials):
            return fail(UnauthorizedLogin())

    step = result(external(make_portal([No()])).step(b""))
    assert isinstance(step, Failure) and step.code == 535


def test_pending_step_refuses_a_second_one(portal, store):
    pending: Deferred[StoredKeys | None] = Deferred()

    @implementer(ISCRAMKeyStore)
    class SlowStore:
        def scram_keys(self, username):
            return pending

        def decoy_keys(self, username):
            return store.decoy_keys(username)

    server = ScramSHA256Server(portal, SlowStore())
    d = server.step(b"n,,n=alice,r=abcdef")
    out: list[Step] = []
    d.addCallback(out.append)
    assert out == []
    assert result(server.step(b"again")).code == 500
    pending.callback(None)
    assert len(out) == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=st.lists(st.binary(max_size=80), min_size=1, max_size=3))
def test_random_input_never_escapes(portal, store, messages):
    for server in all_servers(portal, store):
        for message in messages:
            result(server.step(message))


# ------------------------------------------------------------------------------- registry


def test_available_mechanisms(store):
    configured = ["SCRAM-SHA-256", "PLAIN", "EXTERNAL", "ANONYMOUS"]
    assert available_mechanisms(configured, tls_active=False) == ["ANONYMOUS"]
    assert (
        available_mechanisms(
            configured, tls_active=True, external_identity=CERT_ID, scram_store=store
        )
        == configured
    )
    with pytest.raises(ValueError):
        available_mechanisms(["DIGEST-MD5"], tls_active=True)


def test_server_mechanism_factory(portal, store):
    kinds = {
        "ANONYMOUS": AnonymousServer,
        "PLAIN": PlainServer,
        "SCRAM-SHA-256": ScramSHA256Server,
        "EXTERNAL": ExternalServer,
    }
    for name, cls in kinds.items():
        mech = server_mechanism(
            name, portal, tls_active=True, external_identity=CERT_ID, scram_store=store
        )
        assert isinstance(mech, cls) and mech.name == name
    plain_mech = server_mechanism("PLAIN", portal, tls_active=False)
    assert result(plain_mech.step(None)).code == 538
    with pytest.raises(KeyError):
        server_mechanism("CRAM-MD5", portal, tls_active=True)
    with pytest.raises(ValueError):
        server_mechanism("SCRAM-SHA-256", portal, tls_active=True)


def test_profile_uris():
    assert profile_uri("PLAIN") == "http://iana.org/beep/SASL/PLAIN"
    assert mechanism_name("http://iana.org/beep/SASL/SCRAM-SHA-256") == "SCRAM-SHA-256"
    assert mechanism_name("http://iana.org/beep/TLS") is None
    assert mechanism_name("http://iana.org/beep/SASL/") is None


def test_single_message_clients_misuse():
    client = ExternalClient()
    with pytest.raises(SASLClientError):
        client.verify_final(None)
    assert client.step(b"") == b""
    with pytest.raises(SASLClientError):
        client.step(b"")
    with pytest.raises(SASLClientError):
        client.verify_final(b"unexpected")
    client.verify_final(None)
