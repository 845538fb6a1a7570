"""The sans-IO frame codec: RFC 3080 §2.2.1 data frames and RFC 3081 §3.1.3 SEQ frames."""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imxp.beep.frames import (
    ANS,
    ERR,
    MSG,
    NUL,
    RPY,
    SEQ,
    Frame,
    FrameError,
    FrameParser,
    SeqFrame,
    serialize_frame,
    serialize_seq,
)

MAX_31 = 2**31 - 1
MAX_32 = 2**32 - 1

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AnyFrame = Frame | SeqFrame


# --------------------------------------------------------------------------- strategies

u31 = st.integers(0, MAX_31)
u32 = st.integers(0, MAX_32)
# Mostly small numbers (realistic, and they shrink well), sometimes the extremes.
small_or_max_31 = st.one_of(st.integers(0, 20), u31, st.just(MAX_31))
small_or_max_32 = st.one_of(st.integers(0, 20), u32, st.just(MAX_32))
payloads = st.one_of(
    st.binary(max_size=64),
    # Payloads that look like frame syntax must not confuse the parser.
    st.lists(
        st.sampled_from([b"END\r\n", b"\r\n", b"MSG 0 1 . 0 0\r\n", b"SEQ 0 0 0\r\n", b"x"]),
        max_size=8,
    ).map(b"".join),
)


@st.composite
def data_frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from([MSG, RPY, ERR, ANS, NUL]))
    channel = draw(small_or_max_31)
    msgno = draw(small_or_max_31)
    seqno = draw(small_or_max_32)
    if kind == NUL:
        # §2.2.1.1: a NUL frame is final and empty.
        return Frame(kind, channel, msgno, False, seqno, b"")
    ansno = draw(small_or_max_31) if kind == ANS else None
    return Frame(kind, channel, msgno, draw(st.booleans()), seqno, draw(payloads), ansno)


seq_frames = st.builds(SeqFrame, small_or_max_31, small_or_max_32, small_or_max_31)
any_frames: st.SearchStrategy[AnyFrame] = st.one_of(data_frames(), seq_frames)


# --------------------------------------------------------------------------- helpers


def serialized(frames: Iterable[AnyFrame]) -> bytes:
    return b"".join(f.serialize() for f in frames)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (duplicates and out-of-order offsets are fine)."""
    bounds = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    return [data[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def feed_chunks(parser: FrameParser, data: bytes, cuts: Iterable[int]) -> list[AnyFrame]:
    """Feed canonically serialised frames split at ``cuts``, checking ``buffered`` each time."""
    out: list[AnyFrame] = []
    fed = consumed = 0
    for chunk in split_at(data, cuts):
        got = parser.feed(chunk)
        fed += len(chunk)
        consumed += sum(len(f.serialize()) for f in got)
        out.extend(got)
        # Whatever is not yet a whole frame is held, nothing more and nothing less.
        assert parser.buffered == fed - consumed
    return out


def parse_all(data: bytes, max_payload: int = MAX_31) -> list[AnyFrame]:
    return FrameParser(max_payload).feed(data)


def feed_tolerating_errors(parser: FrameParser, chunks: Iterable[bytes]) -> list[AnyFrame]:
    """Feed until the parser raises :class:`FrameError`; any other exception propagates."""
    out: list[AnyFrame] = []
    try:
        for chunk in chunks:
            out.extend(parser.feed(chunk))
    except FrameError:
        pass
    for frame in out:
        assert isinstance(frame, Frame | SeqFrame)
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def octets_fed_until_error(parser: FrameParser, data: bytes) -> int:
    """Feed ``data`` one octet at a time; return how many octets it took to get FrameError."""
    for fed, piece in enumerate(bytewise(data), start=1):
        try:
            parser.feed(piece)
        except FrameError:
            return fed
        assert parser.buffered <= fed
    raise AssertionError(f"no FrameError after {len(data)} octets")


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(any_frames)
def test_any_frame_round_trips(frame: AnyFrame) -> None:
    parser = FrameParser()
    assert parser.feed(frame.serialize()) == [frame]
    assert parser.buffered == 0


@SETTINGS
@given(data_frames())
def test_serialize_frame_matches_the_abnf(frame: Frame) -> None:
    wire = serialize_frame(
        frame.kind, frame.channel, frame.msgno, frame.more, frame.seqno, frame.payload, frame.ansno
    )
    assert wire == frame.serialize()
    header, _, rest = wire.partition(b"\r\n")
    fields = header.split(b" ")
    expected = [
        frame.kind,
        str(frame.channel).encode(),
        str(frame.msgno).encode(),
        b"*" if frame.more else b".",
        str(frame.seqno).encode(),
        str(len(frame.payload)).encode(),
    ]
    if frame.ansno is not None:
        expected.append(str(frame.ansno).encode())
    assert fields == expected
    assert rest == frame.payload + b"END\r\n"


@SETTINGS
@given(seq_frames)
def test_serialize_seq_matches_the_abnf(frame: SeqFrame) -> None:
    wire = serialize_seq(frame.channel, frame.ackno, frame.window)
    assert wire == f"SEQ {frame.channel} {frame.ackno} {frame.window}\r\n".encode()
    assert wire == frame.serialize()


@SETTINGS
@given(st.lists(any_frames, max_size=30), st.data())
def test_stream_split_anywhere(frames: list[AnyFrame], data: st.DataObject) -> None:
    stream = serialized(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    assert feed_chunks(FrameParser(), stream, cuts) == frames


@settings(max_examples=100, deadline=None)
@given(st.lists(any_frames, min_size=1, max_size=10))
def test_stream_one_byte_at_a_time(frames: list[AnyFrame]) -> None:
    stream = serialized(frames)
    assert feed_chunks(FrameParser(), stream, range(1, len(stream))) == frames


def test_empty_feed_is_harmless() -> None:
    parser = FrameParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"MSG 0 1 . 0 3\r\nab") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"cEND\r\n") == [Frame(MSG, 0, 1, False, 0, b"abc")]
    assert parser.buffered == 0


def test_large_frame_in_64k_chunks() -> None:
    size = 10 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    small = Frame(RPY, 3, 4, False, size, b"after")
    stream = serialize_frame(MSG, 3, 4, True, 0, payload) + small.serialize()
    parser = FrameParser()
    chunk = 64 * 1024
    got: list[AnyFrame] = []
    for start in range(0, len(stream), chunk):
        piece = stream[start : start + chunk]
        frames = parser.feed(piece)
        if start + chunk < len(stream) - 100:
            assert frames == []
            assert parser.buffered == start + len(piece)
        got.extend(frames)
    assert len(got) == 2
    big = got[0]
    assert isinstance(big, Frame)
    assert (big.kind, big.channel, big.msgno, big.more, big.seqno) == (MSG, 3, 4, True, 0)
    assert big.payload == payload
    assert got[1] == small
    assert parser.buffered == 0


@pytest.mark.parametrize("read", [1, 2, 3])
def test_a_frame_arriving_in_tiny_reads_holds_memory_in_proportion_to_its_octets(
    read: int,
) -> None:
    """A peer can hand a frame over a few octets per TCP segment (or TLS record): what
    the parser holds of it until it is complete must be about its octets, not a bytes
    object and a list entry, 10 to 30 times as much, for each read."""
    size = 16384
    payload = b"x" * size
    stream = serialize_frame(MSG, 1, 0, False, 0, payload)
    header = stream.index(b"\r\n") + 2
    parser = FrameParser()
    assert parser.feed(stream[:header]) == []
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        end = header + size
        for at in range(header, end, read):
            assert parser.feed(stream[at : min(at + read, end)]) == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * size, f"{grown} octets held for {size} octets in {read}-octet reads"
    (frame,) = parser.feed(stream[header + size :])
    assert isinstance(frame, Frame) and frame.payload == payload


# --------------------------------------------------------------------------- garbage


@SETTINGS
@given(st.binary(max_size=300), st.data())
def test_random_bytes_give_frames_or_frame_error(junk: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(junk)), max_size=10), label="cuts")
    feed_tolerating_errors(FrameParser(), split_at(junk, cuts))


# Header-shaped junk reaches deeper into the parser than uniformly random bytes.
_tokens = st.sampled_from(
    [
        b"MSG", b"RPY", b"ERR", b"ANS", b"NUL", b"SEQ", b"msg", b"END", b"",
        b"0", b"1", b"20", b"2147483647", b"2147483648", b"4294967295", b"4294967296",
        b"99999999999", b"-1", b"+1", b"\xd9\xa1", b"\xc2\xb2", b"1_0",
        b".", b"*", b"x", b" ", b"\t", b"\r", b"\n", b"\r\n", b"END\r\n",
    ]
)  # fmt: skip
_separators = st.sampled_from([b" ", b" ", b" ", b"  ", b"", b"\t"])


@st.composite
def header_junk(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.tuples(_tokens, _separators), max_size=9))
    header = b"".join(t + s for t, s in parts).rstrip(b" ")
    tail = draw(st.one_of(st.just(b"\r\n"), _tokens))
    body = draw(st.binary(max_size=30))
    return header + tail + body + draw(st.sampled_from([b"END\r\n", b"", b"END\n", b"EN"]))


@SETTINGS
@given(st.lists(st.one_of(header_junk(), any_frames.map(lambda f: f.serialize())), max_size=6))
def test_header_shaped_junk_gives_frames_or_frame_error(pieces: list[bytes]) -> None:
    stream = b"".join(pieces)
    feed_tolerating_errors(FrameParser(max_payload=1000), [stream])
    feed_tolerating_errors(FrameParser(max_payload=1000), bytewise(stream))


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    frames = draw(st.lists(any_frames, min_size=1, max_size=5))
    stream = serialized(frames)
    i = draw(st.integers(0, len(stream) - 1))
    how = draw(st.sampled_from(["flip", "insert", "delete"]))
    if how == "flip":
        bit = 1 << draw(st.integers(0, 7))
        mutated = stream[:i] + bytes([stream[i] ^ bit]) + stream[i + 1 :]
    elif how == "insert":
        mutated = stream[:i] + bytes([draw(st.integers(0, 255))]) + stream[i:]
    else:
        mutated = stream[:i] + stream[i + 1 :]
    return stream, mutated


@SETTINGS
@given(mutated_streams(), st.data())
def test_mutated_frames_give_frames_or_frame_error(
    streams: tuple[bytes, bytes], data: st.DataObject
) -> None:
    _, mutated = streams
    cuts = data.draw(st.lists(st.integers(0, len(mutated)), max_size=8), label="cuts")
    whole = feed_tolerating_errors(FrameParser(), [mutated])
    split = feed_tolerating_errors(FrameParser(), split_at(mutated, cuts))
    # Chunking never changes the outcome: the split feed yields at least the frames the
    # whole-buffer feed yielded before any error (a whole feed that raises loses its batch).
    assert split[: len(whole)] == whole


# --------------------------------------------------------------------------- poorly formed

POORLY_FORMED: dict[str, bytes] = {
    # §2.2.1.1: the header starts with one of five keywords (SEQ is RFC 3081's).
    "unknown keyword": b"FOO 0 1 . 0 0\r\nEND\r\n",
    "lower-case keyword": b"msg 0 1 . 0 0\r\nEND\r\n",
    "keyword alone": b"MSG\r\nEND\r\n",
    "empty header": b"\r\nEND\r\n",
    "four-letter keyword": b"MSGS 0 1 . 0 0\r\nEND\r\n",
    # Parameters that cannot be determined.
    "missing size": b"MSG 0 1 . 0\r\nEND\r\n",
    "missing seqno and size": b"RPY 0 1 .\r\nEND\r\n",
    "extra parameter on MSG": b"MSG 0 1 . 0 0 0\r\nEND\r\n",
    "ansno on RPY": b"RPY 0 1 . 0 0 7\r\nEND\r\n",
    "ANS without ansno": b"ANS 1 0 . 0 0\r\nEND\r\n",
    "ANS with two ansnos": b"ANS 1 0 . 0 0 1 2\r\nEND\r\n",
    # Exactly one space separates components.
    "double space": b"MSG 0  1 . 0 0\r\nEND\r\n",
    "leading space": b" MSG 0 1 . 0 0\r\nEND\r\n",
    "trailing space": b"MSG 0 1 . 0 0 \r\nEND\r\n",
    "tab separator": b"MSG\t0 1 . 0 0\r\nEND\r\n",
    # Numbers are plain ASCII decimal.
    "leading plus": b"MSG +0 1 . 0 0\r\nEND\r\n",
    "minus": b"MSG 0 -1 . 0 0\r\nEND\r\n",
    "minus zero": b"MSG 0 1 . -0 0\r\nEND\r\n",
    "underscore (int() would accept it)": b"MSG 1_0 1 . 0 0\r\nEND\r\n",
    "hex": b"MSG 0x1 1 . 0 0\r\nEND\r\n",
    "exponent": b"MSG 0 1 . 1e3 0\r\nEND\r\n",
    "arabic-indic digit": "MSG \u0661 1 . 0 0\r\nEND\r\n".encode(),
    "fullwidth digit": "MSG 0 \uff11 . 0 0\r\nEND\r\n".encode(),
    "superscript digit": "MSG 0 1 . 0 \u00b2\r\nEND\r\n".encode(),
    # Ranges of §2.2.1.
    "channel 2^31": b"MSG 2147483648 1 . 0 0\r\nEND\r\n",
    "msgno 2^31": b"MSG 0 2147483648 . 0 0\r\nEND\r\n",
    "seqno 2^32": b"MSG 0 1 . 4294967296 0\r\nEND\r\n",
    "size 2^31": b"MSG 0 1 . 0 2147483648\r\nEND\r\n",
    # The ABNF says ansno = 0..2147483647 (the prose says 2^32-1); the codec follows the ABNF.
    "ansno 2^31": b"ANS 1 0 . 0 0 2147483648\r\nEND\r\n",
    "huge number": b"MSG 99999999999999999999 1 . 0 0\r\nEND\r\n",
    # The continuation indicator.
    "more is a comma": b"MSG 0 1 , 0 0\r\nEND\r\n",
    "more is a word": b"MSG 0 1 more 0 0\r\nEND\r\n",
    "more is doubled": b"MSG 0 1 ** 0 0\r\nEND\r\n",
    "more is a digit": b"MSG 0 1 0 0 0\r\nEND\r\n",
    # §2.2.1.3: the trailer.
    "lower-case trailer": b"MSG 0 1 . 0 3\r\nabcend\r\n",
    "trailer with bare LF": b"MSG 0 1 . 0 3\r\nabcEND\n\r\n",
    "payload longer than size": b"MSG 0 1 . 0 2\r\nabcEND\r\n",
    "payload shorter than size": b"MSG 0 1 . 0 4\r\nabcEND\r\nMSG 0 2 . 4 0\r\nEND\r\n",
    "garbage trailer": b"MSG 0 1 . 0 0\r\nXXXXX",
    # CRLF terminates the header.
    "bare LF after header": b"MSG 0 1 . 0 0\nEND\r\n",
    "bare CR after header": b"MSG 0 1 . 0 0\rEND\r\n",
    "CR CR LF": b"MSG 0 1 . 0 0\r\r\nEND\r\n",
    "LF CR": b"MSG 0 1 . 0 0\n\rEND\r\n",
    # §2.2.1.1, last rule.
    "NUL intermediate": b"NUL 1 0 * 0 0\r\nEND\r\n",
    "NUL with payload": b"NUL 1 0 . 0 1\r\nxEND\r\n",
    # RFC 3081 §3.1.3.
    "SEQ missing window": b"SEQ 0 0\r\n",
    "SEQ extra field": b"SEQ 0 0 0 0\r\n",
    "SEQ alone": b"SEQ\r\n",
    "SEQ double space": b"SEQ 0  0 0\r\n",
    "SEQ trailing space": b"SEQ 0 0 0 \r\n",
    "SEQ channel 2^31": b"SEQ 2147483648 0 0\r\n",
    "SEQ ackno 2^32": b"SEQ 0 4294967296 0\r\n",
    "SEQ window 2^31": b"SEQ 0 0 2147483648\r\n",
    "SEQ negative window": b"SEQ 0 0 -1\r\n",
    "SEQ with bare LF": b"SEQ 0 0 0\n",
    "SEQ with a payload": b"SEQ 0 0 0 5\r\nhelloEND\r\n",
}


@pytest.mark.parametrize("wire", POORLY_FORMED.values(), ids=POORLY_FORMED.keys())
def test_poorly_formed_frame_raises(wire: bytes) -> None:
    with pytest.raises(FrameError):
        FrameParser().feed(wire)


@pytest.mark.parametrize("wire", POORLY_FORMED.values(), ids=POORLY_FORMED.keys())
def test_poorly_formed_frame_raises_when_fed_bytewise(wire: bytes) -> None:
    octets_fed_until_error(FrameParser(), wire)


@pytest.mark.parametrize("wire", POORLY_FORMED.values(), ids=POORLY_FORMED.keys())
def test_poorly_formed_frame_after_a_good_one_raises(wire: bytes) -> None:
    parser = FrameParser()
    assert parser.feed(b"SEQ 0 0 4096\r\n") == [SeqFrame(0, 0, 4096)]
    with pytest.raises(FrameError):
        parser.feed(wire)


BOUNDARIES: dict[str, tuple[bytes, AnyFrame]] = {
    "all zero MSG": (b"MSG 0 0 . 0 0\r\nEND\r\n", Frame(MSG, 0, 0, False, 0, b"")),
    "all maxima MSG": (
        b"MSG 2147483647 2147483647 * 4294967295 0\r\nEND\r\n",
        Frame(MSG, MAX_31, MAX_31, True, MAX_32, b""),
    ),
    "all maxima ANS": (
        b"ANS 2147483647 2147483647 * 4294967295 0 2147483647\r\nEND\r\n",
        Frame(ANS, MAX_31, MAX_31, True, MAX_32, b"", MAX_31),
    ),
    "ANS zero": (b"ANS 0 0 . 0 0 0\r\nEND\r\n", Frame(ANS, 0, 0, False, 0, b"", 0)),
    "NUL final empty": (b"NUL 1 0 . 9 0\r\nEND\r\n", Frame(NUL, 1, 0, False, 9, b"")),
    "ERR": (b"ERR 5 6 . 7 2\r\nnoEND\r\n", Frame(ERR, 5, 6, False, 7, b"no")),
    "SEQ zero": (b"SEQ 0 0 0\r\n", SeqFrame(0, 0, 0)),
    "SEQ maxima": (b"SEQ 2147483647 4294967295 2147483647\r\n", SeqFrame(MAX_31, MAX_32, MAX_31)),
    "payload holding CRLF and END": (
        b"MSG 1 2 . 3 12\r\nEND\r\nEND\r\n\r\nEND\r\n",
        Frame(MSG, 1, 2, False, 3, b"END\r\nEND\r\n\r\n"),
    ),
}


@pytest.mark.parametrize(("wire", "frame"), BOUNDARIES.values(), ids=BOUNDARIES.keys())
def test_boundary_values_accepted(wire: bytes, frame: AnyFrame) -> None:
    assert parse_all(wire) == [frame]
    assert feed_chunks(FrameParser(), wire, range(1, len(wire))) == [frame]


def test_longest_legal_header_is_accepted() -> None:
    # 60 octets plus CRLF: every number at its maximum (size 2^31-1 is legal by default).
    wire = b"ANS 2147483647 2147483647 * 4294967295 2147483647 2147483647\r\n"
    parser = FrameParser()
    for piece in bytewise(wire):
        assert parser.feed(piece) == []
    assert parser.buffered == len(wire)
    assert parser.feed(b"abc") == []
    assert parser.buffered == len(wire) + 3


@pytest.mark.parametrize(
    "prefix",
    [b"MSG 0 1 . 0 ", b"", b"ANS 2147483647 2147483647 * 4294967295 2147483647 "],
    ids=["digits after a header start", "letters only", "after the longest legal prefix"],
)
def test_overlong_header_raises_before_100_bytes(prefix: bytes) -> None:
    filler = b"9" if prefix else b"A"
    assert octets_fed_until_error(FrameParser(), prefix + filler * 500) < 100


@SETTINGS
@given(st.binary(min_size=100, max_size=400).filter(lambda b: b"\n" not in b))
def test_any_crlf_free_run_raises_before_100_bytes(junk: bytes) -> None:
    assert octets_fed_until_error(FrameParser(), junk) < 100


def test_bare_lf_in_an_incomplete_header_raises_at_once() -> None:
    parser = FrameParser()
    assert parser.feed(b"MSG 0 1 . 0") == []
    with pytest.raises(FrameError):
        parser.feed(b" 0\n")


def test_size_over_max_payload_raises_once_the_header_is_complete() -> None:
    parser = FrameParser(max_payload=1000)
    # The header alone, no payload yet: the frame is refused before a byte of it is buffered.
    with pytest.raises(FrameError, match="1001"):
        parser.feed(b"MSG 1 1 . 0 1001\r\n")


def test_size_over_max_payload_raises_bytewise_at_the_crlf() -> None:
    parser = FrameParser(max_payload=1000)
    header = b"MSG 1 1 . 0 400000000\r\n"
    for piece in bytewise(header[:-1]):
        assert parser.feed(piece) == []
    with pytest.raises(FrameError):
        parser.feed(header[-1:])


def test_size_equal_to_max_payload_is_accepted() -> None:
    parser = FrameParser(max_payload=1000)
    assert parser.feed(b"MSG 1 1 . 0 1000\r\n") == []
    assert parser.feed(b"x" * 1000) == []
    assert parser.feed(b"END\r\n") == [Frame(MSG, 1, 1, False, 0, b"x" * 1000)]


def test_max_payload_does_not_limit_seq_windows() -> None:
    assert parse_all(b"SEQ 1 0 2147483647\r\n", max_payload=10) == [SeqFrame(1, 0, MAX_31)]


def test_frames_before_an_error_in_an_earlier_feed_are_delivered() -> None:
    parser = FrameParser()
    good = Frame(MSG, 0, 1, False, 0, b"hi")
    assert parser.feed(good.serialize() + b"MSG 0 2 . 2 ") == [good]
    with pytest.raises(FrameError):
        parser.feed(b"x\r\nEND\r\n")


# --------------------------------------------------------------------------- RFC 3080 examples

# §2.2: "a payload of 120 octets spread over 5 lines (each line is terminated with a CRLF
# pair)". Transcribed with the RFC's own indentation (three spaces before <profile>), the
# count is exactly 120; no adjustment was needed.
START_PAYLOAD = (
    b"Content-Type: application/beep+xml\r\n"
    b"\r\n"
    b"<start number='1'>\r\n"
    b"   <profile uri='http://iana.org/beep/SASL/OTP' />\r\n"
    b"</start>\r\n"
)


def test_rfc3080_2_2_start_frame() -> None:
    assert len(START_PAYLOAD) == 120
    wire = b"MSG 0 1 . 52 120\r\n" + START_PAYLOAD + b"END\r\n"
    expected = Frame(MSG, 0, 1, False, 52, START_PAYLOAD)
    assert parse_all(wire) == [expected]
    assert expected.serialize() == wire
    assert feed_chunks(FrameParser(), wire, range(1, len(wire))) == [expected]


def test_rfc3080_2_2_1_1_empty_payload_frame() -> None:
    # The RFC elides the 20 octets as "..."; any 20 octets do.
    first = b"     ...\r\n     ...\r\n"
    assert len(first) == 20
    wire = b"RPY 0 1 * 287 20\r\n" + first + b"END\r\nRPY 0 1 . 307 0\r\nEND\r\n"
    frames = parse_all(wire)
    assert frames == [
        Frame(RPY, 0, 1, True, 287, first),
        Frame(RPY, 0, 1, False, 307, b""),
    ]
    # §2.2.1.2: the next frame's seqno is this one's plus its size.
    assert 287 + 20 == 307


def test_rfc3080_2_2_1_1_interleaved_answers() -> None:
    # The RFC elides the payloads; these have the sizes of its headers.
    a0 = b"answer 0, part one\r\n"
    a1 = b"answer 1, complete\r\n"
    a0_end = b"part two\r\n"
    assert (len(a0), len(a1), len(a0_end)) == (20, 20, 10)
    wire = (
        b"ANS 1 0 * 0 20 0\r\n" + a0 + b"END\r\n"
        b"ANS 1 0 * 20 20 1\r\n" + a1 + b"END\r\n"
        b"ANS 1 0 . 40 10 0\r\n" + a0_end + b"END\r\n"
    )
    expected = [
        Frame(ANS, 1, 0, True, 0, a0, 0),
        Frame(ANS, 1, 0, True, 20, a1, 1),
        Frame(ANS, 1, 0, False, 40, a0_end, 0),
    ]
    assert parse_all(wire) == expected
    assert serialized(expected) == wire
    # The ANS exchange is completed by a NUL frame (§2.6.2), which the codec accepts too.
    assert parse_all(b"NUL 1 0 . 50 0\r\nEND\r\n") == [Frame(NUL, 1, 0, False, 50, b"")]


def test_rfc3081_seq_frame() -> None:
    # §3.1.3: SEQ SP channel SP ackno SP window CRLF, and nothing else: no payload, no trailer.
    wire = b"SEQ 1 4096 4096\r\nMSG 1 0 . 0 0\r\nEND\r\n"
    assert parse_all(wire) == [SeqFrame(1, 4096, 4096), Frame(MSG, 1, 0, False, 0, b"")]


# --------------------------------------------------------------------------- objects


def test_frame_equality_and_repr() -> None:
    a = Frame(ANS, 1, 2, True, 3, b"x", 4)
    assert a == Frame(ANS, 1, 2, True, 3, b"x", 4)
    assert a != Frame(ANS, 1, 2, True, 3, b"x", 5)
    assert a != Frame(ANS, 1, 2, False, 3, b"x", 4)
    assert a != SeqFrame(1, 2, 3)
    assert SeqFrame(1, 2, 3) != SeqFrame(1, 2, 4)
    assert "ANS" in repr(a) and "ansno=4" in repr(a)
    assert "window=3" in repr(SeqFrame(1, 2, 3))
    assert SEQ == b"SEQ"
