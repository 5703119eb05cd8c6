"""`simulate --fanout`: the real service's semantics for several clients of one account.

Tutum did not hand each event to one connection: events happened in real time, and
every client connected at that moment got its own copy; a client that was away got
nothing of what happened meanwhile. Replicas of the bridge (docs/contract.md section 7)
are tested against exactly that, so this mode has one clock for the world, not one per
connection:

- the world starts when the first client authenticates (the `--clients`-th, to
  measure a burst that reaches several replicas), then events happen at the
  configured rate whoever is connected (`--count` ends it);
- each event is stamped once (`--sequence`: the same `sim_seq` and `sim_sent_at` on
  every copy) and queued to every open connection;
- a connection that falls more than `OUTBOX_MAX` frames behind is closed, as a
  real service drops a client that does not read.

`/stats` counts `last_seq` events that happened, `sent` those handed to at least one
connection, and per connection what it was sent (`per_connection`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bridge.simulator.pacing import Pacer
from bridge.simulator.session import BATCH, Phase, Session, stamp

if TYPE_CHECKING:
    from bridge.simulator.server import Simulator

OUTBOX_MAX = 200_000        # frames a connection may lag behind before it is dropped


class Broadcast:
    """The world's clock and the copies: one event, every open connection."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.members: set[FanoutSession] = set()
        self.ended = False
        self._task: asyncio.Task | None = None

    def join(self, session: FanoutSession) -> None:
        self.members.add(session)
        if self._task is None and len(self.members) >= self.sim.settings.clients:
            self._task = asyncio.get_running_loop().create_task(self._happen())

    def leave(self, session: FanoutSession) -> None:
        self.members.discard(session)

    async def _happen(self) -> None:
        sim = self.sim
        stats, source, sequence = sim.stats, sim.source, sim.settings.sequence
        pacer = Pacer(sim.settings.rate)
        while True:
            frames = source.take(await pacer.allowance(BATCH))
            if not frames:
                self.ended = True
                for member in self.members:
                    member.wake.set()
                return
            batch, events, valid = [], [], 0
            for frame in frames:
                if frame.valid:
                    valid += 1
                    events.append(frame.payload)
                    seq = stats.last_seq + valid
                    payload = stamp(frame.payload, seq) if sequence else frame.payload
                    batch.append((seq, frame.text, payload))
                else:
                    batch.append((None, frame.text, frame.payload))
            stats.last_seq += valid
            pacer.sent(valid)
            # The REST side shows what happened, told to a client or not: it is what a
            # client that missed events resynchronises from.
            sim.rest.sent(events)
            if self.members:
                stats.sent += valid
                stats.malformed += len(frames) - valid
            for member in list(self.members):
                member.deliver(batch)
            await asyncio.sleep(0)


class FanoutSession(Session):
    """A connection that sends its copy of whatever happens while it is open."""

    def __init__(self, sim: Simulator, ws, number: int, user: str, broadcast: Broadcast):
        super().__init__(sim, ws, number, user)
        self.broadcast = broadcast
        self.outbox: deque[tuple[int | None, bool, bytes]] = deque()
        self.wake = asyncio.Event()
        self.first_seq: int | None = None
        self.last_seq: int | None = None

    def deliver(self, batch: list[tuple[int | None, bool, bytes]]) -> None:
        if len(self.outbox) + len(batch) > OUTBOX_MAX:
            self.log.warning("slow client dropped", behind=len(self.outbox))
            self.broadcast.leave(self)
            self.ws.transport.abort()
            return
        self.outbox.extend(batch)
        self.wake.set()

    async def _stream(self) -> None:
        self.broadcast.join(self)
        try:
            while True:
                if not self.outbox:
                    if self.broadcast.ended:
                        self._enter(Phase.ENDED)
                        await self.ws.wait_closed()
                        return
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                await self._send_copies()
        finally:
            self.broadcast.leave(self)

    async def _send_copies(self) -> None:
        ws, protocol, drop_every = self.ws, self.ws.protocol, self.sim.settings.drop_every
        if protocol.state is not State.OPEN:
            raise ConnectionClosed(None, None)
        limit = BATCH if not drop_every else min(BATCH, drop_every - self.sent)
        valid = 0
        while self.outbox and valid < limit:
            seq, text, payload = self.outbox.popleft()
            if seq is not None:
                valid += 1
                self.first_seq = self.first_seq or seq
                self.last_seq = seq
            if text:
                protocol.send_text(payload)
            else:
                protocol.send_binary(payload)
        self.sent += valid
        ws.transport.write(b"".join(protocol.data_to_send()))
        await ws.drain()
        if drop_every and self.sent >= drop_every:
            self.broadcast.leave(self)
            await ws.close(1000, "simulated drop")
            raise ConnectionClosed(None, None)
        await asyncio.sleep(0)

    def report(self) -> dict:
        return {**super().report(), "first_seq": self.first_seq, "last_seq": self.last_seq}
