"""`tutum-bridge demo`: the whole pipeline on one machine, for a first look.

Starts three child processes: the simulator (a Tutum-compatible stream of made-up
events), the bridge (publishing them to RabbitMQ) and a tail (printing what arrives
on the exchange). The tail's lines go to stdout; the others' logs go to stderr, each
line prefixed with its name. It uses the real exchange (`tutum.events` unless
BRIDGE_EXCHANGE says otherwise), so the user's own tools and workers see the same
events: that is the point of a demo.

Ctrl-C, SIGTERM, SIGHUP or `--duration` stops the children in an order that loses nothing
on screen: the bridge first (it confirms what it holds), then the simulator, then the
tail; each gets SIGTERM, then SIGKILL if it does not exit in time. A child that dies
on its own ends the demo with its exit code and one line saying which one it was.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bridge.config import TOPOLOGY_SETTINGS
from bridge.config import add_arguments as add_setting_arguments
from bridge.config import BRIDGE_ENVIRONMENT, amqp_config, child_environment, from_environment
from bridge.config import parse_seconds
from bridge.errors import EXIT_FAILURE, EXIT_OK, BridgeError
from bridge.tools import broker
from bridge.tools.tail import READY_LINE

DEMO_USER, DEMO_APIKEY = "demo", "demo-apikey"
READY_TIMEOUT = 20.0
# A closed terminal (SIGHUP) must stop the children too: they are not in its group.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_TIMEOUT = {"bridge": 15.0, "simulator": 5.0, "tail": 5.0}   # bridge: shutdown + margin
SETTINGS = broker.SETTINGS + tuple(s for s in TOPOLOGY_SETTINGS if s.name == "quarantine")
# The user's own settings (a production BRIDGE_SPOOL, say) must never reach the
# demo's children: they get exactly the environment built here.


def _rate(text: str) -> str:
    try:
        if float(text) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected events per second (0: as fast as possible), "
                                     f"not {text!r}")


def _duration(text: str) -> float:
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=_rate, default="5", help="simulated events per second")
    parser.add_argument("--pattern", action="append", dest="patterns", metavar="PATTERN",
                        help="routing-key pattern to show (repeatable; default #)")
    parser.add_argument("--seed", type=int, help="simulator seed, for the same events each run")
    parser.add_argument("--duration", type=_duration, metavar="SECONDS",
                        help="stop by itself after this long")
    add_setting_arguments(parser, SETTINGS)


class _Child:
    """One child process whose output is copied, line by line, to our stdout or stderr."""

    _write_lock = threading.Lock()

    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 stdout_to_stdout: bool = False, ready_marker: bytes | None = None) -> None:
        self.name = name
        self.lines_out = 0
        self.ready = threading.Event()     # set when stderr shows `ready_marker`
        # A process group of its own: Ctrl-C in the terminal reaches only the demo, which
        # then stops the children in order. Left in ours, the bridge would get the
        # terminal's SIGINT and then our SIGTERM, which it rightly takes as "force".
        self.popen = subprocess.Popen([sys.executable, "-m", "bridge", *argv], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, process_group=0)
        prefix = f"{name:<9} | ".encode()
        self._pumps = [
            threading.Thread(target=self._pump, daemon=True,
                             args=(self.popen.stdout, sys.stdout.buffer if stdout_to_stdout
                                   else sys.stderr.buffer, b"" if stdout_to_stdout else prefix)),
            threading.Thread(target=self._pump, daemon=True,
                             args=(self.popen.stderr, sys.stderr.buffer, prefix,
                                   ready_marker)),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, source, sink, prefix: bytes, ready_marker: bytes | None = None) -> None:
        for line in source:
            if ready_marker is not None and ready_marker in line:
                self.ready.set()
            if not prefix:
                self.lines_out += 1
            with self._write_lock:
                try:
                    sink.write(prefix + line)
                    sink.flush()
                except (BrokenPipeError, ValueError):
                    pass     # our reader went away; keep draining so the child never blocks

    @property
    def exit_code(self) -> int | None:
        return self.popen.poll()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT[self.name])
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pump in self._pumps:
            pump.join(2)


def _died(child: _Child, when: str) -> BridgeError:
    code = child.exit_code
    error = BridgeError(f"demo: the {child.name} exited with code {code} {when} "
                        f"(its last lines are above)")
    error.exit_code = code if code in (1, 2, 3, 4) else EXIT_FAILURE
    return error


def _wait_ready(child: _Child, ready, stop: broker.StopRequest) -> bool:
    """Until `ready()` is true (True), a stop request (False), or the child's death."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if child.exit_code is not None:
            raise _died(child, "while starting")
        if stop.requested:
            return False
        if time.monotonic() > deadline:
            raise BridgeError(f"demo: the {child.name} was not ready after {READY_TIMEOUT:.0f}s")
        stop.event.wait(0.05)
    return True


def main(args: argparse.Namespace) -> int:
    values = from_environment(args, SETTINGS)
    amqp, _ = amqp_config(values)
    patterns = args.patterns or ["#"]
    base_env = child_environment(BRIDGE_ENVIRONMENT)
    amqp_env = {"AMQP_URL": ",".join(amqp.urls), "BRIDGE_EXCHANGE": amqp.exchange,
                "BRIDGE_UNROUTED": values["unrouted"]}
    for name, path in (("AMQP_CA_FILE", amqp.ca_file), ("AMQP_CERT_FILE", amqp.cert_file),
                       ("AMQP_KEY_FILE", amqp.key_file)):
        if path:
            amqp_env[name] = str(path)
    children: list[_Child] = []
    with tempfile.TemporaryDirectory(prefix="tutum-bridge-demo-") as tmp, \
            broker.StopRequest(signals=STOP_SIGNALS) as stop:
        ready_file = Path(tmp) / "simulator.json"
        try:
            sim = _Child("simulator", [
                "simulate", "--port", "0", "--ready-file", str(ready_file), "--user", DEMO_USER,
                "--apikey", DEMO_APIKEY, "--rate", args.rate,
                *(["--seed", str(args.seed)] if args.seed is not None else [])], base_env)
            children.append(sim)
            if not _wait_ready(sim, lambda: ready_file.exists() and ready_file.read_text(), stop):
                return EXIT_OK
            stream_url = json.loads(ready_file.read_text())["url"]

            # The tail binds before the bridge publishes, so even the first event shows.
            tail = _Child("tail", ["tail", *patterns], {**base_env, **amqp_env},
                          stdout_to_stdout=True, ready_marker=READY_LINE.encode())
            children.append(tail)
            if not _wait_ready(tail, tail.ready.is_set, stop):
                return EXIT_OK

            # Metrics off (a flag: an empty BRIDGE_METRICS_ADDR counts as unset), so the
            # demo never fights a real bridge for its port.
            children.append(_Child("bridge", ["run", "--metrics-addr", ""], {
                **base_env, **amqp_env,
                "TUTUM_STREAM_HOST": stream_url, "TUTUM_USER": DEMO_USER,
                "TUTUM_APIKEY": DEMO_APIKEY, "BRIDGE_QUARANTINE": values["quarantine"],
                "BRIDGE_SPOOL": str(Path(tmp) / "spool.sqlite3"),
                "LOG_FORMAT": "console", "LOG_LEVEL": "info"}))
            sys.stderr.write(
                f"demo: simulator {stream_url} -> bridge -> exchange {amqp.exchange!r} on "
                f"{', '.join(amqp.redacted_urls)} -> tail {' '.join(patterns)}\n"
                f"demo: watch it with your own tools too, e.g. "
                f"tutum-bridge tail 'container.*'. Ctrl-C to stop.\n")
            sys.stderr.flush()

            deadline = time.monotonic() + args.duration if args.duration else None
            while not stop.requested:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                for child in children:
                    if child.exit_code is not None:
                        raise _died(child, "unexpectedly")
                stop.event.wait(0.2)
        finally:
            by_name = {child.name: child for child in children}
            for name in ("bridge", "simulator", "tail"):
                if name in by_name:
                    by_name[name].stop()
        shown = tail.lines_out
        sys.stderr.write(f"demo: stopped; {shown} event{'' if shown == 1 else 's'} shown\n")
        return EXIT_OK
