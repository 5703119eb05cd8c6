"""What a bridge process costs: CPU seconds and peak resident memory, read from outside.

CPU is user+system time of the process itself (psutil), so the figures are the
bridge's alone, whatever else runs on the machine. Peak RSS is the kernel's own
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

    def peak_rss(self) -> int:
        """Bytes; the largest the process has been since it started."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return self.process.memory_info().rss
