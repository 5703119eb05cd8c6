"""The private RabbitMQ node (bridge/testing/node.py) as fixtures for the fault tests."""

from __future__ import annotations

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
