"""What the bridge declares on the broker, written down once.

The events exchange (topic, durable, with its alternate exchange), the alternate
exchange and its `unrouted` queue, the `quarantine` queue, and any extra queues a
feature needs: one `Topology` says all of it as a list of `Step`s, and every client
applies that same list. The publisher (pika's asynchronous API) runs the steps one
callback at a time; the tools, the benchmark and the tests (pika's blocking API) run
them with `declare`. So nobody can declare the exchange in a way the bridge would then
refuse with 406.

The bridge's own queues are declared with `BRIDGE_QUEUE_TYPE` (classic or quorum). A
queue that already exists with the other type is kept as it is (`Step.keep_existing`):
its messages are the operator's, and re-creating it would lose them; the client checks
it exists (a passive declare) and logs what the broker said about its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import pika.exceptions

QUEUE_TYPES = ("classic", "quorum")
HISTORY_QUEUE = "tutum.history"       # docs/contract.md section 8


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, its arguments, and its bindings as (exchange, routing key)."""

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    arguments: tuple[tuple[str, object], ...] = ()
    # True for queues whose type follows BRIDGE_QUEUE_TYPE: an existing one of the
    # other type is kept, not an error.
    keep_existing: bool = False


@dataclass(frozen=True)
class Step:
    """One declaration, as the keyword arguments of the pika channel method `method`.

    The same keywords are accepted by pika's blocking and asynchronous channels.
    """

    method: str
    kwargs: tuple[tuple[str, object], ...]
    keep_existing: bool = False

    @property
    def name(self) -> str:
        return str(dict(self.kwargs).get("queue") or dict(self.kwargs).get("exchange"))

    def apply(self, channel, **extra):
        return getattr(channel, self.method)(**dict(self.kwargs), **extra)

    def passive(self) -> "Step":
        """The check that the queue exists, whatever its type."""
        return Step("queue_declare", (("queue", self.name), ("passive", True)))

    def describe(self) -> str:
        kwargs = dict(self.kwargs)
        if self.method == "exchange_declare":
            alternate = (kwargs.get("arguments") or {}).get("alternate-exchange")
            return (f"declare exchange {self.name!r} ({kwargs['exchange_type']}, durable"
                    + (f", alternate-exchange {alternate!r})" if alternate else ")"))
        if self.method == "queue_declare":
            kind = (kwargs.get("arguments") or {}).get("x-queue-type", "classic")
            return f"declare durable {kind} queue {self.name!r}"
        return f"bind queue {self.name!r} to {kwargs['exchange']!r} with {kwargs['routing_key']!r}"


@dataclass(frozen=True)
class Topology:
    """The names the bridge declares, and how."""

    exchange: str
    unrouted: str
    quarantine: str
    queue_type: str = "classic"
    extra_queues: tuple[QueueSpec, ...] = field(default=())

    def with_queues(self, *queues: QueueSpec) -> "Topology":
        return replace(self, extra_queues=self.extra_queues + queues)

    def destination(self, routing_key: str, quarantined: bool) -> tuple[str, str]:
        """The (exchange, routing key) an event is published to: a quarantined one goes
        through the default exchange straight to the quarantine queue, where no binding
        can reach it (docs/contract.md section 3); the bridge and the dead-letters tool
        alike."""
        return ("", self.quarantine) if quarantined else (self.exchange, routing_key)

    @property
    def own_queue_arguments(self) -> tuple[tuple[str, object], ...]:
        # A classic queue is declared without x-queue-type, which is how a classic queue
        # declared by an older bridge (or by hand) looks to the broker.
        return (("x-queue-type", "quorum"),) if self.queue_type == "quorum" else ()

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        return (QueueSpec(self.unrouted, ((self.unrouted, ""),), self.own_queue_arguments, True),
                QueueSpec(self.quarantine, (), self.own_queue_arguments, True),
                *self.extra_queues)

    def steps(self) -> list[Step]:
        """Everything, in an order where each binding finds its exchange and queue."""
        steps = exchange_steps(self.exchange, self.unrouted)
        for queue in self.queues:
            steps.append(Step("queue_declare",
                              (("queue", queue.name), ("durable", True),
                               ("arguments", dict(queue.arguments) or None)),
                              keep_existing=queue.keep_existing))
            steps.extend(Step("queue_bind", (("queue", queue.name), ("exchange", exchange),
                                             ("routing_key", key)))
                         for exchange, key in queue.bindings)
        return steps

    def names(self) -> tuple[list[str], list[str]]:
        """(queues, exchanges) this topology declares, for whoever deletes it."""
        return [q.name for q in self.queues], [self.exchange, self.unrouted]


def history_spec(name: str, exchange: str, max_age: str) -> QueueSpec:
    """The history stream (docs/contract.md section 8): every event, kept `max_age`
    (RabbitMQ's form: 7D, 12h) on RabbitMQ's own replicated storage, for replay."""
    return QueueSpec(name, ((exchange, "#"),),
                     (("x-queue-type", "stream"), ("x-max-age", max_age)))


def is_stream(step: Step) -> bool:
    return (dict(step.kwargs).get("arguments") or {}).get("x-queue-type") == "stream"


def exchange_steps(exchange: str, unrouted: str) -> list[Step]:
    """The exchanges only: what a tool needs before it binds a queue of its own."""
    return [
        Step("exchange_declare", (("exchange", unrouted), ("exchange_type", "fanout"),
                                  ("durable", True))),
        Step("exchange_declare", (("exchange", exchange), ("exchange_type", "topic"),
                                  ("durable", True),
                                  ("arguments", {"alternate-exchange": unrouted}))),
    ]


def is_other_type(reply_code: int, reply_text: str) -> bool:
    """The broker's way of saying "this queue exists with another x-queue-type"."""
    return reply_code == 406 and "x-queue-type" in reply_text


def declare(channel, steps: list[Step], on_kept: Callable[[str, str], None] | None = None):
    """Apply `steps` on a channel of pika's blocking API; returns the channel left open
    (a new one if the broker closed the first).

    An existing queue of another type is kept (`on_kept(name, broker's reply)` is told);
    any other refusal raises pika's `ChannelClosedByBroker` to the caller.
    """
    for step in steps:
        try:
            step.apply(channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if not (step.keep_existing and is_other_type(exc.reply_code, exc.reply_text)):
                raise
            channel = channel.connection.channel()
            step.passive().apply(channel)
            if on_kept is not None:
                on_kept(step.name, exc.reply_text)
    return channel


def delete(channel, topology: Topology, extra_queues: tuple[str, ...] = ()) -> None:
    """Delete every queue and exchange of `topology` (and `extra_queues`)."""
    queues, exchanges = topology.names()
    for queue in (*extra_queues, *queues):
        channel.queue_delete(queue)
    for exchange in exchanges:
        channel.exchange_delete(exchange)
