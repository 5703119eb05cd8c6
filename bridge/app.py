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

import gc
import signal
import sqlite3
import threading
import time

from bridge import config as config_mod
from bridge import log as logging_
from bridge.errors import BridgeError, ConfigError
from bridge.event import derive_headers
from bridge.health import Health
from bridge.watchdog import Watchdog
from bridge.metrics import Metrics, MetricsServer
from bridge.dead_letters import DeadLetters, path_beside as dead_letters_path
from bridge.publisher import Publisher
from bridge.ha.node import HaNode
from bridge.sink import SpoolingSink
from bridge.spool import Spool
from bridge.stream import AUTH_TIMEOUT, CONNECT_TIMEOUT, State as StreamState, StreamReader

PROGRESS_EVERY = 30.0          # seconds between progress lines
# The collector's generation thresholds. With Python's (700, 10, 10), a burst ran a
# young collection every 200 events and a middle one every 2,000: the sink's batch and
# the spool's window (thousands of events, each an Event, its headers and parents)
# are alive at every one of them, so each walked them again and promoted them, only
# for them to die a second later, once confirmed. That was 6-7% of the bridge's CPU
# in a burst (`perf`, and a `gc.callbacks` timer: 519 + 47 + 3 collections, 0.31 s
# for 100,000 events). The count a young collection waits for is allocations minus
# frees, so with 10,000 it runs only when that many objects outlived their moment:
# 9 collections, 0.02 s, for the same burst, none over 3 ms; a 60-s soak at 2,000
# events/s had 4 to 8, of at most 2 ms. What it collects is cycles only (reference
# counts free the rest), and the bridge makes few of them.
GC_THRESHOLDS = (10_000, 10, 10)
SPOOL_ERROR_LOG_EVERY = 10.0   # seconds between log lines of the same spool error
# Liveness budgets (bridge/health.py): the longest a thread may go between two beats
# without being stuck, with room for a loaded machine.
MAIN_BUDGET = 15.0
PUBLISHER_BUDGET = 30.0
STUCK_MARGIN = 30.0
STREAM_JOIN = 5.0      # seconds a stopping stream thread is waited for, at least


def add_arguments(parser) -> None:
    config_mod.add_arguments(parser, config_mod.ALL_RUN_SETTINGS)


def main(args) -> int:
    cfg = config_mod.load(args)
    logging_.set_secrets(cfg.secrets)
    logging_.configure(cfg.log_level, cfg.log_format)
    return Bridge(cfg).run()


class Bridge:
    """Owns the components and their threads for one run of the process."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self._cfg = cfg
        self._log = logging_.get("bridge")
        self._stop = threading.Event()
        self._fatal: BridgeError | None = None
        self._fatal_from_broker = False
        self.metrics = Metrics()
        self.ha: HaNode | None = None       # BRIDGE_HA=on: the replica's role (`in_sync`)
        self._spool_errors_said: dict[str, tuple[float, int]] = {}   # operation -> (when, since)
        self.live = Health()
        self.ready = Health()

    def run(self) -> int:
        cfg = self._cfg
        # Before anything slow: a SIGTERM while the spool opens must stop the bridge.
        self._install_signal_handlers()
        spool = self._open_spool()
        if self._stop.is_set():
            spool.close()
            self._log.info("bridge.stopped", left_in_spool=spool.pending)
            return 0
        # With HA the sink and the publisher see the spool through the replica's witness.
        ha = HaNode(cfg.ha, cfg.amqp, spool, self.metrics, logging_.get("ha")) if cfg.ha else None
        spooled = ha.spool if ha else spool
        main_heart = self.live.heart("main", MAIN_BUDGET)
        publisher_heart = self.live.heart("publisher", PUBLISHER_BUDGET)
        dead_letters = DeadLetters(dead_letters_path(cfg.spool_path))
        stream_heart = self.live.heart("stream", stream_budget(cfg.stream))
        # The sink wakes the publisher, which publishes the sink's deferred events
        # classified: each needs the other, and the stream starts only once both exist.
        sink = SpoolingSink(spooled, lambda: publisher.notify(), self.metrics,
                            logging_.get("stream"), max_frame_bytes=cfg.stream.max_frame_bytes,
                            stream_url=cfg.stream.redacted_url, beat=stream_heart.beat,
                            deferred=ha is not None)
        publisher = Publisher(cfg.amqp, cfg.topology, spooled, dead_letters,
                              inflight=cfg.inflight, reconnect_max=cfg.reconnect_max,
                              confirm_timeout=cfg.confirm_timeout,
                              on_fatal=self._on_broker_fatal, log=logging_.get("publisher"),
                              metrics=self.metrics, beat=publisher_heart.beat,
                              paused=ha is not None, resolve=sink.resolve)
        stream = StreamReader(cfg.stream, sink, logging_.get("stream"), beat=stream_heart.beat)
        if ha:
            ha.attach(publisher, stream.pace)
        else:
            self.metrics.leader.set(1)
        self.ha = ha
        self._observe(spool, publisher, stream)
        server = self._start_metrics(spool, stream, publisher)
        self._log.info("bridge.starting", exchange=cfg.amqp.exchange, stream=cfg.stream.redacted_url,
                       brokers=cfg.amqp.redacted_urls, spool=str(spool.path),
                       recovered=spool.recovered, ha="on" if ha else "off",
                       metrics="%s:%d" % server.address[:2] if server else None)

        # What exists now (modules, classes, the components) lives as long as the
        # process: out of the collector's sight, a full collection walks only what the
        # stream brings, about a quarter of the objects (measured: a full collection
        # in a burst went from about 30 ms of CPU to about 7, and an HA standby's time
        # collecting from 18% of its CPU to 5%).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        publisher.start()
        if ha:
            ha.start()
        stream_thread = threading.Thread(target=self._run_stream, args=(stream,), name="stream",
                                         daemon=True)
        stream_thread.start()
        watchdog = Watchdog(cfg.notify, lambda: self.live.check()[0])
        watchdog.ready()
        self._wait_and_report(sink, spool, main_heart, watchdog)
        watchdog.stopping()

        # Shutdown takes as long as it takes (bounded by BRIDGE_SHUTDOWN_TIMEOUT): a
        # probe must not call it stuck.
        for heart in (main_heart, stream_heart, publisher_heart):
            heart.stop()
        self._log.info("bridge.stopping", pending=spool.pending)
        deadline = time.monotonic() + cfg.shutdown_timeout
        sink.stop(deadline)
        stream.stop(deadline)
        # At once, but for a sink holding a batch that a full disk refused: it waits,
        # up to the deadline, while the publisher (still running, not yet draining)
        # empties the spool and the spool rebuilds its files to make room.
        stream_thread.join(timeout=max(STREAM_JOIN, deadline - time.monotonic()))
        if self._fatal_from_broker:
            publisher.stop_now()
        else:
            publisher.drain_and_stop(max(0.0, deadline - time.monotonic()))
        if ha:
            ha.stop()       # after the drain: a leader's last reports, then the lock
        left = spool.pending
        if server is not None:
            server.stop()         # before the spool closes: a scrape reads the spool
        spool.close()
        dead_letters.close()
        self._log.info("bridge.stopped", left_in_spool=left)
        if self._fatal is not None:
            raise self._fatal
        return 0

    # --- pieces of run ---------------------------------------------------------------

    def _open_spool(self) -> Spool:
        cfg = self._cfg
        try:
            spool = Spool(cfg.spool_path, cfg.spool_max_bytes, cfg.spool_sync,
                          legacy_headers=derive_headers, on_error=self._on_spool_error)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the spool at {cfg.spool_path}: {exc}") from None
        if spool.recovered:
            self._log.warning("spool.recovered", events=spool.recovered,
                              detail="publishing events left by the previous run first")
        return spool

    def _observe(self, spool: Spool, publisher: Publisher, stream: StreamReader) -> None:
        """The gauges read at scrape time, and the checks of the probes."""
        m, cfg = self.metrics, self._cfg
        m.spool_events.set_function(lambda: spool.pending)
        m.spool_bytes.set_function(lambda: spool.bytes)
        m.spool_unwritable.set_function(lambda: spool.unwritable)
        m.spool_last_checkpoint.set_function(lambda: spool.last_checkpoint_at or 0)
        m.spool_capacity.set(cfg.spool_max_bytes)
        m.inflight_limit.set(cfg.inflight)
        m.spool_oldest_age.set_function(lambda: oldest_age(spool))
        # A spool that cannot checkpoint is not fixed by waiting; a restart may fix it.
        self.live.add_check("spool", lambda: spool.maintenance_error)
        self.ready.add_check("stream", lambda: None if stream.state is StreamState.STREAMING
                             else f"the stream is {stream.state.value}, not authenticated")
        self.ready.add_check("broker", lambda: None if publisher.connected
                             else f"the broker connection is {publisher.state.value}, not open")
        if self.ha:
            ha = self.ha
            self.ready.add_check("ha", lambda: None if ha.in_sync else
                                 f"HA {ha.role.value}: neither the leader nor a standby in sync")

    def _on_spool_error(self, operation: str, exc: Exception) -> None:
        """A write the spool's disk refused, or failed maintenance: counted every time,
        said once per SPOOL_ERROR_LOG_EVERY and operation (it is retried twice a second)."""
        self.metrics.spool_errors.labels(operation).inc()
        now = time.monotonic()
        last, repeated = self._spool_errors_said.get(operation, (None, 0))
        if last is not None and now - last < SPOOL_ERROR_LOG_EVERY:
            self._spool_errors_said[operation] = (last, repeated + 1)
            return
        self._spool_errors_said[operation] = (now, 0)
        self._log.error("spool.error", operation=operation, error=str(exc), repeated=repeated,
                        detail="retrying; nothing is lost meanwhile")

    def _start_metrics(self, spool: Spool, stream: StreamReader,
                       publisher: Publisher) -> MetricsServer | None:
        if self._cfg.metrics_addr is None:
            return None

        def ready() -> tuple[bool, dict]:
            ha = {"ha": self.ha.describe()} if self.ha else {}
            return self.ready.check(stream=stream.state.value, broker=publisher.state.value,
                                    broker_blocked=publisher.blocked,
                                    spool_events=spool.pending, spool_full=not spool.has_room(),
                                    spool_last_checkpoint_at=spool.last_checkpoint_at, **ha)

        probes = {"/livez": self.live.check, "/readyz": ready, "/healthz": ready}
        try:
            server = MetricsServer(self.metrics, self._cfg.metrics_addr, probes)
        except OSError as exc:
            host, port = self._cfg.metrics_addr
            raise ConfigError(f"BRIDGE_METRICS_ADDR {host}:{port}: {exc.strerror}") from None
        server.start()
        host, port = server.address[:2]
        # For the health check (bridge/probe.py), which cannot know a port 0 picked.
        config_mod.metrics_address_file(self._cfg.spool_path).write_text(f"{host}:{port}\n")
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

    def _wait_and_report(self, sink: SpoolingSink, spool: Spool, heart,
                         watchdog: Watchdog) -> None:
        """Wait for a stop, beating and kicking systemd's watchdog; meanwhile log
        throughput now and then."""
        last_time, last_count = time.monotonic(), 0
        while not self._stop.wait(1.0):
            heart.beat()
            watchdog.tick()
            now, count = time.monotonic(), sink.spooled_total
            if now - last_time < PROGRESS_EVERY:
                continue
            self._log.info("bridge.progress", received=count,
                           per_second=round((count - last_count) / (now - last_time), 1),
                           spool_events=spool.pending, spool_bytes=spool.bytes)
            last_time, last_count = now, count


def stream_budget(stream: config_mod.StreamConfig) -> float:
    """The longest the stream thread may go between beats: its longest single wait (a
    reconnect backoff, a connect, the auth frame, a ping and its pong), plus a margin."""
    return max(stream.reconnect_max, CONNECT_TIMEOUT, AUTH_TIMEOUT,
               stream.ping_interval + stream.ping_timeout) + STUCK_MARGIN


def oldest_age(spool: Spool) -> float:
    """Seconds since the oldest unconfirmed event was received; 0 with none waiting."""
    oldest = spool.read(spool.confirmed + 1, 1)
    return max(0.0, time.time() - oldest[0][1].received_at) if oldest else 0.0
