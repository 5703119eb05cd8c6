"""The spool: every received event, on disk, until the broker has confirmed it.

It is the only copy of an event between the websocket and RabbitMQ, so it is an
SQLite database in WAL mode (standard library, crash-safe, fast appends in batches):

- `append` writes a batch in one transaction; an event is *received* once that commit
  returns. With `sync="normal"` a commit survives a crash or `kill -9` of the process
  (it is in the WAL, in the OS page cache); with `sync="full"` it is fsynced and
  survives power loss too, at the cost of one fsync per batch.
- `confirm(seq)` deletes everything up to `seq`; it is called only with a prefix the
  broker has confirmed, so a crash at any moment leaves exactly the unconfirmed
  events (and perhaps a few confirmed ones: duplicates, never losses).
- The newest events also stay in memory (at most `window` of them and `window_bytes`
  of bodies), so the publisher reads new events without touching the disk; older
  ones (a backlog after an outage) are read back in order from the database. Memory
  is bounded by the window, whatever the backlog and whatever the frame sizes.
  An event's headers are derived from its body again when it is read back, so only
  the body is stored (and, for a quarantined frame, the headers saying why).
- Its size is bounded: `has_room()` is false once `max_bytes` of events wait, and
  the reader stops reading the websocket until the publisher makes room.

Events are numbered by a sequence that never goes back, which fixes their order and,
with the spool's random id, gives each its `message_id`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from bridge.event import Event, derive_headers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    quarantined INTEGER NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT,
    body BLOB NOT NULL,
    size INTEGER NOT NULL
);
"""
ROW_OVERHEAD = 64          # bytes counted per event beyond body and headers
# A checkpoint fsyncs what the WAL gathered since the last one, and while that flush
# runs the disk is slow for everyone on it, RabbitMQ included (a broker on the same
# disk delays deliveries for its length). Small, frequent flushes keep each stall
# short: at 1,000 events/s, end-to-end p99 was 23-24 ms with a checkpoint a second and
# 7 ms with one every 0.1-0.2 s (`tutum-bridge bench`). In a burst, events queue
# anyway and frequent checkpoints would only recopy the same hot pages, so past
# CHECKPOINT_BURST_BYTES a tick (about 650 simulator events) it is one a second.
CHECKPOINT_EVERY = 0.2               # seconds, while the stream is calm
CHECKPOINT_BURST_EVERY = 1.0         # seconds, in a burst
CHECKPOINT_BURST_BYTES = 256 * 1024  # written within one CHECKPOINT_EVERY: a burst


class Spool:
    """A bounded, ordered, crash-safe queue of events; thread-safe."""

    def __init__(self, path: Path, max_bytes: int, sync: str = "normal",
                 window: int = 8192, window_bytes: int = 8 * 1024 * 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._window = window
        self._window_bytes = window_bytes
        self._recent_bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        # Checkpoints copy the WAL into the database and fsync it: slow, and on the hot
        # path they would stall a commit now and then by tens of milliseconds. They run
        # on a thread of their own instead (see `_checkpoint_forever`).
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self.id = self._spool_id()
        first, last, count, size = self._db.execute(
            "SELECT MIN(seq), MAX(seq), COUNT(*), COALESCE(SUM(size), 0) FROM events").fetchone()
        stored_next = int(self._meta("next_seq") or 1)
        self._next_seq = max(stored_next, (last or 0) + 1)
        self._confirmed = (first - 1) if first is not None else self._next_seq - 1
        self._count, self._bytes = count, size
        self.recovered = count          # events left by a previous run, to publish first
        stored_at = self._meta("last_received_at")
        # When a previous run last received anything (None for a new spool).
        self.previous_run_received_at = float(stored_at) if stored_at else None
        self._recent: deque[tuple[int, Event]] = deque()
        self._closed = False
        self._written_since_checkpoint = 0      # bytes, roughly; tells when to checkpoint
        self._checkpointer = threading.Thread(target=self._checkpoint_forever,
                                              name="spool-checkpoint", daemon=True)
        self._checkpointer.start()

    # --- writing (the stream side) ---------------------------------------------------

    def append(self, events: list[Event]) -> int:
        """Store a batch durably, in order; returns the last sequence number."""
        with self._lock:
            first = self._next_seq
            rows = []
            added = 0
            for offset, ev in enumerate(events):
                # An event's headers are a function of its body, so only a quarantined
                # frame's (which describe what was wrong with it) are worth storing.
                headers = json.dumps(ev.headers) if ev.quarantined else None
                size = len(ev.body) + len(headers or "") + ROW_OVERHEAD
                added += size
                rows.append((first + offset, ev.received_at, ev.quarantined,
                             ev.routing_key, headers, ev.body, size))
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?)", rows)
            # When the stream was last heard from, so that after a crash or restart the
            # next run can tell workers how long the stream went unread.
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_received_at', ?)",
                             (str(events[-1].received_at),))
            self._db.execute("COMMIT")
            self._next_seq = first + len(events)
            self._count += len(events)
            self._bytes += added
            self._written_since_checkpoint += added
            self._recent.extend(zip(range(first, self._next_seq), events))
            self._recent_bytes += sum(len(ev.body) for ev in events)
            while self._recent and (len(self._recent) > self._window
                                    or self._recent_bytes > self._window_bytes):
                self._recent_bytes -= len(self._recent.popleft()[1].body)
            return self._next_seq - 1

    def has_room(self) -> bool:
        return self._bytes < self.max_bytes

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the spool is below its bound (or `timeout`); True if it is."""
        with self._room:
            return self._room.wait_for(lambda: self._bytes < self.max_bytes or self._closed,
                                       timeout)

    # --- reading and confirming (the broker side) -----------------------------------

    def read(self, from_seq: int, limit: int) -> list[tuple[int, Event]]:
        """Up to `limit` events with sequence >= `from_seq`, in order."""
        with self._lock:
            if self._recent and from_seq >= self._recent[0][0]:
                start = from_seq - self._recent[0][0]
                end = min(start + limit, len(self._recent))
                return [self._recent[i] for i in range(start, end)]
            rows = self._db.execute(
                "SELECT seq, received_at, quarantined, routing_key, headers, body FROM events "
                "WHERE seq >= ? ORDER BY seq LIMIT ?", (from_seq, limit)).fetchall()
        return [(seq, Event(key, body, at, json.loads(headers) if q else derive_headers(body), bool(q)))
                for seq, at, q, key, headers, body in rows]

    def confirm(self, upto_seq: int) -> None:
        """The broker confirmed every event up to `upto_seq`: forget them."""
        with self._lock:
            if upto_seq <= self._confirmed or self._closed:
                return
            self._db.execute("BEGIN")
            freed, count = self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM events WHERE seq <= ?",
                (upto_seq,)).fetchone()
            self._db.execute("DELETE FROM events WHERE seq <= ?", (upto_seq,))
            # An empty spool must still remember where the sequence stands, or a crash
            # now would reuse sequence numbers, hence message ids, after the restart.
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                             (str(self._next_seq),))
            self._db.execute("COMMIT")
            self._confirmed = upto_seq
            self._bytes -= freed
            self._count -= count
            self._written_since_checkpoint += 1     # the deletes are in the WAL too
            self._room.notify_all()

    @property
    def confirmed(self) -> int:
        """Every event up to this sequence number has been confirmed."""
        return self._confirmed

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def pending(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def message_id(self, seq: int) -> str:
        return f"{self.id}-{seq}"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
            # Remember the sequence even when the spool is empty, so message ids and
            # order never repeat across restarts.
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)",
                             (str(self._next_seq),))
        self._checkpointer.join(timeout=5)
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    # --- internals -------------------------------------------------------------------

    def _checkpoint_forever(self) -> None:
        """Keep the WAL short without blocking appends (a PASSIVE checkpoint never waits)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        last = time.monotonic()
        try:
            while not self._closed:
                with self._room:
                    self._room.wait_for(lambda: self._closed, CHECKPOINT_EVERY)
                    written = self._written_since_checkpoint
                    since = time.monotonic() - last
                    due = written and (written < CHECKPOINT_BURST_BYTES
                                       or since >= CHECKPOINT_BURST_EVERY)
                    if due:
                        self._written_since_checkpoint = 0
                if due:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    last = time.monotonic()
        except sqlite3.Error:
            pass  # the spool is closing; close() checkpoints what is left
        finally:
            db.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _spool_id(self) -> str:
        existing = self._meta("spool_id")
        if existing:
            return existing
        new = uuid.uuid4().hex[:16]
        self._db.execute("INSERT INTO meta VALUES ('spool_id', ?)", (new,))
        return new
