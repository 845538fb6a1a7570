"""The SASL user store, twisted.cred checkers and the failed-login throttle.

:class:`UserStore` keeps one SCRAM-SHA-256 verifier per user in a text file, never the
password. The line format is the RFC 5803 style PostgreSQL uses::

    username:SCRAM-SHA-256$<iterations>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>

One record serves both mechanisms: SCRAM reads the keys (:class:`ISCRAMKeyStore`), and a
PLAIN password is checked by deriving StoredKey from it with the stored salt and iteration
count (RFC 5802 §3) and comparing in constant time.

Username and password preparation: both are prepared with SASLprep (RFC 4013) as
implemented by ``scramp.utils.saslprep``, which is exactly what a SCRAM client does to the
password before hashing (RFC 5802 §2.2), so a PLAIN login and a SCRAM login of the same user
agree. It treats strings as "stored" strings (RFC 3454 §7: unassigned code points refused);
a presented string that fails simply matches nobody, as RFC 4616 §2 requires.

Lines starting with ``#`` are comments, except one: ``#decoy-secret:<b64>`` holds the
per-store secret from which the decoy salts for unknown users are derived (RFC 5802 §9),
kept in the file so the decoys, like real salts, survive restarts. It is written with the
first change made through this class, unless the deployment configures ``decoy_secret``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, NoReturn

from scramp import ScramException
from scramp.utils import saslprep
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from imxp import logs
from imxp.beep.saslmech import (
    IExternalIdentity,
    ISCRAMCredentials,
    ISCRAMKeyStore,
    StoredKeys,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "MAX_USERNAME_OCTETS",
    "MAX_WAITING",
    "MIN_ITERATIONS",
    "RECHECK_SECONDS",
    "ExternalChecker",
    "FailureThrottle",
    "Throttled",
    "UserStore",
    "UserStoreError",
    "Verdict",
    "derive_keys",
    "prepare_username",
]

log = logs.Logger(namespace="imxp.beep.users")

#: RFC 7677 §4: at least 4096 iterations for SCRAM-SHA-256.
MIN_ITERATIONS = 4096
DEFAULT_ITERATIONS = 4096
#: scramp refuses more (a denial-of-service guard on the client side).
MAX_ITERATIONS = 10_000_000
SALT_OCTETS = 16
MAX_USERNAME_OCTETS = 255
_KEY_OCTETS = hashlib.sha256().digest_size

_B64 = r"[A-Za-z0-9+/]+={0,2}"
_RECORD = re.compile(rf"SCRAM-SHA-256\$([1-9][0-9]{{0,9}}):({_B64})\$({_B64}):({_B64})")
_SECRET_PREFIX = "#decoy-secret:"


class UserStoreError(ValueError):
    """The user file is malformed, or a username or password is unacceptable."""


# How long the user file is trusted not to have changed when a relay asks whether a user
# exists (once per data for each local recipient); logins always look at the file.
RECHECK_SECONDS = 1.0


@functools.lru_cache(maxsize=1024)
def prepare_username(username: str) -> str:
    """SASLprep ``username`` and check it can be stored (UserStoreError if not).

    Refused: empty, longer than 255 octets (RFC 4616 §2's minimum), containing ':' (the
    field separator), a leading '#' (a comment), or anything SASLprep prohibits (which
    covers NUL, CR, LF and the other control characters).

    Results are remembered (bounded): a relay prepares the same few names for every data
    it delivers, and SASLprep (RFC 4013) is costly. Refusals are not remembered.
    """
    try:
        prepared = saslprep(username)
    except ScramException as e:
        raise UserStoreError(f"username fails SASLprep: {e}") from None
    if not prepared:
        raise UserStoreError("username is empty")
    if len(prepared.encode("utf-8")) > MAX_USERNAME_OCTETS:
        raise UserStoreError(f"username longer than {MAX_USERNAME_OCTETS} octets")
    if ":" in prepared or prepared.startswith("#"):
        raise UserStoreError("username may not contain ':' or start with '#'")
    return prepared


def _prepare_password(password: str) -> bytes:
    try:
        prepared = saslprep(password)
    except ScramException as e:
        raise UserStoreError(f"password fails SASLprep: {e}") from None
    if not prepared:
        raise UserStoreError("password is empty")
    return prepared.encode("utf-8")


def _keys_from_salted(salted_password: bytes) -> tuple[bytes, bytes]:
    # RFC 5802 §3: ClientKey := HMAC(SaltedPassword, "Client Key"); StoredKey := H(ClientKey);
    # ServerKey := HMAC(SaltedPassword, "Server Key").
    client_key = hmac.digest(salted_password, b"Client Key", "sha256")
    server_key = hmac.digest(salted_password, b"Server Key", "sha256")
    return hashlib.sha256(client_key).digest(), server_key


def derive_keys(password: str, salt: bytes, iterations: int) -> StoredKeys:
    """RFC 5802 §3: SaltedPassword := Hi(Normalize(password), salt, i), and the keys from it."""
    salted = hashlib.pbkdf2_hmac("sha256", _prepare_password(password), salt, iterations)
    stored_key, server_key = _keys_from_salted(salted)
    return StoredKeys(salt, iterations, stored_key, server_key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@implementer(ICredentialsChecker, ISCRAMKeyStore)
class UserStore:
    """A file of SCRAM-SHA-256 verifiers; a cred checker for PLAIN and SCRAM credentials.

    Changes re-read the file first and replace it atomically (temporary file in the same
    directory, fsync, ``os.replace``), mode 0600, so a running relay and the ``imxp`` command
    can share it. The relay picks up changes another process made by itself: a login looks
    at the file first, and so does asking whether a user exists (``in``) once
    :data:`RECHECK_SECONDS` have passed since the last look, on ``clock`` (an
    ``IReactorTime``; by default the monotonic clock). Changes are made one at a time,
    across processes, under a lock on the file's directory (:func:`_one_change_at_a_time`).

    Checking a PLAIN password costs one PBKDF2 run (``iterations`` rounds, a few ms at the
    default); unknown users cost the same so that timing does not reveal who exists. It
    runs in the calling thread until :meth:`hash_in_threads` names a reactor whose threads
    are to do it, as a relay's must: in the reactor it would hold up every session.
    """

    credentialInterfaces = (IUsernamePassword, ISCRAMCredentials)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        iterations: int = DEFAULT_ITERATIONS,
        decoy_secret: bytes | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be in {MIN_ITERATIONS}..{MAX_ITERATIONS}")
        self.path = Path(path)
        self.iterations = iterations
        self._fixed_secret = decoy_secret
        self._users: dict[str, StoredKeys] = {}
        self._seen: tuple[int, int, int] | None = None
        self._now: Callable[[], float] = time.monotonic if clock is None else clock.seconds
        # When the file was last looked at (None: look the next time).
        self._looked: float | None = None
        # The secret line the file carries (or will carry from the next write).
        self._file_secret: bytes | None = None
        self._watchers: list[Callable[[frozenset[str]], None]] = []
        self._hash: Callable[..., Deferred[StoredKeys]] = maybeDeferred
        self.reload()

    def hash_in_threads(self, reactor: Any) -> None:
        """From now on, run the PBKDF2 of password checks in ``reactor``'s thread pool
        (an ``IReactorThreads``), not in the thread that asks. Only the hashing moves:
        the file is read, and the result compared, in the reactor thread."""
        self._hash = functools.partial(threads.deferToThreadPool, reactor, reactor.getThreadPool())

    @property
    def _secret(self) -> bytes:
        if self._fixed_secret is not None:
            return self._fixed_secret
        if self._file_secret is None:
            self._file_secret = secrets.token_bytes(32)
        return self._file_secret

    def _take_secret(self, secret: bytes | None) -> None:
        if secret is not None:
            self._file_secret = secret
        elif self._file_secret is None and self._fixed_secret is None:
            self._file_secret = secrets.token_bytes(32)

    # -- file ------------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, StoredKeys], bytes | None]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if self._seen is not None:
                # Moved away or deleted while in use (a restore, a hand edit): taken for
                # "no users", everyone would be logged out and every login refused, which
                # applications take as final. The relay keeps the users it has (_fresh).
                raise UserStoreError(f"{self.path}: no longer there") from None
            return {}, None
        except UnicodeDecodeError as e:
            raise UserStoreError(f"{self.path}: not UTF-8: {e}") from None
        except OSError as e:
            # Typically a file replaced by another user's `imxp users add`: the relay
            # keeps the users it has and says why (see _fresh), rather than failing logins.
            raise UserStoreError(f"{self.path}: cannot read: {e.strerror or e}") from None
        users: dict[str, StoredKeys] = {}
        secret = None
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{self.path}:{lineno}"
            if line.startswith(_SECRET_PREFIX):
                try:
                    secret = _unb64(line[len(_SECRET_PREFIX) :].strip())
                except binascii.Error:
                    raise UserStoreError(f"{where}: bad decoy secret") from None
                continue
            if not line.strip() or line.startswith("#"):
                continue
            name, _, record = line.partition(":")
            match = _RECORD.fullmatch(record)
            if match is None:
                raise UserStoreError(f"{where}: not a SCRAM-SHA-256 record")
            try:
                if prepare_username(name) != name:
                    raise UserStoreError("username is not in SASLprep form")
                salt, stored_key, server_key = (_unb64(match[n]) for n in (2, 3, 4))
            except (binascii.Error, UserStoreError) as e:
                raise UserStoreError(f"{where}: {e}") from None
            iterations = int(match[1])
            if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
                raise UserStoreError(f"{where}: iteration count {iterations} out of range")
            if len(stored_key) != _KEY_OCTETS or len(server_key) != _KEY_OCTETS:
                raise UserStoreError(f"{where}: keys are not SHA-256 sized")
            if len(salt) < 12:  # scramp, like most SCRAM code, refuses shorter salts
                raise UserStoreError(f"{where}: salt shorter than 12 octets")
            if name in users:
                raise UserStoreError(f"{where}: duplicate user {name!r}")
            users[name] = StoredKeys(salt, iterations, stored_key, server_key)
        return users, secret

    def watch(self, callback: Callable[[frozenset[str]], None]) -> None:
        """Call ``callback`` with the users a re-read finds removed or with a new
        password, whenever it finds some: those logged in with the old one are no longer
        who the file says may log in."""
        self._watchers.append(callback)

    def refresh(self) -> None:
        """Look at the file now, and re-read it if it changed."""
        self._fresh()

    def reload(self) -> None:
        """Re-read the file. On a malformed file, raise UserStoreError and keep the old data."""
        stamp = self._stamp()
        users, secret = self._read()
        mode = self.path.stat().st_mode if stamp is not None else 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warn(
                "user file {path} is accessible to others",
                path=str(self.path),
                event="imxp.users-exposed",
            )
        self._take_secret(secret)
        self._seen = stamp
        self._replace(users)

    def _replace(self, users: dict[str, StoredKeys]) -> None:
        before, self._users = self._users, users
        withdrawn = frozenset(name for name, keys in before.items() if users.get(name) != keys)
        if withdrawn:
            for callback in self._watchers:
                try:
                    callback(withdrawn)
                except Exception:
                    log.failure("acting on withdrawn users failed", event="imxp.users-watch-failed")

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:  # gone, or in a directory the relay may no longer enter: _read says
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _fresh(self, *, recent: bool = False) -> dict[str, StoredKeys]:
        """The users, re-read first if the file changed: an operator's ``imxp users
        add`` on a running relay takes effect at the next login. With ``recent``, a
        look at the file within the last :data:`RECHECK_SECONDS` is good enough."""
        now = self._now()
        if recent and self._looked is not None and 0 <= now - self._looked < RECHECK_SECONDS:
            return self._users
        self._looked = now
        if self._stamp() != self._seen:
            try:
                self.reload()
            except UserStoreError as e:
                log.error(
                    "user file changed but cannot be read, keeping the old users: {error}",
                    error=str(e),
                    event="imxp.users-unreadable",
                )
                self._seen = self._stamp()
        return self._users

    def _write(self, users: dict[str, StoredKeys]) -> None:
        lines = []
        if self._file_secret is not None:
            lines.append(f"{_SECRET_PREFIX}{_b64(self._file_secret)}")
        for name in sorted(users):
            k = users[name]
            lines.append(
                f"{name}:SCRAM-SHA-256${k.iterations}:{_b64(k.salt)}"
                f"${_b64(k.stored_key)}:{_b64(k.server_key)}"
            )
        data = ("\n".join(lines) + "\n").encode("utf-8")
        directory = self.path.parent
        # mkstemp creates the file 0600, so no moment exists when others could read it.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            _keep_owner(tmp, self.path)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def _change(self, apply: Callable[[dict[str, StoredKeys]], None]) -> None:
        # Start from the file as it is now, so an older in-memory copy cannot undo changes
        # another process made.
        with _one_change_at_a_time(self.path.parent):
            users, secret = self._read()
            self._take_secret(secret)
            apply(users)
            self._write(users)
            self._seen = self._stamp()
        self._replace(users)

    # -- administration --------------------------------------------------------------------

    def _new_keys(self, password: str, salt: bytes | None) -> StoredKeys:
        if salt is None:
            salt = secrets.token_bytes(SALT_OCTETS)
        elif len(salt) < 12:
            raise UserStoreError("salt shorter than 12 octets")
        return derive_keys(password, salt, self.iterations)

    def add(self, username: str, password: str, *, salt: bytes | None = None) -> None:
        """Add a user (UserStoreError if present). ``salt`` is for imports and tests."""
        name = prepare_username(username)
        keys = self._new_keys(password, salt)

        def apply(users: dict[str, StoredKeys]) -> None:
            if name in users:
                raise UserStoreError(f"user {name!r} exists")
            users[name] = keys

        self._change(apply)

    def set_password(self, username: str, password: str, *, salt: bytes | None = None) -> None:
        """Give an existing user a new password, salt and the current iteration count."""
        name = prepare_username(username)
        keys = self._new_keys(password, salt)

        def apply(users: dict[str, StoredKeys]) -> None:
            if name not in users:
                raise KeyError(name)
            users[name] = keys

        self._change(apply)

    def remove(self, username: str) -> None:
        """Remove a user; KeyError if there is none."""
        name = prepare_username(username)

        def apply(users: dict[str, StoredKeys]) -> None:
            del users[name]

        self._change(apply)

    def usernames(self) -> list[str]:
        """The stored usernames, sorted."""
        return sorted(self._fresh())

    def __contains__(self, username: object) -> bool:
        # A relay asks this for each local recipient of each data (RFC 3340 §4.4.4.1
        # step 5.3): the file is looked at no more than once per RECHECK_SECONDS.
        return isinstance(username, str) and self._lookup(username, recent=True) is not None

    def _lookup(self, username: str, *, recent: bool = False) -> StoredKeys | None:
        try:
            return self._fresh(recent=recent).get(prepare_username(username))
        except UserStoreError:
            return None

    # -- ISCRAMKeyStore --------------------------------------------------------------------

    def scram_keys(self, username: str) -> Deferred[StoredKeys | None]:
        return succeed(self._lookup(username))

    def decoy_keys(self, username: str) -> StoredKeys:
        """Deterministic per (secret, username), shaped like a real record (RFC 5802 §9)."""
        name = username.encode("utf-8")

        def derive(label: bytes) -> bytes:
            return hmac.digest(self._secret, label + b"\x00" + name, "sha256")

        return StoredKeys(
            derive(b"salt")[:SALT_OCTETS], self.iterations, derive(b"stored"), derive(b"server")
        )

    # -- ICredentialsChecker ---------------------------------------------------------------

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        """The prepared username when the password or SCRAM proof is right."""
        if ISCRAMCredentials.providedBy(credentials):
            keys = self._lookup(credentials.username)
            if keys is not None and credentials.check_stored_key(keys.stored_key):
                return succeed(prepare_username(credentials.username))
            return fail(UnauthorizedLogin("bad SCRAM proof"))
        if IUsernamePassword.providedBy(credentials):
            return self._check_password(credentials.username, credentials.password)
        return fail(UnauthorizedLogin("unsupported credentials"))

    def _check_password(self, username: str | bytes, password: str | bytes) -> Deferred[str]:
        try:
            name = username.decode("utf-8") if isinstance(username, bytes) else username
            secret = password.decode("utf-8") if isinstance(password, bytes) else password
            name = prepare_username(name)
            keys = self._fresh().get(name)
        except (UnicodeDecodeError, UserStoreError):
            return fail(UnauthorizedLogin("unusable username or password"))
        # Unknown users get the same PBKDF2 work as known ones.
        reference = keys if keys is not None else self.decoy_keys(name)

        def compare(candidate: StoredKeys) -> str:
            # Against the file as it is now: a removal or new password that the relay
            # noticed while this ran has already logged the user out (watch), and must
            # not let the old password in after it.
            current = self._lookup(name)
            if current is not None and hmac.compare_digest(
                candidate.stored_key, current.stored_key
            ):
                return name
            raise UnauthorizedLogin("bad username or password")

        def unusable(failure: Any) -> NoReturn:
            failure.trap(UserStoreError)  # the password fails SASLprep
            raise UnauthorizedLogin("unusable username or password")

        d = self._hash(derive_keys, secret, reference.salt, reference.iterations)
        return d.addCallbacks(compare, unusable)


@implementer(ICredentialsChecker)
class ExternalChecker:
    """Accepts identities the TLS layer proved (RFC 4422 Appendix A, RFC 3080 §4.1.3).

    The certificate was already verified against the trust store; this checker only
    applies local policy: ``allowed`` may be None (anyone with a valid certificate), a
    collection of identities, or a predicate.
    """

    credentialInterfaces = (IExternalIdentity,)

    def __init__(self, allowed: Collection[str] | Callable[[str], bool] | None = None) -> None:
        self._allowed = allowed

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        identity = credentials.identity
        allowed = self._allowed
        if not identity:
            return fail(UnauthorizedLogin("no identity"))
        if allowed is None:
            ok = True
        elif callable(allowed):
            ok = bool(allowed(identity))
        else:
            ok = identity in allowed
        if ok:
            return succeed(identity)
        return fail(UnauthorizedLogin(f"identity {identity!r} not allowed"))


#: Attempts of one address that may wait their turn at a FailureThrottle by default: as many
#: as the sessions a listener lets one address have before login, by default.
MAX_WAITING = 32


class Throttled(Exception):
    """An attempt refused at once: too many from its peer address wait their turn
    (:meth:`FailureThrottle.turn`). ``burst`` counts the refusals since one of the
    address's attempts last had its turn, so that a flood can be logged once."""

    def __init__(self, address: str, burst: int) -> None:
        super().__init__(f"too many authentication attempts from {address} at once")
        self.address = address
        self.burst = burst


#: What a turn is ended with: True the credentials were right, False wrong, None no
#: verdict (a challenge, or nothing was checked).
Verdict = bool | None


class _Peer:
    """What a :class:`FailureThrottle` knows of one peer address."""

    __slots__ = ("busy", "failures", "last", "refused", "timer", "waiting")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0  # when the last failure was
        self.busy = False  # an attempt has its turn
        self.waiting: deque[Deferred[Callable[[Verdict], None]]] = deque()
        self.timer: IDelayedCall | None = None
        self.refused = 0


class FailureThrottle:
    """Paces the authentication attempts of one peer address by its recent failures.

    Before the glue checks an attempt it waits for the address's :meth:`turn`, and ends
    the turn with the verdict. The attempts of one address are checked one at a time, and
    after n failures the next no sooner than ``min(cap, base * 2**(n-1))`` seconds after
    the last: the delay comes before the work, so that attempts sent in parallel, on one
    session or on many, gain nothing. Meanwhile up to ``max_waiting`` attempts wait their
    turn, in order; more are refused at once (:class:`Throttled`).

    Failures decay: one is forgotten for every ``forget_after`` seconds without a new one,
    so that a user who mistyped is soon back to no delay, while a guesser at full speed
    stays at ``cap``, which is then the guessing rate of one address (n counts no higher
    than where the delay reaches ``cap``). A success forgets them all.

    Memory is bounded: at most ``max_addresses`` are tracked, the longest-quiet evicted
    first (attempts waiting there are refused). Pass the host alone, not host and port,
    or each connection counts as a new peer (the glue passes the IPv6 /64).
    """

    def __init__(
        self,
        clock: IReactorTime,
        base: float = 1.0,
        cap: float = 30.0,
        forget_after: float = 60.0,
        max_addresses: int = 10_000,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        if base < 0 or cap < 0 or forget_after <= 0 or max_addresses < 1 or max_waiting < 1:
            raise ValueError("bad throttle parameters")
        self._clock = clock
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.max_addresses = max_addresses
        self.max_waiting = max_waiting
        # Failures are counted no further than where the delay reaches the cap.
        self._most = 1
        while self._most < 64 and base * 2.0 ** (self._most - 1) < cap:
            self._most += 1
        # address -> what we know; ordered longest-quiet first.
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    # -- counting --------------------------------------------------------------------------

    def _failures(self, peer: _Peer, now: float) -> int:
        if not peer.failures:
            return 0
        quiet = max(0.0, now - peer.last)  # the reactor's clock may be set back
        return max(0, peer.failures - int(quiet // self.forget_after))

    def _delay(self, failures: int) -> float:
        if not failures:
            return 0.0
        return min(self.cap, self.base * 2.0 ** (failures - 1))

    def _idle(self, peer: _Peer, now: float) -> bool:
        return not (peer.busy or peer.waiting or self._failures(peer, now))

    def _expire(self, now: float) -> None:
        while self._peers:
            address, peer = next(iter(self._peers.items()))
            if not self._idle(peer, now):
                break
            del self._peers[address]

    def _touch(self, address: str, now: float) -> _Peer:
        """The entry of ``address``, made the most recent; others evicted past the bound."""
        self._expire(now)
        peer = self._peers.pop(address, None) or _Peer()
        self._peers[address] = peer
        while len(self._peers) > self.max_addresses:
            evicted, old = self._peers.popitem(last=False)
            self._evicted(evicted, old)
        return peer

    def _evicted(self, address: str, peer: _Peer) -> None:
        if peer.timer is not None and peer.timer.active():
            peer.timer.cancel()
        peer.timer = None
        waiting, peer.waiting = peer.waiting, deque()
        for d in waiting:
            peer.refused += 1
            d.errback(Throttled(address, peer.refused))

    def _drop_if_idle(self, address: str, peer: _Peer) -> None:
        if self._peers.get(address) is peer and self._idle(peer, self._clock.seconds()):
            if peer.timer is not None and peer.timer.active():
                peer.timer.cancel()
            del self._peers[address]

    def delay_for(self, address: str) -> float:
        """The delay the failures of ``address`` impose now, counted from its last one."""
        now = self._clock.seconds()
        self._expire(now)
        peer = self._peers.get(address)
        return 0.0 if peer is None else self._delay(self._failures(peer, now))

    def failed(self, address: str) -> None:
        now = self._clock.seconds()
        peer = self._touch(address, now)
        peer.failures = min(self._failures(peer, now) + 1, self._most)
        peer.last = now

    def succeeded(self, address: str) -> None:
        peer = self._peers.get(address)
        if peer is not None:
            peer.failures = 0
            self._drop_if_idle(address, peer)

    # -- turns -----------------------------------------------------------------------------

    def turn(self, address: str) -> Deferred[Callable[[Verdict], None]]:
        """Fires when an attempt from ``address`` may be checked, with the function that
        ends its turn: call it once, with the verdict (:data:`Verdict`).

        Fails with :class:`Throttled` at once when ``max_waiting`` attempts wait already,
        or later if the address is evicted meanwhile. Cancel it to give up the place.
        """
        now = self._clock.seconds()
        peer = self._touch(address, now)
        if len(peer.waiting) >= self.max_waiting:
            peer.refused += 1
            return fail(Throttled(address, peer.refused))

        def withdraw(d: Deferred[Callable[[Verdict], None]]) -> None:
            if d in peer.waiting:
                peer.waiting.remove(d)
                if not peer.waiting and peer.timer is not None and peer.timer.active():
                    peer.timer.cancel()
                self._drop_if_idle(address, peer)

        d: Deferred[Callable[[Verdict], None]] = Deferred(withdraw)
        peer.waiting.append(d)
        self._next(address, peer)
        return d

    def _next(self, address: str, peer: _Peer) -> None:
        """Give the first waiting attempt its turn, now or when the delay has passed."""
        if peer.busy or not peer.waiting or self._peers.get(address) is not peer:
            return
        now = self._clock.seconds()
        failures = self._failures(peer, now)
        ready = min(peer.last, now) + self._delay(failures) if failures else now
        if ready > now:
            if peer.timer is None or not peer.timer.active():
                peer.timer = self._clock.callLater(ready - now, self._next, address, peer)
            return
        peer.busy = True
        peer.refused = 0
        ended = False

        def end(verdict: Verdict) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            current = self._peers.get(address) is peer
            if current:
                peer.busy = False
            if verdict is True:
                self.succeeded(address)
            elif verdict is False:
                self.failed(address)
            if current:
                self._next(address, peer)
                self._drop_if_idle(address, peer)

        peer.waiting.popleft().callback(end)


@contextlib.contextmanager
def _one_change_at_a_time(directory: Path) -> Iterator[None]:
    """Hold the lock of the user file's directory: without it two `imxp users add` run at
    once each write the file as they read it, and the later undoes the earlier, though
    both said "added". The lock is the kernel's (flock), on the directory, which whoever
    may replace the file can open, whatever its user: no lock file to own or leave
    behind. Readers (a relay) need none: the file is replaced whole."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def _keep_owner(new: str, old: Path) -> None:
    """Give ``new`` the owner and group of ``old``, if any and if we may.

    Run as root on a relay's file (``sudo imxp users add``), a change would otherwise
    leave it owned by root with mode 0600, and the relay, running as its own user, could
    no longer read it. Only root can give a file away; anyone else writes files the
    relay's user can read only if it is the same user, which is then a no-op.
    """
    try:
        st = old.stat()
    except FileNotFoundError:
        return
    try:
        os.chown(new, st.st_uid, st.st_gid)
    except PermissionError:
        pass
