"""`tutum-bridge tail [PATTERN ...]`: watch events live, as a person or as a pipe.

By default it binds an exclusive, auto-delete, server-named queue to the events
exchange with each pattern (`#` when none is given): the queue lives exactly as long
as the tail's connection, so a tail never leaves anything behind and never takes an
event from a worker. `--queue NAME` reads an existing queue instead (that does take
the messages); each one is acked only once printed, so `--count N` takes exactly N
and leaves the rest in the queue.

Output is one line per event and flushed per line, so `tail | grep` works: when the
bridge received the event (the message's `timestamp`, in local time: a replay or a
drained backlog shows when things happened, not when they were printed), routing key,
`state` header and `resource_uri` header in aligned columns (a summary for the
bridge's own events and for quarantined frames). `--json` prints each
body instead, exactly as published, one per line.

`--since 10m|2h|1d|first` reads the history stream instead (`BRIDGE_HISTORY`,
docs/contract.md section 8): the events from then on, in order, then the live ones,
filtered by the patterns here since the stream holds every key. Reading a stream
takes nothing from anyone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pika.exceptions

from bridge.config import TOPOLOGY_SETTINGS, amqp_config, from_environment
from bridge.config import add_arguments as add_setting_arguments
from bridge.errors import EXIT_OK, BridgeError, ConfigError
from bridge.log import scrub
from bridge.event import excerpt
from bridge.tools import broker, history

PREFETCH = 100
POLL_SECONDS = 0.2          # how soon a stop request is noticed while no event arrives
KEY_WIDTH, STATE_WIDTH = 24, 12
DETAIL_MAX = 160
EXCERPT_MAX = 100           # of a body shown for want of a resource_uri
READY_LINE = "tutum-bridge tail: watching"   # on stderr once bound: the demo waits for it
SETTINGS = broker.SETTINGS + tuple(s for s in TOPOLOGY_SETTINGS if s.name == "history_queue")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patterns", metavar="PATTERN", nargs="*",
                        help="routing-key pattern such as container.* or *.delete (default #)")
    parser.add_argument("--json", action="store_true",
                        help="print each message body, one per line, instead of a summary")
    parser.add_argument("--count", type=positive_int, metavar="N",
                        help="exit after N events")
    parser.add_argument("--since", metavar="WHEN", type=_since,
                        help="replay the history stream from WHEN (10m, 2h, 1d, first, or an "
                             "offset), then follow live")
    parser.add_argument("--queue", metavar="NAME",
                        help="consume this existing queue (taking its messages) instead of "
                             "binding a temporary one")
    add_setting_arguments(parser, SETTINGS)


def _since(text: str):
    try:
        return history.parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _printable(value: object) -> str:
    """Header values come from upstream: never let one move the cursor or add a line."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)[:DETAIL_MAX]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}"


def _received(properties) -> str:
    """The first column, one word (so `awk '{print $2}'` is the routing key): the
    bridge's receipt time, whole seconds as AMQP carries it; now for a message
    published without one."""
    stamp = properties.timestamp
    epoch = stamp if isinstance(stamp, int) and stamp > 0 else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def summary(routing_key: str, headers: dict, body: bytes) -> str:
    """The last column: what a person wants to know about this message at a glance."""
    if "x-quarantine-reason" in headers:
        return (f"quarantined: {_printable(headers['x-quarantine-reason'])} "
                f"({headers.get('x-frame-bytes', len(body))} bytes) "
                f"{_printable(headers.get('x-quarantine-detail', ''))}")
    if routing_key.startswith("bridge."):
        try:
            obj = json.loads(body)
        except ValueError:
            obj = {}
        if isinstance(obj, dict) and obj.get("action") == "connected":
            gap = obj.get("gap")
            if isinstance(gap, dict) and isinstance(gap.get("seconds"), (int, float)):
                lost = gap.get("lost_at")
                since = f", lost at {_clock(lost)}" if isinstance(lost, (int, float)) else ""
                return f"reconnected after a {gap['seconds']:.1f}s gap{since}: resync via REST"
            return "connected"
        if isinstance(obj, dict) and obj.get("action") == "disconnected":
            return f"disconnected: {_printable(obj.get('reason', 'unknown reason'))}"
    if "resource_uri" in headers:
        return _printable(headers["resource_uri"])
    text = excerpt(body)
    return text if len(text) <= EXCERPT_MAX else text[:EXCERPT_MAX - 3] + "..."


class HumanPrinter:
    """Aligned columns; a column widens (and stays wide) for a longer key."""

    def __init__(self, out) -> None:
        self.out = out
        self.key_width = KEY_WIDTH

    def __call__(self, routing_key: str, properties, body: bytes) -> None:
        headers = properties.headers or {}
        self.key_width = max(self.key_width, len(routing_key))
        line = (f"{_received(properties)}  {_printable(routing_key):<{self.key_width}}  "
                f"{_printable(headers.get('state', '')):<{STATE_WIDTH}}  "
                f"{summary(routing_key, headers, body)}")
        if headers.get("x-republished"):
            line += "  (republished)"
        self.out.write(line.rstrip() + "\n")
        self.out.flush()


class JsonPrinter:
    """The body exactly as published, one per line. A raw line break can only be
    whitespace between JSON tokens, so turning it into a space keeps the value and
    keeps one message per line."""

    def __init__(self, out) -> None:
        self.out = out.buffer

    def __call__(self, routing_key: str, properties, body: bytes) -> None:
        self.out.write(body.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n")
        self.out.flush()


def _source(channel, args: argparse.Namespace, exchange: str, unrouted: str) -> str:
    """The queue to consume: the one named by --queue, or a temporary one bound here."""
    if args.since is not None:
        history.open_stream(channel, args.history_queue)
        return args.history_queue
    if args.queue:
        try:
            channel.queue_declare(args.queue, passive=True)
        except pika.exceptions.AMQPError as exc:
            raise broker.refusal(exc, f"open queue {args.queue!r}") from None
        return args.queue
    broker.declare_exchange(channel, exchange, unrouted)
    try:
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for pattern in args.patterns or ["#"]:
            channel.queue_bind(queue, exchange, pattern)
    except pika.exceptions.AMQPError as exc:
        raise broker.refusal(exc, f"bind a temporary queue to {exchange!r}") from None
    return queue


def main(args: argparse.Namespace) -> int:
    if args.queue and args.since is not None:
        raise ConfigError("--since reads the history stream: give no --queue with it")
    if args.queue and args.patterns:
        raise ConfigError("--queue reads a queue as it is bound: give no PATTERN with it "
                          "(tutum-bridge bind adds bindings)")
    values = from_environment(args, SETTINGS)
    args.history_queue = values["history_queue"]
    amqp, secrets = amqp_config(values)
    patterns = args.patterns or ["#"]
    printer = JsonPrinter(sys.stdout) if args.json else HumanPrinter(sys.stdout)
    try:
        connection = broker.connect(amqp, secrets, "tail")
    except KeyboardInterrupt:
        return EXIT_OK
    try:
        with broker.StopRequest() as stop:
            channel = connection.channel()
            queue = _source(channel, args, amqp.exchange, values["unrouted"])
            channel.basic_qos(prefetch_count=PREFETCH)
            what = f"queue {queue!r}" if args.queue else (
                f"{amqp.exchange!r} for " + " ".join(repr(p) for p in patterns))
            arguments = None
            if args.since is not None:
                what = f"history {queue!r} for " + " ".join(repr(p) for p in patterns)
                arguments = {"x-stream-offset": args.since}
            sys.stderr.write(f"{READY_LINE} {what} (Ctrl-C to stop)\n")
            sys.stderr.flush()
            seen = 0
            for method, properties, body in channel.consume(
                    queue, arguments=arguments, inactivity_timeout=POLL_SECONDS):
                if stop.requested:
                    return EXIT_OK
                if method is None:
                    continue
                if arguments and not any(history.matches(p, method.routing_key)
                                         for p in patterns):
                    channel.basic_ack(method.delivery_tag)
                    continue
                printer(method.routing_key, properties, body)
                channel.basic_ack(method.delivery_tag)
                seen += 1
                if args.count and seen >= args.count:
                    return EXIT_OK
            if stop.requested:
                return EXIT_OK
            raise BridgeError("the broker cancelled the tail (was the queue deleted?)")
    except BrokenPipeError:
        # The reader went away (`tail | head`): that is a normal end for a pipe.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except pika.exceptions.AMQPError as exc:
        raise BridgeError(f"lost the broker: {scrub(broker.reason(exc), secrets)}") from None
    finally:
        broker.close(connection)
