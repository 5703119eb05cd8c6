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
  `handler`: the bridge republishes with the same id after a broker failure. A repeat
  is handled again in one case: when an older event of the same bridge was handled
  after it (a nack can let event N+1 through before N's republish; see the README's
  "Order"), so the handler's last call for every event follows the received order.
  The window is per process, so handlers should still be idempotent across restarts;
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


class _Repeats:
    """Which messages are repeats to skip, over the last `size` handled message ids.

    The bridge's message ids are `<spool id>-<sequence>`. A repeat is skipped only if
    its sequence is at or below the last one handled for its spool; otherwise an older
    event was handled since, and handling the repeat again restores the order.
    """

    def __init__(self, size: int) -> None:
        self.size, self._ids = size, OrderedDict()
        self._last: dict[str, int] = {}      # spool id -> sequence handled last

    def skip(self, message_id: str | None) -> bool:
        if message_id is None or message_id not in self._ids:
            return False
        spool, seq = _position(message_id)
        return seq is None or seq <= self._last.get(spool, 0)

    def handled(self, message_id: str | None) -> None:
        if message_id is None or self.size <= 0:
            return
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        spool, seq = _position(message_id)
        if seq is not None:
            self._last.pop(spool, None)      # most recent last, so the oldest goes first
            self._last[spool] = seq
            if len(self._last) > self.size:
                del self._last[next(iter(self._last))]


def _position(message_id: str) -> tuple[str, int | None]:
    """(spool id, sequence) of a bridge message id; no sequence for any other id."""
    spool, _, seq = message_id.rpartition("-")
    return (spool, int(seq)) if spool and seq.isdigit() else (message_id, None)


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
    patterns, repeats, delay = list(patterns), _Repeats(dedupe), 1.0

    def on_message(channel, method, properties, body: bytes) -> None:
        message = Message(method.routing_key, body, properties.headers or {},
                          properties.message_id, method.redelivered)
        if repeats.skip(message.message_id):
            channel.basic_ack(method.delivery_tag)
            return
        try:
            handler(message)
        except Exception:
            log.exception("handler failed on %s (message_id %s)%s", message.routing_key,
                          message.message_id, "" if method.redelivered else "; requeued once")
            channel.basic_reject(method.delivery_tag, requeue=not method.redelivered)
            return
        repeats.handled(message.message_id)
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
