"""An event's identity across replicas: a hash of its body and its occurrence count.

Two replicas connected to the same account receive the same frames in the same order,
but each numbers its spool its own way, so the spool's sequence cannot name an event
across replicas. The body can, except that the same body may legitimately come twice
(two identical frames a second apart are two events). So the identity is
`<blake2b-96 of the body, hex>-<n>`, where n counts the identical bodies this replica
has received within `window` seconds of each other: the first is `-1`, a second
identical frame `-2`.

Limits (README "High availability"): two replicas agree on n only if both received
every earlier copy of that body within the window; a replica that connected between
two identical frames numbers the second `-1`. Tutum's bodies carry the object's uuid,
state and a datetime to the second, so identical bodies are rare and seconds apart.
Memory is one entry per distinct body of the last `window` seconds.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

from bridge.event import IDENTITY_HEADER as HEADER
WINDOW = 60.0           # seconds an identical body still counts as a repetition


def digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12).hexdigest()


class Identities:
    """Numbers identical bodies; thread-safe."""

    def __init__(self, window: float = WINDOW, clock=time.monotonic) -> None:
        self._window = window
        self._clock = clock
        # digest -> (count, last seen). Tuples of numbers, not lists: the garbage
        # collector stops tracking them, and a minute of a busy stream is 100,000
        # entries that every full collection would otherwise walk (measured: the
        # standby spent 18% of a burst's CPU collecting, most of it here).
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, body: bytes) -> str:
        return self.of_all([body])[0]

    def of_all(self, bodies: list[bytes]) -> list[str]:
        """The identities of bodies received in this order, as one step: the stream
        hands over a read's worth of frames at once, and the lock, the clock and the
        expiry once per frame were most of the cost of naming it."""
        keys = [digest(body) for body in bodies]
        out = []
        seen = self._seen
        with self._lock:
            now = self._clock()
            self._expire(now)
            for key in keys:
                entry = seen.get(key)
                if entry is None:
                    count = 1
                else:
                    count = entry[0] + 1
                    seen.move_to_end(key)
                seen[key] = (count, now)
                out.append(f"{key}-{count}")
        return out

    def has(self, identity: str) -> bool:
        """This replica already received the event of that identity (within the window)."""
        key, _, n = identity.rpartition("-")
        with self._lock:
            entry = self._seen.get(key)
            return entry is not None and n.isdigit() and entry[0] >= int(n)

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        seen, horizon = self._seen, now - self._window
        while seen:
            key, entry = next(iter(seen.items()))
            if entry[1] >= horizon:
                return
            del seen[key]
