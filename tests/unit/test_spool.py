"""Unit tests of the spool: what it stores, what it reads back, what a full disk does.

A real SQLite file in a temporary directory; a full disk is SQLite's own SQLITE_FULL,
caused by capping the database's page count (`PRAGMA max_page_count`), which is
what SQLite reports for ENOSPC too. The real full filesystem is in tests/test_faults_stream.py.
"""

from __future__ import annotations

import gc
import json
import marshal
import sqlite3
import threading
import time

import pytest

from bridge import spool as spool_mod
from bridge.event import Event, classify, derive_headers
from bridge.spool import Spool, SpoolUnwritable
from tests.support.wait import wait_for


def event(n: int, size: int = 0) -> Event:
    body = b'{"type": "container", "action": "update", "n": %d, "pad": "%s"}' % (n, b"x" * size)
    return classify(body, 1000.0 + n)


def open_spool(path, **kw) -> Spool:
    kw.setdefault("window", 0)          # every read goes to the database
    return Spool(path / "spool.sqlite3", 1 << 30, **kw)


def test_read_back_gives_the_stored_headers_without_classifying_again(tmp_path):
    spool = open_spool(tmp_path, legacy_headers=lambda body: pytest.fail("classified again"))
    # Headers no function of the body could give: only storing them returns them.
    spool.append([Event("a.b", b"{}", 1.0, {"type": "a", "only": "stored"})])
    [(seq, back)] = spool.read(1, 10)
    assert (seq, back.routing_key, back.headers, back.body) == (
        1, "a.b", {"type": "a", "only": "stored"}, b"{}")
    spool.close()


def old_spool(path, events: list[tuple[int, Event, object]]) -> None:
    """A spool as versions before batch rows wrote it: a row an event, in `events`,
    headers as marshal bytes, JSON text (an old quarantined row) or NULL."""
    db = sqlite3.connect(path / "spool.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE events (seq INTEGER PRIMARY KEY, received_at REAL NOT NULL,
            quarantined INTEGER NOT NULL, routing_key TEXT NOT NULL, headers TEXT,
            body BLOB NOT NULL, size INTEGER NOT NULL);
        INSERT INTO meta VALUES ('spool_id', 'oldspool00000000');
        INSERT INTO meta VALUES ('bytes', '999'), ('bytes_seq', '1');
    """)
    for seq, ev, headers in events:
        db.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?)",
                   (seq, ev.received_at, int(ev.quarantined), ev.routing_key, headers,
                    ev.body, len(ev.body) + 100))
    db.close()


def test_a_spool_of_an_earlier_version_is_converted_in_order(tmp_path):
    old, bad = event(1), classify(b"[1]", 2.0)
    rows = [(5, old, None), (6, bad, json.dumps(bad.headers)),
            *((seq, event(seq), marshal.dumps(event(seq).headers, 4)) for seq in range(7, 12))]
    old_spool(tmp_path, rows)
    spool = open_spool(tmp_path, legacy_headers=derive_headers)
    assert (spool.id, spool.confirmed, spool.last_seq, spool.recovered) == (
        "oldspool00000000", 4, 11, 7)
    assert spool.bytes == sum(len(ev.body) + 100 for _, ev, _ in rows)
    back = spool.read(1, 100)
    assert [seq for seq, _ in back] == list(range(5, 12))
    assert [(ev.routing_key, ev.body, ev.headers, ev.quarantined) for _, ev in back] == [
        (ev.routing_key, ev.body, ev.headers, ev.quarantined) for _, ev, _ in rows]
    assert not spool._db.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone()
    spool.confirm(8)
    spool.close()
    again = open_spool(tmp_path)
    assert [seq for seq, _ in again.read(1, 100)] == list(range(9, 12))
    assert again.bytes == sum(len(ev.body) + 100 for seq, ev, _ in rows if seq > 8)
    again.close()


def test_a_conversion_cut_short_loses_nothing(tmp_path, monkeypatch):
    """A crash midway through converting an old spool: every event is in one table or
    the other, and the next open finishes the job in order."""
    rows = [(seq, event(seq, size=300), None) for seq in range(1, 41)]
    old_spool(tmp_path, rows)
    monkeypatch.setattr(spool_mod, "BATCH_BYTES", 1000)      # several rows a batch
    calls = 0

    def dies_midway(body):
        nonlocal calls
        calls += 1
        if calls > 20:
            raise RuntimeError("the process dies here")
        return derive_headers(body)

    with pytest.raises(RuntimeError):
        open_spool(tmp_path, legacy_headers=dies_midway)
    spool = open_spool(tmp_path, legacy_headers=derive_headers)
    assert (spool.confirmed, spool.pending) == (0, 40)
    assert [ev.body for _, ev in spool.read(1, 100)] == [ev.body for _, ev, _ in rows]
    spool.close()


def test_reopening_restores_counts_bytes_and_sequence(tmp_path):
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(50)])
    spool.confirm(20)
    pending, size, last = spool.pending, spool.bytes, spool.last_seq
    spool.close()
    again = open_spool(tmp_path)
    assert (again.pending, again.bytes, again.last_seq, again.confirmed) == (pending, size, last, 20)
    assert again.recovered == 30
    assert [seq for seq, _ in again.read(0, 100)] == list(range(21, 51))
    again.close()


def test_after_a_crash_between_deletes_the_totals_come_from_the_rows(tmp_path, monkeypatch):
    """Appends do not write `meta`; a crash loses nothing the next run reports: the
    byte total, the last receive time, what to publish."""
    monkeypatch.setattr(spool_mod, "CHECKPOINT_EVERY", 3600.0)    # no maintenance either
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(50)])
    spool.confirm(20)            # deleted later, by the maintenance thread: not yet
    spool.append([event(n) for n in range(50, 60)])
    size = spool.bytes
    # A crash: no close; the next run opens the file beside the dead one.
    again = open_spool(tmp_path)
    assert again.previous_run_received_at == 1059.0
    # The confirmed rows the crash left come again (duplicates, never losses).
    assert (again.pending, again.last_seq, again.recovered) == (60, 60, 60)
    assert again.bytes > size
    again.confirm(20)
    assert again.bytes == size
    again.close()
    with spool._room:            # the dead run's thread ends without touching the file
        spool._closed = True
        spool._room.notify_all()


def test_opening_does_not_scan_the_events(tmp_path, monkeypatch):
    """Opening costs the same whatever the spool holds: no COUNT or SUM over rows."""
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(100)])
    spool.close()
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(spool_mod.sqlite3, "connect", traced)
    again = open_spool(tmp_path)
    opened = list(statements)
    again.close()
    monkeypatch.undo()
    reading = [s for s in opened if "FROM batches" in s]
    assert reading, opened
    db = sqlite3.connect(tmp_path / "spool.sqlite3")
    plans = {s: [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + s)] for s in reading}
    db.close()
    assert not [s for s, plan in plans.items() if any("SCAN" in step for step in plan)], plans
    assert again.recovered == 100


def test_a_full_disk_refuses_the_whole_batch_and_keeps_the_spool_usable(tmp_path):
    errors = []
    spool = open_spool(tmp_path, on_error=lambda op, exc: errors.append(op))
    spool.append([event(n) for n in range(10)])
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolUnwritable):
        spool.append([event(n, size=2000) for n in range(10, 200)])
    assert errors == ["append"]
    assert (spool.pending, spool.last_seq, spool.has_room(), spool.unwritable) == (10, 10, False, True)
    assert [seq for seq, _ in spool.read(0, 1000)] == list(range(1, 11))
    # Room again: the same batch goes in, numbered right after what was there.
    spool._db.execute("PRAGMA max_page_count=1000000")
    assert spool.append([event(n) for n in range(10, 20)]) == 20
    assert spool.has_room() and not spool.unwritable
    spool.close()


def test_deleting_confirmed_rows_clears_the_full_state(tmp_path):
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(10)])
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolUnwritable):
        spool.append([event(n, size=4000) for n in range(100)])
    assert not spool.wait_for_room(0.01)
    spool.confirm(10)
    assert spool.wait_for_room(0.01) and spool.pending == 0
    spool.close()


class RefusingDeletes:
    """The spool's own connection on a disk that takes no DELETE: the WAL cannot grow."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args):
        if sql.startswith("DELETE"):
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_a_wedged_full_spool_is_rebuilt_even_when_no_checkpoint_is_due(tmp_path, monkeypatch):
    """The disk filled right after a checkpoint, so nothing was written since; every
    event is confirmed but no DELETE fits. Maintenance must still count that as failing
    and rebuild the files, or the stream stays unread for good (seen in
    tests/test_faults_stream.py under load)."""
    monkeypatch.setattr(spool_mod, "RETRY_EVERY", 0.05)
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(10)])
    deadline = time.monotonic() + 10
    while spool.last_checkpoint_at is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert spool.last_checkpoint_at is not None        # nothing written since it
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolUnwritable):
        spool.append([event(n, size=4000) for n in range(10, 100)])
    spool._db = RefusingDeletes(spool._db)
    spool.confirm(10)
    assert spool.unwritable                             # the confirm's own DELETE failed
    assert spool.wait_for_room(5), "the full spool was never rebuilt"
    assert spool.append([event(n) for n in range(10, 20)]) == 20
    assert [seq for seq, _ in spool.read(0, 100)] == list(range(11, 21))
    spool.close()


def test_a_full_spool_with_nothing_pending_is_rebuilt_when_an_append_is_refused(
        tmp_path, monkeypatch):
    """A bridge started on a full disk over a spool whose every event was confirmed
    (the last run drained it): no DELETE or checkpoint is due to fail, only the append
    is refused. That is wedged too, and only the rebuild makes room (seen in
    tests/test_faults_stream.py, after a stop on a full disk)."""
    monkeypatch.setattr(spool_mod, "RETRY_EVERY", 0.05)
    spool = open_spool(tmp_path)
    spool.append([event(n) for n in range(10)])
    spool.confirm(10)
    # The last run's maintenance is done: rows deleted, and checkpointed since.
    wait_for(lambda: spool._deleted == 10 and spool._written_since_checkpoint == 0, 10,
             what="the confirmed rows to be deleted and checkpointed")
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolUnwritable):
        spool.append([event(n, size=4000) for n in range(10, 100)])
    assert spool.pending == 0 and spool.unwritable
    assert spool.wait_for_room(5), "the full spool was never rebuilt"
    assert spool.append([event(n) for n in range(10, 20)]) == 20
    assert [seq for seq, _ in spool.read(0, 100)] == list(range(11, 21))
    spool.close()


class FailingCheckpoints:
    """A connection whose first checkpoints fail, as on a full or failing disk."""

    def __init__(self, db: sqlite3.Connection, failures: int, error: str, code: int) -> None:
        self._db, self.failures, self._error, self._code = db, failures, error, code

    def execute(self, sql: str, *args):
        if "wal_checkpoint" in sql and self.failures > 0:
            self.failures -= 1
            exc = sqlite3.OperationalError(self._error)
            exc.sqlite_errorcode = self._code
            raise exc
        return self._db.execute(sql, *args)

    def close(self) -> None:
        self._db.close()


@pytest.mark.parametrize("error, code, reported", [
    ("disk I/O error", sqlite3.SQLITE_IOERR_WRITE, "checkpoint: disk I/O error"),
    # A full disk is backpressure, handled: not a maintenance error for /livez.
    ("database or disk is full", sqlite3.SQLITE_FULL, None),
])
def test_checkpoint_errors_are_reported_and_retried_not_the_end_of_the_thread(
        tmp_path, monkeypatch, error, code, reported):
    real_connect = sqlite3.connect
    connections = []

    def connect(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        connections.append(db)
        # The first connection is the spool's own; the second the maintenance thread's.
        return db if len(connections) == 1 else FailingCheckpoints(db, 2, error, code)

    monkeypatch.setattr(spool_mod.sqlite3, "connect", connect)
    monkeypatch.setattr(spool_mod, "RETRY_EVERY", 0.3)  # the error lasts that long
    errors = []
    spool = open_spool(tmp_path, on_error=lambda op, exc: errors.append((op, str(exc))))
    spool.append([event(n) for n in range(10)])
    deadline = time.monotonic() + 10
    seen = set()
    while spool.last_checkpoint_at is None and time.monotonic() < deadline:
        seen.add(spool.maintenance_error)
        time.sleep(0.005)
    assert spool.last_checkpoint_at is not None and spool.maintenance_error is None
    assert seen - {None} == ({reported} if reported else set())
    assert errors == [("checkpoint", error)] * 2
    spool.close()


def test_the_wal_stays_bounded_under_a_steady_stream_of_small_appends(tmp_path, monkeypatch):
    """At a steady rate every frame is its own append, so appends run during every
    checkpoint; a checkpoint that never reaches the WAL's end never lets it restart,
    and the WAL grew by megabytes a second (found by `bench --soak`)."""
    monkeypatch.setattr(spool_mod, "WAL_RESTART_BYTES", 256 * 1024, raising=False)
    monkeypatch.setattr(spool_mod, "CHECKPOINT_EVERY", 0.02)
    monkeypatch.setattr(spool_mod, "CHECKPOINT_BURST_EVERY", 0.02)
    spool = open_spool(tmp_path)
    wal = tmp_path / "spool.sqlite3-wal"
    # 2,000 appends a second for 2.5 s, as a stream at that rate makes them: about
    # 75 MB of WAL if it never restarts.
    start, n, largest = time.monotonic(), 0, 0
    while (elapsed := time.monotonic() - start) < 2.5:
        if n > elapsed * 2000:
            time.sleep(0.0005)            # pacing, as the stream is paced by its input
            continue
        n += 1
        spool.append([event(n, size=400)])
        if n % 20 == 0:
            spool.confirm(n - 10)
            largest = max(largest, wal.stat().st_size)
    spool.close()
    assert n > 2000                       # enough appends to grow an unbounded WAL
    assert largest < 12 * 1024 * 1024, f"the WAL reached {largest} bytes after {n} appends"


def test_confirms_within_the_window_count_the_same_bytes_as_the_rows(tmp_path):
    """The window's running offsets and the rows' stored sizes agree, wherever a
    confirm falls: inside a row, on its edge, in or behind the window."""
    (tmp_path / "rows").mkdir()
    windowed = Spool(tmp_path / "spool.sqlite3", 1 << 30, window=50)
    from_rows = open_spool(tmp_path / "rows")
    for batch in range(10):
        events = [event(batch * 10 + n, size=n * 37) for n in range(10)]
        windowed.append(events)
        from_rows.append(events)
    assert windowed.bytes == from_rows.bytes
    for upto in (3, 4, 17, 45, 60, 99, 100):   # some in the window, some behind it
        windowed.confirm(upto)
        from_rows.confirm(upto)
        assert windowed.bytes == from_rows.bytes and windowed.pending == 100 - upto
    windowed.close()
    from_rows.close()


def test_a_confirmed_event_leaves_memory_at_once(tmp_path):
    """The window holds what the publisher has yet to read or may read again: the
    unconfirmed events. A window that kept the newest 8,192 events, confirmed or not,
    kept them in Python's youngest generation, and every collection of it walked them
    all, 14-23 ms with the GIL held at 2,000 events/s (`bench --soak`), a stall of the
    stream as long."""
    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)          # the default window
    spool.append([event(n) for n in range(100)])
    spool.confirm(60)
    held = sorted(int(json.loads(o.body)["n"]) for o in gc.get_objects()
                  if type(o) is Event and o.received_at >= 1000.0)
    assert held == list(range(60, 100))               # events 61 to 100: n 60 to 99
    assert [seq for seq, _ in spool.read(61, 100)] == list(range(61, 101))
    spool.append([event(n) for n in range(100, 110)])
    spool.confirm(110)
    assert not [o for o in gc.get_objects() if type(o) is Event and o.received_at >= 1000.0]
    assert spool.pending == 0 and spool.bytes == 0
    spool.close()


def test_a_backlog_reads_back_across_rows_of_every_size(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "BATCH_BYTES", 2000)     # big events get rows of their own
    spool = open_spool(tmp_path)
    sent = [event(n, size=(n * 389) % 3000) for n in range(200)]
    for start in range(0, 200, 37):
        spool.append(sent[start:start + 37])
    for limit in (1, 7, 64, 512):
        got, seq = [], 1
        while batch := spool.read(seq, limit):
            assert len(batch) <= limit
            got += batch
            seq = batch[-1][0] + 1
        assert [(s, ev.body) for s, ev in got] == [(n + 1, ev.body) for n, ev in enumerate(sent)]
    spool.close()


def test_the_publisher_reads_and_confirms_new_events_while_a_commit_runs(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)
    spool.append([event(n) for n in range(10)])
    seen = []

    def publisher():
        seen.extend(seq for seq, _ in spool.read(1, 100))
        spool.confirm(5)

    with spool._db_lock:                # what a slow commit holds
        reader = threading.Thread(target=publisher, daemon=True)
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "the publisher waited for the commit"
    assert seen == list(range(1, 11)) and spool.pending == 5
    spool.close()
