"""A websocket server that sends exactly what a test scripts, however wrong.

Websocket libraries refuse to send invalid UTF-8 in a text frame, a header that lies
about its length or half a frame, and they buffer whole messages; a hostile server
must do all of that. This one is raw sockets: it reads the HTTP upgrade request,
answers 101 with the RFC 6455 accept key (accepting any credentials), sends
`{"type":"auth"}` as Tutum does, writes the scripted steps byte for byte, answers the
client's pings, and records what it sent and what the client sent back.

Connection n follows `scripts[n]`; connections past the list follow `default` (a
healthy, idle stream), so a client that reconnects finds a working server.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
AUTH_FRAME = b'{"type":"auth"}'
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CHUNK = 256 * 1024


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + _GUID).digest()).decode()


def frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """An unmasked (server-to-client) frame header announcing `length` payload bytes."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return bytes((first, 126)) + struct.pack("!H", length)
    return bytes((first, 127)) + struct.pack("!Q", length)


# --- script steps: each yields the bytes to write, in order ---------------------------

@dataclass
class Frame:
    """One frame, as given (any opcode, any payload, FIN or not)."""

    payload: bytes
    opcode: int = TEXT
    fin: bool = True
    label: str = ""

    @property
    def size(self) -> int:
        return len(self.payload)

    def chunks(self) -> Iterator[bytes]:
        yield frame_header(self.opcode, len(self.payload), self.fin) + self.payload


@dataclass
class Dribbled:
    """One frame written in pieces, cut at `cuts` (offsets into the whole frame,
    header included) with `pause` seconds between, so the client's reads see it
    split. The pause shapes traffic, it synchronises nothing."""

    payload: bytes
    cuts: tuple[int, ...] = (1, 5)
    pause: float = 0.05
    opcode: int = TEXT
    label: str = ""

    @property
    def size(self) -> int:
        return len(self.payload)

    def chunks(self) -> Iterator[bytes]:
        data = frame_header(self.opcode, len(self.payload)) + self.payload
        edges = [0, *self.cuts, len(data)]
        for i, (start, end) in enumerate(zip(edges, edges[1:])):
            if i:
                time.sleep(self.pause)
            yield data[start:end]


@dataclass
class Fragmented:
    """One message split into a first frame and continuation frames.

    `ping` (if not None) is sent between fragments, which RFC 6455 allows.
    """

    parts: list[bytes]
    opcode: int = TEXT
    ping: bytes | None = None
    label: str = ""

    @property
    def payload(self) -> bytes:
        return b"".join(self.parts)

    @property
    def size(self) -> int:
        return sum(map(len, self.parts))

    def chunks(self) -> Iterator[bytes]:
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            if i and self.ping is not None:
                yield frame_header(PING, len(self.ping)) + self.ping
            yield frame_header(self.opcode if i == 0 else CONTINUATION, len(part), i == last)
            yield part


@dataclass
class Streamed:
    """One frame of `size` bytes, `prefix` + filler + `suffix`, written without ever
    holding it in memory (so the test process stays small too)."""

    size: int
    prefix: bytes = b""
    suffix: bytes = b""
    fill: bytes = b"x"
    opcode: int = TEXT
    label: str = ""

    def head(self, n: int) -> bytes:
        """The first `n` bytes of the payload (n must stop before the suffix)."""
        assert n <= self.size - len(self.suffix)
        body = self.prefix[:n]
        return body + (self.fill * (n - len(body)))[: n - len(body)]

    def chunks(self) -> Iterator[bytes]:
        yield frame_header(self.opcode, self.size) + self.prefix
        remaining = self.size - len(self.prefix) - len(self.suffix)
        block = (self.fill * (_CHUNK // len(self.fill) + 1))[:_CHUNK]
        while remaining > 0:
            piece = block[:remaining]
            remaining -= len(piece)
            yield piece
        yield self.suffix


@dataclass
class Truncated:
    """A frame header claiming `claimed` bytes, then only `sent` of them.

    After it the stream is unparseable, so the server stops answering pings.
    """

    claimed: int
    sent: int = 0
    opcode: int = TEXT
    label: str = ""

    @property
    def size(self) -> int:
        return self.claimed

    def chunks(self) -> Iterator[bytes]:
        yield frame_header(self.opcode, self.claimed) + b"y" * self.sent


@dataclass
class Raw:
    """Bytes written as they are."""

    data: bytes
    label: str = ""

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self) -> Iterator[bytes]:
        yield self.data


@dataclass
class Script:
    """What one connection does.

    `handshake`: True for a proper 101 answer, or bytes sent instead (then the socket
    is closed). `then`: "hold" keeps the connection open, answering pings, until the
    client or the test ends it; "drop" closes the TCP connection without a close frame.
    """

    steps: list = field(default_factory=list)
    handshake: bool | bytes = True
    handshake_delay: float = 0.0   # seconds between the request and the answer
    auth: bool = True
    then: str = "hold"


@dataclass
class Sent:
    label: str
    size: int


@dataclass
class Connection:
    """What happened on one accepted connection."""

    number: int
    request: str = ""
    sent: list[Sent] = field(default_factory=list)
    received: list[tuple[int, bytes]] = field(default_factory=list)
    close_code: int | None = None
    error: str = ""
    script_done: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return self.request.split(" ", 2)[1] if self.request.count(" ") >= 2 else ""

    def pongs(self) -> list[bytes]:
        return [payload for opcode, payload in self.received if opcode == PONG]


class HostileServer:
    """Listens on 127.0.0.1 (optionally TLS) and runs one Script per connection."""

    def __init__(self, scripts: list[Script], default: Script | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._scripts = list(scripts)
        self._default = default or Script()
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections: list[Connection] = []
        self.port = self._listener.getsockname()[1]
        scheme = "wss" if tls else "ws"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        # Same shape as the simulator's ready file, so it can stand in for one.
        self.info = {"port": self.port, "url": self.url}

    def __enter__(self) -> "HostileServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "HostileServer":
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        _shutdown(self._listener)       # close() alone does not wake a blocked accept()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    # --- threads ---------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        for number in itertools.count():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = Connection(number)
            script = self._scripts[number] if number < len(self._scripts) else self._default
            with self._lock:
                self.connections.append(conn)
                self._sockets.append(sock)
            self._spawn(self._serve, sock, conn, script)

    def _serve(self, sock: socket.socket, conn: Connection, script: Script) -> None:
        peer = _Peer(sock, conn)
        try:
            if self._tls is not None:
                peer.sock = self._tls.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._sockets.append(peer.sock)
            conn.request = peer.read_request()
            if script.handshake_delay:
                # Shapes the server's answer; the test synchronises on `connections`.
                self._stopping.wait(script.handshake_delay)
            if script.handshake is not True:
                peer.write(script.handshake)
                return
            key = _header(conn.request, "sec-websocket-key")
            peer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                       + accept_key(key).encode() + b"\r\n\r\n")
            self._spawn(peer.read_frames)
            if script.auth:
                peer.send(Frame(AUTH_FRAME, label="auth"))
            for step in script.steps:
                peer.send(step)
            conn.script_done.set()
            if script.then == "hold":
                while not self._stopping.is_set() and not peer.closed.wait(0.1):
                    pass
        except (OSError, ValueError) as exc:
            conn.error = f"{type(exc).__name__}: {exc}"
        finally:
            _shutdown(peer.sock)
            conn.ended.set()

    def wait_connections(self, count: int, timeout: float = 20.0) -> list[Connection]:
        from tests.support.wait import wait_for
        wait_for(lambda: len(self.connections) >= count, timeout,
                 what=f"{count} connection(s) to the hostile server")
        return self.connections


class _Peer:
    """One client connection: writes are serialised so a pong never splits a frame."""

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.closed = threading.Event()
        self._write_lock = threading.Lock()
        self._mute = False     # after a lying frame header, nothing more can be framed

    def read_request(self) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk or len(data) > 65536:
                raise ValueError("no complete HTTP request")
            data += chunk
        return data.split(b"\r\n\r\n", 1)[0].decode("latin-1")

    def write(self, data: bytes) -> None:
        with self._write_lock:
            self.sock.sendall(data)

    def send(self, step) -> None:
        """Write one script step whole, holding the lock so pongs wait for its end."""
        with self._write_lock:
            for chunk in step.chunks():
                self.sock.sendall(chunk)
            if isinstance(step, Truncated):
                self._mute = True
        self.conn.sent.append(Sent(step.label, step.size))

    def read_frames(self) -> None:
        """Read the client's (masked) frames: record them, answer pings and closes."""
        try:
            while True:
                opcode, payload = self._read_frame()
                self.conn.received.append((opcode, payload))
                if opcode == PING and not self._mute:
                    self.write(frame_header(PONG, len(payload)) + payload)
                elif opcode == CLOSE:
                    if len(payload) >= 2:
                        self.conn.close_code = struct.unpack("!H", payload[:2])[0]
                    if not self._mute:
                        self.write(frame_header(CLOSE, 2) + payload[:2])
                    return
        except (OSError, ValueError):
            return
        finally:
            self.closed.set()

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ValueError("client closed the connection")
            data += chunk
        return data

    def _read_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read_exact(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
        if length > 1 << 20:
            raise ValueError("client frame too large for a test server")
        mask = self._read_exact(4) if b1 & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read_exact(length)))
        return b0 & 0x0F, payload


def _header(request: str, name: str) -> str:
    for line in request.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    raise ValueError(f"request has no {name} header")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
