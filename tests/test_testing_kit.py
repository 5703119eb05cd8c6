"""The testing kit (docs/contract.md section 10) as a worker author uses it: a sample
worker project outside the repository whose test uses `amqp_url`, `tutum_stream` and
`tutum_bridge`, run with pytest there, once per way the kit gets a broker: a
container through testcontainers, a local node, and a URL (with the management API)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bridge.testing import node
from bridge.testing.node import free_port
from tests.support.podman import podman_or_skip, rabbitmq_image
from tests.support.wait import wait_for

SAMPLE = Path(__file__).resolve().parent / "kit_sample" / "inventory_sample.py"


def run_sample_project(tmp_path: Path, **env: str) -> str:
    project = tmp_path / "inventory-worker"
    project.mkdir()
    shutil.copy(SAMPLE, project / "test_inventory.py")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("TUTUM_", "PYTEST_", "DOCKER_", "TESTCONTAINERS_"))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-rs"], cwd=project, env={**clean, **env}, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "1 passed" in output, output[-5000:]
    return output


def kit_containers(podman) -> set[str]:
    """Containers testcontainers started (only those: others share this machine)."""
    return set(podman.run("ps", "-aq", "--filter", "label=org.testcontainers=true")
               .stdout.split())


def run_and_list_leftovers(podman, before: set[str], run) -> set[str]:
    """Run; then remove (and return) the containers that were not there before."""
    try:
        run()
    finally:
        left = kit_containers(podman) - before
        podman.remove_containers(*left)
    return left


def test_a_worker_project_passes_with_a_throwaway_local_node(tmp_path):
    if not node.available():
        pytest.skip("rabbitmq-server is not installed")
    run_sample_project(tmp_path)


def test_a_worker_project_passes_with_a_container_broker(tmp_path):
    podman = podman_or_skip()
    image = rabbitmq_image(podman)
    socket = tmp_path / "podman.sock"
    service = subprocess.Popen([podman.executable, "system", "service", "--time=0",
                                f"unix://{socket}"], env=podman.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert time.monotonic() < deadline, "podman's Docker-compatible socket did not appear"
            time.sleep(0.1)
        before = kit_containers(podman)
        # These tests may run inside a container themselves, where testcontainers would
        # guess a Docker-in-Docker network; podman here publishes on this host.
        left = run_and_list_leftovers(podman, before, lambda: run_sample_project(
            tmp_path, DOCKER_HOST=f"unix://{socket}", TUTUM_TEST_RABBITMQ_IMAGE=image,
            TESTCONTAINERS_CONNECTION_MODE="docker_host"))
        assert not left, "the kit left its broker container behind"
    finally:
        service.terminate()
        service.wait(30)


def test_a_worker_project_passes_with_a_broker_given_by_url_each_test_in_its_own_vhost(
        tmp_path):
    podman = podman_or_skip()
    image = rabbitmq_image(podman)
    amqp, management = free_port(), free_port()
    with podman.container(image, options=("-p", f"127.0.0.1:{amqp}:5672",
                                          "-p", f"127.0.0.1:{management}:15672")):
        api = f"http://127.0.0.1:{management}"
        wait_for(lambda: answers(api + "/api/overview"), 90, interval=0.5,
                 what="the container's management API")
        run_sample_project(tmp_path, TUTUM_TEST_MANAGEMENT_URL=api,
                           TUTUM_TEST_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{amqp}/%2F")
        assert [v["name"] for v in get_json(api + "/api/vhosts")] == ["/"], \
            "the test's vhost was deleted"
        assert get_json(api + "/api/queues") == [], "the worker's queue was in that vhost"


def get_json(url: str):
    request = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(
        b"guest:guest").decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        get_json(url)
        return True
    except (OSError, ValueError):
        return False
