"""The broker side of one benchmark run: unique names, declared once, deleted at the end.

Every bridge publishes to the same exchange and every measurement reads the same
durable queue bound with `#`, as a production worker's would be, so the bridges are
compared on equal terms. The exchange is declared as the real bridge declares it
(topic, durable, with its alternate exchange), so the bridge's own declaration agrees.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pika


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

    def names(self) -> dict[str, str]:
        return {"exchange": self.exchange, "unrouted": self.unrouted,
                "quarantine": self.quarantine, "queue": self.queue}

    def declare(self, url: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            ch = conn.channel()
            ch.exchange_declare(self.exchange, "topic", durable=True,
                                arguments={"alternate-exchange": self.unrouted})
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, self.exchange, "#")

    def purge(self, url: str) -> None:
        """Empties the queue between measurements, so none sees another's leftovers."""
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            conn.channel().queue_purge(self.queue)

    def delete(self, url: str) -> None:
        """Deletes everything of this run, including what the real bridge declared."""
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            ch = conn.channel()
            for queue in (self.queue, self.unrouted, self.quarantine):
                ch.queue_delete(queue)
            for exchange in (self.exchange, self.unrouted):
                ch.exchange_delete(exchange)
