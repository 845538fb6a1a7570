"""Sans-IO BEEP frame codec: RFC 3080 §2.2.1 data frames and RFC 3081 §3.1.3 SEQ frames.

The parser is incremental: bytes may arrive split anywhere. It enforces the
syntactic rules of §2.2.1.1 (keyword, parameters and their ranges, single
spaces, CRLF) and §2.2.1.3 (the trailer), a NUL frame's shape, and a maximum
payload size so that a hostile header cannot make us buffer without bound.
The rules that need session state (channel exists, msgno bookkeeping, seqno
continuity, windows) are the session's, see :mod:`imxp.beep.session`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "ANS",
    "ERR",
    "MSG",
    "NUL",
    "RPY",
    "SEQ",
    "Frame",
    "FrameError",
    "FrameParser",
    "SeqFrame",
    "add_piece",
    "serialize_frame",
    "serialize_seq",
]

MSG = b"MSG"
RPY = b"RPY"
ERR = b"ERR"
ANS = b"ANS"
NUL = b"NUL"
SEQ = b"SEQ"

MAX_31 = 2147483647
MAX_32 = 4294967295
TRAILER = b"END\r\n"

# The longest legal header: "ANS" + 5 numbers of at most 10 digits + more + 6 spaces.
# Anything longer without a CRLF cannot be a header, so we give up early.
_MAX_HEADER = 3 + 1 + 10 + 1 + 10 + 1 + 1 + 1 + 10 + 1 + 10 + 1 + 10 + 2


# The usual frame in one match, CRLF included: numbers of at most 9 digits are in
# every range, so only the size needs a look. Anything else takes the general path.
_USUAL_HEADER = re.compile(
    rb"(MSG|RPY|ERR) ([0-9]{1,9}) ([0-9]{1,9}) ([.*]) ([0-9]{1,9}) ([0-9]{1,9})\r\n"
)

# The usual SEQ the same way: a number of 10 digits may be out of range, and takes the
# general path with every other.
_USUAL_SEQ = re.compile(rb"SEQ ([0-9]{1,9}) ([0-9]{1,9}) ([0-9]{1,9})\r\n")

# The general case in one match; anything it rejects goes through the careful,
# field-by-field checks that say exactly what is wrong.
_DATA_HEADER = re.compile(
    rb"(MSG|RPY|ERR|ANS|NUL) ([0-9]{1,10}) ([0-9]{1,10}) ([.*]) ([0-9]{1,10}) ([0-9]{1,10})"
    rb"(?: ([0-9]{1,10}))?"
)


# Pieces shorter than this are copied onto the end of the one before rather than kept as
# objects of their own. A bytes object and its place in a list cost some 50 octets besides
# its content, so a peer handing over a message in frames of a few octets (or a frame in
# reads of a few octets) made what it held 10 to 30 times its octets; a piece of this size
# or more costs about 5% more, and is kept as it came, uncopied.
_SMALL_PIECE = 1024


def add_piece(pieces: list[bytes | bytearray], data: bytes) -> None:
    """Add ``data`` to the pieces of a frame or message being gathered, which
    ``b"".join(pieces)`` makes whole once all have come: held in memory in proportion to
    their octets, however small the pieces they came in.

    The first piece is kept as it came, so that a message of one piece is never copied
    (``b"".join`` returns a lone bytes object itself)."""
    if not pieces or len(data) >= _SMALL_PIECE:
        pieces.append(data)
    elif type(pieces[-1]) is bytearray:
        # A bytearray grows by an eighth at a time: what it holds stays near its octets.
        pieces[-1] += data
    else:
        pieces.append(bytearray(data))


class FrameError(Exception):
    """A poorly formed frame (RFC 3080 §2.2.1.1): the session must end without a reply."""


class Frame(NamedTuple):
    """One data frame. ``more`` is True for an intermediate frame (``*``).

    A tuple, since a session makes one per frame received and a tuple is the
    cheapest object Python makes.
    """

    kind: bytes
    channel: int
    msgno: int
    more: bool
    seqno: int
    payload: bytes
    ansno: int | None = None

    def __repr__(self) -> str:
        ans = "" if self.ansno is None else f" ansno={self.ansno}"
        return (
            f"<Frame {self.kind.decode()} ch={self.channel} msgno={self.msgno}"
            f" {'*' if self.more else '.'} seq={self.seqno} size={len(self.payload)}{ans}>"
        )

    def serialize(self) -> bytes:
        return serialize_frame(
            self.kind, self.channel, self.msgno, self.more, self.seqno, self.payload, self.ansno
        )


# Frame's own __new__ is a Python function; the parser skips it.
_new_tuple = tuple.__new__


class SeqFrame:
    """A SEQ frame (RFC 3081 §3.1.3): the peer may send octets ackno .. ackno+window-1."""

    __slots__ = ("ackno", "channel", "window")

    def __init__(self, channel: int, ackno: int, window: int) -> None:
        self.channel = channel
        self.ackno = ackno
        self.window = window

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeqFrame):
            return NotImplemented
        return (self.channel, self.ackno, self.window) == (other.channel, other.ackno, other.window)

    def __repr__(self) -> str:
        return f"<SeqFrame ch={self.channel} ackno={self.ackno} window={self.window}>"

    def serialize(self) -> bytes:
        return serialize_seq(self.channel, self.ackno, self.window)


def serialize_frame(
    kind: bytes,
    channel: int,
    msgno: int,
    more: bool,
    seqno: int,
    payload: bytes,
    ansno: int | None = None,
) -> bytes:
    """Serialise a data frame; the caller guarantees the numbers are in range."""
    if ansno is None:
        header = b"%s %d %d %s %d %d\r\n" % (
            kind,
            channel,
            msgno,
            b"*" if more else b".",
            seqno,
            len(payload),
        )
    else:
        header = b"%s %d %d %s %d %d %d\r\n" % (
            kind,
            channel,
            msgno,
            b"*" if more else b".",
            seqno,
            len(payload),
            ansno,
        )
    return b"".join((header, payload, TRAILER))


def serialize_seq(channel: int, ackno: int, window: int) -> bytes:
    return b"SEQ %d %d %d\r\n" % (channel, ackno, window)


def _number(field: bytes, maximum: int, name: str) -> int:
    # bytes.isdigit() is ASCII-only, which rules out the signs, blanks and
    # underscores that int() would otherwise accept.
    if not field.isdigit() or len(field) > 10:
        raise FrameError(f"{name} {field[:16]!r} is not a decimal number")
    value = int(field)
    if value > maximum:
        raise FrameError(f"{name} {value} out of range 0..{maximum}")
    return value


class FrameParser:
    """Incremental parser. :meth:`feed` returns the frames completed by the new bytes.

    ``max_payload`` bounds a single frame's payload (the session passes the
    largest window it ever advertises, since RFC 3081 forbids a larger frame).
    Once a :class:`FrameError` has been raised the parser is unusable: the
    session is over.
    """

    __slots__ = ("_buffer", "_pending", "_pending_size", "_need", "max_payload")

    def __init__(self, max_payload: int = MAX_31) -> None:
        self.max_payload = max_payload
        self._buffer = b""
        # While a large frame trickles in, its chunks are kept in a list and
        # joined once, rather than re-copying a growing buffer per chunk.
        self._pending: list[bytes | bytearray] = []
        self._pending_size = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer) + self._pending_size

    def feed(self, data: bytes) -> list[Frame | SeqFrame]:
        if self._need:
            add_piece(self._pending, data)
            self._pending_size += len(data)
            if len(self._buffer) + self._pending_size < self._need:
                return []
            data = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
            self._need = 0
        buf = self._buffer + data if self._buffer else data
        frames: list[Frame | SeqFrame] = []
        pos = 0
        end = len(buf)
        find = buf.find
        usual = _USUAL_HEADER.match
        usual_seq = _USUAL_SEQ.match
        max_payload = self.max_payload
        while pos < end:
            m = usual(buf, pos)
            if m is not None:
                kind, f_channel, f_msgno, f_more, f_seqno, f_size = m.groups()
                size = int(f_size)
                channel = int(f_channel)
                msgno = int(f_msgno)
                more = f_more == b"*"
                seqno = int(f_seqno)
                ansno = None
                start = m.end()
                if size > max_payload:
                    m = None
            else:
                seq = usual_seq(buf, pos)
                if seq is not None:
                    frames.append(SeqFrame(int(seq[1]), int(seq[2]), int(seq[3])))
                    pos = seq.end()
                    continue
            if m is None:
                eol = find(b"\r\n", pos, pos + _MAX_HEADER)
                if eol < 0:
                    if end - pos >= _MAX_HEADER:
                        self._buffer = b""
                        raise FrameError("header too long or not terminated by CRLF")
                    # A bare LF inside a would-be header can never become valid.
                    if find(b"\n", pos) >= 0:
                        self._buffer = b""
                        raise FrameError("header not terminated by CRLF")
                    break
                fields = buf[pos:eol].split(b" ")
                kind = fields[0]
                if kind == SEQ:
                    frames.append(self._seq(fields))
                    pos = eol + 2
                    continue
                channel, msgno, more, seqno, size, ansno = self._general(buf, pos, eol, fields)
                start = eol + 2
            stop = start + size
            if stop + 5 > end:
                self._need = stop + 5 - pos
                break
            if buf[stop : stop + 5] != TRAILER:
                self._buffer = b""
                raise FrameError("payload not followed by the END trailer")
            frames.append(
                _new_tuple(Frame, (kind, channel, msgno, more, seqno, buf[start:stop], ansno))
            )
            pos = stop + 5
        self._buffer = buf[pos:] if pos < end else b""
        return frames

    def _seq(self, fields: list[bytes]) -> SeqFrame:
        if len(fields) != 4:
            self._buffer = b""
            raise FrameError("SEQ frame needs channel, ackno and window")
        try:
            return SeqFrame(
                _number(fields[1], MAX_31, "channel"),
                _number(fields[2], MAX_32, "ackno"),
                _number(fields[3], MAX_31, "window"),
            )
        except FrameError:
            self._buffer = b""
            raise

    def _general(
        self, buf: bytes, pos: int, eol: int, fields: list[bytes]
    ) -> tuple[int, int, bool, int, int, int | None]:
        """channel, msgno, more, seqno, size and ansno of any data frame header."""
        m = _DATA_HEADER.fullmatch(buf, pos, eol)
        if m is not None:
            kind, f_channel, f_msgno, f_more, f_seqno, f_size, f_ansno = m.groups()
            size = int(f_size)
            channel = int(f_channel)
            msgno = int(f_msgno)
            seqno = int(f_seqno)
            more = f_more == b"*"
            ansno = None if f_ansno is None else int(f_ansno)
            if not (
                size > self.max_payload
                or channel > MAX_31
                or msgno > MAX_31
                or seqno > MAX_32
                or (kind == ANS) != (ansno is not None)
                or (kind == NUL and (more or size))
                or (ansno is not None and ansno > MAX_31)
            ):
                return channel, msgno, more, seqno, size, ansno
        # The careful path names what is wrong.
        return self._header(fields[0], fields)

    def _header(
        self, kind: bytes, fields: list[bytes]
    ) -> tuple[int, int, bool, int, int, int | None]:
        """channel, msgno, more, seqno, size and ansno of a header, each checked."""
        try:
            if kind == ANS:
                if len(fields) != 7:
                    raise FrameError("ANS header needs 6 parameters")
                ansno: int | None = _number(fields[6], MAX_31, "ansno")
            elif kind in (MSG, RPY, ERR, NUL):
                if len(fields) != 6:
                    raise FrameError(f"{kind.decode()} header needs 5 parameters")
                ansno = None
            else:
                raise FrameError(f"unknown frame keyword {kind[:8]!r}")
            channel = _number(fields[1], MAX_31, "channel")
            msgno = _number(fields[2], MAX_31, "msgno")
            more_field = fields[3]
            if more_field == b".":
                more = False
            elif more_field == b"*":
                more = True
            else:
                raise FrameError(f"continuation indicator {more_field[:8]!r} is not '.' or '*'")
            seqno = _number(fields[4], MAX_32, "seqno")
            size = _number(fields[5], MAX_31, "size")
            if size > self.max_payload:
                raise FrameError(f"frame size {size} exceeds the limit of {self.max_payload}")
            if kind == NUL and (more or size):
                raise FrameError("NUL frame must be final and empty")
        except FrameError:
            self._buffer = b""
            raise
        return channel, msgno, more, seqno, size, ansno
