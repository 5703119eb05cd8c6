"""Figures over time: the bridge sampled at fixed intervals, and whether they stayed flat.

A whole-run figure hides a leak, a growing WAL or a latency creep; a sample every few
seconds shows it. The sampler reads the bridge from outside (RSS, CPU, bytes written
to storage, the spool's files on disk) on the wall clock's multiples of the interval, the same stretches the
consumer gives latency percentiles for, so `join` lines the two up by start time.
Each sample also has the whole machine's CPU over its stretch (busy, waiting for I/O,
stolen by the hypervisor) and its pressure (the share of the stretch during which some
task was ready to run but waited for a CPU, or waited for I/O: Linux's PSI), so a slow
stretch can be told from a busy or shared machine: the cores the bridge runs on are not
its own. Busy is an average; pressure counts the waiting, which is what delays events.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

from bridge.bench.meter import Meter

FLAT_WITHIN = 0.10       # a figure is flat when its last tenth is within 10% of its first
FLAT_FIGURES = ("rss_bytes", "cpu_seconds_per_10k", "p99_ms", "spool_bytes",
                "written_bytes_per_event")
PROC_STAT = "/proc/stat"
PROC_PRESSURE = "/proc/pressure"
MACHINE_FIGURES = ("machine_busy", "machine_iowait", "machine_steal",
                   "machine_cpu_pressure", "machine_io_pressure")


class MachineReading(NamedTuple):
    jiffies: tuple[int, int, int, int]     # `machine_jiffies`
    cpu_stalled_us: int | None             # PSI "some" totals; None without PSI
    io_stalled_us: int | None
    at: float                              # time.monotonic()


def machine_jiffies(text: str) -> tuple[int, int, int, int]:
    """(busy, iowait, steal, total) clock ticks of all CPUs, from /proc/stat's text."""
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq
    return busy, iowait, steal, busy + idle + iowait + steal


def stalled_us(text: str) -> int:
    """Microseconds some task stalled, from a /proc/pressure file's `some` line."""
    for line in text.splitlines():
        if line.startswith("some "):
            return int(line.partition("total=")[2])   # ValueError if it is missing
    raise ValueError("no 'some' line")


def _read_pressure(resource: str) -> int | None:
    try:
        with open(f"{PROC_PRESSURE}/{resource}") as f:
            return stalled_us(f.read())
    except (OSError, ValueError):
        return None         # a kernel without PSI, or with it off (psi=0)


def read_machine() -> MachineReading | None:
    try:
        with open(PROC_STAT) as f:
            jiffies = machine_jiffies(f.read())
    except (OSError, ValueError):
        return None         # not Linux: the samples carry None
    return MachineReading(jiffies, _read_pressure("cpu"), _read_pressure("io"),
                          time.monotonic())


class Sampler:
    """Call `tick` often; every `interval` of wall clock it records one sample."""

    def __init__(self, meter: Meter, interval: float, delivered: Callable[[], int],
                 spool_bytes: Callable[[], int | None],
                 legs: Callable[[], dict] | None = None) -> None:
        self.meter, self.interval = meter, interval
        self.delivered, self.spool_bytes = delivered, spool_bytes
        self.legs = legs        # figures since its previous call (bridge/bench/legs.py)
        self.samples: list[dict] = []
        self._due = math.ceil(time.time() / interval) * interval
        self._last: tuple | None = None     # start, cpu, delivered, written, machine

    def tick(self) -> None:
        now = time.time()
        if now < self._due:
            return
        boundary = math.floor(now / self.interval) * self.interval
        self._due = boundary + self.interval
        cpu, delivered, written = self.meter.cpu(), self.delivered(), self.meter.written()
        machine = read_machine()
        legs = self.legs() if self.legs else {}
        if self._last is not None:
            start, last_cpu, last_delivered, last_written, last_machine = self._last
            events = delivered - last_delivered
            self.samples.append({
                "t": start, "seconds": boundary - start, "events": events,
                "rss_bytes": self.meter.rss(), "cpu_seconds": cpu - last_cpu,
                "cpu_seconds_per_10k": (cpu - last_cpu) * 10_000 / events if events else None,
                "written_bytes_per_event": (written - last_written) / events if events else None,
                "spool_bytes": self.spool_bytes(), **machine_shares(last_machine, machine),
                **legs})
        self._last = (boundary, cpu, delivered, written, machine)


def machine_shares(before: MachineReading | None, after: MachineReading | None) -> dict:
    """The machine's busy, iowait and steal shares of all its CPU time in between, and
    the shares of the time in between that some task waited for a CPU, or for I/O."""
    if before is None or after is None or after.jiffies[3] <= before.jiffies[3]:
        return dict.fromkeys(MACHINE_FIGURES)
    total = after.jiffies[3] - before.jiffies[3]
    busy, iowait, steal = ((a - b) / total for a, b in zip(after.jiffies[:3], before.jiffies))
    wall_us = (after.at - before.at) * 1e6
    return {"machine_busy": busy, "machine_iowait": iowait, "machine_steal": steal,
            "machine_cpu_pressure": _stalled_share(before.cpu_stalled_us,
                                                   after.cpu_stalled_us, wall_us),
            "machine_io_pressure": _stalled_share(before.io_stalled_us,
                                                  after.io_stalled_us, wall_us)}


def _stalled_share(was: int | None, now: int | None, wall_us: float) -> float | None:
    if was is None or now is None or wall_us <= 0:
        return None
    return min(1.0, (now - was) / wall_us)


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
