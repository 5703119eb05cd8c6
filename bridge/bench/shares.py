"""Where a burst's CPU went: each process of the measurement, the broker, and the rest.

A burst keeps every core of a small machine busy, and the bridge shares them with the
broker it publishes to, the simulator and the consumer. So its throughput is set by
the sum of everyone's CPU per event, not by its own alone, and the broker's share is
the same whoever publishes the same messages: that is why a bridge that spends a few
microseconds more per event than the limit's publisher loses more than that share of
the limit's throughput. These figures show it in each run instead of leaving it to a
profile: each process's CPU (the scheduler's nanosecond counters) and the machine's
busy time over the same stretch, per 10k events. `other` is the rest of the busy time:
the harness, and on a shared machine its other tenants.

The broker is counted when it runs on this machine and the process that listens on its
port can be seen (as root, or as the broker's user); else its CPU is in `other`.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import psutil

from bridge.bench.meter import Meter
from bridge.bench.timeline import read_machine

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def broker_pid(amqp_url: str) -> int | None:
    """The process listening on the URL's port, if the broker is on this machine and
    its process can be seen."""
    parts = urlsplit(amqp_url)
    if parts.hostname not in LOCAL_HOSTS:
        return None
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    try:
        connections = psutil.net_connections("tcp")
    except (psutil.Error, OSError):
        return None
    return next((c.pid for c in connections if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == port and c.pid), None)


class CpuShares:
    """The CPU of named processes and of the machine between `start` and `stop`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._meters = {role: Meter(pid) for role, pid in pids.items() if pid is not None}
        self._before: tuple | None = None

    def start(self) -> None:
        self._before = (self._cpu(), read_machine(), time.monotonic())

    def stop(self, events: int) -> dict:
        """CPU seconds per 10k of `events`, by role and for the rest of the machine, and
        how many cores were busy on average."""
        cpu_before, machine_before, started = self._before
        cpu, machine, wall = self._cpu(), read_machine(), time.monotonic() - started
        per_10k = 10_000 / events
        roles = {role: (cpu[role] - cpu_before[role]) * per_10k for role in cpu
                 if cpu[role] is not None and cpu_before[role] is not None}
        out = {"seconds": wall, "cores": os.cpu_count(), "cores_busy": None,
               "cpu_seconds_per_10k": roles}
        if machine is not None and machine_before is not None and wall > 0:
            busy = (machine.jiffies[0] - machine_before.jiffies[0]) / CLOCK_TICKS
            out["cores_busy"] = busy / wall
            roles["other"] = max(0.0, busy * per_10k - sum(roles.values()))
        return out

    def _cpu(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for role, meter in self._meters.items():
            try:
                out[role] = meter.cpu_exact()
            except OSError:
                out[role] = None        # the process is gone: not counted
        return out
