"""The relay's configuration: one TOML file, every option declared once.

The fields of :class:`Config` are the table of options: each field's annotation is the
option's type, its default is the option's default, and its metadata holds the meaning and
the check of a value. :data:`OPTIONS`, the loader (:func:`load`) and the reference in the
README (:func:`reference_markdown`, printed by ``python -m imxp.config``) are all derived from
those fields, so an option cannot be documented differently from how it is read.

Every value is checked when a :class:`Config` is made, whether by :func:`load` or directly;
a bad value, a value of the wrong type or an unknown key is a :class:`ConfigError` naming the
option and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from imxp import logs
from imxp.apex.address import Endpoint, is_literal, normalise_domain
from imxp.apex.options import MAX_HOPS
from imxp.apex.routing import Router
from imxp.beep.frames import MAX_31
from imxp.beep.saslmech import SERVER_MECHANISMS
from imxp.beep.session import TUNING_MESSAGE_SIZE, SessionConfig

__all__ = [
    "Config",
    "ConfigError",
    "OptionSpec",
    "OPTIONS",
    "DEVELOPMENT_CA",
    "load",
    "reference_markdown",
    "session_config",
    "offered_mechanisms",
    "resolver_addresses",
]


DEVELOPMENT_CA = "ca.pem"
"""The development CA's certificate in ``state_dir``: what an empty ``tls_trust`` means."""


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is one line naming file and option."""

    def __init__(self, source: str | None, option: str | None, problem: str) -> None:
        where = source if source is not None else "built-in defaults"
        text = f"{where}: option {option!r}: {problem}" if option else f"{where}: {problem}"
        super().__init__(text)
        self.source = source
        self.option = option
        self.problem = problem


@dataclass(frozen=True)
class OptionSpec:
    """One option as :data:`OPTIONS` lists it."""

    name: str
    type: Any
    """The Python type of the attribute, e.g. ``int`` or ``tuple[str, ...]``."""
    default: Any
    doc: str
    path: bool = False
    """Whether the value names files; relative ones are taken relative to ``state_dir``
    (``state_dir`` itself: relative to the directory of the configuration file)."""
    state_file: str | None = None
    """For a path option: the file in ``state_dir`` used while the option is unset."""
    check: Callable[[Any], Any] | None = None
    """Validates a value of the right type, returning it in normal form (ValueError if bad)."""
    reload: bool = False
    """Whether a reload (SIGHUP) puts a changed value to work; others take a restart."""

    @property
    def type_name(self) -> str:
        """How the reference names the type of the option."""
        if self.path:
            return "list of paths" if self.type == tuple[str, ...] else "path"
        return _KINDS[self.type][0]


# -- checks of single values ------------------------------------------------------------------
# Each takes a value already of the option's type and returns it in the form the relay uses.


def _domain(value: str) -> str:
    """A domain name in the normal form APEX compares (RFC 3340 §2.2.1)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError(f"{value!r} is an IP address, not a domain name")
    if is_literal(value):
        raise ValueError(f"{value!r} is an address literal, not a domain name")
    return normalise_domain(value)  # its AddressError is a ValueError


def _domains(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_domain(v) for v in values)


def _endpoints(values: tuple[str, ...]) -> tuple[str, ...]:
    for description in values:
        if description.split(":", 1)[0].strip().lower() in ("ssl", "tls"):
            # RFC 3340 §3: endpoints and relays connect in the clear and tune to TLS inside
            # the BEEP session (RFC 3080 §3.1); none would speak TLS from the first octet.
            raise ValueError(
                f"{description!r}: BEEP starts TLS inside the session; listen with tcp:"
            )
        try:
            # Parsing builds an endpoint object without listening; no reactor is needed.
            endpoint = serverFromString(None, description)
        except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
            hint = ""
            if "interface=" in description and "::" in description.replace("\\:", ""):
                # Colons separate the string's fields: an IPv6 address's are escaped.
                hint = "; escape each colon of an IPv6 address, as in interface=\\:\\:"
            raise ValueError(
                f"{description!r} is not a server endpoint string: {e}{hint}"
            ) from None
        # The TCP parser takes any integer; an out-of-range port would only fail at listen().
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise ValueError(f"{description!r}: port {port} out of range")
    return values


def _paths(values: tuple[str, ...]) -> tuple[str, ...]:
    if any(not v for v in values):
        raise ValueError("a path is empty")
    for value in values:
        _path(value)
    return values


def _path(value: str | None) -> str | None:
    if value == "":
        raise ValueError("the path is empty; leave the option out for the default")
    if value is not None and "\0" in value:
        # No file system takes one; os would raise ValueError wherever it is first used.
        raise ValueError("a path cannot hold a NUL character")
    return value


def _mechanisms(values: tuple[str, ...]) -> tuple[str, ...]:
    known = sorted(set(SERVER_MECHANISMS) - {"ANONYMOUS"})
    for name in values:
        if name == "ANONYMOUS":
            raise ValueError("ANONYMOUS is switched on by allow_anonymous = true, not listed here")
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(known)}")
    if len(set(values)) != len(values):
        raise ValueError("a mechanism is listed twice")
    return values


# The Router parses routes and smart hosts; building one (it does no I/O until asked for a
# route) is how the same syntax is checked here.
def _routes(value: Mapping[str, str]) -> Mapping[str, str]:
    Router(static_routes=value, clock=Clock())
    return value


def _refusals(value: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    for recipient, originators in value.items():
        Endpoint.parse(recipient)
        for originator in originators:
            if originator.startswith("@"):
                normalise_domain(originator[1:])
            else:
                Endpoint.parse(originator)
    return value


def _smart_host(value: str) -> str:
    if value:
        Router(smart_host=value, clock=Clock())
    return value


def _dns_server(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"{text!r}: expected address:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: bad port {port!r}")
    return str(address), int(port)


def _dns_servers(values: tuple[str, ...]) -> tuple[str, ...]:
    for text in values:
        _dns_server(text)
    return values


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value


def _hops(value: int) -> int:
    # RFC 3342 §6: the dataHopping count a relay writes, max_hops - 1, is 0..255; with
    # more, every data handed on would fail to be written (an internal error).
    if value > MAX_HOPS:
        raise ValueError(f"must be at most {MAX_HOPS}, got {value!r}")
    return _positive(value)


def _log_level(value: str) -> str:
    if value not in logs.LEVELS:
        raise ValueError(f"must be one of {', '.join(logs.LEVELS)}, got {value!r}")
    return value


def _window(value: int) -> int:
    # RFC 3081 §3.1.1: 4096 octets at least; the window is a 31-bit quantity (§3.1.4).
    if not 4096 <= value <= MAX_31:
        raise ValueError(f"must be between 4096 and {MAX_31}, got {value!r}")
    return value


def _message_size(value: int) -> int:
    # A greeting, a SASL exchange or a status report must fit: a relay allowing less
    # refuses logins with 554, which applications show as a failed authentication.
    if value < 4096:
        raise ValueError(f"must be at least 4096, got {value!r}")
    return value


def _option(
    default: Any,
    doc: str,
    *,
    check: Callable[[Any], Any] | None = None,
    path: bool = False,
    state_file: str | None = None,
    reload: bool = False,
) -> Any:
    """A :class:`Config` field that is an option (see :class:`OptionSpec`)."""
    metadata = {
        "option": {
            "doc": doc,
            "check": check,
            "path": path,
            "state_file": state_file,
            "reload": reload,
        }
    }
    if isinstance(default, Mapping):
        # dataclasses refuse a mapping as a shared default, even a read-only one.
        return field(default_factory=lambda: MappingProxyType(dict(default)), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """The relay's settings; ``Config()`` is the built-in default, a relay for localhost.

    ``state_dir`` is held as an absolute path: a relative one is resolved when the Config
    is made, against the directory of ``source`` (or the current directory without one).
    """

    domain: str = _option(
        "localhost",
        "The administrative domain this relay serves: endpoints attach as `local@domain`, "
        "and peers check that the relay's certificate names it.",
        check=_domain,
    )
    edge_listen: tuple[str, ...] = _option(
        ("tcp:9913:interface=127.0.0.1",),
        "Twisted server endpoint strings where endpoints connect (endpoint-relay mode, "
        "service `apex-edge`); in production `['tcp6:913:interface=\\:\\:']`, every IPv6 "
        "and (on Linux) IPv4 address, or `['tcp:913']` on a machine without IPv6. Not "
        "`ssl:` or `tls:`: TLS starts inside the BEEP session.",
        check=_endpoints,
    )
    mesh_listen: tuple[str, ...] = _option(
        ("tcp:9912:interface=127.0.0.1",),
        "Twisted server endpoint strings where other relays connect (relay-relay mode, "
        "service `apex-mesh`); in production `['tcp6:912:interface=\\:\\:']` as for "
        "`edge_listen`. Not `ssl:` or `tls:`: TLS starts inside the BEEP session. Either "
        "list may be empty, for a relay of one kind, but not both.",
        check=_endpoints,
    )
    state_dir: str = _option(
        "imxp-state",
        "Directory of the files made on first start (development CA, relay certificate, "
        "user file); created with mode 0700. Relative to the directory of the configuration "
        "file (the current directory when running without one).",
        check=_path,
        path=True,
    )
    tls_certificate: str | None = _option(
        None,
        "PEM file with the relay's certificate followed by its chain. Unset: a development "
        "certificate made on first start.",
        check=_path,
        path=True,
        state_file="relay.pem",
        reload=True,
    )
    tls_key: str | None = _option(
        None,
        "PEM file with the certificate's private key, unencrypted.",
        check=_path,
        path=True,
        state_file="relay.key",
        reload=True,
    )
    tls_trust: tuple[str, ...] = _option(
        (),
        "PEM bundles of the CAs that peers' certificates must chain to. Empty: only the "
        "development CA made on first start, which is made only while `tls_certificate` and "
        "`tls_key` are unset: with a certificate of your own, set this too.",
        check=_paths,
        path=True,
        state_file=DEVELOPMENT_CA,
        reload=True,
    )
    users_file: str | None = _option(
        None,
        "The SASL user file (SCRAM-SHA-256 verifiers, no passwords). Unset: created empty "
        "on first start.",
        check=_path,
        path=True,
        state_file="users",
    )
    control_socket: str | None = _option(
        None,
        "The Unix socket where `imxp status` and `imxp reload` reach the running relay, "
        "made with mode 0600: only the relay's user (and root) may use it. Unset: "
        "`control` in `state_dir`. If it cannot be made (a path longer than 107 octets, "
        "another relay using it), the relay logs why and runs without it.",
        check=_path,
        path=True,
        state_file="control",
    )
    sasl_mechanisms: tuple[str, ...] = _option(
        ("SCRAM-SHA-256", "PLAIN", "EXTERNAL"),
        "SASL mechanisms offered, in order of preference. PLAIN is offered only under TLS; "
        "EXTERNAL accepts the identity of a verified TLS client certificate, when it is a "
        "user in users_file. Empty (and allow_anonymous false): no endpoint can log in, "
        "for a relay that only relays.",
        check=_mechanisms,
    )
    allow_anonymous: bool = _option(
        False,
        "Also offer SASL ANONYMOUS (RFC 4505): peers may authenticate without an account. "
        "Such a login may attach as `anonymous@DOMAIN` or a subaddress of it "
        "(`anonymous/guest@DOMAIN`), never as an endpoint with an account, and its session "
        "still counts against `max_sessions_per_peer`.",
    )
    routes: Mapping[str, str] = _option(
        {},
        'Static next hops: a table from destination domain to `"host:port"` of the relay to '
        "use instead of DNS (port 912 if left out). A key `.example.org` covers every domain "
        "below example.org; a value ending in `=name` expects a certificate for `name` "
        "rather than for the destination domain.",
        check=_routes,
        reload=True,
    )
    smart_host: str = _option(
        "",
        '`"host:port"` of a relay that takes the traffic for every domain without a static '
        "route, instead of DNS (port 912 if left out); its certificate must name `host` (or "
        '`name` given as `"host:port=name"`). Empty: none.',
        check=_smart_host,
        reload=True,
    )
    dns_servers: tuple[str, ...] = _option(
        (),
        '`"address:port"` of the DNS servers asked for SRV records. Empty: the system\'s '
        "resolver configuration.",
        check=_dns_servers,
    )
    trusted_relays: tuple[str, ...] = _option(
        (),
        "Domains whose authenticated relays may relay data for any originator "
        "(RFC 3340 §4.5.2); relays of other domains may only send data from their own.",
        check=_domains,
        reload=True,
    )
    refuse_data: Mapping[str, tuple[str, ...]] = _option(
        {},
        "Access refusals (RFC 3340 §4.4.4.1 step 5.3): a table from a local endpoint to the "
        'originators it takes no data from, each an endpoint or `"@domain"` for a whole '
        'domain, e.g. `"fred@example.org" = ["@spam.test"]`. Such data gets 537, '
        "access denied; subaddresses share their endpoint's refusals.",
        check=_refusals,
        reload=True,
    )
    max_hops: int = _option(
        16,
        "The dataHopping limit (RFC 3342 §4) put on data entering the mesh here.",
        check=_hops,
        reload=True,
    )
    delivery_timeout: float = _option(
        60.0,
        "Seconds a recipient waits at this relay for its verdict: for its next hop to be "
        "found (DNS), then for that next hop's or its endpoint's answer. Past it, its "
        "failure is reported (451). After a reload, a shorter timeout also cuts the wait "
        "of the recipients already waiting to that many seconds from then.",
        check=_positive,
        reload=True,
    )
    connect_timeout: float = _option(
        30.0,
        "Seconds to wait for a connection to a peer relay.",
        check=_positive,
    )
    reconnect_max_delay: float = _option(
        300.0,
        "Longest wait, in seconds, between attempts to reach a peer relay (never more "
        "than `delivery_timeout`).",
        check=_positive,
        reload=True,
    )
    window: int = _option(
        131072,
        "BEEP receive window per channel, in octets (RFC 3081 §3.1.1; its default of 4096 "
        "is also the least allowed). A channel carries at most a window per round trip: "
        "128 KiB holds 64 one-KiB data in flight, or 2.5 MB/s to a peer 50 ms away.",
        check=_window,
    )
    max_message_size: int = _option(
        1048576,
        "Largest BEEP message accepted, in octets (4096 at least); a larger one is refused. "
        "From a peer that has not yet authenticated (with SASL, or a TLS certificate that "
        f"verified) it is the least of this, {TUNING_MESSAGE_SIZE // 1024} KiB and half of "
        "`window`: before login a peer needs room for TLS and SASL only.",
        check=_message_size,
    )
    max_queued: int = _option(
        16777216,
        "Octets that may wait to be written to one endpoint or next-hop relay, held back by "
        "its BEEP window while it does not read, or while the connection to it is being "
        "made. Data for it beyond that is refused for that recipient with 450, so that one "
        "peer that stops reading, or never answers, cannot fill the relay's memory.",
        check=_positive,
    )
    max_channels: int = _option(
        257,
        "BEEP channels a session may have open at once besides channel zero.",
        check=_positive,
    )
    max_sessions_per_peer: int = _option(
        32,
        "BEEP sessions one peer address may have open at once before they authenticate "
        "with SASL, counted separately on edge and mesh listeners; more are refused with "
        "421. A session that has logged in counts no longer, so that the endpoints behind "
        "one NAT address are not limited; relays, which authenticate by certificate, and "
        "anonymous logins always count.",
        check=_positive,
    )
    greeting_timeout: float = _option(
        30.0,
        "Seconds to wait for a new session's BEEP greeting.",
        check=_positive,
    )
    idle_timeout: float = _option(
        600.0,
        "Seconds a session may pass without traffic before it is closed.",
        check=_positive,
    )
    shutdown_grace: float = _option(
        10.0,
        "After SIGTERM: seconds that data already accepted gets to reach a verdict, while "
        "new data is refused with 421.",
        check=_positive,
    )
    log_level: str = _option(
        "info",
        "The least severe events logged: debug, info, warn, error or critical. At info "
        "every recipient's verdict at each relay is a line (event apex.verdict), which a "
        "busy relay spends a fifth of its time writing; warn leaves those out, refused "
        "recipients (550, 537) among them, and keeps refused requests (apex.refused: a "
        "whole data, attach or bind) and the relay's own troubles. The relay's start, reload, "
        "log-outs and stop (events imxp.*) are logged at every level.",
        check=_log_level,
        reload=True,
    )
    source: str | None = None
    """The file this configuration was read from; None for the built-in default."""

    def __post_init__(self) -> None:
        for spec in OPTIONS:
            value = _coerce(self.source, spec, getattr(self, spec.name))
            if spec.check is not None:
                try:
                    value = spec.check(value)
                except ValueError as e:
                    raise ConfigError(self.source, spec.name, str(e)) from None
            object.__setattr__(self, spec.name, value)
        if not self.edge_listen and not self.mesh_listen:
            # Either alone makes a relay of one kind; neither, one nobody can reach, which
            # would start and `imxp check` would pass.
            raise ConfigError(
                self.source,
                None,
                "options 'edge_listen' and 'mesh_listen' are both empty: the relay would "
                "listen for neither endpoints nor relays",
            )
        base = Path(self.source).parent if self.source is not None else Path.cwd()
        object.__setattr__(self, "state_dir", str(_resolve(base, self.state_dir)))

    def path(self, name: str) -> Path:
        """The file (or, for ``state_dir``, the directory) a path option names.

        Relative values and unset ones (the option's file in ``state_dir``) are resolved
        against ``state_dir``.
        """
        spec = _SPECS.get(name)
        if spec is None or not spec.path or spec.type == tuple[str, ...]:
            raise ValueError(f"{name!r} is not an option naming one path")
        state = Path(self.state_dir)
        if name == "state_dir":
            return state
        value = getattr(self, name)
        return _resolve(state, value if value is not None else spec.state_file)

    def paths(self, name: str) -> tuple[Path, ...]:
        """The files a list-of-paths option names; an empty list means its file in state_dir."""
        spec = _SPECS.get(name)
        if spec is None or not spec.path or spec.type != tuple[str, ...]:
            raise ValueError(f"{name!r} is not an option naming a list of paths")
        state = Path(self.state_dir)
        values = getattr(self, name) or (spec.state_file,)
        return tuple(_resolve(state, v) for v in values)


def _resolve(base: Path, path: str | os.PathLike[str]) -> Path:
    # abspath also folds "..", so that messages show the file the way a person would name it.
    return Path(os.path.abspath(base / path))


# -- types ------------------------------------------------------------------------------------


class _WrongType(Exception):
    """A value of the wrong type; the argument, if any, is a hint for the reader."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _WrongType
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _WrongType
    return value


def _integer(value: Any) -> int:
    # bool is a subclass of int; `true` is no integer.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _WrongType
    return value


def _number(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _WrongType
    if not math.isfinite(value):  # TOML has inf and nan
        raise _WrongType
    return float(value)


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _WrongType
    return tuple(value)


def _table_of_lists(value: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise _WrongType
    if not all(isinstance(k, str) for k in value):
        raise _WrongType
    return MappingProxyType({k: _strings(v) for k, v in value.items()})


def _table(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _WrongType
    if any(isinstance(v, Mapping) for v in value.values()):
        # An unquoted b.test = "..." is a dotted key in TOML: a table b with a key test.
        raise _WrongType('quote keys that contain dots, as in "b.test" = "..."')
    if not all(isinstance(v, str) for v in value.values()):
        raise _WrongType
    # Read-only, so that a frozen Config cannot be changed through it either.
    return MappingProxyType(dict(value))


# type -> (name in the reference, what an error says was expected, conversion)
_KINDS: dict[Any, tuple[str, str, Callable[[Any], Any]]] = {
    str: ("string", "a string", _string),
    str | None: ("string", "a string", _string),
    bool: ("boolean", "true or false", _boolean),
    int: ("integer", "an integer", _integer),
    float: ("number", "a number", _number),
    tuple[str, ...]: ("list of strings", "a list of strings", _strings),
    Mapping[str, str]: ("table of strings", "a table of strings", _table),
    Mapping[str, tuple[str, ...]]: (
        "table of string lists",
        "a table of lists of strings",
        _table_of_lists,
    ),
}


def _coerce(source: str | None, spec: OptionSpec, value: Any) -> Any:
    if value is None and spec.default is None:
        return None
    _name, expected, convert = _KINDS[spec.type]
    try:
        return convert(value)
    except _WrongType as e:
        hint = f" ({e})" if str(e) else ""
        raise ConfigError(source, spec.name, f"expected {expected}, got {value!r}{hint}") from None


def _options() -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(Config)
    return tuple(
        OptionSpec(f.name, hints[f.name], _default(f), **f.metadata["option"])
        for f in dataclasses.fields(Config)
        if "option" in f.metadata
    )


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


OPTIONS: tuple[OptionSpec, ...] = _options()
"""Every option, in the order of the reference."""

_SPECS = {spec.name: spec for spec in OPTIONS}


# -- loading ------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read a configuration file; None gives the built-in default (a relay for localhost).

    Options left out of the file keep their defaults.

    :raises ConfigError: the file cannot be read, is not TOML, has an unknown key, or a
        value of the wrong type or out of range.
    """
    if path is None:
        return Config()
    source = os.fspath(path)
    data = _read(source)
    for key in data:
        if key not in _SPECS:
            close = difflib.get_close_matches(key, _SPECS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(source, None, f"unknown option {key!r}{hint}")
    return Config(**data, source=source)


def control_socket(path: str | os.PathLike[str] | None) -> Path:
    """The control socket of the relay that the file at ``path`` configures (None: the
    built-in default's), from its ``state_dir`` and ``control_socket`` alone.

    ``imxp status`` and ``imxp reload`` need no more of it: a mistake elsewhere in a file
    being edited must not keep an operator from asking the relay what it is doing, and
    on reload the relay judges the whole file itself, and says what it refused.

    :raises ConfigError: the file cannot be read, is not TOML, or either option is wrong.
    """
    if path is None:
        return Config().path("control_socket")
    source = os.fspath(path)
    data = _read(source)
    where = {name: data[name] for name in ("state_dir", "control_socket") if name in data}
    return Config(**where, source=source).path("control_socket")


def _read(source: str) -> dict[str, Any]:
    """The TOML table in the file at ``source``."""
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, None, f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8 (TOML 1.0, "Spec"); a comment saved as Latin-1 is the usual cause.
        line = e.object[: e.start].count(b"\n") + 1
        octet = e.object[e.start]
        raise ConfigError(
            source, None, f"not UTF-8 (TOML files are): octet {octet:#04x} on line {line}"
        ) from None
    return data


def session_config(config: Config) -> SessionConfig:
    """The BEEP session limits ``config`` asks for."""
    return SessionConfig(
        window=config.window,
        max_message_size=config.max_message_size,
        max_channels=config.max_channels,
        greeting_timeout=config.greeting_timeout,
        idle_timeout=config.idle_timeout,
    )


def offered_mechanisms(config: Config) -> list[str]:
    """The SASL mechanisms to offer, in order: ``sasl_mechanisms``, then ANONYMOUS if allowed."""
    return [*config.sasl_mechanisms, *(["ANONYMOUS"] if config.allow_anonymous else [])]


def resolver_addresses(config: Config) -> list[tuple[str, int]]:
    """``dns_servers`` as the (address, port) pairs ``twisted.names.client`` takes."""
    return [_dns_server(text) for text in config.dns_servers]


# -- documentation ------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    """``value`` written as TOML (for the simple values options have)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of these characters is a TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def reference_markdown() -> str:
    """The configuration reference (Markdown) that the README carries."""
    lines = [
        "Options are top-level keys of the TOML file; every one may be left out. `state_dir` "
        "is relative to the directory of the file, other relative paths are relative to "
        "`state_dir`.",
        "",
    ]
    for spec in OPTIONS:
        if spec.state_file is not None:
            default = f"`{spec.state_file}` in `state_dir`"
        else:
            default = f"`{_toml(spec.default)}`"
        doc = f"{spec.doc} A reload (SIGHUP) applies a change." if spec.reload else spec.doc
        lines.append(f"- **`{spec.name}`** ({spec.type_name}, default {default}): {doc}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
