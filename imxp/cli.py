"""The ``imxp`` command: use the mesh as an endpoint, and look after a relay.

Endpoint commands (they connect to the home relay of the endpoint's domain, found by the
SRV record ``_apex-edge._tcp.DOMAIN`` unless ``--relay`` names it, RFC 3340 §3.1; for
``localhost``, the relay ``twistd -n imxp`` runs on built-in defaults)::

    imxp send --from fred@a.test --to barney@b.test "hello"
    imxp listen --as barney@b.test [--json] [--count N]
    imxp chat --as fred@a.test barney@b.test

End-to-end protection (RFC 3923's model: the whole CPIM message, its From, To and DateTime
included): ``send`` and ``chat`` ``--sign`` and/or ``--encrypt`` with OpenPGP (``--pgp``,
RFC 3156, the default) or S/MIME (``--smime``, RFC 8551). ``listen`` and ``chat`` verify
and decrypt what arrives and say of each message whether it was plain, signed (and by
whom), encrypted, signed but bad, or could not be decrypted; one that is signed by someone
other than its From, stale, replayed or not readable is not shown, only a warning line.
OpenPGP keys come from a keyring directory (``--gnupg-home``, else ``$GNUPGHOME``, else
``~/.gnupg``), which is also the trust decision; S/MIME from PEM files (``--smime-cert``,
``--smime-key``, ``--smime-trust``, ``--recipient-cert``; or ``$IMXP_SMIME_CERT``,
``$IMXP_SMIME_KEY``, ``$IMXP_SMIME_TRUST``).

Operator commands::

    imxp certs ca|relay|endpoint|smime ...  development CA; relay, endpoint, S/MIME certificates
    imxp users add|password|remove|list ... the relay's SASL user file
    imxp route DOMAIN                       how the relay would reach a domain
    imxp check                              what is wrong with a relay's setup, and the fix
    imxp status                             what a running relay is doing
    imxp reload                             a running relay reads its files again

Passwords never go on the command line: ``--password-file FILE``, else the environment
variable ``IMXP_PASSWORD``, else a prompt when standard input is a terminal.

Exit status, for scripts:

====  ===========================================================================
0     success
1     send: some recipient was not delivered, or is not known to be (no report in
      time, or a relay's 451 "... outcome unknown"); chat: likewise some line;
      check: problems found;
      users: the user to add exists, or the one to change or remove does not
2     usage error (bad arguments, no password available)
3     authentication failed
4     unknown domain: no relay for it in DNS (route: no route to the domain)
5     relay unreachable (route: DNS failed for now; status, reload: no relay answers
      on the control socket)
6     TLS verification failure: the relay's certificate is not trusted or names another
      domain
7     refused by the relay (e.g. attach refused with 537)
8     configuration error: a bad configuration file, or a file that is missing, unusable
      or (certs) already there; reload: the relay refused the files and goes on as it was
9     other protocol error, or an unexpected internal error
10    protection failed: the message could not be signed or encrypted (no OpenPGP
      keyring, no key or certificate for the sender or a recipient)
130   interrupted (SIGINT, SIGTERM) before the end; but an interrupted send exits with
      1 (delivery not known), listen and chat with 0 (that is how they end)
====  ===========================================================================

Every error is one line on standard error, ``imxp: ...``; ``--debug`` adds the traceback
and Twisted's log.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import getpass
import json
import mimetypes
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from service_identity.cryptography import verify_certificate_hostname
from service_identity.exceptions import CertificateError, VerificationError
from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import IHalfCloseableProtocol, IResolver
from twisted.internet.stdio import StandardIO
from twisted.logger import (
    LogLevel,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.names import client as dns_client
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from imxp import control, logs
from imxp.apex.address import AddressError, Endpoint
from imxp.apex.peers import NextHopStatus
from imxp.apex.routing import (
    EDGE_PORT,
    EDGE_SERVICE,
    MESH_PORT,
    MESH_SERVICE,
    NoRoute,
    Router,
    Target,
    is_ip_address,
)
from imxp.apex.wire import check_media_type
from imxp.beep.session import (
    BEEPError,
    Role,
    Session,
    SessionClosed,
    SessionConfig,
    SessionFactory,
    host_port,
)
from imxp.beep.tls import start_tls
from imxp.beep.tlsctx import client_options
from imxp.beep.users import UserStore, UserStoreError, prepare_username
from imxp.bootstrap import EXPIRY_WARNING, makes_development_certificate
from imxp.certs import (
    Issued,
    create_ca,
    issue_client,
    issue_server,
    load_certificates,
    load_key_for,
)
from imxp.client import (
    REPORT_TIMEOUT,
    Client,
    ClientError,
    Incoming,
    Outcome,
    Protection,
    Refusal,
    Termination,
    check_timeout,
    connect,
    open_incoming,
)
from imxp.config import Config, ConfigError, control_socket, load, resolver_addresses
from imxp.e2e import smime
from imxp.e2e.cpim import CPIMError, CPIMMessage
from imxp.e2e.pgp import OpenPGP
from imxp.e2e.protect import E2EError, Keys, ReplayCache, Report

__all__ = ["Exit", "build_parser", "main"]


class Exit(enum.IntEnum):
    """The exit statuses of the module docstring."""

    OK = 0
    FAILED = 1
    USAGE = 2
    AUTH = 3
    UNKNOWN_DOMAIN = 4
    UNREACHABLE = 5
    TLS = 6
    REFUSED = 7
    CONFIG = 8
    PROTOCOL = 9
    PROTECTION = 10
    INTERRUPTED = 130


# ClientError.kind -> exit status.
_KIND_STATUS = {
    "auth": Exit.AUTH,
    "unknown-domain": Exit.UNKNOWN_DOMAIN,
    "unreachable": Exit.UNREACHABLE,
    "tls": Exit.TLS,
    "refused": Exit.REFUSED,
    "protocol": Exit.PROTOCOL,
}

PASSWORD_VARIABLE = "IMXP_PASSWORD"
#: Where the S/MIME options take their defaults from.
SMIME_VARIABLES = {
    "smime_cert": "IMXP_SMIME_CERT",
    "smime_key": "IMXP_SMIME_KEY",
    "smime_trust": "IMXP_SMIME_TRUST",
}
_SCHEME_NAMES = {"pgp": "OpenPGP", "smime": "S/MIME"}

# Short enough that a dead DNS server is reported within seconds, not Twisted's minute.
_DNS_TIMEOUT = (1.0, 3.0)
# How long `check` waits for a connection and for a BEEP greeting.
_PROBE_TIMEOUT = 5.0
# Closing the client on SIGINT/SIGTERM must not hold up the exit when the relay is gone.
_CLOSE_TIMEOUT = 3.0


class Failed(Exception):
    """Ends the command with ``status`` after printing ``imxp: <message>``."""

    def __init__(self, status: Exit, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    argparse itself exits with status 2 on a usage error.
    """
    args = build_parser().parse_args(argv)
    if args.debug:
        # Our own stderr lines stay plain lines rather than becoming log events.
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    try:
        if getattr(args, "connects", False):
            args.password = _connection_password(args)
        if getattr(args, "asynchronous", False):
            return _react(args)
        return int(args.run(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)  # the prompt left the cursor at the end of its line
        return Exit.INTERRUPTED
    except Exception as e:
        return _report(e, args.debug)


def _react(args: argparse.Namespace) -> int:
    """Run ``args.run(reactor, args)`` under the reactor; SIGINT/SIGTERM end it cleanly.

    A command that is interrupted ends with ``args.interrupted`` whatever it does as the
    reactor shuts down (a listener's connection going away is no error then).
    """
    outcome: list[int] = []
    interrupted: list[bool] = []
    if not args.debug:
        # Rather than Twisted's buffer of the last 65,536 events, which a long listen
        # would fill with one per message, kept for no one.
        globalLogBeginner.beginLoggingTo([_without_debug], redirectStandardIO=False)

    async def body(reactor: Any) -> None:
        reactor.addSystemEventTrigger("before", "shutdown", interrupted.append, True)
        try:
            status = int(await args.run(reactor, args))
        except Exception as e:
            # What breaks as the reactor shuts down under the command is no error to report.
            status = args.interrupted if interrupted else _report(e, args.debug)
        outcome.append(args.interrupted if interrupted else status)

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit:
        pass  # react() always exits; the status is ours to choose
    return outcome[0] if outcome else args.interrupted


def _without_debug(event: dict[str, Any]) -> None:
    """What of the log a person sees without --debug: Python's warnings, and one line for
    an error inside imxp or Twisted (--debug shows its traceback)."""
    if "warning" in event:
        print(formatEvent(event), file=sys.stderr)
    elif event.get("log_level") is LogLevel.critical:
        print(
            f"imxp: internal error: {formatEvent(event)} (run with --debug for details)",
            file=sys.stderr,
        )


def _report(e: Exception, debug: bool) -> int:
    """Print ``e`` as one line (with the traceback under --debug); its exit status.

    The text may quote what others chose - a relay's diagnostic, a file name - so its
    controls are escaped: it stays one line, and the terminal only shows it."""
    if isinstance(e, Failed):
        status, text = e.status, str(e)
    elif isinstance(e, ConfigError | UserStoreError):
        status, text = Exit.CONFIG, str(e)
    elif isinstance(e, E2EError):
        status, text = Exit.PROTECTION, f"cannot protect the message: {e}"
    elif isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        status, text = Exit.CONFIG, f"{where}{e.strerror or e}"
    else:
        status = Exit.PROTOCOL
        text = f"unexpected error: {type(e).__name__}: {e}"
        if not debug:
            text += " (run with --debug for details)"
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    print(f"imxp: {_in_line(text)}", file=sys.stderr)
    return status


# -- the parser -------------------------------------------------------------------------------


def _exit_codes() -> str:
    """The exit-status table of the module docstring, for the --help epilog."""
    doc = __doc__ or ""
    table = doc[doc.index("Exit status") : doc.index("Every error")]
    return "\n".join(line for line in table.splitlines() if not line.startswith("===="))


def build_parser() -> argparse.ArgumentParser:
    """The ``imxp`` argument parser; each subcommand has ``--help``."""
    parser = argparse.ArgumentParser(
        prog="imxp",
        description="Send, receive and chat over the imxp mesh (RFC 3340), and look after "
        "a relay: certificates, users, routes, checks.",
        epilog=_exit_codes(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Twisted's log")
    # Also accepted after the subcommand; SUPPRESS keeps it from resetting the value above.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, run: Callable[..., Any], text: str, *parents: Any, **kw: Any
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=text, description=text, parents=[*parents, debug])
        sub.set_defaults(run=run, **kw)
        return sub

    connection = _connection_options()
    # Commands run under the reactor; "interrupted" is their status when SIGINT or SIGTERM
    # ends them: the way listen and chat end, but route and check cut short.
    receiving = {"connects": True, "asynchronous": True, "interrupted": Exit.OK}
    looking = {"asynchronous": True, "interrupted": Exit.INTERRUPTED}

    send = command(
        commands,
        "send",
        _send,
        "Send a message and print each recipient's delivery status (exit 1 if any was "
        "not delivered, or is not known to be).",
        connection,
        connects=True,
        asynchronous=True,
        # Interrupted before the reports came: not known to be delivered.
        interrupted=Exit.FAILED,
    )
    send.add_argument("--from", dest="sender", type=_endpoint, required=True, metavar="ENDPOINT")
    send.add_argument(
        "--to",
        type=_endpoint,
        action="append",
        required=True,
        metavar="ENDPOINT",
        help="repeatable",
    )
    send.add_argument(
        "--cc", type=_endpoint, action="append", default=[], metavar="ENDPOINT", help="CPIM only"
    )
    send.add_argument("--subject", help="CPIM only")
    send.add_argument(
        "text",
        nargs="?",
        help="the message; without it and --file, standard input, which may not be empty",
    )
    send.add_argument("--file", type=Path, help="send this file's content instead of TEXT")
    send.add_argument(
        "--type",
        dest="media_type",
        type=_media_type,
        help="media type of raw content (default: by the --file name, else text/plain for "
        "UTF-8 and application/octet-stream for other content)",
    )
    form = send.add_mutually_exclusive_group()
    form.add_argument(
        "--cpim",
        dest="raw",
        action="store_false",
        default=None,
        help="send as a message/cpim instant message (the default for TEXT)",
    )
    form.add_argument(
        "--raw",
        dest="raw",
        action="store_true",
        help="send the content as it is (the default with --file or --type)",
    )
    send.add_argument(
        "--timeout",
        type=_seconds,
        default=REPORT_TIMEOUT,
        help=f"seconds to wait for the reports ({REPORT_TIMEOUT:g}: longer than a relay's "
        "default delivery_timeout, so that a next hop it cannot reach is reported as such)",
    )
    _key_options(send, sending=True)

    listen = command(
        commands,
        "listen",
        _listen,
        "Print messages to an endpoint as they arrive, until interrupted; protected ones "
        "verified and decrypted, and each said to be plain, signed (by whom), encrypted, "
        "signed but bad, or not decryptable.",
        connection,
        **receiving,
    )
    listen.add_argument("--as", dest="endpoint", type=_endpoint, required=True, metavar="ENDPOINT")
    listen.add_argument("--json", action="store_true", help="one JSON object per message")
    listen.add_argument("--count", type=_positive_int, help="exit after N messages")
    _key_options(listen, sending=False)

    chat = command(
        commands,
        "chat",
        _chat,
        "Chat with another endpoint on this terminal: each line typed is sent, with a mark "
        "for its delivery status (✓ delivered, ✗ failed, ? unknown); /quit or end of input "
        "leaves.",
        connection,
        **receiving,
    )
    chat.add_argument("--as", dest="endpoint", type=_endpoint, required=True, metavar="ENDPOINT")
    chat.add_argument("peer", type=_endpoint, metavar="ENDPOINT", help="whom to chat with")
    chat.add_argument(
        "--timeout",
        type=_seconds,
        default=REPORT_TIMEOUT,
        help=f"seconds to wait for each line's report ({REPORT_TIMEOUT:g})",
    )
    _key_options(chat, sending=True)

    _certs_parser(commands, command)
    _users_parser(commands, command)

    # -c as for `twistd imxp`, so that one command line's habit serves the other.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "-c",
        "--config",
        type=Path,
        help="the relay's TOML configuration (default: built-in defaults)",
    )
    config.add_argument(
        "--dns",
        type=_address_port,
        metavar="HOST:PORT",
        help="ask this DNS server instead of dns_servers or the system's",
    )
    route = command(
        commands,
        "route",
        _route,
        "Show how the relay would reach DOMAIN: static route, smart host, SRV targets in "
        "order, or domain literal.",
        config,
        **looking,
    )
    route.add_argument("domain", metavar="DOMAIN")
    route.add_argument(
        "--edge",
        action="store_true",
        help="look up the endpoints' service (_apex-edge) rather than the relays'",
    )
    command(
        commands,
        "check",
        _check,
        "Check a relay's setup: configuration, certificate, user file, SRV records, "
        "listeners, peers; each problem is one line with its fix (exit 1 if any).",
        config,
        **looking,
    )
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument(
        "-c",
        "--config",
        type=Path,
        help="the running relay's TOML configuration, which names its control_socket "
        "(default: built-in defaults, ./imxp-state/control)",
    )
    status = command(
        commands,
        "status",
        _status,
        "Ask a running relay what it is doing: sessions, attached endpoints, data in flight, "
        "and each next hop's link or trouble. Run as the relay's user or root.",
        running,
    )
    status.add_argument("--json", action="store_true", help="print the relay's answer as JSON")
    command(
        commands,
        "reload",
        _reload,
        "Make a running relay read its configuration and TLS files again, as SIGHUP does, and "
        "say what changed; exit 8 if the relay refused them and goes on as it was. Run as "
        "the relay's user or root.",
        running,
    )
    return parser


def _connection_options() -> argparse.ArgumentParser:
    """The options of the commands that connect to a relay as an endpoint."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--relay",
        metavar="HOST:PORT",
        type=_host_port_text,
        help="the relay to connect to (default: SRV _apex-edge._tcp.DOMAIN; for localhost, "
        "where `twistd -n imxp` listens)",
    )
    group.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM CA bundle to trust (default: the system's; for localhost without --relay, "
        "./imxp-state/ca.pem when there is one)",
    )
    group.add_argument("--tls-name", metavar="NAME", help="name the relay's certificate must carry")
    group.add_argument("--cert", type=Path, metavar="FILE", help="client certificate (EXTERNAL)")
    group.add_argument("--key", type=Path, metavar="FILE", help="the client certificate's key")
    group.add_argument(
        "--mechanism",
        choices=["SCRAM-SHA-256", "PLAIN", "EXTERNAL"],
        help="SASL mechanism (default: SCRAM-SHA-256, or EXTERNAL with --cert)",
    )
    group.add_argument("--username", help="SASL username (default: the endpoint's address)")
    group.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help=f"read the password from FILE (else ${PASSWORD_VARIABLE}, else a prompt)",
    )
    group.add_argument("--dns", type=_address_port, metavar="HOST:PORT", help="ask this DNS server")
    return options


def _key_options(parser: argparse.ArgumentParser, *, sending: bool) -> None:
    """The end-to-end protection options: keys and certificates for opening messages, and
    with ``sending`` how to protect them too. (Added to each command rather than as a
    parent parser, which would move --pgp and --smime out of their group in the help.)"""
    group = parser.add_argument_group(
        "end-to-end protection",
        "The whole CPIM message is protected (RFC 3923), with OpenPGP (RFC 3156) or S/MIME "
        "(RFC 8551); what arrives protected is verified and decrypted.",
    )
    if sending:
        group.add_argument("--sign", action="store_true", help="sign each message")
        group.add_argument(
            "--encrypt", action="store_true", help="encrypt each message to its recipients"
        )
        scheme = group.add_mutually_exclusive_group()
        scheme.add_argument(
            "--pgp",
            dest="scheme",
            action="store_const",
            const="pgp",
            help="protect with OpenPGP (the default)",
        )
        scheme.add_argument(
            "--smime",
            dest="scheme",
            action="store_const",
            const="smime",
            help="protect with S/MIME",
        )
    group.add_argument(
        "--gnupg-home",
        type=Path,
        metavar="DIR",
        help="OpenPGP keyring directory (default: $GNUPGHOME, else ~/.gnupg); the keys in "
        "it are believed for their user ids",
    )
    group.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="the passphrase of the OpenPGP secret key, on the first line of FILE",
    )
    for option, what in (
        ("smime_cert", "your S/MIME certificate (PEM)"),
        ("smime_key", "its private key (PEM, unencrypted)"),
        ("smime_trust", "PEM bundle of the CAs that S/MIME signers must chain to"),
    ):
        variable = SMIME_VARIABLES[option]
        group.add_argument(
            "--" + option.replace("_", "-"),
            type=Path,
            metavar="FILE",
            # An empty variable is no file, not the current directory.
            default=os.environ.get(variable) or None,
            help=f"{what} (default: ${variable})",
        )
    if sending:
        group.add_argument(
            "--recipient-cert",
            type=Path,
            action="append",
            default=[],
            metavar="FILE",
            help="a recipient's S/MIME certificate (PEM), for --encrypt --smime; repeatable; "
            "of a file's certificates, only those naming a recipient and usable now are "
            "encrypted to",
        )


def _certs_parser(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    certs = commands.add_parser(
        "certs",
        help="Make a development CA, relay certificates and endpoint certificates.",
        description="Make a development CA, relay certificates, and endpoints' client and "
        "S/MIME certificates. "
        "Existing files are never overwritten without --force; keys are written mode 0600.",
    )
    kinds = certs.add_subparsers(dest="kind", required=True, metavar="KIND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--force", action="store_true", help="overwrite existing files")
    common.add_argument("--days", type=_positive_int, help="validity in days")
    signed = argparse.ArgumentParser(add_help=False)
    signed.add_argument(
        "--ca", type=Path, required=True, metavar="DIR", help="directory with ca.pem and ca.key"
    )
    signed.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="default: .")

    ca = command(kinds, "ca", _certs_ca, "Create a CA: DIR/ca.pem and DIR/ca.key.", common)
    ca.add_argument("--out", type=Path, required=True, metavar="DIR")
    ca.add_argument("--name", required=True, help="the CA's common name")

    relay = command(
        kinds,
        "relay",
        _certs_relay,
        "Issue a relay certificate for a domain: DIR/relay.pem and DIR/relay.key.",
        common,
        signed,
    )
    relay.add_argument(
        "--domain",
        action="append",
        required=True,
        help="the relay's domain; repeat for further names",
    )
    relay.add_argument(
        "--ip", action="append", default=[], help="an address for domain literals; repeatable"
    )

    endpoint = command(
        kinds,
        "endpoint",
        _certs_endpoint,
        "Issue an endpoint's client certificate (for SASL EXTERNAL): DIR/IDENTITY.pem and "
        "DIR/IDENTITY.key.",
        common,
        signed,
    )
    endpoint.add_argument("--identity", required=True, metavar="LOCAL@DOMAIN")

    smime_cert = command(
        kinds,
        "smime",
        _certs_smime,
        "Issue an endpoint's S/MIME certificate, to sign and be encrypted to end to end "
        "(--smime-cert, --smime-key, --recipient-cert): DIR/IDENTITY.smime.pem and "
        "DIR/IDENTITY.smime.key.",
        common,
        signed,
    )
    smime_cert.add_argument("--identity", required=True, metavar="LOCAL@DOMAIN")


_USERNAME_HELP = (
    "the login name: fred, for the endpoint fred@DOMAIN and its subaddresses; fred@DOMAIN "
    "of the relay's domain is taken as fred (with --file, a name is stored as given)"
)


def _users_parser(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    users = commands.add_parser(
        "users",
        help="Manage the relay's SASL user file.",
        description="Manage the relay's SASL user file. A running relay sees changes at "
        "the next login, and within a second for delivery; within 5 s it logs out who "
        "logged in as a user since removed or given a new password. No restart is needed.",
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    source = where.add_mutually_exclusive_group()
    source.add_argument(
        "-c",
        "--config",
        type=Path,
        help="the relay's configuration; its users_file (default: built-in defaults, "
        "./imxp-state/users)",
    )
    source.add_argument("--file", type=Path, help="the user file itself")
    for action, run, text in (
        (
            "add",
            _users_add,
            f"Add a user; the password comes from --password-file, ${PASSWORD_VARIABLE} or a "
            "prompt.",
        ),
        (
            "password",
            _users_password,
            "Give a user a new password (from --password-file, "
            f"${PASSWORD_VARIABLE} or a prompt); a running relay logs out who used the old one.",
        ),
    ):
        parser = command(actions, action, run, text, where)
        parser.add_argument("name", help=_USERNAME_HELP)
        parser.add_argument("--password-file", type=Path, metavar="FILE")
    remove = command(
        actions,
        "remove",
        _users_remove,
        "Remove a user; a running relay logs out who logged in as it.",
        where,
    )
    remove.add_argument("name", help=_USERNAME_HELP)
    command(actions, "list", _users_list, "List the users, one per line.", where)


def _endpoint(text: str) -> str:
    """An endpoint address, ``local[/subaddress]@domain`` (RFC 3340 §2.2)."""
    try:
        Endpoint.parse(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _seconds(text: str) -> float:
    """A timeout as the client library takes it (its check_timeout), so that a wrong one
    is a usage error here rather than a failure after connecting."""
    try:
        value = float(text)
        check_timeout(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds, more than 0 and finite, not {text}") from None
    return value


def _media_type(text: str) -> str:
    """A media type as the client library takes it, so that a wrong one is a usage error
    here rather than an unexpected error after connecting."""
    try:
        check_media_type(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _split_host_port(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        # Which colon ends the address? The library reads ::1:913 otherwise than this.
        raise argparse.ArgumentTypeError(
            f"an IPv6 address and its port are written [ADDRESS]:PORT, not {text!r}"
        )
    if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _host_port_text(text: str) -> str:
    """HOST:PORT checked, and kept as text (the client library takes it so)."""
    _split_host_port(text)
    return text


def _address_port(text: str) -> tuple[str, int]:
    """ADDRESS:PORT of a DNS server: twisted.names takes IP addresses only."""
    host, port = _split_host_port(text)
    if not is_ip_address(host):
        raise argparse.ArgumentTypeError(f"{host!r} is not an IP address")
    return host, port


# -- shared helpers ---------------------------------------------------------------------------


def _resolver(servers: Sequence[tuple[str, int]]) -> IResolver:
    """A resolver asking only ``servers``.

    Not ``createResolver(servers=...)``: that one also asks the servers of resolv.conf,
    round-robin, which would make ``--dns`` unreliable.
    """
    return dns_client.Resolver(servers=list(servers), timeout=_DNS_TIMEOUT)


def _secret(path: Path) -> str:
    """The first line of a password or passphrase file (UTF-8, as the SASL password is);
    empty for an empty file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise Failed(Exit.CONFIG, f"{path}: not UTF-8 text") from None
    return lines[0] if lines else ""


def _password(path: Path | None, *, confirm: bool = False) -> str | None:
    """The password from ``path``, else ``$IMXP_PASSWORD``, else a prompt on a terminal;
    None when there is none of these."""
    if path is not None:
        return _secret(path)
    if PASSWORD_VARIABLE in os.environ:
        return os.environ[PASSWORD_VARIABLE]
    if not sys.stdin.isatty():
        return None
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password again: ") != password:
        raise Failed(Exit.USAGE, "the passwords differ")
    return password


def _connection_password(args: argparse.Namespace) -> str | None:
    """The password a connecting command logs in with; None with a client certificate.

    Asked for before the reactor runs: a prompt under it would also hold up the reactor's
    handling of Ctrl-C.
    """
    if (args.cert is None) != (args.key is None):
        raise Failed(Exit.USAGE, "--cert and --key go together")
    if args.cert is not None and args.mechanism in (None, "EXTERNAL"):
        return None
    password = _password(args.password_file)
    if password is None:
        raise _no_password()
    return password


def _no_password() -> Failed:
    return Failed(
        Exit.USAGE,
        f"no password: use --password-file FILE, set {PASSWORD_VARIABLE}, or run on a "
        "terminal to be asked",
    )


def _load_trust(path: Path) -> list[x509.Certificate]:
    try:
        return load_certificates(path)
    except ValueError as e:
        raise Failed(Exit.CONFIG, f"{path}: {e}") from None


def _load_identity(
    cert: Path, key: Path, cert_is: str = "--smime-cert", key_is: str = "--smime-key"
) -> Issued:
    """The certificate and key of ``--smime-cert`` and ``--smime-key`` (or of what
    ``cert_is`` and ``key_is`` name); what is wrong with either names the file that is
    wrong, and the option that gave it."""
    try:
        chain = load_certificates(cert)
    except ValueError as e:
        raise Failed(Exit.CONFIG, f"{cert_is} {cert}: {e}") from None
    try:
        return load_key_for(chain, key)
    except (ValueError, TypeError) as e:
        raise Failed(Exit.CONFIG, f"{key_is} {key}: {e}") from None


def _keys(args: argparse.Namespace, *, pgp_needed: bool) -> Keys:
    """The user's keys and certificates from the end-to-end protection options.

    The default keyring directory is used when it exists; ``pgp_needed`` (OpenPGP
    protection asked for) makes its absence a protection failure.
    """
    home = args.gnupg_home
    if home is not None and not home.is_dir():
        # No keyring to protect with is the failure the README names for send (10).
        status = Exit.PROTECTION if pgp_needed else Exit.CONFIG
        raise Failed(status, f"--gnupg-home {home}: no such directory")
    home = home or Path(os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")
    if not home.is_dir() and pgp_needed:
        raise Failed(
            Exit.PROTECTION, f"no OpenPGP keyring at {home}: make one with gpg, or --gnupg-home DIR"
        )
    if (args.smime_cert is None) != (args.smime_key is None):
        raise Failed(Exit.USAGE, "--smime-cert and --smime-key go together")
    passphrase = None
    if args.passphrase_file is not None:
        passphrase = _secret(args.passphrase_file)
    return Keys(
        pgp=OpenPGP(home) if home.is_dir() else None,
        pgp_passphrase=passphrase,
        smime=_load_identity(args.smime_cert, args.smime_key) if args.smime_cert else None,
        trust=tuple(_load_trust(args.smime_trust)) if args.smime_trust else (),
    )


def _protection(args: argparse.Namespace) -> Protection | None:
    """How to protect what is sent, with which keys, from ``args``; None: not at all.

    What is certain to fail is said before connecting: no keyring for OpenPGP, no own
    certificate to sign with S/MIME.
    """
    if not (args.sign or args.encrypt):
        if args.scheme is not None or args.recipient_cert:
            raise Failed(
                Exit.USAGE, "--pgp, --smime and --recipient-cert go with --sign or --encrypt"
            )
        return None
    scheme = args.scheme or "pgp"
    if scheme == "pgp" and args.recipient_cert:
        raise Failed(
            Exit.USAGE, "--recipient-cert is for --smime; OpenPGP finds keys in the keyring"
        )
    keys = _keys(args, pgp_needed=scheme == "pgp")
    if scheme == "smime" and args.sign and keys.smime is None:
        raise Failed(
            Exit.PROTECTION,
            "no S/MIME certificate to sign with: give --smime-cert FILE and --smime-key FILE",
        )
    mode = "sign+encrypt" if args.sign and args.encrypt else "sign" if args.sign else "encrypt"
    certificates = [c for path in args.recipient_cert for c in _load_trust(path)]
    return Protection(mode, scheme, keys, certificates)


def _described_protection(protection: Protection) -> str:
    """``signed and encrypted with OpenPGP``, for the chat's opening line."""
    done = protection.mode.replace("sign", "signed").replace("encrypt", "encrypted")
    return f"{done.replace('+', ' and ')} with {_SCHEME_NAMES[protection.scheme]}"


# -- connected commands -----------------------------------------------------------------------


@asynccontextmanager
async def _connected(
    reactor: Any,
    args: argparse.Namespace,
    endpoint: str,
    *,
    reconnect: bool,
    on_data: Callable[[Incoming], Awaitable[None]] | None = None,
) -> AsyncIterator[Client]:
    """A client attached as ``endpoint`` with the connection options of ``args``; with
    ``on_data``, each data is answered once it has ended (``answer_when_done``).

    The client is closed at the end of the block, and also when SIGINT or SIGTERM stops
    the reactor, so that the relay sees the endpoint leave. A ClientError anywhere in the
    block becomes :class:`Failed` with the status of its kind.

    With ``reconnect`` (listen and chat, which run until stopped), a lost connection and
    its return are said on stderr, and the client is closed once ``endpoint`` is attached
    no longer for good (the relay ended the attachment, or refused it on reconnecting):
    the block's ``client.incoming()`` ends, and the block with :class:`Failed` (7)
    saying why, rather than waiting for data that can no longer come.
    """
    identity = (
        _load_identity(args.cert, args.key, "--cert", "--key") if args.cert is not None else None
    )
    relay, ca = args.relay, args.ca
    # How to trust the built-in relay's development CA, when it was not found. A relay of
    # the built-in domain elsewhere (--relay) may well have the same CA, or says how.
    hint = ""
    built_in = _built_in_relay(endpoint)
    if built_in is not None:
        built_in_relay, built_in_ca = built_in
        if relay is None:
            relay = built_in_relay
        if ca is None and built_in_ca.exists():
            ca = built_in_ca
            hint = (
                f" (the CA trusted was {built_in_ca}; for a relay with another state_dir, "
                "give --ca with its ca.pem)"
            )
        elif ca is None:
            hint = (
                f" (there is no {built_in_ca} here: run this in the directory the relay "
                "runs in, or give --ca with the ca.pem of its state_dir)"
            )
    made: list[Client] = []
    ended: list[Failed] = []

    def terminated(termination: Termination) -> None:
        # A relay going away (421) is attached to again on reconnecting: endpoints keeps it.
        if not made or made[0].endpoints:
            return
        text = f"{termination.code} {termination.text}".rstrip()
        ended.append(Failed(Exit.REFUSED, f"{endpoint} is no longer attached: {text}"))
        # Not from within the relay's terminate, which is still to be answered.
        reactor.callLater(0, lambda: defer.ensureDeferred(made[0].close()))

    notices = _ConnectionNotices() if reconnect and not args.debug else None
    if notices is not None:
        globalLogPublisher.addObserver(notices)
    try:
        client = await _attached(
            endpoint,
            password=args.password,
            relay=relay,
            trust=_load_trust(ca) if ca is not None else None,
            tls_name=args.tls_name,
            client_certificate=identity,
            mechanism=args.mechanism,
            username=args.username,
            resolver=_resolver([args.dns]) if args.dns is not None else None,
            reactor=reactor,
            reconnect=reconnect,
            on_terminated=terminated if reconnect else None,
            on_data=on_data,
            answer_when_done=on_data is not None,
        )
        made.append(client)

        def close_on_shutdown() -> defer.Deferred[None]:
            return defer.ensureDeferred(client.close()).addTimeout(_CLOSE_TIMEOUT, reactor)

        trigger = reactor.addSystemEventTrigger("before", "shutdown", close_on_shutdown)
        try:
            yield client
        finally:
            reactor.removeSystemEventTrigger(trigger)
            await client.close()
    except ClientError as e:
        message = e.message + hint if e.kind == "tls" else e.message
        raise Failed(_KIND_STATUS.get(e.kind, Exit.PROTOCOL), message) from e
    finally:
        if notices is not None:
            globalLogPublisher.removeObserver(notices)
    if ended:
        raise ended[0]


class _ConnectionNotices:
    """A log observer saying on stderr what a person running listen or chat should know
    of the connection, which the client re-makes by itself: that it was lost, why each
    attempt to re-make it failed (each reason once), and that it is back."""

    def __init__(self) -> None:
        self._lost = False
        self._reasons: set[str] = set()

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "client.terminated" and event.get("code") == 421:
            # Attached again on reconnecting, unless the reason (a password withdrawn,
            # say) is why that fails: the person reads it here first.
            endpoints = ", ".join(event.get("endpoints", ()))
            self._say(f"the relay ended the attachment of {endpoints}: 421 {event.get('text')}")
        elif name == "client.connection-lost":
            self._lost = True
            self._reasons.clear()
            self._say(f"{formatEvent(event)}; connecting again")
        elif name == "client.retry" and self._lost:
            reason = str(event.get("error"))
            if reason not in self._reasons:
                self._reasons.add(reason)
                self._say(f"cannot connect again yet: {reason}")
        elif name == "client.connected" and self._lost:
            self._lost = False
            self._say(f"connected to the relay at {event.get('where')} again")

    @staticmethod
    def _say(text: str) -> None:
        # The relay's texts are quoted: as _report's, one line, controls escaped.
        print(f"imxp: {_in_line(text)}", file=sys.stderr, flush=True)


def _built_in_relay(endpoint: str) -> tuple[str, Path] | None:
    """For an endpoint of the domain of the relay that runs on built-in defaults
    (``twistd -n imxp``: ``localhost``, which no DNS names, RFC 6761 §6.3), where that relay
    listens for endpoints and the development CA it makes; else None."""
    config = load(None)
    if Endpoint.parse(endpoint).domain != config.domain:
        return None
    _description, address, port = _ports(config.edge_listen)[0]
    # In the directory it runs in, as the relay's own state_dir is.
    return host_port(address, port), config.path("state_dir") / "ca.pem"


async def _attached(endpoint: str, **options: Any) -> Client:
    """:func:`connect`, with the way out of the one refusal a person meets by running two
    commands as themself: §4.4.1 step 5 lets one application at a time attach as an
    endpoint, so ``imxp send --from fred@…`` is refused while ``imxp listen --as fred@…``
    runs. Each may use a subaddress of its own, which the same login may attach as."""
    try:
        return await connect(endpoint, **options)
    except ClientError as e:
        if (e.kind, e.code) != ("refused", 554):
            raise
        parsed = Endpoint.parse(endpoint)
        spare = "cli" if parsed.subaddress != "cli" else "cli2"
        raise ClientError(
            e.kind,
            f"{e.message} (by another application; this one may attach as a subaddress "
            f"of its own, such as {parsed.address}/{spare}@{parsed.domain})",
            e.code,
        ) from e


async def _send(reactor: Any, args: argparse.Namespace) -> int:
    """``imxp send``: one line per recipient; 1 unless every one was delivered. A send
    that gives up part way prints the lines of the recipients whose data had ended, then
    the error."""
    raw = args.raw
    if raw is None:
        raw = args.file is not None or args.media_type is not None
    if not raw and args.media_type is not None:
        raise Failed(Exit.USAGE, "--type is for raw content; a CPIM message carries text")
    if raw and (args.cc or args.subject is not None):
        raise Failed(Exit.USAGE, "--cc and --subject are for CPIM messages")
    if args.file is not None and args.text is not None:
        raise Failed(Exit.USAGE, "give TEXT or --file, not both")
    if raw and (args.sign or args.encrypt):
        raise Failed(Exit.USAGE, "--sign and --encrypt protect CPIM messages, not raw content")
    protection = _protection(args)
    if args.file is not None:
        content = args.file.read_bytes()
    elif args.text is not None:
        content = args.text.encode("utf-8")
    elif sys.stdin.isatty():
        raise Failed(Exit.USAGE, "nothing to send: give TEXT, --file FILE, or pipe it in")
    else:
        content = sys.stdin.buffer.read()
        if not content:
            # A script whose producer failed pipes in nothing: an empty message, sent and
            # "delivered", would hide that from it and from the person who gets it.
            raise Failed(Exit.USAGE, "nothing to send: standard input was empty")
    if not raw:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            raise Failed(
                Exit.USAGE, "a CPIM message carries UTF-8 text; send other content --raw"
            ) from None
    async with _connected(reactor, args, args.sender, reconnect=False) as client:
        try:
            if raw:
                media_type = args.media_type or _media_type_of(args.file, content)
                outcomes = await client.send(args.to, content, media_type, timeout=args.timeout)
            else:
                outcomes = await client.send_message(
                    args.to,
                    text,
                    cc=args.cc,
                    subject=args.subject,
                    timeout=args.timeout,
                    protect=protection,
                )
        except ClientError as e:
            # More than 1,000 recipients go in several data: those whose data ended before
            # the client gave up have their verdicts, and must not be sent to again.
            _print_outcomes(e.outcomes, args.timeout)
            raise
    _print_outcomes(outcomes, args.timeout)
    return Exit.OK if all(o.delivered for o in outcomes.values()) else Exit.FAILED


def _print_outcomes(outcomes: Mapping[str, Outcome], timeout: float) -> None:
    for recipient, outcome in outcomes.items():
        # The text is a relay's, perhaps another domain's, or the recipient application's:
        # one line, or it could print a verdict of its own for another recipient.
        print(_in_line(f"{recipient}: {_outcome_text(outcome, timeout)}"))


def _media_type_of(file: Path | None, content: bytes) -> str:
    """What raw content is, when --type does not say: by the file's name as far as it
    tells, else text/plain for UTF-8 and application/octet-stream for anything else - not
    text/plain for every file, which would have listeners print an image as text."""
    if file is not None:
        guessed, encoding = mimetypes.guess_type(file.name)
        if guessed is not None and encoding is None:
            return guessed
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


def _terminal_safe(text: str) -> str:
    """``text`` for a terminal. What a sender writes could rewrite what it shows: a carriage
    return prints another sender's name over the real one, an escape sequence does whatever
    the terminal does with it, a bidirectional override reorders the line."""
    return logs.escape_controls(text, lines=True)


def _in_line(text: str) -> str:
    """Others' words (a sender's certificate name, Content-Type or a problem quoting them;
    a relay's diagnostic) in a line of ours, its newlines escaped too: only the message
    text, whose continuation lines are indented, may span lines, or a line of its own
    could pass for another message - "signed by" whoever the sender likes - or another
    verdict."""
    return logs.escape_controls(text)


def _outcome_text(outcome: Outcome, timeout: float) -> str:
    """``delivered (250)``, ``failed 550 unknown endpoint identity``, ``unknown (...)``."""
    if outcome.delivered:
        return f"delivered ({outcome.code})"
    if outcome.unknown:
        return f"unknown ({outcome.text or f'no report within {timeout:g}s'})"
    code = f"{outcome.code} " if outcome.code is not None else ""
    return f"failed {code}{outcome.text}".rstrip()


async def _listen(reactor: Any, args: argparse.Namespace) -> int:
    """``imxp listen``: print each message, flushing, until interrupted or --count.

    Each data is answered once its line is printed: 250 then, 451 if printing failed (the
    reader of a pipe, ``imxp listen | head -n 1``, has gone), so that no sender is told
    delivered of a message nobody saw. What comes once --count are printed, or printing
    failed, is refused with 450."""
    keys = _keys(args, pgp_needed=False)
    # RFC 3923 §6.9: a signed message received twice is a replay, not a second message.
    replays = ReplayCache()
    # One message at a time, in the order they came.
    turn = defer.DeferredLock()
    # Fires once listen is done: --count printed, printing failed, or the client ended.
    done: defer.Deferred[None] = defer.Deferred()
    printed = 0

    async def show(incoming: Incoming) -> None:
        nonlocal printed
        await turn.acquire()
        try:
            if done.called:
                raise Refusal(450, "the listener has stopped taking messages")
            report = await open_incoming(incoming, keys, replays=replays, reactor=reactor)
            if args.json:
                line = _json_line(incoming, report)
            else:
                line = _terminal_safe(_human_line(incoming, report))
            try:
                print(line, flush=True)
            except OSError as e:
                if not done.called:
                    done.errback(e)
                # A refusal, not a failure of the handler: the listen's end says why.
                raise Refusal(451, f"the listener could not print it: {e.strerror}") from None
            printed += 1
            if printed == args.count and not done.called:
                done.callback(None)
        finally:
            turn.release()

    def ended(result: object) -> None:
        if done.called:
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(None)

    async with _connected(reactor, args, args.endpoint, reconnect=True, on_data=show) as client:
        client.ended().addBoth(ended)
        await done
    return Exit.OK


def _message(incoming: Incoming) -> CPIMMessage | None:
    """The instant message ``incoming`` carries; None for other content and for a
    malformed message/cpim, which are shown by type and size instead."""
    try:
        return incoming.message()
    except CPIMError:
        return None


def _shown(incoming: Incoming, report: Report) -> CPIMMessage | None:
    """The instant message to show: what a protected content turned out to hold, if it
    may be shown (RFC 3923 §6.7-§6.9); what a plain one carries."""
    if report.scheme is None:
        return _message(incoming)
    return report.cpim if report.presentable else None


def _human_line(incoming: Incoming, report: Report) -> str:
    """``[2026-11-21 10:00:00] fred@a.test: hello``, dated as the message says (else when
    it arrived), with what protected it before the colon, where no sender's text can
    be: ``fred@a.test (signed by fred@a.test, encrypted): hello``; content other than
    text is described by its media type and size. A protected message that may not be
    shown is a warning line instead, saying why."""
    stamp = f"[{incoming.received.astimezone():%Y-%m-%d %H:%M:%S}]"
    if report.scheme is not None and not report.presentable:
        return f"{stamp} {_refusal(incoming, report)}"
    message = _shown(incoming, report)
    if message is None:
        return f"{stamp} {incoming.originator}: {_described(incoming)}"
    sender = _in_line(message.sender)
    if sender != incoming.originator:
        # From is the sender's claim; the originator is what the relays checked.
        sender = f"{sender} (via {incoming.originator})"
    when = message.date.astimezone()
    return (
        f"[{when:%Y-%m-%d %H:%M:%S}] {sender}{_protection_note(report)}: {_message_text(message)}"
    )


def _protection_note(report: Report) -> str:
    """`` (signed by fred@a.test, encrypted)``, `` (encrypted, not signed)``, or nothing
    for a plain message; notes on the protection follow. It goes between the sender and
    the text: after the text, a plain message ending in the same words - which a relay
    could put in place of a signed one - looked just as signed."""
    if report.scheme is None:
        return ""
    if report.status == "signed-and-verified":
        signer = _in_line(report.signer or "")
        what = [f"signed by {signer}"] + (["encrypted"] if report.encrypted else [])
    else:
        what = ["encrypted, not signed"]
    notes = _in_line("; ".join(report.problems))
    return f" ({', '.join(what)}{'; ' + notes if notes else ''})"


def _refusal(incoming: Incoming, report: Report) -> str:
    """The warning shown instead of a protected message that may not be shown."""
    assert report.scheme is not None  # a plain message is shown as it is
    scheme = _SCHEME_NAMES[report.scheme]
    return (
        f"warning: message from {incoming.originator} not shown ({report.status}, {scheme}): "
        + _in_line("; ".join(report.problems))
    )


def _described(incoming: Incoming) -> str:
    return f"[{_in_line(incoming.media_type)}, {len(incoming.body)} octets]"


def _message_text(message: CPIMMessage) -> str:
    """The text of a CPIM message, continuation lines indented so that one message stays
    one block; other content (or text in an unknown charset) described by type and size."""
    try:
        text = message.text()
    except CPIMError:
        text = None
    if text is None:
        return f"[{_in_line(message.content_type)}, {len(message.body)} octets]"
    return text.replace("\r\n", "\n").rstrip("\n").replace("\n", "\n    ")


def _json_line(incoming: Incoming, report: Report) -> str:
    """One JSON object: originator, recipients, media_type, body (``body`` when UTF-8,
    else ``body_base64``) as they arrived; ``cpim``: the CPIM message's fields (its text as
    ``body`` when it is text), or null, also for a protected message that may not be
    shown; ``presentable``; and ``protection``: status (plain, signed-and-verified,
    signed-but-bad, encrypted-and-decrypted, cannot-decrypt), scheme (pgp, smime or
    null), encrypted, signer, fingerprint, signed_at and problems."""
    record: dict[str, Any] = {
        "originator": incoming.originator,
        "recipients": list(incoming.recipients),
        "media_type": incoming.media_type,
        **_json_body(incoming.body),
        "cpim": None,
        "presentable": report.presentable,
        "protection": {
            "status": report.status,
            "scheme": report.scheme,
            "encrypted": report.encrypted,
            "signer": report.signer,
            "fingerprint": report.fingerprint,
            "signed_at": report.signed_at,
            "problems": report.problems,
        },
    }
    message = _shown(incoming, report)
    if message is not None:
        fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        body = fields.pop("body")
        try:
            text = message.text()
        except CPIMError:
            text = None
        record["cpim"] = {**fields, **({"body": text} if text is not None else _json_body(body))}
    return json.dumps(record, default=_json_value)


def _json_body(body: bytes) -> dict[str, str]:
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def _json_value(value: Any) -> str:
    """What json cannot encode by itself: dates (ISO 8601)."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@implementer(IHalfCloseableProtocol)
class _ChatTerminal(LineReceiver):
    """The terminal side of ``imxp chat``: typed lines go to ``send``; others' lines and
    delivery marks are written as they come, even while a line is being typed.

    ``send`` gives a line's mark and whether it was delivered; :attr:`undelivered`
    counts the lines that were not, for the exit status."""

    delimiter = b"\n"
    # Not LineReceiver's 16 KiB, past which it closed the input: that line and every one
    # after it were dropped unsent and unmarked. A line too long for the relay is refused
    # when sent, and marked so.
    MAX_LENGTH = sys.maxsize

    def __init__(self, send: Callable[[str], Awaitable[tuple[str, bool]]]) -> None:
        self._send = send
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.undelivered = 0
        self._finishing = False
        self._pending: set[defer.Deferred[None]] = set()
        # Lines to show that arrive before the terminal is connected (just after attaching).
        self._backlog: list[bytes] = []

    def connectionMade(self) -> None:
        backlog, self._backlog = self._backlog, []
        for data in backlog:
            self.transport.write(data)

    def show(self, text: str) -> None:
        data = _terminal_safe(text).encode("utf-8") + b"\n"
        if self.transport is None:
            self._backlog.append(data)
        else:
            self.transport.write(data)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.strip() == "/quit":
            self.leave()
        elif text.strip() and not self._finishing:
            d = defer.ensureDeferred(self._deliver(text, line))
            self._pending.add(d)
            d.addBoth(lambda _: self._pending.discard(d))

    async def _deliver(self, text: str, line: bytes) -> None:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            # As for send: a CPIM message carries UTF-8 text, and the line with its
            # other octets replaced by U+FFFD is not what was typed.
            mark, delivered = "✗ not sent: not UTF-8 text", False
        else:
            mark, delivered = await self._send(text)
        if not delivered:
            self.undelivered += 1
        excerpt = text if len(text) <= 40 else text[:39] + "…"
        # The mark may quote a relay or the peer's application: on one line, as in send.
        self.show(f"  {_in_line(mark)} [{excerpt}]")

    def readConnectionLost(self) -> None:
        # End of input (Ctrl-D, or the end of a pipe) leaves like /quit; output stays
        # open for the marks of the lines still on their way. Input that ends without a
        # newline (printf 'hi' | imxp chat) ends its last line, which is sent first.
        self.dataReceived(self.delimiter)
        self.leave()

    def writeConnectionLost(self) -> None:
        """Nobody reads the marks any more (the terminal closed); the lines still go."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.leave()

    def leave(self) -> None:
        """Take no more lines, and finish once the lines sent have their marks."""
        if self._finishing:
            return
        self._finishing = True
        # Lines already sent still get their marks (each waits at most --timeout).
        waits = defer.DeferredList(list(self._pending))
        waits.addCallback(lambda _: self.finished.callback(None))


async def _chat(reactor: Any, args: argparse.Namespace) -> int:
    """``imxp chat``: send typed lines to the peer as CPIM messages, protected as asked,
    and show incoming ones as :func:`_human_line` judges them."""
    peer = args.peer
    protection = _protection(args)
    keys = protection.keys if protection is not None else _keys(args, pgp_needed=False)
    replays = ReplayCache()
    client: Client

    async def send(text: str) -> tuple[str, bool]:
        try:
            outcomes = await client.send_message(
                [peer], text, timeout=args.timeout, protect=protection
            )
        except ClientError as e:
            return f"✗ {e.message}", False
        except E2EError as e:
            return f"✗ not sent, cannot protect it: {e}", False
        # One recipient, however the library spells its address.
        (outcome,) = outcomes.values()
        if outcome.delivered:
            return "✓", True
        if outcome.unknown:
            return f"? {outcome.text or f'no report within {args.timeout:g}s'}", False
        return f"✗ {_outcome_text(outcome, args.timeout).removeprefix('failed ')}", False

    terminal = _ChatTerminal(send)

    async def show(incoming: Incoming) -> None:
        report = await open_incoming(incoming, keys, replays=replays, reactor=reactor)
        if report.scheme is not None and not report.presentable:
            terminal.show(_refusal(incoming, report))
            return
        message = _shown(incoming, report)
        text = _described(incoming) if message is None else _message_text(message)
        terminal.show(f"{incoming.originator}{_protection_note(report)}> {text}")

    async def receive() -> None:
        # One at a time, so that lines keep their order.
        async for incoming in client.incoming():
            try:
                await show(incoming)
            except Exception as e:
                terminal.show(
                    f"warning: a message from {incoming.originator} could not be opened: {e}"
                )

    async with _connected(reactor, args, args.endpoint, reconnect=True) as connected:
        client = connected
        how = f"; messages {_described_protection(protection)}" if protection else ""
        terminal.show(f"chatting with {peer} as {args.endpoint}{how}; /quit or Ctrl-D to leave")
        # The client ends incoming() when it can no longer receive (the connection lost
        # for good, the attachment ended): then there is no chat left, whatever is typed.
        receiving = defer.ensureDeferred(receive())
        gone: list[Failure] = []
        receiving.addErrback(gone.append).addBoth(lambda _: terminal.leave())
        stdio = StandardIO(terminal, reactor=reactor)
        await terminal.finished
        stdio.loseConnection()
        if gone:
            gone[0].raiseException()
    return Exit.FAILED if terminal.undelivered else Exit.OK


# -- certs ------------------------------------------------------------------------------------


def _writable(force: bool, *paths: Path) -> None:
    """Refuse to replace existing files without --force (before anything is written)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise Failed(Exit.CONFIG, f"{' and '.join(existing)} already {verb} (--force replaces)")
    for path in paths:
        # Made here, a directory holds keys; in the README's walk-through it becomes a
        # relay's state directory, with its users file and control socket.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _validity(args: argparse.Namespace) -> dict[str, int]:
    return {"days": args.days} if args.days is not None else {}


def _load_ca(directory: Path) -> Issued:
    cert, key = directory / "ca.pem", directory / "ca.key"
    for path in (cert, key):
        if not path.exists():
            raise Failed(Exit.CONFIG, f"{path} does not exist: make a CA with imxp certs ca")
    return _load_identity(cert, key, "CA certificate", "CA key")


def _wrote(issued: Issued, cert: Path, key: Path, what: str) -> None:
    expires = issued.certificate.not_valid_after_utc
    print(f"wrote {cert} and {key}: {what}, valid until {expires:%Y-%m-%d}")


def _certs_ca(args: argparse.Namespace) -> int:
    """``imxp certs ca``: a self-signed CA in DIR/ca.pem and DIR/ca.key."""
    cert, key = args.out / "ca.pem", args.out / "ca.key"
    _writable(args.force, cert, key)
    try:
        ca = create_ca(args.name, **_validity(args))
    except ValueError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    ca.write(cert, key)
    _wrote(ca, cert, key, f"certificate authority {args.name!r}")
    return Exit.OK


def _certs_relay(args: argparse.Namespace) -> int:
    """``imxp certs relay``: a certificate naming the relay's domain, from the CA in DIR."""
    cert, key = args.out / "relay.pem", args.out / "relay.key"
    ca = _load_ca(args.ca)
    _writable(args.force, cert, key)
    try:
        relay = issue_server(ca, args.domain, ips=args.ip, **_validity(args))
    except ValueError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    relay.write(cert, key)
    _wrote(relay, cert, key, f"relay certificate for {', '.join(args.domain)}")
    return Exit.OK


def _certs_endpoint(args: argparse.Namespace) -> int:
    """``imxp certs endpoint``: a client certificate for an endpoint, from the CA in DIR."""
    if "/" in args.identity:
        raise Failed(Exit.USAGE, "a certificate names an endpoint without a subaddress")
    cert, key = args.out / f"{args.identity}.pem", args.out / f"{args.identity}.key"
    ca = _load_ca(args.ca)
    _writable(args.force, cert, key)
    try:
        endpoint = issue_client(ca, args.identity, **_validity(args))
    except ValueError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    endpoint.write(cert, key)
    _wrote(endpoint, cert, key, f"client certificate for {args.identity}")
    return Exit.OK


def _certs_smime(args: argparse.Namespace) -> int:
    """``imxp certs smime``: an S/MIME certificate for an endpoint (RFC 8550 §3, §4.4),
    from the CA in DIR; the key is RSA, so that it can be encrypted to as well."""
    if "/" in args.identity:
        raise Failed(Exit.USAGE, "a certificate names an endpoint without a subaddress")
    cert = args.out / f"{args.identity}.smime.pem"
    key = args.out / f"{args.identity}.smime.key"
    ca = _load_ca(args.ca)
    _writable(args.force, cert, key)
    try:
        issued = smime.issue_smime(ca, args.identity, **_validity(args))
    except ValueError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    issued.write(cert, key)
    _wrote(issued, cert, key, f"S/MIME certificate for {args.identity}")
    return Exit.OK


# -- users ------------------------------------------------------------------------------------


def _user_store(args: argparse.Namespace, *, create: bool = False) -> tuple[UserStore, str | None]:
    """The user file of ``args`` (--file, or users_file of --config) and the domain its
    relay serves (None with --file: not known). A missing file reads as empty to the store;
    here it is an error (likely a wrong path) unless ``create``."""
    if args.file is not None:
        path, domain = args.file, None
    else:
        config = load(args.config)
        path, domain = config.path("users_file"), config.domain
    missing = path.parent if create else path
    if not missing.exists():
        raise Failed(Exit.CONFIG, f"{missing} does not exist")
    return UserStore(path), domain


def _username(name: str, domain: str | None) -> str:
    """The username to store for ``name``: ``fred@DOMAIN`` of the relay's own domain is
    ``fred``, the name a client logs in with by default for fred@DOMAIN (the relay takes
    both for the same endpoint, RFC 3340 §4.5.1, but a login must find the name stored).
    A name of another domain could never attach at this relay (553), so it is refused.
    Without the domain (--file), the name is stored as given."""
    if domain is None or "@" not in name:
        return name
    try:
        endpoint = Endpoint.parse(name)
    except AddressError as e:
        raise Failed(Exit.USAGE, f"{name!r}: {e}") from None
    if endpoint.subaddress is not None:
        raise Failed(
            Exit.USAGE, f"{name}: a user is an endpoint without a subaddress, which it may use"
        )
    if endpoint.domain != domain:  # both in the normal form of §2.2.1
        raise Failed(
            Exit.USAGE,
            f"{name} is not of {domain}, the domain this relay serves: it could never attach here",
        )
    return endpoint.address


def _users_add(args: argparse.Namespace) -> int:
    """``imxp users add NAME``: 1 if the user exists. Makes the file if need be."""
    store, domain = _user_store(args, create=True)
    name = _username(args.name, domain)
    # fred and fred@DOMAIN are one endpoint (a file may hold either, from before).
    same = {name, args.name} if domain is None else {name, f"{name}@{domain}"}
    if any(n in store for n in same):
        print(f"imxp: {args.name} is already in {store.path}", file=sys.stderr)
        return Exit.FAILED
    password = _password(args.password_file, confirm=True)
    if password is None:
        raise _no_password()
    try:
        store.add(name, password)
    except UserStoreError as e:  # the name or the password is unacceptable (SASLprep)
        raise Failed(Exit.USAGE, str(e)) from None
    stored = prepare_username(name)  # as SASLprep (RFC 4013) wrote it: ǅ is Dž
    shown = stored if stored == args.name else f"{stored} ({args.name})"
    print(f"added {shown} to {store.path}")
    return Exit.OK


def _stored_user(args: argparse.Namespace) -> tuple[UserStore, str]:
    """The user file and the name ``args.name`` has in it: ``fred@DOMAIN`` is fred, or
    the name as given if the file holds it so."""
    store, domain = _user_store(args)
    return store, args.name if args.name in store else _username(args.name, domain)


def _users_password(args: argparse.Namespace) -> int:
    """``imxp users password NAME``: 1 if there is no such user."""
    store, name = _stored_user(args)
    if name not in store:
        return _no_such_user(args.name, store)
    password = _password(args.password_file, confirm=True)
    if password is None:
        raise _no_password()
    try:
        store.set_password(name, password)
    except UserStoreError as e:  # a password SASLprep refuses
        raise Failed(Exit.USAGE, str(e)) from None
    except KeyError:  # removed meanwhile
        return _no_such_user(args.name, store)
    print(f"new password for {name} in {store.path}")
    return Exit.OK


def _no_such_user(name: str, store: UserStore) -> int:
    print(f"imxp: there is no user {name} in {store.path}", file=sys.stderr)
    return Exit.FAILED


def _users_remove(args: argparse.Namespace) -> int:
    """``imxp users remove NAME``: 1 if there is no such user."""
    store, name = _stored_user(args)
    try:
        store.remove(name)
    except KeyError:
        return _no_such_user(args.name, store)
    print(f"removed {name} from {store.path}")
    return Exit.OK


def _users_list(args: argparse.Namespace) -> int:
    """``imxp users list``: the usernames, one per line."""
    store, _ = _user_store(args)
    for name in store.usernames():
        print(name)
    return Exit.OK


# -- status, reload ---------------------------------------------------------------------------


def _ask_relay(args: argparse.Namespace, command: str) -> Mapping[str, Any]:
    """The answer to ``command`` from the relay that ``args.config`` describes, through its
    control socket (:mod:`imxp.control`)."""
    path = control_socket(args.config)
    try:
        return control.ask(path, command)
    except control.ControlError as e:
        raise Failed(Exit.UNREACHABLE if e.unreachable else Exit.CONFIG, str(e)) from None


def _status(args: argparse.Namespace) -> int:
    """``imxp status``: what the running relay is doing."""
    answer = _ask_relay(args, "status")
    if not answer["ok"]:
        raise Failed(Exit.PROTOCOL, f"the relay says: {answer.get('error')}")
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return Exit.OK
    doing = "accepting data" if status["accepting"] else "stopping: new data is refused (421)"
    print(f"relay for {status['domain']}: up {_duration(status['up'])}, {doing}")
    print(
        f"sessions: {status['sessions']} ({status['logged_in']} logged in); endpoints "
        f"attached: {status['attached']} ({status['to_endpoints']} octets waiting for them)"
    )
    print(f"data in flight: {status['in_flight']}")
    print(f"certificate valid until: {status['expires']}")
    hops = status["next_hops"]
    print(f"next hops: {len(hops)}")
    for hop in hops:
        # A failure's text may be a peer's: no escape sequence of its reaches the terminal.
        print(f"  {_in_line(str(NextHopStatus(**hop)))}")
    return Exit.OK


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    if days:
        return f"{days} d {hour} h"
    if hours:
        return f"{hours} h {minute} min"
    return f"{minutes} min {second} s" if minutes else f"{second} s"


def _reload(args: argparse.Namespace) -> int:
    """``imxp reload``: the running relay reads its files again; 8 if it refused them."""
    answer = _ask_relay(args, "reload")
    if not answer["ok"]:
        raise Failed(Exit.CONFIG, str(answer.get("error")))
    print(answer["said"])
    return Exit.OK


# -- route ------------------------------------------------------------------------------------


def _config_resolver(config: Config, dns_server: tuple[str, int] | None) -> IResolver | None:
    """--dns, else the configuration's dns_servers, else None (the system's resolver)."""
    if dns_server is not None:
        return _resolver([dns_server])
    servers = resolver_addresses(config)
    return _resolver(servers) if servers else None


async def _route(reactor: Any, args: argparse.Namespace) -> int:
    """``imxp route DOMAIN``: Router.describe(); 4 without a route, 5 if DNS failed."""
    config = load(args.config)
    resolver = _config_resolver(config, args.dns)
    if args.edge:
        # An endpoint finds its relay by SRV alone: the relay's own routes do not apply.
        router = Router(
            service=EDGE_SERVICE, default_port=EDGE_PORT, resolver=resolver, clock=reactor
        )
    else:
        router = Router(
            static_routes=config.routes,
            smart_host=config.smart_host or None,
            resolver=resolver,
            clock=reactor,
        )
    print(await router.describe(args.domain))
    try:
        await router.route(args.domain)
    except NoRoute as e:
        return Exit.UNKNOWN_DOMAIN if e.permanent else Exit.UNREACHABLE
    return Exit.OK


# -- check ------------------------------------------------------------------------------------

# RFC 2606 and RFC 6761 names: development domains that need no SRV records.
_DEVELOPMENT_SUFFIXES = ("localhost", "test", "example", "invalid", "local")


class _Findings:
    """What ``imxp check`` found, printed as it is found: ``ok:``, ``note:``, ``problem:``."""

    def __init__(self) -> None:
        self.problems = 0

    def ok(self, text: str) -> None:
        print(f"ok: {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"problem: {text}", flush=True)


async def _check(reactor: Any, args: argparse.Namespace) -> int:
    """``imxp check``: 0 when all is well, 1 when a problem was found."""
    found = _Findings()
    if args.config is not None and _present(args.config, "configuration", found) is None:
        return Exit.FAILED
    try:
        config = load(args.config)
    except ConfigError as e:
        found.problem(f"{e}: correct the configuration file")
        return Exit.FAILED
    found.ok(f"configuration {config.source or '(built-in defaults)'} is valid")
    identity = _check_certificate(config, found)
    trust = _check_trust(config, found)
    _check_users(config, found)
    resolver = _config_resolver(config, args.dns)
    await _check_srv(config, resolver, reactor, found)
    await _check_listeners(config, reactor, found)
    await _check_peers(config, identity, trust, resolver, reactor, found)
    if found.problems:
        print(f"{found.problems} problem{'s' if found.problems > 1 else ''} found")
        return Exit.FAILED
    print("all good")
    return Exit.OK


def _present(path: Path, what: str, found: _Findings) -> bool | None:
    """Whether ``path`` exists; None, reported as a problem, when this user may not read
    it, or not even look at it: a directory on the way is closed to it, as the relay's
    state_dir (0700) is to other users and /etc/letsencrypt/live to all but root."""
    try:
        if not path.exists():
            return False
        with path.open("rb"):
            return True
    except PermissionError:
        found.problem(
            f"{what} {path} cannot be read by this user: run imxp check as the relay's user, "
            "or give this one read access"
        )
        return None
    except OSError:
        return True  # a directory, say: reading it next tells what is wrong


def _check_certificate(config: Config, found: _Findings) -> Issued | None:
    """The relay certificate: readable, names the domain, valid now and for a while, key
    matching."""
    cert_path, key_path = config.path("tls_certificate"), config.path("tls_key")
    domain = config.domain
    there = _present(cert_path, "certificate", found)
    if there is None:
        return None
    if not there:
        if makes_development_certificate(config):
            found.note(
                f"no relay certificate at {cert_path} yet: the relay makes a development "
                f"certificate for {domain} on first start"
            )
        else:
            found.problem(
                f"certificate {cert_path} does not exist: set tls_certificate to the PEM file "
                f"of a certificate for {domain}"
            )
        return None
    try:
        chain = load_certificates(cert_path)
    except (OSError, ValueError) as e:
        found.problem(f"certificate {cert_path} cannot be read ({e}): put a PEM certificate there")
        return None
    certificate = chain[0]
    try:
        # The check peers make when they connect to this domain (RFC 6125).
        verify_certificate_hostname(certificate, domain)
    except (VerificationError, CertificateError):
        found.problem(
            f"certificate {cert_path} does not name {domain}: issue one for {domain} "
            f"(imxp certs relay --ca CA_DIR --domain {domain} --out DIR)"
        )
    else:
        found.ok(f"certificate {cert_path} names {domain}")
    now = datetime.now(UTC)
    left = certificate.not_valid_after_utc - now
    expires = f"{certificate.not_valid_after_utc:%Y-%m-%d}"
    if certificate.not_valid_before_utc > now:
        # Peers refuse it as they refuse an expired one (RFC 5280 §6.1.3).
        found.problem(
            f"certificate {cert_path} is not valid until "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's "
            "clock, or keep the certificate it replaces until then"
        )
    elif left.total_seconds() <= 0:
        found.problem(f"certificate {cert_path} expired on {expires}: renew it")
    elif left < EXPIRY_WARNING:
        found.problem(
            f"certificate {cert_path} expires on {expires}, in {left.days} days: renew it now"
        )
    else:
        found.ok(f"certificate {cert_path} is valid until {expires}")
    there = _present(key_path, "key", found)
    if there is False:
        found.problem(f"key {key_path} does not exist: set tls_key to the certificate's key")
    if not there:
        return None
    try:
        identity = load_key_for(chain, key_path)
    except (OSError, ValueError, TypeError) as e:
        found.problem(f"key {key_path} is unusable ({e}): set tls_key to the certificate's key")
        return None
    found.ok(f"key {key_path} belongs to the certificate")
    return identity


def _check_trust(config: Config, found: _Findings) -> list[x509.Certificate]:
    """The CAs that peers' certificates must chain to."""
    roots: list[x509.Certificate] = []
    for path in config.paths("tls_trust"):
        there = _present(path, "tls_trust file" if config.tls_trust else "development CA", found)
        if there is None:
            continue
        if not there:
            if config.tls_trust:
                found.problem(f"tls_trust file {path} does not exist: correct tls_trust")
            elif makes_development_certificate(config):
                found.note(f"no development CA at {path} yet: the relay makes one on first start")
            else:
                # The relay refuses to start (imxp.bootstrap._trust).
                found.problem(
                    f"tls_trust is empty and there is no development CA at {path}, which the "
                    "relay makes only with a development certificate (tls_certificate and "
                    "tls_key unset), so it will not start: set tls_trust to the PEM files of "
                    "the CAs that peers' and endpoints' certificates chain to"
                )
            continue
        try:
            roots += load_certificates(path)
        except (OSError, ValueError) as e:
            found.problem(f"tls_trust file {path} cannot be read ({e}): list PEM CA files")
    return roots


def _check_users(config: Config, found: _Findings) -> None:
    """The user file: readable, well-formed, and nobody else's business."""
    path = config.path("users_file")
    there = _present(path, "user file", found)
    if there is None:
        return
    if not there:
        if config.users_file is None:
            found.note(f"no user file at {path} yet: the relay makes an empty one on first start")
        else:
            found.problem(f"user file {path} does not exist: create it (imxp users add NAME)")
        return
    try:
        names = UserStore(path).usernames()
    except (OSError, UserStoreError) as e:
        found.problem(f"user file {path} cannot be read: {e}")
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        found.problem(
            f"user file {path} is accessible to group or others (mode {mode:04o}): chmod 600 {path}"
        )
    else:
        users = f"{len(names)} user{'' if len(names) == 1 else 's'}"
        found.ok(f"user file {path}: {users}, mode {mode:04o}")
    if not names:
        found.note(f"no users yet: add one with imxp users add NAME --file {path}")


def _ports(descriptions: Sequence[str]) -> list[tuple[str, str, int]]:
    """(description, address to connect to, port) of each TCP-style listener."""
    result = []
    for description in descriptions:
        listener = endpoints.serverFromString(None, description)
        # TCP and SSL server endpoints keep their port and interface in these attributes;
        # config.py relies on ``_port`` the same way. Other kinds (unix) have no port.
        port = getattr(listener, "_port", None)
        if not isinstance(port, int):
            continue
        interface = getattr(listener, "_interface", "") or "0.0.0.0"
        # A wildcard listener is reached on loopback from here.
        address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
        result.append((description, address, port))
    return result


def _development(domain: str) -> bool:
    return domain.rsplit(".", 1)[-1] in _DEVELOPMENT_SUFFIXES


async def _check_srv(
    config: Config, resolver: IResolver | None, reactor: Any, found: _Findings
) -> None:
    """``_apex-mesh._tcp`` and ``_apex-edge._tcp`` of the domain name this relay's ports."""
    resolver = resolver or dns_client.createResolver()
    domain = config.domain
    for service, listen, option, default in (
        (MESH_SERVICE, config.mesh_listen, "mesh_listen", MESH_PORT),
        (EDGE_SERVICE, config.edge_listen, "edge_listen", EDGE_PORT),
    ):
        name = f"{service}.{domain}"
        ports = sorted({port for _d, _a, port in _ports(listen)})
        listening = ", ".join(map(str, ports)) or "no TCP port"
        try:
            answers, _authority, _additional = await resolver.lookupService(name)
        except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            answers = []
        except _DNS_ERRORS as e:
            found.problem(
                f"DNS lookup of {name} failed ({_dns_failure(e)}): check dns_servers or the "
                "system's resolver"
            )
            continue
        records = [rr.payload for rr in answers if rr.type == dns.SRV]
        if not records:
            text = f"no SRV record {name}"
            if _development(domain):
                found.note(
                    f"{text}: fine for a development domain, which peers reach by static route"
                )
            else:
                port = ports[0] if ports else default
                found.problem(
                    f"{text}: publish `{name}. SRV 0 0 {port} <this relay's host name>.` so "
                    "that others find this relay"
                )
            continue
        for record in records:
            target = record.target.name.decode("ascii", "replace").rstrip(".")
            where = f"SRV {name} -> {target or '.'}:{record.port}"
            if not target:
                found.problem(f"{where} says the service is not available: publish a target")
            elif record.port not in ports:
                found.problem(
                    f"{where}, but this relay listens on {listening}: change the record's "
                    f"port or {option}"
                )
            elif not is_ip_address(target) and not await _resolves(resolver, target):
                found.problem(f"{where}, but {target} has no address: publish its A record")
            else:
                found.ok(f"{where}, a port this relay listens on")


# What a twisted.names lookup fails with: an error answer, or no answer at all.
_DNS_ERRORS = (dns_error.DomainError, dns_error.AuthoritativeDomainError, defer.TimeoutError)


def _dns_failure(e: Exception) -> str:
    if isinstance(e, defer.TimeoutError | dns_error.DNSQueryTimeoutError):
        return "timeout"
    if isinstance(e, dns_error.DNSServerError):
        return "SERVFAIL"
    return type(e).__name__


async def _resolves(resolver: IResolver, host: str) -> bool:
    try:
        await resolver.getHostByName(host)
    except _DNS_ERRORS:
        return False
    return True


class _Ungreeted(SessionClosed):
    """Something took the connection, but the session ended before its BEEP greeting,
    which a relay sends at once (RFC 3080 §2.4): it is no relay, or a stuck one.
    ``violated`` when what it sent was not BEEP (:attr:`Session.violated`)."""

    def __init__(self, reason: str, violated: bool) -> None:
        super().__init__(reason)
        self.violated = violated


async def _greeting(
    reactor: Any, host: str, port: int, resolver: IResolver | None = None
) -> Session:
    """A greeted BEEP session to ``host:port``; a host name is resolved through
    ``resolver`` when given, as the relay resolves its next hops (RFC 2782).

    :raises _Ungreeted: connected, but no greeting came.
    """
    if resolver is not None and not is_ip_address(host):
        try:
            host = await resolver.getHostByName(host)
        except _DNS_ERRORS as e:
            raise error.DNSLookupError(f"{host}: {_dns_failure(e)}") from None
    factory = SessionFactory(
        Role.INITIATOR, [], SessionConfig(greeting_timeout=_PROBE_TIMEOUT, idle_timeout=None)
    )
    where = endpoints.HostnameEndpoint(reactor, host, port, timeout=_PROBE_TIMEOUT)
    session: Session = await where.connect(factory)
    try:
        await session.greeted()
    except SessionClosed as e:
        raise _Ungreeted(str(e), session.violated) from None
    return session


async def _check_listeners(config: Config, reactor: Any, found: _Findings) -> None:
    """Each listener answers with a BEEP greeting."""
    start = "twistd imxp" + (f" --config {config.source}" if config.source else "")
    for option, listen in (
        ("mesh_listen", config.mesh_listen),
        ("edge_listen", config.edge_listen),
    ):
        for description, address, port in _ports(listen):
            try:
                session = await _greeting(reactor, address, port)
            except error.ConnectError as e:
                # Nothing took the connection: nothing listens there.
                found.problem(
                    f"relay not running or not listening on {description} "
                    f"({host_port(address, port)}: {_short(e)}): start it ({start})"
                )
                continue
            except _Ungreeted as e:
                # Something took the connection but is no working relay: another program,
                # which keeps the relay from listening there, or the relay stuck.
                if e.violated:
                    found.problem(
                        f"a program that does not speak BEEP answers on {description} "
                        f"({host_port(address, port)}: {_short(e)}): stop it, or give {option} "
                        f"another port than {port}"
                    )
                else:
                    found.problem(
                        f"something takes connections on {description} but sends no BEEP "
                        f"greeting ({host_port(address, port)}: {_short(e)}): another program "
                        f"holds port {port}, or the relay is stuck; find which (ss -ltnp)"
                    )
                continue
            except BEEPError as e:
                # A BEEP listener's refusal (§2.4); an imxp relay's says why (e.g. 421, too
                # many sessions from this address).
                found.problem(
                    f"a BEEP listener on {description} refuses sessions "
                    f"({host_port(address, port)}: {e.code} {e.text}): see the relay's log"
                )
                continue
            session.disconnect()
            found.ok(f"a relay answers on {description}")


async def _check_peers(
    config: Config,
    identity: Issued | None,
    trust: list[x509.Certificate],
    resolver: IResolver | None,
    reactor: Any,
    found: _Findings,
) -> None:
    """Each static route's relay, and the smart host, proves over TLS the name the relay
    will check."""
    # (whom the findings name, where it is, what of the configuration names it)
    hops: list[tuple[str, Target, str]] = []
    router = Router(static_routes=config.routes, resolver=resolver, clock=reactor)
    for key in config.routes:
        if key.startswith("."):
            found.note(f"route {key}: each domain below {key[1:]} is checked when used")
            continue
        target = (await router.route(key))[0]
        hops.append((f"peer {key} at {target.address}", target, "the route"))
    if config.smart_host:
        # A router with no static route sends every domain to the smart host.
        smart = Router(smart_host=config.smart_host, clock=reactor)
        target = (await smart.route(config.domain))[0]
        hops.append((f"smart host {target.address}", target, "smart_host"))
    if hops and not trust:
        found.note("no trust roots to verify peers with: peers not checked")
        return
    for where, target, named_in in hops:
        try:
            session = await _greeting(reactor, target.host, target.port, resolver)
        except (error.ConnectError, error.DNSLookupError, SessionClosed, BEEPError) as e:
            found.problem(
                f"{where} unreachable ({_short(e)}): correct {named_in} or start that relay"
            )
            continue
        try:
            await start_tls(session, client_options(target.tls_name, trust, identity))
        except SessionClosed as e:
            found.problem(
                f"{where}: TLS verification failed: {_tls_failure(e, target.tls_name, named_in)}"
            )
            continue
        except BEEPError as e:
            found.problem(f"{where} refused TLS ({e.code} {e.text}): check that relay")
            session.disconnect()
            continue
        session.disconnect()
        found.ok(f"{where} proves {target.tls_name} (TLS verified)")


def _tls_failure(e: SessionClosed, name: str, named_in: str) -> str:
    """What went wrong in a TLS handshake with a peer relay, and the fix; ``named_in`` is
    what of the configuration names that relay (the route, smart_host).

    The session only has the reason's text: service_identity's verdict on the name, or
    OpenSSL's on the chain (ours, or the peer's alert about our certificate).
    """
    reason = _short(e).removeprefix("session lost: ")
    if "Mismatch" in reason:
        return (
            f"its certificate does not name {name}: give that relay a certificate for {name}, "
            f"or name the one it has in {named_in} (host:port=name)"
        )
    if "certificate verify failed" in reason:
        return (
            f"its certificate does not chain to a CA in tls_trust ({reason}): add the CA that "
            "issued it to tls_trust"
        )
    if "alert" in reason:
        return (
            f"it refused our certificate ({reason}): have that relay trust the CA of "
            "tls_certificate"
        )
    return f"{reason}: check that relay's certificate and tls_trust"


def _short(e: Exception) -> str:
    """An exception's text, on one line; Twisted's connection errors in a few words."""
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "connection timed out"
    return " ".join(str(e).split()) or type(e).__name__
