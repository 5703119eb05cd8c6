"""The publishing position (bridge/confirms.py) against a model broker, any interleaving.

Hypothesis drives a `Position` with every mix of publishes, acks and nacks (single
and `multiple`, of live or superseded tags) and lost channels, while a model broker
numbers tags per channel and answers each tag once. After every step it checks what
users rely on (docs/contract.md section 4, README "The delivery guarantee"):

- nothing leaves the spool unless the broker acked its latest copy (no loss);
- once the broker acks everything, everything is confirmed (no event stuck), and in
  the stream of copies the broker received, the last copy of each event comes in the
  received order (the order guarantee the worker helper relies on).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.confirms import Position

EVENTS = 12

operations = st.lists(st.one_of(
    st.tuples(st.just("publish")),
    st.tuples(st.just("ack"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("nack"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("lost")),
), max_size=60)


class Broker:
    """Numbers each channel's publishes from 1 and answers each tag once."""

    def __init__(self, pos: Position) -> None:
        self.pos = pos
        self.copies: list[int] = []                 # every publish, in arrival order
        self.acked: dict[int, int] = {}             # seq -> index of its latest acked copy
        self.outstanding: dict[int, int] = {}       # tag -> index in copies
        self.next_tag = 1

    def publish(self) -> None:
        if not self.pos.ready():        # as the publisher does
            return
        while self.pos.room > 0 and self.pos.cursor <= EVENTS:
            seq = self.pos.cursor
            if self.pos.skip(seq):
                continue
            self.pos.published(seq, now=0.0)
            self.outstanding[self.next_tag] = len(self.copies)
            self.copies.append(seq)
            self.next_tag += 1

    def answer(self, kind: str, index: int, multiple: bool) -> None:
        if not self.outstanding:
            return
        tag = sorted(self.outstanding)[index % len(self.outstanding)]
        covered = [t for t in self.outstanding if t <= tag] if multiple else [tag]
        for t in covered:
            copy = self.outstanding.pop(t)
            if kind == "ack":
                self.acked[self.copies[copy]] = max(self.acked.get(self.copies[copy], -1), copy)
        tags = self.pos.tags(tag, multiple)
        if tags:
            (self.pos.acked if kind == "ack" else self.pos.nacked)(tags)
        self.pos.advance()

    def lost(self) -> None:
        self.outstanding.clear()
        self.next_tag = 1
        self.pos.new_channel()

    def latest(self) -> dict[int, int]:
        return {seq: i for i, seq in enumerate(self.copies)}

    def check(self) -> None:
        latest = self.latest()
        for seq in range(1, self.pos.confirmed + 1):
            assert self.acked.get(seq) == latest[seq], (seq, self.copies, self.acked)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_no_interleaving_loses_an_event_or_breaks_the_order_of_last_copies(ops):
    broker = Broker(Position(confirmed=0, published_max=0, window=4))
    for op in ops:
        if op[0] == "publish":
            broker.publish()
        elif op[0] == "lost":
            broker.lost()
        else:
            broker.answer(*op)
        broker.check()
    for _ in range(10 * EVENTS):          # then the broker takes everything
        broker.publish()
        if broker.outstanding:
            broker.answer("ack", len(broker.outstanding) - 1, True)
        broker.check()
    assert broker.pos.confirmed == EVENTS
    # Once the republishes are through (not in between), the last copies are in order.
    latest = broker.latest()
    assert sorted(latest, key=latest.get) == list(range(1, EVENTS + 1)), broker.copies


def test_the_window_waits_for_room_for_a_refill_unless_nothing_is_in_flight():
    pos = Position(confirmed=0, published_max=0, window=80)     # a refill: 10 events
    for seq in range(1, 81):
        pos.published(seq, now=0.0)
    pos.acked(pos.tags(9, multiple=True))
    assert pos.room == 9 and not pos.ready()
    pos.acked(pos.tags(10, multiple=False))
    assert pos.ready()
    pos.nacked(pos.tags(11, multiple=False))      # slow start: a window of one
    assert pos.window == 1 and pos.ready()        # nothing in flight
    pos.published(11, now=0.0)
    assert not pos.ready()
    pos.acked(pos.tags(81, multiple=False))       # the republish's tag
    assert pos.window == 2 and pos.ready()


def test_a_set_aside_event_is_skipped_and_counts_as_confirmed():
    pos = Position(confirmed=0, published_max=0, window=10, set_aside={2})
    broker = Broker(pos)
    broker.publish()
    assert broker.copies == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    broker.answer("ack", 9, True)
    assert pos.confirmed == 11 and pos.set_aside == set()
