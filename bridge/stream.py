"""The upstream side: hold a websocket to the Tutum Stream API open, whatever happens.

`StreamReader.run` is a loop over one explicit state machine:

    CONNECTING -> AUTHENTICATING -> STREAMING -> (lost) -> BACKOFF -> CONNECTING ...
                                              -> CLOSING (stop(): our Close sent, once
                                                   the sink has let the reader go; frames
                                                   kept until the server's Close)
                                                   -> CLOSED

A stop() while CONNECTING or AUTHENTICATING abandons the attempt: no authentication,
so no bridge.connected for a connection that never served.

It knows websockets and the Tutum handshake, and nothing of AMQP: every frame goes to
a `StreamSink`, which decides what the frame is and where it goes. Liveness is ours:
after `ping_interval` of silence we ping, and a connection that then stays silent for
`ping_timeout` is dead and replaced -- a half-open socket never stalls the bridge.
Read deadlines are absolute (a peer dripping a byte at a time does not postpone the
ping), and a stop while connecting or authenticating abandons the attempt at once:
the TCP connect and the TLS and HTTP handshakes run on a socket `stop()` can shut.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import select
import socket
import ssl
import threading
import time
from typing import Callable, Protocol
from urllib.parse import urlsplit

import websocket

from bridge import frames, proxy
from bridge import log as logging_
from bridge.backoff import Backoff
from bridge.config import StreamConfig
from bridge.errors import TLSVerificationError, UpstreamUnauthorized

CONNECT_TIMEOUT = 10.0
AUTH_TIMEOUT = 15.0
CLOSE_TIMEOUT = 2.0      # on stop, how long to read on while the close handshake runs
# Frames read after our Close are kept in memory until the server's Close, then handed
# to the sink: what a server sent before it saw our Close is bounded by its buffers;
# this bounds a server that never stops.
CLOSE_KEEP_BYTES = 64 * 1024 * 1024
CLOSE_REASON = b"bridge stopping"
STOP_CHECK_EVERY = 0.5   # seconds between looks at the stop flag while authenticating
# What reading a frame raises when the connection is unusable.
_READ_ERRORS = (frames.ConnectionClosed, frames.ProtocolError, OSError, ValueError)


class StreamSink(Protocol):
    """Where the stream delivers; implemented by the wiring module."""

    def authenticated(self, at: float) -> None: ...
    def frame(self, payload: bytes, binary: bool, size: int, oversize: bool,
              received_at: float) -> None: ...
    def flush(self) -> None:
        """Called whenever no more data is waiting: a natural batch boundary."""
    def lost(self, at: float, reason: str) -> None: ...


class State(enum.Enum):
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    STREAMING = "streaming"
    BACKOFF = "backoff"          # lost, waiting before the next attempt
    CLOSING = "closing"
    CLOSED = "closed"


class ConnectionLost(Exception):
    """This connection is over; the loop reconnects."""


class StreamReader:
    """Connects, authenticates, reads frames into the sink, and reconnects forever."""

    def __init__(self, config: StreamConfig, sink: StreamSink, log,
                 beat: Callable[[], None] = lambda: None) -> None:
        self._config = config
        self._beat = beat             # liveness: called where the loop comes round
        self._sink = sink
        self._log = log.bind(url=config.redacted_url)
        self._backoff = Backoff(base=0.5, cap=config.reconnect_max)
        self._stopping = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self._opening: socket.socket | None = None     # the socket of a connect attempt
        self._context: ssl.SSLContext | None = None
        self._close_deadline: float | None = None
        self._stop_by = float("inf")       # the latest the close deadline may be
        self.state = State.CLOSED
        # Between `stop` (any thread) and the reader: whether the reader is waiting on
        # the socket (anywhere else it may be in the sink, which a full spool holds),
        # and a Close that `stop` left to the reader to send before it next waits.
        self._lock = threading.Lock()
        self._waiting = False
        self._close_pending = False
        self._kept: list[tuple[frames.Frame, float]] = []     # read while closing
        self._kept_bytes = 0
        # Seconds to let frames gather in the socket between reads (`pace`); 0: none.
        self._gather = 0.0

    def pace(self, gather: float) -> None:
        """While frames come faster than one per `gather` seconds, read at most once
        per `gather` (0: always read a frame as soon as it arrives).

        Each read, batch and commit costs about as much CPU for one frame as for
        fifty, and on a busy machine that CPU is what delays the next event: frames
        that gathered in the socket meanwhile are read, classified and spooled as one
        batch. Frames further apart than `gather` are read at once, so a quiet stream
        costs no latency; a batch that takes longer than `gather` is followed by the
        next read at once, so the pace never limits a burst. From any thread;
        effective from the next read.
        """
        self._gather = max(gather, 0.0)

    # --- control, from any thread ----------------------------------------------------

    def stop(self, deadline: float = float("inf")) -> None:
        """Stop reading; `run` returns after handing what it read to the sink.

        While streaming, this starts the websocket close handshake and the reader goes
        on until the server's Close (or `CLOSE_TIMEOUT`, or `deadline`, a
        time.monotonic()): frames the server sent before it saw our Close are on the
        wire, and the stream cannot send them again. Our Close waits while the sink
        holds the reader (a full spool), and from it to the server's Close the reader
        only reads: a server gives a client that does not read after its Close a few
        seconds, then drops the connection with everything it had sent (the
        simulator: 2 s, and until 2026-12-08 a stop on a full disk lost thousands).
        """
        ws = self._ws
        self._stop_by = deadline
        if self.state is State.STREAMING and ws is not None:
            with self._lock:
                waiting = self._waiting
                if waiting:
                    self._closing()
                else:
                    self._close_pending = True      # sent by the reader (`_wait_on_socket`)
            self._stopping.set()
            if not waiting:
                return
            try:
                ws.send_close(reason=CLOSE_REASON)
                return
            except (OSError, websocket.WebSocketException):
                pass
        self._stopping.set()
        for sock in (self._opening, ws.sock if ws is not None else None):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # --- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """Until `stop()`; raises UpstreamUnauthorized or TLSVerificationError if fatal."""
        try:
            while not self._stopping.is_set():
                self.state = State.CONNECTING
                self._beat()
                try:
                    self._connect()
                    self._check_stopping()
                    self._authenticate()
                    self._backoff.reset()
                    self._stream()
                except ConnectionLost as exc:
                    self._on_lost(str(exc))
                if not self._stopping.is_set():
                    delay = self._backoff.next()
                    self._log.info("stream.reconnecting", in_seconds=round(delay, 2))
                    self._stopping.wait(delay)
        finally:
            self._close()
            self.state = State.CLOSED
            self._sink.flush()

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise ConnectionLost("the bridge is stopping")

    def _on_lost(self, reason: str) -> None:
        was_streaming = self.state in (State.STREAMING, State.CLOSING)
        self.state = State.BACKOFF
        self._close()
        if was_streaming:
            if self._stopping.is_set():
                reason = "the bridge is stopping"
            else:
                self._log.warning("stream.lost", reason=reason)
            self._sink.lost(time.time(), reason)
        elif not self._stopping.is_set():
            self._log.warning("stream.connect_failed", reason=reason)

    def _connect(self) -> None:
        if self._config.proxy is None:
            self._log.info("stream.connecting")
        else:
            self._log.info("stream.connecting", via=self._config.proxy.redacted)
        url, secrets = self._config.current_url()     # a rotated TUTUM_APIKEY_FILE
        logging_.add_secrets(secrets)
        try:
            sock = self._open_socket()
            self._ws = websocket.create_connection(
                url, timeout=CONNECT_TIMEOUT, header=list(self._config.headers),
                socket=sock, skip_utf8_validation=True, enable_multithread=True)
        except ssl.SSLCertVerificationError as exc:
            hint = ("check that TUTUM_CA_FILE signed the server's certificate and that it "
                    "names this host" if self._config.ca_file
                    else "set TUTUM_CA_FILE to trust a private CA")
            raise TLSVerificationError(
                f"TLS certificate verification failed for the stream "
                f"({exc.verify_message}); {hint}") from None
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in (401, 403):
                self._unauthorized(f"HTTP {exc.status_code}")
            raise ConnectionLost(f"handshake refused: HTTP {exc.status_code}") from None
        except (OSError, websocket.WebSocketException) as exc:
            self._check_stopping()
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from None
        finally:
            self._opening = None
        self._reader = frames.FrameReader(self._ws.sock, self._config.max_frame_bytes)

    def _open_socket(self) -> socket.socket:
        """TCP (and TLS) to the stream host, abandoned as soon as `stop()` is called.

        A blocking connect cannot be interrupted, so it runs non-blocking and looks
        at the stop flag between waits; TLS then runs on `_opening`, which `stop()`
        shuts down. websocket-client does the HTTP handshake on the result. Through a
        proxy, the TCP connection is to the proxy, and TLS runs in the tunnel it opens.
        """
        parts = urlsplit(self._config.url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        via = self._config.proxy
        deadline = time.monotonic() + CONNECT_TIMEOUT
        sock = self._connect_to(*((via.host, via.port) if via else (host, port)), deadline)
        try:
            if via is not None:
                self._tunnel(sock, via, host, port, deadline)
            if secure:
                sock = self._tls_context().wrap_socket(sock, server_hostname=host)
                self._opening = sock
        except BaseException:
            sock.close()        # a refusing proxy is retried: no socket left per attempt
            raise
        return sock

    def _connect_to(self, host: str, port: int, deadline: float) -> socket.socket:
        """A connected TCP socket to the first address of `host` that answers."""
        error: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
        for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            self._opening = sock
            try:
                self._connect_socket(sock, address, deadline)
            except OSError as exc:
                sock.close()
                self._check_stopping()
                error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            return sock
        raise error

    def _tunnel(self, sock: socket.socket, via: proxy.HttpProxy, host: str, port: int,
                deadline: float) -> None:
        """Ask the proxy for a tunnel to `host:port` (bridge/proxy.py)."""
        sock.sendall(proxy.connect_request(host, port, via))
        received = b""
        try:
            while (length := proxy.reply_length(received)) is None:
                self._check_stopping()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise proxy.ProxyRefused(f"no answer to CONNECT within "
                                             f"{CONNECT_TIMEOUT:g} s")
                readable, _, _ = select.select([sock], [], [], min(left, 0.1))
                if readable:
                    chunk = sock.recv(proxy.REPLY_MAX)
                    if not chunk:
                        raise proxy.ProxyRefused("closed before answering CONNECT")
                    received += chunk
            proxy.parse_reply(received[:length])
        except proxy.ProxyRefused as exc:
            raise ConnectionLost(f"proxy {via.redacted}: {exc}") from None
        if len(received) > length:
            # TLS and the websocket handshake both wait for us to speak first, so the
            # stream cannot have sent these: the tunnel is not a clean byte pipe.
            raise ConnectionLost(f"proxy {via.redacted}: bytes after its reply to CONNECT, "
                                 f"before the stream could speak")

    def _connect_socket(self, sock: socket.socket, address, deadline: float) -> None:
        sock.setblocking(False)
        code = sock.connect_ex(address)
        while code in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            self._check_stopping()
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "connect timed out")
            _, writable, failed = select.select([], [sock], [sock], min(left, 0.1))
            if writable or failed:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        sock.setblocking(True)

    def _tls_context(self) -> ssl.SSLContext:
        """A verifying context for wss:// (made once: loading CAs takes most of a second)."""
        if self._context is None:
            ca = self._config.ca_file
            self._context = ssl.create_default_context(cafile=str(ca) if ca else None)
        return self._context

    def _authenticate(self) -> None:
        """Wait for the `auth` frame; an UNAUTHORIZED error frame is fatal."""
        self.state = State.AUTHENTICATING
        deadline = time.monotonic() + AUTH_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            # In slices, so a stop is seen even if it raced the socket's shutdown.
            frame = self._read(min(left, STOP_CHECK_EVERY))
            if frame is None:
                self._check_stopping()
                if left > STOP_CHECK_EVERY:
                    continue
                raise ConnectionLost("no auth frame from the server in time")
            if frame.opcode in (frames.PING, frames.PONG):
                continue
            self._check_stopping()        # a stop now: no bridge.connected for nothing
            kind, message = _handshake_kind(frame.payload)
            if kind == "error" and "UNAUTHORIZED" in message.upper():
                self._unauthorized("UNAUTHORIZED")
                raise ConnectionLost("UNAUTHORIZED")
            self.state = State.STREAMING
            at = time.time()
            self._log.info("stream.authenticated")
            self._sink.authenticated(at)
            if kind != "auth":
                # A server that skips the auth frame: what it sent is the first event.
                self._deliver(frame, at)
            return

    def _unauthorized(self, detail: str) -> None:
        if not self._config.retry_unauthorized:
            raise UpstreamUnauthorized(
                f"the stream refused the credentials ({detail}); check TUTUM_USER and "
                f"TUTUM_APIKEY or TUTUM_AUTH")
        self._log.error("stream.unauthorized", detail=detail, retrying=True)

    def _stream(self) -> None:
        try:
            self._read_frames()
        finally:
            self._hand_over_kept()
        self._sink.flush()
        self._sink.lost(time.time(), "the bridge is stopping")

    def _read_frames(self) -> None:
        interval, timeout = self._config.ping_interval, self._config.ping_timeout
        last_heard = time.monotonic()
        ping_sent: float | None = None
        flushed_at = float("-inf")
        while True:
            if self._stopping.is_set() and self._closing_done():
                self._keep_what_was_read()
                return
            if not self._reader.buffered() and self.state is State.STREAMING:
                started = time.monotonic()
                self._sink.flush()
                # Time spent blocked in the sink (a full spool) is not the server's silence.
                blocked = time.monotonic() - started
                last_heard += blocked
                ping_sent = None if ping_sent is None else ping_sent + blocked
                gather = self._gather
                if started - flushed_at < gather and not self._stopping.is_set():
                    self._stopping.wait(started + gather - time.monotonic())
                flushed_at = started
            now = time.monotonic()
            wait = (interval - (now - last_heard)) if ping_sent is None \
                else (timeout - (now - ping_sent))
            if self._close_deadline is not None:
                wait = min(wait, self._close_deadline - now)
            frame = self._read(wait) if self._reader.buffered() else self._wait_on_socket(wait)
            if frame is None:
                if self._stopping.is_set():
                    continue
                if ping_sent is not None:
                    raise ConnectionLost(f"no pong within {timeout}s")
                self._send(lambda ws: ws.ping())
                ping_sent = time.monotonic()
                continue
            last_heard, ping_sent = time.monotonic(), None
            if frame.opcode == frames.CLOSE and self._stopping.is_set():
                return                    # the server answered our Close: nothing follows
            if self.state is State.CLOSING and frame.opcode in (frames.TEXT, frames.BINARY):
                self._keep(frame, time.time())
            else:
                self._deliver(frame, time.time())

    # --- the close handshake, between `stop` and the reader ----------------------------

    def _closing(self) -> None:
        """Our Close is (about to be) sent: from now on frames are kept, not delivered.
        Called with `_lock` held."""
        self.state = State.CLOSING
        self._close_deadline = min(time.monotonic() + CLOSE_TIMEOUT, self._stop_by)

    def _wait_on_socket(self, wait: float) -> frames.Frame | None:
        """`_read` when nothing is buffered, sending first a Close that `stop` left to
        the reader. Only while the reader waits here may `stop` send the Close itself:
        anywhere else the reader may be in the sink, held there by a full spool."""
        try:
            with self._lock:
                self._waiting = True
                send, self._close_pending = self._close_pending, False
                if send:
                    self._closing()
            if send:
                self._send(lambda ws: ws.send_close(reason=CLOSE_REASON))
                wait = min(wait, self._close_deadline - time.monotonic())
            return self._read(wait)
        finally:
            with self._lock:
                self._waiting = False

    def _keep(self, frame: frames.Frame, at: float) -> None:
        self._kept.append((frame, at))
        self._kept_bytes += len(frame.payload)
        if self._kept_bytes >= CLOSE_KEEP_BYTES:
            self._close_deadline = time.monotonic()     # read no more: hand these over

    def _keep_what_was_read(self) -> None:
        """Past the close deadline (a server that never answers Close), the frames
        already in memory are kept too: they were read, and the stream cannot send them
        again. The socket is not read."""
        while True:
            try:
                frame = self._reader.read_in_memory()
            except _READ_ERRORS:
                return
            if frame is None:
                return
            if frame.opcode in (frames.TEXT, frames.BINARY):
                self._keep(frame, time.time())

    def _hand_over_kept(self) -> None:
        """The frames read during the close handshake, to the sink, in order (it may
        hold the reader now: the stop's deadline is the sink's to keep)."""
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        for frame, at in kept:
            self._deliver(frame, at)

    def _closing_done(self) -> bool:
        return not self._close_pending and (self._close_deadline is None
                                            or time.monotonic() >= self._close_deadline)

    def _deliver(self, frame: frames.Frame, at: float) -> None:
        if frame.opcode in (frames.TEXT, frames.BINARY):
            self._sink.frame(frame.payload, frame.opcode == frames.BINARY, frame.size,
                             frame.oversize, at)
        elif frame.opcode == frames.PING:
            self._send(lambda ws: ws.pong(frame.payload))
        elif frame.opcode == frames.CLOSE:
            code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
            self._send(lambda ws: ws.send_close())
            raise ConnectionLost(f"the server closed the stream (code {code})")

    def _read(self, timeout: float) -> frames.Frame | None:
        self._beat()
        try:
            return self._reader.read(max(timeout, 0.0))
        except _READ_ERRORS as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from None

    def _send(self, action) -> None:
        try:
            action(self._ws)
        except (OSError, websocket.WebSocketException) as exc:
            raise ConnectionLost(f"send failed: {exc}") from None

    def _close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.shutdown()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail any way
                pass


def _handshake_kind(payload: bytes) -> tuple[str, str]:
    """(`type`, error message) of a handshake frame; ('', '') if it is not one."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return "", ""
    data = obj.get("data")
    message = data.get("errorMessage", "") if isinstance(data, dict) else ""
    return obj["type"].lower(), message if isinstance(message, str) else ""
