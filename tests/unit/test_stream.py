"""Unit tests of the stream reader's lifecycle, against an in-process scripted server."""

from __future__ import annotations

import json
import socket
import threading
import time

import structlog

from bridge.config import StreamConfig
from bridge.stream import State, StreamReader
from tests.support.hostile_server import Frame, HostileServer, Script


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
