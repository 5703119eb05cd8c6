"""A replica's books: its own events against what the leader published.

Every replica spools the whole stream. The leader reports the identities the broker
confirmed (`confirmed`, from the publisher's `confirm`); a standby matches them to its
own copies and forgets, from the front of its spool, every event the leader has
published. What it cannot match is one of two things:

- a *hole*: an event older than one the leader published, which the leader therefore
  never had (its stream dropped while ours stayed up). After `grace` seconds the
  standby offers it to the leader, which spools and publishes it (`offers`);
- the tail: events the leader has not published *yet*, or never had: a gap at the
  end of a burst, with nothing after it to show it. So once the leader says it is
  caught up (its stream up, its spool empty, nothing received for `grace` seconds:
  `tick(leader_caught_up=True)`), the tail is offered like a hole. Were the leader's
  stream only late, its own copies would follow an accepted offer: duplicates, with
  the same identity, never a loss.

On takeover (`take_over`) the standby forgets the matched prefix and hands the rest,
holes first, to its publisher, in its own order. Everything after the first event it
could not match is published, so an event the old leader published after its last
report arrives twice, with the same identity (`x-event-id`, the `message_id`).

The replica's own lifecycle events (`bridge.connected` ...) carry no identity: a
standby's are forgotten with the leader's events around them; those after the last
event the leader published are published if this replica takes over.

Thread-safety: one lock; `appended` runs on the stream thread (or the HA thread for
accepted offers), `forget_upto` on the publisher's, the rest on the HA thread.
Memory: one small entry per event not yet forgotten, which on a standby whose leader
is healthy is about a report interval's worth.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque

from bridge.event import Event
from bridge.ha import identity
from bridge.ha.identity import Identities

EARLY_MAX = 100_000      # identities published before this replica received them, kept
EARLY_SECONDS = 30.0
OFFER_AGAIN = 10.0       # seconds before a hole still unmatched is offered again
OFFER_MAX = 500          # events in one offer
OFFER_SPAN = 5000        # and all within this many sequence numbers (one spool read)


class Witness:
    def __init__(self, spool, grace: float, clock=time.monotonic) -> None:
        self._spool = spool                 # the real spool (its confirm reports nothing)
        self.grace = grace                  # seconds an unmatched event waits before an offer
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: deque[tuple[int, str | None]] = deque()   # (seq, identity), in order
        self._by_id: dict[str, int] = {}
        self._matched: set[int] = set()
        self._high = 0                      # highest matched seq: older unmatched are holes
        self._hole_since: dict[int, float] = {}
        self._offered: dict[int, float] = {}
        self._early: OrderedDict[str, float] = OrderedDict()
        self._reported = spool.confirmed    # every seq up to here is forgotten
        self.reports_seen = 0               # reports from a leader, ever

    # --- every role -------------------------------------------------------------------

    def appended(self, first_seq: int, events: list[Event]) -> list[str]:
        """Register a spooled batch; returns identities of any already confirmed."""
        late: list[str] = []
        with self._lock:
            for seq, ev in enumerate(events, first_seq):
                ident = ev.headers.get(identity.HEADER)
                if seq <= self._reported:          # the publisher was quicker than us
                    if ident:
                        late.append(ident)
                    continue
                self._entries.append((seq, ident))
                if ident is None:
                    self._matched.add(seq)
                elif self._early.pop(ident, None) is not None:
                    self._match(seq)
                else:
                    self._by_id[ident] = seq
        return late

    def forget_upto(self, upto: int) -> list[str]:
        """The spool confirmed up to `upto`: drop those entries; their identities."""
        out: list[str] = []
        with self._lock:
            self._reported = max(self._reported, upto)
            entries = self._entries
            while entries and entries[0][0] <= upto:
                seq, ident = entries.popleft()
                self._matched.discard(seq)
                self._hole_since.pop(seq, None)
                self._offered.pop(seq, None)
                if ident is not None:
                    self._by_id.pop(ident, None)
                    out.append(ident)
        return out

    # --- the standby ------------------------------------------------------------------

    def leader_published(self, identities: list[str]) -> None:
        now = self._clock()
        with self._lock:
            self.reports_seen += 1
            for ident in identities:
                seq = self._by_id.get(ident)
                if seq is not None:
                    self._match(seq)
                else:
                    self._early[ident] = now
            while self._early and (len(self._early) > EARLY_MAX or
                                   next(iter(self._early.values())) < now - EARLY_SECONDS):
                self._early.popitem(last=False)

    def tick(self, leader_caught_up: bool = False) -> list[int]:
        """Forget the matched prefix; the holes to offer the leader now (seqs), and
        the tail too when the leader is caught up."""
        now = self._clock()
        upto = self._matched_prefix()
        if upto:
            self._spool.confirm(upto)
            self.forget_upto(upto)
        offer: list[int] = []
        with self._lock:
            for seq, _ in self._entries:
                if (seq >= self._high and not leader_caught_up) or len(offer) >= OFFER_MAX or (
                        offer and seq - offer[0] >= OFFER_SPAN):
                    break
                if seq in self._matched:
                    continue
                since = self._hole_since.setdefault(seq, now)
                if now - since >= self.grace and now - self._offered.get(seq, -OFFER_AGAIN) \
                        >= OFFER_AGAIN:
                    self._offered[seq] = now
                    offer.append(seq)
        return offer

    def take_over(self) -> tuple[int, int]:
        """Forget the matched prefix; (events to fill in, events that may be duplicates)."""
        upto = self._matched_prefix()
        if upto:
            self._spool.confirm(upto)
            self.forget_upto(upto)
        with self._lock:
            events = [seq for seq, ident in self._entries if ident is not None]
            unmatched = sum(1 for seq in events if seq not in self._matched)
            maybe_twice = len(events) - unmatched
            self._matched.clear()
            self._early.clear()
            self._hole_since.clear()
            self._offered.clear()
            self._high = 0
        return unmatched, maybe_twice

    def holds(self, ident: str) -> bool:
        """The event of that identity is spooled here and not yet confirmed."""
        with self._lock:
            return ident in self._by_id

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    # --- internals ----------------------------------------------------------------------

    def _match(self, seq: int) -> None:
        self._matched.add(seq)
        self._high = max(self._high, seq)

    def _matched_prefix(self) -> int:
        """The last seq of the front run of matched events that ends with one the
        leader published: our own lifecycle events go with the leader's events around
        them, but those after its last one stay, for us to publish if we lead."""
        upto = 0
        with self._lock:
            for seq, ident in self._entries:
                if seq not in self._matched:
                    break
                if ident is not None:
                    upto = seq
        return upto


class WitnessedSpool:
    """The spool as the sink and the publisher see it on a replica with HA on.

    `append` gives each event its identity (kept if it has one: an accepted offer) and
    registers it with the witness; `confirm` reports what the broker confirmed. All
    else is the spool's own.
    """

    def __init__(self, spool, witness: Witness, identities: Identities, *,
                 on_lifecycle, on_confirmed) -> None:
        self._spool = spool
        self._witness = witness
        self._identities = identities
        self._on_lifecycle = on_lifecycle
        self._on_confirmed = on_confirmed
        self._append_lock = threading.Lock()
        self._stream_event_at = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the stream last brought an event (or since this start)."""
        return time.monotonic() - self._stream_event_at

    def append(self, events: list[Event]) -> int:
        unnamed = []
        for ev in events:
            if ev.routing_key.startswith("bridge.") and self._is_own(ev):
                self._on_lifecycle(ev)
            elif identity.HEADER not in ev.headers:
                unnamed.append(ev)
        if unnamed:
            self._stream_event_at = time.monotonic()
            names = self._identities.of_all([ev.body for ev in unnamed])
            for ev, name in zip(unnamed, names):
                ev.headers[identity.HEADER] = name
        with self._append_lock:
            last = self._spool.append(events)
            late = self._witness.appended(last - len(events) + 1, events)
        if late:
            self._on_confirmed(late)
        return last

    def confirm(self, upto_seq: int) -> None:
        self._spool.confirm(upto_seq)
        done = self._witness.forget_upto(upto_seq)
        if done:
            self._on_confirmed(done)

    def __getattr__(self, name: str):
        return getattr(self._spool, name)

    def _is_own(self, ev: Event) -> bool:
        try:
            return json.loads(ev.body).get("bridge_id") == self._spool.id
        except (ValueError, AttributeError):
            return False
