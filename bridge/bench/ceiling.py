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
"""

from __future__ import annotations

import argparse
import json
import signal
import time

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
    """Publishes pre-built messages through a window of unconfirmed ones, then stops."""

    def __init__(self, args: argparse.Namespace, events: list) -> None:
        self.args, self.events = args, events
        self.wire: list[bytes] = []
        self.next = 0                       # index of the next message to publish
        self.floor = 0                      # every tag up to this is confirmed
        self.unconfirmed: set[int] = set()
        self.result: dict = {}
        self.connection = pika.SelectConnection(
            pika.URLParameters(args.amqp_url), on_open_callback=self._on_open,
            on_open_error_callback=self._on_error, on_close_callback=self._on_closed)

    def run(self) -> None:
        self.connection.ioloop.start()
        if "confirmed_at" not in self.result:
            raise SystemExit(f"ceiling: the broker connection ended: {self.result.get('error')}")

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
        channel.confirm_delivery(self._on_confirm, callback=self._on_ready)

    def _on_ready(self, _frame) -> None:
        number, frame_max = self.channel.channel_number, self.connection.params.frame_max
        self.wire = [encode_publish(number, self.args.exchange, ev.routing_key, ev.body,
                                    message_id=f"ceiling-{i}", timestamp=int(ev.received_at),
                                    headers=ev.headers, frame_max=frame_max)
                     for i, ev in enumerate(self.events, 1)]
        self.result["started"] = time.time()
        self.cpu_start = time.process_time()
        write_json(self.args.out, self.result)
        self._pump()

    def _pump(self) -> None:
        if not ready_to_refill(len(self.unconfirmed), self.args.window, self.args.window):
            return
        while self.next < len(self.wire):
            room = self.args.window - len(self.unconfirmed)
            if room <= 0:
                return
            end = min(self.next + room, self.next + BATCH, len(self.wire))
            self.connection._output_marshaled_frames([b"".join(self.wire[self.next:end])])
            self.unconfirmed.update(range(self.next + 1, end + 1))   # delivery tags from 1
            self.next = end

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
        if self.next == len(self.wire) and not self.unconfirmed:
            self.result["confirmed_at"] = time.time()
            self.result["cpu_seconds"] = time.process_time() - self.cpu_start
            write_json(self.args.out, self.result)
            return self.connection.close()
        self._pump()


def broker_ceiling(args: argparse.Namespace) -> None:
    events = [classify(payload, at) for payload, at in read_events(args.stream_url, args.expect)]
    Publisher(args, [ev for ev in events if ev is not None]).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("kind", choices=("stream", "broker"))
    parser.add_argument("stream_url", help="ws://host/v1/events?token=KEY&user=USER")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--amqp-url")
    parser.add_argument("--exchange")
    parser.add_argument("--window", type=int, default=2000)
    args = parser.parse_args()
    (stream_ceiling if args.kind == "stream" else broker_ceiling)(args)
    # Stay until the benchmark stops us: an exited process has no memory figures to read.
    signal.pause()


if __name__ == "__main__":
    main()
