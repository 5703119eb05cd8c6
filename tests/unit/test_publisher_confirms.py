"""Unit tests of the publisher's confirm bookkeeping: which events the spool may forget.

The broker is faked here (its confirms are fed in by hand) because the interleaving
that matters, an ack with `multiple` arriving after a nack, is rare and timing-bound
against a real broker; `tests/test_nacks.py` covers nacks end to end.
"""

from __future__ import annotations

import structlog
from pika import spec
from pika.frame import Method

from bridge.config import AmqpConfig
from bridge.event import classify
from bridge.metrics import Metrics
from bridge.publisher import Publisher, State, Topology
from bridge.spool import Spool


class FakeConnection:
    """Just enough of a pika connection for `_pump` to write publishes into."""

    class params:
        frame_max = 131072

    def __init__(self) -> None:
        self.written = 0
        self.is_closing = self.is_closed = False

    def _output_marshaled_frames(self, frames) -> None:
        self.written += 1

    def close(self) -> None:
        self.is_closing = True


class FakeChannel:
    channel_number = 1
    is_open = True


def confirm(method) -> Method:
    return Method(1, method)


def open_publisher(tmp_path, events: int) -> tuple[Publisher, Spool]:
    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)
    spool.append([classify(b'{"type": "container", "action": "update", "n": %d}' % i, 1.0)
                  for i in range(events)])
    publisher = Publisher(
        AmqpConfig(urls=("amqp://guest:guest@127.0.0.1:5672/%2F",)),
        Topology("ex", "unrouted", "invalid"), spool, inflight=100, reconnect_max=1,
        on_fatal=lambda error: None, log=structlog.get_logger(), metrics=Metrics())
    publisher._connection, publisher._channel = FakeConnection(), FakeChannel()
    publisher.state = State.OPEN
    publisher._pump()
    return publisher, spool


def test_acks_let_the_spool_forget_a_confirmed_prefix(tmp_path):
    publisher, spool = open_publisher(tmp_path, 5)
    publisher._on_confirm(confirm(spec.Basic.Ack(delivery_tag=2, multiple=True)))
    publisher._on_confirm(confirm(spec.Basic.Ack(delivery_tag=4)))
    publisher._flush_confirms()
    assert spool.confirmed == 2 and spool.pending == 3   # 4 waits behind 3


def test_an_ack_after_a_nack_never_confirms_the_nacked_event(tmp_path):
    publisher, spool = open_publisher(tmp_path, 5)
    publisher._on_confirm(confirm(spec.Basic.Ack(delivery_tag=1)))
    publisher._on_confirm(confirm(spec.Basic.Nack(delivery_tag=2)))
    # RabbitMQ may then ack the rest with `multiple`, a range that spans tag 2.
    publisher._on_confirm(confirm(spec.Basic.Ack(delivery_tag=5, multiple=True)))
    publisher._flush_confirms()
    assert spool.confirmed == 1 and spool.pending == 4   # 2..5 are republished
    assert publisher.state is State.CLOSING      # to republish from event 2
