"""Liveness and readiness as data (docs/contract.md section 9); metrics.py serves them.

An HTTP thread that answers proves only that the HTTP thread lives. So each
long-lived thread of the bridge (stream, publisher IOLoop, main) holds a `Heart` and
beats it where its loop comes round; a heart has a budget, the longest its thread may
legitimately go between two beats (a reconnect backoff, a connect timeout, a read
waiting out the ping interval). A heart older than its budget is a stuck thread, and
`/livez` answers 503 naming it: that is what a liveness probe or a watchdog restarts
on. Conditions that are not a beat (a thread that died, a spool that cannot
checkpoint, a stream not authenticated) are checks, each returning a reason or None.

Waiting is progress: a thread waiting out a broker outage or a full spool beats as it
waits, so an outage makes the bridge unready (a check of `/readyz`), never un-live.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

Check = Callable[[], "str | None"]


class Heart:
    """One thread's heartbeat; `beat` is a single assignment, cheap in any loop."""

    def __init__(self, name: str, budget: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.budget = budget
        self._clock = clock
        self.last = clock()
        self.stopped = False

    def beat(self) -> None:
        self.last = self._clock()

    def stop(self) -> None:
        """The thread ends on purpose (shutdown): no longer a failure."""
        self.stopped = True


class Health:
    """Hearts and checks; `check()` is what a probe endpoint answers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._hearts: list[Heart] = []
        self._checks: list[tuple[str, Check]] = []
        self._lock = threading.Lock()

    def heart(self, name: str, budget: float) -> Heart:
        heart = Heart(name, budget, self._clock)
        with self._lock:
            self._hearts.append(heart)
        return heart

    def add_check(self, name: str, check: Check) -> None:
        """`check()` returns why `name` fails, or None while it is fine."""
        with self._lock:
            self._checks.append((name, check))

    def check(self, **detail) -> tuple[bool, dict]:
        """(ok, body): the body names every failing part with its reason, plus `detail`."""
        now = self._clock()
        with self._lock:
            hearts, checks = list(self._hearts), list(self._checks)
        failing: dict[str, str] = {}
        since: dict[str, float] = {}
        for heart in hearts:
            if heart.stopped:
                continue
            age = now - heart.last
            since[heart.name] = round(age, 1)
            if age > heart.budget:
                failing[heart.name] = (f"no progress for {age:.0f}s "
                                       f"(the limit is {heart.budget:.0f}s)")
        for name, check in checks:
            reason = check()
            if reason:
                failing[name] = reason
        body: dict = {"ok": not failing, **({"failing": failing} if failing else {})}
        if since:
            body["seconds_since_progress"] = since
        body.update(detail)
        return not failing, body
