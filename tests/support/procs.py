"""Start the real simulator and the real bridge as subprocesses, and stop them.

Each process writes its output to files under the test's tmp_path, so a failing test
can show it and a secrets test can read every byte of it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bridge.config import BRIDGE_ENVIRONMENT, child_environment
from tests.support.broker import AMQP_URL
from tests.support.wait import wait_for

SIM_USER = "alice"
SIM_APIKEY = "s3cr3t-apikey-0123456789"


@dataclass
class Proc:
    """A running child process with its output files."""

    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    info: dict = field(default_factory=dict)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def spawn(args: list[str], tmp_path: Path, name: str, env: dict[str, str] | None = None) -> Proc:
    out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
    full_env = child_environment(BRIDGE_ENVIRONMENT)   # a test gives what it wants
    full_env.update(env or {})
    popen = subprocess.Popen([sys.executable, "-m", "bridge", *args],
                             stdout=out.open("wb"), stderr=err.open("wb"),
                             stdin=subprocess.DEVNULL, env=full_env)
    return Proc(popen, out, err)


def start_simulator(tmp_path: Path, *extra: str, name: str = "simulator",
                    user: str = SIM_USER, apikey: str = SIM_APIKEY) -> Proc:
    """`tutum-bridge simulate` on a free port; returns once it listens.

    `proc.info` holds the ready file's JSON: at least `port` and `url` (ws://host:port).
    """
    ready = tmp_path / f"{name}.ready.json"
    proc = spawn(["simulate", "--port", "0", "--ready-file", str(ready),
                  "--user", user, "--apikey", apikey, *extra], tmp_path, name)

    def is_ready():
        if proc.popen.poll() is not None:
            raise AssertionError(f"simulator exited {proc.popen.returncode}: {proc.stderr}")
        return ready.exists() and ready.read_text().strip()

    proc.info = json.loads(wait_for(is_ready, 20, what="simulator ready file"))
    return proc


def bridge_env(sim: Proc, tmp_path: Path, topology_env: dict[str, str],
               **overrides: str) -> dict[str, str]:
    env = {
        "TUTUM_STREAM_HOST": sim.info["url"],
        "TUTUM_USER": SIM_USER,
        "TUTUM_APIKEY": SIM_APIKEY,
        "AMQP_URL": AMQP_URL,
        "BRIDGE_SPOOL": str(tmp_path / "spool.sqlite3"),
        "BRIDGE_METRICS_ADDR": "",
        "BRIDGE_RECONNECT_MAX": "2",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        **topology_env,
    }
    env.update(overrides)
    return env


def start_bridge(tmp_path: Path, env: dict[str, str], *extra: str,
                 name: str = "bridge") -> Proc:
    return spawn(["run", *extra], tmp_path, name, env)


def simulator_stats(sim: Proc) -> dict:
    """The simulator's counters from GET /stats (sent, connections, ...)."""
    url = f"http://127.0.0.1:{sim.info['port']}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def metrics_address(proc: Proc) -> str:
    """Where a bridge serves /metrics, from its `bridge.starting` log line. Tests give
    BRIDGE_METRICS_ADDR port 0: a port picked beforehand can be taken before it binds."""
    def logged():
        if proc.popen.poll() is not None:
            raise AssertionError(f"bridge exited {proc.popen.returncode}:\n{proc.stderr[-3000:]}")
        for line in proc.stderr.splitlines():
            if "bridge.starting" in line:
                return re.search(r"metrics\W+([\d.]+:\d+)", line).group(1)
        return None
    if "metrics" not in proc.info:
        proc.info["metrics"] = wait_for(logged, 20, what="the bridge's metrics address")
    return proc.info["metrics"]


def metric(proc: Proc, name: str, labels: str = "") -> float:
    """One sample from a bridge's /metrics (`labels` as in the exposition, e.g.
    'kind="event"'); 0 if absent. The bridge must have been started with
    BRIDGE_METRICS_ADDR=127.0.0.1:0."""
    with urllib.request.urlopen(f"http://{metrics_address(proc)}/metrics", timeout=5) as r:
        text = r.read().decode()
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
