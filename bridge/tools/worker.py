"""A helper for writing a worker in Python: `consume(patterns, handler, queue=...)`.

Example::

    from bridge.tools.worker import consume

    def handle(message):
        event = message.json()
        print(message.routing_key, event.get("resource_uri"))

    consume(["container.*", "service.delete"], handle, queue="inventory")

What it promises:
- a message is acked only after `handler` returned, so a crash never loses one;
- if `handler` raises, the message is requeued once, and rejected the second time
  (dropped, or dead-lettered if the queue has a policy for it), so one poison message
  cannot spin the worker forever;
- a `message_id` seen among the last `dedupe` handled messages is acked without calling
  `handler`: the bridge republishes with the same id after a broker failure. The window
  is per process, so handlers should still be idempotent across restarts;
- a lost broker is reconnected with a capped backoff; a named queue is durable and
  keeps events meanwhile, while `queue=None` uses a temporary queue (fine for
  watching, not for work). A broker that refuses us raises `BrokerRefused`: retrying
  cannot fix a bad password;
- SIGINT/SIGTERM (main thread), or setting `stop`, returns after the message in hand.

A handler that runs longer than the heartbeat timeout stalls heartbeats: add
`?heartbeat=600` to the URL, or hand the work to a thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import pika.exceptions

from bridge.config import DEFAULT_AMQP_URL, AmqpConfig, parse_amqp_urls
from bridge.errors import BridgeError, BrokerRefused, ConfigError
from bridge.tools import broker

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5   # how soon `stop` is noticed while no message arrives


@dataclass(frozen=True)
class Message:
    routing_key: str
    body: bytes
    headers: dict
    message_id: str | None
    redelivered: bool

    def json(self):
        return json.loads(self.body)


class _Recent:
    """The last `size` message ids, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size, self._ids = size, OrderedDict()

    def __contains__(self, message_id: str | None) -> bool:
        return message_id is not None and message_id in self._ids

    def add(self, message_id: str | None) -> None:
        if message_id is not None and self.size > 0:
            self._ids[message_id] = None
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)


def _declare(channel, patterns: list[str], queue: str | None, exchange: str,
             unrouted: str):
    """(queue name, channel to consume on): the channel changes if the broker closed it."""
    broker.declare_exchange(channel, exchange, unrouted)
    try:
        if queue is None:
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        else:
            try:
                channel.queue_declare(queue, durable=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                # It exists with other arguments (`tutum-bridge bind --quorum`, say):
                # use it as it is, on a fresh channel since this one is closed.
                channel = channel.connection.channel()
                channel.queue_declare(queue, passive=True)
        for pattern in patterns:
            channel.queue_bind(queue, exchange, pattern)
    except pika.exceptions.AMQPError as exc:
        raise broker.refusal(exc, f"declare and bind queue {queue!r}") from None
    return queue, channel


def consume(patterns: Iterable[str], handler: Callable[[Message], object],
            queue: str | None = None, *, amqp_url: str = DEFAULT_AMQP_URL,
            exchange: str = "tutum.events", unrouted: str = "tutum.unrouted",
            prefetch: int = 20, dedupe: int = 10_000, reconnect_max: float = 30.0,
            stop: threading.Event | None = None) -> None:
    """Call `handler` for each event matching `patterns` until stopped (see module doc)."""
    try:
        amqp = AmqpConfig(urls=parse_amqp_urls(amqp_url), exchange=exchange)
    except ValueError as exc:
        raise ConfigError(f"amqp_url: {exc}") from None
    patterns, recent, delay = list(patterns), _Recent(dedupe), 1.0

    def on_message(channel, method, properties, body: bytes) -> None:
        message = Message(method.routing_key, body, properties.headers or {},
                          properties.message_id, method.redelivered)
        if message.message_id in recent:
            channel.basic_ack(method.delivery_tag)
            return
        try:
            handler(message)
        except Exception:
            log.exception("handler failed on %s (message_id %s)%s", message.routing_key,
                          message.message_id, "" if method.redelivered else "; requeued once")
            channel.basic_reject(method.delivery_tag, requeue=not method.redelivered)
            return
        recent.add(message.message_id)
        channel.basic_ack(method.delivery_tag)

    with broker.StopRequest(stop) as request:
        while not request.requested:
            try:
                connection = broker.connect(amqp, (), "worker")
            except BrokerRefused:
                raise
            except BridgeError as exc:
                log.warning("%s; retrying in %.0fs", exc, delay)
                request.event.wait(delay)
                delay = min(delay * 2, reconnect_max)
                continue
            try:
                name, channel = _declare(connection.channel(), patterns, queue, exchange,
                                         unrouted)
                channel.basic_qos(prefetch_count=prefetch)
                channel.basic_consume(name, on_message)
                delay = 1.0
                log.info("consuming %s", name)
                while not request.requested and channel.consumer_tags:
                    connection.process_data_events(time_limit=POLL_SECONDS)
            except BrokerRefused:
                raise
            except (BridgeError, pika.exceptions.AMQPError) as exc:
                log.warning("lost the broker (%s); reconnecting", broker.reason(exc))
            finally:
                broker.close(connection)
