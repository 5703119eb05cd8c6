"""The reconnect backoff: exponential with full jitter, capped, and reset on request.

Every reconnect loop of the bridge uses it; a broker or a stream server that keeps
failing must be retried ever more slowly up to the cap, and reconnecting bridges must
not retry in lockstep.
"""

from __future__ import annotations

import random

from bridge.backoff import Backoff


class Ceiling:
    @staticmethod
    def uniform(_low, high):
        return high


def test_the_ceiling_doubles_up_to_the_cap():
    backoff = Backoff(base=0.25, cap=3, rng=Ceiling())
    assert [backoff.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 3, 3]


def test_reset_starts_again_from_the_base():
    backoff = Backoff(base=0.25, cap=30, rng=Ceiling())
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 0.25


def test_full_jitter_spreads_delays_between_zero_and_the_ceiling():
    delays = [Backoff(base=1, cap=30, rng=random.Random(seed)).next() for seed in range(200)]
    assert all(0 <= d <= 1 for d in delays)
    assert min(delays) < 0.1 and max(delays) > 0.9       # not in lockstep


def test_a_long_outage_never_overflows():
    backoff = Backoff(base=0.25, cap=30, rng=Ceiling())
    for _ in range(10_000):
        delay = backoff.next()
    assert delay == 30
