"""Benchmark of the BEEP frame codec (imxp.beep.frames), each figure beside a ceiling.

Measures, for MSG frames with 1 KiB payloads:

(a) parse rate: frames/s through ``FrameParser.feed`` when the wire bytes arrive in
    realistic 64 KiB chunks (frames straddle chunk boundaries, as they do off a socket).
    Ceiling: the least work anyone can do on the same bytes: slicing header and payload
    out of the same buffer at offsets computed in advance, with no searching, no
    validation and no objects beyond the slices.
(b) serialise rate: frames/s of ``serialize_frame`` for a 1 KiB payload with changing
    msgno/seqno. Ceiling: ``b"".join`` of a fixed, precomputed header, the payload and
    the trailer: the copy that any serialiser must do.

Each rate is the best of 5 timed repeats (``time.perf_counter``) after a warm-up; the
whole run takes a few seconds. The ratio figure/ceiling says how much of the floor cost
the codec adds; the target is the issue's: >= 200,000 frames/s on a 2-core machine.

Run by hand from the repository root (this is not a test)::

    python bench/beep_codec.py
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imxp.beep.frames import MSG, TRAILER, FrameParser, serialize_frame

PAYLOAD_SIZE = 1024
CHUNK = 64 * 1024
PARSE_FRAMES = 40_000  # about 42 MB of wire bytes per repeat
SERIALISE_FRAMES = 200_000
REPEATS = 5
TARGET = 200_000


def build_stream(count: int) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The wire bytes of ``count`` frames and, per frame, (header start, payload start, end)."""
    payload = bytes(range(256)) * (PAYLOAD_SIZE // 256)
    parts: list[bytes] = []
    offsets: list[tuple[int, int, int]] = []
    pos = seqno = 0
    for msgno in range(count):
        wire = serialize_frame(MSG, 1, msgno, False, seqno, payload)
        start = pos + len(wire) - len(payload) - len(TRAILER)
        offsets.append((pos, start, start + len(payload)))
        parts.append(wire)
        pos += len(wire)
        seqno += len(payload)
    return b"".join(parts), offsets


def best_of(run: Callable[[], int]) -> float:
    """Best frames/s over REPEATS timed runs, after one untimed warm-up run."""
    run()
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        frames = run()
        elapsed = time.perf_counter() - t0
        best = max(best, frames / elapsed)
    return best


def parse_rate(chunks: list[bytes], expected: int) -> float:
    def run() -> int:
        parser = FrameParser()
        feed = parser.feed
        count = 0
        for chunk in chunks:
            count += len(feed(chunk))
        assert count == expected and parser.buffered == 0
        return count

    return best_of(run)


def parse_ceiling(stream: bytes, offsets: list[tuple[int, int, int]]) -> float:
    def run() -> int:
        out = []
        append = out.append
        for head, start, stop in offsets:
            append((stream[head : start - 2], stream[start:stop]))
        return len(out)

    return best_of(run)


def serialise_rate(count: int) -> float:
    payload = b"x" * PAYLOAD_SIZE

    def run() -> int:
        seqno = 0
        for msgno in range(count):
            serialize_frame(MSG, 1, msgno, False, seqno, payload)
            seqno += PAYLOAD_SIZE
        return count

    return best_of(run)


def serialise_ceiling(count: int) -> float:
    payload = b"x" * PAYLOAD_SIZE
    prefix = b"MSG 1 123456 . 123456789 1024\r\n"
    join = b"".join

    def run() -> int:
        for _ in range(count):
            join((prefix, payload, TRAILER))
        return count

    return best_of(run)


def main() -> None:
    stream, offsets = build_stream(PARSE_FRAMES)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    rows = [
        (
            "parse, 1 KiB MSG frames in 64 KiB chunks",
            parse_rate(chunks, PARSE_FRAMES),
            parse_ceiling(stream, offsets),
        ),
        (
            "serialise, 1 KiB MSG frames",
            serialise_rate(SERIALISE_FRAMES),
            serialise_ceiling(SERIALISE_FRAMES),
        ),
    ]
    print(
        f"imxp BEEP codec benchmark: Python {platform.python_version()}"
        f" ({platform.python_implementation()}), {os.cpu_count()} CPUs, best of {REPEATS}"
    )
    print(f"{len(stream) / 1e6:.1f} MB parse stream, {len(chunks)} chunks of {CHUNK} octets")
    print()
    head = f"{'figure':<42} {'frames/s':>12} {'ceiling/s':>12} {'ratio':>6} {'target':>10}  ok"
    print(head)
    print("-" * len(head))
    for name, rate, ceiling in rows:
        ok = "yes" if rate >= TARGET else "NO"
        print(
            f"{name:<42} {rate:>12,.0f} {ceiling:>12,.0f} {rate / ceiling:>6.2f}"
            f" {TARGET:>10,}  {ok}"
        )
    print()
    print("ratio = figure / ceiling; ceiling = slicing at known offsets (parse) or a bare")
    print("b''.join of fixed header, payload and trailer (serialise), measured in this run.")


if __name__ == "__main__":
    main()
