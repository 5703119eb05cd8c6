"""Unit tests of the stream reader's lifecycle, against an in-process scripted server."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

import structlog

from bridge.config import StreamConfig
from bridge.stream import State, StreamReader
from tests.support.hostile_server import Frame, HostileServer, Raw, Script, frame_header


class RecordingSink:
    """A StreamSink that remembers what it was told, and the reader's state then."""

    def __init__(self) -> None:
        self.reader: StreamReader | None = None
        self.calls: list[tuple[str, object]] = []
        self.lost_event = threading.Event()

    def authenticated(self, at: float) -> None:
        self.calls.append(("authenticated", self.reader.state))

    def frame(self, payload, binary, size, oversize, received_at) -> None:
        self.calls.append(("frame", payload))

    def flush(self) -> None:
        pass

    def lost(self, at: float, reason: str) -> None:
        self.calls.append(("lost", self.reader.state))
        self.lost_event.set()


def reader_for(url: str, sink: RecordingSink) -> StreamReader:
    config = StreamConfig(url=url, ping_interval=5, ping_timeout=5, reconnect_max=30)
    reader = StreamReader(config, sink, structlog.get_logger())
    sink.reader = reader
    return reader


def run_in_thread(reader: StreamReader) -> threading.Thread:
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    return thread


def test_after_a_loss_the_state_is_backoff_not_streaming():
    event = json.dumps({"type": "container", "action": "update"}).encode()
    sink = RecordingSink()
    with HostileServer([Script([Frame(event)], then="drop")], default=Script(auth=False)) as server:
        reader = reader_for(f"{server.url}/v1/events", sink)
        thread = run_in_thread(reader)
        assert sink.lost_event.wait(10)
        reader.stop()
        thread.join(10)
    assert sink.calls[:3] == [("authenticated", State.STREAMING), ("frame", event),
                              ("lost", State.BACKOFF)]
    assert reader.state is State.CLOSED


def test_stop_while_the_handshake_hangs_returns_at_once_and_authenticates_nothing():
    """The server accepts TCP and never answers the HTTP upgrade."""
    listener = socket.create_server(("127.0.0.1", 0))
    sink = RecordingSink()
    try:
        reader = reader_for(f"ws://127.0.0.1:{listener.getsockname()[1]}/v1/events", sink)
        thread = run_in_thread(reader)
        deadline = time.monotonic() + 10
        while reader.state is not State.CONNECTING and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)                 # into the handshake, which would last 10 s
        began = time.monotonic()
        reader.stop()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - began < 2
    finally:
        listener.close()
    assert sink.calls == []


def test_stop_while_waiting_for_the_auth_frame_reports_no_connection():
    sink = RecordingSink()
    with HostileServer([Script(auth=False)]) as server:
        reader = reader_for(f"{server.url}/v1/events", sink)
        thread = run_in_thread(reader)
        deadline = time.monotonic() + 10
        while reader.state is not State.AUTHENTICATING and time.monotonic() < deadline:
            time.sleep(0.01)
        began = time.monotonic()
        reader.stop()
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - began < 2
    assert sink.calls == []


class HoldingSink(RecordingSink):
    """Holds the reader in its first frame until released, as a full disk does."""

    def __init__(self) -> None:
        super().__init__()
        self.holding, self.release = threading.Event(), threading.Event()

    def frame(self, payload, binary, size, oversize, received_at) -> None:
        super().frame(payload, binary, size, oversize, received_at)
        if not self.holding.is_set():
            self.holding.set()
            self.release.wait(20)


def test_a_stop_held_past_its_close_deadline_still_hands_over_the_frames_read(monkeypatch):
    """Frames read from the socket are in the bridge's memory: when the sink held the
    reader at the stop (a full disk) and the server then never answers our Close, the
    sink still gets every one of them, in order, once the close deadline has passed;
    only what is still in the socket stays unread."""
    monkeypatch.setattr("bridge.stream.CLOSE_TIMEOUT", 0.2)
    events = [json.dumps({"type": "container", "n": i}).encode() for i in range(50)]
    sink = HoldingSink()
    # One write: the reader's first read takes all 50 (on loopback, one segment).
    with HostileServer([Script([Raw(b"".join(frame_header(1, len(e)) + e for e in events))])]) \
            as server:
        reader = reader_for(f"{server.url}/v1/events", sink)
        thread = run_in_thread(reader)
        assert sink.holding.wait(10)
        reader.stop()
        sink.release.set()
        thread.join(10)
    assert [p for kind, p in sink.calls if kind == "frame"] == events


@dataclass
class Spaced(Frame):
    """A frame sent `pause` seconds after the one before: shapes traffic only."""

    pause: float = 0.0

    def chunks(self):
        time.sleep(self.pause)
        yield from super().chunks()


class BatchSink(RecordingSink):
    """Also counts the frames handed over between flushes."""

    def __init__(self, expect: int) -> None:
        super().__init__()
        self.batches: list[int] = []
        self._open = 0
        self.expect = expect
        self.all_in = threading.Event()

    def frame(self, payload, binary, size, oversize, received_at) -> None:
        super().frame(payload, binary, size, oversize, received_at)
        self._open += 1

    def flush(self) -> None:
        if self._open:
            self.batches.append(self._open)
            self._open = 0
        if sum(self.batches) >= self.expect:
            self.all_in.set()


def paced_batches(gather: float, count: int, pause: float) -> list[int]:
    events = [json.dumps({"type": "container", "n": i}).encode() for i in range(count)]
    sink = BatchSink(count)
    with HostileServer([Script([Spaced(e, pause=pause) for e in events])]) as server:
        reader = reader_for(f"{server.url}/v1/events", sink)
        reader.pace(gather)
        thread = run_in_thread(reader)
        assert sink.all_in.wait(20)
        reader.stop()
        thread.join(10)
    assert [p for kind, p in sink.calls if kind == "frame"] == events   # all, in order
    return sink.batches


def test_a_paced_reader_takes_frames_that_come_fast_in_batches():
    # 40 frames over about 0.2 s, read at most every 0.1 s: a handful of batches.
    assert len(paced_batches(0.1, 40, 0.005)) <= 8
    # Unpaced, the same frames are read nearly one at a time.
    assert len(paced_batches(0.0, 40, 0.005)) >= 20


def test_a_paced_reader_reads_frames_further_apart_than_its_pace_at_once():
    assert paced_batches(0.1, 4, 0.3) == [1, 1, 1, 1]
