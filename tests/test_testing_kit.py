"""The testing kit (docs/contract.md section 10) as a worker author uses it: a sample
worker project outside the repository whose test uses `amqp_url`, `tutum_stream` and
`tutum_bridge`, run with pytest there, once per way the kit gets a broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.testing import node
from tests.support.podman import podman_or_skip, rabbitmq_image

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
