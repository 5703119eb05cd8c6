"""`tutum-bridge bind QUEUE PATTERN ...`: declare a worker's durable queue and its bindings.

Everything here is idempotent, so a worker's start script or a deployment job can
run it every time: the exchange is declared exactly as the bridge declares it, the
queue durable (classic, or quorum with `--quorum` for a replicated queue on a
cluster), and each pattern bound. Declaring the queue before the worker first runs
means no event is missed while the worker is not yet up. `--dead-letter DLQ` also
declares the durable queue DLQ and makes the broker move there what the queue rejects
or drops (a worker's poison message, the overflow of `--max-length N`), so nothing is
lost silently; `--max-length N` caps the queue at N messages, dropping the oldest. A
name that already exists with another type or other arguments is refused by the
broker: exit 4 with its reason.
"""

from __future__ import annotations

import argparse
import sys

import pika.exceptions

from bridge.config import add_arguments as add_setting_arguments
from bridge.config import amqp_config, from_environment, parse_exchange_name
from bridge.errors import EXIT_OK, ConfigError
from bridge.tools import broker
from bridge.tools.tail import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", metavar="QUEUE", help="durable queue to declare")
    parser.add_argument("patterns", metavar="PATTERN", nargs="+",
                        help="routing-key pattern such as container.* or *.delete")
    parser.add_argument("--quorum", action="store_true",
                        help="a quorum queue (x-queue-type quorum), replicated on a cluster; "
                             "a queue's type cannot change once declared")
    parser.add_argument("--dead-letter", metavar="DLQ",
                        help="durable queue that receives what QUEUE rejects or drops "
                             "(declared too)")
    parser.add_argument("--max-length", type=positive_int, metavar="N",
                        help="keep at most N messages, dropping the oldest (to DLQ with "
                             "--dead-letter)")
    add_setting_arguments(parser, broker.SETTINGS)


def main(args: argparse.Namespace) -> int:
    for what, name in (("QUEUE", args.queue), ("--dead-letter", args.dead_letter)):
        try:
            if name is not None:
                parse_exchange_name(name)   # queue names follow the same rules
        except ValueError as exc:
            raise ConfigError(f"{what} {name!r}: {exc}") from None
    values = from_environment(args, broker.SETTINGS)
    amqp, secrets = amqp_config(values)
    kind = "quorum" if args.quorum else "classic"
    # A classic queue is declared without x-queue-type, which also matches a classic
    # queue somebody declared by hand without it.
    arguments = {"x-queue-type": "quorum"} if args.quorum else {}
    if args.dead_letter:
        arguments.update({"x-dead-letter-exchange": "",
                          "x-dead-letter-routing-key": args.dead_letter})
    if args.max_length:
        arguments["x-max-length"] = args.max_length
    connection = broker.connect(amqp, secrets, "bind")
    try:
        channel = connection.channel()
        broker.declare_exchange(channel, amqp.exchange, values["unrouted"])
        try:
            if args.dead_letter:
                channel.queue_declare(args.dead_letter, durable=True)
            declared = channel.queue_declare(args.queue, durable=True,
                                             arguments=arguments or None)
        except pika.exceptions.AMQPError as exc:
            raise broker.refusal(exc, f"declare {kind} queue {args.queue!r}") from None
        try:
            for pattern in args.patterns:
                channel.queue_bind(args.queue, amqp.exchange, pattern)
        except pika.exceptions.AMQPError as exc:
            raise broker.refusal(exc, f"bind queue {args.queue!r} to {amqp.exchange!r}") from None
    finally:
        broker.close(connection)
    waiting = declared.method.message_count
    sys.stdout.write(
        f"declared durable {kind} queue {args.queue!r} bound to {amqp.exchange!r} with "
        f"{', '.join(repr(p) for p in args.patterns)} ({waiting} message"
        f"{'' if waiting == 1 else 's'} waiting)"
        + (f", dead letters to {args.dead_letter!r}" if args.dead_letter else "")
        + (f", at most {args.max_length} messages" if args.max_length else "") + "\n")
    return EXIT_OK
