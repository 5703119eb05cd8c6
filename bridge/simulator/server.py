"""The Tutum-compatible stream server: HTTP routes, authentication, lifecycle, counters.

`GET /v1/events` upgrades to a websocket; `GET /api/v1/...` is the REST side
(`rest.py`); `GET /stats` answers JSON counters; `GET /healthz` answers 200; anything
else 404. A websocket with bad credentials still
completes its handshake, gets Tutum's UNAUTHORIZED error frame and is closed, so a
client sees exactly what the hosted service did. Each authenticated connection is a
`Session`. Nothing a client does (garbage handshakes, data frames, vanishing
mid-send) may end the server: a session ends, the server stays.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.errors import BridgeError
from bridge.simulator import rest
from bridge.simulator.auth import Credentials
from bridge.simulator.fanout import Broadcast, FanoutSession
from bridge.simulator.session import Session, peer
from bridge.simulator.source import Source

EVENTS_PATHS = ("/v1/events", "/v1/events/")
STATS_LOG_SECONDS = 10.0
SESSIONS_KEPT = 1000        # connections /stats reports on, the latest
SHUTDOWN_SECONDS = 1.0      # for clients to answer the closing handshake


@dataclass
class Settings:
    """Everything the server needs, already validated by the CLI."""

    host: str = "127.0.0.1"
    port: int = 8765
    rate: float = 5.0                   # events/s per connection; 0: as fast as possible
    sequence: bool = False
    drop_every: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 30.0
    ready_file: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    seed: int = 0
    fanout: bool = False                # every open connection gets every event (fanout.py)
    clients: int = 1                    # fanout: connections that start the world


@dataclass
class Stats:
    """The counters `GET /stats` returns."""

    sent: int = 0           # valid events handed to a connection's transport
    malformed: int = 0      # malformed frames sent
    connections: int = 0    # authenticated connections so far
    active: int = 0         # authenticated connections open now
    rejected: int = 0       # failed logins
    last_seq: int = 0       # the last sim_seq given (= sent; with --fanout, events happened)


def make_logger():
    """One human-readable line per event on stderr, independent of the bridge's setup."""
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                    structlog.dev.ConsoleRenderer(colors=False)],
        context_class=dict)


def _websockets_logger() -> logging.Logger:
    """websockets' own errors (a broken handshake...) as one line, never a traceback."""
    logger = logging.getLogger("tutum-bridge.simulator.websockets")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine("%(asctime)s [websockets] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger


class _OneLine(logging.Formatter):
    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return f"{ei[0].__name__}: {ei[1]}"

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


class Simulator:
    """The server: routes, authentication, sessions, counters, lifecycle."""

    def __init__(self, settings: Settings, credentials: Credentials, source: Source,
                 clock: Callable[[], float] = time.time):
        self.settings, self.credentials, self.source = settings, credentials, source
        self.clock = clock          # the world's time, for the notifications' datetimes
        self.stats = Stats()
        self.rest = rest.Registry()     # what the events sent say about each object
        self.url: str | None = None     # ws://host:port, once listening
        self.log = make_logger()
        self.broadcast = Broadcast(self) if settings.fanout else None
        self.sessions: dict[int, Session] = {}      # the latest SESSIONS_KEPT, for /stats

    # --- HTTP -----------------------------------------------------------------------

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in EVENTS_PATHS:
            # websockets' own attribute for the authenticated user; unset: rejected.
            user = self.credentials.check(request.path, request.headers)
            if user is not None:
                ws.username = user
            return None
        if path.startswith(rest.PREFIX):
            return rest.respond(ws, request.path, request.headers, self.credentials,
                                self.rest)
        if path == "/stats":
            return rest.json_response(ws, http.HTTPStatus.OK, self.stats_report())
        if path == "/healthz":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    def stats_report(self) -> dict:
        """The counters, and per connection what it was sent."""
        return {**asdict(self.stats),
                "per_connection": {str(n): s.report() for n, s in self.sessions.items()}}

    # --- websocket ----------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        user = getattr(ws, "username", None)
        try:
            if user is None:
                await self._reject(ws)
                return
            self.stats.connections += 1
            self.stats.active += 1
            number = self.stats.connections
            session = (FanoutSession(self, ws, number, user, self.broadcast) if self.broadcast
                       else Session(self, ws, number, user))
            self.sessions[number] = session
            self.sessions.pop(number - SESSIONS_KEPT, None)
            session.log.info("connected", user=user)
            try:
                await session.run()
            finally:
                self.stats.active -= 1
        except Exception as exc:  # noqa: BLE001 - one session's bug must not end the server
            self.log.error("session failed", error=f"{type(exc).__name__}: {exc}")

    async def _reject(self, ws: ServerConnection) -> None:
        self.stats.rejected += 1
        self.log.warning("rejected login", peer=peer(ws), reason="bad or missing credentials")
        try:
            await ws.send(json.dumps({"type": "error", "data": {"errorMessage": "UNAUTHORIZED"}}))
            await ws.close(1008, "UNAUTHORIZED")
        except ConnectionClosed:
            pass

    # --- lifecycle ----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Listen, announce readiness (`url` is set then), and run until `stop` is set:
        by default SIGTERM or SIGINT (the testing kit runs it in a thread, with its own)."""
        settings = self.settings
        tls = _tls_context(settings)
        try:
            server = await serve(
                self.handle, settings.host, settings.port,
                process_request=self.process_request, ssl=tls,
                compression=None, ping_interval=None, close_timeout=2,
                max_size=2**20, logger=_websockets_logger())
        except OSError as exc:
            raise BridgeError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{exc.strerror or exc}") from None
        port = server.sockets[0].getsockname()[1]
        url = f"{'wss' if tls else 'ws'}://{_url_host(settings.host)}:{port}"
        self.url = url
        if settings.ready_file:
            _write_atomically(settings.ready_file, {"port": port, "url": url})
        self.log.info("listening", url=url, events=f"{url}/v1/events", rate=settings.rate,
                      seed=settings.seed)

        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        reporter = asyncio.create_task(self._report())
        await stop.wait()
        reporter.cancel()
        self.log.info("stopping", **asdict(self.stats))
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), SHUTDOWN_SECONDS)
        except asyncio.TimeoutError:
            # Clients that do not answer the close frame (stalled, gone): drop them.
            for ws in server.connections:
                ws.transport.abort()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATS_LOG_SECONDS)
            self.log.info("stats", **asdict(self.stats))


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(settings.certfile),
                                str(settings.keyfile) if settings.keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise BridgeError(f"cannot load the TLS certificate {settings.certfile}: {exc}") from None
    return context


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _write_atomically(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content) + "\n")
    os.replace(tmp, path)
