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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from array import array

import pika

PROGRESS_EVERY = 0.25  # seconds between progress-file writes


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
        try:
            event = json.loads(body)
            seq, sent = int(event["sim_seq"]), float(event["sim_sent_at"])
        except (ValueError, KeyError, TypeError):
            return  # not a simulator event: bridge.*, user-notifications
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
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    channel.basic_consume(args.queue, lambda _ch, _m, _p, body: tally.add(body, time.time()),
                          auto_ack=True)
    if args.ready_file:
        write_json(args.ready_file, {"pid": os.getpid()})
    try:
        while not (tally.done or stop):
            connection.process_data_events(time_limit=PROGRESS_EVERY)
            if args.progress:
                write_json(args.progress, {"count": tally.count, "at": time.time()})
    finally:
        write_json(args.out, tally.results())
        connection.close()


if __name__ == "__main__":
    main()
