"""The `tutum-bridge` entry point: one verb per job, and one exit-code policy.

Each verb lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their verb runs, so `--help` and
the simulator stay light. Whatever a verb raises ends here as one line on stderr and
the exit code of docs/contract.md section 6 -- never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bridge import __version__
from bridge.errors import EXIT_CONFIG, EXIT_FAILURE, BridgeError

VERBS = {
    "run": ("bridge.app", "run the bridge: stream -> RabbitMQ (the default verb)"),
    "simulate": ("bridge.simulator.cli", "serve a Tutum-compatible event stream"),
    "tail": ("bridge.tools.tail", "print events matching routing-key patterns, live"),
    "bind": ("bridge.tools.bind", "declare a durable queue bound to routing-key patterns"),
    "demo": ("bridge.tools.demo", "simulator, bridge and tail together, for a first look"),
    "bench": ("bridge.bench.cli", "throughput and latency benchmark against a naive bridge"),
    "dead-letters": ("bridge.tools.dead_letters",
                     "list the events the broker refused for good, or replay them"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (argparse prints usage too),
    and no abbreviations: `--amqp-ur URL` would parse as `--amqp-url` yet escape
    `hide_secret_flags`, which matches whole flag names, leaving a secret on the
    command line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        head, sep, rest = message.partition("unrecognized arguments: ")
        if sep:
            # The values may be secrets given to a mistyped flag: name the flags only.
            flags = [a.partition("=")[0] for a in rest.split() if a.startswith("-")]
            message = f"{head}unrecognized arguments: {' '.join(flags) or '(values)'}"
        sys.stderr.write(f"tutum-bridge: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_CONFIG)


def build_parser(verb: str) -> argparse.ArgumentParser:
    parser = _Parser(prog="tutum-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tutum-bridge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module).add_arguments(sub)
    return parser


def _secret_flags() -> dict[str, str]:
    """Flag -> environment variable, for every setting that holds a secret."""
    from bridge import config
    settings = config.ALL_RUN_SETTINGS
    return {s.flag: s.env for s in settings if s.secret and s.env}


def hide_secret_flags(argv: list[str]) -> None:
    """Re-execute without secrets on the command line, if any were given as flags.

    Anyone on the machine can read a process's arguments (`ps`, /proc/PID/cmdline),
    but not its environment. So a secret flag moves to its environment variable (a flag
    wins over the environment, and still does: it is the only value left) and the
    process replaces itself, keeping its PID, with the same command minus the secret.
    """
    from bridge import config
    flags = _secret_flags()
    env, kept, moved = config.child_environment(), [], False
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in flags:
            env[flags[name]] = value if eq else next(args, "")
            moved = True
        else:
            kept.append(arg)
    if moved:
        os.execve(sys.executable, [sys.executable, "-m", "bridge", *kept], env)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        hide_secret_flags(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")
    verb = argv[0] if argv[0] in VERBS else None
    try:
        args = build_parser(verb).parse_args(argv)
        if args.verb is None:
            build_parser(None).print_help()
            return EXIT_CONFIG
        return importlib.import_module(VERBS[args.verb][0]).main(args)
    except BridgeError as exc:
        sys.stderr.write(f"tutum-bridge: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise is: never a traceback
        sys.stderr.write(f"tutum-bridge: unexpected error: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILURE
