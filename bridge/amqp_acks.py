"""The broker's Basic.Ack frames, read in one pass before pika's dispatch.

Why: in a burst RabbitMQ sends an ack frame for about every four events (12,684 for
50,000 in `tutum-bridge bench`, 9,123 of them for one event each), and pika turns
each into a `Method` object and passes it through its callback manager and that
manager's decorators, a tenth of the bridge's busy time (`py-spy record --gil`). The
publisher needs two numbers from each frame, so `leading_acks` reads them with one
`struct` call, and `AckReadingConnection` hands every run of them to the publisher as
one list, which it then answers with one refill of the window instead of one a frame.

Promise: `leading_acks` is sans-IO (bytes in, acks out). `AckReadingConnection`
delivers frames in the order they came: the acks of a run before the frame that
follows them, which pika then dispatches as usual. Every frame but a Basic.Ack on the
watched channel (nacks, heartbeats, a channel's close, the connection's) takes pika's
own path, and so does every frame while no channel is watched. With a pika that lacks
the private methods this relies on (`FAST_PATH` false), it is pika's connection.
"""

from __future__ import annotations

import struct
from typing import Callable

import pika
from pika import connection as pika_connection
from pika import spec

# type, channel, payload size (13), class, method, delivery tag, bits; then frame end
_ACK = struct.Struct(">BHIHHQB")
ACK_FRAME_BYTES = _ACK.size + 1
_PAYLOAD_BYTES = ACK_FRAME_BYTES - 8             # the frame's header and end are 8
_CLASS, _METHOD = divmod(spec.Basic.Ack.INDEX, 0x10000)
_FRAME_END = spec.FRAME_END

Acks = list[tuple[int, bool]]                    # (delivery tag, multiple), in order


def leading_acks(buffer: bytes, channel: int) -> tuple[Acks, int]:
    """The complete Basic.Ack frames on `channel` at the start of `buffer`, and how
    many bytes they take. It stops at the first other or incomplete frame, and at
    one that is not well formed, which pika then reads (and refuses) itself."""
    acks: Acks = []
    offset, end = 0, len(buffer)
    while end - offset >= ACK_FRAME_BYTES:
        kind, on, size, klass, method, tag, bits = _ACK.unpack_from(buffer, offset)
        if (kind != spec.FRAME_METHOD or on != channel or size != _PAYLOAD_BYTES
                or klass != _CLASS or method != _METHOD
                or buffer[offset + _ACK.size] != _FRAME_END):
            break
        acks.append((tag, bool(bits & 1)))
        offset += ACK_FRAME_BYTES
    return acks, offset


FAST_PATH = all(hasattr(pika_connection.Connection, name)
                for name in ("_on_data_available", "_read_frame", "_trim_frame_buffer",
                             "_process_frame"))


class AckReadingConnection(pika.SelectConnection):
    """pika's `SelectConnection`, reading the acks of one channel itself once told
    where to hand them (`watch_acks`)."""

    def __init__(self, *args, **kwargs) -> None:
        self._ack_channel = 0
        self._on_acks: Callable[[Acks], None] | None = None
        super().__init__(*args, **kwargs)

    def watch_acks(self, channel: int, on_acks: Callable[[Acks], None] | None) -> None:
        """Hand the acks of `channel` to `on_acks` from now on; None: to pika again."""
        self._ack_channel, self._on_acks = channel, on_acks

    def _on_data_available(self, data_in: bytes) -> None:
        if self._on_acks is None or not FAST_PATH:
            return super()._on_data_available(data_in)
        self._frame_buffer += data_in
        while self._frame_buffer:
            on_acks = self._on_acks
            if on_acks is not None:
                acks, used = leading_acks(self._frame_buffer, self._ack_channel)
                if used:
                    # pika counts both; its heartbeat checker watches bytes_received.
                    self._trim_frame_buffer(used)
                    self.frames_received += len(acks)
                    on_acks(acks)
                    continue
            consumed, frame_value = self._read_frame()
            if not frame_value:
                return
            self._trim_frame_buffer(consumed)
            self._process_frame(frame_value)
