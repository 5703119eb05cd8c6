"""Reading the history stream `tutum.history` (docs/contract.md section 8): where to start, and what to keep.

With `BRIDGE_HISTORY` set, the bridge keeps every event on a RabbitMQ stream queue
bound `#`. A reader (`tail --since`, `consume(since=...)`) attaches at an offset and,
since a stream consumer stays attached, goes on with live events after the replay.
This module turns the user's "since" into the `x-stream-offset` the broker takes, and
filters by routing-key pattern on the client side, since the stream holds every key.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import pika.exceptions

from bridge.errors import BrokerRefused
from bridge.tools import broker
from bridge.topology import HISTORY_QUEUE  # noqa: F401 - the readers' default

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SINCE = re.compile(r"\A(\d+)([smhd])\Z")


def parse_since(text: str, now: float | None = None):
    """`first`, `last`, `next`, an offset (`1234`), or a duration back from now
    (`10m`, `2h`, `1d`) -> the value of the `x-stream-offset` consumer argument."""
    text = text.strip().lower()
    if text in ("first", "last", "next"):
        return text
    if text.isdigit():
        return int(text)
    match = _SINCE.match(text)
    if not match:
        raise ValueError("expected first, last, next, an offset, or a duration such as "
                         "10m, 2h or 1d")
    back = int(match.group(1)) * _UNITS[match.group(2)]
    # pika sends a datetime as an AMQP timestamp, which the broker reads as a time offset.
    return datetime.fromtimestamp((time.time() if now is None else now) - back, timezone.utc)


def offset_argument(since) -> object:
    """A `since` given in code (text, an offset, a datetime, or Unix seconds as a float)."""
    if isinstance(since, str):
        return parse_since(since)
    if isinstance(since, float):
        return datetime.fromtimestamp(since, timezone.utc)
    if isinstance(since, (int, datetime)):
        return since
    raise ValueError(f"since: expected text, an offset, a datetime or Unix seconds, "
                     f"not {type(since).__name__}")


def matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic-exchange binding `pattern` matches `routing_key`, as RabbitMQ decides."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


def open_stream(channel, name: str):
    """Check the history stream exists (a missing one is a clear refusal); the channel."""
    try:
        channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise BrokerRefused(f"no history stream {name!r} on the broker: run the bridge "
                                f"with BRIDGE_HISTORY (for example 7d)") from None
        raise broker.refusal(exc, f"open the history stream {name!r}") from None
    return channel
