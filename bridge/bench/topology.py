"""The broker side of one benchmark run: unique names, declared once, deleted at the end.

Every bridge publishes to the same exchange and every measurement reads the same
durable queue bound with `#`, as a production worker's would be, so the bridges are
compared on equal terms. Everything is declared from the bridge's own topology
(bridge/topology.py) with that queue added, so the bridge's declaration agrees.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pika

from bridge import topology
from bridge.ha.link import Names


@dataclass(frozen=True)
class Topology:
    prefix: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:10]}")

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def unrouted(self) -> str:
        return f"{self.prefix}.unrouted"

    @property
    def quarantine(self) -> str:
        return f"{self.prefix}.invalid"

    @property
    def queue(self) -> str:
        return f"{self.prefix}.all"

    @property
    def spec(self) -> topology.Topology:
        return topology.Topology(self.exchange, self.unrouted, self.quarantine).with_queues(
            topology.QueueSpec(self.queue, ((self.exchange, "#"),)))

    def names(self) -> dict[str, str]:
        return {"exchange": self.exchange, "unrouted": self.unrouted,
                "quarantine": self.quarantine, "queue": self.queue}

    def declare(self, url: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            topology.declare(conn.channel(), self.spec.steps())

    def purge(self, url: str) -> None:
        """Empties the queue between measurements, so none sees another's leftovers."""
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            conn.channel().queue_purge(self.queue)

    def delete(self, url: str) -> None:
        """Deletes everything of this run, including what the real bridge declared
        (with BRIDGE_HA=on, the replicas' exchange too; their queues were exclusive)."""
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            channel = conn.channel()
            topology.delete(channel, self.spec)
            channel.exchange_delete(Names.for_exchange(self.exchange).exchange)
