"""Unit tests of the publisher: what it publishes, republishes, forgets and sets aside.

The broker is faked here (its confirms, closes and silences are fed in by hand, and
the IOLoop's timers are recorded instead of run) because the interleavings that
matter -- an ack with `multiple` after a nack, a close with one event in flight, a link
that stops carrying bytes -- are rare and timing-bound against a real broker. What is
asserted is what went on the wire (decoded back from the bytes written), what the
spool may forget, and which timers were set; tests/test_nacks.py and
tests/test_broker_faults.py cover the same paths end to end.
"""

from __future__ import annotations

import itertools
import json
import time

import pika
import pytest
import structlog
from pika import frame as pika_frame
from pika import spec
from pika.frame import Method

from bridge.config import AmqpConfig
from bridge.dead_letters import DeadLetters
from bridge.event import classify
from bridge.metrics import Metrics
from bridge.publisher import IllegalTransition, Input, Publisher, State
from bridge.spool import Spool
from bridge.topology import Topology


class Ceiling:
    """An rng for Backoff that always picks the top of the range: delays are exact."""

    @staticmethod
    def uniform(_low, high):
        return high


class FakeIOLoop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, object]] = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))

    def add_callback_threadsafe(self, callback):
        self.timers.append((0, callback))

    def stop(self) -> None:
        pass

    def delays(self, callback_name: str) -> list[float]:
        return [round(d, 3) for d, cb in self.timers if getattr(cb, "__name__", "") == callback_name]


class FakeConnection:
    """Just enough of a pika connection: records the publishes written to it."""

    class params:
        frame_max = 131072

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bool]] = []  # (message_id, routing key, republished)
        self.writes: list[int] = []                      # publishes in each write
        self.is_closing = self.is_closed = False
        self.bytes_received = 0
        self.terminated = None

    def _output_marshaled_frames(self, chunks) -> None:
        data = b"".join(chunks)
        before = len(self.published)
        while data:
            used, frame = pika_frame.decode_frame(data)
            data = data[used:]
            if isinstance(frame, pika_frame.Method):
                routing_key = frame.method.routing_key
            elif isinstance(frame, pika_frame.Header):
                props = frame.properties
                self.published.append((props.message_id, routing_key,
                                       (props.headers or {}).get("x-republished") is True))
        self.writes.append(len(self.published) - before)

    def _terminate_stream(self, error) -> None:
        self.terminated = error

    def watch_acks(self, channel, on_acks) -> None:
        self.on_acks = on_acks

    def close(self) -> None:
        self.is_closing = True


class PlainConnection(FakeConnection):
    """A pika without the private batch write: publishing must use basic_publish."""

    _output_marshaled_frames = None


class FakeChannel:
    channel_number = 1
    is_open = True

    def __init__(self, connection: FakeConnection) -> None:
        self._connection = connection

    def basic_publish(self, exchange, routing_key, body, properties) -> None:
        self._connection.published.append((properties.message_id, routing_key,
                                           (properties.headers or {}).get("x-republished") is True))


def ack(tag: int, multiple: bool = False) -> Method:
    return Method(1, spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int, multiple: bool = False) -> Method:
    return Method(1, spec.Basic.Nack(delivery_tag=tag, multiple=multiple))


@pytest.fixture
def make(tmp_path):
    numbers = itertools.count()

    def make(events: int, inflight: int = 100, connection=FakeConnection) -> Publisher:
        where = tmp_path / str(next(numbers))
        spool = Spool(where / "spool.sqlite3", 1 << 30)
        if events:
            spool.append([classify(b'{"type": "container", "action": "update", "n": %d}' % i,
                                   1.0) for i in range(events)])
        publisher = Publisher(
            AmqpConfig(urls=("amqp://guest:guest@127.0.0.1:5672/%2F",)),
            Topology("ex", "unrouted", "invalid"), spool,
            DeadLetters(where / "dead.sqlite3"), inflight=inflight, reconnect_max=30,
            confirm_timeout=15, on_fatal=lambda error: None, log=structlog.get_logger(),
            metrics=Metrics())
        publisher._ioloop = FakeIOLoop()
        publisher._backoff._rng = publisher._nack_backoff._rng = Ceiling()
        publisher.spool = spool
        open_(publisher, connection())
        return publisher
    return make


def open_(publisher: Publisher, connection: FakeConnection) -> None:
    """What a successful connect and declaration lead to: `_on_ready`."""
    publisher._connection, publisher._channel = connection, FakeChannel(connection)
    publisher._heard = (connection.bytes_received, time.monotonic())
    publisher.state = State.DECLARING
    publisher._on_ready()


def seqs(publisher: Publisher, published) -> list[tuple[int, bool]]:
    """(sequence, republished) of each publish."""
    prefix = publisher.spool.id + "-"
    return [(int(mid.removeprefix(prefix)), again) for mid, _key, again in published]


def test_acks_let_the_spool_forget_a_confirmed_prefix(make):
    publisher = make(5)
    publisher._on_confirm(ack(2, multiple=True))
    publisher._on_confirm(ack(4))
    publisher._flush_confirms()
    assert publisher.spool.confirmed == 2 and publisher.spool.pending == 3   # 4 waits behind 3


def test_a_full_window_is_refilled_in_batches_not_an_event_per_confirm(make):
    publisher = make(200, inflight=80)           # a refill is an eighth: 10 events
    connection = publisher._connection
    assert connection.writes == [80]
    for tag in range(1, 10):                     # RabbitMQ acks a few events at a time
        publisher._on_confirm(ack(tag))
    assert connection.writes == [80]
    publisher._on_confirm(ack(10))
    assert connection.writes == [80, 10]
    publisher._on_confirm(ack(90, multiple=True))
    assert connection.writes == [80, 10, 80]
    publisher._on_confirm(ack(170, multiple=True))
    assert connection.writes == [80, 10, 80, 30]  # the rest of the spool
    publisher._on_confirm(ack(200, multiple=True))
    publisher._flush_confirms()
    assert seqs(publisher, connection.published) == [(n, False) for n in range(1, 201)]
    assert publisher.spool.pending == 0


def test_a_run_of_acks_read_at_once_is_answered_with_one_refill(make):
    """The acks of one read (bridge/amqp_acks.py) refill the window once, not one
    eighth of it per ack: fewer, larger writes."""
    publisher = make(200, inflight=80)           # a refill is an eighth: 10 events
    connection = publisher._connection
    assert connection.on_acks == publisher._on_acks
    connection.on_acks([(tag, False) for tag in range(1, 31)] + [(3, False)])  # 3 again: stale
    assert connection.writes == [80, 30]
    connection.on_acks([(100, True), (110, True)])
    assert connection.writes == [80, 30, 80]
    connection.on_acks([(190, True)])
    assert connection.writes == [80, 30, 80, 10]  # the rest of the spool
    connection.on_acks([(200, True)])
    publisher._flush_confirms()
    assert seqs(publisher, connection.published) == [(n, False) for n in range(1, 201)]
    assert publisher.spool.pending == 0


def test_a_nack_republishes_the_nacked_event_and_those_after_it_after_a_backoff(make):
    publisher = make(5)
    connection = publisher._connection
    assert seqs(publisher, connection.published) == [(n, False) for n in range(1, 6)]
    publisher._on_confirm(ack(1))
    publisher._on_confirm(nack(2))
    # RabbitMQ may then ack the rest with `multiple`, a range that spans tag 2: those
    # copies were superseded by the nack, so nothing past event 1 may be forgotten.
    publisher._on_confirm(ack(5, multiple=True))
    publisher._flush_confirms()
    assert publisher.spool.confirmed == 1 and publisher.spool.pending == 4
    assert publisher.state is State.OPEN             # the channel stays: no reconnect
    assert len(connection.published) == 5           # nothing before the backoff
    assert publisher._ioloop.delays("_end_nack_wait") == [0.25]

    publisher._end_nack_wait()       # the backoff is over: event 2 alone, as a probe
    assert seqs(publisher, connection.published[5:]) == [(2, True)]
    publisher._on_confirm(ack(6))      # then two at a time, then four...
    assert seqs(publisher, connection.published[6:]) == [(3, True), (4, True)]
    publisher._on_confirm(ack(8, multiple=True))
    assert seqs(publisher, connection.published[8:]) == [(5, True)]
    publisher._on_confirm(ack(9))
    publisher._flush_confirms()
    assert publisher.spool.pending == 0


def test_nacks_of_a_queue_that_stays_full_back_off_ever_longer(make):
    publisher = make(32)
    connection = publisher._connection
    publisher._on_confirm(nack(32, multiple=True))       # the whole window refused
    tag = 33
    for _ in range(6):
        publisher._end_nack_wait()
        publisher._on_confirm(nack(tag))
        tag += 1
    # One copy per retry, not a window's worth; and no reconnect resets the backoff.
    assert len(connection.published) == 32 + 6
    assert publisher._ioloop.delays("_end_nack_wait") == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_the_nack_backoff_resets_once_everything_nacked_is_confirmed(make):
    publisher = make(3)
    publisher._on_confirm(nack(3, multiple=True))
    publisher._end_nack_wait()
    publisher._on_confirm(nack(4))
    publisher._end_nack_wait()
    publisher._on_confirm(ack(5))                  # event 1; 2 and 3 still to confirm
    publisher._on_confirm(ack(7, multiple=True))   # 2 and 3
    assert publisher._pos.confirmed == 3
    publisher.spool.append([classify(b'{"type": "container", "action": "update"}', 2.0)])
    publisher._pump()
    publisher._on_confirm(nack(8))
    assert publisher._ioloop.delays("_end_nack_wait") == [0.25, 0.5, 0.25]


def test_a_lost_connection_republishes_every_unconfirmed_event_on_the_next(make):
    publisher = make(4)
    publisher._on_confirm(ack(1))
    publisher._on_connection_closed(publisher._connection, pika.exceptions.StreamLostError("gone"))
    assert publisher.state is State.CLOSED
    assert publisher._ioloop.delays("_connect") == [0.25]
    again = FakeConnection()
    open_(publisher, again)
    assert seqs(publisher, again.published) == [(2, True), (3, True), (4, True)]


def test_the_reconnect_backoff_is_reset_by_a_confirm_not_by_an_open(make):
    publisher = make(2)
    for _ in range(3):      # a broker that accepts connections and then drops them
        publisher._on_connection_closed(publisher._connection,
                                        pika.exceptions.StreamLostError("gone"))
        open_(publisher, FakeConnection())
    publisher._on_confirm(ack(1))
    publisher._on_connection_closed(publisher._connection, pika.exceptions.StreamLostError("x"))
    assert publisher._ioloop.delays("_connect") == [0.25, 0.5, 1.0, 0.25]


def test_without_pikas_private_write_it_publishes_the_same_with_basic_publish(make):
    fast, plain = make(3), make(3, connection=PlainConnection)
    assert plain._write is None and fast._write is not None
    assert [p[1:] for p in plain._connection.published] == \
        [p[1:] for p in fast._connection.published]
    assert len(plain._connection.published) == 3


def test_a_silent_link_is_dropped_without_a_handshake(make):
    publisher = make(1)
    publisher._heard = (publisher._connection.bytes_received, time.monotonic() - 11)
    publisher._watch()
    assert publisher.state is State.CLOSING
    assert publisher._connection.terminated is not None      # no Close sent: it would hang


def test_a_publish_never_confirmed_drops_the_link_unless_the_broker_blocks_us(make):
    publisher = make(1)
    tag, (seq, _sent) = next(iter(publisher._pos.live.items()))
    publisher._pos.live[tag] = (seq, time.monotonic() - 16)
    publisher.blocked = True
    publisher._watch()
    assert publisher.state is State.OPEN
    publisher.blocked = False
    publisher._connection.bytes_received += 1           # heartbeats still arrive
    publisher._watch()
    assert publisher.state is State.CLOSING and publisher._connection.terminated is not None


def test_an_event_refused_alone_three_times_is_set_aside_and_the_rest_go_on(make):
    publisher = make(3)
    refusal = pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - message size")
    publisher._on_confirm(ack(1))
    publisher._on_channel_closed(None, refusal)    # 2 and 3 in flight: which one?
    for attempt in range(3):
        publisher._on_connection_closed(publisher._connection, refusal)
        connection = FakeConnection()
        open_(publisher, connection)
        assert seqs(publisher, connection.published) == [(2, True)]   # alone, to find out
        publisher._on_channel_closed(None, refusal)
    publisher._on_connection_closed(publisher._connection, refusal)
    connection = FakeConnection()
    open_(publisher, connection)
    assert seqs(publisher, connection.published) == [(3, True)]
    publisher._on_confirm(ack(1))
    publisher._flush_confirms()
    assert publisher.spool.pending == 0
    dead = DeadLetters(publisher._dead_letters.path)
    assert dead.seqs_after(0) == {2} and dead.count == 1


def test_an_event_that_cannot_be_encoded_is_set_aside_at_once(make):
    small = FakeConnection()
    small.params = type("params", (), {"frame_max": 4096})
    publisher = make(0)
    parents = json.dumps([f"/api/v1/service/{n}-{'x' * 200}/" for n in range(32)]).encode()
    publisher.spool.append([classify(b'{"type": "container", "action": "update", "parents": %s}'
                                     % parents, 1.0),
                            classify(b'{"type": "container", "action": "update"}', 1.0)])
    open_(publisher, small)
    assert seqs(publisher, small.published) == [(2, False)]
    assert publisher._dead_letters.seqs_after(0) == {1}


def test_shutdown_drains_then_closes(make):
    publisher = make(2)
    publisher._begin_drain(10)
    assert publisher.state is State.OPEN
    publisher._on_confirm(ack(2, multiple=True))
    publisher._flush_confirms()
    assert publisher.state is State.STOPPED and publisher._connection.is_closing
    assert publisher.spool.pending == 0


def test_a_callback_the_table_does_not_expect_is_a_bug_not_a_new_state(make):
    publisher = make(0)
    with pytest.raises(IllegalTransition):
        publisher._fire(Input.OPENED)
