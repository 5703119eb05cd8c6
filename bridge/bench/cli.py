"""`tutum-bridge bench`: the real bridge against the naive one a user would write,
and against the limits of the machine.

Measures, for each bridge, burst throughput, latency at a fixed rate, CPU per event,
peak memory and idle CPU, and the burst of the two ceilings (the stream read and the
broker written as fast as this machine and these libraries allow) and of the pipe
(both halves chained, doing nothing else: what sharing the machine leaves), then
prints a table (and `--json` writes every figure). `--soak` adds a long run at a fixed rate,
sampled as it goes, and `--plot` draws the latency and soak phases over time.
Whatever it started it stops, and whatever it declared on the broker it deletes,
also on Ctrl-C, which exits 130 after the cleanup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pika

from bridge.bench import plot
from bridge.bench.children import BenchError
from bridge.bench.harness import BRIDGES, HA, LIMITS, Bench, Settings
from bridge.bench.report import ratios, table
from bridge.config import BRIDGE_ENVIRONMENT, Setting, child_environment, from_environment, parse_amqp_urls, redact_url
from bridge.config import add_arguments as add_settings
from bridge.errors import ConfigError
from bridge.simulator.fanout import OUTBOX_MAX

AMQP_SETTING = (Setting("amqp_url", "AMQP_URL", "broker to measure against (its first URL)",
                        "amqp://guest:guest@127.0.0.1:5672/%2F", parse_amqp_urls, secret=True),)

# Measured: in a burst of 300,000 the leader fell 200,000 behind its standby's copy
# of the stream, was dropped, and the rest reached the workers only as the standby's
# offers; 150,000 keeps it well within the simulator's bound.
HA_EVENTS_MAX = 150_000


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, not {text!r}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600}


def _duration(text: str) -> float:
    """Seconds, from `90`, `90s`, `30m` or `2h`."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m or 2h, not {text!r}")
    return value


def _bridges(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    known = BRIDGES + LIMITS + (HA,)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown bridge {', '.join(unknown) or '(none)'}; choose from {','.join(known)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=_count(1), default=50_000,
                        help="events in the burst (default 50000)")
    parser.add_argument("--burst-rounds", type=_count(1), default=3, metavar="N",
                        help="measure every burst N times, in turn, and report the median "
                             "round (default 3; a shared machine moves one burst by a fifth)")
    parser.add_argument("--rate", type=_count(1), default=1_000,
                        help="events per second in the latency run (default 1000)")
    parser.add_argument("--latency-seconds", type=_seconds, default=20.0,
                        help="length of the latency run (default 20)")
    parser.add_argument("--idle-seconds", type=_seconds, default=30.0,
                        help="how long idle CPU is measured (default 30)")
    parser.add_argument("--bridges", type=_bridges, default=BRIDGES + LIMITS,
                        help=f"which bridges and ceilings to measure "
                             f"(default {','.join(BRIDGES + LIMITS)})")
    parser.add_argument("--ha", action="store_true",
                        help=f"also measure {HA}: the real bridge with BRIDGE_HA=on, leading, "
                             f"with a second replica witnessing")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--backlog", type=_count(0), default=0, metavar="N",
                        help="also spool N events with the broker cut off and time the drain "
                             "(real bridge only; default off)")
    parser.add_argument("--soak", type=_duration, metavar="DURATION",
                        help="also run the real bridge this long (90s, 30m, 2h) at --soak-rate, "
                             "sampling RSS, CPU, p99 latency and spool size")
    parser.add_argument("--soak-rate", type=_count(1), default=2_000,
                        help="events per second in the soak (default 2000)")
    parser.add_argument("--sample-seconds", type=_seconds, default=10.0,
                        help="seconds between the soak's samples (default 10)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw latency percentiles and RSS over time of the latency and "
                             "soak phases (needs matplotlib: pip install 'tutum-bridge[plot]')")
    add_settings(parser, AMQP_SETTING)


def say(line: str) -> None:
    sys.stderr.write(f"bench {time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()


def _interrupt(signum: int, _frame) -> None:
    # Once is enough: the cleanup that follows must not be cut short by a second Ctrl-C.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def main(args: argparse.Namespace) -> int:
    amqp_url = from_environment(args, AMQP_SETTING)["amqp_url"][0]
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not path.parent.is_dir():
            raise ConfigError(f"{flag}: no directory {path.parent} to write {path.name} in")
    if args.plot:
        plot.check(args)
    if args.backlog and "real" not in args.bridges:
        say("note: --backlog measures the real bridge, which --bridges leaves out")
    bridges = args.bridges + ((HA,) if args.ha and HA not in args.bridges else ())
    if HA in bridges and args.events > HA_EVENTS_MAX:
        raise ConfigError(
            f"--events {args.events}: real-ha's burst is at most {HA_EVENTS_MAX} events; a "
            f"burst happens at once, and the simulator (as Tutum would) drops a client that "
            f"falls {OUTBOX_MAX} events behind, which the leader would")
    settings = Settings(amqp_url=amqp_url, events=args.events, rate=args.rate,
                        latency_seconds=args.latency_seconds, idle_seconds=args.idle_seconds,
                        bridges=bridges, skip_latency=args.skip_latency,
                        skip_idle=args.skip_idle, backlog=args.backlog,
                        soak_seconds=args.soak or 0.0, soak_rate=args.soak_rate,
                        sample_seconds=args.sample_seconds, burst_rounds=args.burst_rounds)
    base_env = child_environment(BRIDGE_ENVIRONMENT)   # nothing configures them unseen
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="tutum-bench-") as workdir:
            bench = Bench(settings, Path(workdir), base_env, say)
            figures = bench.run()
    except Interrupted as exc:
        sys.stderr.write("tutum-bridge: bench interrupted; its processes are stopped and "
                         "its exchange and queue deleted\n")
        return 128 + exc.signum
    except pika.exceptions.AMQPError as exc:
        raise BenchError(f"broker {redact_url(amqp_url)}: {type(exc).__name__} {exc}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(table(figures))
    if args.json:
        report = {"settings": {**asdict(settings), "amqp_url": redact_url(amqp_url)},
                  "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                              "python": platform.python_version()},
                  "broker": bench.topology.names(), "bridges": figures,
                  "ratios": ratios(figures)}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot.draw(figures, args.plot)
        say(f"plot written to {args.plot}")
    return 0
