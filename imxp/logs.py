"""The relay's own log events, with those below the configured level left out at the source.

Every logger of imxp is a :class:`Logger`, whose events go to twisted.logger's global
publisher, and so to whatever twistd logs to, unless they are less severe than
:func:`set_level` asked for. twistd has no level of its own, and its text observer spends
50-75 us formatting and writing each event: at ``info`` a busy relay writes one
``apex.verdict`` line per recipient and hop, a fifth of its time (bench/relay_chain.py). An
event of a level left out costs no more than the call to make it, and no observer sees it.
"""

from __future__ import annotations

from twisted.logger import LogLevel

from twisted import logger

__all__ = ["LEVELS", "Logger", "set_level"]

#: The level names, least severe first, as the ``log_level`` option takes them.
LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error", "critical")

# The levels set_level leaves out.
_left_out: frozenset[LogLevel] = frozenset()


class Logger(logger.Logger):
    """A :class:`twisted.logger.Logger` that drops an event of a level left out before
    building it: a relay makes one per recipient and hop, and building one costs more than
    the rest of a verdict."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level not in _left_out:
            super().emit(level, format, **kwargs)


def set_level(name: str) -> None:
    """Log the events of level ``name`` (one of :data:`LEVELS`) and above, for the process."""
    global _left_out
    least = LEVELS.index(name)
    _left_out = frozenset(LogLevel.levelWithName(n) for n in LEVELS[:least])
