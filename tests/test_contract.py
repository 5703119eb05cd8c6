"""The core contract (docs/contract.md section 3), end to end: simulator -> bridge -> RabbitMQ -> worker queues.

Real simulator, real bridge process, real broker. What the stream sent is learnt
independently: a second simulator with the same seed sends the same frames (seeded
streams are deterministic, datetimes included), read here with websocket-client; or
the test writes the frames itself and has the simulator replay them. Each worker queue
must then hold exactly the events its pattern matches, in order, byte for byte, with
the properties and headers a worker relies on.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.broker import Received, drain, queue_depth
from tests.support.spec import (parsed, quarantine_reasons, spec_headers, spec_key,
                                topic_matches)
from tests.support.stream_client import Frame, read_frames

PATTERNS = ("container.*", "*.delete", "service.#", "#")
SEED = ("--seed", "7", "--rate", "0")


def upstream_events(frames: list[Frame]) -> list[bytes]:
    """The frames a worker must see: valid event objects, minus the `auth` handshake."""
    out = []
    for f in frames:
        if quarantine_reasons(f.payload, f.binary):
            continue
        if parsed(f.payload)["type"] != "auth":
            out.append(f.payload)
    return out


def key_of(body: bytes) -> str:
    return spec_key(parsed(body))


def check_properties(msg: Received, t0: float, t1: float) -> None:
    """docs/contract.md section 3, 'Properties on every message'."""
    p = msg.properties
    assert p.delivery_mode == 2
    assert p.content_type == "application/json"
    assert p.app_id == "tutum-bridge"
    assert isinstance(p.message_id, str) and p.message_id
    assert isinstance(p.timestamp, int) and int(t0) <= p.timestamp <= t1 + 1
    assert "x-republished" not in (p.headers or {})      # no broker loss in these tests


def check_event_headers(msg: Received) -> None:
    obj = parsed(msg.body)
    headers = dict(msg.properties.headers or {})
    expected = spec_headers(obj)
    if obj.get("parents") == [] and headers.get("parents") == []:
        expected["parents"] = []          # an empty `parents` header or none: both fine
    assert headers == expected, msg.body


def check_bridge_connected(msg: Received, t0: float, t1: float) -> None:
    assert msg.routing_key == "bridge.connected"
    body = json.loads(msg.body)
    assert body["type"] == "bridge" and body["action"] == "connected"
    assert t0 - 1 <= body["connected_at"] <= t1 + 1
    assert body["gap"] is None                           # the first connection has no gap
    headers = msg.properties.headers or {}
    assert (headers.get("type"), headers.get("action")) == ("bridge", "connected")


def stop_cleanly(bridge_proc) -> None:
    assert bridge_proc.stop(timeout=20) == 0, bridge_proc.stderr[-3000:]
    assert "Traceback" not in bridge_proc.stderr


# --- the main contract ---------------------------------------------------------------

def test_each_binding_gets_exactly_its_events_in_order_byte_for_byte(
        simulator, bridge, topology):
    reference = read_frames(simulator(*SEED, "--count", "300", name="reference"), 302)
    events = upstream_events(reference)
    assert len(events) == 301                       # user-notifications + 300 events
    assert events[0].startswith(b'{"type": "user-notifications"')
    queues = {pattern: topology.bind(pattern) for pattern in PATTERNS}

    t0 = time.time()
    sim = simulator(*SEED, "--count", "300")
    proc = bridge(sim)
    everything = drain(queues["#"], count=len(events) + 1, timeout=30)
    t1 = time.time()

    # `#`: bridge.connected first (it follows the auth), then every event, in order.
    check_bridge_connected(everything[0], t0, t1)
    upstream = everything[1:]
    assert [m.body for m in upstream] == events
    assert [m.routing_key for m in upstream] == [key_of(b) for b in events]
    assert upstream[0].routing_key == "user-notifications.none"
    assert not any(m.routing_key.startswith("auth.") for m in everything)
    for msg in everything:
        check_properties(msg, t0, t1)
        assert msg.exchange == topology.exchange
    for msg in upstream:
        check_event_headers(msg)
    ids = [msg.properties.message_id for msg in everything]
    assert len(set(ids)) == len(ids)

    # The other patterns: exactly the matching events, in order, same message ids.
    for pattern in PATTERNS[:-1]:
        expected = [m for m in upstream if topic_matches(pattern, m.routing_key)]
        assert expected, pattern
        got = drain(queues[pattern], count=len(expected), timeout=10)
        assert [m.body for m in got] == [m.body for m in expected], pattern
        assert [m.properties.message_id for m in got] == \
               [m.properties.message_id for m in expected], pattern
    assert {p: queue_depth(q) for p, q in queues.items()} == {p: 0 for p in PATTERNS}
    assert queue_depth(topology.unrouted) == 0
    assert queue_depth(topology.quarantine) == 0
    stop_cleanly(proc)


def test_events_no_binding_matches_are_kept_in_the_unrouted_queue(simulator, bridge, topology):
    reference = read_frames(simulator(*SEED, "--count", "100", name="reference"), 102)
    events = upstream_events(reference)
    containers = topology.bind("container.*")

    t0 = time.time()
    proc = bridge(simulator(*SEED, "--count", "100"))
    expected = [b for b in events if key_of(b).startswith("container.")]
    got = drain(containers, count=len(expected), timeout=30)
    assert [m.body for m in got] == expected

    others = [b for b in events if not key_of(b).startswith("container.")]
    assert any(key_of(b).startswith("service.") for b in others)
    unrouted = drain(topology.unrouted, count=len(others) + 1, timeout=10)
    t1 = time.time()
    check_bridge_connected(unrouted[0], t0, t1)
    assert [m.body for m in unrouted[1:]] == others
    # The alternate exchange keeps the original key, so the event can be re-routed.
    assert [m.routing_key for m in unrouted[1:]] == [key_of(b) for b in others]
    for msg in unrouted[1:]:
        check_properties(msg, t0, t1)
        check_event_headers(msg)
    stop_cleanly(proc)


def test_malformed_frames_go_to_quarantine_and_valid_events_still_all_arrive(
        simulator, bridge, topology):
    flags = (*SEED, "--count", "100", "--malformed-every", "5")
    reference = read_frames(simulator(*flags, name="reference"), 2 + 100 + 20)
    events = upstream_events(reference)
    malformed = [f for f in reference if quarantine_reasons(f.payload, f.binary)]
    assert len(events) == 101 and len(malformed) == 20
    everything = topology.bind("#")

    t0 = time.time()
    proc = bridge(simulator(*flags))
    got = drain(everything, count=len(events) + 1, timeout=30)
    assert [m.body for m in got[1:]] == events

    quarantined = drain(topology.quarantine, count=len(malformed), timeout=10)
    t1 = time.time()
    assert [m.body for m in quarantined] == [f.payload for f in malformed]
    for msg, frame in zip(quarantined, malformed):
        # Published through the default exchange, straight to the quarantine queue.
        assert (msg.exchange, msg.routing_key) == ("", topology.quarantine)
        check_properties(msg, t0, t1)
        headers = msg.properties.headers
        assert headers["x-quarantine-reason"] in quarantine_reasons(frame.payload, frame.binary)
        assert headers["x-frame-opcode"] == ("binary" if frame.binary else "text")
        assert headers["x-frame-bytes"] == len(frame.payload)
        assert isinstance(headers["x-quarantine-detail"], str)
    reasons = {m.properties.headers["x-quarantine-reason"] for m in quarantined}
    assert {"invalid-json", "not-an-object", "binary-frame", "type-not-string",
            "invalid-utf8"} <= reasons
    assert queue_depth(everything) == 0
    stop_cleanly(proc)


# --- frames written by the test, replayed verbatim -----------------------------------

PARENTS = ["/api/v1/service/5e1f0c2a-0000-4000-8000-00000000000a/",
           "/api/v1/stack/57ac0000-0000-4000-8000-00000000000b/",
           "/api/v1/node/9d0e0000-0000-4000-8000-00000000000c/",
           "/api/v1/service/5e1f0c2a-0000-4000-8000-00000000000d/"]
CRAFTED = [
    # Several parent kinds; the first service wins `parent-service`.
    json.dumps({"type": "container", "action": "update", "state": "Running",
                "resource_uri": "/api/v1/container/c0000000-0000-4000-8000-000000000001/",
                "parents": PARENTS, "uuid": "c0000000-0000-4000-8000-000000000001"}),
    # Case and the documented misspelling; key order, spacing and escapes kept as sent.
    '{ "action":"Create" ,"type":"Container","parents":[], "data":{"b":1,"a":[1.0e0,"\\/"]}}',
    '{"type": "containter", "action": "delete", "state": "Stopped",'
    ' "resource_uri": "/api/v1/container/c2/", "parents": ["/api/v1/service/s2/"]}',
    # Non-ASCII, raw and escaped.
    '{"type": "service", "action": "update", "state": "D\u00e9marrage \u2713",'
    ' "name": "caf\\u00e9 \U0001f600", "parents": ["/api/v1/stack/st-\u00e9/"]}',
    '{"type": "node", "action": "create", "state": "Deploying",'
    ' "parents": ["/api/v1/nodecluster/nc-1/"]}',
    '{"type": "nodecluster", "action": "delete", "state": "Terminated"}',
    '{"type": "action", "action": "update", "state": "Success",'
    ' "resource_uri": "/api/v1/action/a-1/"}',
    '{"type": "stack", "action": "redeploy"}',
    '{"type": "user-notification", "message": "Node is unreachable"}',
    '{"type": "error", "data": {"errorMessage": "something broke"}}',
    '{"type": "service.created#", "action": "*"}',
    '{"type": "Service", "action": "DELETE", "state": null, "resource_uri": 7}',
]


def replay_file(tmp_path, lines: list[str | bytes]) -> str:
    path = tmp_path / "replay.jsonl"
    path.write_bytes(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines)
                     + b"\n")
    return str(path)


def test_replayed_frames_arrive_verbatim_with_their_keys_and_headers(
        simulator, bridge, topology, tmp_path):
    oversize = b'{"type": "container", "action": "update", "data": "' + b"x" * 100_000 + b'"}'
    lines = [*CRAFTED, oversize, CRAFTED[0]]
    queues = {pattern: topology.bind(pattern) for pattern in PATTERNS}

    t0 = time.time()
    proc = bridge(simulator("--rate", "0", "--replay", replay_file(tmp_path, lines)),
                  BRIDGE_MAX_FRAME_BYTES="4096")
    events = [ln.encode() for ln in [*CRAFTED, CRAFTED[0]]]
    got = drain(queues["#"], count=2 + len(events), timeout=30)
    t1 = time.time()
    check_bridge_connected(got[0], t0, t1)
    assert got[1].routing_key == "user-notifications.none"
    upstream = got[2:]
    assert [m.body for m in upstream] == events
    assert [m.routing_key for m in upstream] == [
        "container.update", "container.create", "container.delete", "service.update",
        "node.create", "nodecluster.delete", "action.update", "stack.redeploy",
        "user-notification.none", "error.none", "service_created_._", "service.delete",
        "container.update"]
    for msg in upstream:
        check_properties(msg, t0, t1)
        check_event_headers(msg)
    assert upstream[0].properties.headers["parent-service"] == "5e1f0c2a-0000-4000-8000-00000000000a"
    # The same frame twice is two events: two message ids.
    assert upstream[0].properties.message_id != upstream[-1].properties.message_id

    for pattern in PATTERNS[:-1]:
        expected = [m.body for m in upstream if topic_matches(pattern, m.routing_key)]
        assert [m.body for m in drain(queues[pattern], count=len(expected), timeout=10)] \
            == expected

    (cut,) = drain(topology.quarantine, count=1, timeout=10)
    headers = cut.properties.headers
    assert headers["x-quarantine-reason"] == "oversize"
    assert headers["x-frame-bytes"] == len(oversize)
    # The quarantine may keep the whole frame or its start, and says which.
    assert cut.body and oversize.startswith(cut.body)
    assert bool(headers.get("x-truncated")) == (len(cut.body) < len(oversize))
    stop_cleanly(proc)


@pytest.mark.parametrize("awkward", [
    # Under the 1 MiB limit but larger than one socket read: it arrives in pieces.
    pytest.param(json.dumps({"type": "container", "action": "update", "data": "x" * 700_000}),
                 id="large"),
    # Valid JSON whose state decodes to a lone surrogate, which UTF-8 cannot carry.
    pytest.param('{"type": "container", "action": "update", "state": "\\ud800"}',
                 id="lone-surrogate"),
    # Within BRIDGE_MAX_FRAME_BYTES, but naive headers would exceed the broker's frame_max.
    pytest.param(json.dumps({"type": "container", "action": "update", "parents": [
        f"/api/v1/kind{i}/" + "\U0001f600" * 2000 + "/" for i in range(64)]},
        ensure_ascii=False), id="huge-parents"),
])
def test_an_awkward_valid_event_is_delivered_and_does_not_stall_the_stream(
        simulator, bridge, topology, tmp_path, awkward):
    before, after = CRAFTED[4], CRAFTED[5]
    everything = topology.bind("#")
    proc = bridge(simulator("--rate", "0", "--replay",
                            replay_file(tmp_path, [before, awkward, after])))
    got = drain(everything, count=5, timeout=10)
    assert [m.body for m in got[2:]] == [before.encode(), awkward.encode(), after.encode()]
    assert got[3].routing_key == "container.update"
    stop_cleanly(proc)
