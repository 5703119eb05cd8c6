"""A nack is retried, not dropped (SPEC 4).

RabbitMQ nacks a publish that a queue with `x-overflow: reject-publish` has no room
for. The test fills such a queue, lets the bridge run into nacks, then makes room:
every event must arrive, in order, and any repeat must be marked `x-republished`.
"""

from __future__ import annotations

import json

from tests.support.broker import connect, drain, queue_depth, unique
from tests.support.wait import wait_for

CAPACITY = 20
EVENTS = 60


def test_nacked_events_are_republished_in_order(simulator, bridge, topology):
    queue = unique("t-q-full")
    topology.queues.append(queue)
    with connect() as conn:
        ch = conn.channel()
        ch.exchange_declare(topology.exchange, "topic", durable=True,
                            arguments={"alternate-exchange": topology.unrouted})
        ch.queue_declare(queue, durable=True, arguments={
            "x-max-length": CAPACITY, "x-overflow": "reject-publish"})
        ch.queue_bind(queue, topology.exchange, "#")

    sim = simulator("--seed", "9", "--count", str(EVENTS), "--rate", "0", "--sequence")
    proc = bridge(sim)

    wait_for(lambda: queue_depth(queue) == CAPACITY, 20, what="the queue to fill up")
    wait_for(lambda: "broker.nack" in proc.stderr, 20, what="the bridge to be nacked")

    # Make room, a queue-full at a time, until every event is through.
    seen: list[int] = []
    republished: set[int] = set()

    def everything_arrived() -> bool:
        for msg in drain(queue, timeout=5, idle=0.3):
            body = json.loads(msg.body)
            if "sim_seq" not in body:
                continue            # bridge.connected, user-notifications
            seq = body["sim_seq"]
            if seq in seen:
                assert (msg.properties.headers or {}).get("x-republished") is True, seq
                republished.add(seq)
                continue
            seen.append(seq)
        return len(seen) == EVENTS

    wait_for(everything_arrived, 60, interval=0.2, what="every event after the nacks")
    assert seen == list(range(1, EVENTS + 1))
    assert proc.popen.poll() is None, "the bridge must keep running through nacks"
