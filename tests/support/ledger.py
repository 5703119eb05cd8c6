"""The books of a fault test: what the simulator sent against what the broker holds.

The simulator's `--sequence` stamps every event with `sim_seq` (1, 2, 3, ... across
connections), so a queue bound to `#` tells exactly which events arrived, how often,
and in which order. `compute` turns that into the figures the delivery guarantee
(docs/contract.md section 4) is about; `Ledger.report` prints them (visible with `pytest -s`) and appends
them as a JSON line to `$FAULT_REPORT` when set, so a write-up can quote real runs.

A duplicate is allowed only when the bridge said it might be one: every copy of an
event after the first must carry `x-republished: true`. Copies that do not are
counted apart (`unexplained_duplicates`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import pika


@dataclass
class Message:
    routing_key: str
    body: bytes
    headers: dict
    message_id: str | None
    seq: int | None            # sim_seq of an upstream event; None for bridge.* and others

    @property
    def republished(self) -> bool:
        return bool(self.headers.get("x-republished"))

    def json(self) -> dict:
        return json.loads(self.body)


def _message(routing_key: str, props: pika.BasicProperties, body: bytes) -> Message:
    seq = None
    if not routing_key.startswith("bridge."):
        try:
            seq = json.loads(body).get("sim_seq")
        except (ValueError, AttributeError):
            seq = None
    return Message(routing_key, body, dict(props.headers or {}), props.message_id, seq)


class Collector:
    """Consumes a queue on a thread of its own (basic_consume: tens of thousands of
    messages take seconds, not minutes) and keeps every message in arrival order.
    Reconnects if its broker goes away, so a broker restart loses it nothing that
    the queue kept."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.messages: list[Message] = []
        self.errors: list[str] = []
        self._seqs: set[int] = set()
        self._ids: set[str | None] = set()
        self._stop = threading.Event()
        self._last_arrival = time.monotonic()
        self._unacked = 0
        self._thread = threading.Thread(target=self._run, name=f"collect-{queue}", daemon=True)

    def __enter__(self) -> "Collector":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Collector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.url))
                try:
                    ch = conn.channel()
                    ch.basic_qos(prefetch_count=5000)
                    ch.basic_consume(self.queue, self._on_message)
                    self._unacked = 0
                    while not self._stop.is_set():
                        conn.process_data_events(time_limit=0.1)
                        # One multiple-ack per pass: an ack per message would halve the rate.
                        if self._unacked:
                            ch.basic_ack(self._unacked, multiple=True)
                            self._unacked = 0
                finally:
                    if conn.is_open:
                        conn.close()
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def _on_message(self, ch, method, props, body) -> None:
        if method.redelivered and props.message_id in self._ids:
            # The broker lost our ack (it crashed or we reconnected): a copy of the
            # consumer's making, not of the bridge's.
            self._unacked = method.delivery_tag
            return
        self._ids.add(props.message_id)
        msg = _message(method.routing_key, props, body)
        self.messages.append(msg)
        if msg.seq is not None:
            self._seqs.add(msg.seq)
        self._last_arrival = time.monotonic()
        self._unacked = method.delivery_tag

    def has_all(self, upto: int, allow_missing: frozenset[int] = frozenset()) -> bool:
        """Every sim_seq 1..upto, except those allowed to be missing, has arrived."""
        return (len(self._seqs) >= upto - len(allow_missing)
                and all(n in self._seqs or n in allow_missing for n in range(1, upto + 1)))

    def quiet_for(self) -> float:
        return time.monotonic() - self._last_arrival

    def lifecycle(self, action: str) -> list[dict]:
        """Bodies of the bridge's own `bridge.<action>` events, in order."""
        return [m.json() for m in list(self.messages) if m.routing_key == f"bridge.{action}"]

    def wait(self, upto: int, timeout: float, settle: float = 0.5,
             allow_missing: frozenset[int] = frozenset()) -> bool:
        """Wait until 1..upto all arrived (but `allow_missing`) and nothing more came
        for `settle` seconds (trailing duplicates, lifecycle events). False on
        timeout: the ledger says why."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has_all(upto, allow_missing) and self.quiet_for() >= settle:
                return True
            time.sleep(0.05)
        return False


@dataclass
class Ledger:
    """The figures of one fault test."""

    test: str
    sent: int
    delivered: int
    distinct: int
    duplicates: int
    unexplained_duplicates: int
    out_of_order: int
    lost: int
    beyond_sent: int = 0                       # sim_seq > sent: `sent` was read too early
    lost_sample: list[int] = field(default_factory=list)
    lifecycle: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def max_prefix(self) -> int:
        """k such that 1..k all arrived (the gapless prefix)."""
        return self.extra.get("prefix", 0)

    def summary(self) -> str:
        text = (f"{self.test}: sent={self.sent} delivered={self.delivered} "
                f"distinct={self.distinct} duplicates={self.duplicates} "
                f"(unexplained={self.unexplained_duplicates}) out_of_order={self.out_of_order} "
                f"lost={self.lost}")
        if self.lost_sample:
            text += f" first_lost={self.lost_sample}"
        if self.beyond_sent:
            text += f" beyond_sent={self.beyond_sent}"
        if self.lifecycle:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(self.lifecycle.items()))
        if self.extra:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(self.extra.items()))
        return text

    def report(self) -> "Ledger":
        print("\nLEDGER " + self.summary())
        path = os.environ.get("FAULT_REPORT")
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({"time": time.time(), **asdict(self)}) + "\n")
        return self


def compute(test: str, sent: int, messages: list[Message], **extra) -> Ledger:
    """The ledger of `messages` (in queue order) against events 1..sent."""
    counts: dict[int, int] = {}
    unflagged_extra = 0
    out_of_order = 0
    highest = 0
    lifecycle: dict[str, int] = {}
    for msg in messages:
        if msg.seq is None:
            if msg.routing_key.startswith("bridge."):
                lifecycle[msg.routing_key] = lifecycle.get(msg.routing_key, 0) + 1
            continue
        seen = counts.get(msg.seq, 0)
        counts[msg.seq] = seen + 1
        if seen:
            if not msg.republished:
                unflagged_extra += 1
            continue
        if msg.seq < highest:
            out_of_order += 1
        highest = max(highest, msg.seq)
    delivered = sum(counts.values())
    lost = [n for n in range(1, sent + 1) if n not in counts]
    prefix = 0
    while prefix + 1 in counts:
        prefix += 1
    return Ledger(test=test, sent=sent, delivered=delivered, distinct=len(counts),
                  duplicates=delivered - len(counts), unexplained_duplicates=unflagged_extra,
                  out_of_order=out_of_order, lost=len(lost), lost_sample=lost[:10],
                  beyond_sent=sum(1 for n in counts if n > sent), lifecycle=lifecycle,
                  extra={"prefix": prefix, **extra})
