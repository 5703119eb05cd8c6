"""The pytest plugin of the testing kit (docs/contract.md section 10): `amqp_url`, `tutum_stream`, `tutum_bridge`.

Registered through the `pytest11` entry point, so a worker's tests get the fixtures
with no code of their own::

    def test_my_worker_sees_a_container_start(amqp_url, tutum_stream, tutum_bridge):
        ...bind the worker's queue to tutum_bridge.exchange on amqp_url...
        tutum_stream.send({"type": "container", "action": "update", "state": "Running",
                           "resource_uri": "/api/v1/container/1/", "parents": []})
        tutum_bridge.wait_confirmed(1)

Nothing here runs until a test asks for a fixture: loading the plugin costs nothing
and changes no other test. The broker is found once per session (brokers.py).
"""

from __future__ import annotations

import pytest

from bridge.testing import brokers
from bridge.testing.process import BridgeProcess
from bridge.testing.stream import ScriptedStream


@pytest.fixture(scope="session")
def _tutum_test_broker():
    try:
        broker = brokers.find()
    except brokers.Unavailable as exc:
        pytest.skip(str(exc))
    yield broker
    broker.close()


@pytest.fixture
def amqp_url(_tutum_test_broker):
    """An AMQP URL to a RabbitMQ of this test's own (its own vhost where possible)."""
    url, vhost = _tutum_test_broker.vhost_url()
    yield url
    _tutum_test_broker.delete_vhost(vhost)


@pytest.fixture
def tutum_stream():
    """A Tutum stream simulator scripted by the test: send(event), generate(n), drop(),
    happened(event), url, rest_url."""
    stream = ScriptedStream()
    yield stream
    stream.close()


@pytest.fixture
def tutum_bridge(amqp_url, tutum_stream, tmp_path):
    """The bridge between the two: exchange, wait_confirmed(n, timeout=30)."""
    bridge = BridgeProcess(amqp_url, tutum_stream, tmp_path)
    yield bridge
    bridge.stop()
