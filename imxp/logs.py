"""The relay's own log events, with those below the configured level left out at the source.

Every :class:`~twisted.logger.Logger` of imxp sends its events to :data:`observer`, which
passes them on to twisted.logger's global publisher, and so to whatever twistd logs to,
unless they are less severe than :func:`set_level` asked for. twistd has no level of its
own, and its text observer spends 50-75 us formatting and writing each event: at ``info`` a
busy relay writes one ``apex.verdict`` line per recipient and hop, a fifth of its time
(bench/relay_chain.py). Left out here, an event costs about 7 us, and no observer sees it.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import implementer

__all__ = ["LEVELS", "observer", "set_level"]

#: The level names, least severe first, as the ``log_level`` option takes them.
LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error", "critical")


@implementer(ILogObserver)
class _AtLeast:
    """Passes on the events at or above a level."""

    def __init__(self) -> None:
        self.left_out: frozenset[LogLevel] = frozenset()

    def __call__(self, event: LogEvent) -> None:
        if event["log_level"] not in self.left_out:
            globalLogPublisher(event)


observer = _AtLeast()
"""The observer of every imxp logger."""


def set_level(name: str) -> None:
    """Log the events of level ``name`` (one of :data:`LEVELS`) and above, for the process."""
    least = LEVELS.index(name)
    observer.left_out = frozenset(LogLevel.levelWithName(n) for n in LEVELS[:least])


set_level("info")  # the log_level option's default
