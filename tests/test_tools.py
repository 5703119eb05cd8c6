"""The worker-side tools against the real broker: bind, tail, and the demo.

Every test uses its own exchange (the `topology` fixture), and the tools get it the
way a user would give it, through BRIDGE_EXCHANGE / BRIDGE_UNROUTED.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import pika

from bridge.config import RUN_SETTINGS
from bridge.errors import EXIT_BROKER_REFUSED, EXIT_CONFIG, EXIT_UNAUTHORIZED
from bridge.tools.worker import consume
from tests.support import broker, procs
from tests.support.wait import wait_for

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d  \S")


def tool_env(topology, **extra: str) -> dict[str, str]:
    return {"AMQP_URL": broker.AMQP_URL, "BRIDGE_EXCHANGE": topology.exchange,
            "BRIDGE_UNROUTED": topology.unrouted, **extra}


def run_tool(tmp_path, topology, *args: str, timeout: float = 30, **env: str):
    """Run a verb to completion; returns (exit code, stdout bytes, stderr text)."""
    proc = procs.spawn(list(args), tmp_path, f"tool-{uuid.uuid4().hex[:6]}",
                       tool_env(topology, **env))
    code = proc.wait(timeout)
    return code, proc.stdout_path.read_bytes(), proc.stderr


def start_tail(tmp_path, topology, processes, *args: str, **env: str) -> procs.Proc:
    """A running tail whose queue is bound (it says so on stderr once it is)."""
    proc = procs.spawn(["tail", *args], tmp_path, f"tail-{uuid.uuid4().hex[:6]}",
                       tool_env(topology, **env))
    processes.append(proc)

    def ready():
        if proc.popen.poll() is not None:
            raise AssertionError(f"tail exited {proc.popen.returncode}: {proc.stderr}")
        return "watching" in proc.stderr
    wait_for(ready, 15, what="tail to bind its queue")
    return proc


def publish(topology, key: str, body: bytes, **headers) -> None:
    with broker.connect() as conn:
        conn.channel().basic_publish(topology.exchange, key, body,
                                     pika.BasicProperties(headers=headers or None))


def run_worker(topology, patterns, handler, queue, stop: threading.Event, **kw) -> None:
    """`consume` in a thread until the handler sets `stop`; fails instead of hanging."""
    thread = threading.Thread(target=consume, args=(patterns, handler, queue), daemon=True,
                              kwargs=dict(amqp_url=broker.AMQP_URL, exchange=topology.exchange,
                                          unrouted=topology.unrouted, stop=stop, **kw))
    thread.start()
    thread.join(20)
    if thread.is_alive():
        stop.set()
        raise AssertionError("the worker did not stop within 20s")


def publish_ids(topology, message_ids) -> None:
    """Empty container.update messages with these message ids, in this order."""
    with broker.connect() as conn:
        channel = conn.channel()
        for message_id in message_ids:
            channel.basic_publish(topology.exchange, "container.update", b"{}",
                                  pika.BasicProperties(message_id=message_id))


def recording_until(last: str, calls: list, stop: threading.Event):
    """A handler noting each message id, which sets `stop` once it has handled `last`."""
    def handler(message):
        calls.append(message.message_id)
        if message.message_id == last:
            stop.set()
    return handler


def assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# --- bind --------------------------------------------------------------------------------

def test_bind_declares_a_durable_queue_bound_to_each_pattern_idempotently(tmp_path, topology):
    queue = broker.unique("t-bind")
    topology.queues.append(queue)
    for _ in range(2):
        code, out, err = run_tool(tmp_path, topology, "bind", queue, "container.*", "*.delete")
        assert code == 0, err
        assert queue in out.decode() and "classic" in out.decode()
    # Redeclaring as durable with no queue type only succeeds on a durable classic queue.
    with broker.connect() as conn:
        conn.channel().queue_declare(queue, durable=True)
    for key in ("container.update", "service.delete", "service.create", "node.update"):
        publish(topology, key, json.dumps({"key": key}).encode())
    got = broker.drain(queue, count=2)
    assert [m.routing_key for m in got] == ["container.update", "service.delete"]
    assert broker.drain(queue, timeout=1) == []


def test_bind_quorum_declares_a_quorum_queue(tmp_path, topology):
    queue = broker.unique("t-bindq")
    topology.queues.append(queue)
    code, out, err = run_tool(tmp_path, topology, "bind", "--quorum", queue, "service.#")
    assert code == 0, err
    assert "quorum" in out.decode()
    with broker.connect() as conn:
        # Succeeds only if the queue is a quorum queue (the broker checks equivalence).
        conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    code, _, err = run_tool(tmp_path, topology, "bind", "--quorum", queue, "service.#")
    assert code == 0, err
    # The worker helper uses a quorum queue made by bind as it is.
    got, stop = [], threading.Event()
    publish(topology, "service.update", b'{"type":"service"}')
    run_worker(topology, ["service.#"], lambda m: (got.append(m.body), stop.set()), queue,
               stop)
    assert got == [b'{"type":"service"}']


def test_bind_a_queue_of_another_type_exits_4_with_one_line(tmp_path, topology):
    queue = broker.unique("t-bindx")
    topology.queues.append(queue)
    assert run_tool(tmp_path, topology, "bind", "--quorum", queue, "#")[0] == 0
    code, out, err = run_tool(tmp_path, topology, "bind", queue, "#")
    assert code == 4
    assert_one_line(err)
    assert "PRECONDITION_FAILED" in err and queue in err


# --- tail --------------------------------------------------------------------------------

def test_tail_prints_one_aligned_line_per_matching_event_and_stops_on_sigterm(
        tmp_path, topology, processes):
    tail = start_tail(tmp_path, topology, processes, "container.*", "bridge.*")
    publish(topology, "service.create", b'{"type":"service"}', state="Starting")
    publish(topology, "container.update", b'{"type":"container"}', state="Running",
            resource_uri="/api/v1/container/c0ffee/")
    publish(topology, "bridge.connected", json.dumps(
        {"type": "bridge", "action": "connected", "connected_at": 1700000060.5,
         "gap": {"lost_at": 1700000050.0, "reconnected_at": 1700000060.5,
                 "seconds": 10.5}}).encode())
    publish(topology, "container.delete", b'{"type":"container","action":"delete"}',
            resource_uri="/api/v1/container/dead/\x1b[2J")
    lines = wait_for(lambda: len(tail.stdout.splitlines()) >= 3 and tail.stdout.splitlines(),
                     15, what="three lines from tail")
    assert all(TIME.match(line) for line in lines), lines
    assert [line.split()[1] for line in lines] == ["container.update", "bridge.connected",
                                                   "container.delete"]
    assert lines[0].split()[2:] == ["Running", "/api/v1/container/c0ffee/"]
    assert "reconnected after a 10.5s gap" in lines[1]
    assert "\x1b" not in lines[2], "a header value must not reach the terminal raw"
    # Aligned: the last column starts at the same offset on every line.
    starts = ["/api/v1/container/c0ffee/", "reconnected", "/api/v1/container/dead/"]
    assert len({line.index(start) for line, start in zip(lines, starts)}) == 1, lines
    tail.signal(signal.SIGTERM)
    assert tail.wait(10) == 0
    assert "Traceback" not in tail.stderr


def test_tail_shows_when_the_bridge_received_an_event_not_when_it_was_printed(
        tmp_path, topology, processes):
    """A replay (`--since 2h`) or a backlog drained after an outage prints events
    received long ago: the time column must say when, or it says nothing."""
    received = 1700000000
    tail = start_tail(tmp_path, topology, processes, "--count", "1")
    with broker.connect() as conn:
        conn.channel().basic_publish(topology.exchange, "container.update", b"{}",
                                     pika.BasicProperties(timestamp=received))
    assert tail.wait(15) == 0, tail.stderr
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(received))
    assert tail.stdout.startswith(f"{stamp}  container.update"), tail.stdout

def test_tail_json_prints_bodies_byte_exact_and_count_exits_0(tmp_path, topology, processes):
    bodies = [b'{"type": "container",  "action":"update", "name": "caf\xc3\xa9 \xe2\x9c\x93"}',
              b'{"type":"service","action":"create","data":{"n":[1,2.50,{}]}}']
    tail = start_tail(tmp_path, topology, processes, "--json", "--count", "2")
    publish(topology, "container.update", bodies[0])
    publish(topology, "service.create", bodies[1])
    publish(topology, "node.update", b'{"type":"node"}')
    assert tail.wait(15) == 0, tail.stderr
    assert tail.stdout_path.read_bytes() == b"".join(b + b"\n" for b in bodies)


def test_tail_queue_takes_exactly_count_messages_from_an_existing_queue(
        tmp_path, topology, processes):
    queue = topology.bind("#")
    for n in range(3):
        publish(topology, "container.update", b'{"n":%d}' % n)
    wait_for(lambda: broker.queue_depth(queue) == 3, 10, what="3 messages queued")
    code, out, err = run_tool(tmp_path, topology, "tail", "--queue", queue, "--json",
                              "--count", "2")
    assert code == 0, err
    assert out == b'{"n":0}\n{"n":1}\n'
    assert broker.drain(queue, count=1)[0].body == b'{"n":2}'


def test_tail_with_a_bad_password_exits_4_without_showing_it(tmp_path, topology):
    password = f"pw-{uuid.uuid4().hex}"
    code, out, err = run_tool(tmp_path, topology, "tail",
                              AMQP_URL=f"amqp://guest:{password}@127.0.0.1:5672/%2F")
    assert code == 4
    assert_one_line(err)
    assert "ACCESS_REFUSED" in err
    assert password not in err and password.encode() not in out


def test_tail_on_an_exchange_of_another_type_exits_4(tmp_path, topology):
    with broker.connect() as conn:
        conn.channel().exchange_declare(topology.exchange, "fanout", durable=True)
    code, _, err = run_tool(tmp_path, topology, "tail")
    assert code == 4
    assert_one_line(err)
    assert "inequivalent arg 'type'" in err


def test_tail_with_no_broker_listening_exits_1(tmp_path, topology):
    code, _, err = run_tool(tmp_path, topology, "tail",
                            AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F")
    assert code == 1
    assert_one_line(err)
    assert "cannot reach the broker" in err


# --- the worker helper --------------------------------------------------------------------

def test_worker_helper_acks_after_handling_dedupes_and_requeues_a_failure_once(topology):
    queue = topology.bind("container.*")
    calls, stop = [], threading.Event()

    def handler(message):
        calls.append((message.message_id, message.redelivered, message.json()))
        if message.message_id == "poison":
            raise RuntimeError("cannot handle this one")
        if message.message_id == "last":
            stop.set()

    with broker.connect() as conn:
        channel = conn.channel()
        for n, message_id in enumerate(["a", "a", "poison", "last"]):
            channel.basic_publish(topology.exchange, "container.update", b'{"n":%d}' % n,
                                  pika.BasicProperties(message_id=message_id))
    # prefetch 1: the requeued poison message comes back before "last" is delivered.
    run_worker(topology, [], handler, queue, stop, prefetch=1)
    assert calls == [("a", False, {"n": 0}), ("poison", False, {"n": 2}),
                     ("poison", True, {"n": 2}), ("last", False, {"n": 3})]
    assert broker.queue_depth(queue) == 0, "acked after handling, poison rejected once redelivered"


def test_worker_helper_handles_a_repeat_again_only_to_restore_the_received_order(topology):
    """After a nack, the first copy of event 3 can arrive before event 2's republish;
    the handler's last call per event must still follow the bridge's order. Repeats
    after a plain reconnect (nothing older handled since) are skipped."""
    queue = topology.bind("container.*")
    calls, stop = [], threading.Event()
    arrivals = ["s-1", "s-3",           # 2 was nacked, 3 accepted meanwhile
                "s-2", "s-3", "s-4",    # the republish after the nack, in order
                "s-3", "s-4",           # a republish after a connection loss
                "other-x", "other-x",   # not a bridge id: plain de-duplication
                "s-5"]
    publish_ids(topology, arrivals)
    run_worker(topology, [], recording_until("s-5", calls, stop), queue, stop)
    assert calls == ["s-1", "s-3", "s-2", "s-3", "s-4", "other-x", "s-5"]
    assert broker.queue_depth(queue) == 0


# --- demo ----------------------------------------------------------------------------------

def test_demo_shows_events_flowing_and_stops_cleanly_leaving_no_queue_bound(
        tmp_path, topology, processes):
    demo = procs.spawn(["demo", "--duration", "8", "--rate", "10"], tmp_path, "demo",
                       {**tool_env(topology), "BRIDGE_QUARANTINE": topology.quarantine})
    processes.append(demo)
    assert demo.wait(40) == 0, demo.stderr
    events = [line for line in demo.stdout.splitlines()
              if TIME.match(line) and not line.split()[1].startswith("bridge.")]
    assert events, f"no event line in the demo's output:\n{demo.stdout}\n{demo.stderr}"
    assert "Traceback" not in demo.stderr
    assert "bridge    | " in demo.stderr, "the bridge's log lines are shown, prefixed"
    # The tail's queue went with it: an event now matches no binding and lands in the
    # alternate exchange's queue, which the bridge declared.
    broker.drain(topology.unrouted, timeout=1)
    publish(topology, "container.update", b'{"marker":true}')
    assert broker.drain(topology.unrouted, count=1)[0].body == b'{"marker":true}'


# --- deployment material ---------------------------------------------------------------

def test_deployment_files_give_the_bridge_time_to_drain_and_never_restart_a_config_error():
    """The grace periods must stay above the shutdown timeout, and systemd must not
    restart on the exit codes a restart cannot fix; both drift silently otherwise."""
    root = Path(__file__).resolve().parent.parent
    shutdown = float(next(s.default for s in RUN_SETTINGS if s.name == "shutdown_timeout"))

    def number(path: str, pattern: str) -> float:
        return float(re.search(pattern, (root / path).read_text(), re.M).group(1))

    unit = (root / "deploy/systemd/tutum-bridge.service").read_text()
    prevent = re.search(r"^RestartPreventExitStatus=(.*)$", unit, re.M).group(1).split()
    assert {int(c) for c in prevent} == {EXIT_CONFIG, EXIT_UNAUTHORIZED, EXIT_BROKER_REFUSED}
    assert number("deploy/systemd/tutum-bridge.service", r"^TimeoutStopSec=(\d+)") > shutdown
    configured = number("deploy/kubernetes/base/config.env", r"^BRIDGE_SHUTDOWN_TIMEOUT=(\d+)")
    for workload in ("deploy/kubernetes/deployment.yaml", "deploy/kubernetes/ha/statefulset.yaml"):
        assert number(workload, r"terminationGracePeriodSeconds: (\d+)") > configured
    assert number("deploy/kubernetes/deployment.yaml", r"^\s+replicas: (\d+)") == 1
    assert number("deploy/docker-compose.yml", r"stop_grace_period: (\d+)s") > shutdown


def test_worker_helper_dedupes_by_a_key_of_the_callers_choosing(topology):
    """Replicas of the bridge may publish one event under two message ids; a worker
    de-duplicates on whatever identity they share (here a header)."""
    queue = topology.bind("container.*")
    calls, stop = [], threading.Event()

    def handler(message):
        calls.append(message.message_id)
        if message.headers["identity"] == "e-2":
            stop.set()

    with broker.connect() as conn:
        channel = conn.channel()
        for message_id, identity in [("a-1", "e-1"), ("b-1", "e-1"), ("a-2", "e-2")]:
            channel.basic_publish(topology.exchange, "container.update", b"{}",
                                  pika.BasicProperties(message_id=message_id,
                                                       headers={"identity": identity}))
    run_worker(topology, [], handler, queue, stop,
               dedupe_key=lambda message: message.headers.get("identity"))
    assert calls == ["a-1", "a-2"]



def test_worker_helper_setting_stop_leaves_the_messages_not_yet_handled_in_the_queue(topology):
    """A worker stopping (a deploy, Ctrl-C) must not run its handler on the messages
    prefetched behind the one in hand: they stay in the queue for the next worker."""
    queue = topology.bind("container.*")
    calls, stop = [], threading.Event()
    publish_ids(topology, [f"m-{n}" for n in range(5)])
    wait_for(lambda: broker.queue_depth(queue) == 5, 10, what="5 messages queued")
    run_worker(topology, [], recording_until("m-1", calls, stop), queue, stop)
    assert calls == ["m-0", "m-1"]
    wait_for(lambda: broker.queue_depth(queue) == 3, 10,
             what="the 3 unhandled messages back in the queue")
    assert [m.properties.message_id for m in broker.drain(queue, count=3)] == \
        ["m-2", "m-3", "m-4"]

# --- dead letters ------------------------------------------------------------------------

def test_a_handler_always_failing_on_one_event_leaves_it_in_the_dead_letter_queue(
        tmp_path, topology):
    queue, dead = broker.unique("t-work"), broker.unique("t-dead")
    topology.queues += [queue, dead]
    code, out, err = run_tool(tmp_path, topology, "bind", "--dead-letter", dead, queue,
                              "container.*")
    assert code == 0 and dead in out.decode(), err
    ids = ["c-1", "c-2", "poison", "c-3", "c-4"]
    with broker.connect() as conn:
        channel = conn.channel()
        for message_id in ids:
            channel.basic_publish(topology.exchange, "container.update",
                                  json.dumps({"id": message_id}).encode(),
                                  pika.BasicProperties(message_id=message_id))
    calls, stop = [], threading.Event()

    def handler(message):
        calls.append(message.message_id)
        if calls.count("poison") == 3 and {"c-1", "c-2", "c-3", "c-4"} <= set(calls):
            stop.set()
        if message.message_id == "poison":
            raise ValueError("no such container")

    run_worker(topology, [], handler, queue, stop, prefetch=1, attempts=3, dead_letter=dead)
    assert [c for c in calls if c != "poison"] == ["c-1", "c-2", "c-3", "c-4"]
    assert calls.count("poison") == 3
    wait_for(lambda: broker.queue_depth(dead) == 1, 10, what="the dead letter")
    (letter,) = broker.drain(dead, count=1)
    assert json.loads(letter.body) == {"id": "poison"}
    assert letter.properties.message_id == "poison"
    headers = letter.properties.headers
    assert headers["x-attempts"] == 3 and headers["x-routing-key"] == "container.update"
    assert headers["x-error"] == "ValueError: no such container"
    assert broker.queue_depth(queue) == 0


def test_bind_max_length_sends_the_overflow_to_the_dead_letter_queue(tmp_path, topology):
    queue, dead = broker.unique("t-cap"), broker.unique("t-dead")
    topology.queues += [queue, dead]
    code, out, err = run_tool(tmp_path, topology, "bind", "--max-length", "2",
                              "--dead-letter", dead, queue, "#")
    assert code == 0 and "at most 2" in out.decode(), err
    for n in range(3):
        publish(topology, "node.update", b'{"n":%d}' % n)
    assert [m.body for m in broker.drain(queue, count=2)] == [b'{"n":1}', b'{"n":2}']
    assert [m.body for m in broker.drain(dead, count=1)] == [b'{"n":0}']
    assert run_tool(tmp_path, topology, "bind", "--max-length", "0", queue, "#")[0] == 2
