"""The relay's own log events, with those below the configured level left out at the source.

Every logger of imxp is a :class:`Logger`, whose events go to twisted.logger's global
publisher, and so to whatever twistd logs to, unless they are less severe than
:func:`set_level` asked for. twistd has no level of its own, and its text observer spends
50-75 us formatting and writing each event: at ``info`` a busy relay writes one
``apex.verdict`` line per recipient and hop, a fifth of its time (bench/relay_chain.py). An
event of a level left out costs no more than the call to make it, and no observer sees it.

Many events carry text from the other side - a peer's error text, an application's answer -
whose control characters are escaped before any observer sees them: a newline there would
start a log line of the peer's making, an escape sequence would act on the terminal of
whoever reads the log.
"""

from __future__ import annotations

import re

from twisted.logger import LogLevel

from twisted import logger

__all__ = ["LEVELS", "Logger", "escape_controls", "logged", "set_level"]

#: The level names, least severe first, as the ``log_level`` option takes them.
LEVELS: tuple[str, ...] = ("debug", "info", "warn", "error", "critical")


def _below(name: str) -> frozenset[LogLevel]:
    """The levels less severe than ``name``."""
    return frozenset(LogLevel.levelWithName(n) for n in LEVELS[: LEVELS.index(name)])


# The levels left out: those below the log_level option's default until set_level is called.
_left_out = _below("info")


def logged(level: LogLevel) -> bool:
    """Whether events of ``level`` are logged: asked before building an event made for
    each data, whose fields cost more to build than the rest of what a relay does with a
    verdict. The relay process's own events (``imxp.*``) are logged at every level, so
    this guards none of them."""
    return level not in _left_out


class Logger(logger.Logger):
    """A :class:`twisted.logger.Logger` that drops an event of a level left out before
    building it: a relay makes one per recipient and hop, and building one costs more than
    the rest of a verdict."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        # The relay process's own few events (imxp.*: its start, reload, log-outs, stop)
        # are what an operator reads a quiet log for: never left out.
        if logged(level) or str(kwargs.get("event", "")).startswith("imxp."):
            for key, value in kwargs.items():
                # isprintable() is False for every character escape_controls takes, in C.
                if type(value) is str and not value.isprintable():
                    kwargs[key] = escape_controls(value)
            super().emit(level, format, **kwargs)


# C0 controls, DEL and the C1 controls, and the bidirectional overrides and isolates, which
# reorder what a reader sees (CVE-2021-42574); the second keeps newline and tab.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROLS_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str, *, lines: bool = False) -> str:
    """``text`` with each control character shown as an escape (``\\x1b``, ``\\u202e``),
    which says it was there and does nothing to what shows it: a terminal, a log reader.
    With ``lines``, newline and tab are left for text of several lines."""
    return (_CONTROLS_IN_LINES if lines else _CONTROLS).sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def set_level(name: str) -> None:
    """Log the events of level ``name`` (one of :data:`LEVELS`) and above, for the process,
    and the relay process's own (``imxp.*``) at every level."""
    global _left_out
    _left_out = _below(name)
