"""A nack is retried, not dropped (docs/contract.md section 4).

RabbitMQ nacks a publish that a queue with `x-overflow: reject-publish` has no room
for. The test fills such a queue, lets the bridge run into nacks, then makes room, a
queue-full at a time, until the bridge has every event confirmed.

What a worker can rely on afterwards: every event arrived; every copy after the first
is marked `x-republished`; and the last copies are in the order received. (The first
copies need not be: publishes are pipelined, so an event behind a nacked one can be
accepted, when room appears in between, before the nacked one is republished. The
republish then repeats it, in order.)
"""

from __future__ import annotations

import json

from tests.support import procs
from tests.support.broker import drain, queue_depth
from tests.support.wait import wait_for

CAPACITY = 20
EVENTS = 60


def test_nacked_events_are_republished_in_order(simulator, bridge, topology):
    queue = topology.bind("#", arguments={"x-max-length": CAPACITY,
                                          "x-overflow": "reject-publish"})

    sim = simulator("--seed", "9", "--count", str(EVENTS), "--rate", "0", "--sequence")
    proc = bridge(sim, BRIDGE_METRICS_ADDR="127.0.0.1:0")

    wait_for(lambda: queue_depth(queue) == CAPACITY, 20, what="the queue to fill up")
    wait_for(lambda: "broker.nack" in proc.stderr, 20, what="the bridge to be nacked")

    copies: list[tuple[int, bool]] = []     # (sim_seq, x-republished), in arrival order

    def take_what_arrived() -> None:
        for msg in drain(queue, timeout=5, idle=0.3):
            body = json.loads(msg.body)
            if "sim_seq" in body:       # not bridge.connected or user-notifications
                republished = (msg.properties.headers or {}).get("x-republished") is True
                copies.append((body["sim_seq"], republished))

    def all_confirmed() -> bool:
        take_what_arrived()
        assert proc.popen.poll() is None, f"the bridge exited:\n{proc.stderr[-3000:]}"
        return (procs.metric(proc, "tutum_bridge_spool_events") == 0
                and procs.metric(proc, "tutum_bridge_inflight") == 0
                and {seq for seq, _ in copies} >= set(range(1, EVENTS + 1)))

    try:
        wait_for(all_confirmed, 60, interval=0.2, what="every event confirmed after the nacks")
    except AssertionError:
        raise AssertionError(f"arrived: {sorted({s for s, _ in copies})}\n"
                             f"bridge log:\n{proc.stderr[-4000:]}") from None
    take_what_arrived()     # confirmed means routed: the last copies are in the queue

    seen: set[int] = set()
    for seq, republished in copies:
        assert seq not in seen or republished, f"event {seq} repeated without x-republished"
        seen.add(seq)
    last_copies = {seq: i for i, (seq, _) in enumerate(copies)}
    assert sorted(last_copies, key=last_copies.get) == list(range(1, EVENTS + 1))
