"""High availability (docs/contract.md section 7) with real replicas, sockets and faults.

Two replicas with BRIDGE_HA=on read one simulator in `--fanout` (each gets its own copy
of every event that happens while it is connected) and publish to a private RabbitMQ
node (shared by the module). A `#` queue on the exchange collects everything; the ledger
compares it with what the simulator sent to the replicas (`sent`: events given to at
least one connection), prints it with the takeover time (`pytest -s`) and appends it to
`$FAULT_REPORT` when set. Around a takeover a few events may arrive twice; each copy
must carry the same identity (`message_id` = `x-event-id`) and every copy after the
first `x-republished`.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from tests.support.broker import unique
from tests.support.fault_rig import assert_guarantee
from tests.support.ha import HaRig, as_classified_on_receipt, same_identity
from tests.support.ledger import compute
from tests.support.rabbit_node import extra_node, healthy_node  # noqa: F401 - fixtures
from tests.support.wait import wait_for
from tests.test_health_endpoints import probe

RATE = "200"


@pytest.fixture
def rig(request, healthy_node, topology, simulator, bridge, tmp_path):  # noqa: F811
    bench = HaRig(request.node.name, healthy_node, topology, simulator, bridge, tmp_path)
    yield bench
    bench.close()


def test_two_replicas_exactly_once_then_leader_sigkilled(rig):
    """Steady state: every event once. SIGKILL the leader: the standby takes over
    within 10 s and fills in what the leader had not published; nothing is lost."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "3000")
    leader, standby = rig.pair(sim)

    rig.wait_sent(sim, 1200)
    steady = rig.sent(sim) - 200
    rig.wait_delivered(steady)
    early = compute("steady", steady, [m for m in list(rig.collector.messages)
                                       if m.seq is not None and m.seq <= steady])
    assert early.duplicates == 0 and early.lost == 0, early.summary()

    killed_at = time.monotonic()
    leader.signal(signal.SIGKILL)
    takeover = rig.wait_log(standby, "ha.takeover", timeout=15)
    took = time.monotonic() - killed_at
    rig.bridges.remove(leader)

    ledger = rig.settle(sim, 3000, takeover_seconds=round(took, 2), filled=takeover["filled"])
    assert took < 10, ledger.summary()
    assert_guarantee(ledger)
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)
    # Only around the takeover: nothing delivered before the kill comes again.
    seen, twice = set(), set()
    for msg in rig.collector.messages:
        if msg.seq is not None:
            (twice if msg.seq in seen else seen).add(msg.seq)
    assert not twice or min(twice) > steady, sorted(twice)
    assert rig.metric(standby, "tutum_bridge_leader") == 1


def test_sigterm_of_the_leader_hands_over_at_once(rig):
    """A deploy: the leader drains, reports, then frees the lock; the standby leads
    within a second of the leader's exit, and nothing is lost."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "1600")
    leader, standby = rig.pair(sim)
    rig.wait_sent(sim, 600)
    leader.signal(signal.SIGTERM)
    assert leader.wait(20) == 0
    exited_at = time.monotonic()
    rig.wait_log(standby, "ha.takeover", timeout=10)
    took = time.monotonic() - exited_at
    rig.bridges.remove(leader)

    ledger = rig.settle(sim, 1600, takeover_seconds=round(took, 2))
    assert took < 2, ledger.summary()
    assert_guarantee(ledger)
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)


def test_standby_that_dies_changes_nothing(rig):
    """Until it dies both replicas are ready (the leader, and a standby in sync with it);
    its death changes nothing for the flow: no loss, no duplicate."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "1600")
    leader, standby = rig.pair(sim)
    for proc in (leader, standby):
        status, body = wait_for(lambda: (p := probe(proc, "/readyz"))[0] == 200 and p, 20,
                                0.1, what="/readyz 200")
        assert body["ha"]["in_sync"] is True
    assert body["ha"]["role"] == "standby"
    rig.wait_sent(sim, 600)
    standby.signal(signal.SIGKILL)
    rig.bridges.remove(standby)

    ledger = rig.settle(sim, 1600)
    assert_guarantee(ledger, duplicates_allowed=False)
    assert rig.metric(leader, "tutum_bridge_leader") == 1
    assert not rig.log_events(leader, "ha.takeover")


def test_leader_stream_cut_is_covered_by_the_standby(rig):
    """The leader's websocket goes through a proxy that drops it for 3 s; the standby
    stays connected and offers what the leader missed: lost = 0, and the leader's
    bridge.connected says the gap was covered."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "2400")
    stream_proxy = rig.proxy(sim.info["port"])
    leader, standby = rig.pair(sim, leader_stream=stream_proxy)
    rig.wait_sent(sim, 600)
    stream_proxy.pause("refuse")
    before = rig.sent(sim)
    wait_for(lambda: rig.sent(sim) >= before + 600, 20, 0.05, what="events in the gap")
    stream_proxy.resume()
    rig.wait_log(leader, "ha.gap_filled", timeout=20)

    ledger = rig.settle(sim, 2400)
    assert ledger.lost == 0, ledger.summary()
    assert ledger.unexplained_duplicates == 0, ledger.summary()
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)
    reconnected = [c for c in rig.collector.lifecycle("connected") if c.get("gap")]
    assert reconnected and reconnected[-1]["gap"]["covered"] is True, reconnected
    assert standby.info["replica"] in reconnected[-1]["gap"]["covered_by"]


def test_a_leader_stream_cut_that_nothing_follows_is_covered_too(rig):
    """The leader's websocket drops and the stream then falls quiet: no later event
    shows the standby that the leader missed what came before it. The leader, back and
    caught up, says it has received nothing for a while; the standby offers what it
    holds beyond the leader's last event: lost = 0, and no wait for the next event."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "1200")
    stream_proxy = rig.proxy(sim.info["port"])
    leader, standby = rig.pair(sim, leader_stream=stream_proxy)
    rig.wait_sent(sim, 400)
    stream_proxy.pause("refuse")
    rig.wait_sent(sim, 1200)            # the rest happened while the leader was away
    stream_proxy.resume()

    ledger = rig.settle(sim, 1200, timeout=30)
    assert ledger.lost == 0, ledger.summary()
    assert ledger.unexplained_duplicates == 0, ledger.summary()
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)
    assert rig.log_events(leader, "ha.gap_filled")


def test_leader_cut_off_the_broker_standby_takes_over_old_leader_stays_standby(rig):
    """The leader reaches the broker through a proxy that refuses it for a while: the
    standby takes over, nothing is lost, and the old leader, once back, is a standby
    that publishes nothing."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "2400")
    broker_proxy = rig.broker_proxy()
    leader, standby = rig.pair(sim, leader_via=broker_proxy)
    rig.wait_sent(sim, 600)

    cut_at = time.monotonic()
    broker_proxy.pause("refuse")
    rig.wait_log(standby, "ha.takeover", timeout=15)
    took = time.monotonic() - cut_at
    published_when_cut = rig.metric(leader, "tutum_bridge_events_published_total")
    broker_proxy.resume()
    rig.wait_log(leader, "ha.standby", timeout=20, count=2)

    ledger = rig.settle(sim, 2400, takeover_seconds=round(took, 2))
    assert took < 10, ledger.summary()
    assert_guarantee(ledger)
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)
    assert rig.metric(leader, "tutum_bridge_leader") == 0
    assert rig.metric(leader, "tutum_bridge_events_published_total") == published_when_cut


@pytest.fixture
def own_vhost(healthy_node):  # noqa: F811
    """A vhost of the test's own on the private node, with two users of their own
    (replica A's and B's, both allowed everything, as is guest); all deleted at the end.

    One `rabbitmqctl eval` each way rather than nine commands of a second each: the
    calls are those behind `add_vhost`, `add_user`, `set_permissions` and `delete_*`."""
    vhost = unique("tb-ha-vhost")
    users = {name: (unique(f"tb-ha-{name}"), uuid.uuid4().hex) for name in ("a", "b")}
    allow = 'ok = rabbit_auth_backend_internal:set_permissions(<<"{}">>, <<"%s">>, ' \
        '<<".*">>, <<".*">>, <<".*">>, <<"test">>)' % vhost
    setup = [f'ok = rabbit_vhost:add(<<"{vhost}">>, <<"test">>)', allow.format("guest")]
    for user, password in users.values():
        setup += [f'ok = rabbit_auth_backend_internal:add_user(<<"{user}">>, '
                  f'<<"{password}">>, <<"test">>)', allow.format(user)]
    teardown = [f'rabbit_auth_backend_internal:delete_user(<<"{user}">>, <<"test">>)'
                for user, _ in users.values()]
    teardown.append(f'rabbit_vhost:delete(<<"{vhost}">>, <<"test">>)')
    try:
        healthy_node.ctl("eval", ", ".join(setup) + ".")
        yield vhost, users
    finally:
        healthy_node.ctl("eval", ", ".join(teardown) + ".", check=False)


def test_a_leader_whose_publisher_is_refused_hands_over_while_its_link_is_fine(
        request, healthy_node, own_vhost, topology, simulator, bridge, tmp_path):  # noqa: F811
    """The leader's user loses write permission on the events exchange mid-stream (its
    HA connection, on the same user, is untouched): its publisher is refused, so it
    gives up the lock and the standby takes over within 10 s, nothing lost. With the
    permission back it stays a standby: the other replica leads and nothing changes."""
    vhost, users = own_vhost
    port, exchange = healthy_node.port, topology.exchange
    rig = HaRig(request.node.name, healthy_node, topology, simulator, bridge, tmp_path,
                url=f"amqp://guest:guest@127.0.0.1:{port}/{vhost}")
    try:
        def env(name: str) -> dict:
            user, password = users[name]
            return {"AMQP_URL": f"amqp://{user}:{password}@127.0.0.1:{port}/{vhost}"}
        sim = rig.simulator("--fanout", "--rate", RATE, "--count", "2000")
        leader, standby = rig.pair(sim, leader_env=env("a"), standby_env=env("b"))
        rig.wait_sent(sim, 400)

        leader_user = users["a"][0]
        publishing = connection_pids(healthy_node, leader_user, f"tutum-bridge {exchange}")
        healthy_node.ctl("set_permissions", "-p", vhost, leader_user,
                         ".*", f"^(?!{exchange}$).*", ".*")
        # A channel keeps the permissions it checked (RabbitMQ caches them), as after a
        # password rotation the open connection keeps its login: the next one is refused.
        refused_at = time.monotonic()
        for pid in publishing:
            healthy_node.ctl("close_connection", pid, "permission revoked", check=False)
        takeover = rig.wait_log(standby, "ha.takeover", timeout=20)
        took = time.monotonic() - refused_at
        published_when_replaced = rig.metric(leader, "tutum_bridge_events_published_total")
        healthy_node.ctl("set_permissions", "-p", vhost, leader_user, ".*", ".*", ".*")
        # Open again and past its wait, it tries for the lock, which the other holds.
        rig.wait_log(leader, "ha.competing", timeout=20)

        ledger = rig.settle(sim, 2000, takeover_seconds=round(took, 2),
                            filled=takeover["filled"])
        assert took < 10, ledger.summary()
        assert_guarantee(ledger)
        assert same_identity(rig.collector.messages)
        assert as_classified_on_receipt(rig.collector.messages)
        assert rig.metric(leader, "tutum_bridge_leader") == 0
        assert rig.metric(standby, "tutum_bridge_leader") == 1
        assert rig.metric(leader, "tutum_bridge_events_published_total") \
            == published_when_replaced
        assert len(rig.log_events(leader, "ha.leader")) == 1
    finally:
        rig.close()


def connection_pids(node, user: str, name: str) -> list[str]:
    """Erlang pids of `user`'s connections named `name` (exactly) on the node."""
    wanted = f'{{"connection_name","{name}"}}'
    listing = node.ctl("list_connections", "--no-table-headers", "pid", "user",
                       "client_properties")
    return [line.split("\t")[0].strip() for line in listing.splitlines()
            if wanted in line and line.split("\t")[1].strip() == user]


def test_a_silent_link_to_the_leader_is_taken_over_within_10_seconds(rig):
    """The leader's broker link goes silent (a host gone: no RST, no FIN): the leader
    steps down when its lease runs out, the broker frees the lock after the heartbeat,
    and the standby takes over within 10 s; nothing is lost."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "3000")
    broker_proxy = rig.broker_proxy()
    leader, standby = rig.pair(sim, leader_via=broker_proxy)
    rig.wait_sent(sim, 600)

    silent_at = time.monotonic()
    broker_proxy.blackhole()
    rig.wait_log(standby, "ha.takeover", timeout=20)
    took = time.monotonic() - silent_at
    stepped_down = rig.wait_log(leader, "ha.lease_lost", timeout=5)
    broker_proxy.resume()

    ledger = rig.settle(sim, 3000, takeover_seconds=round(took, 2))
    assert took < 10, ledger.summary()
    assert stepped_down
    assert_guarantee(ledger)
    assert same_identity(rig.collector.messages)
    assert as_classified_on_receipt(rig.collector.messages)


def test_identical_frames_stay_distinct_events_across_a_takeover(rig):
    """Once both replicas stream, bodies come twice (1.5 s apart, some back to back
    too): a worker that drops repeated message_ids still gets each frame as often as
    it was sent, across a SIGKILL of the leader. (Repeats that straddle a replica's
    start are the identity's documented limit: README, High availability.)"""
    def body(kind: bytes, n: int) -> bytes:
        return b'{"type": "container", "action": "update", "%s": %d}' % (kind, n)
    lines = [body(b"unique", n) for n in range(600)]          # both replicas connect
    lines += [body(b"twice", n % 300) for n in range(600)]
    lines[700:700] = [lines[699]] * 2                         # back to back, thrice
    replay = rig.tmp_path / "repeats.jsonl"
    replay.write_bytes(b"\n".join(lines) + b"\n")
    sim = rig.simulator("--fanout", "--rate", RATE, "--replay", str(replay))
    leader, standby = rig.pair(sim)
    rig.wait_sent(sim, 1000)
    leader.signal(signal.SIGKILL)
    rig.wait_log(standby, "ha.takeover", timeout=15)
    rig.bridges.remove(leader)
    wait_for(lambda: rig.stats(sim)["last_seq"] >= len(lines), 30, 0.1, what="the replay")

    expected = {line: lines.count(line) for line in set(lines)}

    def by_body():
        """What a worker dropping repeated message_ids keeps (greetings aside)."""
        first = {}
        for msg in list(rig.collector.messages):
            if msg.body in expected:
                first.setdefault(msg.message_id, msg.body)
        counts = {}
        for kept in first.values():
            counts[kept] = counts.get(kept, 0) + 1
        return counts
    try:
        wait_for(lambda: by_body() == expected, 30, 0.2, what="each frame, as often as sent")
    except AssertionError:
        got = by_body()
        wrong = {b: (got.get(b, 0), n) for b, n in expected.items() if got.get(b, 0) != n}
        raise AssertionError(f"{len(wrong)} bodies (got, sent): {list(wrong.items())[:5]}")
    copies = [m for m in list(rig.collector.messages) if m.body in expected]
    print(f"\nLEDGER {rig.test}: sent={len(lines)} delivered={len(copies)} "
          f"distinct={len({m.message_id for m in copies})} "
          f"duplicates={len(copies) - len({m.message_id for m in copies})} lost=0")


def test_without_ha_a_killed_bridge_loses_what_happened_while_it_was_down(rig):
    """BRIDGE_HA=off, one bridge, SIGKILL and a restart 3 s later (as systemd would):
    the events that happened meanwhile reached nobody. Reported, not asserted zero."""
    sim = rig.simulator("--fanout", "--rate", RATE, "--count", "1600")
    first = rig.bridge(sim, name="single", BRIDGE_SPOOL=str(rig.tmp_path / "single.sqlite3"))
    rig.wait_sent(sim, 600)
    first.signal(signal.SIGKILL)
    first.wait(10)
    rig.bridges.remove(first)
    down_at = rig.stats(sim)["last_seq"]
    wait_for(lambda: rig.stats(sim)["last_seq"] >= down_at + 600, 20, 0.05,
             what="3 s of events while the bridge is down")
    rig.bridge(sim, name="single-again", BRIDGE_SPOOL=str(rig.tmp_path / "single.sqlite3"))
    wait_for(lambda: rig.stats(sim)["last_seq"] >= 1600, 30, 0.1, what="the stream to end")
    rig.collector.wait(1600, 10, allow_missing=frozenset(range(1, 1601)))
    ledger = compute(rig.test, 1600, list(rig.collector.messages),
                     happened=1600, sent_to_bridge=rig.stats(sim)["sent"]).report()
    assert ledger.lost > 0, ledger.summary()
