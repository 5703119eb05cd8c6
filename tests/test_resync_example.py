"""examples/resync_worker.py, end to end: the stream drops, objects change while the
bridge is away (events that are never sent), and after `bridge.connected` with a gap
the worker's state equals the simulator's REST side (docs/contract.md section 6)."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pika

from bridge.testing.process import BridgeProcess
from bridge.testing.stream import ScriptedStream
from tests.support import broker
from tests.support.wait import wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "resync_worker.py"


def load_example():
    spec = importlib.util.spec_from_file_location("resync_worker", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def queue_exists(name: str) -> bool:
    try:
        broker.queue_depth(name)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False


def test_the_resync_worker_ends_equal_to_the_simulator_after_a_gap(tmp_path):
    example, stream = load_example(), ScriptedStream(seed=42)
    bridge = BridgeProcess(broker.AMQP_URL, stream, tmp_path)
    queue, stop = broker.unique("t-resync"), threading.Event()
    containers = example.Containers(stream.rest_url, stream.user, stream.apikey)
    worker = threading.Thread(target=example.run, args=(containers, queue), daemon=True,
                              kwargs=dict(amqp_url=broker.AMQP_URL, exchange=bridge.exchange,
                                          unrouted=bridge.topology.unrouted, stop=stop))
    try:
        worker.start()
        wait_for(lambda: queue_exists(queue), 20, what="the worker's queue")
        before = stream.generate(300)
        bridge.wait_confirmed(300)

        stream.drop()
        changed = sorted({e["resource_uri"] for e in before if e["type"] == "container"})[:5]
        for uri in changed:       # happen while the bridge is away: never sent
            stream.happened({"type": "container", "action": "update", "state": "Stopped",
                             "resource_uri": uri, "parents": []})
        new = "/api/v1/container/0f0f0f0f-0000-4000-8000-000000000001/"
        stream.happened({"type": "container", "action": "create", "state": "Starting",
                         "resource_uri": new, "parents": []})
        wait_for(lambda: stream.connections == 2, 30, what="the bridge to reconnect")
        stream.generate(100)
        bridge.wait_confirmed(400)

        reference = example.Containers(stream.rest_url, stream.user, stream.apikey)

        def settled():
            reference.resync()        # the simulator's state, read through its REST side
            with containers.lock:
                return containers.resyncs == 1 and containers.state == reference.state
        wait_for(settled, 30, what="the worker's state to equal the simulator's")
        # Known only from REST: no event ever told of it.
        assert containers.state[new] == "Starting"
    finally:
        stop.set()
        worker.join(20)
        bridge.stop()
        stream.close()
        with broker.connect() as conn:
            conn.channel().queue_delete(queue)

