"""HA, and confirms, on a real three-node RabbitMQ cluster (docs/contract.md sections 4
and 7; issue 9).

Three private nodes on their own ports, joined with `join_cluster`, shared by the
module. The `#` queue is a quorum queue (replicated on every node), and so are the
bridge's own queues (`BRIDGE_QUEUE_TYPE=quorum`). Each replica has the whole cluster
in `AMQP_URL`: the leader starts with node 0, the standby with node 1. `kill -9` of
node 0 mid-stream takes the leader's connections, and its lock, with it: whichever
replica declares the lock first on a live node leads (the old leader, reconnecting at
once to another node, often wins), the other witnesses it, and the quorum queue holds
every event.

The same cluster is the one real way to make a broker withhold confirms on a live
link: a quorum queue that lost its majority takes publishes and answers none of them
(a resource alarm blocks us instead, which the confirm deadline rightly waits out).
"""

from __future__ import annotations

import time

import pytest

from tests.support.fault_rig import Rig, assert_guarantee
from tests.support.ha import HaRig, same_identity
from tests.support.rabbit_node import RabbitCluster, in_parallel
from tests.support.wait import wait_for


@pytest.fixture(scope="module")
def cluster():
    nodes = RabbitCluster(3).start()
    try:
        yield nodes
    finally:
        nodes.discard()


def test_kill_9_of_the_leaders_node_loses_nothing(cluster, topology, simulator, bridge,
                                                  tmp_path, request):
    rig = HaRig(request.node.name, cluster.nodes[1], topology, simulator, bridge, tmp_path,
                queue_arguments={"x-queue-type": "quorum"})
    try:
        sim = rig.simulator("--fanout", "--rate", "200", "--count", "2400")
        quorum = {"BRIDGE_QUEUE_TYPE": "quorum"}
        leader, standby = rig.pair(sim, leader_env={"AMQP_URL": cluster.urls(0), **quorum},
                                   standby_env={"AMQP_URL": cluster.urls(1), **quorum})
        rig.wait_sent(sim, 600)

        killed_at = time.monotonic()
        cluster.nodes[0].kill()

        def new_leader():
            if rig.log_events(standby, "ha.takeover"):
                return standby
            return len(rig.log_events(leader, "ha.leader")) > 1 and leader
        leading = wait_for(new_leader, 20, 0.05, what="a leader on a live node")
        took = time.monotonic() - killed_at
        rig.wait_log(leader, "broker.ready", timeout=30, count=2)   # moved to another node

        ledger = rig.settle(sim, 2400, timeout=120, takeover_seconds=round(took, 2))
        assert took < 10, ledger.summary()
        assert_guarantee(ledger)
        assert same_identity(rig.collector.messages)
        assert rig.metric(leading, "tutum_bridge_leader") == 1
        other = standby if leading is leader else leader
        assert rig.metric(other, "tutum_bridge_leader") == 0
    finally:
        rig.close()


def test_a_quorum_queue_without_its_majority_trips_the_confirm_deadline(
        cluster, topology, simulator, bridge, tmp_path, request):
    """The broker keeps the link alive but withholds every confirm: the `#` queue is a
    quorum queue, and two of its three nodes stop. Only BRIDGE_CONFIRM_TIMEOUT can
    tell (heartbeats still flow), so the bridge drops the connection, reconnects, and
    publishes what was unconfirmed again once the majority is back: nothing lost,
    every duplicate flagged (docs/contract.md section 4)."""
    survivor = cluster.nodes[2]
    rig = Rig(request.node.name, survivor, topology, simulator, bridge, tmp_path,
              queue_arguments={"x-queue-type": "quorum"})
    others = cluster.nodes[:2]
    try:
        sim = rig.simulator("--rate", "200", "--count", "2400")
        proc = rig.bridge(sim, BRIDGE_CONFIRM_TIMEOUT="2", BRIDGE_AMQP_HEARTBEAT="60")
        rig.wait_delivered(200, timeout=30)

        in_parallel(node.stop for node in others)
        silent = rig.wait_log(proc, "broker.silent", timeout=30)
        assert "no confirm" in silent["reason"], silent
        assert not rig.collector.has_all(rig.sent(sim))     # events wait meanwhile

        in_parallel(node.start for node in others)
        rig.wait_log(proc, "broker.ready", timeout=60, count=2)
        ledger = rig.settle(sim, 2400, timeout=120)
        assert_guarantee(ledger)
    finally:
        in_parallel(node.start for node in others)     # the module's next test needs them
        rig.close()

