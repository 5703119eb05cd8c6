"""Per-connection pacing that keeps the configured rate exact over any stretch.

Sleeping `1/rate` per event drifts (every sleep is late, and sending takes time too);
a schedule on the monotonic clock does not: late or slow, the next call catches up.
"""

from __future__ import annotations

import asyncio
import math
import time


class Pacer:
    """How many events a connection may send now, on a monotonic schedule.

    Event k (from 0) is due at `start + k / rate`, so sleeping late or sending slowly
    is caught up and the average rate stays exact; `restart` forgets the schedule
    (after a stall the stream resumes at the rate, not with a burst).
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.restart()

    def restart(self) -> None:
        self._start: float | None = None
        self._sent = 0

    async def allowance(self, limit: int) -> int:
        if not self.rate:
            return limit
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = math.floor((now - self._start) * self.rate) + 1 - self._sent
        if due <= 0:
            await asyncio.sleep(self._start + self._sent / self.rate - now)
            due = 1
        return min(due, limit)

    def sent(self, n: int) -> None:
        self._sent += n
