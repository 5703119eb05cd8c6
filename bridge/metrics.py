"""Metrics (Prometheus text format) and the health endpoints, on one small HTTP listener.

`GET /metrics` for Prometheus; `/livez`, `/readyz` and `/healthz` (an alias of
`/readyz`) answer 200 or 503 with a JSON reason (docs/contract.md section 9). What
they decide is given by the wiring as callables: this module only serves them.

Each metric is observed in one line where the thing happens (stream sink, publisher);
the few that need state of their own to be measured live here: the two latency
histograms (`ConfirmTimer`) and the seconds the stream was down (`Downtime`).
Nothing secret is ever a label or a value.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from bisect import bisect_left
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

from prometheus_client import (CollectorRegistry, GCCollector, Counter, Gauge,
                               PlatformCollector, ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from bridge import __version__

# From a local broker's few milliseconds to an outage's minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

Probe = Callable[[], tuple[bool, dict]]


class Metrics:
    """Every number the bridge exposes, in a registry of its own."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge("tutum_bridge_build_info", "The bridge's version and Python, as labels",
              ["version", "python"], registry=r).labels(__version__,
                                                        platform.python_version()).set(1)
        self.received = Counter("tutum_bridge_frames_received", "Frames received from the stream",
                                ["kind"], registry=r)
        self.quarantined = Counter("tutum_bridge_frames_quarantined",
                                   "Frames quarantined, by x-quarantine-reason", ["reason"],
                                   registry=r)
        self.last_frame = Gauge("tutum_bridge_stream_last_frame_timestamp_seconds",
                                "Unix time of the last frame received from the stream",
                                registry=r)
        self.published = Counter("tutum_bridge_events_published",
                                 "First publishes to the broker (republishes not included)",
                                 registry=r)
        self.republished = Counter("tutum_bridge_events_republished",
                                   "Publishes of an event published before (after a lost "
                                   "channel, a nack or a restart)", registry=r)
        self.confirmed = Counter("tutum_bridge_events_confirmed",
                                 "Events confirmed by the broker and removed from the spool",
                                 registry=r)
        self.nacks = Counter("tutum_bridge_nacks", "Negative confirms (republished)", registry=r)
        self.set_aside = Counter("tutum_bridge_events_set_aside",
                                 "Events the broker refuses for good, kept in the dead letters",
                                 registry=r)
        self.stream_connects = Counter("tutum_bridge_stream_connects",
                                       "Successful stream authentications", registry=r)
        self.stream_losses = Counter("tutum_bridge_stream_losses", "Stream connections lost",
                                     registry=r)
        self.broker_connects = Counter("tutum_bridge_broker_connects",
                                       "Broker connections made ready (topology declared)",
                                       registry=r)
        self.broker_losses = Counter("tutum_bridge_broker_losses",
                                     "Ready broker connections or channels lost", registry=r)
        self.stream_connected = Gauge("tutum_bridge_stream_connected",
                                      "1 while the stream is authenticated", registry=r)
        self.broker_connected = Gauge("tutum_bridge_broker_connected",
                                      "1 while the broker channel is ready", registry=r)
        self.broker_blocked = Gauge("tutum_bridge_broker_blocked",
                                    "1 while the broker blocks publishing (resource alarm)",
                                    registry=r)
        self.inflight = Gauge("tutum_bridge_inflight", "Published events awaiting a confirm",
                              registry=r)
        self.inflight_limit = Gauge("tutum_bridge_inflight_limit",
                                    "Most published events awaiting a confirm (BRIDGE_INFLIGHT)",
                                    registry=r)
        self.spool_events = Gauge("tutum_bridge_spool_events", "Events waiting in the spool",
                                  registry=r)
        self.spool_bytes = Gauge("tutum_bridge_spool_bytes", "Bytes waiting in the spool",
                                 registry=r)
        self.spool_capacity = Gauge("tutum_bridge_spool_capacity_bytes",
                                    "Spool capacity (BRIDGE_SPOOL_MAX_BYTES)", registry=r)
        self.spool_oldest_age = Gauge("tutum_bridge_spool_oldest_event_age_seconds",
                                      "Age of the oldest event not yet confirmed (0: none)",
                                      registry=r)
        self.spool_unwritable = Gauge("tutum_bridge_spool_unwritable",
                                      "1 while the spool's filesystem refuses writes (full)",
                                      registry=r)
        self.spool_errors = Counter("tutum_bridge_spool_errors",
                                    "Spool writes or maintenance the disk refused (retried)",
                                    ["operation"], registry=r)
        self.spool_last_checkpoint = Gauge("tutum_bridge_spool_last_checkpoint_timestamp_seconds",
                                           "When the spool's WAL was last checkpointed",
                                           registry=r)
        self.leader = Gauge("tutum_bridge_leader",
                            "1 while this bridge publishes (the HA leader, or HA off), "
                            "0 on a standby", registry=r)
        self.backpressure = Gauge("tutum_bridge_backpressure",
                                  "1 while the spool is full and the stream is not read",
                                  registry=r)
        publish_latency = BatchHistogram("tutum_bridge_publish_to_confirm_seconds",
                                         "From the publish to the broker's confirm, per event",
                                         LATENCY_BUCKETS, r)
        receive_latency = BatchHistogram("tutum_bridge_receive_to_confirm_seconds",
                                         "From the frame's receipt to the broker's confirm, "
                                         "per event", LATENCY_BUCKETS, r)
        self.confirm_timer = ConfirmTimer(publish_latency, receive_latency, clock)
        self.downtime = Downtime(clock)
        r.register(self.downtime)


class BatchHistogram:
    """A Prometheus histogram observed a batch at a time.

    The latency histograms see every event, thousands a second in a burst;
    prometheus_client's `Histogram.observe` walks the buckets in Python and takes a
    lock per call, which cost about a tenth of the publisher thread. Here a batch is
    one lock, a C bisect per value, and one observation of a value shared by many.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)      # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        with self._lock:
            self._counts[bisect_left(self._bounds, value)] += count
            self._sum += value * count

    def observe_each(self, values) -> None:
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                self._sum += value

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*self._bounds, float("inf")), counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets,
                                    sum_value=total)


class ConfirmTimer:
    """Publish time and receipt time of what awaits a confirm, per published batch.

    The publisher calls `published(batch)` as it writes a batch and `confirmed(upto)`
    when the confirmed sequence moves; `forget()` when its channel is gone (the batches
    are published again, and timed again from that publish; receipt time stays).
    """

    def __init__(self, publish: BatchHistogram, receive: BatchHistogram,
                 clock: Callable[[], float]) -> None:
        self._publish, self._receive, self._clock = publish, receive, clock
        self._batches: deque[tuple[int, float, list[float]]] = deque()

    def published(self, batch) -> None:
        """`batch`: the (sequence, event) pairs just published, in order."""
        self._batches.append((batch[-1][0], self._clock(), [ev.received_at for _, ev in batch]))

    def confirmed(self, upto: int) -> None:
        now = self._clock()
        while self._batches and self._batches[0][0] <= upto:
            _, published_at, received = self._batches.popleft()
            self._publish.observe(max(0.0, now - published_at), len(received))
            self._receive.observe_each(max(0.0, now - at) for at in received)

    def forget(self) -> None:
        self._batches.clear()


class Downtime:
    """`tutum_bridge_stream_disconnected_seconds_total`: seconds the stream was not
    authenticated, counted from the process start and growing during an outage (not
    only once it ends), so `rate()` shows an outage while it lasts."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._total = 0.0
        self._down_since: float | None = clock()

    def up(self, at: float) -> None:
        with self._lock:
            if self._down_since is not None:
                self._total += max(0.0, at - self._down_since)
                self._down_since = None

    def down(self, at: float) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = at

    def seconds(self) -> float:
        with self._lock:
            ongoing = 0.0 if self._down_since is None else self._clock() - self._down_since
            return self._total + max(0.0, ongoing)

    def collect(self):
        family = CounterMetricFamily("tutum_bridge_stream_disconnected_seconds",
                                     "Seconds the stream was not authenticated, since start")
        family.add_metric([], self.seconds())
        yield family


class MetricsServer:
    """Serves /metrics and the probes (path -> callable) on a daemon thread."""

    def __init__(self, metrics: Metrics, address: tuple[str, int],
                 probes: Mapping[str, Probe]) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    ok, detail = probes[path]()
                    self._send(200 if ok else 503, json.dumps(detail).encode(),
                               "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass  # probes every few seconds would drown the bridge's own log

        self._server = ThreadingHTTPServer(address, Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
