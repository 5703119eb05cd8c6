"""What a bridge process costs: CPU seconds, disk writes and peak resident memory, read
from outside.

CPU is user+system time of the process itself (psutil, or the scheduler's exact
counters for idle spans), so the figures are the bridge's alone, whatever else runs
on the machine. Peak RSS is the kernel's own
high-water mark (VmHWM), exact where polling would miss short peaks.
"""

from __future__ import annotations

from pathlib import Path

import psutil


class Meter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process = psutil.Process(pid)

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def cpu_exact(self) -> float:
        """CPU seconds of the live threads, from the scheduler's nanosecond counters.

        Tick-based times (`cpu`) move in 10 ms steps, which rounds an idle process's
        short wakeups (pings, timers) to zero; this does not. Threads that have
        exited are missing, so use it over spans where none come and go.
        """
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended while we looked
        return total / 1e9

    def written(self) -> int:
        """Bytes the process has caused to be written to storage (its spool, its logs):
        the disk the broker shares, which a burst can make the bottleneck."""
        return self.process.io_counters().write_bytes

    def rss(self) -> int:
        """Bytes resident now."""
        return self.process.memory_info().rss

    def peak_rss(self) -> int:
        """Bytes; the largest the process has been since it started."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return self.process.memory_info().rss
