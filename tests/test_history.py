"""History on a RabbitMQ stream (docs/contract.md section 8): a worker that starts late
replays what the bridge published, in order, then goes on live."""

from __future__ import annotations

import json
import threading

from bridge.tools.worker import consume
from bridge.testing.node import RabbitNode
from bridge.testing.process import BridgeProcess
from bridge.testing.stream import ScriptedStream
from tests.support import broker, procs
from tests.support.wait import wait_for

EVENTS, LIVE = 1000, 20


def test_a_late_worker_replays_all_1000_events_in_order_then_gets_live_ones(
        tmp_path, topology):
    history = broker.unique("t-history")
    topology.queues.append(history)
    stream = ScriptedStream(seed=5)
    bridge = BridgeProcess(broker.AMQP_URL, stream, tmp_path,
                           env={"BRIDGE_HISTORY": "1d", "BRIDGE_HISTORY_QUEUE": history})
    try:
        published = stream.generate(EVENTS)
        bridge.wait_confirmed(EVENTS)
        with broker.connect() as conn:
            # Succeeds only on a stream with exactly this retention.
            conn.channel().queue_declare(history, durable=True, arguments={
                "x-queue-type": "stream", "x-max-age": "1D"})

        seen, live, stop = [], [], threading.Event()

        def handler(message):
            event = message.json()
            if event["type"] in ("bridge", "user-notifications"):
                return
            seen.append(event)
            if len(seen) == EVENTS:           # the past is replayed: now live events
                live.extend(stream.generate(LIVE))
            if len(seen) == EVENTS + LIVE:
                stop.set()

        worker = threading.Thread(target=consume, args=(["*.*"], handler), daemon=True,
                                  kwargs=dict(amqp_url=broker.AMQP_URL, since="first",
                                              exchange=bridge.exchange, history_queue=history,
                                              prefetch=200, stop=stop))
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), f"the worker saw {len(seen)} events"
        assert seen == published + live
    finally:
        bridge.stop()
        stream.close()

    # `tail --since first` replays the same history, filtered by its pattern.
    containers = [e for e in published + live if e["type"] == "container"]
    tail = procs.spawn(["tail", "--since", "first", "--json", "--count",
                        str(len(containers)), "container.*"], tmp_path, "tail",
                       {"AMQP_URL": broker.AMQP_URL, "BRIDGE_HISTORY_QUEUE": history})
    assert tail.wait(60) == 0, tail.stderr
    assert [json.loads(line) for line in tail.stdout.splitlines()] == containers


def test_tail_since_without_a_history_stream_is_one_line_and_exit_4(tmp_path, topology):
    tail = procs.spawn(["tail", "--since", "2h"], tmp_path, "tail", {
        "AMQP_URL": broker.AMQP_URL, "BRIDGE_EXCHANGE": topology.exchange,
        "BRIDGE_HISTORY_QUEUE": broker.unique("t-nohistory")})
    assert tail.wait(30) == 4
    assert "Traceback" not in tail.stderr and len(tail.stderr.strip().splitlines()) == 1
    assert "BRIDGE_HISTORY" in tail.stderr


def test_a_broker_without_streams_stops_the_bridge_with_one_line(tmp_path, simulator, bridge):
    """A node booted without the stream_queue feature flag stands in for RabbitMQ < 3.9."""
    flags = ("classic_mirrored_queue_version,implicit_default_bindings,"
             "maintenance_mode_status,quorum_queue,user_limits,virtual_host_metadata")
    node = RabbitNode(prefix="tbnostream", env={"RABBITMQ_FEATURE_FLAGS": flags}).start()
    try:
        sim = simulator("--rate", "0", "--count", "10")
        br = bridge(sim, AMQP_URL=node.url, BRIDGE_HISTORY="7d")
        assert br.wait(60) == 4
        lines = [json.loads(line) for line in br.stderr.splitlines() if line.startswith("{")]
        fatal = [line for line in br.stderr.splitlines() if not line.startswith("{")]
        assert "Traceback" not in br.stderr and len(fatal) == 1, br.stderr
        assert "history stream" in fatal[0] and "RabbitMQ 3.9" in fatal[0], fatal[0]
        assert lines, "the bridge logged before it stopped"
    finally:
        node.discard()


def test_a_replaying_worker_that_loses_the_broker_resumes_after_the_last_offset(tmp_path):
    """No de-duplication here: only the resumed offset can keep events from coming twice."""
    node = RabbitNode(prefix="tbresume").start()
    stream = ScriptedStream(seed=8)
    bridge = BridgeProcess(node.url, stream, tmp_path, env={"BRIDGE_HISTORY": "1h"})
    seen, stop = [], threading.Event()

    def handler(message):
        event = message.json()
        if event["type"] not in ("bridge", "user-notifications"):
            seen.append(event)
        if len(seen) == 150 and not cut.is_set():
            cut.set()
            node.ctl("close_all_connections", "a test cuts the worker off")

    cut = threading.Event()
    worker = threading.Thread(target=consume, args=(["#"], handler), daemon=True, kwargs=dict(
        amqp_url=node.url, exchange=bridge.exchange, since="first", dedupe=0, prefetch=50,
        stop=stop))
    try:
        published = stream.generate(300)
        bridge.wait_confirmed(300)
        worker.start()
        wait_for(lambda: len(seen) >= 300, 60, what="the replay, across the cut")
        live = stream.generate(20)
        wait_for(lambda: len(seen) >= 320, 60, what="the live events")
        assert cut.is_set()
        assert seen == published + live
    finally:
        stop.set()
        worker.join(20)
        bridge.stop()
        stream.close()
        node.discard()
