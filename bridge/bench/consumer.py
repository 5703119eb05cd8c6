"""The benchmark's worker: consumes the bench queue and times every simulator event.

It stands where a production worker stands (a durable queue bound with `#`), so a
bridge is measured up to the point a worker has the event. Each body's `sim_seq`
and `sim_sent_at` (added by `simulate --sequence`) give the delivery latency on the
same machine clock; messages without them (bridge.*, user-notifications) are skipped
and duplicates of a sequence number are counted once.

It writes a small progress file while it runs, and its results as JSON when it has
the expected count or gets SIGTERM/SIGINT. With `--bucket-seconds S` the results also
hold the latency percentiles of each S-second stretch of the wall clock (aligned to
multiples of S, so the harness's samples of the bridge line up with them):

    python -m bridge.bench.consumer --amqp-url URL --queue Q --expect N --out F

It shares the machine with what it measures, so it costs as little as it can: a
pika consumer spent 260-380 microseconds of CPU per message at 1,000 messages/s
(decoding every property table of a message whose body is all it reads), a third of
a core taken from the bridge under test. `BodyConsumer` speaks just enough AMQP 0-9-1
to consume one queue without acks and keeps the bodies; each body's stamp is read
from its tail, where `simulate --sequence` put it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import struct
import time
from array import array
from urllib.parse import parse_qs, unquote, urlsplit

import pika.frame
import pika.spec

PROGRESS_EVERY = 0.25  # seconds between progress-file writes
# What bridge.simulator.session.stamp appends to each event's JSON object.
_STAMP = re.compile(rb'"sim_seq": (\d+), "sim_sent_at": ([0-9.]+)\}$')


class Tally:
    """Counts unique sequence numbers and keeps each one's delivery latency."""

    def __init__(self, expect: int, bucket_seconds: float = 0.0) -> None:
        self.expect = expect
        self.seen = bytearray(expect + 1)
        self.latencies = array("d")
        self.bucket_seconds = bucket_seconds
        self.buckets: list[dict] = []
        self._bucket_start: float | None = None
        self._bucket = array("d")
        self.count = self.duplicates = self.foreign = 0
        self.first_sent = self.first_delivery = self.last_delivery = None

    def add(self, body: bytes, now: float) -> None:
        stamp = _STAMP.search(body, max(len(body) - 80, 0))
        if stamp is None:
            return  # not a simulator event: bridge.*, user-notifications
        seq, sent = int(stamp[1]), float(stamp[2])
        if not 0 < seq <= self.expect:
            self.foreign += 1
            return
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.count += 1
        self.latencies.append(now - sent)
        if self.bucket_seconds:
            start = math.floor(now / self.bucket_seconds) * self.bucket_seconds
            if start != self._bucket_start:
                self._close_bucket()
                self._bucket_start = start
            self._bucket.append(now - sent)
        self.first_sent = sent if self.first_sent is None else min(self.first_sent, sent)
        self.first_delivery = self.first_delivery or now
        self.last_delivery = now

    @property
    def done(self) -> bool:
        return self.count >= self.expect

    def _close_bucket(self) -> None:
        if self._bucket:
            self.buckets.append({"t": self._bucket_start, "events": len(self._bucket),
                                 **percentiles(self._bucket)})
        self._bucket = array("d")

    def results(self) -> dict:
        self._close_bucket()
        return {"count": self.count, "expect": self.expect, "duplicates": self.duplicates,
                "foreign": self.foreign, "first_sent": self.first_sent,
                "first_delivery": self.first_delivery, "last_delivery": self.last_delivery,
                "latency_ms": percentiles(self.latencies), "buckets": self.buckets}


def percentiles(latencies) -> dict:
    """p50, p99 and max of latencies in seconds, in milliseconds."""
    ordered = sorted(latencies)
    return {"p50": _ms(ordered, 0.50), "p99": _ms(ordered, 0.99), "max": _ms(ordered, 1.0)}


def _ms(ordered, q: float) -> float | None:
    """Nearest-rank percentile, in milliseconds."""
    if not ordered:
        return None
    return 1000 * ordered[max(1, math.ceil(q * len(ordered))) - 1]


_FRAME = struct.Struct(">BHI")       # type, channel, payload size
_METHOD = struct.Struct(">HH")       # class id, method id
_BODY_SIZE = struct.Struct(">Q")     # in a content header, after class id and weight
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
DELIVER = (60, 60)
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class ConsumerError(Exception):
    """The broker refused or ended the consumer; the message says how."""


class BodyConsumer:
    """One connection, one channel, one no-ack consumer: hands each body to `on_body`.

    Setup frames are built and decoded with pika's spec; deliveries are split into
    frames here, reading only what the body needs (a delivery is a method frame, a
    content header with the body's size, then body frames). A consumer without acks
    sends nothing while it consumes, so it sends heartbeats on its own clock, or the
    broker would close the connection as dead after two heartbeat intervals (the
    `heartbeat` of the URL's query if given, else the broker's).
    """

    def __init__(self, amqp_url: str, queue: str, on_body) -> None:
        url = urlsplit(amqp_url)
        self._sock = socket.create_connection((url.hostname or "localhost", url.port or 5672),
                                              timeout=10)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._on_body = on_body
        self._size = 0                  # the body being received: its size, and its parts
        self._parts: list[bytes] = []
        self._got = 0
        self._beat_every: float | None = None       # seconds between our heartbeats
        self._beat_due = 0.0
        user, password = unquote(url.username or "guest"), unquote(url.password or "guest")
        self._sock.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(pika.spec.Connection.Start)
        self._send(0, pika.spec.Connection.StartOk(
            client_properties={"product": "tutum-bridge bench consumer"}, mechanism="PLAIN",
            response=f"\0{user}\0{password}", locale="en_US"))
        tune = self._expect(pika.spec.Connection.Tune)
        asked = parse_qs(url.query).get("heartbeat")
        heartbeat = int(asked[0]) if asked else tune.heartbeat
        self._send(0, pika.spec.Connection.TuneOk(channel_max=1, frame_max=tune.frame_max,
                                                  heartbeat=heartbeat))
        if heartbeat:
            self._beat_every = heartbeat / 2
            self._beat_due = time.monotonic() + self._beat_every
        self._send(0, pika.spec.Connection.Open(virtual_host=unquote(url.path[1:]) or "/"))
        self._expect(pika.spec.Connection.OpenOk)
        self._send(1, pika.spec.Channel.Open())
        self._expect(pika.spec.Channel.OpenOk)
        self._send(1, pika.spec.Basic.Consume(queue=queue, no_ack=True))
        self._expect(pika.spec.Basic.ConsumeOk)

    def consume_until(self, deadline: float, done) -> None:
        """Hand over bodies until `deadline` (time.monotonic) or until `done()`."""
        while not done():
            now = time.monotonic()
            if self._beat_every and now >= self._beat_due:
                self._sock.sendall(_HEARTBEAT)
                self._beat_due = now + self._beat_every
            left = deadline - now
            if left <= 0:
                return
            self._sock.settimeout(min(left, self._beat_due - now) if self._beat_every else left)
            try:
                data = self._sock.recv(256 * 1024)
            except socket.timeout:
                continue
            if not data:
                raise ConsumerError("the broker closed the connection")
            self._buf += data
            self._split()

    def close(self) -> None:
        try:
            self._send(0, pika.spec.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0))
            self._sock.settimeout(1)
            self._expect(pika.spec.Connection.CloseOk)
        except (OSError, ConsumerError):
            pass
        self._sock.close()

    def _split(self) -> None:
        buf, pos, end = self._buf, 0, len(self._buf)
        while end - pos >= 8:
            kind, _channel, size = _FRAME.unpack_from(buf, pos)
            start = pos + 7
            if end - start < size + 1:
                break
            pos = start + size + 1
            if kind == BODY:
                self._parts.append(bytes(buf[start:start + size]))
                self._got += size
                if self._got >= self._size:
                    self._deliver()
            elif kind == HEADER:
                self._size = _BODY_SIZE.unpack_from(buf, start + 4)[0]
                if not self._size:
                    self._deliver()
            elif kind == METHOD and _METHOD.unpack_from(buf, start) != DELIVER:
                _, method = pika.frame.decode_frame(bytes(buf[start - 7:pos]))
                raise ConsumerError(f"the broker sent {method.method}")
            elif kind == HEARTBEAT:
                self._sock.sendall(_HEARTBEAT)
        del buf[:pos]

    def _deliver(self) -> None:
        body, self._parts, self._got = b"".join(self._parts), [], 0
        self._on_body(body)

    def _send(self, channel: int, method) -> None:
        self._sock.sendall(pika.frame.Method(channel, method).marshal())

    def _expect(self, kind):
        """The next method frame, which must be a `kind` (setup: nothing else comes)."""
        while True:
            consumed, frame = pika.frame.decode_frame(bytes(self._buf))
            if frame is None:
                data = self._sock.recv(65536)
                if not data:
                    raise ConsumerError(f"the broker closed the connection before {kind.NAME}")
                self._buf += data
                continue
            del self._buf[:consumed]
            if isinstance(frame, pika.frame.Heartbeat):
                continue
            method = getattr(frame, "method", None)
            if isinstance(method, kind):
                return method
            raise ConsumerError(f"expected {kind.NAME}, the broker sent {method}")


def write_json(path: str, data: dict) -> None:
    """Atomically, so the harness never reads half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--out", required=True, help="results JSON, written at the end")
    parser.add_argument("--progress", help="file rewritten with {count, at} while running")
    parser.add_argument("--ready-file", help="written once the consumer is registered")
    parser.add_argument("--bucket-seconds", type=float, default=0.0,
                        help="also give latency percentiles per stretch of this length")
    args = parser.parse_args()

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    tally = Tally(args.expect, args.bucket_seconds)
    try:
        consumer = BodyConsumer(args.amqp_url, args.queue, lambda body: tally.add(body, time.time()))
    except (OSError, ConsumerError) as exc:
        raise SystemExit(f"bench consumer: cannot consume {args.queue}: {exc}") from None
    if args.ready_file:
        write_json(args.ready_file, {"pid": os.getpid()})
    try:
        while not (tally.done or stop):
            consumer.consume_until(time.monotonic() + PROGRESS_EVERY, lambda: tally.done)
            if args.progress:
                write_json(args.progress, {"count": tally.count, "at": time.time()})
    except (OSError, ConsumerError) as exc:
        raise SystemExit(f"bench consumer: {args.queue}: {exc}") from None
    finally:
        write_json(args.out, tally.results())
        consumer.close()


if __name__ == "__main__":
    main()
