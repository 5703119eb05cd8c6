"""Unit tests of the frame parser (sans-IO: bytes in, frames out) and the reader's deadline."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bridge import frames
from bridge.frames import CONTINUATION, PING, TEXT, FrameParser, FrameReader, ProtocolError
from tests.support.hostile_server import frame_header


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    return frame_header(opcode, len(payload), fin) + payload


def parse_all(data: bytes, max_message: int = 1 << 20, step: int | None = None):
    parser, out = FrameParser(max_message), []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        parser.feed(chunk)
        while (got := parser.next()) is not None:
            out.append((got.opcode, got.payload, got.size, got.oversize))
    return out


def test_frames_come_out_whole_however_the_bytes_are_cut():
    data = frame(b"one") + frame(b"x" * 300) + frame(b"ping", PING) + frame(b"y" * 70_000)
    expected = [(TEXT, b"one", 3, False), (TEXT, b"x" * 300, 300, False),
                (PING, b"ping", 4, False), (TEXT, b"y" * 70_000, 70_000, False)]
    assert parse_all(data) == expected
    assert parse_all(data, step=1) == expected
    assert parse_all(data, step=7) == expected


def test_fragments_are_reassembled_with_a_ping_between():
    data = (frame(b'{"a":', fin=False) + frame(b"p", PING) + frame(b"1", CONTINUATION, False)
            + frame(b"}", CONTINUATION))
    assert parse_all(data) == [(PING, b"p", 1, False), (TEXT, b'{"a":1}', 7, False)]


def test_a_message_in_a_hundred_thousand_empty_fragments_is_one_message():
    """Iterative, not recursive: no RecursionError, whatever the fragment count."""
    data = (frame(b"head", fin=False) + frame(b"", CONTINUATION, False) * 100_000
            + frame(b"", CONTINUATION))
    assert parse_all(data) == [(TEXT, b"head", 4, False)]


def test_an_oversize_message_keeps_an_excerpt_and_the_true_size():
    data = frame(b"a" * 1000, fin=False) + frame(b"b" * 200_000, CONTINUATION) + frame(b"next")
    [(opcode, payload, size, oversize), after] = parse_all(data, max_message=500, step=4096)
    assert (opcode, size, oversize) == (TEXT, 201_000, True)
    assert payload == (b"a" * 1000 + b"b" * 200_000)[:frames.EXCERPT_KEEP]
    assert after == (TEXT, b"next", 4, False)


@pytest.mark.parametrize("data, message", [
    (bytes((0x81, 0x81)) + b"mask" + b"x", "masked"),
    (frame(b"", CONTINUATION), "unexpected continuation"),
    (frame(b"a", fin=False) + frame(b"b"), "unexpected continuation"),
    (frame(b"x" * 126, PING), "invalid control frame"),
    (frame(b"x", 0x3), "unknown opcode"),
])
def test_protocol_errors_are_raised_as_such(data, message):
    with pytest.raises(ProtocolError, match=message):
        parse_all(data)


def test_the_read_deadline_is_absolute_however_slowly_bytes_drip():
    """A frame fed a byte every 0.05 s: read(0.3) gives up after 0.3 s, not after the
    last byte (which would be 5 s away)."""
    ours, theirs = socket.socketpair()
    data = frame(b"z" * 100)
    stop = threading.Event()

    def drip():
        for byte in data:
            if stop.wait(0.05):
                return
            theirs.send(bytes((byte,)))
    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        reader = FrameReader(ours, 1 << 20)
        began = time.monotonic()
        assert reader.read(0.3) is None
        assert time.monotonic() - began < 2.5
    finally:
        stop.set()
        thread.join(5)
        ours.close()
        theirs.close()
