"""`tutum-bridge simulate`: serve a Tutum-compatible event stream.

For demos, staging and the tests, since the hosted service is gone. Defaults make
`tutum-bridge demo` work out of the box (user `demo`, API key `demo-apikey`, 5
events/s); the fault knobs (`--drop-every`, `--malformed-every`, `--stall-after`)
exist so the bridge's promises can be tested against a misbehaving server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Callable

from bridge import config
from bridge.errors import EXIT_OK, ConfigError
from bridge.simulator.auth import Credentials
from bridge.simulator.server import Settings, Simulator
from bridge.simulator.source import Source, frames, generated, replayed
from bridge.simulator.world import World

# With --seed the world starts at a fixed moment of Tutum's era, so datetimes repeat too.
SEEDED_START = 1433116800.0     # Mon, 01 Jun 2015 00:00:00 +0000

CREDENTIAL_SETTINGS = (
    config.Setting("user", "TUTUM_USER", "user name to accept", "demo"),
    config.Setting("apikey", "TUTUM_APIKEY", "API key to accept (default demo-apikey)",
                   "demo-apikey", secret=True),
    config.Setting("auth", "TUTUM_AUTH", "an extra Authorization header value to accept "
                   "verbatim", secret=True),
)


def _arg(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    """An argparse type whose error says why, not just 'invalid value'."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    convert.__name__ = name
    return convert


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("expected 0 to 65535 (0 picks a free port)")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected events per second, 0 for as fast as possible")
    return value


_positive = _arg(config.parse_positive_int, "positive whole number")
_file = _arg(config.parse_existing_file, "file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on "
                        "(default 127.0.0.1)")
    parser.add_argument("--port", type=_arg(_port, "port"), default=8765,
                        help="port to listen on, 0 picks a free one (default 8765)")
    parser.add_argument("--ready-file", type=Path, metavar="PATH",
                        help='once listening, write {"port": P, "url": "ws://..."} here')
    config.add_arguments(parser, CREDENTIAL_SETTINGS)
    parser.add_argument("--rate", type=_arg(_rate, "rate"), default=5.0,
                        help="events per second per connection, 0 = as fast as possible "
                        "(default 5)")
    parser.add_argument("--count", type=_positive, metavar="N",
                        help="stop after N events in all (connections stay open, silent)")
    parser.add_argument("--prebuild", action="store_true",
                        help="with --count, build the whole stream before listening, so "
                        "no event is generated while it streams (for benchmarks: a burst "
                        "then measures the client, not the event generator; the "
                        "greeting's datetimes are the world's time at the end)")
    parser.add_argument("--seed", type=_arg(int, "seed"),
                        help="seed of the event generator: the same seed, the same stream")
    parser.add_argument("--sequence", action="store_true",
                        help='add "sim_seq" (global, from 1) and "sim_sent_at" to each event')
    parser.add_argument("--fanout", action="store_true",
                        help="events happen in real time and every connected client gets "
                        "each one (several replicas of one account); default: each event "
                        "goes to one connection, handed over without loss")
    parser.add_argument("--clients", type=_positive, default=1, metavar="N",
                        help="with --fanout, the world starts once N clients are connected, "
                        "so a burst reaches all of them (default 1)")
    parser.add_argument("--replay", type=_file, metavar="FILE",
                        help="send each line of a JSON-lines file verbatim instead")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument("--drop-every", type=_positive, metavar="N",
                        help="close each connection cleanly after N events")
    faults.add_argument("--malformed-every", type=_positive, metavar="N",
                        help="send a malformed frame after every N events")
    faults.add_argument("--stall-after", type=_positive, metavar="N",
                        help="after N events on a connection, go silent and stop "
                        "answering pings (a half-open link)")
    faults.add_argument("--stall-seconds", type=_arg(config.parse_seconds, "seconds"),
                        metavar="S", help="how long a stall lasts (default 30)")
    tls = parser.add_argument_group("TLS (serve wss://)")
    tls.add_argument("--certfile", type=_file, help="certificate chain (PEM)")
    tls.add_argument("--keyfile", type=_file, help="private key, if not in --certfile")


def main(args: argparse.Namespace) -> int:
    values = config.from_environment(args, CREDENTIAL_SETTINGS)
    if args.keyfile and not args.certfile:
        raise ConfigError("--keyfile needs --certfile")
    if args.stall_seconds is not None and not args.stall_after:
        raise ConfigError("--stall-seconds needs --stall-after")
    if args.ready_file and not args.ready_file.parent.is_dir():
        raise ConfigError(f"--ready-file: no directory {args.ready_file.parent}")
    if args.clients > 1 and not args.fanout:
        raise ConfigError("--clients needs --fanout")
    if args.fanout and args.stall_after:
        raise ConfigError("--stall-after is not supported with --fanout")
    if args.prebuild and not args.count:
        raise ConfigError("--prebuild needs --count")
    if not values["user"] or not values["apikey"]:
        raise ConfigError("empty user name or API key")

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    if args.replay:
        bodies, clock = replayed(args.replay), time.time
    else:
        world = World(random.Random(seed),
                      SEEDED_START if args.seed is not None else time.time())
        bodies, clock = generated(world.events()), lambda: world.now
    settings = Settings(
        host=args.host, port=args.port, rate=args.rate,
        # Replayed lines are sent verbatim: never stamped.
        sequence=args.sequence and not args.replay,
        drop_every=args.drop_every, stall_after=args.stall_after,
        stall_seconds=args.stall_seconds or 30.0, ready_file=args.ready_file,
        certfile=args.certfile, keyfile=args.keyfile, seed=seed, fanout=args.fanout,
        clients=args.clients)
    stream = frames(bodies, args.count, args.malformed_every)
    if args.prebuild:
        stream = iter(list(stream))
    simulator = Simulator(
        settings, Credentials(values["user"], values["apikey"], values["auth"]),
        Source(stream), clock)
    asyncio.run(simulator.serve())
    return EXIT_OK
