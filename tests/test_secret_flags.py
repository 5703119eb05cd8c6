"""A secret given as a flag never shows in the process's command line.

Anyone on the machine can read another process's arguments (`ps`, /proc/PID/cmdline);
the bridge moves secret flags into its environment and re-executes itself, keeping
its PID, so the secret is not there once the bridge runs.
"""

from __future__ import annotations

from pathlib import Path

from tests.support import procs
from tests.support.broker import drain


def test_apikey_and_amqp_password_flags_leave_the_command_line(tmp_path, simulator,
                                                                topology, processes):
    queue = topology.bind("#")
    sim = simulator("--seed", "4", "--count", "5", "--rate", "0")
    env = procs.bridge_env(sim, tmp_path, topology.bridge_env())
    apikey, amqp_url = env.pop("TUTUM_APIKEY"), env.pop("AMQP_URL")
    proc = procs.start_bridge(tmp_path, env, "--apikey", apikey, f"--amqp-url={amqp_url}")
    processes.append(proc)

    drain(queue, count=7, timeout=30)       # bridge.connected, notifications, 5 events
    cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().decode()
    assert apikey not in cmdline
    assert "guest:guest" not in cmdline
    assert "run" in cmdline                 # the same command, minus the secrets
    assert proc.stop() == 0
