"""A forwarding HTTP proxy that only tunnels (CONNECT), as egress proxies in locked-down
networks do, for the tests of the stream through a proxy (bridge/proxy.py).

It records every CONNECT it was asked for (`requests`: the authority and the
Proxy-Authorization header), answers 407 when `credentials` are set and not given,
or `refuse` (a status line) to everything, and otherwise pipes bytes both ways.
"""

from __future__ import annotations

import base64
import socket
import socketserver
import threading
from dataclasses import dataclass


@dataclass
class ConnectRequest:
    authority: str
    authorization: str | None


class HttpConnectProxy:
    def __init__(self, credentials: str | None = None, refuse: str | None = None) -> None:
        self.requests: list[ConnectRequest] = []
        self.credentials = credentials      # "user:password"
        self.refuse = refuse                # e.g. "403 Forbidden"
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"http-proxy-{self.port}")
        self._thread.start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "HttpConnectProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, authority, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        authorization = headers.get("Proxy-Authorization")
        self.requests.append(ConnectRequest(authority, authorization))
        expected = self.credentials and "Basic " + base64.b64encode(
            self.credentials.encode()).decode()
        if method != "CONNECT":
            return self._answer(client, "405 Method Not Allowed")
        if self.refuse:
            return self._answer(client, self.refuse)
        if expected and authorization != expected:
            return self._answer(client, "407 Proxy Authentication Required",
                                'Proxy-Authenticate: Basic realm="test"\r\n')
        host, _, port = authority.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except OSError:
            return self._answer(client, "502 Bad Gateway")
        upstream.settimeout(None)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        pump.start()
        _pipe(client, upstream)
        pump.join(timeout=5)

    @staticmethod
    def _answer(client: socket.socket, status: str, extra: str = "") -> None:
        client.sendall(f"HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\n\r\n".encode())


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side ends, then end both."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    for sock in (source, sink):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
