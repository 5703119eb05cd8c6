"""systemd's notify protocol, so the unit can be `Type=notify` with a watchdog.

`READY=1` once the bridge runs (threads started, listener bound), `WATCHDOG=1` at half
the watchdog interval but only while every thread makes progress (the `/livez`
decision, bridge/health.py), `STOPPING=1` when it begins to stop. A stuck thread thus
stops the keep-alives and systemd restarts the service, as a liveness probe would; a
broker or stream outage does not. Without NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from bridge.config import Notify


class Watchdog:
    def __init__(self, notify: Notify | None, live: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notify, self._live, self._clock = notify, live, clock
        self._last_kick: float | None = None

    def ready(self) -> None:
        self._send(b"READY=1")

    def tick(self) -> None:
        """Call often (the main loop does, every second): kicks when one is due."""
        if self._notify is None or self._notify.watchdog_seconds is None:
            return
        now = self._clock()
        due = self._last_kick is None or now - self._last_kick >= self._notify.watchdog_seconds / 2
        if due and self._live():
            self._send(b"WATCHDOG=1")
            self._last_kick = now

    def stopping(self) -> None:
        self._send(b"STOPPING=1")

    def _send(self, message: bytes) -> None:
        if self._notify is None:
            return
        address = self._notify.socket
        if address.startswith("@"):                     # the abstract namespace
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, address)
        except OSError:
            pass  # systemd gone or not listening: nothing a bridge could do about it
