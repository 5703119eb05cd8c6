"""The spool: every received event, on disk, until the broker has confirmed it.

It is the only copy of an event between the websocket and RabbitMQ, so it is an
SQLite database in WAL mode (standard library, crash-safe, fast appends in batches):

- `append` writes a batch in one transaction; an event is *received* once that commit
  returns. With `sync="normal"` a commit survives a crash or `kill -9` of the process
  (it is in the WAL, in the OS page cache); with `sync="full"` it is fsynced and
  survives power loss too, at the cost of one fsync per batch.
- `confirm(seq)` forgets everything up to `seq`; it is called only with a prefix the
  broker has confirmed, so a crash at any moment leaves exactly the unconfirmed
  events (and perhaps a few confirmed ones: duplicates, never losses). The rows are
  deleted by the maintenance thread, a few times a second, in one transaction for
  all the confirms since the last: at a steady rate confirms come one or two events
  at a time, and a transaction each rewrote the same pages into the WAL again
  ("Writing less" below). The counts and the bound see a confirm at once; on a full
  disk a confirm deletes at once, as only that makes room.
- Rows are batches: an append stores its events as one row (or a few, for a batch
  over BATCH_BYTES of bodies), their fields in one `marshal` value (format 4: str,
  bytes, float, bool and the headers' str, int, bool and lists; a format every
  Python 3 reads), so SQLite's work per row and per statement is paid once a batch
  (see "Rows are batches" below). Each row also stores its events' counted sizes and
  the running total of bytes appended before it, so the bytes of any stretch of
  sequence numbers follow from two rows, without a scan.
- The newest unconfirmed events also stay in memory (at most `window` of them and
  `window_bytes` of bodies, dropped once confirmed), so the publisher reads new
  events without touching the disk; older ones (a backlog after an outage) are read
  back in order from the database, a row
  (a batch) at a time. Memory is bounded by the window and BATCH_BYTES, whatever the
  backlog. Reading back is a decoding, not a new classification: the headers are
  stored. Spools written by earlier versions (a row an event, in a table `events`)
  are converted at open, in order, a batch at a time; their headers, JSON text or
  NULL, come from `legacy_headers`, a function the wiring hands in.
- Its size is bounded: `has_room()` is false once `max_bytes` of events wait, and
  the reader stops reading the websocket until the publisher makes room.
- A filesystem that fills up (ENOSPC, EDQUOT, an I/O error on write) is not a crash:
  `append` rolls back and raises `SpoolUnwritable`, keeping nothing half-written, and
  the caller keeps its batch and tries again (after `wait_for_room`); a `confirm`
  whose DELETE cannot be written is remembered and retried by the maintenance
  thread, and failed checkpoints are retried too. Once the disk is full and every
  event confirmed, the files are rebuilt empty (`_rebuild_empty`). Every failure
  goes to `on_error(operation, exception)`; `maintenance_error` names one that is
  not a full disk (an I/O error, a broken file) until maintenance succeeds again.
- Opening costs the same whatever the spool holds: the confirmed position, the next
  sequence and the last receive time are in `meta` (written with each delete) and in
  the first and last rows, and the byte total follows from the running totals of
  two rows. A crash between deletes leaves `meta` behind the confirms: the next run
  publishes those events again (duplicates, never losses).

Rows are batches: in a burst an append carries up to a thousand events, and SQLite's
per-row work (binding seven values, a B-tree insert, later a delete, and for a
backlog a step per row on the way back, each a release and retake of the GIL) was
paid per event. Measured alone on 60,000 distinct bodies of the bench's size, in
appends of 1,000 (thread CPU, one machine, one sitting): an append cost 14-16 us an
event with a row an event and 10 with a row a batch, reading back 11-14 and 10-11.
What that does to a burst, and to an HA pair: the README, "The benchmark". At a
steady rate every frame is its own append, so a row holds one event and costs what
it did.

Writing less: SQLite writes whole pages to the WAL, so what a transaction touches,
not what it adds, sets the cost. An append touches only the end of `batches`;
`meta` is written with the deletes, a few times a second, not with every append.

Events are numbered by a sequence that never goes back, which fixes their order and,
with the spool's random id, gives each its `message_id`.

Two locks, so the publisher never waits for a commit: `_db_lock` serialises every use
of the database (appends, deletes, the checkpoint that holds appends) and `_lock`
guards the counts and the memory window, held only for moments. The publisher reads
new events and confirms them under `_lock` alone; it takes `_db_lock` only for a
backlog that has left the window. Order: `_db_lock` before `_lock`, never the reverse.
"""

from __future__ import annotations

import json
import marshal
import sqlite3
import threading
import time
import uuid
from array import array
from collections import deque
from pathlib import Path
from typing import Callable

from bridge.event import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY,  -- its events are first_seq .. first_seq + count - 1
    count INTEGER NOT NULL,
    base INTEGER NOT NULL,          -- bytes appended before first_seq, a running total
    sizes BLOB NOT NULL,            -- each event's counted size, array('q')
    received_at REAL NOT NULL,      -- the last event's
    events BLOB NOT NULL            -- marshal: [(routing_key, body, received_at,
                                    --            headers, quarantined), ...]
);
"""
ROW_OVERHEAD = 64          # bytes counted per event beyond body and headers
BATCH_BYTES = 256 * 1024   # bodies per row, at most (a larger event has a row of its own)
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
RETRY_EVERY = 1.0                    # seconds between retries of failed maintenance
# SQLite starts the WAL over only once a checkpoint has copied all of it. At a steady
# rate every frame is its own append, appends run during every checkpoint, and a
# PASSIVE checkpoint stops at the frame it started from: the WAL never restarted and
# grew by about 15 MB a second at 2,000 events/s (`bench --soak`). Past this size, the
# rest is checkpointed with appends held, a short copy of what came in meanwhile, so
# the next append starts the WAL over (and truncates its file to this size).
WAL_RESTART_BYTES = 32 * 1024 * 1024

_DISK_ERRORS = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
MARSHAL_VERSION = 4


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


class SpoolUnwritable(Exception):
    """The spool's filesystem refused a write (full, over quota, or failing).

    Nothing of the batch was stored; the caller still holds it.
    """


def is_disk_error(exc: BaseException) -> bool:
    """True for the sqlite errors a full or failing filesystem causes."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DISK_ERRORS


class Spool:
    """A bounded, ordered, crash-safe queue of events; thread-safe (see the module's
    docstring for its two locks)."""

    def __init__(self, path: Path, max_bytes: int, sync: str = "normal",
                 window: int = 8192, window_bytes: int = 8 * 1024 * 1024, *,
                 legacy_headers: Callable[[bytes], dict] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._window = window
        self._window_bytes = window_bytes
        self._legacy_headers = legacy_headers or (lambda body: {})
        self._on_error = on_error or (lambda operation, exc: None)
        self._recent_bytes = 0
        self._db_lock = threading.Lock()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._sync = sync
        self._db = self._connect()
        self._page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self.id = self._spool_id()
        self._convert_rows_of_events()
        self._cached: tuple[int, list] = (0, [])     # the last row read back, decoded
        # MIN or MAX of the primary key alone is one index lookup; both in one
        # SELECT is a scan of the whole table (SQLite's min/max optimisation).
        first = self._db.execute("SELECT MIN(first_seq) FROM batches").fetchone()[0]
        last = self._end_of_rows()
        self._next_seq = max(int(self._meta("next_seq") or 1), last[0] if last else 1)
        # The bytes appended before `_next_seq`, the running total the rows carry on.
        self._appended_bytes = last[1] if last else 0
        self._confirmed = max(int(self._meta("confirmed") or 0),
                              first - 1 if first is not None else self._next_seq - 1)
        self._deleted = self._confirmed     # events up to here are gone, for readers
        self._bytes = self._appended_bytes - self._db_offset(self._confirmed + 1)
        self._last_received_at = self._meta("last_received_at")
        if last and (self._last_received_at is None
                     or last[2] > float(self._last_received_at)):
            self._last_received_at = str(last[2])
        self._undeleted_bytes = 0       # of confirmed events the table still holds
        self.recovered = self.pending   # events left by a previous run, to publish first
        # When a previous run last received anything (None for a new spool).
        self.previous_run_received_at = (float(self._last_received_at)
                                         if self._last_received_at else None)
        self._recent: deque[tuple[int, Event]] = deque()
        # For each event of the window, the bytes appended before it (a running total),
        # so a confirm within the window knows what it frees without a query.
        self._recent_offsets: deque[int] = deque()
        self._closed = False
        self._unwritable = False            # the last append failed for want of disk
        self._rebuilding = False            # see `_rebuild_empty`
        self._written_since_checkpoint = 0  # bytes, roughly; tells when to checkpoint
        self.maintenance_error: str | None = None
        self.last_checkpoint_at: float | None = None     # time.time() of the last success
        self._checkpointer = threading.Thread(target=self._maintain_forever,
                                              name="spool-checkpoint", daemon=True)
        self._checkpointer.start()

    # --- writing (the stream side) ---------------------------------------------------

    def append(self, events: list[Event]) -> int:
        """Store a batch durably, in order; returns the last sequence number.

        Raises SpoolUnwritable, having stored none of it, when the disk refuses.
        """
        with self._db_lock:
            first = self._next_seq          # only appends move it, under this lock
            rows, sizes = self._rows(first, self._appended_bytes, events)
            try:
                if self._rebuilding:
                    raise sqlite3.OperationalError("the spool's files are being rebuilt")
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO batches VALUES (?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if not (is_disk_error(exc) or self._rebuilding):
                    raise
                self._unwritable = True
                self._on_error("append", exc)
                raise SpoolUnwritable(str(exc)) from None
            with self._lock:
                self._unwritable = False
                self._last_received_at = str(events[-1].received_at)
                self._next_seq = first + len(events)
                added = sum(sizes)
                self._bytes += added
                self._written_since_checkpoint += added
                self._recent.extend(zip(range(first, self._next_seq), events))
                offset = self._appended_bytes
                for size in sizes:
                    self._recent_offsets.append(offset)
                    offset += size
                self._appended_bytes = offset
                self._recent_bytes += sum(len(ev.body) for ev in events)
                while self._recent and (len(self._recent) > self._window
                                        or self._recent_bytes > self._window_bytes):
                    self._drop_oldest_in_window()
            return self._next_seq - 1

    @staticmethod
    def _rows(first: int, base: int, events: list[Event]) -> tuple[list[tuple], list[int]]:
        """The `batches` rows of `events`, numbered from `first`, each at most
        BATCH_BYTES of bodies (or one event); and every event's counted size: its
        body, ROW_OVERHEAD, and its share of what the row stores beyond the bodies."""
        rows, sizes = [], []
        start = 0
        while start < len(events):
            end, body_bytes = start, 0
            while end < len(events) and (end == start or body_bytes + len(
                    events[end].body) <= BATCH_BYTES):
                body_bytes += len(events[end].body)
                end += 1
            chunk = events[start:end]
            blob = marshal.dumps([(ev.routing_key, ev.body, ev.received_at, ev.headers,
                                   ev.quarantined) for ev in chunk], MARSHAL_VERSION)
            share, extra = divmod(len(blob) - body_bytes, len(chunk))
            counted = [len(ev.body) + ROW_OVERHEAD + share for ev in chunk]
            counted[-1] += extra
            rows.append((first + start, len(chunk), base, array("q", counted).tobytes(),
                         chunk[-1].received_at, blob))
            base += sum(counted)
            sizes += counted
            start = end
        return rows, sizes

    def has_room(self) -> bool:
        """Below the byte bound, and the last append found room on the disk."""
        return self._bytes < self.max_bytes and not self._unwritable

    def within_bound(self) -> bool:
        return self._bytes < self.max_bytes

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the spool is below its bound (or `timeout`); True if it is.

        After a failed append the filesystem is the bound: this returns when rows
        were deleted (or at `timeout`), and only another append can tell whether
        the disk takes it now.
        """
        with self._room:
            if self._unwritable:
                freed = self._room.wait_for(lambda: not self._unwritable or self._closed,
                                            timeout)
                return freed and self._bytes < self.max_bytes
            return self._room.wait_for(lambda: self._bytes < self.max_bytes or self._closed,
                                       timeout)

    # --- reading and confirming (the broker side) -----------------------------------

    def read(self, from_seq: int, limit: int) -> list[tuple[int, Event]]:
        """Up to `limit` events with sequence >= `from_seq`, in order."""
        with self._lock:
            if from_seq >= self._next_seq:
                return []
            if self._recent and from_seq >= self._recent[0][0]:
                start = from_seq - self._recent[0][0]
                end = min(start + limit, len(self._recent))
                return [self._recent[i] for i in range(start, end)]
        out: list[tuple[int, Event]] = []
        with self._db_lock:
            seq = max(from_seq, self._deleted + 1)
            while len(out) < limit and seq < self._next_seq:
                first, decoded = self._cached
                if not first <= seq < first + len(decoded):
                    row = self._row_holding(seq, "events")
                    if row is None:
                        break
                    first, decoded = row[0], marshal.loads(row[1])
                    self._cached = (first, decoded)
                stop = min(first + len(decoded), seq + limit - len(out))
                if stop <= seq:
                    break           # no row holds `seq`: rows are never missing mid-spool
                out += [(n, Event(*decoded[n - first])) for n in range(seq, stop)]
                seq = stop
        return out

    def _headers(self, stored: bytes | str | None, body: bytes) -> dict:
        if type(stored) is bytes:
            return marshal.loads(stored)
        if stored:                      # JSON text: a quarantined row of an older spool
            return json.loads(stored)
        return self._legacy_headers(body)

    def confirm(self, upto_seq: int) -> None:
        """The broker confirmed every event up to `upto_seq`: forget them.

        They are not read again, and the counts and the bound see it at once; the
        maintenance thread deletes their rows (here, at once, on a full disk, where
        only that makes room). If the disk cannot take the DELETE, it is retried.
        """
        with self._lock:
            if upto_seq <= self._confirmed or self._closed:
                return
            freed = self._bytes_in_window(self._confirmed, upto_seq)
            if freed is not None:
                self._confirmed_upto(upto_seq, freed)
                if not self._unwritable:
                    return
        # A backlog beyond the window, or a full disk: the database has the answer.
        with self._db_lock:
            with self._lock:
                if upto_seq > self._confirmed and not self._closed:
                    freed = (self._db_offset(upto_seq + 1)
                             - self._db_offset(self._confirmed + 1))
                    self._confirmed_upto(upto_seq, freed)
                unwritable = self._unwritable and not self._closed
            if unwritable:
                self._delete_confirmed("confirm")

    def _db_offset(self, seq: int) -> int:
        """The bytes appended before `seq`, from the row that holds it (`_db_lock`
        held; `seq` unconfirmed, or the next to come)."""
        if seq >= self._next_seq:
            return self._appended_bytes
        row = self._row_holding(seq, "base, sizes")
        if row is None:
            return self._appended_bytes
        first, base, sizes = row
        return base + sum(array("q", sizes)[:seq - first])

    def _row_holding(self, seq: int, columns: str) -> tuple | None:
        """(first_seq, *columns) of the row that holds `seq` (`_db_lock` held): the
        last row starting at or before it, one index lookup."""
        return self._db.execute(f"SELECT first_seq, {columns} FROM batches WHERE first_seq <= ? "
                                "ORDER BY first_seq DESC LIMIT 1", (seq,)).fetchone()

    def _end_of_rows(self) -> tuple[int, int, float] | None:
        """(the sequence after the last row, the bytes appended up to there, the last
        row's receive time); None for no rows."""
        row = self._db.execute("SELECT first_seq + count, base, sizes, received_at FROM batches "
                               "WHERE first_seq = (SELECT MAX(first_seq) FROM batches)").fetchone()
        if row is None:
            return None
        end, base, sizes, received_at = row
        return end, base + sum(array("q", sizes)), received_at

    def _confirmed_upto(self, upto_seq: int, freed: int) -> None:
        """Count a confirm, `freed` bytes no longer waiting, drop the confirmed events
        from the window, and wake whoever waits for room (`_lock` held); the rows go at
        the next delete."""
        self._confirmed = upto_seq
        # Nobody reads a confirmed event again. Kept, the newest 8,192 would sit in the
        # collector's youngest generation (new objects in, old ones dying elsewhere, its
        # count never moving), and each collection walked them all with the GIL held:
        # 14-23 ms, a stall of the stream as long, at 2,000 events/s (`bench --soak`).
        if self._recent and self._recent[0][0] <= upto_seq:   # the window is consecutive
            self._drop_oldest_in_window(min(len(self._recent), upto_seq + 1 - self._recent[0][0]))
        self._bytes -= freed
        self._undeleted_bytes += freed
        self._room.notify_all()

    def _drop_oldest_in_window(self, count: int = 1) -> None:
        """The window forgets its `count` oldest events (`_lock` held); the database
        keeps them. One call for a confirm's worth: a call an event was most of the 3% of
        the bridge's busy time this took in a burst (`py-spy record --gil`)."""
        recent, offsets, freed = self._recent, self._recent_offsets, 0
        for _ in range(count):
            freed += len(recent.popleft()[1].body)
            offsets.popleft()
        self._recent_bytes -= freed

    def _bytes_in_window(self, after_seq: int, upto_seq: int) -> int | None:
        """Bytes of the events after `after_seq` up to `upto_seq` if the window holds
        them all, else None (`_lock` held)."""
        if not self._recent:
            return None
        oldest = self._recent[0][0]
        if after_seq + 1 < oldest or upto_seq >= self._next_seq:
            return None

        def offset(seq: int) -> int:        # the bytes appended before `seq`
            if seq == self._next_seq:
                return self._appended_bytes
            return self._recent_offsets[seq - oldest]

        return offset(upto_seq + 1) - offset(after_seq + 1)

    @property
    def confirmed(self) -> int:
        """Every event up to this sequence number has been confirmed."""
        return self._confirmed

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def pending(self) -> int:
        """Events received and not yet confirmed."""
        return self._next_seq - 1 - self._confirmed

    @property
    def bytes(self) -> int:
        """Bytes of the events received and not yet confirmed."""
        return self._bytes

    @property
    def unwritable(self) -> bool:
        """True from a failed append until rows are deleted or an append succeeds."""
        return self._unwritable

    def message_id(self, seq: int) -> str:
        return f"{self.id}-{seq}"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
        self._checkpointer.join(timeout=5)
        with self._db_lock:
            try:
                self._delete_confirmed("close")
                # Remember the sequence even when the spool is empty, so message ids
                # and order never repeat across restarts.
                self._save_meta(self._deleted)
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                self._on_error("close", exc)     # what is committed stays in the WAL
            self._db.close()

    # --- internals -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
        # Checkpoints copy the WAL into the database and fsync it: slow, and on the hot
        # path they would stall a commit now and then by tens of milliseconds. They run
        # on a thread of their own instead (see `_maintain_forever`).
        db.execute("PRAGMA wal_autocheckpoint=0")
        # Debian's SQLite zeroes deleted rows by default (SECURE_DELETE): every confirm
        # would write each freed page again, zeros into the WAL and then the database,
        # on the disk the broker fsyncs to. FAST zeroes only where that costs no extra
        # write; freed pages keep old bodies until reused, which a queue does at once.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA journal_size_limit={WAL_RESTART_BYTES}")
        db.executescript(_SCHEMA)
        return db

    def _rebuild_empty(self) -> None:
        """Replace the files of a spool whose every event is confirmed (`_db_lock` held).

        On a full filesystem a WAL spool can wedge: the WAL cannot grow, and the
        checkpoint that would let it wrap around must grow the database first. While
        the disk is full nothing new is appended, so the publisher confirms it all;
        then nothing in the files is needed but `meta`, and a fresh database needs a
        few KB where the old one held megabytes. A crash in between costs only the
        meta: a new spool id (so message ids cannot repeat) and one restart gap unsaid.
        """
        self._db.close()
        self._rebuilding = True         # until it worked: appends are refused
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._db = self._connect()
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('spool_id', ?)", (self.id,))
        self._save_meta(self._confirmed)
        with self._lock:
            self._deleted = self._confirmed
            self._bytes = self._undeleted_bytes = self._recent_bytes = 0
            self._recent.clear()
            self._recent_offsets.clear()
            self._cached = (0, [])
            self._unwritable = self._rebuilding = False
            self._room.notify_all()

    def _delete_confirmed(self, operation: str) -> bool:
        """Delete the confirmed rows (`_db_lock` held); False if the disk refused."""
        with self._lock:
            upto = self._confirmed
            if upto <= self._deleted:
                return True
            undeleted = self._undeleted_bytes   # confirms meanwhile wait for the next delete
        try:
            self._db.execute("BEGIN")
            # The rows wholly confirmed; a row confirmed in part stays, and `meta` says
            # where in it the confirms stand.
            self._db.execute("DELETE FROM batches WHERE first_seq <= ? "
                             "AND first_seq + count - 1 <= ?", (upto, upto))
            self._save_meta(upto)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            if not is_disk_error(exc) and operation == "confirm":
                raise
            self._maintenance_failed(operation, exc)
            self._on_error(operation, exc)
            return False
        with self._lock:
            self._deleted = upto
            self._undeleted_bytes -= undeleted
            self._unwritable = False            # room was made: the next append may fit
            self._written_since_checkpoint += 1     # the deletes are in the WAL too
            self._room.notify_all()
        return True

    def _maintenance_failed(self, operation: str, exc: Exception) -> None:
        """A full filesystem is not `maintenance_error`: it is the backpressure case,
        handled and retried, and a liveness restart would only lose the batch in hand.
        Anything else (an I/O error, a broken file) is, until maintenance succeeds."""
        if not _is_full(exc):
            self.maintenance_error = f"{operation}: {exc}"

    def _rollback(self) -> None:
        if not self._rebuilding and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass    # sqlite already rolled back what the failed statement began

    def _maintain_forever(self) -> None:
        """Keep the WAL short without blocking appends (a PASSIVE checkpoint never waits),
        and retry what the disk refused. A failure is reported and retried, never the
        end of the thread: with autocheckpoint off, the WAL would otherwise grow forever.
        """
        db: sqlite3.Connection | None = None
        last = time.monotonic()
        failing = False
        while not self._closed:
            with self._room:
                self._room.wait_for(lambda: self._closed,
                                    RETRY_EVERY if failing else CHECKPOINT_EVERY)
                if self._closed:
                    break
            with self._db_lock:
                if self._closed:
                    break
                # Wedged: maintenance the disk refused, or an append refused with nothing
                # to delete or checkpoint (a start on a full disk over a drained spool).
                wedged = failing or self._unwritable
                if wedged and self._confirmed == self._next_seq - 1:
                    if db is not None:
                        db.close()
                        db = None
                    try:
                        self._rebuild_empty()
                    except (OSError, sqlite3.Error) as exc:
                        self._maintenance_failed("rebuild", exc)
                        self._on_error("rebuild", exc)
                        continue
                retried = self._delete_confirmed("delete")
            with self._lock:
                written = self._written_since_checkpoint
                since = time.monotonic() - last
                # A refused delete is failing maintenance even with nothing written since
                # the last checkpoint (the disk filled right after it): only a checkpoint
                # that ends with `failing` set leads to the rebuild of a wedged spool.
                due = failing or not retried or (
                    written and (written < CHECKPOINT_BURST_BYTES
                                 or since >= CHECKPOINT_BURST_EVERY))
                if due:
                    self._written_since_checkpoint = 0
            if not due:
                continue
            try:
                if db is None:
                    db = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False)
                [(_, wal_frames, _)] = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                if wal_frames * self._page_size > WAL_RESTART_BYTES:
                    with self._db_lock:         # appends held; the publisher reads on
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                failing = True
                self._maintenance_failed("checkpoint", exc)
                self._on_error("checkpoint", exc)
                continue
            last = time.monotonic()
            self.last_checkpoint_at = time.time()
            failing = not retried
            if retried:
                self.maintenance_error = None
        if db is not None:
            db.close()

    def _save_meta(self, confirmed: int) -> None:
        """Record the confirmed position, the next sequence (an empty spool must still
        know it, or a crash would reuse sequence numbers, hence message ids) and when
        the stream was last heard from (so that the next run can tell workers how long
        the stream went unread); in the caller's transaction, if any."""
        rows = [("confirmed", str(confirmed)), ("next_seq", str(self._next_seq))]
        if self._last_received_at:
            rows.append(("last_received_at", self._last_received_at))
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def _convert_rows_of_events(self) -> None:
        """Turn a spool of an earlier version (a row an event, in `events`) into rows
        of batches, in order, a batch per transaction: memory stays bounded by
        BATCH_BYTES, and a crash midway leaves every event in one table or the other."""
        if not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone():
            return
        last = self._end_of_rows()
        base = last[1] if last else 0
        first = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
        if first is not None and last is None:
            # The old spool's confirmed position was its first row; once rows are
            # converted, theirs is (a conversion cut short resumes here).
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('confirmed', ?)",
                             (str(first - 1),))
        while True:
            # Row by row, not fetchall: old rows may hold frames of up to the frame limit.
            cursor = self._db.execute(
                "SELECT seq, routing_key, body, received_at, headers, quarantined, size "
                "FROM events ORDER BY seq LIMIT 1000")
            taken, body_bytes = [], 0
            for row in cursor:
                if taken and body_bytes + len(row[2]) > BATCH_BYTES:
                    break
                taken.append(row)
                body_bytes += len(row[2])
            cursor.close()      # before the transaction that deletes what it read
            if not taken:
                break
            events = [(key, body, at, self._headers(headers, body), bool(q))
                      for _, key, body, at, headers, q, _ in taken]
            sizes = [size for *_, size in taken]
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO batches VALUES (?,?,?,?,?,?)", (
                taken[0][0], len(taken), base, array("q", sizes).tobytes(), taken[-1][3],
                marshal.dumps(events, MARSHAL_VERSION)))
            self._db.execute("DELETE FROM events WHERE seq <= ?", (taken[-1][0],))
            self._db.execute("COMMIT")
            base += sum(sizes)
        self._db.execute("DROP TABLE events")
        self._db.execute("DELETE FROM meta WHERE key IN ('bytes', 'bytes_seq')")

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
