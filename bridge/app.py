"""`tutum-bridge run`: the wiring, the one module that knows both sides.

    StreamReader --frames--> SpoolingSink --events--> Spool --> Publisher --> RabbitMQ
     (websocket)             (classify)               (disk)    (AMQP, confirms)

The stream reader and the publisher each run on a thread of their own; the main
thread waits for a signal or a fatal error, logs progress, and shuts down in order:
stop reading, hand what was read to the spool, publish and confirm what is pending
within the shutdown timeout, close the spool. What could not be confirmed stays in
the spool and is published first at the next start.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

from bridge import config as config_mod
from bridge import log as logging_
from bridge.errors import BridgeError, ConfigError
from bridge.event import Event, Reason, excerpt, quarantine, classify
from bridge.metrics import Metrics, MetricsServer
from bridge.dead_letters import DeadLetters, path_beside as dead_letters_path
from bridge.publisher import Publisher
from bridge.spool import Spool
from bridge.stream import StreamReader

MAX_BATCH = 1000               # events handed to the spool in one transaction, at most
PROGRESS_EVERY = 30.0          # seconds between progress lines


def add_arguments(parser) -> None:
    config_mod.add_arguments(parser, config_mod.ALL_RUN_SETTINGS)


def main(args) -> int:
    cfg = config_mod.load(args)
    logging_.set_secrets(cfg.secrets)
    logging_.configure(cfg.log_level, cfg.log_format)
    return Bridge(cfg).run()


class SpoolingSink:
    """Receives the stream's frames, turns them into events, and spools them in batches.

    Also turns the stream's lifecycle into `bridge.connected` / `bridge.disconnected`
    events, which travel through the spool like any other so they keep their place
    in the order.
    """

    def __init__(self, spool: Spool, on_spooled, metrics: Metrics, log, *,
                 max_frame_bytes: int, stream_url: str) -> None:
        self._spool = spool
        self._on_spooled = on_spooled
        self._metrics = metrics
        self._log = log
        self._max_frame_bytes = max_frame_bytes
        self._stream_url = stream_url
        self._batch: list[Event] = []
        self._quarantined = 0
        # A restart is a gap too: from the last frame the previous run received.
        self._lost_at: float | None = spool.previous_run_received_at
        self._connections = 0
        self.stopping = threading.Event()
        self.spooled_total = 0
        self._received = metrics.received.labels("event")
        self._received_invalid = metrics.received.labels("quarantined")

    def authenticated(self, at: float) -> None:
        self._connections += 1
        gap = None if self._lost_at is None else {
            "lost_at": self._lost_at, "reconnected_at": at,
            "seconds": round(at - self._lost_at, 3)}
        self._lost_at = None
        self._metrics.stream_connects.inc()
        self._metrics.stream_connected.set(1)
        self._add_bridge_event("connected", at, connected_at=at, gap=gap)

    def lost(self, at: float, reason: str) -> None:
        self._lost_at = at
        self._metrics.stream_losses.inc()
        self._metrics.stream_connected.set(0)
        self._add_bridge_event("disconnected", at, lost_at=at, reason=reason)

    def frame(self, payload: bytes, binary: bool, size: int, oversize: bool,
              received_at: float) -> None:
        if oversize:
            event = quarantine(payload, received_at, Reason.OVERSIZE,
                               f"{size} bytes, over the limit of {self._max_frame_bytes}",
                               binary=binary, size=size)
        else:
            event = classify(payload, received_at, binary=binary)
            if event is None:
                return
        if event.quarantined:
            self._quarantined += 1
            self._log.warning("frame.quarantined", reason=event.headers["x-quarantine-reason"],
                              detail=event.headers["x-quarantine-detail"], size=size,
                              excerpt=excerpt(payload))
        self._batch.append(event)
        if len(self._batch) >= MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        self._wait_for_room()
        batch, self._batch = self._batch, []
        self._spool.append(batch)
        self._received.inc(len(batch) - self._quarantined)
        self._received_invalid.inc(self._quarantined)
        self.spooled_total += len(batch)
        self._quarantined = 0
        self._on_spooled()

    def _wait_for_room(self) -> None:
        """Backpressure: while the spool is full, the stream is not read."""
        if self._spool.has_room():
            return
        self._metrics.backpressure.set(1)
        self._log.warning("spool.full", bytes=self._spool.bytes, limit=self._spool.max_bytes,
                          detail="not reading the stream until the broker takes events")
        started = time.monotonic()
        # On shutdown the batch in hand goes in regardless: it was read, so it is ours,
        # and one batch over the bound is better than a lost event.
        while not self._spool.wait_for_room(0.5) and not self.stopping.is_set():
            pass
        self._metrics.backpressure.set(0)
        self._log.info("spool.resumed", waited_seconds=round(time.monotonic() - started, 1))

    def _add_bridge_event(self, action: str, at: float, **fields) -> None:
        body = {"type": "bridge", "action": action, "bridge_id": self._spool.id,
                "stream": self._stream_url, "connection": self._connections, **fields}
        self._batch.append(Event(f"bridge.{action}", json.dumps(body).encode(), at,
                                 {"type": "bridge", "action": action}))
        self.flush()


class Bridge:
    """Owns the components and their threads for one run of the process."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self._cfg = cfg
        self._log = logging_.get("bridge")
        self._stop = threading.Event()
        self._fatal: BridgeError | None = None
        self._fatal_from_broker = False
        self.metrics = Metrics()

    def run(self) -> int:
        cfg = self._cfg
        spool = self._open_spool()
        dead_letters = DeadLetters(dead_letters_path(cfg.spool_path))
        publisher = Publisher(cfg.amqp, cfg.topology, spool, dead_letters,
                              inflight=cfg.inflight, reconnect_max=cfg.reconnect_max,
                              confirm_timeout=cfg.confirm_timeout,
                              on_fatal=self._on_broker_fatal, log=logging_.get("publisher"),
                              metrics=self.metrics)
        sink = SpoolingSink(spool, publisher.notify, self.metrics, logging_.get("stream"),
                            max_frame_bytes=cfg.stream.max_frame_bytes,
                            stream_url=cfg.stream.redacted_url)
        stream = StreamReader(cfg.stream, sink, logging_.get("stream"))
        self.metrics.spool_events.set_function(lambda: spool.pending)
        self.metrics.spool_bytes.set_function(lambda: spool.bytes)
        server = self._start_metrics(spool, stream, publisher)
        self._install_signal_handlers()
        self._log.info("bridge.starting", exchange=cfg.amqp.exchange, stream=cfg.stream.redacted_url,
                       brokers=cfg.amqp.redacted_urls, spool=str(spool.path),
                       recovered=spool.recovered,
                       metrics="%s:%d" % server.address[:2] if server else None)

        publisher.start()
        stream_thread = threading.Thread(target=self._run_stream, args=(stream,), name="stream",
                                         daemon=True)
        stream_thread.start()
        self._wait_and_report(sink, spool)

        self._log.info("bridge.stopping", pending=spool.pending)
        sink.stopping.set()
        stream.stop()
        stream_thread.join(timeout=5)
        if self._fatal_from_broker:
            publisher.stop_now()
        else:
            publisher.drain_and_stop(cfg.shutdown_timeout)
        left = spool.pending
        spool.close()
        dead_letters.close()
        if server is not None:
            server.stop()
        self._log.info("bridge.stopped", left_in_spool=left)
        if self._fatal is not None:
            raise self._fatal
        return 0

    # --- pieces of run ---------------------------------------------------------------

    def _open_spool(self) -> Spool:
        cfg = self._cfg
        try:
            spool = Spool(cfg.spool_path, cfg.spool_max_bytes, cfg.spool_sync)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the spool at {cfg.spool_path}: {exc}") from None
        if spool.recovered:
            self._log.warning("spool.recovered", events=spool.recovered,
                              detail="publishing events left by the previous run first")
        return spool

    def _start_metrics(self, spool: Spool, stream: StreamReader,
                       publisher: Publisher) -> MetricsServer | None:
        if self._cfg.metrics_addr is None:
            return None

        def health() -> tuple[bool, dict]:
            detail = {"stream": stream.state.value, "broker": publisher.state.value,
                      "broker_blocked": publisher.blocked, "spool_events": spool.pending,
                      "spool_full": not spool.has_room()}
            ok = stream.state.value == "streaming" and publisher.connected and spool.has_room()
            return ok, detail

        try:
            server = MetricsServer(self.metrics, self._cfg.metrics_addr, health)
        except OSError as exc:
            host, port = self._cfg.metrics_addr
            raise ConfigError(f"BRIDGE_METRICS_ADDR {host}:{port}: {exc.strerror}") from None
        server.start()
        return server

    def _run_stream(self, stream: StreamReader) -> None:
        try:
            stream.run()
        except BridgeError as exc:
            self._set_fatal(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still stop the bridge cleanly
            self._log.exception("stream.crashed")
            self._set_fatal(BridgeError(f"the stream reader failed: {type(exc).__name__}: {exc}"))

    def _on_broker_fatal(self, error: BridgeError) -> None:
        self._fatal_from_broker = True
        self._set_fatal(error)

    def _set_fatal(self, error: BridgeError) -> None:
        if self._fatal is None:
            self._fatal = error
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        def handle(signum, _frame) -> None:
            if self._stop.is_set():
                self._log.warning("bridge.forced_stop", signal=signal.Signals(signum).name)
                raise SystemExit(1)
            self._log.info("bridge.signal", signal=signal.Signals(signum).name)
            self._stop.set()
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _wait_and_report(self, sink: SpoolingSink, spool: Spool) -> None:
        """Wait for a stop; meanwhile log throughput now and then."""
        last_time, last_count = time.monotonic(), 0
        while not self._stop.wait(PROGRESS_EVERY):
            now, count = time.monotonic(), sink.spooled_total
            self._log.info("bridge.progress", received=count,
                           per_second=round((count - last_count) / (now - last_time), 1),
                           spool_events=spool.pending, spool_bytes=spool.bytes)
            last_time, last_count = now, count
