"""The delivery guarantee (docs/contract.md section 4) under real faults, with real processes and sockets.

Each test runs the simulator with `--sequence`, binds a `#` queue on its own exchange
of a private RabbitMQ node (shared by the module; the broker on 5672 is never
touched), starts the bridge, breaks something -- the stream, the broker connection,
the broker itself, the bridge process -- and then settles the books: every sim_seq
the simulator handed to a live connection must be in the queue, in order, and any
duplicate must carry `x-republished`. The figures are printed (`pytest -s`) and
appended to `$FAULT_REPORT` when set.

Reproduce one: `FAULT_REPORT=/tmp/faults.jsonl /tmp/venv/bin/pytest -s tests/test_faults.py -k NAME`.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.fault_rig import Rig, assert_guarantee
from tests.support.ledger import compute
from tests.support.rabbit_node import extra_node, healthy_node  # noqa: F401 - fixtures
from tests.support.wait import wait_for

IN_FLIGHT_MAX = 50      # events on the wire at 400/s when a reader stops: a few at most


@pytest.fixture
def rig(request, healthy_node, topology, simulator, bridge, tmp_path):  # noqa: F811
    bench = Rig(request.node.name, healthy_node, topology, simulator, bridge, tmp_path)
    yield bench
    bench.close()


def test_stream_dropped_ten_times_loses_nothing(rig):
    """Upstream closes the websocket every 300 events: the bridge reconnects each time,
    says so with bridge.disconnected / bridge.connected (with the gap), and every event
    arrives once, in order."""
    sim = rig.simulator("--rate", "500", "--count", "3150", "--drop-every", "300")
    rig.bridge(sim)

    ledger = rig.settle(sim, 3150, timeout=60)

    assert_guarantee(ledger, duplicates_allowed=False)
    assert rig.stats(sim)["connections"] == 11
    connected = rig.collector.lifecycle("connected")
    disconnected = rig.collector.lifecycle("disconnected")
    assert len(connected) == 11, connected
    assert len(disconnected) == 10, disconnected
    assert connected[0]["gap"] is None
    for before, after in zip(disconnected, connected[1:]):
        gap = after["gap"]
        assert gap is not None, after
        assert gap["lost_at"] == before["lost_at"]
        assert gap["reconnected_at"] >= gap["lost_at"]
        assert gap["seconds"] == pytest.approx(gap["reconnected_at"] - gap["lost_at"], abs=0.01)


@pytest.mark.slow
def test_broker_closes_the_connection_three_times(rig):
    """`rabbitmqctl close_connection` on the bridge's connection, thrice, mid-stream:
    the unconfirmed window is republished (flagged), nothing lost, order kept."""
    sim = rig.simulator("--rate", "400", "--count", "6000")
    proc = rig.bridge(sim)

    for round_ in range(1, 4):
        rig.wait_sent(sim, round_ * 1300)
        pids = wait_for(rig.bridge_connection_pids, 20, 0.2, what="the bridge's connection")
        assert len(pids) == 1, pids
        rig.node.ctl("close_connection", pids[0], "fault test: close_connection")
        wait_for(lambda: (now := rig.bridge_connection_pids()) and now != pids, 30, 0.2,
                 what="the bridge to reconnect to the broker")

    ledger = rig.settle(sim, 6000)
    assert_guarantee(ledger)
    assert len(rig.log_events(proc, "broker.lost")) + len(
        rig.log_events(proc, "broker.channel_lost")) >= 3


@pytest.mark.slow
def test_broker_unreachable_for_30_seconds(rig):
    """The broker vanishes for 30 s (every packet refused) while the stream keeps
    coming: the bridge keeps reading into its spool and drains the backlog after."""
    sim = rig.simulator("--rate", "300", "--count", "12000")
    proxy = rig.broker_proxy()
    proc = rig.bridge(sim, via=proxy)
    rig.wait_delivered(600)

    proxy.pause()
    outage_start, sent_at_start = time.monotonic(), rig.sent(sim)
    rig.wait_log(proc, "broker.lost", 15)
    while time.monotonic() - outage_start < 30:
        assert proc.popen.poll() is None, proc.stderr[-3000:]
        time.sleep(0.5)     # the outage's length is the fault itself, not a synchronisation
    read_during_outage = rig.sent(sim) - sent_at_start
    proxy.resume()

    ledger = rig.settle(sim, 12000, timeout=90, read_during_outage=read_during_outage)
    assert_guarantee(ledger)
    assert read_during_outage > 5000, "the stream must keep flowing while the broker is away"


@pytest.mark.slow
def test_broker_killed_and_restarted_on_the_same_data(rig):
    """The broker crashes (SIGKILL) mid-stream and comes back on its data: what it
    confirmed was on disk, what it had not confirmed is republished; the stream
    goes on into the spool meanwhile."""
    sim = rig.simulator("--rate", "400", "--count", "8000")
    proc = rig.bridge(sim)
    rig.wait_delivered(1000)

    rig.node.kill()
    rig.wait_log(proc, "broker.lost", 15)
    rig.wait_sent(sim, rig.sent(sim) + 800)
    rig.node.start()

    ledger = rig.settle(sim, 8000, broker_restart_seconds=round(rig.node.startup_seconds, 1))
    assert_guarantee(ledger)


@pytest.mark.slow
def test_broker_endpoint_that_accepts_then_resets(rig):
    """What a load balancer or Docker's userland proxy does in front of a dead broker:
    the TCP connection is accepted, then reset. 200 such attempts in a row (a short
    backoff cap makes them quick) must leave the bridge publishing once the broker is
    back. (pika raises out of its IOLoop on about 1 attempt in 60 here, when the reset
    beats its getpeername().)"""
    sim = rig.simulator("--rate", "400", "--count", "5000")
    proxy = rig.broker_proxy()
    proc = rig.bridge(sim, via=proxy, BRIDGE_RECONNECT_MAX="0.05")
    rig.wait_delivered(400)

    proxy.pause("reset")
    rig.wait_log(proc, "broker.lost", 15)
    attempts_before = len(rig.log_events(proc, "broker.connecting"))
    deadline = time.monotonic() + 60
    while proxy.stats.refused < 200:
        rig.check_bridge()
        assert time.monotonic() < deadline, (
            f"the bridge stopped reconnecting after {proxy.stats.refused} attempts:\n"
            + proc.stderr[proc.stderr.find("Exception in thread"):][:1500])
        time.sleep(0.1)
    proxy.resume()

    ledger = rig.settle(sim, 5000, reset_attempts=proxy.stats.refused)
    assert_guarantee(ledger)
    assert len(rig.log_events(proc, "broker.connecting")) > attempts_before


@pytest.mark.slow
def test_kill_9_during_outage_then_restart_delivers_everything(rig):
    """SIGKILL while the broker is unreachable and 1,600 events wait in the spool; a new
    bridge on the same spool delivers them, then continues the stream."""
    # The stall makes the stream quiet at the moment of the kill, so "received" is
    # exactly "sent": events still in kernel buffers would be lost by the kill
    # whoever the bridge is, and would blur what this test is about.
    sim = rig.simulator("--rate", "400", "--count", "3000",
                        "--stall-after", "2000", "--stall-seconds", "120")
    proxy = rig.broker_proxy()
    first = rig.bridge(sim, via=proxy, BRIDGE_PING_INTERVAL="60")
    rig.wait_delivered(400)

    proxy.pause()
    rig.wait_sent(sim, 2000)
    received = 'kind="event"'

    def spooled_everything():
        n = rig.metric(first, "tutum_bridge_frames_received_total", received)
        time.sleep(0.3)
        return n >= 2000 and n == rig.metric(first, "tutum_bridge_frames_received_total",
                                              received)
    wait_for(spooled_everything, 20, what="the bridge to spool all 2000 events")
    first.popen.kill()
    assert first.wait(10) == -signal.SIGKILL
    undelivered = 2000 - len({m.seq for m in rig.collector.messages if m.seq})

    proxy.resume()
    second = rig.bridge(sim, name="bridge2")
    recovered = rig.wait_log(second, "spool.recovered", 20)

    ledger = rig.settle(sim, 3000, undelivered_at_kill=undelivered,
                        recovered=recovered.get("events"))
    assert_guarantee(ledger)
    assert undelivered >= 1000
    assert recovered["events"] >= undelivered


@pytest.mark.slow
def test_memory_alarm_blocks_then_everything_flows(rig):
    """A memory alarm on the broker blocks publishing: the bridge says it is blocked,
    keeps reading into the spool, and publishes everything once the alarm clears."""
    sim = rig.simulator("--rate", "400", "--count", "6000")
    proc = rig.bridge(sim)
    rig.wait_delivered(800)

    rig.node.memory_alarm(True)
    rig.wait_log(proc, "broker.blocked", 20)
    blocked_at = rig.sent(sim)
    rig.wait_sent(sim, blocked_at + 1200)
    held_back = rig.sent(sim) - len(rig.collector.messages)
    rig.node.memory_alarm(False)
    rig.wait_log(proc, "broker.unblocked", 20)

    ledger = rig.settle(sim, 6000, held_back_while_blocked=held_back)
    assert_guarantee(ledger)
    assert held_back >= 1000, "the broker should have held publishing back"


@pytest.mark.slow
def test_spool_full_stops_reading_memory_bounded(rig):
    """The broker is away and the spool (200 kB) fills: the bridge stops reading the
    stream (backpressure: the simulator cannot send), its memory stays flat, and when
    the broker returns every event is delivered."""
    sim = rig.simulator("--rate", "1500", "--count", "20000")
    proxy = rig.broker_proxy()
    proc = rig.bridge(sim, via=proxy, BRIDGE_SPOOL_MAX_BYTES="200KB")
    rig.wait_delivered(1000)
    rss_before = rig.rss(proc)

    proxy.pause()
    rig.wait_log(proc, "spool.full", 30)
    peak = rig.rss(proc)

    def plateau():
        nonlocal peak
        first = rig.sent(sim)
        for _ in range(10):
            time.sleep(0.3)
            peak = max(peak, rig.rss(proc))
        return rig.sent(sim) == first and first
    stuck_at = wait_for(plateau, 40, what="the simulator to be unable to send")
    assert stuck_at < 20000
    assert rig.metric(proc, "tutum_bridge_backpressure") == 1
    proxy.resume()
    rig.wait_log(proc, "spool.resumed", 30)

    full = rig.log_events(proc, "spool.full")
    ledger = rig.settle(sim, 20000, timeout=120, stuck_at=stuck_at,
                        rss_growth_mb=round((peak - rss_before) / 2**20, 1),
                        spool_peak_bytes=max(e["bytes"] for e in full),
                        spool_full_logged=len(rig.log_events(proc, "spool.full")))
    assert_guarantee(ledger)
    assert peak - rss_before < 50 * 2**20, f"RSS grew {(peak - rss_before) >> 20} MiB"
    # Over the limit by at most the batch in hand when it filled up.
    assert max(e["bytes"] for e in full) <= 200_000 + 2**20


def test_sigterm_under_load_exits_cleanly_with_a_gapless_prefix(rig):
    """SIGTERM mid-stream: exit 0 within the shutdown timeout, and what reached the
    broker is exactly sim_seq 1..k: no hole, nothing reordered."""
    sim = rig.simulator("--rate", "500", "--count", "100000")
    proc = rig.bridge(sim, BRIDGE_SHUTDOWN_TIMEOUT="5")
    rig.wait_delivered(1500)

    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait(30)
    took = time.monotonic() - began
    stopped = rig.log_events(proc, "bridge.stopped")
    rig.collector.wait(0, timeout=10, settle=1.0)
    sent = rig.sent(sim)
    ledger = compute(rig.test, sent, list(rig.collector.messages), exit_seconds=round(took, 2),
                     left_in_spool=stopped[0].get("left_in_spool") if stopped else None).report()

    assert code == 0, proc.stderr[-3000:]
    assert took <= 5 + 3
    assert stopped, "bridge.stopped must be logged"
    assert ledger.distinct == ledger.max_prefix, ledger.summary()
    assert ledger.out_of_order == 0 and ledger.unexplained_duplicates == 0, ledger.summary()
    if stopped[0].get("left_in_spool") == 0:
        assert sent - ledger.max_prefix < 2000, "more unread than kernel buffers can hold"


def test_sigterm_while_broker_unreachable_exits_in_time_and_keeps_the_rest(rig):
    """SIGTERM when nothing can be confirmed: exit 0 once BRIDGE_SHUTDOWN_TIMEOUT is
    spent, not later, with the unconfirmed events in the spool; the next run on the
    same spool delivers them before anything new."""
    sim = rig.simulator("--rate", "400", "--count", "3000")
    proxy = rig.broker_proxy()
    first = rig.bridge(sim, via=proxy, BRIDGE_SHUTDOWN_TIMEOUT="3")
    rig.wait_delivered(400)
    proxy.pause()
    rig.wait_log(first, "broker.lost", 15)
    rig.wait_sent(sim, rig.sent(sim) + 400)

    began = time.monotonic()
    first.signal(signal.SIGTERM)
    code = first.wait(30)
    took = time.monotonic() - began
    left = rig.log_events(first, "bridge.stopped")[0]["left_in_spool"]
    first_sent = wait_for(lambda: rig.session_counts(sim).get(1), 20,
                          what="the simulator to see the first connection close")
    proxy.resume()
    second = rig.bridge(sim, name="bridge2")
    # Frames on the wire when the bridge stopped reading are gone with its socket:
    # at most a short tail of the first connection.
    in_flight = frozenset(range(first_sent - IN_FLIGHT_MAX + 1, first_sent + 1))
    ledger = rig.settle(sim, 3000, exit_seconds=round(took, 2), left_in_spool=left,
                        allow_missing=in_flight)

    assert code == 0, first.stderr[-3000:]
    assert 3 - 0.5 <= took <= 3 + 3, f"took {took:.1f}s with BRIDGE_SHUTDOWN_TIMEOUT=3"
    assert left >= 400
    assert rig.log_events(second, "spool.recovered")[0]["events"] == left
    assert_guarantee(ledger, lost_allowed=in_flight, missing=rig.missing(ledger))


def test_half_open_stream_is_detected_and_replaced(rig):
    """The stream's link goes silent without closing (a half-open TCP connection): with
    a 1 s ping interval and 1 s pong timeout the bridge notices within ~2 s, reconnects,
    and announces the gap. Events the simulator wrote into the dead link are lost by
    the network; every other one is delivered."""
    sim = rig.simulator("--rate", "400", "--count", "4000")
    link = rig.proxy(sim.info["port"])
    proc = rig.bridge(sim, TUTUM_STREAM_HOST=link.url("ws"),
                      BRIDGE_PING_INTERVAL="1", BRIDGE_PING_TIMEOUT="1")
    rig.wait_delivered(800)

    delivered_before = max(m.seq for m in rig.collector.messages if m.seq)
    began = time.monotonic()
    link.blackhole()
    rig.wait_log(proc, "stream.lost", 10)
    detected_after = time.monotonic() - began
    link.resume()

    counts = wait_for(lambda: (c := rig.session_counts(sim)).get(1) and c, 20,
                      what="the simulator to close the black-holed connection")
    on_dead_link = counts[1]
    # Written into the dead link by the simulator, never forwarded: lost by the network.
    dead_link = frozenset(range(delivered_before + 1, on_dead_link + 1))
    ledger = rig.settle(sim, 4000, detected_after=round(detected_after, 2),
                        first_connection_sent=on_dead_link, allow_missing=dead_link)
    assert_guarantee(ledger, lost_allowed=dead_link, missing=rig.missing(ledger))
    assert detected_after < 1 + 1 + 1.5
    connected = rig.collector.lifecycle("connected")
    assert len(connected) >= 2 and connected[1]["gap"] is not None
    assert rig.collector.lifecycle("disconnected")
