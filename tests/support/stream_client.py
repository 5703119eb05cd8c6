"""Read a simulator's frames directly, as a plain websocket client: the tests' reference.

The contract tests compare what reached RabbitMQ with what the stream sent. They learn
what was sent from a second simulator with the same seed, read here with
websocket-client -- a different websocket implementation from the bridge's reader, so a
bug there cannot hide itself. Frames come back raw: opcode and exact bytes, with no
UTF-8 validation, since malformed frames are part of what is compared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlencode

import websocket

from tests.support.procs import SIM_APIKEY, SIM_USER, Proc


@dataclass(frozen=True)
class Frame:
    payload: bytes
    binary: bool


def events_url(sim: Proc, user: str = SIM_USER, apikey: str = SIM_APIKEY) -> str:
    return f"{sim.info['url']}/v1/events?{urlencode({'token': apikey, 'user': user})}"


def read_frames(sim: Proc, count: int, timeout: float = 20.0,
                user: str = SIM_USER, apikey: str = SIM_APIKEY) -> list[Frame]:
    """The first `count` data frames the simulator sends one connection (auth included).

    Fails if they do not all arrive by `timeout`, or the server closes first.
    """
    deadline = time.monotonic() + timeout
    ws = websocket.create_connection(events_url(sim, user, apikey), timeout=timeout,
                                     skip_utf8_validation=True)
    frames: list[Frame] = []
    try:
        while len(frames) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(frames)} of {count} frames in {timeout}s")
            ws.settimeout(left)
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise AssertionError(f"server closed after {len(frames)} of {count} frames")
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                frames.append(Frame(bytes(data), opcode == websocket.ABNF.OPCODE_BINARY))
    finally:
        ws.close()
    return frames
