"""HA on a real three-node RabbitMQ cluster (docs/contract.md section 7; issue 9).

Three private nodes on their own ports, joined with `join_cluster`, shared by the
module. The `#` queue is a quorum queue (replicated on every node), and so are the
bridge's own queues (`BRIDGE_QUEUE_TYPE=quorum`). Each replica has the whole cluster
in `AMQP_URL`: the leader starts with node 0, the standby with node 1. `kill -9` of
node 0 mid-stream takes the leader's connections, and its lock, with it: whichever
replica declares the lock first on a live node leads (the old leader, reconnecting at
once to another node, often wins), the other witnesses it, and the quorum queue holds
every event.
"""

from __future__ import annotations

import time

import pytest

from tests.support.fault_rig import assert_guarantee
from tests.support.ha import HaRig, same_identity
from tests.support.rabbit_node import RabbitCluster
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
