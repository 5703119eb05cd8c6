"""A seeded Tutum account whose objects live and die: the events the simulator sends.

The bridge and its workers need streams that look like Tutum's -- objects going
through their lifecycles, parents that exist before their children, actions tracking
asynchronous work -- and a failing test needs the very same stream again. So the
world is driven by one `random.Random`, and events are produced lazily, one at a time,
however long the simulator runs.

Events come out as JSON text, formatted directly: every value is an ASCII literal or
a UUID, so the text equals `json.dumps` of the event's dict at a third of the cost
(the simulator must outrun the bridge it feeds).

Promises:
- every event has `type`, `action`, `parents`, `resource_uri`, `state`, `uuid` and a
  `datetime` in Tutum's format (`Tue, 24 Feb 2015 16:52:16 +0000`);
- a parent is created before any event of its children and deleted after all of them:
  containers name their service, their stack (if any) and their node; services their
  stack (if any); nodes their node cluster. An `action` names the object it acts on,
  created before the action starts; a terminate action ends after its object's `delete`;
- each asynchronous operation has an `action` going `In progress` -> `Success` or
  `Failed`, while its objects go through states such as `Starting` -> `Running`;
- the same seed and start time give the same events (no set iteration, no wall clock);
- populations are capped, so memory stays bounded on an endless run.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from random import Random
from typing import Callable, Iterator

Event = str     # one event's JSON text
Operation = Iterator[Event]

MAX_CLUSTERS = 3
MAX_NODES_PER_CLUSTER = 4
MAX_SERVICES = 20
MAX_CONTAINERS_PER_SERVICE = 4
MAX_CONCURRENT_OPERATIONS = 5
MEAN_SECONDS_BETWEEN_EVENTS = 0.25
FAILURE_RATE = 0.05

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_IMAGES = ("tutum/hello-world", "tutum/redis", "tutum/mysql", "tutum/haproxy",
           "tutum/wordpress", "tutum/mongodb", "tutum/rabbitmq", "tutum/nginx")


def tutum_datetime(epoch: float) -> str:
    """Tutum's RFC 2822 style, built by hand so the locale cannot change it."""
    t = time.gmtime(int(epoch))
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


@dataclass(eq=False, slots=True)
class Obj:
    """One Tutum object. `parents` are objects, in the order Tutum lists their URIs."""

    kind: str
    uuid: str
    parents: tuple[Obj, ...]
    state: str
    # Claimed by an operation (or still being created): no other operation may touch it.
    busy: bool = True
    # Being terminated: nothing new may be placed on it.
    doomed: bool = False
    children: dict[str, Obj] = field(default_factory=dict)
    uri: str = ""
    links: str = ""     # its events' `parents` and `resource_uri`, as JSON members

    def __post_init__(self) -> None:
        self.uri = f"/api/v1/{self.kind}/{self.uuid}/"
        self.links = (f'"parents": {json.dumps([p.uri for p in self.parents])}, '
                      f'"resource_uri": "{self.uri}"')


def _idle(objs: dict[str, Obj]) -> list[Obj]:
    return [o for o in objs.values() if not o.busy]


def _kids(obj: Obj, kind: str) -> list[Obj]:
    """The objects of one kind naming `obj` as a parent (a stack has services and containers)."""
    return [c for c in obj.children.values() if c.kind == kind]


def _empty(cluster: Obj) -> bool:
    """No container on any of its nodes, and no node busy: it may be terminated."""
    for node in cluster.children.values():
        if node.busy or node.children:
            return False
    return True


class World:
    """Node clusters, nodes, stacks, services and containers, evolving step by step.

    Operations are generators of events; several run at once and the world
    interleaves them, as a real account interleaves the work of its users.
    """

    def __init__(self, rng: Random, start: float):
        self.rng = rng
        self.now = start
        self._second, self._datetime = int(start), tutum_datetime(start)
        self.clusters: dict[str, Obj] = {}
        self.nodes: dict[str, Obj] = {}
        self.stacks: dict[str, Obj] = {}
        self.services: dict[str, Obj] = {}

    def events(self) -> Iterator[Event]:
        """The endless stream of events."""
        rng = self.rng
        active: list[Operation] = []
        while True:
            if not active or (len(active) < MAX_CONCURRENT_OPERATIONS and rng.random() < 0.12):
                # Run a new operation up to its first event right away: that is where it
                # claims its objects, so the next operation chosen cannot claim them too.
                operation = self._new_operation()
                event = next(operation, None)
                if event is not None:
                    active.append(operation)
                    yield event
                continue
            i = int(rng.random() * len(active))
            event = next(active[i], None)
            if event is None:
                del active[i]
            else:
                yield event

    # --- objects and events ----------------------------------------------------------

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _new(self, kind: str, parents: tuple[Obj, ...], state: str,
             registry: dict[str, Obj] | None = None) -> Obj:
        obj = Obj(kind, self._uuid(), parents, state)
        for parent in parents:
            if parent.kind != "action":
                parent.children[obj.uuid] = obj
        if registry is not None:
            registry[obj.uuid] = obj
        return obj

    def _forget(self, obj: Obj, registry: dict[str, Obj] | None = None) -> None:
        for parent in obj.parents:
            parent.children.pop(obj.uuid, None)
        if registry is not None:
            registry.pop(obj.uuid, None)

    def _emit(self, obj: Obj, action: str, state: str | None = None) -> Event:
        if state is not None:
            obj.state = state
        self.now -= math.log(1.0 - self.rng.random()) * MEAN_SECONDS_BETWEEN_EVENTS
        if int(self.now) != self._second:
            self._second, self._datetime = int(self.now), tutum_datetime(self.now)
        return (f'{{"type": "{obj.kind}", "action": "{action}", {obj.links}, '
                f'"state": "{obj.state}", "uuid": "{obj.uuid}", '
                f'"datetime": "{self._datetime}"}}')

    def _action(self, target: Obj) -> tuple[Obj, Event]:
        action = Obj("action", self._uuid(), (target,), "In progress")
        return action, self._emit(action, "create")

    def _fails(self) -> bool:
        return self.rng.random() < FAILURE_RATE

    # --- choosing the next operation ---------------------------------------------------

    def _new_operation(self) -> Operation:
        rng = self.rng
        clusters, nodes = _idle(self.clusters), self._placeable_nodes()
        services, stacks = _idle(self.services), _idle(self.stacks)
        running = [s for s in services if s.state in ("Running", "Partly running")]
        stopped = [s for s in services if s.state == "Stopped"]
        crowded = len(self.services) / MAX_SERVICES
        empty_clusters = [c for c in clusters if len(self.clusters) > 1 and _empty(c)]

        choices: list[tuple[float, Callable[[], Operation]]] = []
        if len(self.clusters) < MAX_CLUSTERS:
            choices.append((0.5 if nodes else 5.0, self._deploy_cluster))
        grow = [c for c in clusters if len(c.children) < MAX_NODES_PER_CLUSTER]
        if grow:
            choices.append((0.6, lambda: self._scale_cluster(rng.choice(grow))))
        if empty_clusters:
            choices.append((0.3, lambda: self._terminate_cluster(rng.choice(empty_clusters))))
        flappy = [n for n in nodes if n.state == "Deployed" and not n.busy]
        if flappy:
            choices.append((0.4, lambda: self._node_flap(rng.choice(flappy))))
        if nodes and len(self.services) < MAX_SERVICES:
            choices.append((3.0 * (1 - crowded), self._create_service))
            choices.append((1.5 * (1 - crowded), self._create_stack))
        if running:
            choices.append((2.0, lambda: self._stop_service(rng.choice(running))))
            choices.append((2.0, lambda: self._redeploy_service(rng.choice(running))))
            choices.append((2.5, lambda: self._scale_service(rng.choice(running))))
            choices.append((2.5, lambda: self._crash_container(rng.choice(running))))
        if stopped:
            choices.append((2.0, lambda: self._start_service(rng.choice(stopped))))
        if services:
            loose = [s for s in services if not s.parents]
            if loose:
                choices.append((3.0 * crowded, lambda: self._terminate_service(rng.choice(loose))))
        whole = [s for s in stacks if not any(c.busy for c in _kids(s, "service"))]
        if whole:
            choices.append((2.0 * crowded, lambda: self._terminate_stack(rng.choice(whole))))
        if not choices:
            return self._deploy_cluster()

        total = sum(weight for weight, _ in choices)
        pick = rng.random() * total
        for weight, make in choices:
            pick -= weight
            if pick < 0:
                return make()
        return choices[-1][1]()

    def _placeable_nodes(self) -> list[Obj]:
        """Nodes a new container may go to: up, and not about to be terminated."""
        return [n for n in self.nodes.values()
                if n.state in ("Deployed", "Unreachable") and not n.doomed]

    # --- node clusters and nodes ---------------------------------------------------------

    def _deploy_cluster(self) -> Operation:
        cluster = self._new("nodecluster", (), "Init", self.clusters)
        yield self._emit(cluster, "create")
        action, event = self._action(cluster)
        yield event
        yield self._emit(cluster, "update", "Deploying")
        nodes = [self._new("node", (cluster,), "Deploying", self.nodes)
                 for _ in range(self.rng.randint(1, 3))]
        for node in nodes:
            yield self._emit(node, "create")
        for node in nodes:
            node.busy = False
            yield self._emit(node, "update", "Deployed")
        cluster.busy = False
        yield self._emit(cluster, "update", "Deployed")
        yield self._emit(action, "update", "Success")

    def _scale_cluster(self, cluster: Obj) -> Operation:
        cluster.busy = True
        action, event = self._action(cluster)
        yield event
        yield self._emit(cluster, "update", "Scaling")
        node = self._new("node", (cluster,), "Deploying", self.nodes)
        yield self._emit(node, "create")
        failed = self._fails()
        if failed:
            yield from self._terminate_node(node)
        else:
            node.busy = False
            yield self._emit(node, "update", "Deployed")
        cluster.busy = False
        yield self._emit(cluster, "update", "Deployed")
        yield self._emit(action, "update", "Failed" if failed else "Success")

    def _terminate_node(self, node: Obj) -> Operation:
        node.busy = node.doomed = True
        yield self._emit(node, "update", "Terminating")
        self._forget(node, self.nodes)
        yield self._emit(node, "delete", "Terminated")

    def _terminate_cluster(self, cluster: Obj) -> Operation:
        cluster.busy = cluster.doomed = True
        nodes = list(cluster.children.values())
        for node in nodes:
            node.busy = node.doomed = True
        action, event = self._action(cluster)
        yield event
        yield self._emit(cluster, "update", "Terminating")
        for node in nodes:
            yield from self._terminate_node(node)
        self._forget(cluster, self.clusters)
        yield self._emit(cluster, "delete", "Terminated")
        yield self._emit(action, "update", "Success")

    def _node_flap(self, node: Obj) -> Operation:
        """A node's agent loses contact for a while, then comes back."""
        node.busy = True
        yield self._emit(node, "update", "Unreachable")
        node.busy = False
        yield self._emit(node, "update", "Deployed")

    # --- stacks, services and containers -------------------------------------------------

    def _create_service(self, stack: Obj | None = None) -> Operation:
        """`tutum service run`: create a service and start its containers."""
        service = self._new("service", (stack,) if stack else (), "Init", self.services)
        yield self._emit(service, "create")
        yield from self._start(service, self.rng.randint(1, 3))

    def _create_stack(self) -> Operation:
        stack = self._new("stack", (), "Not running", self.stacks)
        yield self._emit(stack, "create")
        services = [self._new("service", (stack,), "Init", self.services)
                    for _ in range(self.rng.randint(2, 3))]
        for service in services:
            yield self._emit(service, "create")
        action, event = self._action(stack)
        yield event
        yield self._emit(stack, "update", "Starting")
        for service in services:
            yield from self._start(service, self.rng.randint(1, 2))
        stack.busy = False
        ok = all(s.state == "Running" for s in services)
        yield self._emit(stack, "update", "Running" if ok else "Partly running")
        yield self._emit(action, "update", "Success" if ok else "Failed")

    def _start(self, service: Obj, target: int) -> Operation:
        """Start a service: its stopped containers, plus new ones up to `target`."""
        service.busy = True
        action, event = self._action(service)
        yield event
        yield self._emit(service, "update", "Starting")
        containers = list(service.children.values())
        for _ in range(max(0, target - len(containers))):
            container = yield from self._new_container(service)
            if container is not None:
                containers.append(container)
        for container in containers:
            if container.state != "Starting":
                yield self._emit(container, "update", "Starting")
        failures = 0
        for container in containers:
            if self._fails():
                failures += 1
                yield self._emit(container, "update", "Stopped")
            else:
                yield self._emit(container, "update", "Running")
        yield from self._settle(service, action, failures, len(containers))

    def _start_service(self, service: Obj) -> Operation:
        yield from self._start(service, len(service.children))

    def _settle(self, service: Obj, action: Obj, failures: int, total: int) -> Operation:
        if total and failures == total:
            state = "Stopped"
        else:
            state = "Partly running" if failures or not total else "Running"
        service.busy = False
        yield self._emit(service, "update", state)
        yield self._emit(action, "update", "Failed" if failures or not total else "Success")

    def _new_container(self, service: Obj) -> Iterator[Event]:
        """Create one container of `service` on some node (generator returning it)."""
        nodes = self._placeable_nodes()
        if not nodes:
            return None
        node = self.rng.choice(nodes)
        parents = (service,) + service.parents + (node,)
        container = self._new("container", parents, "Starting")
        yield self._emit(container, "create")
        return container

    def _terminate_container(self, container: Obj) -> Operation:
        yield self._emit(container, "update", "Terminating")
        self._forget(container)
        yield self._emit(container, "delete", "Terminated")

    def _stop_service(self, service: Obj) -> Operation:
        service.busy = True
        action, event = self._action(service)
        yield event
        yield self._emit(service, "update", "Stopping")
        containers = list(service.children.values())
        for container in containers:
            yield self._emit(container, "update", "Stopping")
        for container in containers:
            yield self._emit(container, "update", "Stopped")
        service.busy = False
        yield self._emit(service, "update", "Stopped")
        yield self._emit(action, "update", "Success")

    def _redeploy_service(self, service: Obj) -> Operation:
        """Replace every container with a new one, one at a time."""
        service.busy = True
        action, event = self._action(service)
        yield event
        yield self._emit(service, "update", "Redeploying")
        failures = total = 0
        for old in list(service.children.values()):
            yield from self._terminate_container(old)
            new = yield from self._new_container(service)
            if new is not None:
                total += 1
                failed = self._fails()
                failures += failed
                yield self._emit(new, "update", "Stopped" if failed else "Running")
        yield from self._settle(service, action, failures, total)

    def _scale_service(self, service: Obj) -> Operation:
        service.busy = True
        action, event = self._action(service)
        yield event
        yield self._emit(service, "update", "Scaling")
        current = list(service.children.values())
        target = self.rng.randint(1, MAX_CONTAINERS_PER_SERVICE)
        for container in current[target:]:
            yield from self._terminate_container(container)
        added = []
        for _ in range(target - len(current)):
            container = yield from self._new_container(service)
            if container is not None:
                added.append(container)
        for container in added:
            yield self._emit(container, "update", "Running")
        service.busy = False
        yield self._emit(service, "update", "Running")
        yield self._emit(action, "update", "Success")

    def _crash_container(self, service: Obj) -> Operation:
        """A container exits on its own and Tutum's autorestart brings it back."""
        running = [c for c in service.children.values() if c.state == "Running"]
        if not running:
            return
        service.busy = True
        container = self.rng.choice(running)
        yield self._emit(container, "update", "Stopped")
        yield self._emit(service, "update", "Partly running")
        yield self._emit(container, "update", "Starting")
        yield self._emit(container, "update", "Running")
        service.busy = False
        yield self._emit(service, "update", "Running")

    def _terminate_service(self, service: Obj) -> Operation:
        service.busy = service.doomed = True
        action, event = self._action(service)
        yield event
        yield from self._remove_service(service)
        yield self._emit(action, "update", "Success")

    def _remove_service(self, service: Obj) -> Operation:
        yield self._emit(service, "update", "Terminating")
        for container in list(service.children.values()):
            yield from self._terminate_container(container)
        self._forget(service, self.services)
        yield self._emit(service, "delete", "Terminated")

    def _terminate_stack(self, stack: Obj) -> Operation:
        stack.busy = stack.doomed = True
        services = _kids(stack, "service")
        for service in services:
            service.busy = service.doomed = True
        action, event = self._action(stack)
        yield event
        yield self._emit(stack, "update", "Terminating")
        for service in services:
            yield from self._remove_service(service)
        self._forget(stack, self.stacks)
        yield self._emit(stack, "delete", "Terminated")
        yield self._emit(action, "update", "Success")


def notifications(rng: Random, now: float) -> Event:
    """The `user-notifications` batch sent after `auth`: the last minute's notifications."""
    messages = (("info", "Service redeployed"), ("warning", "Node is unreachable"),
                ("error", "Container exited with code 1"), ("info", "Node cluster deployed"))
    batch = []
    for _ in range(rng.randint(1, 3)):
        level, message = rng.choice(messages)
        batch.append({
            "type": "user-notification",
            "level": level,
            "message": message,
            "image": rng.choice(_IMAGES),
            "uuid": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "datetime": tutum_datetime(now - rng.uniform(0, 60)),
        })
    return {"type": "user-notifications", "data": batch}
