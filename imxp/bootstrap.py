"""First start: make what a relay needs and does not have yet, then load it.

:func:`prepare` creates, only when missing and only where the configuration leaves the
choice to the relay (options at their defaults):

* ``state_dir``, mode 0700;
* a development certificate authority (``ca.pem``, ``ca.key``) and a relay certificate for
  the domain signed by it (``relay.pem``, ``relay.key``), so that a relay runs over TLS
  from its first start; production replaces them with a certificate from a real CA;
* an empty user file.

Each thing made is announced once as a structured event (``event="imxp.bootstrap"``, with
``what`` and ``path``), in a sentence telling the operator what to do with it; a later start
finds everything and says nothing. A file the configuration names explicitly is never
made: its absence is a :class:`~imxp.config.ConfigError`, as is a file that cannot be used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from service_identity.cryptography import verify_certificate_hostname
from service_identity.exceptions import CertificateError, VerificationError
from twisted.logger import Logger

from imxp.beep.users import UserStore, UserStoreError
from imxp.certs import Issued, create_ca, issue_server, load_certificates, load_issued, load_key_for
from imxp.config import DEVELOPMENT_CA, Config, ConfigError

__all__ = ["EXPIRY_WARNING", "Prepared", "load_tls", "makes_development_certificate", "prepare"]

EXPIRY_WARNING = timedelta(days=30)
"""A relay certificate expiring sooner than this is warned about at every start."""

_CA_KEY = "ca.key"


@dataclass(frozen=True)
class Prepared:
    """The files a relay runs with, and what was loaded from them."""

    state_dir: Path
    certificate_path: Path
    key_path: Path
    trust_paths: tuple[Path, ...]
    users_path: Path
    identity: Issued
    """The relay's certificate, its chain and key."""
    trust_roots: tuple[x509.Certificate, ...]
    """Every certificate of the ``tls_trust`` files, in order."""
    users: UserStore
    created: tuple[str, ...]
    """The ``what`` of each thing made by this call, in order; empty once all exists."""


def prepare(config: Config, log: Logger, owner: tuple[int, int] | None = None) -> Prepared:
    """Create what is missing (see the module docstring), load it all, and return it.

    ``owner`` (uid, gid) is who the relay will run as, when that is not who starts it
    (``twistd --uid``): what is created here is given to it, since the relay reads its
    user file again after dropping privileges, and ``imxp users`` runs as that user.

    Logs a warning (``event="imxp.bootstrap"``, ``what`` ``certificate-name`` or
    ``certificate-expiry``) when the relay certificate does not name the domain as peers
    check it (RFC 6125), or has expired or expires within :data:`EXPIRY_WARNING`.

    :raises ConfigError: a configured file is missing or unusable, or something cannot be
        created; the message names the option.
    """
    _check_configured(config)
    created: list[str] = []
    state_dir = config.path("state_dir")
    cert_path, key_path = config.path("tls_certificate"), config.path("tls_key")
    users_path = config.path("users_file")
    try:
        _state_dir(config, log, created)
        if makes_development_certificate(config):
            _development_certificate(config, cert_path, key_path, log, created)
        identity, trust_roots = load_tls(config, log)
        users = _users(config, users_path, log, created)
    finally:
        # Even when the start is refused (a key that is not the certificate's, say): what
        # was made stays for the next start, which, root's, could not use it once it ran
        # as the relay's user (a state directory of mode 0700).
        if owner is not None:
            _give(config, owner, _made(created, state_dir, cert_path, key_path, users_path))
    return Prepared(
        state_dir=state_dir,
        certificate_path=cert_path,
        key_path=key_path,
        trust_paths=config.paths("tls_trust"),
        users_path=users_path,
        identity=identity,
        trust_roots=trust_roots,
        users=users,
        created=tuple(created),
    )


def load_tls(config: Config, log: Logger) -> tuple[Issued, tuple[x509.Certificate, ...]]:
    """The relay certificate with its key, and the trusted CAs, loaded from the files the
    configuration names, with a warning if the certificate does not name the domain or
    expires soon: at a start (:func:`prepare`) and again for a renewed certificate
    (SIGHUP). Nothing is created.

    :raises ConfigError: a file is missing or unusable; the message names the option.
    """
    cert_path = config.path("tls_certificate")
    identity = _identity(config, cert_path, config.path("tls_key"))
    trust_roots = _trust(config, config.paths("tls_trust"))
    _check_certificate(config, cert_path, identity.certificate, log)
    return identity, trust_roots


def _ca_paths(state_dir: Path) -> tuple[Path, Path]:
    """Where the development CA's certificate and key live."""
    return state_dir / DEVELOPMENT_CA, state_dir / _CA_KEY


def _made(
    created: list[str], state_dir: Path, cert_path: Path, key_path: Path, users_path: Path
) -> list[Path]:
    """The paths of what ``created`` names, directory first."""
    paths = {
        "state_dir": [state_dir],
        "ca": list(_ca_paths(state_dir)),
        "certificate": [cert_path, key_path],
        "users": [users_path],
    }
    return [path for what in created for path in paths[what]]


def _give(config: Config, owner: tuple[int, int], paths: list[Path]) -> None:
    uid, gid = owner
    for path in paths:
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as e:
            raise ConfigError(
                config.source, "state_dir", f"cannot give {path} to uid {uid}: {e}"
            ) from None


def _exists(config: Config, name: str, path: Path) -> bool:
    """Whether ``path``, the file of option ``name``, exists; a directory on the way that
    the relay's user may not enter (say /etc/letsencrypt/live, 0700 root) is a ConfigError
    naming the option, not a PermissionError traceback."""
    try:
        return path.exists()
    except OSError as e:
        raise ConfigError(
            config.source,
            name,
            f"cannot look for {path}: {e.strerror}; the relay runs as uid {os.geteuid()}: "
            "give that user access to the file and the directories above it",
        ) from None


def makes_development_certificate(config: Config) -> bool:
    """Whether a start makes a development certificate (and the development CA, if there
    is none): only with neither ``tls_certificate`` nor ``tls_key`` set and neither file
    in ``state_dir``. ConfigError if the relay's user may not look there."""
    return (
        config.tls_certificate is None
        and config.tls_key is None
        and not _exists(config, "tls_certificate", config.path("tls_certificate"))
        and not _exists(config, "tls_key", config.path("tls_key"))
    )


def _check_configured(config: Config) -> None:
    """Refuse a configuration naming files that do not exist, before creating anything."""
    for name in ("tls_certificate", "tls_key", "users_file"):
        path = config.path(name)
        if getattr(config, name) is not None and not _exists(config, name, path):
            raise ConfigError(config.source, name, f"{path} does not exist")
    if config.tls_trust:
        for path in config.paths("tls_trust"):
            if not _exists(config, "tls_trust", path):
                raise ConfigError(config.source, "tls_trust", f"{path} does not exist")


def _announce(
    log: Logger, created: list[str], what: str, path: Path, text: str, **fields: object
) -> None:
    created.append(what)
    log.info(text, event="imxp.bootstrap", what=what, path=str(path), **fields)


def _state_dir(config: Config, log: Logger, created: list[str]) -> Path:
    path = config.path("state_dir")
    if _exists(config, "state_dir", path):
        if path.is_dir():
            return path
        raise ConfigError(config.source, "state_dir", f"{path} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; the keys inside are no one else's business.
        os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(config.source, "state_dir", f"cannot create {path}: {e}") from None
    _announce(log, created, "state_dir", path, "created state directory {path}")
    return path


def _development_certificate(
    config: Config, cert_path: Path, key_path: Path, log: Logger, created: list[str]
) -> None:
    """Issue a relay certificate from the development CA, creating the CA if there is none.

    An existing development CA is reused, so that endpoints and relays that were given its
    ``ca.pem`` keep trusting this relay after its certificate is made anew.
    """
    ca_cert, ca_key = _ca_paths(config.path("state_dir"))
    try:
        if ca_cert.exists() or ca_key.exists():
            ca = load_issued(ca_cert, ca_key)
        else:
            name = f"imxp development CA ({config.domain})"
            ca = create_ca(name if len(name) <= 64 else "imxp development CA")
            ca.write(ca_cert, ca_key)
            _announce(
                log,
                created,
                "ca",
                ca_cert,
                "created development certificate authority at {path}: copy ca.pem to "
                "endpoints that should trust this relay, and list it in tls_trust of relays "
                "that should",
            )
        # A relay for localhost is reached as 127.0.0.1 as often as by name.
        ips = ["127.0.0.1"] if config.domain == "localhost" else []
        issue_server(ca, [config.domain], ips=ips).write(cert_path, key_path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(
            config.source, "tls_certificate", f"cannot make a development certificate: {e}"
        ) from None
    _announce(
        log,
        created,
        "certificate",
        cert_path,
        "created development certificate for {domain} at {path}, signed by the development "
        "CA; for production set tls_certificate and tls_key to a certificate from a real CA",
        domain=config.domain,
    )


def _identity(config: Config, cert_path: Path, key_path: Path) -> Issued:
    for name, path in (("tls_certificate", cert_path), ("tls_key", key_path)):
        if not _exists(config, name, path):
            hint = ""
            if config.tls_certificate is None and config.tls_key is None:
                hint = "; with neither file there, a start makes a new development certificate"
            raise ConfigError(config.source, name, f"{path} does not exist{hint}")
    try:
        chain = load_certificates(cert_path)
    except (OSError, ValueError) as e:
        raise ConfigError(config.source, "tls_certificate", f"{cert_path}: {e}") from None
    try:
        return load_key_for(chain, key_path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(config.source, "tls_key", f"{key_path}: {e}") from None


def _trust(config: Config, paths: tuple[Path, ...]) -> tuple[x509.Certificate, ...]:
    roots: list[x509.Certificate] = []
    for path in paths:
        if not _exists(config, "tls_trust", path):
            if config.tls_trust:  # a file named there, gone since the start (a reload)
                raise ConfigError(config.source, "tls_trust", f"{path} does not exist")
            raise ConfigError(
                config.source,
                "tls_trust",
                f"empty, and there is no development CA at {path}: list the PEM files of the "
                "CAs that peers' certificates chain to",
            )
        try:
            roots += load_certificates(path)
        except (OSError, ValueError) as e:
            raise ConfigError(config.source, "tls_trust", f"{path}: {e}") from None
    return tuple(roots)


def _users(config: Config, path: Path, log: Logger, created: list[str]) -> UserStore:
    if not _exists(config, "users_file", path):  # unset: _check_configured saw to one set
        try:
            # O_EXCL: never truncate a file that appeared meanwhile; 0600 like UserStore.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            raise ConfigError(config.source, "users_file", f"cannot create {path}: {e}") from None
        _announce(
            log,
            created,
            "users",
            path,
            "created empty user file {path}: add users to it for endpoints to log in with a "
            "password",
        )
    try:
        return UserStore(path)
    except (OSError, UserStoreError) as e:
        raise ConfigError(config.source, "users_file", f"{path}: {e}") from None


def _check_certificate(
    config: Config, path: Path, certificate: x509.Certificate, log: Logger
) -> None:
    try:
        # The same check a peer makes when it connects to us for our domain (RFC 6125).
        verify_certificate_hostname(certificate, config.domain)
    except (VerificationError, CertificateError):
        log.warn(
            "the relay certificate {path} does not name {domain}: relays connecting to this "
            "domain will refuse it",
            event="imxp.bootstrap",
            what="certificate-name",
            path=str(path),
            domain=config.domain,
        )
    now = datetime.now(UTC)
    starts = certificate.not_valid_before_utc
    if starts > now:
        log.warn(
            "the relay certificate {path} is not valid until {starts}: peers refuse it until then",
            event="imxp.bootstrap",
            what="certificate-not-yet-valid",
            path=str(path),
            starts=starts.isoformat(),
        )
    expires = certificate.not_valid_after_utc
    left = expires - now
    if left <= timedelta(0):
        text = "the relay certificate {path} expired on {expires}: peers refuse it; renew it"
    elif left < EXPIRY_WARNING:
        text = (
            "the relay certificate {path} expires on {expires}, in {days} days: renew it "
            "before peers start refusing it"
        )
    else:
        return
    log.warn(
        text,
        event="imxp.bootstrap",
        what="certificate-expiry",
        path=str(path),
        expires=expires.isoformat(),
        days=left.days,
    )
