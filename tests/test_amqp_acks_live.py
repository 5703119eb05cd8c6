"""A real broker's confirms, read by bridge.amqp_acks: every ack reaches the watcher,
in order, and every nack still reaches pika's own callback; with a pika that lacks the
private methods the fast path needs, every confirm reaches pika's callback."""

from __future__ import annotations

import time

import pika

from bridge import amqp_acks
from bridge.amqp_acks import AckReadingConnection
from tests.support.broker import AMQP_URL, connect, unique

PUBLISHES = 300


def test_acks_reach_the_watcher_and_nacks_reach_pika():
    watched, by_pika = confirm_run()
    assert all(isinstance(f.method, pika.spec.Basic.Nack) for f in by_pika)
    assert covered_by(by_pika) & set(range(1, PUBLISHES + 4)) == {1, 2, 3}
    tags = [tag for tag, _multiple in watched]
    assert tags == sorted(tags)
    assert confirmed(watched, by_pika) == PUBLISHES + 3


def test_without_the_fast_path_every_confirm_takes_pikas_path(monkeypatch):
    monkeypatch.setattr(amqp_acks, "FAST_PATH", False)
    watched, by_pika = confirm_run()
    assert watched == []
    nacked = covered_by([f for f in by_pika if isinstance(f.method, pika.spec.Basic.Nack)])
    assert nacked & set(range(1, PUBLISHES + 4)) == {1, 2, 3}
    assert confirmed([], by_pika) == PUBLISHES + 3


def confirm_run():
    """Three publishes the broker nacks, then PUBLISHES it acks, on a connection whose
    acks are watched: (what the watcher got, the frames pika's callback got)."""
    full, roomy = unique("t-acks-full"), unique("t-acks-q")
    watched: list[tuple[int, bool]] = []
    by_pika: list[pika.frame.Method] = []
    done: list[bool] = []

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        # A queue of no room nacks every publish (one of room 1 acked a second at times).
        channel.queue_declare(full, arguments={"x-max-length": 0,
                                               "x-overflow": "reject-publish"},
                              callback=lambda _f: channel.queue_declare(
                                  roomy, callback=lambda _f: channel.confirm_delivery(
                                      by_pika.append, callback=lambda _f: publish(channel))))

    def publish(channel):
        connection.watch_acks(channel.channel_number, watched.extend)
        for n in range(3):
            channel.basic_publish("", full, b"%d" % n)
        for n in range(PUBLISHES):
            channel.basic_publish("", roomy, b"%d" % n)

    connection = AckReadingConnection(
        pika.URLParameters(AMQP_URL), on_open_callback=on_open,
        on_close_callback=lambda connection, _reason: connection.ioloop.stop())
    deadline = time.monotonic() + 20

    def check():
        covered = confirmed(watched, by_pika)
        if covered >= PUBLISHES + 3 or time.monotonic() > deadline:
            done.append(True)
            connection.ioloop.stop()
        else:
            connection.ioloop.call_later(0.02, check)

    connection.ioloop.call_later(0.02, check)
    try:
        connection.ioloop.start()
    finally:
        if connection.is_open:
            connection.close()
            connection.ioloop.start()       # until the close completes (on_close_callback)
        with connect() as cleanup:
            cleanup.channel().queue_delete(full)
            cleanup.channel().queue_delete(roomy)
    return watched, by_pika


def confirmed(watched, by_pika) -> int:
    """How many of the tags from 1 are answered, expanding multiple acks over the tags
    not nacked (a broker's multiple ack never covers a tag it nacked)."""
    answered = covered_by(by_pika) | covered_by(
        [pika.frame.Method(1, pika.spec.Basic.Ack(tag, multiple)) for tag, multiple in watched])
    n = 0
    while n + 1 in answered:
        n += 1
    return n


def covered_by(frames) -> set[int]:
    """The tags some frame answers (a multiple one: all up to its tag)."""
    tags: set[int] = set()
    for f in frames:
        tag = f.method.delivery_tag
        tags |= set(range(1, tag + 1)) if f.method.multiple else {tag}
    return tags
