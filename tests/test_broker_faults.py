"""The broker side of docs/contract.md section 4 under real faults: a link that goes silent,
a queue that refuses, a broker that refuses us after we ran, a message it never takes.

Each test runs the simulator with `--sequence`, binds a `#` queue on its own exchange
of a private RabbitMQ node (shared by the module), starts the bridge, breaks something,
and settles the books as tests/test_faults.py does: the ledger (sent, delivered,
distinct, duplicates, out of order, lost) is printed (`pytest -s`) and appended to
`$FAULT_REPORT` when set; every test asserts nothing lost and the bridge alive.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest

from bridge import topology as topo
from bridge.dead_letters import path_beside
from tests.support import broker, procs
from tests.support.fault_rig import Rig, assert_guarantee
from tests.support.ledger import Collector, compute
from tests.support.rabbit_node import extra_node, healthy_node  # noqa: F401 - fixtures
from tests.support.wait import wait_for

SILENCE_BOUND = 30.0        # docs/contract.md section 4: publishing again within 30 s


@pytest.fixture
def rig(request, healthy_node, topology, simulator, bridge, tmp_path):  # noqa: F811
    bench = Rig(request.node.name, healthy_node, topology, simulator, bridge, tmp_path)
    yield bench
    bench.close()


def publishing_again_after(rig: Rig, proc, fault) -> float:
    """Seconds from `fault()` until the bridge is ready on another connection."""
    before = len(rig.log_events(proc, "broker.ready"))
    began = time.monotonic()
    fault()
    rig.wait_log(proc, "broker.ready", timeout=SILENCE_BOUND + 15, count=before + 1)
    return time.monotonic() - began


def test_a_broker_link_that_goes_silent_is_dropped_for_the_next_url(rig):
    """The first URL's link stops carrying bytes without closing (a proxy that
    freezes): with the default heartbeat, the bridge drops it and publishes through
    the second URL within 30 s."""
    proxy = rig.broker_proxy()
    sim = rig.simulator("--rate", "200", "--count", "3000")
    proc = rig.bridge(sim, AMQP_URL=f"{rig.amqp_url(proxy)},{rig.node.url}")
    rig.wait_delivered(200)

    took = publishing_again_after(rig, proc, proxy.blackhole)

    ledger = rig.settle(sim, 3000, timeout=60, recovered_in=round(took, 1))
    assert_guarantee(ledger)
    assert took < SILENCE_BOUND, took
    assert rig.log_events(proc, "broker.silent")
    assert proc.popen.poll() is None


def test_a_broker_stopped_with_sigstop_is_dropped_for_the_next_url(rig, topology):
    """The first broker's process is stopped (SIGSTOP: its sockets stay open, nothing
    answers). The bridge moves to the second broker within the heartbeat (4 s here,
    to keep the test short; the default's bound is the test above); the events are
    in the first broker's queue, then the second's."""
    other = topology.bind("#")                    # the same names on the shared broker
    sim = rig.simulator("--rate", "200", "--count", "2000")
    proc = rig.bridge(sim, AMQP_URL=f"{rig.node.url},{broker.AMQP_URL}",
                      BRIDGE_AMQP_HEARTBEAT="4")
    rig.wait_delivered(200)
    beam = int(rig.node.pid_file.read_text().strip())
    try:
        with Collector(broker.AMQP_URL, other) as second:
            took = publishing_again_after(rig, proc, lambda: os.kill(beam, signal.SIGSTOP))
            rig.wait_sent(sim, 2000, timeout=60)
            sent = rig.sent(sim)
            wait_for(lambda: {m.seq for m in rig.collector.messages + second.messages}
                     >= set(range(1, sent + 1)), 60, what="every event on one broker or the other")
    finally:
        os.kill(beam, signal.SIGCONT)
    ledger = compute(rig.test, sent, list(rig.collector.messages) + list(second.messages),
                     recovered_in=round(took, 1)).report()
    assert_guarantee(ledger)
    assert took < 4 + 6, took
    assert proc.popen.poll() is None


def test_a_full_reject_publish_queue_next_to_a_healthy_one_costs_a_copy_per_retry(rig):
    """A queue with `x-overflow: reject-publish` that is full makes the broker nack
    every event, while the healthy `#` queue takes each copy. The issue measured 32
    events -> 2,368 copies and 74 reconnects in 10 s; now the channel stays open and
    each retry, backed off, is one event. Once the full queue goes, all arrive."""
    full = rig.topology.bind("#", url=rig.node.url,
                             arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    sim = rig.simulator("--rate", "0", "--count", "32")
    proc = rig.bridge(sim)
    rig.wait_log(proc, "broker.nack")
    began = time.monotonic()
    wait_for(lambda: time.monotonic() - began > 6, 10, what="six seconds of nacks")
    copies = len(rig.collector.messages)      # the bridge's own events included
    nacks = rig.metric(proc, "tutum_bridge_nacks_total")
    with broker.connect(rig.node.url) as conn:
        conn.channel().queue_delete(full)
    wait_for(lambda: rig.metric(proc, "tutum_bridge_spool_events") == 0, 30,
             what="every event confirmed")

    ledger = rig.settle(sim, 32, timeout=60, copies_in_6s=copies, nacks=int(nacks))
    assert_guarantee(ledger)
    # The first copies of the 32 events and 2 of the bridge's, then one per retry.
    assert copies <= 34 + 12, copies
    assert len(rig.log_events(proc, "broker.ready")) == 1        # no reconnect
    last = {m.seq: i for i, m in enumerate(rig.collector.messages) if m.seq is not None}
    assert sorted(last, key=last.get) == list(range(1, 33))      # last copies in order
    assert proc.popen.poll() is None


def test_an_exchange_recreated_with_another_type_after_start_is_retried_not_exit_4(rig):
    """After the bridge has run, a 406 on re-declaring (the exchange re-created as
    `direct` while the link was down) is logged and retried with backoff: the
    stream is still read into the spool, and once the exchange is fixed, all arrive."""
    proxy = rig.broker_proxy()
    sim = rig.simulator("--rate", "100", "--count", "1000")
    proc = rig.bridge(sim, via=proxy)
    rig.wait_delivered(100)
    spec = rig.topology.spec.with_queues(topo.QueueSpec(rig.queue, ((rig.topology.exchange, "#"),)))

    proxy.pause("refuse")
    with broker.connect(rig.node.url) as conn:
        ch = conn.channel()
        ch.exchange_delete(rig.topology.exchange)
        ch.exchange_declare(rig.topology.exchange, "direct", durable=True)
    proxy.resume()
    rig.wait_log(proc, "broker.refused", count=2)
    assert proc.popen.poll() is None
    proxy.pause("refuse")
    with broker.connect(rig.node.url) as conn:
        ch = conn.channel()
        ch.exchange_delete(rig.topology.exchange)
        topo.declare(ch, spec.steps())
    proxy.resume()

    ledger = rig.settle(sim, 1000, timeout=60)
    assert_guarantee(ledger)
    refused = rig.log_events(proc, "broker.refused")[0]
    assert refused["level"] == "error" and rig.topology.exchange in refused["step"]
    assert proc.popen.poll() is None


def test_a_rotated_password_file_is_read_at_the_next_reconnect(rig, tmp_path):
    """The broker's password changes and the bridge's connection is closed: it is
    refused (logged, retried, not exit 4) until AMQP_PASSWORD_FILE holds the new one,
    which it reads at the next attempt. The passwords never reach the log."""
    user, old, new = f"t-rotate-{os.getpid()}", "Old-pw-5e1d", "New-pw-9a7c"
    rig.node.ctl("add_user", user, old)
    rig.node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    secret = tmp_path / "amqp-password"
    secret.write_text(old + "\n")
    try:
        sim = rig.simulator("--rate", "100", "--count", "1000")
        proc = rig.bridge(sim, AMQP_URL=f"amqp://{user}@127.0.0.1:{rig.node.port}/%2F",
                          AMQP_PASSWORD_FILE=str(secret))
        rig.wait_delivered(100)
        rig.node.ctl("change_password", user, new)
        for pid in rig.bridge_connection_pids():
            rig.node.ctl("close_connection", pid, "password rotated")
        rig.wait_log(proc, "broker.refused", count=2)
        assert proc.popen.poll() is None
        secret.write_text(new + "\n")

        ledger = rig.settle(sim, 1000, timeout=60)
        assert_guarantee(ledger)
        assert old not in proc.stderr and new not in proc.stderr
    finally:
        for b in rig.bridges:
            b.stop(timeout=20)
        rig.node.ctl("delete_user", user)


def test_a_message_above_max_message_size_is_set_aside_and_the_rest_go_on(rig, tmp_path):
    """One event is larger than the broker's max_message_size: the broker closes the
    channel on it, every time. After a bounded number of attempts it is set aside in
    the dead letters, whole, counted and logged, and every event behind it arrives."""
    max_message_size(rig, SMALL_MAX)
    try:
        sim = simulator_with_one_oversize(rig, tmp_path, count=60, big=20)
        proc = rig.bridge(sim)
        ledger = rig.settle(sim, 60, timeout=60, allow_missing=frozenset({20}), set_aside=1)
    finally:
        max_message_size(rig, DEFAULT_MAX)
    set_aside = rig.wait_log(proc, "broker.set_aside")
    assert rig.metric(proc, "tutum_bridge_events_set_aside_total") == 1
    assert proc.popen.poll() is None
    assert proc.stop() == 0
    with sqlite3.connect(path_beside(tmp_path / "spool.sqlite3")) as db:
        (body, reason), = db.execute("SELECT body, reason FROM dead_letters").fetchall()
    assert json.loads(body)["sim_seq"] == 20 and "max size" in reason
    assert "message size" in set_aside["reason"]
    assert ledger.lost == 1 and rig.missing(ledger) == {20}, ledger.summary()
    assert ledger.out_of_order == 0 and ledger.unexplained_duplicates == 0, ledger.summary()


def test_dead_letters_replay_publishes_what_the_broker_now_takes_and_keeps_the_rest(rig, tmp_path):
    """The operator's way out of a set-aside event (README, Runbook): `list` shows it;
    `replay` while the broker still refuses it keeps it and says so (exit 1); once
    max_message_size is raised, `replay` publishes it as the bridge would have, with
    `x-republished`, and removes it. The bridge runs all along."""
    max_message_size(rig, SMALL_MAX)
    try:
        sim = simulator_with_one_oversize(rig, tmp_path, count=10, big=5)
        proc = rig.bridge(sim)
        rig.settle(sim, 10, timeout=60, allow_missing=frozenset({5}))
        rig.wait_log(proc, "broker.set_aside")

        (listed,) = [json.loads(line) for line in tool(rig, tmp_path, "list", "--json")[1]]
        assert (listed["routing_key"], listed["headers"]["type"]) == ("container.update",
                                                                      "container")
        assert listed["bytes"] > 20000 and "max size" in listed["reason"]

        code, out, err = tool(rig, tmp_path, "replay")
        assert code == 1 and out == [], (out, err)
        assert len(err) == 1 and "0 of 1 replayed" in err[0] and "still refuses" in err[0], err
    finally:
        max_message_size(rig, DEFAULT_MAX)
    code, out, err = tool(rig, tmp_path, "replay")
    assert code == 0 and out == [f"replayed seq={listed['seq']} message_id="
                                 f"{listed['message_id']} routing_key=container.update"], err
    rig.wait_delivered(10)
    (copy,) = [m for m in rig.collector.messages if m.seq == 5]
    assert copy.message_id == listed["message_id"] and copy.republished
    assert copy.routing_key == "container.update" and copy.headers["type"] == "container"
    assert tool(rig, tmp_path, "list", "--json")[1] == []
    assert proc.popen.poll() is None


SMALL_MAX, DEFAULT_MAX = 8192, 134217728      # the broker's max_message_size, bytes


def max_message_size(rig: Rig, size: int) -> None:
    rig.node.ctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")


def simulator_with_one_oversize(rig: Rig, tmp_path, count: int, big: int):
    """The simulator replaying `count` sequenced events, of which `big` is over 20 KB."""
    lines = [json.dumps({"type": "container", "action": "update", "sim_seq": n,
                         "resource_uri": f"/api/v1/container/{n}/",
                         **({"padding": "x" * 20000} if n == big else {})})
             for n in range(1, count + 1)]
    replay = tmp_path / "events.jsonl"
    replay.write_text("\n".join(lines) + "\n")
    return rig._start_simulator("--replay", str(replay), "--rate", "50")


def tool(rig: Rig, tmp_path, *args: str) -> tuple[int, list[str], list[str]]:
    """`tutum-bridge dead-letters ARGS` on the rig's spool: exit code, stdout and
    stderr lines."""
    env = {**rig.topology.bridge_env(), "AMQP_URL": rig.url}
    proc = procs.spawn(["dead-letters", *args, "--spool", str(tmp_path / "spool.sqlite3")],
                       tmp_path, f"dead-letters-{args[0]}", env)
    code = proc.popen.wait(timeout=30)
    return code, proc.stdout.splitlines(), [ln for ln in proc.stderr.splitlines() if ln]
