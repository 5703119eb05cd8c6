"""The benchmark's worker reads every body intact from the real broker, whatever the
message's properties and however many frames its body takes."""

from __future__ import annotations

import threading
import time

import pika
import pytest

from bridge.bench.consumer import BodyConsumer, ConsumerError, Tally
from bridge.simulator.session import stamp
from tests.support.broker import AMQP_URL, connect, unique
from tests.unit.test_amqp_encode import TYPICAL_HEADERS


def test_every_body_arrives_intact_in_order_and_stamps_are_read_from_its_tail():
    queue = unique("t-bench-consumer")
    event = stamp(b'{"type": "container", "action": "update", "pad": "' + b"x" * 40 + b'"}', 1)
    bodies = [event, b"", b'{"type": "bridge"}', b"y" * 300_000 + event]   # 3 body frames
    with connect() as conn:
        channel = conn.channel()
        channel.queue_declare(queue)
        try:
            for body in bodies:
                channel.basic_publish("", queue, body, pika.BasicProperties(
                    delivery_mode=2, message_id="m", timestamp=1, headers=TYPICAL_HEADERS))
            got: list[bytes] = []
            consumer = BodyConsumer(AMQP_URL, queue, got.append)
            try:
                consumer.consume_until(time.monotonic() + 20, lambda: len(got) == len(bodies))
            finally:
                consumer.close()
            assert got == bodies

            tally = Tally(expect=2)
            for body in got:
                tally.add(body, time.time())
            assert (tally.count, tally.duplicates) == (1, 1)     # the same sim_seq twice
            assert 0 <= tally.latencies[0] < 60
        finally:
            channel.queue_delete(queue)


def test_a_missing_queue_is_a_clear_error():
    with pytest.raises(ConsumerError, match="NOT_FOUND"):
        BodyConsumer(AMQP_URL, unique("t-no-such-queue"), lambda body: None)


def test_a_consumer_that_only_receives_keeps_its_connection_alive_with_heartbeats():
    """While deliveries keep coming the broker sends no heartbeat of its own, and a
    consumer without acks sends nothing: with a 1 s heartbeat the broker drops such a
    silent client after about 2 s, so 5 s of deliveries need its own beats."""
    queue, count = unique("t-bench-consumer-beats"), 250
    with connect() as conn:
        channel = conn.channel()
        channel.queue_declare(queue)
        try:
            got: list[bytes] = []
            consumer = BodyConsumer(AMQP_URL + "?heartbeat=1", queue, got.append)

            def publish() -> None:
                with connect() as producer:
                    out = producer.channel()
                    for n in range(count):
                        out.basic_publish("", queue, b"%d" % n)
                        producer.sleep(0.02)        # deliveries spread over 5 s

            thread = threading.Thread(target=publish)
            thread.start()
            try:
                consumer.consume_until(time.monotonic() + 30, lambda: len(got) == count)
            finally:
                thread.join(30)
                consumer.close()
            assert got == [b"%d" % n for n in range(count)]
        finally:
            channel.queue_delete(queue)
