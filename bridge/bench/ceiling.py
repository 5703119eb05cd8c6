"""The limits the bridge is measured against: reading the stream, and publishing with pika.

Each ceiling is a child of the benchmark doing one half of the bridge's job and
nothing else, on the same simulator, broker, queue and consumer as the bridges:

    python -m bridge.bench.ceiling stream STREAM_URL --expect N --out F
    python -m bridge.bench.ceiling broker STREAM_URL --expect N --out F \
        --amqp-url URL --exchange X --window W

`stream`, the receive limit: websocket-client's handshake, then the bridge's own
chunked frame reader (bridge/frames.py, the fastest reader this project has; the
library's `recv` reads a frame in several small reads and costs four times the CPU),
counting frames and doing nothing with them. `--out` gets {first_sent, last_received, cpu_seconds}.

`broker`, the publish limit with pika: first, untimed, it reads the N events from the
simulator and classifies them (bridge/event.py), so the messages carry the bridge's
bodies, routing keys and headers, and builds every message's wire bytes (exactly what
pika's `basic_publish` writes for the bridge's persistent properties,
bridge/amqp_encode.py). Then, timed, it publishes them over one `SelectConnection`
with pipelined confirms and the bridge's window of unconfirmed messages, refilled as
the bridge refills it (bridge/confirms.py, `ready_to_refill`), each batch in one write.
`--out` gets {started} when publishing starts, then {confirmed_at, cpu_seconds} too.

    python -m bridge.bench.ceiling pipe STREAM_URL --expect N --out F \
        --amqp-url URL --exchange X --window W

`pipe`, the two halves chained: the least any bridge built on these libraries must do,
timed like a bridge (first send to last delivery, its CPU read from outside). One
thread, pika's ioloop, also watches the websocket: each frame read (the stream
ceiling's reader) is published at once as a persistent message of its own payload,
through the broker ceiling's window and writes, with no parse, no headers, one routing
key and no spool. The ceilings each have the machine to themselves; on this one the
halves of a bridge share it with the simulator, the broker and the consumer, and the
pipe says what rate that sharing leaves. `--out` gets {confirmed_at} at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections import deque

import pika
import websocket

from bridge import frames
from bridge.amqp_encode import encode_publish
from bridge.bench.consumer import write_json
from bridge.confirms import ready_to_refill
from bridge.event import classify

BATCH = 512                # messages per write, the bridge's read batch
MAX_FRAME = 1024 * 1024    # the bridge's default frame limit


def read_events(stream_url: str, expect: int):
    """(payload, received_at) of every frame after the auth frame, until `expect` events.

    Events are the frames `simulate --sequence` numbered; the others (the greeting's
    user notifications) are passed on too, as the bridge would publish them."""
    ws = websocket.create_connection(stream_url, skip_utf8_validation=True)
    reader = frames.FrameReader(ws.sock, MAX_FRAME)
    seen_auth, count = False, 0
    try:
        while count < expect:
            frame = reader.read(30.0)
            if frame is None:
                raise SystemExit(f"ceiling: no frame for 30 s after {count}/{expect}")
            if frame.opcode not in (frames.TEXT, frames.BINARY):
                continue
            if not seen_auth:
                seen_auth = True
                continue
            count += b'"sim_seq"' in frame.payload
            yield frame.payload, time.time()
    finally:
        ws.close()


def stream_ceiling(args: argparse.Namespace) -> None:
    first_sent = last_received = cpu_start = None
    for payload, received_at in read_events(args.stream_url, args.expect):
        if first_sent is None and b'"sim_seq"' in payload:
            first_sent, cpu_start = json.loads(payload)["sim_sent_at"], time.process_time()
        last_received = received_at
    write_json(args.out, {"first_sent": first_sent, "last_received": last_received,
                          "cpu_seconds": time.process_time() - cpu_start})


class Publisher:
    """Publishes messages through a window of unconfirmed ones, then stops.

    `waiting` holds the wire bytes of what is still to publish; `complete` says that
    nothing more will join it, so the last confirm ends the run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.waiting: deque[bytes] = deque()
        self.complete = False
        self.published = 0                  # the last delivery tag used
        self.floor = 0                      # every tag up to this is confirmed
        self.unconfirmed: set[int] = set()
        self.result: dict = {}
        self.connection = pika.SelectConnection(
            pika.URLParameters(args.amqp_url), on_open_callback=self._on_open,
            on_open_error_callback=self._on_error, on_close_callback=self._on_closed)

    def run(self) -> None:
        self.connection.ioloop.start()
        if "confirmed_at" not in self.result:
            raise SystemExit(f"ceiling: the run ended early: {self.result.get('error')}")

    def on_ready(self) -> None:
        """The channel is in confirm mode: begin."""
        raise NotImplementedError

    def encode(self, body: bytes, routing_key: str, message_id: str, timestamp: int,
               headers: dict) -> bytes:
        return encode_publish(self.channel.channel_number, self.args.exchange, routing_key,
                              body, message_id=message_id, timestamp=timestamp,
                              headers=headers, frame_max=self.connection.params.frame_max)

    def _on_open(self, connection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_error(self, _connection, error) -> None:
        self.result["error"] = repr(error)
        self.connection.ioloop.stop()

    def _on_closed(self, _connection, reason) -> None:
        self.result.setdefault("error", repr(reason))
        self.connection.ioloop.stop()

    def _on_channel(self, channel) -> None:
        self.channel = channel
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self.on_ready())

    def pump(self) -> None:
        if not ready_to_refill(len(self.unconfirmed), self.args.window, self.args.window):
            return
        waiting = self.waiting
        while waiting:
            room = min(self.args.window - len(self.unconfirmed), BATCH, len(waiting))
            if room <= 0:
                return
            self.connection._output_marshaled_frames(
                [b"".join([waiting.popleft() for _ in range(room)])])
            first = self.published + 1                                  # tags from 1
            self.published += room
            self.unconfirmed.update(range(first, self.published + 1))

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.result["error"] = f"nack of delivery tag {method.delivery_tag}"
            return self.connection.close()
        if method.multiple:
            for tag in range(self.floor + 1, method.delivery_tag + 1):
                self.unconfirmed.discard(tag)
            self.floor = max(self.floor, method.delivery_tag)
        else:
            self.unconfirmed.discard(method.delivery_tag)
        if self.complete and not self.waiting and not self.unconfirmed:
            self.result["confirmed_at"] = time.time()
            self.result["cpu_seconds"] = time.process_time() - self.cpu_start
            write_json(self.args.out, self.result)
            return self.connection.close()
        self.pump()


class BrokerCeiling(Publisher):
    """Publishes the bridge's messages, built beforehand, as fast as the window allows."""

    def __init__(self, args: argparse.Namespace, events: list) -> None:
        super().__init__(args)
        self.events = events

    def on_ready(self) -> None:
        self.waiting.extend(self.encode(ev.body, ev.routing_key, f"ceiling-{i}",
                                        int(ev.received_at), ev.headers)
                            for i, ev in enumerate(self.events, 1))
        self.complete = True
        self.result["started"] = time.time()
        self.cpu_start = time.process_time()
        write_json(self.args.out, self.result)
        self.pump()


class Pipe(Publisher):
    """Publishes each frame as it is read, on the ioloop's thread: nothing in between."""

    ROUTING_KEY = "pipe.ceiling"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.ws = websocket.create_connection(args.stream_url, skip_utf8_validation=True)
        self.sock = self.ws.sock
        self.parser = frames.FrameParser(MAX_FRAME)
        self.seen_auth, self.count = False, 0

    def on_ready(self) -> None:
        self.cpu_start = time.process_time()
        self.sock.setblocking(False)
        ioloop = self.connection.ioloop
        ioloop.add_handler(self.sock.fileno(), self._on_readable, ioloop.READ)
        self._on_readable()              # frames that came with the handshake

    def _on_readable(self, _fd=None, _events=None) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        if not data:
            self.result["error"] = f"the stream closed after {self.count} events"
            return self.connection.close()
        self.parser.feed(data)
        while (frame := self.parser.next()) is not None:
            if frame.opcode not in (frames.TEXT, frames.BINARY):
                continue
            if not self.seen_auth:
                self.seen_auth = True
                continue
            self.count += b'"sim_seq"' in frame.payload
            self.waiting.append(self.encode(frame.payload, self.ROUTING_KEY,
                                            f"pipe-{self.published + len(self.waiting) + 1}",
                                            int(time.time()), {}))
        if self.count >= self.args.expect:
            self.complete = True
            self.connection.ioloop.remove_handler(self.sock.fileno())
        self.pump()


def broker_ceiling(args: argparse.Namespace) -> None:
    events = [classify(payload, at) for payload, at in read_events(args.stream_url, args.expect)]
    BrokerCeiling(args, [ev for ev in events if ev is not None]).run()


def pipe_ceiling(args: argparse.Namespace) -> None:
    Pipe(args).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("kind", choices=("stream", "broker", "pipe"))
    parser.add_argument("stream_url", help="ws://host/v1/events?token=KEY&user=USER")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--amqp-url")
    parser.add_argument("--exchange")
    parser.add_argument("--window", type=int, default=2000)
    args = parser.parse_args()
    {"stream": stream_ceiling, "broker": broker_ceiling, "pipe": pipe_ceiling}[args.kind](args)
    # Stay until the benchmark stops us: an exited process has no memory figures to read.
    signal.pause()


if __name__ == "__main__":
    main()
