"""``twistd imxp``: the command-line options and the service maker of the relay.

The plugin in ``twisted/plugins/imxp_plugin.py`` points twistd here. The configuration is
read, checked and prepared (:func:`imxp.bootstrap.prepare`) while the options are parsed:
twistd reports a :class:`~twisted.python.usage.UsageError` from there by printing the usage
text and then ``twistd: <message>`` as the last line, and exits with status 1 before it
daemonises. An exception from :func:`makeService` would end twistd with a traceback instead.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pwd
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage

from imxp import logs
from imxp.bootstrap import Prepared, load_tls, prepare
from imxp.config import OPTIONS, Config, ConfigError, load

if TYPE_CHECKING:
    from twisted.application.service import IService

    from imxp.apex.service import RelayService

__all__ = ["Options", "makeService"]

log = logs.Logger(namespace="imxp.bootstrap")


class Options(usage.Options):
    """``twistd imxp [--config FILE]``."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run an imxp relay: APEX (RFC 3340) over BEEP (RFC 3080). Without --config it serves "
        "the domain localhost on loopback ports, with a development certificate made on first "
        "start."
    )
    optParameters: ClassVar[list[list[object]]] = [
        ["config", "c", None, "The TOML configuration file.", str],
    ]

    config: Config
    """Set by :meth:`postOptions`."""
    prepared: Prepared
    """Set by :meth:`postOptions`: the relay's files, created on first start and loaded."""

    def postOptions(self) -> None:
        """Load the configuration and prepare the state directory (UsageError if unusable).

        Log events emitted here (what the first start created) are kept by twisted.logger
        until twistd starts logging, and then written to its log.
        """
        try:
            self.config = load(self["config"])
            logs.set_level(self.config.log_level)
            self.prepared = prepare(self.config, log, owner=self._runs_as())
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["config"] is not None:
            # Read again on reload, after twistd has changed to its --rundir.
            self["config"] = os.path.abspath(self["config"])

    def _runs_as(self) -> tuple[int, int] | None:
        """(uid, gid) that twistd switches to after starting (``--uid``, ``--gid``), or None.

        twistd parses its own options before ours and hangs them on ``parent``; like
        twistd, a uid without a gid means that user's primary group.
        """
        parent = getattr(self, "parent", None)
        uid = parent.get("uid") if parent is not None else None
        if uid is None:
            return None
        gid = parent.get("gid")
        return uid, gid if gid is not None else pwd.getpwuid(uid).pw_gid


def makeService(options: Options) -> IService:
    """The relay service for the configuration ``options`` carries."""
    # Imported here rather than at the top, so that `twistd imxp --help` and the reporting of
    # configuration errors do not load the relay engine and everything it uses.
    from twisted.internet import reactor

    from imxp.apex.service import make_relay_service

    relay = make_relay_service(options.config, prepared=options.prepared)
    # What exists when the reactor starts (modules, certificates, configuration) lives as
    # long as the process. Frozen, it is left out of garbage collections: each full one
    # walked all of it, a pause of about 40 ms that showed in the relay's p99 latency.
    reactor.callWhenRunning(gc.freeze)
    reload = _Reloader(options, relay)
    # Now, not once the reactor runs: twistd writes the pid file and opens the listeners
    # before then, and until a handler is in place SIGHUP or SIGUSR1 ends the process (for
    # systemd, SIGHUP cleanly: Restart=on-failure leaves it stopped). Either waits for the
    # reactor (callFromThread), so one sent meanwhile acts once the relay runs.
    _reload_on_sighup(reactor, reload)
    _status_on_sigusr1(reactor, relay)
    # Once twistd has shed its privileges (--uid): the socket is the relay user's.
    reactor.callWhenRunning(_control, reactor, options.config, relay, reload)
    reactor.addSystemEventTrigger("before", "shutdown", _stopping_already, reactor, relay)
    return relay


def _stopping_already(reactor: Any, relay: RelayService) -> None:
    """Once the relay is stopping, SIGTERM or SIGINT again only says so in the log (README,
    Stopping). twistd's handler would ask the stopping reactor to stop again, which logs
    ReactorNotRunning as a critical traceback; and the data in flight keeps its grace."""
    from imxp.apex.service import STOP_AFTER_GRACE

    def again(signum: int, frame: object) -> None:
        reactor.callFromThread(
            relay.log.warn,
            "{signal} again: the relay is already stopping; data in flight has up to "
            "{grace:g} s from the first signal (shutdown_grace), closing at most {last:g} s "
            "more; SIGKILL would stop it at once, unreported",
            signal=signal.Signals(signum).name,
            grace=relay.shutdown_grace,
            last=STOP_AFTER_GRACE,
            event="imxp.stopping",
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, again)


class _Reloader:
    """Reads the configuration file and the TLS files it names again, as mail and chat
    servers do on reload: a renewed certificate is used from the next session on, and
    changed routes, smart host, trusted relays, access refusals, hop limit, delivery
    timeout, reconnect backoff and log level from the next data on, without a restart
    (:func:`imxp.apex.service.reconfigure`). An option that takes a restart (a listening
    address, say) is named in a warning and left as it was; a file that cannot be used
    changes nothing. Called with what asked for it (SIGHUP, ``imxp reload``), it returns
    whether the relay reloaded and what it logged."""

    def __init__(self, options: Options, relay: RelayService) -> None:
        self.options = options
        self.relay = relay
        self.started = self.current = options.config

    def __call__(self, trigger: str) -> tuple[bool, str]:
        from imxp.apex.service import reconfigure

        try:
            loaded = load(self.options["config"])
            later = [
                s.name for s in OPTIONS if not s.reload and _differs(self.started, loaded, s.name)
            ]
            # Until the restart the relay goes on as it started, and so do the files it
            # reads: those of the state_dir and domain it started with.
            config = dataclasses.replace(
                loaded, **{name: getattr(self.started, name) for name in later}
            )
            with capturedLogs() as events:
                identity, trust = load_tls(config, log)
            reconfigure(self.relay, config, identity, trust)
        except (ConfigError, ValueError) as e:
            return False, _logged(
                log.error,
                "{trigger}: not reloaded, the relay goes on as it was: {error}",
                trigger=trigger,
                error=str(e),
                event="imxp.reload-failed",
            )
        applied = [s.name for s in OPTIONS if s.reload and _differs(self.current, config, s.name)]
        self.current = config
        source = config.source or "the built-in configuration"
        said = _logged(
            log.info,
            "{trigger}: reloaded {source}: the relay certificate {path} (valid until {expires}) "
            "and {roots} trusted CAs for new sessions; {applied}",
            trigger=trigger,
            source=source,
            path=str(config.path("tls_certificate")),
            expires=identity.certificate.not_valid_after_utc.isoformat(),
            roots=len(trust),
            applied=f"changed: {', '.join(applied)}" if applied else "no option changed",
            event="imxp.reloaded",
        )
        # What load_tls warned of (a certificate that does not name the domain, or that
        # expires soon) goes to the one who asked too.
        for event in events:
            if event["log_level"] >= LogLevel.warn:
                said += "\n" + formatEvent(event)
        if later:
            said += "\n" + _logged(
                log.warn,
                "{trigger}: {options} changed in {source}, which takes a restart; until then "
                "the relay goes on as it started",
                trigger=trigger,
                options=", ".join(later),
                source=source,
                event="imxp.reload-restart-needed",
            )
        return True, said


def _logged(emit: Callable[..., None], format: str, **fields: Any) -> str:
    """Log an event, and return its text for the one who asked (``imxp reload``)."""
    emit(format, **fields)
    return formatEvent({"log_format": format, **fields})


def _reload_on_sighup(reactor: Any, reload: _Reloader) -> None:
    """On SIGHUP, reload (:class:`_Reloader`). Without this, SIGHUP would end the relay on
    the spot, dropping what it had accepted."""
    # A signal handler runs between any two bytecodes; the reload waits for the reactor.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload, "SIGHUP"))


def _status_on_sigusr1(reactor: Any, relay: RelayService) -> None:
    """On SIGUSR1, log what the relay is doing (:meth:`RelayService.log_status`): sessions,
    attached endpoints, data in flight, and each next hop's link or trouble. Python's
    default for SIGUSR1 would end the relay on the spot."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(relay.log_status))


def _control(reactor: Any, config: Config, relay: RelayService, reload: _Reloader) -> None:
    """The control socket, for ``imxp status`` and ``imxp reload`` (:mod:`imxp.control`)."""
    from imxp import control

    factory = control.ControlFactory(lambda: dataclasses.asdict(relay.status()), reload)
    defer.ensureDeferred(control.listen(reactor, config.path("control_socket"), factory))


def _differs(old: Config, new: Config, name: str) -> bool:
    return bool(getattr(old, name) != getattr(new, name))
