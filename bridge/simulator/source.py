"""The one global stream of frames that every connection pulls from.

Tutum sends each event once, to whoever is connected: a reconnecting client continues
where the stream is, it does not get a copy. So the simulator has one source, and each
connection takes the next frames from it; every frame goes to exactly one connection,
and frames a connection took but could not send go back to the front, in order.

The stream itself (generated events or replayed lines, cut to `--count`, with a
malformed frame after every `--malformed-every` valid ones) is fixed at start, so a
seed gives the same frames however the connections come and go.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator


@dataclass(frozen=True, slots=True)
class Frame:
    """One websocket message: `valid` ones count as events (`sent`, `sim_seq`)."""

    payload: bytes
    text: bool = True
    valid: bool = True
    kind: str = "event"


# What a broken or hostile server may send; the bridge must quarantine each of them.
MALFORMED = (
    Frame(b'{"type": "container", "action": "update", "resource_uri": "/api/v1/contai',
          valid=False, kind="invalid-json"),
    Frame(b'[{"type": "container", "action": "update"}]', valid=False, kind="json-array"),
    Frame(b'{"type": "container", "action": "update", "state": "Running"}', text=False,
          valid=False, kind="binary"),
    Frame(b'{"type": 42, "action": "update"}', valid=False, kind="non-string-type"),
    Frame(b'{"type": "container", "action": "update", "state": "\xff\xfe"}',
          valid=False, kind="invalid-utf8"),
)


def generated(events: Iterable[str]) -> Iterator[bytes]:
    """The world's events (JSON text) as the UTF-8 bytes a text frame carries."""
    for event in events:
        yield event.encode()


def replayed(path: Path) -> Iterator[bytes]:
    """Each non-empty line of a JSON-lines file, byte for byte, without its line end."""
    with path.open("rb") as lines:
        for line in lines:
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def frames(bodies: Iterator[bytes], count: int | None,
           malformed_every: int | None) -> Iterator[Frame]:
    """The stream: at most `count` events, a malformed frame after every N of them."""
    valid = 0
    for body in islice(bodies, count):
        yield Frame(body)
        valid += 1
        if malformed_every and valid % malformed_every == 0:
            yield MALFORMED[(valid // malformed_every - 1) % len(MALFORMED)]


class Source:
    """Hands out the stream's frames in order, in batches; takes back unsent ones."""

    def __init__(self, stream: Iterator[Frame]):
        self._stream = stream
        self._returned: deque[Frame] = deque()
        self._refilled = asyncio.Event()

    def take(self, n: int) -> list[Frame]:
        """Up to `n` next frames; an empty list when the stream has ended."""
        out: list[Frame] = []
        while self._returned and len(out) < n:
            out.append(self._returned.popleft())
        if len(out) < n:
            out.extend(islice(self._stream, n - len(out)))
        return out

    def give_back(self, unsent: list[Frame]) -> None:
        """Frames a connection took but did not send: the next `take` gets them first."""
        if unsent:
            self._returned.extendleft(reversed(unsent))
            self._refilled.set()

    def push(self, frames: list[Frame]) -> None:
        """Frames to send after everything pending: a test scripting its stream."""
        self._returned.extend(frames)
        self._refilled.set()

    async def wait_refill(self) -> None:
        """Wait until frames are given back (a client died) or pushed after the stream
        ended; at once if some came since the last `take`, as a push between a
        session's empty `take` and this wait must not be missed."""
        while not self._returned:
            self._refilled.clear()
            await self._refilled.wait()
