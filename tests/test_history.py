"""History on a RabbitMQ stream (docs/contract.md section 8): a worker that starts late
replays what the bridge published, in order, then goes on live."""

from __future__ import annotations

import json
import threading

import pika

from bridge.tools.worker import consume
from tests.support import broker, procs
from tests.support.wait import wait_for

EVENTS = 1000


def test_a_late_worker_replays_all_1000_events_in_order_then_gets_live_ones(
        tmp_path, simulator, bridge, topology):
    history = broker.unique("t-history")
    topology.queues.append(history)
    sim = simulator("--seed", "5", "--count", str(EVENTS), "--rate", "0", "--sequence")
    br = bridge(sim, BRIDGE_HISTORY="1d", BRIDGE_HISTORY_QUEUE=history,
                BRIDGE_METRICS_ADDR="127.0.0.1:0")
    wait_for(lambda: procs.metric(br, "tutum_bridge_events_confirmed_total") >= EVENTS + 1,
             90, what="the bridge to publish every event")
    assert br.stop() == 0
    with broker.connect() as conn:
        # Succeeds only on a stream with exactly this retention.
        conn.channel().queue_declare(history, durable=True, arguments={
            "x-queue-type": "stream", "x-max-age": "1D"})

    seen, stop, live = [], threading.Event(), b'{"type": "container", "live": true}'

    def handler(message):
        seen.append(message.json())
        if len(seen) == 1:      # attached: whatever comes after the history is live
            with broker.connect() as conn:
                conn.channel().basic_publish(topology.exchange, "container.update", live,
                                             pika.BasicProperties(message_id="live-1"))
        if message.body == live:
            stop.set()

    worker = threading.Thread(target=consume, args=(["*.*"], handler), daemon=True, kwargs=dict(
        amqp_url=broker.AMQP_URL, exchange=topology.exchange, unrouted=topology.unrouted,
        since="first", history_queue=history, prefetch=200, stop=stop))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), f"the worker saw {len(seen)} messages"
    events = [e for e in seen if "sim_seq" in e or e.get("live")]
    assert [e["sim_seq"] for e in events[:-1]] == list(range(1, EVENTS + 1))
    assert events[-1] == {"type": "container", "live": True}

    # `tail --since first` replays the same history, filtered by its pattern.
    containers = [e["sim_seq"] for e in events[:-1] if e["type"] == "container"]
    tail = procs.spawn(["tail", "--since", "first", "--json", "--count",
                        str(len(containers)), "container.*"], tmp_path, "tail",
                       {"AMQP_URL": broker.AMQP_URL, "BRIDGE_EXCHANGE": topology.exchange,
                        "BRIDGE_UNROUTED": topology.unrouted,
                        "BRIDGE_HISTORY_QUEUE": history})
    assert tail.wait(60) == 0, tail.stderr
    assert [json.loads(line)["sim_seq"] for line in tail.stdout.splitlines()] == containers


def test_tail_since_without_a_history_stream_is_one_line_and_exit_4(tmp_path, topology):
    tail = procs.spawn(["tail", "--since", "2h"], tmp_path, "tail", {
        "AMQP_URL": broker.AMQP_URL, "BRIDGE_EXCHANGE": topology.exchange,
        "BRIDGE_HISTORY_QUEUE": broker.unique("t-nohistory")})
    assert tail.wait(30) == 4
    assert "Traceback" not in tail.stderr and len(tail.stderr.strip().splitlines()) == 1
    assert "BRIDGE_HISTORY" in tail.stderr
