"""AMQP_URL may list several brokers (a cluster): the bridge tries each in turn.

With the first broker down, events must still arrive through the next one, and the
bridge must say in its log which broker it is trying, password hidden.
"""

from __future__ import annotations

import socket

from tests.support.broker import AMQP_URL, drain


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_first_broker_is_skipped_for_the_next(simulator, bridge, topology):
    queue = topology.bind("#")
    sim = simulator("--seed", "11", "--count", "20", "--rate", "0")
    # Nothing listens there, so its password can be one no scrubbing of "guest" hides.
    port = closed_port()
    dead = f"amqp://guest:Dead-Pw-7c31@127.0.0.1:{port}/%2F"

    proc = bridge(sim, AMQP_URL=f"{dead},{AMQP_URL}")

    # bridge.connected, the user-notifications batch, then the 20 events.
    messages = drain(queue, count=22, timeout=30)
    assert sum(1 for m in messages if not m.routing_key.startswith(("bridge.", "user-"))) == 20
    assert proc.stop() == 0
    log = proc.stderr
    assert "broker.connect_failed" in log
    assert f":***@127.0.0.1:{port}/" in log       # which broker it tried, redacted
    assert "Dead-Pw-7c31" not in log
