"""A TCP forwarder in front of the broker that starts cut: the broker looks down.

While paused it accepts each connection and closes it at once, as a broker that is
down or restarting would; `resume` makes it forward bytes both ways. The backlog
measurement points the real bridge's AMQP_URL at it, so the bridge has to spool
everything until the benchmark lets it through.
"""

from __future__ import annotations

import socket
import threading

CHUNK = 256 * 1024


class PausedProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paused = True
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="bench-proxy", daemon=True).start()

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.paused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    _close(src)
    _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
    except OSError:
        pass
    sock.close()
