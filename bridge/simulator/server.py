"""The Tutum-compatible stream server: HTTP routes, sessions, pacing and faults.

`GET /v1/events` upgrades to a websocket; `GET /stats` answers JSON counters;
`GET /healthz` answers 200; anything else 404. A websocket with bad credentials still
completes its handshake, gets Tutum's UNAUTHORIZED error frame and is closed, so a
client sees exactly what the hosted service did.

Each authenticated connection is a `Session`: `auth`, one `user-notifications`
batch, then frames from the global `Source`, paced per connection and subject to the
fault knobs (drop, stall). Nothing a client does (garbage handshakes, data frames,
vanishing mid-send) may end the server: a session ends, the server stays.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import math
import os
import signal
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from random import Random
from typing import Callable
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from bridge.errors import BridgeError
from bridge.simulator.auth import Credentials
from bridge.simulator.source import Frame, Source
from bridge.simulator.world import notifications

EVENTS_PATHS = ("/v1/events", "/v1/events/")
BATCH = 256                 # frames taken from the source at once
STATS_LOG_SECONDS = 10.0
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


@dataclass
class Stats:
    """The counters `GET /stats` returns."""

    sent: int = 0           # valid events handed to a connection's transport
    malformed: int = 0      # malformed frames sent
    connections: int = 0    # authenticated connections so far
    active: int = 0         # authenticated connections open now
    rejected: int = 0       # failed logins
    last_seq: int = 0       # the last sim_seq given (= sent)


class Phase(Enum):
    """Where a session is in its life."""

    STREAMING = "streaming"
    STALLED = "stalled"
    ENDED = "ended"         # the stream is exhausted: the connection stays open, silent
    CLOSED = "closed"


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


class Pacer:
    """How many events a connection may send now, on a monotonic schedule.

    Event k (from 0) is due at `start + k / rate`, so sleeping late or sending slowly
    is caught up and the average rate stays exact; `restart` forgets the schedule
    (after a stall the stream resumes at the rate, not with a burst).
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.restart()

    def restart(self) -> None:
        self._start: float | None = None
        self._sent = 0

    async def allowance(self, limit: int) -> int:
        if not self.rate:
            return limit
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = math.floor((now - self._start) * self.rate) + 1 - self._sent
        if due <= 0:
            await asyncio.sleep(self._start + self._sent / self.rate - now)
            due = 1
        return min(due, limit)

    def sent(self, n: int) -> None:
        self._sent += n


class Session:
    """One authenticated connection: its counters, its pacing, its faults."""

    def __init__(self, sim: Simulator, ws: ServerConnection, number: int, user: str):
        self.sim, self.ws, self.number, self.user = sim, ws, number, user
        self.peer = _peer(ws)
        self.phase = Phase.STREAMING
        self.sent = 0                   # valid events sent on this connection
        self.stalled = False            # the one stall of this connection happened
        self.pacer = Pacer(sim.settings.rate)
        self.log = sim.log.bind(conn=number, peer=self.peer)

    async def run(self) -> None:
        discard = asyncio.create_task(self._discard_incoming())
        try:
            await self._greet()
            await self._stream()
        except ConnectionClosed:
            pass
        finally:
            discard.cancel()
            self.phase = Phase.CLOSED

    async def _greet(self) -> None:
        rng = Random(f"{self.sim.settings.seed}-notifications-{self.number}")
        await self.ws.send(json.dumps({"type": "auth", "user": self.user}))
        await self.ws.send(json.dumps(notifications(rng, self.sim.clock())))

    async def _discard_incoming(self) -> None:
        """Read and drop what the client sends, so its data never blocks our pongs."""
        try:
            async for _ in self.ws:
                pass
        except ConnectionClosed:
            pass

    async def _stream(self) -> None:
        settings, source = self.sim.settings, self.sim.source
        while True:
            limit = BATCH
            if settings.drop_every:
                if self.sent >= settings.drop_every:
                    await self.ws.close(1000, "simulated drop")
                    return
                limit = min(limit, settings.drop_every - self.sent)
            if settings.stall_after and not self.stalled:
                if self.sent >= settings.stall_after:
                    await self._stall(settings.stall_seconds)
                    continue
                limit = min(limit, settings.stall_after - self.sent)
            n = await self.pacer.allowance(limit)
            frames = source.take(n)
            if not frames:
                self.phase = Phase.ENDED
                await self._idle()
                self.phase = Phase.STREAMING
                continue
            await self._send(frames)

    async def _send(self, frames: list[Frame]) -> None:
        """Send frames in order, as one write: a syscall per frame would cost more than
        everything else the simulator does. A frame counts once handed to an open
        connection; if the connection is gone, the batch goes back to the source."""
        ws, stats = self.ws, self.sim.stats
        if ws.protocol.state is not State.OPEN:
            self.sim.source.give_back(frames)
            raise ConnectionClosed(None, None)
        protocol, sequence = ws.protocol, self.sim.settings.sequence
        valid = 0
        for frame in frames:
            payload = frame.payload
            if frame.valid:
                valid += 1
                if sequence:
                    payload = _stamp(payload, stats.last_seq + valid)
            if frame.text:
                protocol.send_text(payload)
            else:
                protocol.send_binary(payload)
        stats.sent += valid
        stats.last_seq += valid
        stats.malformed += len(frames) - valid
        self.sent += valid
        self.pacer.sent(valid)
        ws.transport.write(b"".join(protocol.data_to_send()))
        # Wait while the client's socket is full (flow control); and yield even when it
        # is not, or a fast client would keep every other connection, the pongs and
        # the HTTP routes waiting until the stream ends.
        await ws.drain()
        await asyncio.sleep(0)

    async def _stall(self, seconds: float) -> None:
        """A half-open link: no frames out, and no pongs, as nothing is read."""
        self.stalled, self.phase = True, Phase.STALLED
        self.log.info("stalling", seconds=seconds, sent=self.sent)
        transport = self.ws.transport
        transport.pause_reading()
        try:
            await asyncio.wait_for(asyncio.shield(self.ws.wait_closed()), seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        self.phase = Phase.STREAMING
        self.pacer.restart()
        self.log.info("stall over", sent=self.sent)

    async def _idle(self) -> None:
        """The stream ended: stay open and silent until the client leaves, or until a
        dead connection gives frames back."""
        closed = asyncio.ensure_future(self.ws.wait_closed())
        refill = asyncio.ensure_future(self.sim.source.wait_refill())
        try:
            await asyncio.wait((closed, refill), return_when=asyncio.FIRST_COMPLETED)
        finally:
            refill.cancel()
            closed.cancel()
        if self.ws.protocol.state is not State.OPEN:
            raise ConnectionClosed(None, None)


def _stamp(payload: bytes, seq: int) -> bytes:
    """The event with `sim_seq` and `sim_sent_at` appended to its JSON object."""
    return b"%s, \"sim_seq\": %d, \"sim_sent_at\": %.6f}" % (
        payload[:payload.rindex(b"}")], seq, time.time())


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"


class Simulator:
    """The server: routes, authentication, sessions, counters, lifecycle."""

    def __init__(self, settings: Settings, credentials: Credentials, source: Source,
                 clock: Callable[[], float] = time.time):
        self.settings, self.credentials, self.source = settings, credentials, source
        self.clock = clock          # the world's time, for the notifications' datetimes
        self.stats = Stats()
        self.log = make_logger()

    # --- HTTP -----------------------------------------------------------------------

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in EVENTS_PATHS:
            # websockets' own attribute for the authenticated user; unset: rejected.
            user = self.credentials.check(request.path, request.headers)
            if user is not None:
                ws.username = user
            return None
        if path == "/stats":
            return _json_response(ws, asdict(self.stats))
        if path == "/healthz":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    # --- websocket ----------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        user = getattr(ws, "username", None)
        try:
            if user is None:
                await self._reject(ws)
                return
            self.stats.connections += 1
            self.stats.active += 1
            session = Session(self, ws, self.stats.connections, user)
            session.log.info("connected", user=user)
            try:
                await session.run()
            finally:
                self.stats.active -= 1
                session.log.info("closed", sent=session.sent, code=_close_code(ws))
        except Exception as exc:  # noqa: BLE001 - one session's bug must not end the server
            self.log.error("session failed", error=f"{type(exc).__name__}: {exc}")

    async def _reject(self, ws: ServerConnection) -> None:
        self.stats.rejected += 1
        self.log.warning("rejected login", peer=_peer(ws), reason="bad or missing credentials")
        try:
            await ws.send(json.dumps({"type": "error", "data": {"errorMessage": "UNAUTHORIZED"}}))
            await ws.close(1008, "UNAUTHORIZED")
        except ConnectionClosed:
            pass

    # --- lifecycle ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen, announce readiness, and run until SIGTERM or SIGINT."""
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
        if settings.ready_file:
            _write_atomically(settings.ready_file, {"port": port, "url": url})
        self.log.info("listening", url=url, events=f"{url}/v1/events", rate=settings.rate,
                      seed=settings.seed)

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


def _close_code(ws: ServerConnection) -> int | None:
    """The close code sent or received, even while the closing handshake is under way."""
    protocol = ws.protocol
    close = protocol.close_rcvd or protocol.close_sent
    code = ws.close_code if ws.close_code is not None else close and close.code
    return None if code is None else int(code)


def _json_response(ws: ServerConnection, body: dict) -> Response:
    response = ws.respond(http.HTTPStatus.OK, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


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
