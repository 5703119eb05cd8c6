"""Talking to the shared test broker on 127.0.0.1:5672 with pika's blocking API."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pika

from bridge import topology

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connect(url: str = AMQP_URL) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


@dataclass
class Received:
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    exchange: str


@dataclass
class Topology:
    """Unique exchange and queue names for one test; `cleanup` deletes them all.

    What is declared, and how, comes from the bridge's own `bridge.topology`.
    """

    exchange: str = field(default_factory=lambda: unique("t-events"))
    unrouted: str = field(default_factory=lambda: unique("t-unrouted"))
    quarantine: str = field(default_factory=lambda: unique("t-invalid"))
    queues: list[str] = field(default_factory=list)

    @property
    def spec(self) -> topology.Topology:
        return topology.Topology(self.exchange, self.unrouted, self.quarantine)

    def bridge_env(self) -> dict[str, str]:
        return {"BRIDGE_EXCHANGE": self.exchange, "BRIDGE_UNROUTED": self.unrouted,
                "BRIDGE_QUARANTINE": self.quarantine}

    def bind(self, *patterns: str, url: str = AMQP_URL, arguments: dict | None = None) -> str:
        """A durable queue (with `arguments`) bound to the exchange, which is declared
        here as the bridge declares it if the bridge has not yet."""
        name = unique("t-q")
        self.queues.append(name)
        queue = topology.QueueSpec(name, tuple((self.exchange, p) for p in patterns),
                                   tuple((arguments or {}).items()))
        with connect(url) as conn:
            topology.declare(conn.channel(), self.spec.with_queues(queue).steps())
        return name

    def cleanup(self, url: str = AMQP_URL) -> None:
        try:
            with connect(url) as conn:
                topology.delete(conn.channel(), self.spec, tuple(self.queues))
        except pika.exceptions.AMQPError:
            pass


def drain(queue: str, count: int | None = None, timeout: float = 20.0,
          idle: float = 0.5, url: str = AMQP_URL) -> list[Received]:
    """Consume from `queue` until `count` messages arrived (or, with no count, until
    nothing arrived for `idle` seconds), or fail at `timeout`. Acks what it takes."""
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    with connect(url) as conn:
        ch = conn.channel()
        last = time.monotonic()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                out.append(Received(method.routing_key, body, props, method.exchange))
                last = time.monotonic()
                if count is not None and len(out) >= count:
                    return out
                continue
            now = time.monotonic()
            if count is None and now - last > idle:
                return out
            if now > deadline:
                if count is None:
                    return out
                raise AssertionError(f"{queue}: got {len(out)} of {count} messages in {timeout}s")
            conn.sleep(0.02)


def queue_depth(queue: str, url: str = AMQP_URL) -> int:
    with connect(url) as conn:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
