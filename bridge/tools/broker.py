"""Blocking AMQP for the short-lived tools: connect and declare, with the exit codes of docs/contract.md.

The bridge needs an asynchronous publisher; a tool that declares a queue or prints a
few events does not, so the tools use pika's `BlockingConnection`. What this module
promises is the failure policy of docs/contract.md section 6: a broker that refuses us (login,
vhost, permissions, a name declared with another type) is `BrokerRefused`, exit 4; a
broker we cannot reach is exit 1; either way one line that names the broker by its
redacted URL and never carries a secret.
"""

from __future__ import annotations

import re
import signal
import threading

import pika
import pika.exceptions

from bridge.config import AMQP_SETTINGS, TOPOLOGY_SETTINGS, AmqpConfig
from bridge.errors import BridgeError, BrokerRefused
from bridge.log import scrub
from bridge.topology import exchange_steps

# The settings every tool shares: where the broker is, the exchange, and the alternate
# exchange the bridge declares it with (needed to declare it the same way).
SETTINGS = AMQP_SETTINGS + tuple(s for s in TOPOLOGY_SETTINGS if s.name == "unrouted")

# Reply codes with which a broker says "no" rather than "something broke".
_REFUSALS = {403, 404, 405, 406, 530}


def reason(exc: BaseException) -> str:
    """The broker's reply text or the socket error behind a pika exception, in short."""
    while True:
        inner = getattr(exc, "exception", None)   # pika's connection-phase wrappers
        if not isinstance(inner, BaseException) and exc.args:
            inner = exc.args[0]
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, (pika.exceptions.ConnectionClosed, pika.exceptions.ChannelClosed)):
        return exc.reply_text
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc.args[0]) if exc.args else ""
    # ProbableAuthenticationError and friends wrap the close reason as text:
    # "ConnectionClosedByBroker: (403) 'ACCESS_REFUSED - Login was refused ...'".
    match = re.search(r"\(\d+\) ['\"](.*)['\"]\Z", text)
    return match.group(1) if match else (text or type(exc).__name__)


def connect(amqp: AmqpConfig, secrets: tuple[str, ...], name: str) -> pika.BlockingConnection:
    """A connection to the first broker URL that accepts us; BridgeError otherwise."""
    where = ", ".join(amqp.redacted_urls)
    try:
        return pika.BlockingConnection([amqp.parameters(url, name) for url in amqp.urls])
    except (pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
            pika.exceptions.AuthenticationError,
            pika.exceptions.ConnectionClosedByBroker) as exc:
        raise BrokerRefused(f"broker at {where} refused us: {scrub(reason(exc), secrets)}") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BridgeError(
            f"cannot reach the broker at {where}: {scrub(reason(exc), secrets)}") from None


def refusal(exc: pika.exceptions.AMQPError, what: str) -> BridgeError:
    """The error to raise when the broker closed a channel while we did `what`."""
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code in _REFUSALS:
        return BrokerRefused(f"broker refused to {what}: {exc.reply_text}")
    return BridgeError(f"lost the broker while trying to {what}: {reason(exc)}")


def declare_exchange(channel, exchange: str, unrouted: str) -> None:
    """Declare the exchanges exactly as the bridge does (bridge/topology.py), so a tool
    works before the bridge ever ran and never creates an exchange the bridge would
    then refuse. Another type is exit 4."""
    for step in exchange_steps(exchange, unrouted):
        try:
            step.apply(channel)
        except pika.exceptions.AMQPError as exc:
            raise refusal(exc, step.describe()) from None


def close(connection: pika.BlockingConnection) -> None:
    """Close quietly: on the way out, a broker that is already gone is not news."""
    try:
        if connection.is_open:
            connection.close()
    except (pika.exceptions.AMQPError, OSError):
        pass


class StopRequest:
    """SIGINT and SIGTERM (or the given `signals`) set `event` instead of interrupting whatever runs, so a loop
    stops at a safe point (after the message in hand) and exits 0. Installed only in
    the main thread, the one place Python allows it; the old handlers come back on exit.
    """

    def __init__(self, event: threading.Event | None = None,
                 signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.event = event or threading.Event()
        self.signals = signals
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum, frame) -> None:
        self.event.set()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
