"""An in-process TCP proxy that can make a link fail the ways real links fail.

The bridge connects through it (to the broker, or to the simulator), and the test
breaks the link without touching the peer:

- `cut()`: reset every current connection (RST), keep accepting new ones;
- `pause(mode)`: reset every current connection, and then new ones are
  `"refuse"`d (the port is closed: ECONNREFUSED, a stopped broker),
  `"reset"` (accepted, then reset at once: a load balancer or Docker's userland proxy
  in front of a dead broker), or `"hang"` (accepted and held silent: a peer that
  takes the SYN but never answers);
- `blackhole()`: keep every socket open but move no byte either way, and hold new
  connections silent: a half-open link, which only a keep-alive can detect;
- `resume()`: forward again; connections held or black-holed meanwhile are reset,
  as a link that lost its state stays dead.

One selector thread does all socket work; the control methods hand it a command and
return once it has been applied, so the fault is in place when they return.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field

CHUNK = 65536
HIGH_WATER = 1 << 20   # stop reading a side whose peer has this much unsent


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees ECONNRESET, as on a dropped link."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass(eq=False)
class _Link:
    client: socket.socket
    upstream: socket.socket | None
    pending: dict = field(default_factory=dict)      # socket -> bytes waiting to be sent to it
    frozen: bool = False                             # black-holed: never forwards again

    def peer(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    reset: int = 0
    bytes_up: int = 0        # client -> target
    bytes_down: int = 0      # target -> client


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.mode = "forward"          # forward | refuse | reset | hang | blackhole
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._sel = selectors.DefaultSelector()
        self._commands: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"tcp-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()

    # --- control, from the test's thread -----------------------------------------

    def url(self, scheme: str, userinfo: str = "", path: str = "") -> str:
        """The target's URL with the proxy's address, e.g. url("amqp", "guest:guest@", "/%2F")."""
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}{path}"

    def cut(self) -> None:
        self._call(self._reset_all)

    def pause(self, mode: str = "refuse") -> None:
        if mode not in ("refuse", "reset", "hang"):
            raise ValueError(f"unknown pause mode {mode!r}")
        self._call(lambda: (self._reset_all(), self._set_mode(mode)))

    def blackhole(self) -> None:
        self._call(self._freeze_all)

    def resume(self) -> None:
        self._call(lambda: (self._reset_where(lambda link: link.frozen or link.upstream is None),
                            self._set_mode("forward")))

    @property
    def connections(self) -> int:
        return len(self._links)

    def close(self) -> None:
        if self._closed:
            return
        self._call(self._shutdown)
        self._thread.join(timeout=5)

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, action) -> None:
        done = threading.Event()
        self._commands.put((action, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout=10):
            raise AssertionError("tcp proxy thread did not answer")

    # --- the selector thread -------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", port), backlog=128)
        listener.setblocking(False)
        return listener

    def _set_mode(self, mode: str) -> None:
        """Closing the listener is the only way to have the kernel refuse connections;
        it is opened again, on the same port, when the mode leaves "refuse"."""
        if mode == "refuse" and self.mode != "refuse":
            self._sel.unregister(self._listener)
            self._listener.close()
        elif mode != "refuse" and self.mode == "refuse":
            self._listener = self._listen(self.port)
            self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self.mode = mode

    def _loop(self) -> None:
        while not self._closed:
            for key, events in self._sel.select(timeout=1.0):
                if key.data == "wake":
                    self._wake_r.recv(4096)
                    while not self._commands.empty():
                        action, done = self._commands.get()
                        action()
                        done.set()
                elif key.data == "accept":
                    if not self._closed:
                        self._accept()
                else:
                    link: _Link = key.data
                    if link not in self._links or link.frozen:
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._flush(link, key.fileobj)
                    if events & selectors.EVENT_READ and link in self._links:
                        self._read(link, key.fileobj)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            self.stats.accepted += 1
            if self.mode == "reset":
                self.stats.refused += 1
                _reset(client)
                continue
            if self.mode in ("hang", "blackhole"):
                # Held: open, silent, never forwarded; reset on resume.
                link = _Link(client, None, frozen=True)
                self._links.add(link)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self.stats.refused += 1
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            link.pending = {client: b"", upstream: b""}
            self._links.add(link)
            self._sel.register(client, selectors.EVENT_READ, link)
            self._sel.register(upstream, selectors.EVENT_READ, link)

    def _read(self, link: _Link, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # One side closed or reset: close the other side the same way it would see it.
            self._drop(link, graceful=True)
            return
        peer = link.peer(sock)
        if sock is link.client:
            self.stats.bytes_up += len(data)
        else:
            self.stats.bytes_down += len(data)
        link.pending[peer] += data
        self._flush(link, peer)

    def _flush(self, link: _Link, sock: socket.socket) -> None:
        data = link.pending[sock]
        if data:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(link, graceful=False)
                return
            link.pending[sock] = data[sent:]
        self._update_interest(link)

    def _update_interest(self, link: _Link) -> None:
        for sock in (link.client, link.upstream):
            peer = link.peer(sock)
            events = 0
            if len(link.pending[peer]) < HIGH_WATER:
                events |= selectors.EVENT_READ
            if link.pending[sock]:
                events |= selectors.EVENT_WRITE
            self._sel.modify(sock, events, link)

    def _drop(self, link: _Link, graceful: bool) -> None:
        self._links.discard(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if graceful:
                try:
                    sock.send(link.pending.get(sock, b""))
                except OSError:
                    pass
                sock.close()
            else:
                _reset(sock)

    def _reset_where(self, predicate) -> None:
        for link in [link for link in self._links if predicate(link)]:
            self.stats.reset += 1
            self._drop(link, graceful=False)

    def _reset_all(self) -> None:
        self._reset_where(lambda link: True)

    def _freeze_all(self) -> None:
        for link in self._links:
            if link.frozen:
                continue
            link.frozen = True
            for sock in (link.client, link.upstream):
                self._sel.unregister(sock)
        self.mode = "blackhole"

    def _shutdown(self) -> None:
        self._closed = True
        self._reset_all()
        if self.mode != "refuse":
            self._sel.unregister(self._listener)
            self._listener.close()
