"""A helper for writing a worker in Python: `consume(patterns, handler, queue=...)`.

Example::

    from bridge.tools.worker import consume

    def handle(message):
        event = message.json()
        print(message.routing_key, event.get("resource_uri"))

    consume(["container.*", "service.delete"], handle, queue="inventory")

What it promises:
- manual acknowledgement: a message is acked only after `handler` returned, so a crash
  never loses one; at most `prefetch` messages are in the worker's hands at once;
- if `handler` raises, the message is requeued and tried again, up to `attempts` times
  in all (counted per message in this process); then it goes to the `dead_letter`
  queue, with the headers `x-attempts` (the count), `x-error` (the last exception, a
  short line) and `x-routing-key`, and is acked; without `dead_letter` it is rejected
  (dropped, or dead-lettered by the queue's own `x-dead-letter-*` arguments, as
  `tutum-bridge bind --dead-letter` declares them). One poison message can neither
  spin the worker forever nor hold up the messages behind it;
- `since` replays the history stream (`BRIDGE_HISTORY`, docs/contract.md section 8)
  instead of a queue: from `"first"`, an offset, a time (a `datetime`, or Unix seconds
  as a float) or a duration back (`"10m"`, `"2h"`, `"1d"`), then goes on live; only
  messages matching `patterns` reach `handler` (`Message.offset` says where each was).
  After a reconnect it resumes after the last offset handled;
- a repeat among the last `dedupe` handled messages is acked without calling
  `handler`: the bridge republishes with the same `message_id` after a broker failure.
  `dedupe_key(message)` says what makes two messages the same (the `message_id` by
  default; the HA identity header, where the bridge sets one, for replicas). A repeat
  is handled again in one case: when an older event of the same bridge was handled
  after it (a nack can let event N+1 through before N's republish; see the README's
  "Order"), so the handler's last call for every event follows the received order.
  The window is per process, so handlers should still be idempotent across restarts;
- a lost broker is reconnected with a capped backoff; a named queue is durable and
  keeps events meanwhile, while `queue=None` uses a temporary queue (fine for
  watching, not for work). A broker that refuses us raises `BrokerRefused`: retrying
  cannot fix a bad password;
- SIGINT/SIGTERM (main thread), or setting `stop`, returns after the message in hand;
  the handler sees none of the messages prefetched behind it, which go back to the queue.

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

import pika
import pika.exceptions

from bridge.config import DEFAULT_AMQP_URL, AmqpConfig, parse_amqp_urls
from bridge.event import excerpt
from bridge.errors import BridgeError, BrokerRefused, ConfigError
from bridge.tools import broker, history

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5   # how soon `stop` is noticed while no message arrives


@dataclass(frozen=True)
class Message:
    routing_key: str
    body: bytes
    headers: dict
    message_id: str | None
    redelivered: bool
    offset: int | None = None       # where it is in the history stream, when read there

    def json(self):
        return json.loads(self.body)


def message_id_key(message: Message) -> str | None:
    """The default de-duplication key: the bridge's `message_id`, the same on every
    republish of one received frame."""
    return message.message_id


class _Attempts:
    """How many times the handler failed on each message, over the last `size` failures."""

    def __init__(self, size: int = 10_000) -> None:
        self.size, self._failed = size, OrderedDict()

    def failed(self, key) -> int:
        count = self._failed.pop(key, 0) + 1
        self._failed[key] = count
        if len(self._failed) > self.size:
            self._failed.popitem(last=False)
        return count

    def forget(self, key) -> None:
        self._failed.pop(key, None)


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
             unrouted: str, dead_letter: str | None):
    """(queue name, channel to consume on): the channel changes if the broker closed it."""
    broker.declare_exchange(channel, exchange, unrouted)
    if dead_letter:
        channel = _declare_dead_letter(channel, dead_letter)
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


def _declare_dead_letter(channel, name: str):
    """Declare the dead-letter queue durable; the channel to go on with."""
    try:
        channel.queue_declare(name, durable=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise broker.refusal(exc, f"declare queue {name!r}") from None
        channel = channel.connection.channel()   # it exists with other arguments: fine
    return channel


def _dead_letter(channel, dead_letter: str, message: Message, properties,
                 attempts: int, error: BaseException) -> None:
    """Publish a copy to the dead-letter queue (confirmed) before the original is acked."""
    headers = dict(properties.headers or {})
    headers.update({"x-attempts": attempts, "x-routing-key": message.routing_key,
                    "x-error": excerpt(f"{type(error).__name__}: {error}".encode())})
    channel.basic_publish("", dead_letter, message.body, pika.BasicProperties(
        content_type=properties.content_type, delivery_mode=2,
        message_id=properties.message_id, timestamp=properties.timestamp,
        app_id=properties.app_id, headers=headers), mandatory=True)


def consume(patterns: Iterable[str], handler: Callable[[Message], object],
            queue: str | None = None, *, amqp_url: str = DEFAULT_AMQP_URL,
            exchange: str = "tutum.events", unrouted: str = "tutum.unrouted",
            prefetch: int = 20, attempts: int = 2, dead_letter: str | None = None,
            dedupe: int = 10_000,
            dedupe_key: Callable[[Message], object] = message_id_key,
            since=None, history_queue: str = history.HISTORY_QUEUE,
            reconnect_max: float = 30.0, stop: threading.Event | None = None) -> None:
    """Call `handler` for each event matching `patterns` until stopped (see module doc)."""
    try:
        amqp = AmqpConfig(urls=parse_amqp_urls(amqp_url), exchange=exchange)
        offset = None if since is None else history.offset_argument(since)
    except ValueError as exc:
        raise ConfigError(f"{'since' if since is not None else 'amqp_url'}: {exc}") from None
    if since is not None and queue is not None:
        raise ConfigError("give either queue or since: since reads the history stream")
    if attempts < 1:
        raise ConfigError("attempts: must be 1 or more")
    patterns, repeats, failures = list(patterns), _Repeats(dedupe), _Attempts()
    delay = 1.0

    def on_message(channel, method, properties, body: bytes) -> None:
        nonlocal offset
        if request.requested:
            # Prefetched behind the message that was in hand: left unacked, so the
            # broker gives it back to its queue when the connection closes.
            return
        headers = properties.headers or {}
        message = Message(method.routing_key, body, headers, properties.message_id,
                          method.redelivered, headers.get("x-stream-offset"))
        if offset is not None and message.offset is not None:
            offset = message.offset + 1       # a reconnect resumes after this one
            if not any(history.matches(p, message.routing_key) for p in patterns):
                channel.basic_ack(method.delivery_tag)
                return
        key = dedupe_key(message)
        attempt = key if key is not None else body
        if repeats.skip(key):
            channel.basic_ack(method.delivery_tag)
            return
        while True:
            try:
                handler(message)
                break
            except Exception as exc:  # noqa: BLE001 - any handler failure is counted
                failed = failures.failed(attempt)
                log.exception("handler failed on %s (message_id %s), attempt %d of %d",
                              message.routing_key, message.message_id, failed, attempts)
                if failed >= attempts:
                    failures.forget(attempt)
                    if dead_letter:
                        _dead_letter(dead_channel, dead_letter, message, properties,
                                     failed, exc)
                        channel.basic_ack(method.delivery_tag)
                    else:
                        channel.basic_reject(method.delivery_tag, requeue=False)
                    return
                if offset is None:
                    # A queue gives it back at its place; a stream cannot, so retry here.
                    channel.basic_reject(method.delivery_tag, requeue=True)
                    return
        failures.forget(attempt)
        repeats.handled(key)
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
                if offset is None:
                    name, channel = _declare(connection.channel(), patterns, queue,
                                             exchange, unrouted, dead_letter)
                    arguments = None
                else:
                    if dead_letter:
                        _declare_dead_letter(connection.channel(), dead_letter)
                    name = history_queue
                    channel = history.open_stream(connection.channel(), name)
                    arguments = {"x-stream-offset": offset}
                dead_channel = connection.channel()
                dead_channel.confirm_delivery()
                channel.basic_qos(prefetch_count=prefetch)
                channel.basic_consume(name, on_message, arguments=arguments)
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
