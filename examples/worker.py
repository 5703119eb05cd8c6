"""An example worker: keeps a live count of running containers from the bridge's events.

It uses `bridge.tools.worker.consume`: acks after handling, drops duplicates by
`message_id`, reconnects by itself. Run it next to the bridge, or next to
`tutum-bridge demo` for made-up events:

    pip install -e .                      # in a checkout of tutum-bridge
    tutum-bridge demo &                   # or a real bridge
    AMQP_URL=amqp://guest:guest@localhost:5672/%2F python examples/worker.py

Its queue, `example.inventory`, is durable: events wait there while the worker is
down. Delete it when you are done: `rabbitmqctl delete_queue example.inventory`.
"""

import logging
import os

from bridge.tools.worker import consume

running: dict[str, str] = {}     # resource_uri -> uuid of its service


def handle(message) -> None:
    if message.routing_key == "bridge.connected":
        gap = message.json().get("gap")
        if gap:
            # The stream cannot replay: what happened during the gap must come from REST.
            print(f"missed {gap['seconds']:.0f}s of events: resynchronise from the REST API")
        return
    uri, state = message.headers.get("resource_uri"), message.headers.get("state")
    if message.headers.get("action") == "delete" or state in ("Stopped", "Terminated"):
        running.pop(uri, None)
    elif state == "Running":
        running[uri] = message.headers.get("parent-service", "")
    print(f"{len(running):4d} running   {message.routing_key:<18} {state or '-':<12} {uri}",
          flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    consume(["container.*", "bridge.connected"], handle, queue="example.inventory",
            amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"),
            exchange=os.environ.get("BRIDGE_EXCHANGE", "tutum.events"))
