"""Sans-IO SASL mechanisms for the BEEP SASL profile family (RFC 3080 §4.1).

This module knows nothing of channels, ``<blob>`` elements or base64: the profile glue
decodes a blob and hands the octets to a mechanism, and turns what comes back into a reply.

Server side
    Each server mechanism provides :class:`ServerMechanism`: ``step(response)`` takes the
    client's response (``None`` when ``<start>`` carried no initial response, RFC 4422 §5)
    and returns a Deferred that always fires with one :data:`Step` and never errbacks:

    * :class:`Challenge` -- send ``data`` in a ``<blob status='continue'>``;
    * :class:`Success` -- send ``<blob status='complete'>`` carrying ``data`` when it is not
      None (additional data with success, e.g. SCRAM's server-final-message, RFC 4422 §5);
      ``identity`` is the authorization identity, kept for the session (RFC 3080 §4.1);
    * :class:`Failure` -- send an ``<error code=...>`` with an RFC 3080 §8 reply code.

    Mechanisms authenticate through :mod:`twisted.cred`: they build credentials and call
    ``portal.login(credentials, None, IAuthenticatedPeer)``, so a deployment chooses what is
    accepted by the checkers it registers with the :class:`~twisted.cred.portal.Portal`
    (:func:`make_portal` pairs them with :class:`PeerRealm`). ANONYMOUS is refused unless the
    portal has a checker for :class:`~twisted.cred.credentials.IAnonymous`.

Client side
    :class:`ClientMechanism`: ``initial()`` gives the initial response, ``step(challenge)``
    answers a challenge and ``verify_final(data)`` checks the additional data that came with
    the server's success. Every problem raises :class:`SASLClientError`.

Mechanisms: ANONYMOUS (RFC 4505), PLAIN (RFC 4616), SCRAM-SHA-256 (RFC 5802, RFC 7677;
the protocol engine is the ``scramp`` library) and EXTERNAL (RFC 4422 Appendix A). We do not
offer SCRAM-SHA-256-PLUS: a client that requests channel binding ('p=') is refused with 504.
Proxy authorization is not supported: an authzid naming anyone but the authenticated identity
is refused with 537 (RFC 4422 §3.4.1 leaves that policy to the server).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import stringprep
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Protocol, TypeAlias

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.utils import ServerError, saslprep
from twisted.cred.checkers import ANONYMOUS, ICredentialsChecker
from twisted.cred.credentials import Anonymous, ICredentials, UsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from zope.interface import Attribute, Interface, implementer

from imxp import logs

__all__ = [
    "MAX_RESPONSE_OCTETS",
    "PROFILE_URI_PREFIX",
    "SCRAM_SHA_256",
    "SERVER_MECHANISMS",
    "AnonymousClient",
    "AnonymousServer",
    "AuthenticatedPeer",
    "Challenge",
    "ClientMechanism",
    "ExternalClient",
    "ExternalIdentity",
    "ExternalServer",
    "Failure",
    "IAuthenticatedPeer",
    "IExternalIdentity",
    "ISCRAMCredentials",
    "ISCRAMKeyStore",
    "LoginPortal",
    "PeerRealm",
    "PlainClient",
    "PlainServer",
    "ReplyCode",
    "SASLClientError",
    "SCRAMCredentials",
    "ScramSHA256Client",
    "ScramSHA256Server",
    "ServerMechanism",
    "Step",
    "StoredKeys",
    "Success",
    "available_mechanisms",
    "make_portal",
    "mechanism_name",
    "profile_uri",
    "server_mechanism",
]

log = logs.Logger(namespace="imxp.beep.sasl")

#: RFC 3080 §4.1.1: each mechanism's profile is identified by this prefix plus its name.
PROFILE_URI_PREFIX = "http://iana.org/beep/SASL/"
SCRAM_SHA_256 = "SCRAM-SHA-256"

#: The longest client response any of our mechanisms accepts. RFC 4616 §2 requires
#: accepting 255 octets for each of authzid, authcid and passwd; SCRAM and EXTERNAL messages
#: are far smaller. The bound keeps a hostile peer from making us prepare huge strings.
MAX_RESPONSE_OCTETS = 4096

#: RFC 4505 §2: a trace token is at most 255 characters.
MAX_TRACE_CHARS = 255


class ReplyCode(IntEnum):
    """The RFC 3080 §8 reply codes a SASL exchange can end with."""

    TEMPORARY_FAILURE = 454
    SYNTAX_ERROR = 500
    PARAMETER_SYNTAX_ERROR = 501
    PARAMETER_NOT_IMPLEMENTED = 504
    MECHANISM_INSUFFICIENT = 534
    AUTHENTICATION_FAILURE = 535
    NOT_AUTHORIZED = 537
    ENCRYPTION_REQUIRED = 538


# --------------------------------------------------------------------------------------------
# Step results


@dataclass(frozen=True)
class Challenge:
    """Send ``data`` to the client and wait for its next response (RFC 4422 §3.3)."""

    data: bytes


def _no_logout() -> None:
    return None


@dataclass(frozen=True)
class Success:
    """The exchange completed successfully (RFC 4422 §3.6).

    ``identity`` is the authorization identity for the rest of the session (RFC 3080 §4.1).
    For ANONYMOUS, ``anonymous`` is True and ``identity`` is the realm's placeholder; grant
    rights by checking ``anonymous`` first, never by the placeholder name. ``data`` is the
    additional data with success (None when the mechanism has none). ``logout`` comes from
    the cred realm: call it when the BEEP session ends.
    """

    identity: str
    data: bytes | None = None
    anonymous: bool = False
    logout: Callable[[], object] = field(default=_no_logout, compare=False, repr=False)


@dataclass(frozen=True)
class Failure:
    """The exchange failed; reply with an ``<error>`` of this RFC 3080 §8 code and text.

    ``reason`` and ``username`` are for the log only: the peer sees the same text for an
    unknown user as for a wrong password, the operator sees which it was.
    """

    code: int
    text: str
    reason: str = field(default="", compare=False)
    username: str | None = field(default=None, compare=False)


Step: TypeAlias = Challenge | Success | Failure


class _Refuse(Exception):
    """Raised inside a mechanism to end the exchange with a :class:`Failure`.

    ``reason`` goes to the log only; ``text`` goes to the peer. Keeping them apart lets the
    log say "unknown user" while the peer sees the same text as for a wrong password.
    """

    def __init__(self, code: int, reason: str, text: str | None = None) -> None:
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason
        self.text = text if text is not None else reason


def _auth_failure(reason: str) -> _Refuse:
    return _Refuse(ReplyCode.AUTHENTICATION_FAILURE, reason, "authentication failure")


# --------------------------------------------------------------------------------------------
# twisted.cred plumbing


class IAuthenticatedPeer(Interface):
    """The avatar a SASL login produces: who the peer is for the rest of the session."""

    identity = Attribute("The authorization identity, a str.")
    anonymous = Attribute("True when the peer logged in with ANONYMOUS.")


@implementer(IAuthenticatedPeer)
@dataclass(frozen=True)
class AuthenticatedPeer:
    """The default :class:`IAuthenticatedPeer` avatar."""

    identity: str
    anonymous: bool = False


@implementer(IRealm)
class PeerRealm:
    """A realm whose avatar is just the avatar ID the checker returned.

    Checkers may return the ID as str or (Twisted's habit) UTF-8 bytes; the anonymous ID
    :data:`twisted.cred.checkers.ANONYMOUS` becomes ``AuthenticatedPeer(anonymous_name, True)``.
    """

    def __init__(self, anonymous_name: str = "anonymous") -> None:
        self.anonymous_name = anonymous_name

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: Any
    ) -> tuple[Any, AuthenticatedPeer, Callable[[], None]]:
        if IAuthenticatedPeer not in interfaces:
            raise NotImplementedError("PeerRealm only provides IAuthenticatedPeer")
        if avatarId == ANONYMOUS:
            peer = AuthenticatedPeer(self.anonymous_name, anonymous=True)
        elif isinstance(avatarId, bytes):
            peer = AuthenticatedPeer(avatarId.decode("utf-8"))
        elif isinstance(avatarId, str):
            peer = AuthenticatedPeer(avatarId)
        else:
            raise TypeError(f"unusable avatar ID {avatarId!r}")
        return IAuthenticatedPeer, peer, _no_logout


def make_portal(checkers: Iterable[ICredentialsChecker], realm: IRealm | None = None) -> Portal:
    """A :class:`Portal` over ``checkers`` and (by default) a :class:`PeerRealm`."""
    return Portal(realm if realm is not None else PeerRealm(), list(checkers))


class LoginPortal(Protocol):
    """What the mechanisms need of a :class:`~twisted.cred.portal.Portal`."""

    def login(self, credentials: Any, mind: object, *interfaces: Any) -> Deferred[Any]: ...


class IExternalIdentity(ICredentials):
    """An identity already proved by an external service, here the TLS client certificate."""

    identity = Attribute("The identity the TLS layer proved, a str.")


@implementer(IExternalIdentity)
@dataclass(frozen=True)
class ExternalIdentity:
    """Credentials for EXTERNAL (RFC 4422 Appendix A)."""

    identity: str


class ISCRAMCredentials(ICredentials):
    """A SCRAM client proof, checkable by anyone holding the user's StoredKey."""

    username = Attribute("The SASLprep-ed username (str).")

    def check_stored_key(stored_key: bytes) -> bool:
        """True when the client proof is valid for ``stored_key`` (RFC 5802 §3)."""


@implementer(ISCRAMCredentials)
class SCRAMCredentials:
    """The client proof of a SCRAM-SHA-256 exchange and the AuthMessage it signs."""

    def __init__(self, username: str, auth_message: bytes, client_proof: bytes) -> None:
        self.username = username
        self._auth_message = auth_message
        self._client_proof = client_proof

    def check_stored_key(self, stored_key: bytes) -> bool:
        """RFC 5802 §3: ClientKey := ClientProof XOR HMAC(StoredKey, AuthMessage), and the
        proof is good iff H(ClientKey) equals StoredKey."""
        signature = hmac.digest(stored_key, self._auth_message, "sha256")
        if len(signature) != len(self._client_proof):
            return False
        client_key = bytes(a ^ b for a, b in zip(self._client_proof, signature, strict=True))
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)

    def __repr__(self) -> str:
        # The proof is not a password, but it has no place in logs either.
        return f"<SCRAMCredentials username={self.username!r}>"


@dataclass(frozen=True)
class StoredKeys:
    """A user's SCRAM-SHA-256 verifier (RFC 5802 §3, RFC 5803)."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


class ISCRAMKeyStore(Interface):
    """Where the SCRAM server mechanism finds salt and iteration count before the proof."""

    def scram_keys(username: str) -> Deferred[StoredKeys | None]:
        """The keys of the (SASLprep-ed) ``username``, or None if there is no such user."""

    def decoy_keys(username: str) -> StoredKeys:
        """Keys to answer with for an unknown ``username``.

        The salt must be deterministic per username and look like a real one, so that an
        attacker cannot tell unknown users from known ones (RFC 5802 §9); no proof may
        ever match the keys.
        """


# --------------------------------------------------------------------------------------------
# Server mechanisms


class ServerMechanism(Protocol):
    """The server side of one SASL exchange; one instance per exchange."""

    name: str

    def step(self, response: bytes | None) -> Deferred[Step]: ...


class _ServerBase:
    """Shared sequencing, bounding, cred login, error mapping and logging."""

    name: ClassVar[str]

    def __init__(self, portal: LoginPortal, *, peer: str | None = None) -> None:
        self._portal = portal
        self._peer = peer
        self._username: str | None = None
        self._busy = False
        self._done = False
        self._started = False

    def step(self, response: bytes | None) -> Deferred[Step]:
        """Process one client response; the Deferred fires with a Step and never fails."""
        if self._done or self._busy:
            self._done = True
            return succeed(self._refused(_Refuse(ReplyCode.SYNTAX_ERROR, "step out of sequence")))
        first, self._started = not self._started, True
        if response is not None and len(response) > MAX_RESPONSE_OCTETS:
            return succeed(
                self._end(_Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "response too long"))
            )
        self._busy = True
        d = ensureDeferred(self._guarded(self._step(response, first)))
        return d

    async def _guarded(self, coro: Coroutine[Any, Any, Step]) -> Step:
        try:
            result = await coro
        except _Refuse as refusal:
            result = self._refused(refusal)
        except Exception:
            # A bug or a broken store must not escape to the glue as an exception: the peer
            # gets a temporary failure and the operator a traceback.
            log.failure(
                "SASL {mechanism} internal error for {username!r} from {peer}",
                mechanism=self.name,
                username=self._username,
                peer=self._peer,
                event="beep.sasl-internal-error",
            )
            result = Failure(
                ReplyCode.TEMPORARY_FAILURE,
                "temporary authentication failure",
                "internal error",
                self._username,
            )
        self._busy = False
        if isinstance(result, Success):
            self._done = True
            log.info(
                "SASL {mechanism} authenticated {identity!r} from {peer}",
                mechanism=self.name,
                identity=result.identity,
                anonymous=result.anonymous,
                event="beep.sasl-success",
                peer=self._peer,
            )
        elif isinstance(result, Failure):
            self._done = True
        return result

    def _end(self, refusal: _Refuse) -> Failure:
        self._done = True
        return self._refused(refusal)

    def _refused(self, refusal: _Refuse) -> Failure:
        # Not logged here: the glue logs each failure once, with what it knows besides.
        return Failure(refusal.code, refusal.text, refusal.reason, self._username)

    async def _step(self, response: bytes | None, first: bool) -> Step:
        raise NotImplementedError

    async def _login(self, credentials: object) -> tuple[IAuthenticatedPeer, Callable[[], object]]:
        """Log in through the portal; map cred's errors to reply codes."""
        try:
            _iface, avatar, logout = await self._portal.login(credentials, None, IAuthenticatedPeer)
        except UnhandledCredentials as e:
            # No checker for this kind of credentials: this deployment does not accept the
            # mechanism at all (e.g. ANONYMOUS without AllowAnonymousAccess).
            raise _Refuse(
                ReplyCode.MECHANISM_INSUFFICIENT,
                f"no checker accepts these credentials: {e}",
                f"{self.name} is not accepted here",
            ) from None
        except (UnauthorizedLogin, LoginFailed) as e:
            raise _auth_failure(f"credentials refused: {e}") from None
        return IAuthenticatedPeer(avatar), logout

    @staticmethod
    def _utf8(data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, f"{what} is not UTF-8") from None


def _check_trace(trace: str) -> None:
    """RFC 4505 §3, the "trace" stringprep profile: prohibited tables and bidi rules."""
    prohibited = (
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for ch in trace:
        if any(table(ch) for table in prohibited):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
    # RFC 3454 §6: a string with any RandALCat character holds no LCat character and
    # starts and ends with RandALCat.
    if any(stringprep.in_table_d1(ch) for ch in trace):
        if any(stringprep.in_table_d2(ch) for ch in trace):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(trace[0]) and stringprep.in_table_d1(trace[-1])):
            raise ValueError("bidirectional text must start and end right-to-left")


class AnonymousServer(_ServerBase):
    """ANONYMOUS (RFC 4505): one optional trace message, logged and otherwise ignored."""

    name = "ANONYMOUS"

    async def _step(self, response: bytes | None, first: bool) -> Step:
        if response is None and first:
            # RFC 4422 §5: a client-first mechanism without an initial response gets an empty
            # challenge.
            return Challenge(b"")
        trace = self._utf8(response or b"", "trace")
        if len(trace) > MAX_TRACE_CHARS:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "trace longer than 255 characters")
        try:
            _check_trace(trace)
        except ValueError as e:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, f"bad trace: {e}") from None
        peer, logout = await self._login(Anonymous())
        log.info(
            "SASL ANONYMOUS trace {trace!r} from {peer}",
            trace=trace,
            peer=self._peer,
            event="beep.sasl-anonymous-trace",
        )
        return Success(peer.identity, anonymous=peer.anonymous, logout=logout)


class PlainServer(_ServerBase):
    """PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd``, only over TLS."""

    name = "PLAIN"

    def __init__(self, portal: LoginPortal, *, tls_active: bool, peer: str | None = None) -> None:
        super().__init__(portal, peer=peer)
        self._tls_active = tls_active

    async def _step(self, response: bytes | None, first: bool) -> Step:
        if not self._tls_active:
            # RFC 4616 §5: PLAIN without a confidential channel would expose the password.
            raise _Refuse(
                ReplyCode.ENCRYPTION_REQUIRED,
                "PLAIN without TLS",
                "PLAIN requires TLS; start the TLS profile first",
            )
        if response is None and first:
            return Challenge(b"")
        parts = (response or b"").split(b"\x00")
        if len(parts) != 3:
            raise _Refuse(
                ReplyCode.PARAMETER_SYNTAX_ERROR, "PLAIN message needs exactly two NUL separators"
            )
        authzid, authcid, passwd = (self._utf8(p, "PLAIN message") for p in parts)
        if not authcid or not passwd:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "empty authcid or password")
        try:
            # RFC 4616 §2: prepare presented strings (SASLprep); failure fails verification.
            authcid = saslprep(authcid)
            self._username = authcid
            passwd = saslprep(passwd)
        except ScramException:
            raise _auth_failure("authcid or password fails SASLprep") from None
        if not authcid or not passwd:
            raise _auth_failure("authcid or password empty after SASLprep")
        peer, logout = await self._login(
            UsernamePassword(authcid.encode("utf-8"), passwd.encode("utf-8"))
        )
        # RFC 4616 §2: authenticate first, then decide whether authcid may act as authzid.
        if authzid and _prepared_or_none(authzid) != peer.identity:
            logout()
            raise _Refuse(
                ReplyCode.NOT_AUTHORIZED,
                f"authzid {authzid!r} differs from the authenticated identity",
                "proxy authorization is not supported",
            )
        return Success(peer.identity, logout=logout)


def _prepared_or_none(text: str) -> str | None:
    try:
        return saslprep(text)
    except ScramException:
        return None


def _scram_attributes(text: str) -> list[tuple[str, str]]:
    """RFC 5802 §7 ``attr-val`` list: ``ALPHA "=" value`` separated by commas."""
    out = []
    for part in text.split(","):
        if len(part) < 3 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise ValueError(f"malformed attribute {part[:16]!r}")
        out.append((part[0], part[2:]))
    return out


def _scram_unescape(name: str) -> str:
    """RFC 5802 §5.1: in ``saslname``, '=' appears only as =2C (',') or =3D ('=')."""
    pieces = name.split("=")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if piece[:2] == "2C":
            out.append("," + piece[2:])
        elif piece[:2] == "3D":
            out.append("=" + piece[2:])
        else:
            raise ValueError("bad '=' escape in username")
    return "".join(out)


# scramp's error values (RFC 5802 §7 server-error-value) mapped to RFC 3080 §8 codes.
_SCRAM_CODES: Mapping[ServerError, ReplyCode] = {
    ServerError.INVALID_PROOF: ReplyCode.AUTHENTICATION_FAILURE,
    ServerError.CHANNEL_BINDINGS_DONT_MATCH: ReplyCode.AUTHENTICATION_FAILURE,
    ServerError.SERVER_DOES_SUPPORT_CHANNEL_BINDING: ReplyCode.AUTHENTICATION_FAILURE,
    ServerError.UNKNOWN_USER: ReplyCode.AUTHENTICATION_FAILURE,
    ServerError.CHANNEL_BINDING_NOT_SUPPORTED: ReplyCode.PARAMETER_NOT_IMPLEMENTED,
    ServerError.UNSUPPORTED_CHANNEL_BINDING_TYPE: ReplyCode.PARAMETER_NOT_IMPLEMENTED,
    ServerError.EXTENSIONS_NOT_SUPPORTED: ReplyCode.PARAMETER_NOT_IMPLEMENTED,
    ServerError.NO_RESOURCES: ReplyCode.TEMPORARY_FAILURE,
    ServerError.INVALID_ENCODING: ReplyCode.PARAMETER_SYNTAX_ERROR,
    ServerError.INVALID_USERNAME_ENCODING: ReplyCode.PARAMETER_SYNTAX_ERROR,
    ServerError.OTHER_ERROR: ReplyCode.PARAMETER_SYNTAX_ERROR,
}


def _scram_refusal(e: ScramException) -> _Refuse:
    code = _SCRAM_CODES.get(e.server_error, ReplyCode.PARAMETER_SYNTAX_ERROR)
    if code == ReplyCode.AUTHENTICATION_FAILURE:
        return _auth_failure(str(e))
    value = f" (e={e.server_error.value})" if e.server_error is not None else ""
    return _Refuse(code, str(e), f"SCRAM exchange failed{value}")


class ScramSHA256Server(_ServerBase):
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.

    The ``scramp`` server runs the protocol (message syntax, nonces, the c= check, the
    proof); the portal then checks the proof again through :class:`SCRAMCredentials`, so a
    deployment's checkers stay the authority on who may log in. Salt and iteration count
    come from ``store`` (:class:`ISCRAMKeyStore`) before the proof arrives; an unknown user
    gets the store's decoy keys and fails at the proof like a wrong password (RFC 5802 §9).

    Limits: GS2 flag 'p' (channel binding) is refused with 504, and so is a mandatory
    extension ('m=', RFC 5802 §5.1). scramp does not let an authzid through at all, so any
    'a=' is refused with 537, even one equal to the username.
    """

    name = SCRAM_SHA_256

    def __init__(
        self,
        portal: LoginPortal,
        store: ISCRAMKeyStore,
        *,
        peer: str | None = None,
        nonce_factory: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(portal, peer=peer)
        self._store = store
        self._nonce_factory = nonce_factory
        self._server: Any = None
        self._client_first_bare = ""
        self._unknown_user = False

    async def _step(self, response: bytes | None, first: bool) -> Step:
        if self._server is None:
            if response is None and first:
                return Challenge(b"")
            return await self._client_first(self._utf8(response or b"", "client-first-message"))
        return await self._client_final(self._utf8(response or b"", "client-final-message"))

    async def _client_first(self, message: str) -> Step:
        # RFC 5802 §7: client-first-message = gs2-header client-first-message-bare, where
        # gs2-header = gs2-cbind-flag "," [ authzid ] ",".
        flag, sep1, rest = message.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep1 and sep2):
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "malformed GS2 header")
        if flag.startswith("p="):
            raise _Refuse(
                ReplyCode.PARAMETER_NOT_IMPLEMENTED,
                f"channel binding {flag[2:]!r} requested",
                "channel binding is not supported; use the 'n' GS2 flag",
            )
        if flag not in ("n", "y"):
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "bad GS2 channel binding flag")
        if authzid:
            if not authzid.startswith("a="):
                raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "malformed GS2 authzid")
            raise _Refuse(
                ReplyCode.NOT_AUTHORIZED,
                "authzid given",
                "proxy authorization is not supported; leave the authzid empty",
            )
        try:
            attrs = _scram_attributes(bare)
        except ValueError as e:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, str(e)) from None
        if attrs and attrs[0][0] == "m":
            raise _Refuse(
                ReplyCode.PARAMETER_NOT_IMPLEMENTED,
                "mandatory extension",
                "SCRAM exchange failed (e=extensions-not-supported)",
            )
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "client-first-message-bare needs n, r")
        try:
            username = saslprep(_scram_unescape(attrs[0][1]))
        except (ValueError, ScramException) as e:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, f"bad username: {e}") from None
        if not username:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "empty username")
        self._username = username

        keys = await self._store.scram_keys(username)
        if keys is None:
            self._unknown_user = True
            keys = self._store.decoy_keys(username)

        def auth_fn(name: str) -> tuple[bytes, bytes, bytes, int]:
            if name != username:  # scramp parsed the name differently from us: refuse
                raise ValueError("username mismatch")
            return keys.salt, keys.stored_key, keys.server_key, keys.iterations

        nonce = self._nonce_factory() if self._nonce_factory is not None else None
        self._server = ScramMechanism(SCRAM_SHA_256).make_server(auth_fn, s_nonce=nonce)
        try:
            self._server.set_client_first(message)
            server_first = self._server.get_server_first()
        except ScramException as e:
            raise _scram_refusal(e) from None
        self._client_first_bare = bare
        return Challenge(server_first.encode("ascii"))

    async def _client_final(self, message: str) -> Step:
        # RFC 5802 §7: client-final-message = channel-binding "," nonce ["," extensions] ","
        # proof. We check its outline and the nonce for precise reply codes; scramp does the
        # rest.
        try:
            attrs = _scram_attributes(message)
        except ValueError as e:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, str(e)) from None
        keys = [k for k, _ in attrs]
        if len(keys) < 3 or keys[0] != "c" or keys[1] != "r" or keys[-1] != "p":
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "client-final-message needs c, r, p")
        if attrs[1][1] != str(self._server.nonce):
            raise _auth_failure("nonce mismatch")
        try:
            proof = base64.b64decode(attrs[-1][1], validate=True)
        except ValueError:
            raise _Refuse(ReplyCode.PARAMETER_SYNTAX_ERROR, "proof is not base64") from None
        try:
            self._server.set_client_final(message)
            server_final = self._server.get_server_final()
        except ScramException as e:
            refusal = _scram_refusal(e)
            if self._unknown_user:
                refusal.reason = "unknown user"
            raise refusal from None
        if self._unknown_user:  # decoy keys never verify; this is a second lock on the door
            raise _auth_failure("unknown user")
        # RFC 5802 §3: AuthMessage := client-first-message-bare + "," + server-first-message
        # + "," + client-final-message-without-proof.
        without_proof = message[: message.rindex(",p=")]
        auth_message = ",".join((self._client_first_bare, self._server.server_first, without_proof))
        peer, logout = await self._login(
            SCRAMCredentials(self._username or "", auth_message.encode("utf-8"), proof)
        )
        return Success(peer.identity, data=server_final.encode("ascii"), logout=logout)


class ExternalServer(_ServerBase):
    """EXTERNAL (RFC 4422 Appendix A) over the identity the TLS client certificate proved.

    RFC 3080 §4.1.3: an external authentication service must be active, and a non-empty
    authzid must be consistent with its credentials; an empty one means "derive it".
    Without a proved identity the mechanism cannot work in this session: 534.
    """

    name = "EXTERNAL"

    def __init__(
        self, portal: LoginPortal, *, external_identity: str | None, peer: str | None = None
    ) -> None:
        super().__init__(portal, peer=peer)
        self._identity = external_identity

    async def _step(self, response: bytes | None, first: bool) -> Step:
        if not self._identity:
            raise _Refuse(
                ReplyCode.MECHANISM_INSUFFICIENT,
                "no TLS client certificate",
                "EXTERNAL needs a TLS client certificate",
            )
        if response is None and first:
            return Challenge(b"")
        authzid = self._utf8(response or b"", "authzid")
        self._username = self._identity
        peer, logout = await self._login(ExternalIdentity(self._identity))
        if authzid and authzid != peer.identity:
            logout()
            raise _Refuse(
                ReplyCode.NOT_AUTHORIZED,
                f"authzid {authzid!r} differs from the certificate identity",
                "authzid does not match the certificate identity",
            )
        return Success(peer.identity, logout=logout)


SERVER_MECHANISMS: Mapping[str, type[_ServerBase]] = {
    cls.name: cls for cls in (AnonymousServer, PlainServer, ScramSHA256Server, ExternalServer)
}


def available_mechanisms(
    configured: Iterable[str],
    *,
    tls_active: bool,
    external_identity: str | None = None,
    scram_store: ISCRAMKeyStore | None = None,
) -> list[str]:
    """The configured mechanisms that can succeed in this session, in configured order.

    PLAIN is left out before TLS, so no client is invited to send a password in clear in
    its initial response; EXTERNAL without a proved identity; SCRAM without a key store.
    An unknown name is a configuration error (ValueError).
    """
    out = []
    for name in configured:
        if name not in SERVER_MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {name!r}")
        if name == PlainServer.name and not tls_active:
            continue
        if name == ExternalServer.name and not external_identity:
            continue
        if name == SCRAM_SHA_256 and scram_store is None:
            continue
        out.append(name)
    return out


def server_mechanism(
    name: str,
    portal: LoginPortal,
    *,
    tls_active: bool,
    external_identity: str | None = None,
    scram_store: ISCRAMKeyStore | None = None,
    peer: str | None = None,
) -> ServerMechanism:
    """A fresh server mechanism for one exchange. KeyError for an unknown name."""
    cls = SERVER_MECHANISMS[name]
    if cls is PlainServer:
        return PlainServer(portal, tls_active=tls_active, peer=peer)
    if cls is ExternalServer:
        return ExternalServer(portal, external_identity=external_identity, peer=peer)
    if cls is ScramSHA256Server:
        if scram_store is None:
            raise ValueError("SCRAM-SHA-256 needs a scram_store")
        return ScramSHA256Server(portal, scram_store, peer=peer)
    return cls(portal, peer=peer)


def profile_uri(name: str) -> str:
    """RFC 3080 §4.1.1: the profile URI of SASL mechanism ``name``."""
    return PROFILE_URI_PREFIX + name


def mechanism_name(uri: str) -> str | None:
    """The mechanism named by a SASL profile URI, or None if it is not one."""
    if uri.startswith(PROFILE_URI_PREFIX) and len(uri) > len(PROFILE_URI_PREFIX):
        return uri[len(PROFILE_URI_PREFIX) :]
    return None


# --------------------------------------------------------------------------------------------
# Client mechanisms


class SASLClientError(Exception):
    """The exchange cannot go on (bad challenge, forged server signature, misuse)."""


class ClientMechanism(Protocol):
    """The client side of one SASL exchange."""

    name: str

    def initial(self) -> bytes | None: ...

    def step(self, challenge: bytes) -> bytes: ...

    def verify_final(self, data: bytes | None) -> None: ...


class _SingleMessageClient:
    """A mechanism whose whole client side is one message (ANONYMOUS, PLAIN, EXTERNAL)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._sent = False

    def _message(self) -> bytes:
        raise NotImplementedError

    def initial(self) -> bytes | None:
        if self._sent:
            raise SASLClientError("initial response already sent")
        self._sent = True
        return self._message()

    def step(self, challenge: bytes) -> bytes:
        # RFC 4422 §5: the only challenge these mechanisms know is the empty one a server
        # sends when there was no initial response.
        if self._sent or challenge:
            raise SASLClientError(f"unexpected {self.name} challenge")
        self._sent = True
        return self._message()

    def verify_final(self, data: bytes | None) -> None:
        if not self._sent:
            raise SASLClientError("server reported success before we sent anything")
        if data:
            raise SASLClientError(f"unexpected additional data with {self.name} success")


class AnonymousClient(_SingleMessageClient):
    """ANONYMOUS (RFC 4505) with an optional trace string."""

    name = "ANONYMOUS"

    def __init__(self, trace: str = "") -> None:
        super().__init__()
        if len(trace) > MAX_TRACE_CHARS:
            raise ValueError("trace longer than 255 characters")
        _check_trace(trace)
        self._trace = trace

    def _message(self) -> bytes:
        return self._trace.encode("utf-8")


class PlainClient(_SingleMessageClient):
    """PLAIN (RFC 4616). Refuses to send the password unless ``tls_active``."""

    name = "PLAIN"

    def __init__(
        self, username: str, password: str, *, authzid: str = "", tls_active: bool
    ) -> None:
        super().__init__()
        if any("\x00" in s for s in (username, password, authzid)):
            raise ValueError("PLAIN strings cannot contain NUL")
        if not username or not password:
            raise ValueError("PLAIN needs a username and a password")
        self._tls_active = tls_active
        self._parts = (authzid, username, password)

    def _message(self) -> bytes:
        if not self._tls_active:
            raise SASLClientError("PLAIN would send the password without TLS")
        return "\x00".join(self._parts).encode("utf-8")

    def __repr__(self) -> str:
        return f"<PlainClient username={self._parts[1]!r}>"


class ExternalClient(_SingleMessageClient):
    """EXTERNAL (RFC 4422 Appendix A); an empty authzid asks the server to derive it."""

    name = "EXTERNAL"

    def __init__(self, authzid: str = "") -> None:
        super().__init__()
        self._authzid = authzid

    def _message(self) -> bytes:
        return self._authzid.encode("utf-8")


class ScramSHA256Client:
    """SCRAM-SHA-256 client (RFC 5802, RFC 7677) on ``scramp``, without channel binding.

    The server signature is checked from either the additional data with success or a final
    challenge (RFC 5802 §5 allows both); success without it is an error. ``max_iterations``
    guards against a server that asks for an absurd amount of work.
    """

    name = SCRAM_SHA_256

    def __init__(
        self,
        username: str,
        password: str,
        *,
        nonce: str | None = None,
        max_iterations: int = 1_000_000,
    ) -> None:
        try:
            self._client = ScramClient([SCRAM_SHA_256], username, password, c_nonce=nonce)
        except ScramException as e:
            raise ValueError(f"cannot use these SCRAM credentials: {e}") from None
        self._max_iterations = max_iterations
        self._stage = 0  # 0 nothing sent, 1 client-first sent, 2 client-final sent, 3 verified

    def initial(self) -> bytes | None:
        if self._stage != 0:
            raise SASLClientError("initial response already sent")
        self._stage = 1
        return self._client.get_client_first().encode("utf-8")

    def step(self, challenge: bytes) -> bytes:
        if self._stage == 0:
            if challenge:
                raise SASLClientError("SCRAM challenge before the client-first-message")
            initial = self.initial()
            assert initial is not None
            return initial
        if self._stage == 1:
            return self._server_first(challenge)
        if self._stage == 2:
            self._verify(challenge)
            return b""
        raise SASLClientError("SCRAM exchange already complete")

    def _server_first(self, challenge: bytes) -> bytes:
        try:
            text = challenge.decode("utf-8")
            for key, value in _scram_attributes(text):
                if key == "i" and value.isdigit() and int(value) > self._max_iterations:
                    raise SASLClientError(f"server asks for {value} iterations")
            self._client.set_server_first(text)
            final = self._client.get_client_final()
        except (UnicodeDecodeError, ValueError, ScramException) as e:
            raise SASLClientError(f"bad server-first-message: {e}") from None
        self._stage = 2
        return final.encode("utf-8")

    def _verify(self, data: bytes) -> None:
        try:
            self._client.set_server_final(data.decode("utf-8"))
        except (UnicodeDecodeError, ScramException) as e:
            raise SASLClientError(f"server not verified: {e}") from None
        self._stage = 3

    def verify_final(self, data: bytes | None) -> None:
        if self._stage == 3 and not data:
            return
        if self._stage != 2:
            raise SASLClientError("success at an unexpected point of the SCRAM exchange")
        if not data:
            raise SASLClientError("success without the server signature")
        self._verify(data)

    def __repr__(self) -> str:
        return f"<ScramSHA256Client username={str(self._client.username)!r}>"
