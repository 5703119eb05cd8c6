"""Reading websocket frames, with a hard size limit: a sans-IO parser and a socket loop.

websocket-client does the handshake, TLS and sending; this module does the reading,
because the stream's promises need two things the library's reader cannot give:
a frame larger than the limit is discarded as it arrives, never held in memory (only
a short excerpt is kept for the quarantine), and the socket is read in large chunks
rather than a few bytes at a time, which is most of the cost of a small frame.

`FrameParser` is the protocol: fed bytes, it yields complete messages and control
frames; it has no socket and no clock, and it never recurses (a message in thousands
of fragments costs a loop, not a stack). `FrameReader` is the I/O around it: it reads
the socket until a frame is complete or an absolute deadline passes, so a peer that
drips a byte at a time cannot keep postponing the stream's ping.

The reader is resumable: a timeout in the middle of a frame loses nothing, so the
stream can wake up to send pings without tearing frames apart.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
EXCERPT_KEEP = 64 * 1024     # bytes of an oversize message kept for the quarantine
# Below glibc's mmap threshold (128 KiB): a larger transient buffer is mapped, and
# freeing it raises the threshold, so later ones come from the heap and leave it
# fragmented (measured: glibc's heap grew 5 MB in the first minutes of a soak at 256 KiB,
# about 1 MB at this size). A read still takes hundreds of frames.
_READ_CHUNK = 64 * 1024
_CONSUMED = object()         # a fragment was consumed; the message is not complete yet


class ProtocolError(Exception):
    """The server broke RFC 6455 in a way that leaves the connection unusable."""


class ConnectionClosed(Exception):
    """The peer closed the TCP connection."""


@dataclass(slots=True)
class Frame:
    """A complete message (text or binary) or a control frame.

    For a message larger than the limit, `payload` is only its first bytes,
    `size` is the real size and `oversize` is set.
    """

    opcode: int
    payload: bytes
    size: int
    oversize: bool = False


class FrameParser:
    """Server-to-client frames out of fed bytes, fragments reassembled; no I/O."""

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buf = b""
        self._pos = 0
        # The message being reassembled from fragments, if any.
        self._msg_opcode: int | None = None
        self._parts: list[bytes] = []
        self._msg_size = 0
        self._msg_oversize = False
        self._kept = 0                 # bytes of an oversize message kept as its excerpt
        self._skip = 0                 # payload bytes of an oversize frame still to drop
        self._skip_fin = False

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._keep_excerpt(data[:dropped])
            self._skip -= dropped
            data = data[dropped:]
        self._buf = self._buf[self._pos:] + data if self._pos < len(self._buf) else data
        self._pos = 0

    def buffered(self) -> bool:
        """True when bytes are waiting that `next` has not consumed."""
        return self._pos < len(self._buf)

    def next(self) -> Frame | None:
        """The next complete message or control frame, or None until more is fed."""
        while True:
            result = self._step()
            if result is not _CONSUMED:
                return result

    # --- one frame at a time ---------------------------------------------------------

    def _step(self):
        if self._skip:
            return None
        if self._skip_fin:
            self._skip_fin = False
            return self._finish_message()
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if b1 & 0x80:
            raise ProtocolError("the server sent a masked frame")
        length, header = b1 & 0x7F, 2
        if length == 126:
            if available < 4:
                return None
            length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif length == 127:
            if available < 10:
                return None
            length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10

        if opcode >= CLOSE:
            if length > 125 or not fin:
                raise ProtocolError("invalid control frame")
            if available < header + length:
                return None
            self._pos = pos + header + length
            return Frame(opcode, buf[pos + header:self._pos], length)
        if opcode not in (TEXT, BINARY, CONTINUATION):
            raise ProtocolError(f"unknown opcode {opcode}")
        if (opcode == CONTINUATION) != (self._msg_opcode is not None):
            raise ProtocolError("unexpected continuation frame")

        # Nothing below changes the parser's state until the frame is consumed, so an
        # incomplete frame is simply parsed again once more bytes have arrived.
        if self._msg_oversize or self._msg_size + length > self._max:
            return self._drop_payload(pos, header, length, opcode, bool(fin))
        if available < header + length:
            return None
        end = pos + header + length
        payload = buf[pos + header:end]
        self._pos = end
        if fin and opcode != CONTINUATION:   # the common case: one frame, one message
            return Frame(opcode, payload, length)
        if opcode != CONTINUATION:
            self._msg_opcode = opcode
        if payload:                          # endless empty fragments cost no memory
            self._parts.append(payload)
        self._msg_size += length
        return self._finish_message() if fin else _CONSUMED

    def _drop_payload(self, pos: int, header: int, length: int, opcode: int, fin: bool):
        """Keep what fits in the excerpt, drop the rest as it streams in."""
        if len(self._buf) - pos < header:
            return None
        if opcode != CONTINUATION:
            self._msg_opcode = opcode
        if not self._msg_oversize:
            self._msg_oversize = True
            self._kept = sum(map(len, self._parts))
        start = pos + header
        in_buffer = min(length, len(self._buf) - start)
        self._keep_excerpt(self._buf[start:start + in_buffer])
        self._msg_size += length
        self._pos = start + in_buffer
        self._skip = length - in_buffer
        if self._skip:
            self._skip_fin = fin
            return None
        return self._finish_message() if fin else _CONSUMED

    def _keep_excerpt(self, chunk: bytes) -> None:
        if self._kept < EXCERPT_KEEP and chunk:
            kept = chunk[:EXCERPT_KEEP - self._kept]
            self._parts.append(kept)
            self._kept += len(kept)

    def _finish_message(self) -> Frame:
        payload = b"".join(self._parts)
        if self._msg_oversize:
            payload = payload[:EXCERPT_KEEP]
        frame = Frame(self._msg_opcode or TEXT, payload, self._msg_size, self._msg_oversize)
        self._msg_opcode, self._parts, self._msg_size, self._msg_oversize = None, [], 0, False
        self._kept = 0
        return frame


class FrameReader:
    """A `FrameParser` fed from a connected socket, with absolute read deadlines."""

    def __init__(self, sock: socket.socket, max_message: int) -> None:
        self._sock = sock
        self._parser = FrameParser(max_message)

    def buffered(self) -> bool:
        """True when a read would not need to wait for the network."""
        if self._parser.buffered():
            return True
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    def read(self, timeout: float) -> Frame | None:
        """The next message or control frame, or None if none was complete `timeout`
        seconds from now. The deadline is fixed when the call starts: bytes arriving
        meanwhile do not extend it."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parser.next()
            if frame is not None:
                return frame
            if not self._fill(deadline - time.monotonic()):
                return None

    def read_in_memory(self) -> Frame | None:
        """The next message or control frame already complete in this process (parsed,
        or decrypted and waiting in TLS), or None: nothing is read from the network."""
        while True:
            frame = self._parser.next()
            if frame is not None or not (isinstance(self._sock, ssl.SSLSocket)
                                         and self._sock.pending()):
                return frame
            self._parser.feed(self._sock.recv(self._sock.pending()))

    def _fill(self, timeout: float) -> bool:
        if not (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()):
            ready, _, _ = select.select([self._sock], [], [], max(timeout, 0))
            if not ready:
                return False
        try:
            data = self._sock.recv(_READ_CHUNK)
        except (ssl.SSLWantReadError, BlockingIOError, socket.timeout):
            return True
        if not data:
            raise ConnectionClosed("the server closed the connection")
        self._parser.feed(data)
        return True
