"""One replica's part in HA: its role, the takeover, and what it tells the others.

- leader: the publisher publishes; every confirm is reported (`confirmed`, the
  identities); offers of events it missed are spooled and published, once each;
- standby: the publisher is paused; the witness forgets what the leader reported and
  offers the leader what it missed (`offer`), after the grace period;
- takeover (the lock is ours): the witness forgets the matched prefix and the
  publisher resumes from there: `ha.takeover` says how many events are filled in;
- link down: paused at once, whatever the role was;
- only a leader's events are waited for: any other role reads the stream in batches
  (`pace_stream`, `STANDBY_GATHER`), which costs the host a fraction of the CPU;
- a publisher that does not work (docs/contract.md section 7: a replica that cannot
  reach the broker can never be leader; the lock is on another connection): a
  standby whose publisher is not open does not compete for the lock, and a leader
  whose publisher has made no progress (no confirm while it owed one) for
  `publish_timeout` gives the lock up, and waits as long again before it competes,
  so that a standby whose publisher works takes the lock first (`leadership_blocked`).

Every replica also announces `presence` every second (role, since when its stream is
up, events not yet confirmed, seconds since its stream last brought one), so that a
leader whose stream comes back can say in `bridge.connected` which standbys covered
the gap (`gap.covered_by`), and a standby knows when the leader is caught up and its
own unmatched tail is a gap that no later event may reveal (`Witness.tick`).
"""

from __future__ import annotations

import base64
import enum
import json
import time
from collections import OrderedDict

from bridge.event import Event, resolve
from bridge.ha import identity
from bridge.ha.identity import Identities
from bridge.ha.link import HaLink, LinkState, Names
from bridge.ha.witness import Witness, WitnessedSpool

PRESENCE_EVERY = 1.0     # seconds between presence messages
PEER_FRESH = 3.0         # seconds a peer's presence counts
ACCEPTED_MAX = 100_000   # identities of accepted offers remembered (each published once)
RECOVERED_BATCH = 5000   # events read at a time when a previous run left some
# A replica that is not the leader reads the stream at most this often: nobody waits
# for its copies, and each read costs about the same for one frame as for fifty.
STANDBY_GATHER = 0.05


class Role(enum.Enum):
    """What this replica is; follows the link's state (`on_state`)."""

    STARTING = "starting"
    STANDBY = "standby"
    LEADER = "leader"
    DISCONNECTED = "disconnected"      # no link to the broker: neither, publishes nothing


class HaNode:
    """The HA side of one replica: owns the witness, the wrapped spool and the link."""

    def __init__(self, ha_cfg, amqp, spool, metrics, log, clock=time.monotonic) -> None:
        self.replica = spool.id
        self._clock = clock
        self._log = log
        self._metrics = metrics
        self._publish_timeout = ha_cfg.publish_timeout
        self._gave_up_at: float | None = None     # when we last gave the lock up
        self._inner = spool
        self._identities = Identities()
        self.witness = Witness(spool, ha_cfg.fill_grace)
        self.spool = WitnessedSpool(spool, self.witness, self._identities,
                                    on_lifecycle=self._lifecycle, on_confirmed=self._report)
        self.link = HaLink(amqp, Names.for_exchange(amqp.exchange), self.replica,
                           ha_cfg.heartbeat, log, self)
        self._witness_recovered()
        self.role = Role.STARTING
        self._publisher = None
        self._pace_stream = lambda _gather: None
        self._peers: dict[str, dict] = {}
        self._streaming_since: float | None = None
        self._last_presence = 0.0
        self._accepted: OrderedDict[str, None] = OrderedDict()
        metrics.leader.set(0)

    def _witness_recovered(self) -> None:
        """Events a previous run left in the spool are ours as much as new ones: as a
        standby we offer them to the leader (which drops those it has), as a leader we
        publish them; so they are on the books before anything new."""
        seq = self._inner.confirmed + 1
        while batch := self._inner.read(seq, RECOVERED_BATCH):
            for number, ev in batch:
                self.witness.appended(number, [ev])
            seq = batch[-1][0] + 1

    def attach(self, publisher, pace_stream) -> None:
        """The publisher to pause and resume (created paused), and how to set the
        stream's pace (`StreamReader.pace`): gathered while not the leader."""
        self._publisher = publisher
        self._pace_stream = pace_stream
        pace_stream(0.0 if self.is_leader else STANDBY_GATHER)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    @property
    def in_sync(self) -> bool:
        """Ready to serve: the leader, or a standby whose stream is up and which hears
        a leader (so its witness is current and it could take over)."""
        if self.is_leader:
            return True
        now = time.monotonic()
        return (self.role is Role.STANDBY and self._streaming_since is not None
                and any(p.get("role") == Role.LEADER.value and now - p["heard"] < PEER_FRESH
                        for p in self._peers.values()))

    def describe(self) -> dict:
        return {"role": self.role.value, "in_sync": self.in_sync, "replica": self.replica,
                "witness_pending": self.witness.pending}

    # --- the link's callbacks (its thread) ----------------------------------------------

    def on_state(self, state: LinkState) -> None:
        if state is LinkState.LEADER:
            return self._take_over()
        self._publisher.pause()
        self._metrics.leader.set(0)
        self._pace_stream(STANDBY_GATHER)
        role = Role.STANDBY if state is LinkState.STANDBY else Role.DISCONNECTED
        if role is Role.STANDBY and self.role is Role.LEADER:    # gave the lock up
            self._gave_up_at = self._clock()
            self._log.warning("ha.standby", replica=self.replica,
                              detail="gave up the lock: our publisher does not work")
        elif role is Role.STANDBY and self.role is not Role.STANDBY:
            self._log.info("ha.standby", replica=self.replica,
                           detail="another replica holds the lock; witnessing it")
        elif role is Role.DISCONNECTED and self.role is Role.LEADER:
            self._log.warning("ha.standby", replica=self.replica,
                              detail="lost the broker: not the leader any more")
        self.role = role

    def leadership_blocked(self) -> str | None:
        """Why this replica may not be, or stay, the leader now; None if it may."""
        publisher, now = self._publisher, self._clock()
        if not self.is_leader:
            if not publisher.connected:
                return f"the publisher is {publisher.state.value}, not open"
            if self._gave_up_at is not None and now - self._gave_up_at < self._publish_timeout:
                return (f"gave up the lock less than {self._publish_timeout:g} s ago: "
                        f"another replica first")
        if now - publisher.progress_at > self._publish_timeout:
            return (f"the publisher made no progress (no confirm, and events waiting) for "
                    f"over {self._publish_timeout:g} s (BRIDGE_HA_PUBLISH_TIMEOUT)")
        return None

    def on_message(self, kind: str, body: dict, sender: str) -> None:
        if kind == "confirmed":
            if not self.is_leader:
                self.witness.leader_published(body.get("ids", []))
        elif kind == "presence":
            self._peers[sender] = {**body, "heard": time.monotonic()}
        elif kind == "offer" and self.is_leader:
            self._accept(body.get("events", []), sender)

    def on_tick(self) -> None:
        if self.role is Role.STANDBY:
            holes = self.witness.tick(leader_caught_up=self._leader_caught_up())
            if holes:
                self._offer(holes)
        now = time.monotonic()
        if now - self._last_presence >= PRESENCE_EVERY:
            self._last_presence = now
            self.link.send("presence", {"role": self.role.value,
                                        "streaming_since": self._streaming_since,
                                        "pending": self._inner.pending,
                                        "quiet": round(self.spool.quiet_for(), 3)})
            for sender in [s for s, p in self._peers.items() if now - p["heard"] > 60]:
                del self._peers[sender]

    def _leader_caught_up(self) -> bool:
        """A leader heard lately whose stream is up, whose spool is empty and whose
        stream has brought nothing for the grace period: it is not merely behind."""
        now, grace = time.monotonic(), self.witness.grace
        return any(p.get("role") == Role.LEADER.value and now - p["heard"] < PEER_FRESH
                   and p.get("streaming_since") is not None and p.get("pending") == 0
                   and (p.get("quiet") or 0) >= grace for p in self._peers.values())

    # --- roles ------------------------------------------------------------------------

    def _take_over(self) -> None:
        started = time.monotonic()
        saw_leader = self.witness.reports_seen > 0 or any(
            p.get("role") == Role.LEADER.value for p in self._peers.values())
        filled, maybe_twice = self.witness.take_over()
        self.role = Role.LEADER
        self._metrics.leader.set(1)
        self._pace_stream(0.0)
        self._publisher.resume()
        if saw_leader:
            self._log.warning("ha.takeover", replica=self.replica, filled=filled,
                              possibly_duplicate=maybe_twice,
                              seconds=round(time.monotonic() - started, 3),
                              detail="publishing first what the old leader had not")
        self._log.info("ha.leader", replica=self.replica)

    # --- what flows between replicas ---------------------------------------------------

    def _report(self, identities: list[str]) -> None:
        """The broker confirmed these (publisher thread): tell the standbys."""
        self.link.send("confirmed", {"ids": identities}, keep=True)

    def _offer(self, seqs: list[int]) -> None:
        wanted, events = set(seqs), []
        first, last = seqs[0], seqs[-1]
        for seq, ev in self._inner.read(first, last - first + 1):
            if seq in wanted:
                ev = resolve(ev)    # classified: a leader of an earlier version expects it
                events.append({"routing_key": ev.routing_key, "received_at": ev.received_at,
                               "quarantined": ev.quarantined, "headers": ev.headers,
                               "body": base64.b64encode(ev.body).decode()})
        if events:
            self._log.info("ha.offer", events=len(events),
                           detail="events the leader missed, offered to it")
            self.link.send("offer", {"events": events})

    def _accept(self, offered: list[dict], sender: str) -> None:
        """Spool the offered events this leader never received, once each; say again
        which of them it has already published (the standby missed that report)."""
        fresh, published = [], []
        for item in offered:
            ident = item.get("headers", {}).get(identity.HEADER)
            if not ident:
                continue
            if ident in self._accepted or self._identities.has(ident):
                if not self.witness.holds(ident):
                    published.append(ident)
                continue
            self._accepted[ident] = None
            fresh.append(Event(item["routing_key"], base64.b64decode(item["body"]),
                               item["received_at"], item["headers"], item["quarantined"]))
        while len(self._accepted) > ACCEPTED_MAX:
            self._accepted.popitem(last=False)
        if published:
            self.link.send("confirmed", {"ids": published}, keep=True)
        if fresh:
            self.spool.append(fresh)
            self._publisher.notify()
            self._log.warning("ha.gap_filled", events=len(fresh), by=sender,
                              detail="events a standby received while our stream was down")

    def _lifecycle(self, ev: Event) -> None:
        """Our own bridge.connected / bridge.disconnected, on its way into the spool."""
        body = json.loads(ev.body)
        if body.get("action") == "disconnected":
            self._streaming_since = None
            return
        self._streaming_since = body.get("connected_at")
        gap = body.get("gap")
        if gap and self.is_leader:
            now = time.monotonic()
            covering = sorted(
                s for s, p in self._peers.items()
                if now - p["heard"] < PEER_FRESH and p.get("streaming_since") is not None
                and p["streaming_since"] <= gap["lost_at"])
            gap["covered_by"] = covering
            gap["covered"] = bool(covering)
            ev.body = json.dumps(body).encode()
