"""Figures over time: the bridge sampled at fixed intervals, and whether they stayed flat.

A whole-run figure hides a leak, a growing WAL or a latency creep; a sample every few
seconds shows it. The sampler reads the bridge from outside (RSS, CPU, bytes written
to storage, the spool's files on disk) on the wall clock's multiples of the interval, the same stretches the
consumer gives latency percentiles for, so `join` lines the two up by start time.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from bridge.bench.meter import Meter

FLAT_WITHIN = 0.10       # a figure is flat when its last tenth is within 10% of its first
FLAT_FIGURES = ("rss_bytes", "cpu_seconds_per_10k", "p99_ms", "spool_bytes",
                "written_bytes_per_event")


class Sampler:
    """Call `tick` often; every `interval` of wall clock it records one sample."""

    def __init__(self, meter: Meter, interval: float, delivered: Callable[[], int],
                 spool_bytes: Callable[[], int | None]) -> None:
        self.meter, self.interval = meter, interval
        self.delivered, self.spool_bytes = delivered, spool_bytes
        self.samples: list[dict] = []
        self._due = math.ceil(time.time() / interval) * interval
        self._last: tuple[float, float, int, int] | None = None  # start, cpu, delivered, written

    def tick(self) -> None:
        now = time.time()
        if now < self._due:
            return
        boundary = math.floor(now / self.interval) * self.interval
        self._due = boundary + self.interval
        cpu, delivered, written = self.meter.cpu(), self.delivered(), self.meter.written()
        if self._last is not None:
            start, last_cpu, last_delivered, last_written = self._last
            events = delivered - last_delivered
            self.samples.append({
                "t": start, "seconds": boundary - start, "events": events,
                "rss_bytes": self.meter.rss(), "cpu_seconds": cpu - last_cpu,
                "cpu_seconds_per_10k": (cpu - last_cpu) * 10_000 / events if events else None,
                "written_bytes_per_event": (written - last_written) / events if events else None,
                "spool_bytes": self.spool_bytes()})
        self._last = (boundary, cpu, delivered, written)


def join(samples: list[dict], buckets: list[dict]) -> list[dict]:
    """Each sample with the latency percentiles of the consumer's bucket of the same start."""
    by_start = {round(b["t"], 3): b for b in buckets}
    out = []
    for sample in samples:
        bucket = by_start.get(round(sample["t"], 3), {})
        out.append({**sample, "p50_ms": bucket.get("p50"), "p99_ms": bucket.get("p99"),
                    "max_ms": bucket.get("max")})
    return out


def flatness(samples: list[dict]) -> dict:
    """For each figure: the mean of the first and last tenth of the samples, and the verdict."""
    tenth = max(1, len(samples) // 10)
    out = {}
    for key in FLAT_FIGURES:
        first = _mean(s[key] for s in samples[:tenth])
        last = _mean(s[key] for s in samples[-tenth:])
        change = last / first - 1 if first and last is not None else None
        out[key] = {"first_tenth": first, "last_tenth": last, "change": change,
                    "flat": change is not None and abs(change) <= FLAT_WITHIN}
    p99s = [s["p99_ms"] for s in samples if s["p99_ms"] is not None]
    out["p99_ms"]["max"] = max(p99s) if p99s else None
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
