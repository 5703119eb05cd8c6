"""One authenticated connection: greeting, streaming, faults, as a small state machine.

The session takes frames from the global source in batches, paced by its own `Pacer`,
and writes each batch at once. It drops the connection (`--drop-every`) or plays a
half-open link (`--stall-after`) when told to, and whatever the client does it ends
quietly: a client going away is the end of a session, never an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from enum import Enum
from random import Random
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from bridge.simulator.pacing import Pacer
from bridge.simulator.source import Frame
from bridge.simulator.world import notifications

if TYPE_CHECKING:
    from bridge.simulator.server import Simulator

BATCH = 256                 # frames taken from the source and written at once


class Phase(Enum):
    """Where a session is in its life; each change is one log line.

    streaming -> stalled -> streaming (once, with --stall-after); streaming -> ended
    (the stream is exhausted: open and silent) -> streaming (frames given back by a
    dead connection); any -> closed.
    """

    STREAMING = "streaming"
    STALLED = "stalled"
    ENDED = "stream ended"
    CLOSED = "closed"


class Session:
    """One authenticated connection: its counters, its pacing, its faults."""

    def __init__(self, sim: Simulator, ws: ServerConnection, number: int, user: str):
        self.sim, self.ws, self.number, self.user = sim, ws, number, user
        self.peer = peer(ws)
        self.phase = Phase.STREAMING
        self.sent = 0                   # valid events sent on this connection
        self.stalled = False            # the one stall of this connection happened
        self.pacer = Pacer(sim.settings.rate)
        self.log = sim.log.bind(conn=number, peer=self.peer)

    def _enter(self, phase: Phase, **details: object) -> None:
        self.phase = phase
        self.log.info(phase.value, sent=self.sent, **details)

    async def run(self) -> None:
        discard = asyncio.create_task(self._discard_incoming())
        try:
            await self._greet()
            await self._stream()
        except ConnectionClosed:
            pass
        finally:
            discard.cancel()
            self._enter(Phase.CLOSED, code=_close_code(self.ws))

    def report(self) -> dict:
        """What `/stats` says about this connection."""
        return {"sent": self.sent, "open": self.phase is not Phase.CLOSED}

    async def _greet(self) -> None:
        rng = Random(f"{self.sim.settings.seed}-notifications-{self.number}")
        await self.ws.send(json.dumps({"type": "auth", "user": self.user}))
        await self.ws.send(json.dumps(notifications(rng, self.sim.clock())))

    async def _discard_incoming(self) -> None:
        """Read and drop what the client sends, so its data never blocks our pongs."""
        try:
            async for _ in self.ws:
                pass
        except ConnectionClosed:
            pass

    async def _stream(self) -> None:
        settings, source = self.sim.settings, self.sim.source
        while True:
            limit = BATCH
            if settings.drop_every:
                if self.sent >= settings.drop_every:
                    await self.ws.close(1000, "simulated drop")
                    return
                limit = min(limit, settings.drop_every - self.sent)
            if settings.stall_after and not self.stalled:
                if self.sent >= settings.stall_after:
                    await self._stall(settings.stall_seconds)
                    continue
                limit = min(limit, settings.stall_after - self.sent)
            n = await self.pacer.allowance(limit)
            frames = source.take(n)
            if not frames:
                self._enter(Phase.ENDED)
                await self._idle()
                self._enter(Phase.STREAMING)
                continue
            await self._send(frames)

    async def _send(self, frames: list[Frame]) -> None:
        """Send frames in order, as one write: a syscall per frame would cost more than
        everything else the simulator does. A frame counts once handed to an open
        connection; if the connection is gone, the batch goes back to the source."""
        ws, stats = self.ws, self.sim.stats
        if ws.protocol.state is not State.OPEN:
            self.sim.source.give_back(frames)
            raise ConnectionClosed(None, None)
        protocol, sequence = ws.protocol, self.sim.settings.sequence
        events: list[bytes] = []
        valid = 0
        for frame in frames:
            payload = frame.payload
            if frame.valid:
                valid += 1
                events.append(payload)
                if sequence:
                    payload = stamp(payload, stats.last_seq + valid)
            if frame.text:
                protocol.send_text(payload)
            else:
                protocol.send_binary(payload)
        stats.sent += valid
        stats.last_seq += valid
        stats.malformed += len(frames) - valid
        self.sent += valid
        self.sim.rest.sent(events)
        self.pacer.sent(valid)
        ws.transport.write(b"".join(protocol.data_to_send()))
        # Wait while the client's socket is full (flow control); and yield even when it
        # is not, or a fast client would keep every other connection, the pongs and
        # the HTTP routes waiting until the stream ends.
        await ws.drain()
        await asyncio.sleep(0)

    async def _stall(self, seconds: float) -> None:
        """A half-open link: no frames out, and no pongs, as nothing is read."""
        self.stalled = True
        self._enter(Phase.STALLED, seconds=seconds)
        transport = self.ws.transport
        transport.pause_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self.ws.wait_closed()), seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        self.pacer.restart()
        self._enter(Phase.STREAMING)

    async def _idle(self) -> None:
        """The stream ended: stay open and silent until the client leaves, or until a
        dead connection gives frames back."""
        closed = asyncio.ensure_future(self.ws.wait_closed())
        refill = asyncio.ensure_future(self.sim.source.wait_refill())
        try:
            await asyncio.wait((closed, refill), return_when=asyncio.FIRST_COMPLETED)
        finally:
            refill.cancel()
            closed.cancel()
        if self.ws.protocol.state is not State.OPEN:
            raise ConnectionClosed(None, None)


def stamp(payload: bytes, seq: int) -> bytes:
    """The event with `sim_seq` and `sim_sent_at` appended to its JSON object."""
    return b"%s, \"sim_seq\": %d, \"sim_sent_at\": %.6f}" % (
        payload[:payload.rindex(b"}")], seq, time.time())


def peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"


def _close_code(ws: ServerConnection) -> int | None:
    """The close code sent or received, even while the closing handshake is under way."""
    protocol = ws.protocol
    close = protocol.close_rcvd or protocol.close_sent
    code = ws.close_code if ws.close_code is not None else close and close.code
    return None if code is None else int(code)
