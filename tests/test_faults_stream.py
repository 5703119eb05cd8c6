"""The delivery guarantee (docs/contract.md section 4) under the stream-side faults of issue 8.

Same bench and books as tests/test_faults.py: a private RabbitMQ node, the simulator
with `--sequence`, the real bridge, and a ledger at the end (`pytest -s` prints it).
Here the faults are on the bridge's own side: the spool's filesystem fills up for
real (a small tmpfs, mounted by the test as root); and on the stream's, from the
hostile server (tests/support/hostile_server.py) numbering its events with `sim_seq`
as the simulator does: a fragment bomb, a dead-slow drip, SIGTERM during connect.

Reproduce one: `FAULT_REPORT=/tmp/faults.jsonl .venv/bin/python -m pytest -s tests/test_faults_stream.py -k NAME`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.support import broker
from tests.support.fault_rig import Rig, assert_guarantee
from tests.support.hostile_server import CONTINUATION, Frame, HostileServer, Raw, Script, Dribbled
from tests.support.hostile_server import frame_header
from tests.support.ledger import Collector, compute
from tests.support.wait import wait_for
from tests.test_faults import rig  # noqa: F401 - the fixture
from tests.support.rabbit_node import extra_node, healthy_node  # noqa: F401 - fixtures of rig

SMALL_FS = "1m"


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of SMALL_FS for the spool, unmounted at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazy: a bridge that failed to stop must not leave the mount behind.
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def spooled_when_stuck(rig, proc) -> float:  # noqa: F811
    """The events the bridge had spooled once it stopped taking more (a full disk)."""
    def received():
        return rig.metric(proc, "tutum_bridge_frames_received_total", 'kind="event"')

    def plateau():
        before = received()
        time.sleep(1.0)     # a second without a single event spooled: the reader stopped
        return received() == before and before
    return wait_for(plateau, 30, 0, what="the bridge to stop taking events")


def test_the_spools_filesystem_fills_up_and_nothing_is_lost(small_fs, rig):  # noqa: F811
    """The broker is away and the spool's 1 MB filesystem fills (ENOSPC long before the
    2 GiB BRIDGE_SPOOL_MAX_BYTES): the bridge keeps the batch it had read, stops
    reading the stream, says so (log and metrics), and stays up; when the broker is
    back it drains, the full database is replaced by an empty one, reading resumes,
    and every event arrives in order."""
    sim = rig.simulator("--rate", "3000", "--count", "9000")
    proxy = rig.broker_proxy()
    proc = rig.bridge(sim, via=proxy, BRIDGE_SPOOL=str(small_fs / "spool.sqlite3"))
    rig.wait_delivered(300)

    proxy.pause()
    full = rig.wait_log(proc, "spool.disk_full", 60)
    assert "full" in full["error"]

    stuck_at = spooled_when_stuck(rig, proc)
    assert stuck_at < 9000
    assert rig.metric(proc, "tutum_bridge_spool_unwritable") == 1
    assert rig.metric(proc, "tutum_bridge_backpressure") == 1
    assert rig.metric(proc, "tutum_bridge_spool_errors_total", 'operation="append"') >= 1
    proxy.resume()
    rig.wait_log(proc, "spool.resumed", 60)

    ledger = rig.settle(sim, 9000, timeout=90, stuck_at=stuck_at,
                        spool_errors=sorted({e["operation"] for e in
                                             rig.log_events(proc, "spool.error")}))
    assert_guarantee(ledger)
    rig.check_bridge()
    assert rig.metric(proc, "tutum_bridge_spool_unwritable") == 0


BROKER_BACK_AFTER = 4.0     # seconds into the stop: past the sink's old 3-s grace


def test_sigterm_while_the_spools_disk_is_full_loses_nothing(small_fs, rig):  # noqa: F811
    """SIGTERM while the broker is away and the spool's filesystem is full, the broker
    back 4 s into the stop (BRIDGE_SHUTDOWN_TIMEOUT=30). The batch the sink holds
    waits for room as long as the stop allows, while the publisher empties the spool
    and the spool rebuilds its files; the time the sink held the reader does not count
    against the close handshake, so the reader still takes every frame the server sent
    before its Close; and the next run on that filesystem (full again, every event
    confirmed) rebuilds its spool too. Every event arrives, in order."""
    sim = rig.simulator("--rate", "3000", "--count", "9000")
    proxy = rig.broker_proxy()
    spool = str(small_fs / "spool.sqlite3")
    first = rig.bridge(sim, via=proxy, BRIDGE_SPOOL=spool, BRIDGE_SHUTDOWN_TIMEOUT="30")
    rig.wait_delivered(300)
    proxy.pause()
    rig.wait_log(first, "spool.disk_full", 60)

    # Stored: the bridge.connected event and the simulator's events up to `stored`.
    stored = int(spooled_when_stuck(rig, first)) - 1
    # The rest of the stream is in flight: sent, in buffers on either side, not read.
    rig.wait_sent(sim, 9000)

    began = time.monotonic()
    first.signal(signal.SIGTERM)
    time.sleep(BROKER_BACK_AFTER)       # the fault's length, not a wait for a condition
    proxy.resume()
    code = first.wait(60)
    took = time.monotonic() - began
    left = rig.log_events(first, "bridge.stopped")[0]["left_in_spool"]
    first_sent = wait_for(lambda: rig.session_counts(sim).get(1), 20,
                          what="the simulator to see the first connection close")
    rig.bridge(sim, name="bridge2", BRIDGE_SPOOL=spool)
    ledger = rig.settle(sim, 9000, exit_seconds=round(took, 2), left_in_spool=left,
                        stored_before_stop=stored, first_connection_sent=first_sent)

    assert code == 0, first.stderr[-3000:]
    assert took <= 30 + 3
    assert rig.log_events(first, "spool.batch_dropped") == []
    assert_guarantee(ledger)


# --- the stream's side, from the hostile server ---------------------------------------

def numbered(first: int, last: int) -> list[Frame]:
    return [Frame(json.dumps({"type": "container", "action": "update", "sim_seq": n}).encode(),
                  label=f"#{n}") for n in range(first, last + 1)]


@pytest.fixture
def books(request, topology):
    """A `#` queue on this test's exchange, collected from the start."""
    collector = Collector(broker.AMQP_URL, topology.bind("#")).start()
    yield collector
    collector.stop()


def settle(request, books: Collector, sent: int, **extra):
    books.wait(sent, 30, settle=0.5)
    return compute(request.node.name, sent, list(books.messages), **extra).report()


def hostile_bridge(bridge, server: HostileServer, **env: str):
    return bridge(server, TUTUM_STREAM_URL=f"{server.url}/v1/events",
                  BRIDGE_METRICS_ADDR="127.0.0.1:0", **env)


def test_a_fragment_bomb_is_reassembled_without_recursion(request, books, bridge):
    """A legal message in 1 + 3,000 continuation frames, all but the first empty
    (about 6 KB on the wire), between valid events: it is one valid event, and
    the bridge is still there for what follows."""
    bomb = json.dumps({"type": "container", "action": "update", "sim_seq": 101}).encode()
    wire = frame_header(1, len(bomb), fin=False) + bomb
    wire += frame_header(CONTINUATION, 0, fin=False) * 2999 + frame_header(CONTINUATION, 0)
    steps = numbered(1, 100) + [Raw(wire, label="fragment bomb")] + numbered(102, 200)
    with HostileServer([Script(steps)]) as server:
        proc = hostile_bridge(bridge, server)
        ledger = settle(request, books, 200)
        assert proc.popen.poll() is None, proc.stderr[-3000:]
    assert_guarantee(ledger, duplicates_allowed=False)
    assert books.lifecycle("disconnected") == []


def test_a_dead_slow_drip_is_pinged_and_replaced(request, books, bridge):
    """After 50 events the server drips a frame a byte every 0.4 s. The read deadline
    is absolute, so the 1 s ping is sent on time; its pong is stuck behind the
    drip, so after 1 s more the connection is replaced, and the next connection's
    events all arrive. (The dripped frame never completed: no event to lose.)"""
    drip = Dribbled(b'{"type":"drip"}' * 4, cuts=tuple(range(1, 60)), pause=0.4, label="drip")
    scripts = [Script(numbered(1, 50) + [drip]), Script(numbered(51, 100))]
    with HostileServer(scripts) as server:
        proc = hostile_bridge(bridge, server, BRIDGE_PING_INTERVAL="1", BRIDGE_PING_TIMEOUT="1")
        began = time.monotonic()
        server.wait_connections(2, timeout=15)
        replaced_after = time.monotonic() - began
        ledger = settle(request, books, 100, replaced_after=round(replaced_after, 1))
        assert proc.popen.poll() is None, proc.stderr[-3000:]
    assert_guarantee(ledger, duplicates_allowed=False)
    assert replaced_after < 10, "the drip must not keep the dead-slow connection alive"
    assert server.connections[0].received and server.connections[0].received[0][0] == 9  # ping
    assert len(books.lifecycle("connected")) == 2


@pytest.mark.parametrize("stage", ["connecting", "authenticating"])
def test_sigterm_during_connect_stops_at_once_without_a_connection(request, books, bridge,
                                                                    stage):
    """The first connection delivers 50 events and drops; the second hangs, in the
    HTTP handshake (CONNECTING) or before the auth frame (AUTHENTICATING). SIGTERM
    then: exit 0 within 2.5 s, everything delivered, and no bridge.connected for the
    connection that never was (nor its bridge.disconnected)."""
    hanging = (Script(handshake_delay=30) if stage == "connecting"
               else Script(auth=False))
    with HostileServer([Script(numbered(1, 50), then="drop"), hanging]) as server:
        proc = hostile_bridge(bridge, server)
        server.wait_connections(2, timeout=15)
        books.wait(50, 20, settle=0)
        time.sleep(0.3)     # into the hanging attempt; it lasts 15-30 s
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(20)
        took = time.monotonic() - began
        ledger = settle(request, books, 50, exit_seconds=round(took, 2))
    assert code == 0, proc.stderr[-3000:]
    assert took < 2.5, f"took {took:.1f}s to stop while {stage}"
    assert_guarantee(ledger, duplicates_allowed=False)
    assert len(books.lifecycle("connected")) == 1
    assert len(books.lifecycle("disconnected")) == 1
    assert not any(line.get("event") == "stream.authenticated"
                   for line in Rig.log(proc)[-5:]), "authenticated after the stop"
