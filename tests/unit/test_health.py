"""Liveness and readiness logic (bridge/health.py) and the metrics that keep state of
their own (bridge/metrics.py), on a fake clock: docs/contract.md section 9."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import generate_latest

from bridge.event import Event
from bridge.health import Health
from bridge.metrics import Metrics, MetricsServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_thread_that_stops_beating_is_named_with_its_reason():
    clock = Clock()
    live = Health(clock)
    stream, publisher = live.heart("stream", 60), live.heart("publisher", 30)
    clock.now += 45
    stream.beat()
    ok, body = live.check()
    assert not ok
    assert body["failing"] == {"publisher": "no progress for 45s (the limit is 30s)"}
    assert body["seconds_since_progress"] == {"stream": 0.0, "publisher": 45.0}
    publisher.beat()
    assert live.check()[0]


def test_a_beating_thread_stays_live_however_long_it_waits_in_total():
    clock = Clock()
    live = Health(clock)
    heart = live.heart("stream", 10)
    for _ in range(100):            # an outage of 500 s, waited out in 5 s steps
        clock.now += 5
        heart.beat()
    assert live.check() == (True, {"ok": True, "seconds_since_progress": {"stream": 0.0}})


def test_a_stopped_heart_is_not_a_failure_and_checks_give_reasons():
    clock = Clock()
    ready = Health(clock)
    ready.heart("main", 1).stop()
    broker_open = [False]
    ready.add_check("broker", lambda: None if broker_open[0] else "the broker is closed")
    clock.now += 100
    ok, body = ready.check(spool_events=3)
    assert (ok, body["failing"], body["spool_events"]) == (False, {"broker": "the broker is closed"}, 3)
    broker_open[0] = True
    assert ready.check() == (True, {"ok": True})


def test_latency_histograms_time_each_event_from_publish_and_from_receipt():
    clock = Clock()
    metrics = Metrics(clock)
    timer = metrics.confirm_timer
    batch = [(seq, Event("container.update", b"{}", clock.now - 2.0, {})) for seq in (1, 2)]
    timer.published(batch)
    clock.now += 0.5
    timer.confirmed(1)                      # half a batch: not yet timed
    timer.confirmed(2)
    value = metrics.registry.get_sample_value
    assert value("tutum_bridge_publish_to_confirm_seconds_count") == 2
    assert value("tutum_bridge_publish_to_confirm_seconds_sum") == 1.0
    assert value("tutum_bridge_receive_to_confirm_seconds_sum") == 5.0
    assert value("tutum_bridge_publish_to_confirm_seconds_bucket", {"le": "0.5"}) == 2


def test_a_lost_channel_times_the_republish_again_from_its_publish():
    clock = Clock()
    metrics = Metrics(clock)
    batch = [(1, Event("container.update", b"{}", clock.now, {}))]
    metrics.confirm_timer.published(batch)
    clock.now += 10
    metrics.confirm_timer.forget()
    metrics.confirm_timer.published(batch)
    clock.now += 1
    metrics.confirm_timer.confirmed(1)
    value = metrics.registry.get_sample_value
    assert value("tutum_bridge_publish_to_confirm_seconds_sum") == 1.0
    assert value("tutum_bridge_receive_to_confirm_seconds_sum") == 11.0


def test_disconnected_seconds_grow_during_an_outage_not_only_after_it():
    clock = Clock()
    metrics = Metrics(clock)
    total = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "tutum_bridge_stream_disconnected_seconds_total")
    clock.now += 3
    metrics.downtime.up(clock.now)          # 3 s from start to the first authentication
    clock.now += 100
    metrics.downtime.down(clock.now)
    clock.now += 20
    assert total() == 23
    metrics.downtime.up(clock.now)
    clock.now += 50
    assert total() == 23


def test_the_server_answers_each_probe_with_its_status_and_json_reason():
    metrics = Metrics()
    probes = {"/livez": lambda: (True, {"ok": True}),
              "/readyz": lambda: (False, {"ok": False, "failing": {"broker": "closed"}})}
    probes["/healthz"] = probes["/readyz"]
    server = MetricsServer(metrics, ("127.0.0.1", 0), probes)
    server.start()
    base = "http://%s:%d" % server.address[:2]
    try:
        with urllib.request.urlopen(base + "/livez", timeout=5) as response:
            assert (response.status, json.loads(response.read())) == (200, {"ok": True})
        for path in ("/readyz", "/healthz"):
            try:
                urllib.request.urlopen(base + path, timeout=5)
                raise AssertionError(f"{path} answered 200")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                assert json.loads(exc.read())["failing"] == {"broker": "closed"}
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            text = response.read().decode()
        assert "tutum_bridge_build_info{" in text and "process_cpu_seconds_total" in text
        assert "python_gc_objects_collected_total" in text
    finally:
        server.stop()
    assert b"tutum_bridge_spool_capacity_bytes" in generate_latest(metrics.registry)
