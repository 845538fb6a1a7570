"""The relay as a Twisted service: listeners, links to next hops, clean shutdown.

``twistd imxp`` builds this through :mod:`imxp.tap`. Endpoints attach on the
apex-edge listeners (TLS, then SASL, then APEX); relays bind on the apex-mesh
listeners (TLS with their certificate, then APEX). On SIGTERM the relay stops
listening, refuses new data with 421, gives accepted data ``shutdown_grace``
seconds to reach a verdict (which is reported if asked for), tells attached
applications their attachments end, and releases every session. A user removed
from the user file, or given a new password, is logged out within
``USERS_LOOK_SECONDS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import IListeningPort, IReactorTime, IResolver
from twisted.names import client as dns_client
from twisted.python.failure import Failure

from imxp import logs
from imxp.apex import wire
from imxp.apex.peers import Link, LinkFailed, NextHopStatus, PeerPool
from imxp.apex.policy import AccessPolicy
from imxp.apex.relay import APEXChannel, APEXProfile, Mode, Relay
from imxp.apex.routing import Router, Target, open_session
from imxp.beep import mgmt
from imxp.beep.message import Message
from imxp.beep.sasl import sasl_profiles
from imxp.beep.saslmech import make_portal
from imxp.beep.session import (
    TUNING_MESSAGE_SIZE,
    BEEPError,
    Role,
    Session,
    SessionClosed,
    SessionConfig,
    SessionFactory,
    address_text,
)
from imxp.beep.tls import TLSProfile, start_tls
from imxp.beep.tlsctx import client_options, server_options
from imxp.beep.users import MAX_WAITING, ExternalChecker, FailureThrottle, UserStore
from imxp.bootstrap import Prepared, prepare
from imxp.certs import Issued
from imxp.config import Config, offered_mechanisms, resolver_addresses, session_config

__all__ = [
    "Credentials",
    "ListenFailed",
    "RelayService",
    "RelayStatus",
    "build_relay",
    "make_relay_service",
    "reconfigure",
]

#: How often a relay looks at its user file for users removed or given a new password.
USERS_LOOK_SECONDS = 5.0

#: Seconds an answer that may never come is waited for: in each last step of a stop (the
#: reports of the verdicts given when the grace is over, the terminates, the release of
#: the links and of the sessions), and for the terminates of a user logged out.
LAST_ANSWERS = 2.0

#: The longest a stop takes once ``shutdown_grace`` is over: its four last steps.
STOP_AFTER_GRACE = 4 * LAST_ANSWERS


class ListenFailed(SystemExit, Exception):
    """A listener could not be had at start: the relay exits with status 1, naming it.

    A SystemExit, so that ``twistd -n`` prints the line and exits; an Exception too,
    because the daemonising twistd reports only Exceptions to the process waiting for
    the start (its status pipe) - any other left that one waiting for ever.
    """


class Credentials:
    """The relay's certificate and the CAs it trusts, as every TLS session it makes or
    accepts from now on uses them: :meth:`use` puts a renewed certificate to work without
    a restart (SIGHUP). Sessions already made keep what they were made with."""

    def __init__(self, identity: Issued, trust: Sequence[x509.Certificate]) -> None:
        edge, mesh = self._options(identity, trust)
        self.edge_tls, self.mesh_tls = TLSProfile(edge), TLSProfile(mesh)
        self.identity, self.trust = identity, tuple(trust)

    def use(self, identity: Issued, trust: Sequence[x509.Certificate]) -> None:
        """Use ``identity`` and ``trust`` from now on (ValueError, and no change, if
        unusable)."""
        edge, mesh = self._options(identity, trust)
        self.edge_tls.options, self.mesh_tls.options = edge, mesh
        self.identity, self.trust = identity, tuple(trust)

    @staticmethod
    def _options(identity: Issued, trust: Sequence[x509.Certificate]) -> tuple[Any, Any]:
        roots = list(trust) or None
        # A peer relay presents its server certificate, which public CAs now issue for
        # serverAuth only; what it proves is checked when it binds (RFC 3340 §4.5.2).
        return server_options(identity, roots), server_options(
            identity, roots, server_auth_clients=True
        )


@dataclasses.dataclass(frozen=True)
class RelayStatus:
    """What the relay is doing, as an operator asks for it (SIGUSR1, ``imxp status``)."""

    domain: str
    sessions: int
    """BEEP sessions on the listeners."""
    logged_in: int
    """Of those, the ones that have logged in with SASL."""
    attached: int
    """Endpoints attached."""
    to_endpoints: int
    """Octets waiting to be written to the attached applications."""
    in_flight: int
    """Data accepted and not yet given a verdict for every recipient."""
    up: float
    """Seconds since the relay started."""
    expires: str
    """When the relay certificate stops being valid (ISO 8601)."""
    accepting: bool
    """False once the relay is stopping: new data is refused with 421."""
    next_hops: tuple[NextHopStatus, ...]

    def __str__(self) -> str:
        return (
            f"sessions {self.sessions} ({self.logged_in} logged in); endpoints attached "
            f"{self.attached} ({self.to_endpoints} octets waiting for them); data in flight "
            f"{self.in_flight}; next hops {len(self.next_hops)}; up {self.up:.0f} s; "
            f"certificate valid until {self.expires}"
        )


class RelayService(service.Service):
    """Listens, relays, and shuts down without dropping accepted data."""

    log = logs.Logger()

    def __init__(
        self,
        relay: Relay,
        pool: PeerPool,
        listeners: Sequence[tuple[str, SessionFactory]],
        reactor: Any,
        *,
        credentials: Credentials,
        shutdown_grace: float = 10.0,
        users: UserStore | None = None,
    ) -> None:
        self.relay = relay
        self.credentials = credentials
        self.pool = pool
        self.listeners = list(listeners)
        self.reactor = reactor
        self.shutdown_grace = shutdown_grace
        self.ports: list[IListeningPort] = []
        # Listeners privilegedStartService opened, for startService to leave alone.
        self._bound: set[str] = set()
        self.sessions: set[Session] = set()
        self._started_at: float | None = None
        self._users_look: task.LoopingCall | None = None
        self._users_trouble: str | None = None
        if users is not None:
            users.watch(self._withdrawn)
            self._users_look = task.LoopingCall(self._look_at_users, users)
            self._users_look.clock = reactor

    def track(self, session: Session) -> None:
        self.sessions.add(session)
        session.when_closed().addCallback(lambda _: self.sessions.discard(session))

    def _look_at_users(self, users: UserStore) -> None:
        try:
            users.refresh()
        except OSError as e:
            trouble = f"{users.path}: {e.strerror or e}"
            if trouble != self._users_trouble:  # once, not every few seconds
                self.log.error(
                    "cannot look at the user file: {error}",
                    error=trouble,
                    event="imxp.users-unreadable",
                )
            self._users_trouble = trouble
        else:
            self._users_trouble = None

    def _withdrawn(self, names: frozenset[str]) -> None:
        """Users removed from the user file, or given a new password: each session that
        logged in as one is ended (§4.4.3 terminate with 421, then the BEEP session
        closed), as ending only its attachments would let the application attach again
        on the session it has. An application that has the new password logs in again;
        one that has not is refused."""
        policy = self.relay.policy
        endpoints = {policy.sasl_endpoint(name) for name in names} - {None}
        for session in list(self.sessions):
            identity = session.authenticated_identity
            if identity is not None and policy.sasl_endpoint(identity) in endpoints:
                defer.ensureDeferred(self._log_out(session, identity))

    async def _log_out(self, session: Session, identity: str) -> None:
        self.log.warn(
            "{identity} was removed from the user file or given a new password: "
            "ending its session from {peer}",
            identity=identity,
            peer=session.peer,
            event="imxp.logged-out",
        )
        ending = self.relay.terminate_all(
            421, f"the password of {identity} was withdrawn or changed: log in again", session
        )
        await self._at_most(ending, LAST_ANSWERS)
        session.disconnect()

    def privilegedStartService(self) -> None:
        """Listen, as twistd does this part: before it sheds privileges (``--uid``), so
        that ports 912 and 913 can be bound, and before the reactor runs, so that a
        listener that cannot be had (port in use, address not here) stops the start
        with an error naming it and a non-zero exit instead of a relay serving nothing."""
        super().privilegedStartService()
        for description, factory in self.listeners:
            listening = endpoints.serverFromString(self.reactor, description).listen(factory)
            outcome: list[IListeningPort | Failure] = []
            listening.addBoth(outcome.append)
            if not outcome:
                # Not at once (no stream endpoint of Twisted's is like this): startService.
                continue
            if isinstance(outcome[0], Failure):
                reason = outcome[0].getErrorMessage()
                self.log.error(
                    "cannot listen on {description}: {reason}",
                    description=description,
                    reason=reason,
                    event="imxp.listen-failed",
                )
                for port in self.ports:
                    port.stopListening()
                raise ListenFailed(f"imxp: cannot listen on {description}: {reason}")
            self._listening(description, outcome[0])
            self._bound.add(description)

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().startService()
        self._started_at = self.reactor.seconds()
        if self._users_look is not None:
            # Logins look at the file themselves; this is for those already logged in.
            self._users_look.start(USERS_LOOK_SECONDS, now=False)
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        bound, self._bound = self._bound, set()
        for description, factory in self.listeners:
            if description not in bound:
                endpoint = endpoints.serverFromString(self.reactor, description)
                self._listening(description, await endpoint.listen(factory))

    def _listening(self, description: str, port: IListeningPort) -> None:
        self.ports.append(port)
        self.log.info(
            "relay for {domain} listening on {description} ({address})",
            domain=self.relay.domain,
            description=description,
            address=address_text(port.getHost()),
            event="imxp.listening",
        )

    def status(self) -> RelayStatus:
        """What the relay is doing now."""
        relay = self.relay
        channels = [c.channel for c in relay.applications() if c.channel is not None]
        now = self.reactor.seconds()
        return RelayStatus(
            domain=relay.domain,
            sessions=len(self.sessions),
            logged_in=sum(1 for s in self.sessions if s.authenticated_identity is not None),
            attached=len(relay.attached),
            to_endpoints=sum(channel.queued_bytes for channel in channels),
            in_flight=relay.in_flight,
            up=now - (self._started_at if self._started_at is not None else now),
            expires=self.credentials.identity.certificate.not_valid_after_utc.isoformat(),
            accepting=relay.accepting,
            next_hops=tuple(self.pool.status()),
        )

    def log_status(self) -> None:
        """Log what the relay is doing, as an operator asks for it (SIGUSR1, as Exim's
        exiwhat does): one ``imxp.status`` line for the relay, then one
        ``imxp.status-next-hop`` line for each next hop it has a link to, is connecting
        to, or is waiting to try again."""
        status = self.status()
        fields = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
        del fields["next_hops"]
        self.log.info(
            "status: {summary}",
            summary=str(status),
            next_hop_count=len(status.next_hops),
            **fields,
            event="imxp.status",
        )
        for hop in status.next_hops:
            self.log.info(
                "status: next hop {next_hop}",
                next_hop=str(hop),
                **dataclasses.asdict(hop),
                event="imxp.status-next-hop",
            )

    async def _at_most(self, waiting: defer.Deferred[Any], seconds: float) -> bool:
        """Wait for ``waiting`` at most ``seconds`` (then cancel it); whether it fired."""
        try:
            await waiting.addTimeout(seconds, self.reactor)
        except defer.TimeoutError:
            return False
        return True

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        relay = self.relay
        relay.accepting = False
        if self._users_look is not None and self._users_look.running:
            self._users_look.stop()
        self.log.info(
            "relay for {domain} stopping: {count} data in flight",
            domain=relay.domain,
            count=relay.in_flight,
            event="imxp.stopping",
        )
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        if not await self._at_most(relay.when_idle(), self.shutdown_grace):
            # No more waiting for answers, no more retrying: what is still in flight
            # reaches its verdict now (451, outcome unknown; or why no next hop took it).
            relay.stop_waiting()
            # The reports of those verdicts have only now been sent, and get a moment:
            # an application answers in moments, and a report for another domain may
            # need a link of its own (so the pool is not closed yet).
            if not await self._at_most(relay.when_idle(), LAST_ANSWERS):
                relay.stop_waiting()
                await relay.when_idle()
        # An application that answers nothing must not hold the stop up for ever.
        await self._at_most(relay.terminate_all(421, "relay shutting down"), LAST_ANSWERS)
        await self.pool.close(LAST_ANSWERS)
        closing = [s.close().addErrback(lambda f, s=s: s.disconnect()) for s in list(self.sessions)]
        await self._at_most(defer.gatherResults(closing), LAST_ANSWERS)
        for session in list(self.sessions):
            session.disconnect()
        self.log.info("relay for {domain} stopped", domain=relay.domain, event="imxp.stopped")
        # The last wait above may end inside a session's read (an application's close
        # answered), and once this returns the reactor shuts down at once: it disconnects
        # every connection, that one too, under the TLS layer that is still reading it.
        await task.deferLater(self.reactor, 0, lambda: None)


def build_relay(
    *,
    domain: str,
    identity: Issued,
    trust: Sequence[x509.Certificate],
    users: UserStore,
    edge_listen: Sequence[str],
    mesh_listen: Sequence[str],
    session_config: SessionConfig,
    reactor: Any,
    resolver: IResolver | None = None,
    dns_servers: Sequence[tuple[str, int]] = (),
    routes: dict[str, str] | None = None,
    smart_host: str | None = None,
    trusted_relays: Sequence[str] = (),
    refusals: dict[str, list[str]] | None = None,
    sasl_mechanisms: Sequence[str] = ("SCRAM-SHA-256", "PLAIN", "EXTERNAL"),
    allow_anonymous: bool = False,
    max_hops: int = 16,
    delivery_timeout: float = 60.0,
    connect_timeout: float = 30.0,
    reconnect_max_delay: float = 300.0,
    max_queued: int = 16777216,
    max_sessions_per_peer: int | None = 32,
    shutdown_grace: float = 10.0,
) -> RelayService:
    """Assemble a relay from its ingredients (see :mod:`imxp.config` for each).

    Its sessions take no message longer than ``TUNING_MESSAGE_SIZE`` from a peer that has
    not authenticated, unless ``session_config`` sets another bound: until then a relay
    takes TLS and SASL from a peer and nothing else. It offers APEX over TLS only, an
    attach needs a SASL login and a bind a certificate that verified (RFC 3340 §3, §4.5),
    and on a session it opened it waits for the next hop's certificate before it binds.
    Without the bound, a peer that never logs in could make each of its sessions hold
    ``max_long_messages`` messages of ``max_message_size``.
    """
    if session_config.max_message_size_unauthenticated is None:
        session_config = dataclasses.replace(
            session_config, max_message_size_unauthenticated=TUNING_MESSAGE_SIZE
        )
    if resolver is None and dns_servers:
        # Only these servers: createResolver would also ask those of /etc/resolv.conf.
        resolver = dns_client.Resolver(servers=list(dns_servers), reactor=reactor)
    router = Router(
        static_routes=routes or {},
        smart_host=smart_host or None,
        resolver=resolver,
        clock=reactor,
    )
    policy = AccessPolicy(
        domain,
        lambda local: local in users,
        trusted_relays=trusted_relays,
        refusals=refusals,
    )
    relay: Relay
    credentials = Credentials(identity, trust)

    async def connect(target: Target) -> Link:
        return await _connect(
            target, relay, credentials, session_config, reactor, connect_timeout, resolver
        )

    pool = PeerPool(
        connect,
        reactor,
        max_retry=_longest_backoff(reconnect_max_delay, delivery_timeout),
        max_queued=max_queued,
    )
    relay = Relay(
        domain,
        policy,
        router,
        pool,
        reactor,
        max_hops=max_hops,
        delivery_timeout=delivery_timeout,
        max_queued=max_queued,
    )
    checkers: list[Any] = [users, ExternalChecker(policy.may_log_in_by_certificate)]
    if allow_anonymous:
        checkers.append(AllowAnonymousAccess())
    # PBKDF2 for PLAIN logins in threads: in the reactor it would hold up every session.
    users.hash_in_threads(reactor)
    # One line of waiting attempts per address has room for each session the listener
    # lets it have before login (each session has one exchange at work at a time).
    throttle = FailureThrottle(reactor, max_waiting=max_sessions_per_peer or MAX_WAITING)
    sasl = sasl_profiles(
        list(sasl_mechanisms),
        make_portal(checkers),
        scram_store=users,
        throttle=throttle,
        require_tls=True,
    )
    relay_service: RelayService

    def tracked(session: Session) -> None:
        relay_service.track(session)

    edge = SessionFactory(
        Role.LISTENER,
        [credentials.edge_tls, *sasl, APEXProfile(relay, Mode.EDGE)],
        session_config,
        reactor,
        max_sessions_per_peer=max_sessions_per_peer,
        on_session=tracked,
    )
    mesh = SessionFactory(
        Role.LISTENER,
        [credentials.mesh_tls, APEXProfile(relay, Mode.MESH)],
        session_config,
        reactor,
        max_sessions_per_peer=max_sessions_per_peer,
        on_session=tracked,
    )
    listeners = [(d, edge) for d in edge_listen] + [(d, mesh) for d in mesh_listen]
    relay_service = RelayService(
        relay,
        pool,
        listeners,
        reactor,
        credentials=credentials,
        shutdown_grace=shutdown_grace,
        users=users,
    )
    return relay_service


async def _connect(
    target: Target,
    relay: Relay,
    credentials: Credentials,
    session_config: SessionConfig,
    reactor: IReactorTime,
    connect_timeout: float,
    resolver: IResolver | None = None,
) -> Link:
    """A TLS session to ``target``, checked against its domain (RFC 6125), with an
    APEX channel bound as our domain (RFC 3340 §4.4.2, §4.2)."""
    factory = SessionFactory(
        Role.INITIATOR, [APEXProfile(relay, Mode.MESH)], session_config, reactor
    )
    try:
        session: Session = await open_session(
            target, factory, reactor, timeout=connect_timeout, resolver=resolver
        )
    except (error.ConnectError, error.DNSLookupError) as e:
        raise LinkFailed(421, f"cannot connect: {e}") from None
    try:
        return await _bound(session, target, relay, credentials.identity, credentials.trust)
    except defer.CancelledError:
        # Given up half way (a delivery deadline, a stop): a session that is no link
        # would stay open, in no pool, until the peer's idle timeout.
        session.disconnect()
        raise


# The one bind a link makes rides on its APEX channel's start (§4.2).
_BIND_TRANS_ID = 1


async def _bound(
    session: Session,
    target: Target,
    relay: Relay,
    identity: Issued,
    trust: Sequence[x509.Certificate],
) -> Link:
    """``session``, just connected to ``target``, greeted, tuned to TLS and bound."""
    where = target.address
    try:
        await session.greeted()
    except SessionClosed as e:
        raise LinkFailed(421, f"cannot connect: {e}") from None
    except BEEPError as e:
        raise LinkFailed(421 if e.code == 421 else 554, f"refused the session: {e}") from None
    try:
        await start_tls(session, client_options(target.tls_name, list(trust) or None, identity))
    except SessionClosed as e:
        if not session.tls_active:
            # Lost before the handshake began: no certificate was shown, try again later.
            raise LinkFailed(421, f"{where} closed the session before TLS: {e}") from None
        # A certificate that does not prove the domain will not fix itself soon.
        raise LinkFailed(554, f"TLS with {where} as {target.tls_name} failed: {e}") from None
    except BEEPError as e:
        session.disconnect()
        raise LinkFailed(554, f"{where} refused TLS: {e}") from None
    bind = wire.encode(wire.Bind(relay.domain, _BIND_TRANS_ID, [])).body
    handler = APEXChannel(relay, session, Mode.MESH)
    try:
        channel = await session.start_channel(
            [mgmt.ProfileElement(wire.APEX_URI, bind)], handler=handler
        )
        answer = wire.decode(Message(channel.start_reply or b"", mgmt.BEEP_XML))
    except (BEEPError, wire.APEXError) as e:
        session.disconnect()
        raise LinkFailed(e.code, f"{where} refused APEX: {e}") from None
    except SessionClosed as e:
        raise LinkFailed(421, f"{where} closed the session: {e}") from None
    if isinstance(answer, wire.Error):
        session.disconnect()
        raise LinkFailed(answer.code, f"{where} refused to bind us: {answer.text}")
    handler.bound[_BIND_TRANS_ID] = relay.domain
    return Link(target, session, channel)


def make_relay_service(
    config: Config,
    *,
    prepared: Prepared | None = None,
    reactor: Any = None,
    resolver: IResolver | None = None,
) -> RelayService:
    """The relay ``config`` describes; ``prepared`` is :func:`imxp.bootstrap.prepare`'s
    result when the caller (``twistd imxp``) already made it."""
    if reactor is None:
        from twisted.internet import reactor
    if prepared is None:
        prepared = prepare(config, logs.Logger(namespace="imxp.bootstrap"))
    return build_relay(
        domain=config.domain,
        identity=prepared.identity,
        trust=prepared.trust_roots,
        users=prepared.users,
        edge_listen=config.edge_listen,
        mesh_listen=config.mesh_listen,
        session_config=session_config(config),
        reactor=reactor,
        resolver=resolver,
        dns_servers=resolver_addresses(config),
        routes=dict(config.routes),
        smart_host=config.smart_host or None,
        trusted_relays=config.trusted_relays,
        refusals={k: list(v) for k, v in config.refuse_data.items()},
        sasl_mechanisms=offered_mechanisms(config),
        allow_anonymous=config.allow_anonymous,
        max_hops=config.max_hops,
        delivery_timeout=config.delivery_timeout,
        connect_timeout=config.connect_timeout,
        reconnect_max_delay=config.reconnect_max_delay,
        max_queued=config.max_queued,
        max_sessions_per_peer=config.max_sessions_per_peer,
        shutdown_grace=config.shutdown_grace,
    )


def _longest_backoff(reconnect_max_delay: float, delivery_timeout: float) -> float:
    """The longest wait between attempts to reach a next hop: ``reconnect_max_delay``, but
    never longer than the data waiting for it may wait."""
    return min(reconnect_max_delay, delivery_timeout)


def reconfigure(
    relay_service: RelayService,
    config: Config,
    identity: Issued,
    trust: Sequence[x509.Certificate],
) -> None:
    """Put to work what ``config`` says of the options a reload applies (those whose
    :attr:`~imxp.config.OptionSpec.reload` is set), with ``identity`` and ``trust`` loaded
    from its TLS files. New sessions use the certificate; data accepted from now on is
    routed and admitted by the new routes and access settings, while data already on its
    way to a next hop goes on there; the new delivery timeout holds for the recipients
    waiting from now on, and a shorter one for those already waiting too.

    Raises ValueError, and changes nothing, for a certificate and key that cannot be used
    together. The routes and access settings of a :class:`Config` were checked when it was
    made, so once the certificate is in use the rest cannot fail.
    """
    relay_service.credentials.use(identity, trust)
    relay = relay_service.relay
    relay.max_hops = config.max_hops
    relay.use_delivery_timeout(config.delivery_timeout)
    relay_service.pool.max_retry = _longest_backoff(
        config.reconnect_max_delay, config.delivery_timeout
    )
    relay.router.use_routes(config.routes, config.smart_host or None)
    relay.policy.use(config.trusted_relays, config.refuse_data)
    logs.set_level(config.log_level)
