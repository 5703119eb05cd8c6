"""The benchmark's child processes: each in its own process group, all stopped at the end.

A child runs in a new session so a Ctrl-C at the terminal reaches only the benchmark,
which then stops every child itself, in order, and exits; a stopped child's whole
group goes, so nothing it started outlives the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from bridge.errors import BridgeError

T = TypeVar("T")


class BenchError(BridgeError):
    """The benchmark could not measure something: exit 1 with one line."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        """Raise if the child has died: a benchmark of a dead process measures nothing."""
        if self.popen.poll() is not None:
            raise BenchError(f"{self.name} exited {self.popen.returncode}: {self.last_line()}")

    def last_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line]
        return lines[-1][:300] if lines else "(no output)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group, then SIGKILL if it is still there after `timeout`.

        Signals go only while the leader is unreaped, so its id is still ours.
        """
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue


class Children:
    """Every process one benchmark run started; `stop_all` runs in a finally."""

    def __init__(self, workdir: Path, base_env: dict[str, str]) -> None:
        self.workdir, self.base_env = workdir, base_env
        self.running: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**self.base_env, **(env or {})},
                                     start_new_session=True)
        child = Child(name, popen, log)
        self.running.append(child)
        return child

    def stop(self, *children: Child) -> None:
        for child in children:
            child.stop()
            if child in self.running:
                self.running.remove(child)

    def stop_all(self) -> None:
        self.stop(*reversed(self.running))

    def simulator(self, name: str, user: str, apikey: str, *flags: str) -> Child:
        """`simulate` on a free port; returns once its ready file says where it listens."""
        ready = self.workdir / f"{name}.ready.json"
        sim = self.start(name, ["-m", "bridge", "simulate", "--port", "0", "--ready-file",
                                str(ready), "--user", user, "--apikey", apikey, *flags])
        sim.info = json.loads(wait_until(lambda: ready.exists() and ready.read_text().strip(),
                                         20, "the simulator's ready file", sim))
        return sim


def sim_stats(sim: Child) -> dict:
    """The simulator's counters (GET /stats): `sent` at least."""
    url = f"http://127.0.0.1:{sim.info['port']}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               *watched: Child, interval: float = 0.02) -> T:
    """Poll `condition` until truthy, failing if a watched child dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for child in watched:
            child.check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
