"""The HA books, in process: identities, and a standby's witness (bridge/ha)."""

from __future__ import annotations

import gc
import json

from bridge.event import Event
from bridge.ha.identity import Identities
from bridge.ha.witness import Witness, WitnessedSpool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSpool:
    """Numbers batches and remembers confirms; the real one is tested in test_spool."""

    id = "spool-under-test"

    def __init__(self) -> None:
        self.events: dict[int, Event] = {}
        self.confirmed = 0

    @property
    def last_seq(self) -> int:
        return max(self.events, default=0)

    def append(self, events: list[Event]) -> int:
        for ev in events:
            self.events[self.last_seq + 1] = ev
        return self.last_seq

    def confirm(self, upto: int) -> None:
        self.confirmed = max(self.confirmed, upto)

    def read(self, from_seq: int, limit: int):
        return [(s, self.events[s]) for s in sorted(self.events)
                if s >= from_seq][:limit]


def event(n: int) -> Event:
    return Event("container.update", b'{"type": "container", "n": %d}' % n, 0.0,
                 {"type": "container", "action": "update"})


def lifecycle(spool: FakeSpool) -> Event:
    body = json.dumps({"type": "bridge", "action": "connected", "bridge_id": spool.id})
    return Event("bridge.connected", body.encode(), 0.0, {"type": "bridge"})


def rig(grace: float = 1.0):
    clock, spool, reported = Clock(), FakeSpool(), []
    witness = Witness(spool, grace, clock=clock)
    wrapped = WitnessedSpool(spool, witness, Identities(clock=clock),
                             on_lifecycle=lambda ev: None, on_confirmed=reported.extend)
    return clock, spool, witness, wrapped, reported


def test_identical_bodies_are_numbered_and_the_count_ends_with_the_window():
    clock = Clock()
    ids = Identities(window=60, clock=clock)
    first, second = ids.of(b"same"), ids.of(b"same")
    assert first.endswith("-1") and second.endswith("-2")
    assert first.rpartition("-")[0] == second.rpartition("-")[0]
    assert ids.of(b"other").endswith("-1")
    assert ids.has(second) and not ids.has(first[:-1] + "3")
    clock.now += 61
    assert ids.of(b"same").endswith("-1")


def test_a_minute_of_identities_adds_nothing_for_the_garbage_collector_to_walk():
    # A busy stream keeps ~100,000 identities; a full collection walks every object
    # the collector tracks, so those entries must not be among them.
    ids = Identities(clock=Clock())
    gc.collect()
    before = len(gc.get_objects())
    for n in range(10_000):
        ids.of(b"body %d" % n)
        ids.of(b"body %d" % n)
    gc.collect()
    assert len(ids) == 10_000
    assert len(gc.get_objects()) - before < 100


def test_every_replica_gives_the_same_stream_the_same_identities():
    a, b, c = Identities(clock=Clock()), Identities(clock=Clock()), Identities(clock=Clock())
    bodies = [b"x", b"y", b"x", b"z", b"x"]
    one_by_one = [a.of(body) for body in bodies]
    assert one_by_one == [b.of(body) for body in bodies]
    # Named a read at a time, repeats within one read included: the same names.
    assert c.of_all(bodies[:3]) + c.of_all(bodies[3:]) == one_by_one


def test_a_standby_forgets_what_the_leader_published_and_offers_what_it_missed():
    clock, spool, witness, wrapped, _ = rig(grace=1.0)
    wrapped.append([lifecycle(spool)] + [event(n) for n in range(1, 7)])   # seqs 1..7
    ident = {seq: ev.headers.get("x-event-id") for seq, ev in spool.events.items()}
    assert ident[1] is None                     # our own lifecycle event: no identity

    witness.leader_published([ident[2], ident[3], ident[5]])    # the leader missed seq 4
    assert witness.tick() == []                 # within the grace period
    assert spool.confirmed == 3                 # forgotten: the lifecycle event, 2 and 3
    clock.now += 1.5
    assert witness.tick() == [4]                # older than a published one: a hole
    assert witness.tick() == []                 # offered once, not every tick

    witness.leader_published([ident[4]])        # the leader spooled and published it
    witness.tick()
    assert spool.confirmed == 5
    assert witness.take_over() == (2, 0)        # 6 and 7: never published


def test_the_tail_is_offered_only_once_the_leader_is_caught_up():
    clock, spool, witness, wrapped, _ = rig(grace=1.0)
    wrapped.append([event(n) for n in range(1, 5)])                     # seqs 1..4
    ident = {seq: ev.headers["x-event-id"] for seq, ev in spool.events.items()}
    witness.leader_published([ident[1], ident[2]])
    clock.now += 5
    # 3 and 4 are newer than anything the leader published: perhaps only not yet.
    assert witness.tick() == []
    # The leader says it has all it received published and has heard nothing for a
    # while: they are a gap at the end of its stream.
    assert witness.tick(leader_caught_up=True) == []            # within the grace period
    clock.now += 1.5
    assert witness.tick(leader_caught_up=True) == [3, 4]
    assert witness.tick(leader_caught_up=True) == []            # offered once


def test_a_report_that_comes_before_our_own_copy_still_matches():
    _, spool, witness, wrapped, _ = rig()
    probe = Identities(clock=Clock())
    witness.leader_published([probe.of(event(1).body)])
    wrapped.append([event(1)])
    witness.tick()
    assert spool.confirmed == 1


def test_the_leader_reports_what_the_broker_confirmed_by_identity():
    _, spool, _, wrapped, reported = rig()
    wrapped.append([event(1), lifecycle(spool), event(2)])
    wrapped.confirm(2)
    assert reported == [spool.events[1].headers["x-event-id"]]
    wrapped.confirm(3)
    assert reported[-1] == spool.events[3].headers["x-event-id"]


def test_takeover_counts_what_may_arrive_twice():
    _, spool, witness, wrapped, _ = rig()
    wrapped.append([event(n) for n in range(1, 5)])
    ident = {seq: ev.headers["x-event-id"] for seq, ev in spool.events.items()}
    witness.leader_published([ident[1], ident[3]])
    # 1 forgotten; 2 never published; 3 published, but after 2 so it goes again; 4 new.
    assert witness.take_over() == (2, 1)
    assert spool.confirmed == 1


def test_our_own_lifecycle_events_go_with_the_leaders_but_a_new_leader_keeps_its_last():
    _, spool, witness, wrapped, _ = rig()
    wrapped.append([lifecycle(spool), event(1), lifecycle(spool)])
    witness.leader_published([spool.events[2].headers["x-event-id"]])
    witness.tick()
    assert spool.confirmed == 2                 # the first one went with event 1
    assert witness.take_over() == (0, 0)
    assert spool.confirmed == 2                 # the last one is ours to publish
