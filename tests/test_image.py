"""The image, built from the unmodified Dockerfile and run for real with podman
(tests/support/podman.py; /work/shared/containers.md), against the machine's RabbitMQ
over the host network, on free ports. Skipped with one line where podman cannot be had.

The image is built once per session and shared by the tests here; the stand-in base
image is built once per machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import podman as pm
from tests.support.broker import drain
from tests.support.procs import SIM_APIKEY, SIM_USER
from tests.support.rabbit_node import free_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
# One tag per checkout: test runs in other worktrees build their own code.
TAG = f"localhost/tutum-bridge:test-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]}"


@pytest.fixture(scope="session")
def podman():
    return pm.podman_or_skip()


@pytest.fixture(scope="session")
def image(podman):
    """The bridge's image, built for this run and removed after it (the stand-in base
    images are the machine's cache, kept: see tests/support/podman.py)."""
    pm.base_image(podman)
    yield podman.build(ROOT, TAG)
    podman.run("rmi", "--force", TAG, check=False, timeout=120)


def healthcheck(podman, name: str) -> int:
    return podman.run("healthcheck", "run", name, check=False, timeout=60).returncode


def log_lines(podman, name: str) -> list[dict]:
    lines = []
    for line in podman.logs(name).splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def test_the_image_streams_as_non_root_reports_health_and_stops_clean(podman, image, topology):
    queue = topology.bind("#")
    sim_port = free_port()
    sim_name, bridge_name = f"tb-sim-{uuid.uuid4().hex[:8]}", f"tb-bridge-{uuid.uuid4().hex[:8]}"
    credentials = ("--env", f"TUTUM_USER={SIM_USER}", "--env", f"TUTUM_APIKEY={SIM_APIKEY}")
    with podman.container(image, "simulate", "--host", "127.0.0.1", "--port", str(sim_port),
                          "--rate", "20", name=sim_name,
                          options=("--network", "host", *credentials)):
        env = {"TUTUM_STREAM_HOST": f"ws://127.0.0.1:{sim_port}",
               "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
               # Port 0: the health check must find the port the bridge picked.
               "BRIDGE_METRICS_ADDR": "127.0.0.1:0", "BRIDGE_RECONNECT_MAX": "1",
               **topology.bridge_env()}
        options = ["--network", "host", *credentials]
        for key, value in env.items():
            options += ["--env", f"{key}={value}"]
        with podman.container(image, name=bridge_name, options=tuple(options)):
            received = drain(queue, count=10, timeout=60)
            assert {m.routing_key for m in received} - {"bridge.connected"}

            assert podman.run("exec", bridge_name, "id", "-u").stdout.strip() == "10001"
            wait_for(lambda: healthcheck(podman, bridge_name) == 0, 60, 1.0, "healthy")
            # docs/contract.md section 9, from inside the container.
            livez = podman.run("exec", bridge_name, "python", "-m", "bridge.probe").stdout
            assert livez.startswith("healthy:")

            podman.run("stop", "--time", "5", sim_name, timeout=60)
            wait_for(lambda: healthcheck(podman, bridge_name) == 1, 60, 1.0,
                     "unhealthy once the stream is gone")

            podman.run("stop", "--time", "30", bridge_name, timeout=90)
            state = json.loads(podman.run("inspect", bridge_name).stdout)[0]["State"]
            stopped = [line for line in log_lines(podman, bridge_name)
                       if line.get("event") == "bridge.stopped"]
            assert state["ExitCode"] == 0, podman.logs(bridge_name)[-3000:]
            assert stopped and stopped[-1]["left_in_spool"] == 0


def test_bench_runs_in_the_image(podman, image):
    """`bench` needs psutil: a runtime dependency, in the image too (issue 10 item 9)."""
    result = podman.run("run", "--rm", image, "bench", "--help", check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--events" in result.stdout


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    command: list[str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def down(self) -> None:
        result = self.run("down", "--volumes", "--timeout", "30")
        assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def compose(podman, image):
    """deploy/docker-compose.yml as it is, brought up by podman-compose under a project
    name of its own, on free host ports (the machine's RabbitMQ holds 5672), and taken
    down with its volumes whatever happens. The image built above is the compose
    file's image (TUTUM_BRIDGE_IMAGE; the same Dockerfile), so no second build runs."""
    beside = Path(sys.executable).with_name("podman-compose")
    executable = str(beside) if beside.exists() else shutil.which("podman-compose")
    if executable is None:
        pytest.skip("podman-compose is not installed (pip install podman-compose)")
    pm.rabbitmq_image(podman)
    project = f"tbtest{uuid.uuid4().hex[:8]}"
    env = {**podman.env, "AMQP_PORT": str(free_port()), "MANAGEMENT_PORT": str(free_port()),
           "METRICS_PORT": str(free_port()), "TUTUM_BRIDGE_IMAGE": image}
    stack = Stack(project, env, [executable, "--project-name", project, "--file",
                                 str(ROOT / "deploy" / "docker-compose.yml"),
                                 "--profile", "simulator"])
    try:
        yield stack
    finally:
        stack.down()


def test_compose_comes_up_events_reach_a_tail_and_it_tears_down(podman, compose):
    up = compose.run("up", "--detach", "--no-build")
    assert up.returncode == 0, up.stderr[-3000:]
    # podman-compose does not wait for RabbitMQ's health: the bridge reconnects until
    # it is up, and a tail run in the stack fails (one line, exit 1) until then.
    def tail_once():
        result = compose.run("run", "--rm", "bridge", "tail", "--count", "3", "container.*",
                             timeout=120)
        return result if result.returncode == 0 else None
    tail = wait_for(tail_once, 150, 2.0, "a tail in the stack that shows events")
    assert len([line for line in tail.stdout.splitlines() if " container." in line]) == 3
    url = f"http://127.0.0.1:{compose.env['METRICS_PORT']}"
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        assert b"tutum_bridge_events_published_total" in response.read()
    with urllib.request.urlopen(url + "/livez", timeout=5) as response:
        assert response.status == 200

    compose.down()
    names = podman.run("ps", "--all", "--format", "{{.Names}}").stdout.split()
    volumes = podman.run("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in names if n.startswith(compose.project)]
    assert not [v for v in volumes if v.startswith(compose.project)]
