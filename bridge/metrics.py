"""Metrics (Prometheus text format) and health, on one small HTTP listener.

`GET /metrics` for Prometheus; `GET /healthz` answers 200 with a JSON body while the
bridge is connected to both sides and not backpressured, 503 otherwise, so Docker,
Kubernetes and systemd watchdogs can all use the same probe. Nothing secret is ever
a label or a value.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """Every number the bridge exposes, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("tutum_bridge_frames_received", "Frames received from the stream",
                                ["kind"], registry=r)
        self.published = Counter("tutum_bridge_events_published",
                                 "Publishes to the broker, republishes included", registry=r)
        self.confirmed = Counter("tutum_bridge_events_confirmed",
                                 "Events confirmed by the broker and removed from the spool",
                                 registry=r)
        self.nacks = Counter("tutum_bridge_nacks", "Negative confirms (republished)", registry=r)
        self.republished = Counter("tutum_bridge_events_republished",
                                   "Publishes of an event already published (x-republished)",
                                   registry=r)
        self.set_aside = Counter("tutum_bridge_events_set_aside",
                                 "Events the broker refuses for good, kept in the dead letters",
                                 registry=r)
        self.stream_connects = Counter("tutum_bridge_stream_connects",
                                       "Successful stream authentications", registry=r)
        self.stream_losses = Counter("tutum_bridge_stream_losses", "Stream connections lost",
                                     registry=r)
        self.stream_connected = Gauge("tutum_bridge_stream_connected",
                                      "1 while the stream is authenticated", registry=r)
        self.broker_connected = Gauge("tutum_bridge_broker_connected",
                                      "1 while the broker channel is ready", registry=r)
        self.broker_blocked = Gauge("tutum_bridge_broker_blocked",
                                    "1 while the broker blocks publishing (resource alarm)",
                                    registry=r)
        self.inflight = Gauge("tutum_bridge_inflight", "Published events awaiting a confirm",
                              registry=r)
        self.spool_events = Gauge("tutum_bridge_spool_events", "Events waiting in the spool",
                                  registry=r)
        self.spool_bytes = Gauge("tutum_bridge_spool_bytes", "Bytes waiting in the spool",
                                 registry=r)
        self.backpressure = Gauge("tutum_bridge_backpressure",
                                  "1 while the spool is full and the stream is not read",
                                  registry=r)


class MetricsServer:
    """Serves /metrics and /healthz on a daemon thread."""

    def __init__(self, metrics: Metrics, address: tuple[str, int],
                 health: Callable[[], tuple[bool, dict]]) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/health"):
                    ok, detail = health()
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
