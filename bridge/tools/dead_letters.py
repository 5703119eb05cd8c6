"""`tutum-bridge dead-letters list|replay`: the events the broker refused for good.

The bridge sets an event aside (bridge/dead_letters.py) when the broker will never
take it as things are: a body above `max_message_size`, headers above `frame_max`.
Once the operator has fixed the cause, `replay` publishes each one as the bridge
would have (same exchange, routing key, headers, `message_id` and `timestamp`, plus
`x-republished: true`: a replay cut short between a confirm and the removal publishes
that event again next time), waits for the broker's confirm, and only then removes it
from the file. An event the broker still
refuses stays, and the verb says why in one line and exits 1. `list` shows what is
there, for a person or (`--json`) for a machine.

It works beside a running bridge: the bridge only adds to the file, this only removes
what the broker confirmed. Replayed events arrive after the ones that came behind
them; their `timestamp` says when they were received.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pika.exceptions

from bridge.amqp_encode import properties
from bridge.config import RUN_SETTINGS, TOPOLOGY_SETTINGS, amqp_config, from_environment, spool_path
from bridge.config import add_arguments as add_setting_arguments
from bridge.dead_letters import DeadLetter, DeadLetters, path_beside
from bridge.errors import EXIT_FAILURE, EXIT_OK, BridgeError
from bridge.log import scrub
from bridge.tools import broker
from bridge.topology import Topology

SETTINGS = (broker.SETTINGS
            + tuple(s for s in TOPOLOGY_SETTINGS if s.name == "quarantine")
            + tuple(s for s in RUN_SETTINGS if s.name in ("state_dir", "spool")))
QUARANTINE_HEADER = "x-quarantine-reason"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "replay"),
                        help="list: show the events set aside; replay: publish them "
                             "again, removing each one the broker confirms")
    parser.add_argument("--json", action="store_true",
                        help="list: one JSON object per line, for machines")
    add_setting_arguments(parser, SETTINGS)


def main(args: argparse.Namespace) -> int:
    values = from_environment(args, SETTINGS)
    path = path_beside(spool_path(values))
    if not path.exists():
        sys.stderr.write(f"tutum-bridge: no events set aside ({path} does not exist)\n")
        return EXIT_OK
    store = DeadLetters(path)
    try:
        if args.action == "list":
            return _list(store.entries(), args.json)
        return _replay(store, values, path)
    finally:
        store.close()


def _list(entries: list[DeadLetter], as_json: bool) -> int:
    if entries and not as_json:
        print(f"{'seq':>8}  {'set aside at':<19}  {'routing key':<28} {'body':>11}  reason")
    for entry in entries:
        if as_json:
            print(json.dumps({
                "seq": entry.seq, "message_id": entry.message_id,
                "routing_key": entry.routing_key, "bytes": len(entry.body),
                "received_at": entry.received_at, "set_aside_at": entry.set_aside_at,
                "reason": entry.reason, "headers": entry.headers}), flush=True)
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.set_aside_at))
            print(f"{entry.seq:>8}  {when}  {entry.routing_key:<28} {len(entry.body):>9} B  "
                  f"{entry.reason}", flush=True)
    if not as_json:
        sys.stderr.write(f"{len(entries)} event(s) set aside\n")
    return EXIT_OK


def _replay(store: DeadLetters, values: dict, path: Path) -> int:
    entries = store.entries()
    if not entries:
        sys.stderr.write("tutum-bridge: no events set aside\n")
        return EXIT_OK
    amqp, secrets = amqp_config(values)
    connection = broker.connect(amqp, secrets, "dead-letters")
    topology = Topology(amqp.exchange, values["unrouted"], values["quarantine"])
    refused: list[tuple[DeadLetter, str]] = []
    try:
        channel = _channel(connection, amqp.exchange, values["unrouted"])
        for entry in entries:
            exchange, key = topology.destination(entry.routing_key,
                                                 QUARANTINE_HEADER in entry.headers)
            headers = {**entry.headers, "x-republished": True}
            try:
                channel.basic_publish(exchange, key, entry.body, properties(
                    entry.message_id, int(entry.received_at), headers))
            except pika.exceptions.NackError:
                refused.append((entry, "the broker nacked it (a full queue?)"))
                continue
            except pika.exceptions.ChannelClosedByBroker as exc:
                refused.append((entry, f"{exc.reply_code} {exc.reply_text}"))
                channel = _channel(connection, amqp.exchange, values["unrouted"])
                continue
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise BridgeError(f"lost the broker while replaying seq {entry.seq}: "
                                  f"{scrub(broker.reason(exc), secrets)}; what was not "
                                  f"confirmed stays in {path}") from None
            store.remove(entry.seq)
            print(f"replayed seq={entry.seq} message_id={entry.message_id} "
                  f"routing_key={key}", flush=True)
    finally:
        broker.close(connection)
    if refused:
        entry, why = refused[0]
        sys.stderr.write(f"tutum-bridge: {len(entries) - len(refused)} of {len(entries)} "
                         f"replayed; the broker still refuses {len(refused)} (seq "
                         f"{entry.seq}: {why}); they stay in {path}\n")
        return EXIT_FAILURE
    sys.stderr.write(f"{len(entries)} event(s) replayed and removed from {path}\n")
    return EXIT_OK


def _channel(connection, exchange: str, unrouted: str):
    """A confirming channel, with the exchanges declared as the bridge declares them."""
    channel = connection.channel()
    broker.declare_exchange(channel, exchange, unrouted)
    channel.confirm_delivery()
    return channel
