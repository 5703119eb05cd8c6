"""Which events the broker has, which are in flight, and which to publish next. Sans-IO.

The publisher tells a `Position` what it published and what the broker answered; the
position says what to publish next and how far the spool may forget. No sockets, no
clock of its own (times are passed in), so every interleaving can be tested directly.

The invariants, which hold between any two calls:

- `confirmed`: every event up to it is confirmed (or set aside): the spool may forget
  them. `confirmed < cursor`.
- `cursor`: the next sequence to publish. Everything in (`confirmed`, `cursor`) has been
  published on the current channel, and its copy there is either live or confirmed.
- `live`: delivery tag -> (sequence, time sent) of the copies whose confirm counts, in
  tag order, which is also sequence order. A copy stops being live when confirmed, or
  when its event is to be published again (after a nack, or on a new channel): a late
  ack of it then counts for nothing, since the new copy will be confirmed itself. So
  `confirmed` is one below the first live sequence, or `cursor - 1` if none is live.
- `published_max`: the highest sequence ever published; at or below it a publish is a
  republish (`x-republished`).
- `set_aside`: sequences above `confirmed` that are never to be published.
- Publishing only ever moves `cursor` forward, one sequence at a time, and a nack or a
  new channel moves it back to a live or unconfirmed event: so after any event has
  been published again, every event published after it is too, before anything new.
  That is the order guarantee: the last copies of events are in the received order.
"""

from __future__ import annotations

import itertools

# Publish into the window only once this share of it (1/8) is free, or nothing is in
# flight. Publishing into whatever room each confirm frees wrote one event at a time in
# a burst: RabbitMQ acks a few events per frame, and of 27,000 writes for 100,000
# events, 20,000 held one (`tutum-bridge bench`), each a send, a spool read and a pass
# through the publisher's loop. A refill of a window's eighth still keeps seven eighths
# in flight, and at a steady rate the window is nearly empty, so nothing waits.
REFILL_SHARE = 8


def ready_to_refill(in_flight: int, window: int, window_max: int) -> bool:
    """Whether to publish now: nothing is in flight, or the room for a refill (a
    `REFILL_SHARE` of the full window, or all of a window shrunk by slow start). A
    confirm always follows what is in flight, so waiting for one never stalls."""
    refill = min(window, max(1, window_max // REFILL_SHARE))
    return not in_flight or window - in_flight >= refill


class Position:
    def __init__(self, confirmed: int, published_max: int, window: int,
                 set_aside: set[int] | None = None) -> None:
        self.confirmed = confirmed
        self.cursor = confirmed + 1
        self.published_max = published_max
        self.window_max = window
        self.window = window              # 1 after a nack or a refusal, doubling per ack
        self.live: dict[int, tuple[int, float]] = {}
        self.set_aside = set(set_aside or ())
        self._next_tag = 1
        self._nacked_upto = 0             # the nack backoff resets once this is confirmed

    # --- publishing ----------------------------------------------------------------

    @property
    def room(self) -> int:
        return self.window - len(self.live)

    def ready(self) -> bool:
        """Whether to publish now (`ready_to_refill`)."""
        return ready_to_refill(len(self.live), self.window, self.window_max)

    def skip(self, seq: int) -> bool:
        """True (and past it) if `seq`, the next in the spool, is not to be published."""
        if seq in self.set_aside:
            self.cursor = seq + 1
            return True
        return False

    def is_republish(self, seq: int) -> bool:
        return seq <= self.published_max

    def published(self, seq: int, now: float) -> None:
        """`seq` went out on the channel with the next delivery tag."""
        self.live[self._next_tag] = (seq, now)
        self._next_tag += 1
        self.cursor = seq + 1
        self.published_max = max(self.published_max, seq)

    def not_publishable(self, seq: int) -> None:
        """`seq` could not even be encoded: set aside, skipped from now on."""
        self.set_aside.add(seq)
        self.cursor = max(self.cursor, seq + 1)

    # --- the broker's answers ------------------------------------------------------

    def tags(self, tag: int, multiple: bool) -> list[int]:
        """The live tags an ack or nack of (`tag`, `multiple`) covers."""
        if multiple:
            return list(itertools.takewhile(lambda t: t <= tag, self.live))
        return [tag] if tag in self.live else []

    def acked(self, tags: list[int]) -> None:
        for t in tags:
            del self.live[t]
        if self.window < self.window_max:
            self.window = min(self.window_max, self.window * 2)

    def nacked(self, tags: list[int]) -> int:
        """Publish again from the first nacked event, one at first; returns it."""
        first = min(self.live[t][0] for t in tags)
        self.live = {t: v for t, v in self.live.items() if v[0] < first}
        self._nacked_upto = max(self._nacked_upto, self.published_max)
        self.cursor = first
        self.window = 1
        return first

    def new_channel(self) -> None:
        """The channel is gone: its tags mean nothing, and what was live goes again."""
        self.live.clear()
        self.cursor = self.confirmed + 1
        self._next_tag = 1

    def advance(self) -> tuple[int, bool]:
        """Move `confirmed` as far as the invariants allow: (by how much, whether
        everything nacked so far is now confirmed)."""
        upto = next(iter(self.live.values()))[0] - 1 if self.live else self.cursor - 1
        if upto <= self.confirmed:
            return 0, False
        moved, self.confirmed = upto - self.confirmed, upto
        self.set_aside = {s for s in self.set_aside if s > upto}
        settled = bool(self._nacked_upto) and upto >= self._nacked_upto
        if settled:
            self._nacked_upto = 0
        return moved, settled

    # --- what the publisher asks ---------------------------------------------------

    def alone(self) -> int | None:
        """The sequence of the only live copy, if exactly one is live."""
        return next(iter(self.live.values()))[0] if len(self.live) == 1 else None

    def oldest_sent(self) -> float | None:
        return next(iter(self.live.values()))[1] if self.live else None

    def restart_clocks(self, now: float) -> None:
        """Confirms held back (a resource alarm) are due from `now`."""
        self.live = {t: (seq, now) for t, (seq, _) in self.live.items()}

    def take_over(self, confirmed: int, last_seq: int) -> None:
        """HA: the spool's confirmed position moved while this replica was a standby,
        and everything it holds may have been published by the old leader."""
        if not self.live:
            self.confirmed = max(self.confirmed, confirmed)
            self.cursor = self.confirmed + 1
        self.published_max = max(self.published_max, last_seq)
