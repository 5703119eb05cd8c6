"""`tutum_stream`: a Tutum stream simulator in a thread of the test process, scripted by the test.

A worker's test needs to say "this event happens now" and "the connection drops
now", not to wait for a random world. So the simulator here starts with no events;
`send(event)` hands one frame to the connected bridge (it waits, in order, while
none is connected), `generate(n, seed)` adds n of the simulator's realistic events,
`drop()` closes the connection (the bridge reconnects, with a gap), and
`happened(event)` changes the REST side without sending anything: what happened while
the bridge was away. The REST side (`rest_url`) answers from all of it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import secrets
import threading
import time
from itertools import islice

from bridge.simulator.auth import Credentials
from bridge.simulator.server import Settings, Simulator
from bridge.simulator.source import Frame, Source
from bridge.simulator.world import World

START_SECONDS = 10.0


class ScriptedStream:
    """The simulator, its credentials and its URLs; `close` stops it."""

    def __init__(self, user: str = "worker-test", seed: int = 0) -> None:
        self.user, self.apikey = user, secrets.token_hex(12)
        self._world = World(random.Random(seed), time.time())
        self._events = self._world.events()
        self._sim = Simulator(Settings(port=0, rate=0, seed=seed),
                              Credentials(self.user, self.apikey), Source(iter(())))
        self._sent: collections.Counter[bytes] = collections.Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="tutum_stream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while self._sim.url is None:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stream simulator did not start")
            time.sleep(0.01)
        self.url = self._sim.url                     # ws://127.0.0.1:PORT (TUTUM_STREAM_HOST)
        self.rest_url = self.url.replace("ws://", "http://", 1)   # TUTUM_REST_HOST

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._sim.serve(self._stop))

    def send(self, event: dict) -> None:
        """One frame, the JSON of `event`, to the bridge (in order with the others)."""
        self._push([json.dumps(event).encode()])

    def generate(self, n: int) -> list[dict]:
        """Send the simulator's next `n` events (a seeded, consistent world); returns them."""
        bodies = [e.encode() for e in islice(self._events, n)]
        self._push(bodies)
        return [json.loads(b) for b in bodies]

    def happened(self, event: dict) -> None:
        """An event that happens while no bridge listens: the REST side changes, nothing is sent."""
        self._loop.call_soon_threadsafe(self._sim.rest.apply, dict(event))
        self._call(asyncio.sleep(0))    # applied before this returns

    def drop(self) -> None:
        """Close every open connection (the bridge reconnects and reports a gap)."""
        async def close_all():
            for session in list(self._sim.sessions.values()):
                await session.ws.close(1000, "dropped by the test")
        self._call(close_all())

    @property
    def connections(self) -> int:
        """How many connections have authenticated so far."""
        return self._sim.stats.connections

    def sent_bodies(self) -> collections.Counter[bytes]:
        """How many times the test sent each body (`generate` included)."""
        with self._lock:
            return collections.Counter(self._sent)

    def _push(self, bodies: list[bytes]) -> None:
        with self._lock:
            self._sent.update(bodies)
        self._loop.call_soon_threadsafe(self._sim.source.push, [Frame(b) for b in bodies])

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(START_SECONDS)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(START_SECONDS)
