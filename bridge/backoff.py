"""Exponential backoff with full jitter, for every reconnect loop in the bridge.

Full jitter (a uniform delay between zero and the exponential ceiling) spreads
reconnecting bridges out, so a recovering server is not hit by all of them at once.
"""

from __future__ import annotations

import random


class Backoff:
    """`next()` returns the next delay in seconds; `reset()` after a success."""

    def __init__(self, base: float = 0.25, cap: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0
