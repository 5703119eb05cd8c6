"""The bridge's own queues follow BRIDGE_QUEUE_TYPE, and an existing queue keeps its type.

An operator moving a running deployment to a cluster sets BRIDGE_QUEUE_TYPE=quorum; the
unrouted and quarantine queues from before are classic and hold messages. The bridge
must neither exit 4 nor re-create them (which would lose what they hold): it keeps
them, says so in its log, and declares only what is missing with the new type.
"""

from __future__ import annotations

import pika

from tests.support.broker import connect, drain, queue_depth


def is_quorum(queue: str) -> bool:
    """The broker accepts a quorum declaration of a queue only if it is one."""
    with connect() as conn:
        try:
            conn.channel().queue_declare(queue, durable=True,
                                         arguments={"x-queue-type": "quorum"})
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 406, exc
            return False


def test_quorum_queue_type_keeps_an_existing_classic_queue_and_its_messages(
        simulator, bridge, topology):
    with connect() as conn:                     # left by an earlier, classic deployment
        ch = conn.channel()
        ch.queue_declare(topology.quarantine, durable=True)
        ch.basic_publish("", topology.quarantine, b"kept from before")
    everything = topology.bind("#")     # declares the unrouted queue classic too...
    with connect() as conn:
        conn.channel().queue_delete(topology.unrouted)   # ...so it goes: quorum is new
    sim = simulator("--seed", "3", "--count", "10", "--rate", "0")

    proc = bridge(sim, BRIDGE_QUEUE_TYPE="quorum")

    events = drain(everything, count=12, timeout=30)   # bridge.connected, notices, 10 events
    assert len(events) == 12
    assert proc.popen.poll() is None, proc.stderr[-3000:]
    assert '"broker.queue_kept"' in proc.stderr and topology.quarantine in proc.stderr
    assert not is_quorum(topology.quarantine)
    assert queue_depth(topology.quarantine) == 1
    assert is_quorum(topology.unrouted)
    assert proc.stop() == 0
