"""An example worker that keeps the state of every container, and resynchronises after a gap.

The Tutum stream cannot replay: while the bridge is disconnected, events are lost
upstream. The bridge says so with `bridge.connected` carrying a `gap`; this worker
then refetches every container from the REST API (`TUTUM_REST_HOST` + `/api/v1/`,
paged as Tutum did) and replaces its state, then goes on with the events.

    tutum-bridge simulate &               # stream and REST on :8765 (demo/demo-apikey)
    TUTUM_STREAM_HOST=ws://127.0.0.1:8765 TUTUM_USER=demo TUTUM_APIKEY=demo-apikey tutum-bridge run &
    TUTUM_REST_HOST=http://127.0.0.1:8765 TUTUM_USER=demo TUTUM_APIKEY=demo-apikey \
        python examples/resync_worker.py

Its queue, `example.containers`, is durable; delete it when you are done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
from urllib.parse import urljoin

from bridge.tools.worker import Message, consume

PAGE = 100


class Containers:
    """resource_uri -> state of every container, from events and, after a gap, from REST."""

    def __init__(self, rest_host: str, user: str, apikey: str) -> None:
        self.rest_host, self._auth = rest_host.rstrip("/"), f"ApiKey {user}:{apikey}"
        self.state: dict[str, str | None] = {}
        self.resyncs = 0
        self.lock = threading.Lock()

    def handle(self, message: Message) -> None:
        event = message.json()
        if message.routing_key == "bridge.connected":
            if event.get("gap"):
                self.resync()
            return
        with self.lock:
            self.state[event["resource_uri"]] = event.get("state")

    def resync(self) -> None:
        """Every container, page by page; the lists replace what we had."""
        fresh, path = {}, f"/api/v1/container/?limit={PAGE}"
        while path:
            page = self._get(path)
            fresh.update((o["resource_uri"], o["state"]) for o in page["objects"])
            path = page["meta"]["next"]
        with self.lock:
            self.state, self.resyncs = fresh, self.resyncs + 1
        logging.info("resynchronised %d containers from %s", len(fresh), self.rest_host)

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(urljoin(self.rest_host + "/", path.lstrip("/")),
                                         headers={"Authorization": self._auth})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def run(containers: Containers, queue: str = "example.containers", **consume_options) -> None:
    consume(["container.*", "bridge.connected"], containers.handle, queue=queue,
            **consume_options)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    run(Containers(os.environ.get("TUTUM_REST_HOST", "http://127.0.0.1:8765"),
                   os.environ.get("TUTUM_USER", "demo"),
                   os.environ.get("TUTUM_APIKEY", "demo-apikey")),
        amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"),
        exchange=os.environ.get("BRIDGE_EXCHANGE", "tutum.events"))
