"""Between the stream and the spool: frames become events, events go to disk in batches.

`SpoolingSink` is the `StreamSink` the wiring hands the stream reader. It classifies
each frame (quarantining what is not a valid event, with a log line), or with HA
spools it unclassified for `resolve` to classify when it is published, turns the
stream's lifecycle into `bridge.connected` / `bridge.disconnected` events (which
travel through the spool like any other, so they keep their place in the order), and
applies backpressure: while the spool cannot take the batch in hand, because it is
at its bound or because its filesystem is full, the sink holds the batch and blocks,
so the stream is not read. Nothing it was handed is dropped: a batch leaves the sink
only once the spool has committed it.
"""

from __future__ import annotations

import json
import threading
import time

from bridge.event import Event, Reason, classify, defer, excerpt, quarantine, resolve
from bridge.metrics import Metrics
from bridge.spool import Spool, SpoolUnwritable

MAX_BATCH = 1000               # events handed to the spool in one transaction, at most
ROOM_POLL = 0.5                # seconds between looks at a full spool


class SpoolingSink:
    """Receives the stream's frames, turns them into events, and spools them in batches."""

    def __init__(self, spool: Spool, on_spooled, metrics: Metrics, log, *,
                 max_frame_bytes: int, stream_url: str, beat=lambda: None,
                 deferred: bool = False) -> None:
        self._spool = spool
        # HA: text frames are spooled unclassified and classified when published
        # (`resolve`, on the publisher's thread), as most of a replica's are never.
        self._deferred = deferred
        self._beat = beat             # liveness: waiting for room is progress
        self._on_spooled = on_spooled
        self._metrics = metrics
        self._log = log
        self._max_frame_bytes = max_frame_bytes
        self._stream_url = stream_url
        self._batch: list[Event] = []
        self._quarantined = 0
        self._last_frame_at: float | None = None   # for the gauge, set once a flush
        # A restart is a gap too: from the last frame the previous run received.
        self._lost_at: float | None = spool.previous_run_received_at
        self._connections = 0
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")     # time.monotonic(); see `stop`
        self.spooled_total = 0
        self._received = metrics.received.labels("event")
        self._received_invalid = metrics.received.labels("quarantined")

    def stop(self, deadline: float) -> None:
        """The bridge is stopping: the batch in hand still goes in if the spool takes it
        by `deadline` (time.monotonic()), the byte bound giving way, since it was read
        and the stream cannot send it again. Meanwhile the publisher empties the spool
        and a full disk's spool rebuilds its files; a disk still full at the deadline is
        the one case where the batch is dropped, and the log says how many events."""
        self._stop_deadline = deadline
        self._stopping.set()

    def authenticated(self, at: float) -> None:
        self._connections += 1
        gap = None if self._lost_at is None else {
            "lost_at": self._lost_at, "reconnected_at": at,
            "seconds": round(at - self._lost_at, 3)}
        self._lost_at = None
        self._metrics.stream_connects.inc()
        self._metrics.stream_connected.set(1)
        self._metrics.downtime.up(at)
        self._add_bridge_event("connected", at, connected_at=at, gap=gap)

    def lost(self, at: float, reason: str) -> None:
        self._lost_at = at
        self._metrics.stream_losses.inc()
        self._metrics.stream_connected.set(0)
        self._metrics.downtime.down(at)
        self._add_bridge_event("disconnected", at, lost_at=at, reason=reason)

    def frame(self, payload: bytes, binary: bool, size: int, oversize: bool,
              received_at: float) -> None:
        self._last_frame_at = received_at
        if oversize:
            event = quarantine(payload, received_at, Reason.OVERSIZE,
                               f"{size} bytes, over the limit of {self._max_frame_bytes}",
                               binary=binary, size=size)
        else:
            event = defer(payload, received_at) if self._deferred and not binary else None
            if event is None:
                event = classify(payload, received_at, binary=binary)
            if event is None:
                return
        if event.quarantined:
            self._quarantined += 1
            self._said_quarantined(event, size)
        self._batch.append(event)
        if len(self._batch) >= MAX_BATCH:
            self.flush()

    def resolve(self, event: Event) -> Event:
        """The event to publish for a spooled one: classified now if it was deferred
        (publisher thread). A frame quarantined here is logged and counted as on
        receipt (again at a republish); `received` counted it as an event."""
        classified = resolve(event)
        if classified is not event and classified.quarantined:
            self._said_quarantined(classified, len(classified.body))
        return classified

    def _said_quarantined(self, event: Event, size: int) -> None:
        reason = event.headers["x-quarantine-reason"]
        self._metrics.quarantined.labels(reason).inc()
        self._log.warning("frame.quarantined", reason=reason,
                          detail=event.headers["x-quarantine-detail"], size=size,
                          excerpt=excerpt(event.body))

    def flush(self) -> None:
        # The stream flushes whenever it has read what arrived, so the gauge lags by one
        # read at most, and costs one lock a read instead of one a frame.
        if self._last_frame_at is not None:
            self._metrics.last_frame.set(self._last_frame_at)
        if not self._batch:
            return
        if not self._store(self._batch):
            return
        batch, self._batch = self._batch, []
        self._received.inc(len(batch) - self._quarantined)
        self._received_invalid.inc(self._quarantined)
        self.spooled_total += len(batch)
        self._quarantined = 0
        self._on_spooled()

    def _store(self, batch: list[Event]) -> bool:
        """Commit the batch, waiting while the spool cannot take it (backpressure).

        At the byte bound the spool is waited on; on a full filesystem the append is
        retried every ROOM_POLL, as only a write can tell when there is room again.
        """
        waiting_since: float | None = None
        error: str | None = None
        while True:
            # On stop the byte bound gives way: one batch over it beats a lost event.
            if self._spool.within_bound() or self._stopping.is_set():
                try:
                    self._spool.append(batch)
                    break
                except SpoolUnwritable as exc:
                    error = str(exc)
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                self._metrics.backpressure.set(1)
                if self._spool.unwritable:
                    self._log.error("spool.disk_full", error=error, events=len(batch),
                                    detail="not reading the stream until the spool's "
                                           "filesystem has room; the batch is kept")
                else:
                    self._log.warning("spool.full", bytes=self._spool.bytes,
                                      limit=self._spool.max_bytes,
                                      detail="not reading the stream until the broker "
                                             "takes events")
            if self._stopping.is_set():
                if now >= self._stop_deadline:
                    self._metrics.backpressure.set(0)
                    self._log.error("spool.batch_dropped", events=len(batch),
                                    detail="stopping while the spool's filesystem is full")
                    self._batch, self._quarantined = [], 0
                    return False
            self._spool.wait_for_room(min(ROOM_POLL, max(0.0, self._stop_deadline - now)))
            self._beat()
        if waiting_since is not None:
            self._metrics.backpressure.set(0)
            self._log.info("spool.resumed",
                           waited_seconds=round(time.monotonic() - waiting_since, 1))
        return True

    def _add_bridge_event(self, action: str, at: float, **fields) -> None:
        body = {"type": "bridge", "action": action, "bridge_id": self._spool.id,
                "stream": self._stream_url, "connection": self._connections, **fields}
        self._batch.append(Event(f"bridge.{action}", json.dumps(body).encode(), at,
                                 {"type": "bridge", "action": action}))
        self.flush()
