"""Unit tests of the sink's backpressure on a full disk: the batch in hand is kept.

A real spool; its disk is "full" by SQLite's own SQLITE_FULL (a capped page count).
"""

from __future__ import annotations

import threading
import time

import structlog

from bridge.metrics import Metrics
from bridge.sink import SpoolingSink
from bridge.spool import Spool
from tests.support.wait import wait_for


def frame(n: int) -> bytes:
    return b'{"type": "container", "action": "update", "n": %d, "pad": "%s"}' % (n, b"x" * 2000)


def test_a_full_disk_blocks_the_stream_keeps_the_batch_and_stores_it_when_room_returns(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)
    metrics = Metrics()
    spooled = []
    sink = SpoolingSink(spool, lambda: spooled.append(spool.last_seq), metrics,
                        structlog.get_logger(), max_frame_bytes=1 << 20, stream_url="ws://x")
    sink.frame(frame(0), False, 0, False, 1.0)
    sink.flush()
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    for n in range(1, 51):
        sink.frame(frame(n), False, 0, False, 1.0)
    flushing = threading.Thread(target=sink.flush, daemon=True)
    flushing.start()
    flushing.join(1.0)
    assert flushing.is_alive(), "the stream thread must wait, not drop or raise"
    assert metrics.registry.get_sample_value("tutum_bridge_backpressure") == 1 and spool.unwritable
    # Under the spool's own lock: the waiting sink retries its append on this
    # connection, and a PRAGMA between its BEGIN and COMMIT ends that transaction.
    with spool._db_lock:
        spool._db.execute("PRAGMA max_page_count=1000000")
    flushing.join(10)
    assert not flushing.is_alive()
    stored = [ev.body for _, ev in spool.read(1, 100)]
    assert stored == [frame(n) for n in range(51)]
    assert metrics.registry.get_sample_value("tutum_bridge_backpressure") == 0 and spooled[-1] == 51
    spool.close()


def sink_holding_50_on_a_full_disk(tmp_path) -> tuple[Spool, SpoolingSink]:
    """A sink with frames 1..50 in hand, over a spool whose disk takes nothing more and
    that holds frame 0 unconfirmed (so rebuilding its files cannot make room)."""
    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)
    sink = SpoolingSink(spool, lambda: None, Metrics(), structlog.get_logger(),
                        max_frame_bytes=1 << 20, stream_url="ws://x")
    sink.frame(frame(0), False, 0, False, 1.0)
    sink.flush()
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count={pages}")
    for n in range(1, 51):
        sink.frame(frame(n), False, 0, False, 1.0)
    return spool, sink


def test_on_stop_with_the_disk_still_full_the_sink_gives_up_at_the_deadline(tmp_path):
    spool, sink = sink_holding_50_on_a_full_disk(tmp_path)
    sink.stop(time.monotonic() + 0.2)
    sink.flush()                       # returns: the stop is not held hostage
    assert spool.pending == 1
    spool.close()


def test_on_stop_the_batch_in_hand_goes_in_when_room_comes_before_the_deadline(tmp_path):
    """Stopping is no reason to drop what was read: while the deadline lasts the sink
    keeps trying, as it does while running (the drain may be making room)."""
    spool, sink = sink_holding_50_on_a_full_disk(tmp_path)
    sink.stop(time.monotonic() + 30)
    flushing = threading.Thread(target=sink.flush, daemon=True)
    flushing.start()
    wait_for(lambda: spool.unwritable, 10, what="the append to be refused")
    assert flushing.is_alive()
    with spool._db_lock:
        spool._db.execute("PRAGMA max_page_count=1000000")
    flushing.join(10)
    assert not flushing.is_alive()
    assert [ev.body for _, ev in spool.read(1, 100)] == [frame(n) for n in range(51)]
    spool.close()


def test_a_deferring_sink_spools_frames_unclassified_and_classifies_them_for_the_publisher(
        tmp_path):
    """HA: what a replica spools is classified when published, with the same key,
    headers and quarantine (log line and metric) as on receipt; a handshake is dropped."""
    from structlog.testing import capture_logs

    from bridge.event import DEFERRED, classify

    spool = Spool(tmp_path / "spool.sqlite3", 1 << 30)
    metrics = Metrics()
    sink = SpoolingSink(spool, lambda: None, metrics, structlog.get_logger(),
                        max_frame_bytes=1 << 20, stream_url="ws://x", deferred=True)
    good, bad = frame(1), b'{"type": "container", "type": "service"}'
    for body in (b'{"type": "auth", "user": "u"}', good, bad):
        sink.frame(body, False, len(body), False, 5.0)
    sink.flush()
    spooled = [ev for _, ev in spool.read(1, 10)]
    assert [ev.routing_key for ev in spooled] == [DEFERRED, DEFERRED]
    assert metrics.registry.get_sample_value(
        "tutum_bridge_frames_quarantined_total", {"reason": "duplicate-keys"}) is None
    with capture_logs() as logs:
        published = [sink.resolve(ev) for ev in spooled]
    for body, ev in zip((good, bad), published):
        expected = classify(body, 5.0)
        assert (ev.routing_key, ev.headers, ev.quarantined) == (
            expected.routing_key, expected.headers, expected.quarantined)
    assert [entry["event"] for entry in logs] == ["frame.quarantined"]
    assert logs[0]["reason"] == "duplicate-keys"
    assert metrics.registry.get_sample_value(
        "tutum_bridge_frames_quarantined_total", {"reason": "duplicate-keys"}) == 1
    spool.close()
