"""The private RabbitMQ node (bridge/testing/node.py) as fixtures for the fault tests,
and a cluster of such nodes for the HA tests."""

from __future__ import annotations

import threading

import pytest

from bridge.testing.node import RabbitNode, free_port  # noqa: F401 - re-exported for tests


@pytest.fixture(scope="module")
def extra_node():
    """One private node shared by a module's tests (startup costs seconds).

    A test may stop, kill or alarm it but must leave it running (the fixture
    `healthy_node` checks and restarts it if not) and use unique names on it.
    """
    node = RabbitNode().start()
    try:
        yield node
    finally:
        node.discard()


@pytest.fixture
def healthy_node(extra_node):
    """The module's node, running, alarm-free, at the start and end of the test."""
    _heal(extra_node)
    yield extra_node
    _heal(extra_node)


def _heal(node: RabbitNode) -> None:
    if not node.running:
        node.start()
    if node.alarmed:
        node.memory_alarm(False)


def in_parallel(actions) -> None:
    """Run each action on its own thread (a node takes seconds to start or stop) and
    raise the first error once all are done."""
    errors: list[BaseException] = []

    def run(action) -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - raised below, on this thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def join_cluster(node: RabbitNode, seed: RabbitNode) -> None:
    """Make a new, running `node` a member of `seed`'s cluster (its data is reset)."""
    node.ctl("stop_app")
    node.ctl("reset")
    node.ctl("join_cluster", seed.name)
    node.ctl("start_app")
    node.ctl("await_startup", timeout=90)


class RabbitCluster:
    """`size` private nodes on their own ports, joined into one cluster.

    The nodes boot at once (each takes 5-10 s alone), then each but the first joins
    the first; they share the Erlang cookie of the `rabbitmq` user.
    """

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RabbitNode("tbcluster") for _ in range(size)]

    def start(self) -> "RabbitCluster":
        try:
            in_parallel(node.start for node in self.nodes)
        except BaseException:
            self.discard()
            raise
        for node in self.nodes[1:]:
            join_cluster(node, self.nodes[0])
        return self

    def urls(self, first: int = 0) -> str:
        """An AMQP_URL list of every node, starting with node `first`."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def discard(self) -> None:
        for node in self.nodes:
            node.discard()
