"""The issue's "Done means": a worker in another language binding `container.*` to
`tutum.events` receives only container events.

The worker is `examples/worker.js` (Node.js, amqplib), run as a user runs it, against
the real bridge fed by the real simulator on the real broker. A second queue bound `#`
on the same exchange records everything the bridge published, so the test knows which
container events the worker must have printed: all of them, in order, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pika
import pytest

from tests.support.broker import AMQP_URL, connect, drain, queue_depth, unique
from tests.support.procs import Proc
from tests.support.spec import topic_matches
from tests.support.wait import wait_for

WORKER = Path(__file__).resolve().parent.parent / "examples" / "worker.js"
NODE, NPM = shutil.which("node"), shutil.which("npm")
EVENTS = 200

pytestmark = pytest.mark.skipif(
    not (NODE and NPM), reason="node and npm are needed to run examples/worker.js")


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory) -> Path:
    """amqplib, installed once per session as the example's header tells users to."""
    prefix = tmp_path_factory.mktemp("npm")
    result = subprocess.run(
        [NPM, "install", "--prefix", str(prefix), "amqplib", "--no-audit", "--no-fund",
         "--silent"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"npm install amqplib failed ({result.returncode}): "
                    f"{(result.stderr or result.stdout)[-2000:]}")
    return prefix / "node_modules"


@pytest.fixture
def js_worker(node_modules, topology, tmp_path):
    """examples/worker.js on a unique queue of this test's exchange, consuming.

    Returns once the worker says it consumes, so its binding exists before the bridge
    publishes. Its queue joins the topology's, which deletes it after this fixture has
    stopped the worker.
    """
    queue = unique("t-worker-js")
    topology.queues.append(queue)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AMQP_"))}
    env.update(NODE_PATH=str(node_modules), AMQP_URL=AMQP_URL, WORKER_QUEUE=queue,
               BRIDGE_EXCHANGE=topology.exchange, BRIDGE_UNROUTED=topology.unrouted)
    out, err = tmp_path / "worker-js.stdout", tmp_path / "worker-js.stderr"
    popen = subprocess.Popen([NODE, str(WORKER)], stdout=out.open("wb"), stderr=err.open("wb"),
                             stdin=subprocess.DEVNULL, env=env)
    proc = Proc(popen, out, err, info={"queue": queue})

    def consuming():
        if popen.poll() is not None:
            raise AssertionError(f"worker.js exited {popen.returncode}: {proc.stderr}")
        return f"worker: consuming {queue}" in proc.stderr

    try:
        wait_for(consuming, 15, what="worker.js to consume")
        yield proc
    finally:
        proc.stop(timeout=10)


def printed_keys(worker: Proc) -> list[str]:
    """The routing key of each event the worker printed (first word of each line)."""
    return [line.split()[0] for line in worker.stdout.splitlines() if line.strip()]


def test_a_nodejs_worker_bound_to_container_star_receives_only_container_events(
        simulator, bridge, topology, js_worker):
    everything = topology.bind("#")
    bridge(simulator("--seed", "3", "--count", str(EVENTS), "--rate", "0"))
    # bridge.connected, the user-notifications batch, then the simulator's events.
    published = drain(everything, count=EVENTS + 2, timeout=20)
    containers = [m for m in published if topic_matches("container.*", m.routing_key)]
    assert containers, "the seeded stream must hold container events"
    assert len(containers) < len(published), "and others, for the binding to filter out"

    wait_for(lambda: len(printed_keys(js_worker)) >= len(containers), 15,
             what=f"worker.js to print {len(containers)} container events")
    # A clean stop returns whatever it holds unacked to its queue: an event the broker
    # routed to it beyond these would be printed or left in the queue, never hidden.
    assert js_worker.stop(timeout=10) == 0, js_worker.stderr
    assert "cannot handle" not in js_worker.stderr

    lines = js_worker.stdout.splitlines()
    keys = printed_keys(js_worker)
    assert keys, "the worker received no event"
    assert all(key.startswith("container.") for key in keys), keys
    assert keys == [m.routing_key for m in containers]
    for line, msg in zip(lines, containers):
        assert line.rstrip().endswith(msg.properties.headers["resource_uri"]), line
    assert queue_depth(js_worker.info["queue"]) == 0


def test_the_nodejs_worker_skips_repeats_but_restores_the_order_after_a_nack(
        topology, js_worker):
    """The arrivals a nack can cause (3 before 2's republish) and a plain reconnect's
    repeats, published as the bridge would: the worker prints each event again only
    where that restores the received order."""
    arrivals = ["s-1", "s-3", "s-2", "s-3", "s-4", "s-3", "s-4", "s-5"]
    with connect() as conn:
        channel = conn.channel()
        for message_id in arrivals:
            body = json.dumps({"type": "container", "action": "update",
                               "resource_uri": f"/api/v1/container/{message_id}/"})
            channel.basic_publish(topology.exchange, "container.update", body.encode(),
                                  pika.BasicProperties(message_id=message_id))
    wait_for(lambda: queue_depth(js_worker.info["queue"]) == 0
             and len(printed_keys(js_worker)) >= 6, 15, what="worker.js to handle them")
    assert js_worker.stop(timeout=10) == 0, js_worker.stderr
    printed = [line.split()[-1].split("/")[-2] for line in js_worker.stdout.splitlines()]
    assert printed == ["s-1", "s-3", "s-2", "s-3", "s-4", "s-5"]
    assert queue_depth(js_worker.info["queue"]) == 0, "every arrival was handled or skipped"
