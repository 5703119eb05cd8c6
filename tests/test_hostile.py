"""Hostile and broken upstream input, end to end: the real bridge, the real broker.

The stream server is `tests.support.hostile_server`, which sends bytes no websocket
library would: invalid UTF-8 in text frames, a 20 MiB frame, lying length headers,
half frames, garbage instead of a handshake. The promises checked (docs/contract.md section 3 and 4):

- every valid event still arrives, in order, byte for byte, on a queue bound `#`;
- every frame that is not a JSON object with a string `type` lands in the quarantine
  queue with the right `x-quarantine-reason`, and is logged once, briefly;
- whatever `type` and `action` hold, the routing key is two safe words;
- memory stays bounded, nothing crashes, broken connections are replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support import broker, procs
from tests.support.hostile_server import (
    BINARY, PING, Dribbled, Fragmented, Frame, HostileServer, Raw, Script, Streamed,
    Truncated)
from tests.support.wait import wait_for

MiB = 1024 * 1024
RSS_LIMIT_MB = 120
LOG_LINE_MAX = 4096

# --- the corpus ------------------------------------------------------------------------


@dataclass
class Case:
    """One scripted frame and what the bridge must do with it.

    `route`: the routing key it must be published with (body byte-equal).
    `reasons`: the acceptable quarantine reasons (first one is the expected one).
    Neither: it must not be published at all (a control frame, a mid-stream `auth`).
    """

    step: object
    route: str | None = None
    reasons: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.step.label

    @property
    def payload(self) -> bytes:
        return self.step.payload


def text(label: str, payload: bytes | str, route: str | None = None, *reasons: str,
         opcode: int = 1) -> Case:
    raw = payload.encode() if isinstance(payload, str) else payload
    return Case(Frame(raw, opcode=opcode, label=label), route, reasons)


def valid(seq: int) -> Case:
    body = json.dumps({"type": "container", "action": "update", "seq": seq,
                       "resource_uri": f"/api/v1/container/c{seq}/",
                       "parents": ["/api/v1/service/s1/"], "state": "Running"})
    return text(f"valid #{seq}", body, "container.update")


_EVENT_HEAD = b'{"type":"container","action":"update","data":"'


def _fragmented_over_limit() -> Fragmented:
    part = 512 * 1024
    parts = [_EVENT_HEAD + b"x" * (part - len(_EVENT_HEAD)), b"x" * part, b"x" * (part - 2) + b'"}']
    return Fragmented(parts, label="fragmented message, 3 x 512 KiB = 1.5 MiB")


HOSTILE: list[Case] = [
    # Size: over the limit, whatever the framing.
    Case(Streamed(20 * MiB, _EVENT_HEAD, b'"}', label="20 MiB text frame"), None, ("oversize",)),
    Case(Streamed(2 * MiB, _EVENT_HEAD, b'"}', label="2 MiB text frame"), None, ("oversize",)),
    Case(Streamed(2 * MiB, _EVENT_HEAD, b'"}', opcode=BINARY, label="2 MiB binary frame"),
         None, ("oversize", "binary-frame")),
    Case(_fragmented_over_limit(), None, ("oversize",)),
    Case(Fragmented([b'{"type":"con', b'tainer","action":"upd', b'ate","frag":true}'],
                    ping=b"between-fragments", label="small fragmented event, pings between"),
         "container.update"),
    Case(Frame(b"mid-stream", opcode=PING, label="server ping mid-stream")),
    # Framing is TCP's business: a frame may arrive in any number of reads.
    Case(Dribbled(b'{"type":"container","action":"update","split":1}', cuts=(1, 3, 20),
                  label="event arriving in 4 TCP segments"), "container.update"),
    Case(Dribbled(b'{"type":"container","action":"update","data":"' + b"z" * 600_000 + b'"}',
                  cuts=(2, 300_000), label="600 KB event arriving in 3 TCP segments"),
         "container.update"),
    # Bytes that are not UTF-8 in a text frame.
    text("invalid UTF-8 (ff fe)", b'{"type":"container","action":"update","x":"\xff\xfe"}',
         None, "invalid-utf8"),
    text("UTF-8-encoded surrogate (ed a0 80)", b'{"type":"\xed\xa0\x80","action":"update"}',
         None, "invalid-utf8"),
    text("overlong UTF-8 (c0 af)", b'{"type":"container","x":"\xc0\xaf"}', None, "invalid-utf8"),
    text("UTF-8 sequence cut short", b'{"type":"container","x":"\xe2\x82"}', None,
         "invalid-utf8"),
    text("binary frame holding a valid event", b'{"type":"container","action":"update"}',
         None, "binary-frame", opcode=BINARY),
    # JSON that is not an object with a string type.
    text("100,000 nested arrays", "[" * 100_000 + "]" * 100_000, None, "too-deep",
         "invalid-json"),
    text("event with 100,000 nested objects in data",
         '{"type":"container","data":' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}",
         None, "too-deep", "invalid-json"),
    text("JSON array", '[{"type":"container","action":"update"}]', None, "not-an-object"),
    text("JSON number", "42", None, "not-an-object"),
    text("JSON null", "null", None, "not-an-object"),
    text("JSON true", "true", None, "not-an-object"),
    text("JSON string", '"container.update"', None, "not-an-object"),
    text("empty text frame", "", None, "invalid-json"),
    text("whitespace only", " \r\n\t ", None, "invalid-json"),
    text("cut-off JSON", '{"type":"container","action":"upd', None, "invalid-json"),
    text("NaN literal", '{"type":"container","action":"update","x":NaN}', None,
         "invalid-json"),
    text("two objects in one frame", '{"type":"container"} {"type":"service"}', None,
         "invalid-json"),
    text("UTF-8 BOM before the object", b'\xef\xbb\xbf{"type":"container"}', None,
         "invalid-json"),
    text("raw control character in type", b'{"type":"cont\x01ainer","action":"update"}',
         None, "invalid-json"),
    text("type is a number", '{"type":42,"action":"update"}', None, "type-not-string"),
    text("type is an object", '{"type":{"name":"container"},"action":"update"}', None,
         "type-not-string"),
    text("type is a list", '{"type":["container"]}', None, "type-not-string"),
    text("type is null", '{"type":null,"action":"update"}', None, "type-not-string"),
    text("missing type", '{"action":"update","resource_uri":"/api/v1/container/x/"}', None,
         "missing-type"),
    text("empty object", "{}", None, "missing-type"),
    text("duplicate type key", '{"type":"container","type":"service","action":"update"}',
         None, "duplicate-keys"),
    text("raw NUL byte inside a string", b'{"type":"container","action":"update","x":"a\x00b"}',
         None, "nul-byte"),
    text("raw NUL byte after the object", b'{"type":"container","action":"update"}\x00', None,
         "nul-byte"),
    # Valid events whose type and action try to break out of the routing key.
    text("type a.b#*", '{"type":"a.b#*","action":"update"}', "a_b__.update"),
    text("action with dots and #", '{"type":"container","action":"up.date.#"}',
         "container.up_date__"),
    text("action *", '{"type":"container","action":"*"}', "container._"),
    text("path-like type", '{"type":"../../etc","action":"a b"}', "______etc.a_b"),
    text("10,000-character type", json.dumps({"type": "T" * 10_000, "action": "update"}),
         "t" * 64 + ".update"),
    text("10,000-character action", json.dumps({"type": "container", "action": "a" * 10_000}),
         "container." + "a" * 64),
    text("escaped NUL in type", '{"type":"con\\u0000tainer","action":"update"}',
         "con_tainer.update"),
    text("escaped control characters", '{"type":"container\\u0007\\n","action":"up\\tdate"}',
         "container__.up_date"),
    text("non-ASCII type and action", '{"type":"Contäiner😀","action":"ÜPDATE"}',
         "cont_iner_._pdate"),
    text("bidi override and zero-width space",
         '{"type":"container\\u202e","action":"update\\u200b"}', "container_.update_"),
    text("empty type", '{"type":"","action":"update"}', "none.update"),
    text("empty action", '{"type":"container","action":""}', "container.none"),
    text("action is a number", '{"type":"container","action":5}', "container.none"),
    text("action is an object", '{"type":"container","action":{"a":1}}', "container.none"),
    text("upper-case, misspelt type", '{"type":"CONTAINTER","action":"Update"}',
         "container.update"),
    text("Type next to type", '{"type":"container","Type":"service","action":"update"}',
         "container.update"),
    text("5,000-digit integer field (valid JSON)",
         '{"type":"container","action":"update","n":' + "9" * 5000 + "}", "container.update"),
    # A handshake frame mid-stream is not an event (docs/contract.md section 3).
    text("auth frame mid-stream", '{"type":"auth","user":"mallory"}'),
]


def corpus() -> list[Case]:
    """The hostile cases, each between two valid events with a sequence number."""
    cases = [valid(0)]
    for n, case in enumerate(HOSTILE, start=1):
        cases += [case, valid(n)]
    return cases


# --- helpers ---------------------------------------------------------------------------


def start_bridge(bridge, server: HostileServer, **env: str) -> procs.Proc:
    return bridge(server, TUTUM_STREAM_URL=f"{server.url}/v1/events", **env)


def first_connection(server: HostileServer, proc: procs.Proc):
    def connected():
        if proc.popen.poll() is not None:
            raise AssertionError(f"bridge exited {proc.popen.returncode}: {proc.stderr[-2000:]}")
        return server.connections
    return wait_for(connected, 20, what="the bridge to connect")[0]


def collect(queue: str, count: int, timeout: float) -> list[broker.Received]:
    """What `queue` holds once it holds `count` messages, or at the deadline: the
    assertions then say which case is missing, rather than only how many."""
    try:
        wait_for(lambda: broker.queue_depth(queue) >= count, timeout, interval=0.2,
                 what=f"{count} messages in {queue}")
    except AssertionError:
        pass
    return broker.drain(queue, None, timeout=timeout, idle=0.5)


def routed_events(queue: str, count: int, timeout: float = 40) -> tuple[list, list]:
    """(upstream events, bridge lifecycle events) from a queue bound `#`."""
    got = collect(queue, count, timeout)
    return ([m for m in got if not m.routing_key.startswith("bridge.")],
            [m for m in got if m.routing_key.startswith("bridge.")])


def assert_nothing_more(*queues: str) -> None:
    for queue in queues:
        extra = broker.drain(queue, None, timeout=2, idle=0.5)
        assert not extra, f"{queue}: unexpected {[(m.routing_key, m.body[:80]) for m in extra]}"


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size, from the kernel."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def log_records(proc: procs.Proc) -> list[dict]:
    records = []
    for line in proc.stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def expected_head(case: Case, n: int) -> bytes:
    step = case.step
    return step.head(n) if isinstance(step, Streamed) else step.payload[:n]


def frame_size(case: Case) -> int:
    return case.step.size


# --- the tests -------------------------------------------------------------------------


def test_hostile_corpus_is_quarantined_or_neutralised_and_valid_events_flow(
        bridge, topology):
    cases = corpus()
    routed = [c for c in cases if c.route]
    quarantined = [c for c in cases if c.reasons]
    everything = topology.bind("#")
    with HostileServer([Script([c.step for c in cases])]) as server:
        proc = start_bridge(bridge, server)
        conn = first_connection(server, proc)

        events, lifecycle = routed_events(everything, len(routed) + 1)
        bad = collect(topology.quarantine, len(quarantined), timeout=30)
        assert_nothing_more(everything, topology.quarantine)
        assert proc.popen.poll() is None, f"bridge exited {proc.popen.returncode}: {proc.stderr}"
        rss = peak_rss_mb(proc.popen.pid)

    # One connection from start to end: no hostile frame may cost a reconnect,
    # since whatever the server sends meanwhile is lost for good.
    assert [m.routing_key for m in lifecycle] == ["bridge.connected"], proc.stderr[-3000:]
    assert "token=" in conn.path and "user=" in conn.path
    assert b"mid-stream" in conn.pongs() and b"between-fragments" in conn.pongs()

    bodies = [m.body for m in events]
    lost = [c.label for c in routed if c.payload not in bodies]
    assert not lost and len(events) == len(routed), (
        f"not routed: {lost}; quarantined instead: "
        f"{[(m.properties.headers.get('x-quarantine-reason'), m.body[:60]) for m in bad]}")
    assert len(bad) == len(quarantined), \
        f"quarantined {[(m.properties.headers, m.body[:60]) for m in bad]}"

    problems = []
    for case, msg in zip(routed, events):
        if (msg.routing_key, msg.body) != (case.route, case.payload):
            problems.append(f"{case.label}: got {msg.routing_key} {msg.body[:60]!r}, "
                            f"want {case.route} {case.payload[:60]!r}")
        p, h = msg.properties, msg.properties.headers or {}
        if (p.delivery_mode, p.content_type, p.app_id) != (2, "application/json", "tutum-bridge"):
            problems.append(f"{case.label}: properties {p}")
        if f"{h.get('type')}.{h.get('action')}" != case.route:
            problems.append(f"{case.label}: headers {h} do not match {case.route}")
    ids = [m.properties.message_id for m in events]
    assert all(ids) and len(set(ids)) == len(ids), "message_id missing or reused"

    for case, msg in zip(quarantined, bad):
        h = msg.properties.headers or {}
        reason, size = h.get("x-quarantine-reason"), frame_size(case)
        if reason not in case.reasons:
            problems.append(f"{case.label}: quarantined as {reason}, want {case.reasons}")
        if h.get("x-frame-bytes") != size:
            problems.append(f"{case.label}: x-frame-bytes {h.get('x-frame-bytes')}, want {size}")
        opcode = "binary" if getattr(case.step, "opcode", 1) == BINARY else "text"
        if h.get("x-frame-opcode") != opcode:
            problems.append(f"{case.label}: x-frame-opcode {h.get('x-frame-opcode')}")
        if reason == "oversize":
            if not (h.get("x-truncated") is True and 0 < len(msg.body) < size
                    and msg.body == expected_head(case, len(msg.body))):
                problems.append(f"{case.label}: oversize body {len(msg.body)} bytes, "
                                f"x-truncated {h.get('x-truncated')}")
        elif msg.body != case.payload:
            problems.append(f"{case.label}: quarantined body is not the frame's bytes")
        if not h.get("x-quarantine-detail") or msg.properties.delivery_mode != 2:
            problems.append(f"{case.label}: no detail or not persistent: {h}")
    assert not problems, "\n".join(problems)

    # What the logs say: one short line per quarantined frame, in order, no secret.
    lines = [r for r in log_records(proc) if "quarantin" in str(r.get("event", ""))]
    assert [r.get("reason") for r in lines] == \
        [m.properties.headers["x-quarantine-reason"] for m in bad]
    for case, record in zip(quarantined, lines):
        assert len(json.dumps(record)) < LOG_LINE_MAX, f"{case.label}: log line too long"
        head = expected_head(case, 8)
        if head and head.isascii() and head.decode().isprintable():
            assert any(head.decode() in v for v in record.values() if isinstance(v, str)), \
                f"{case.label}: no excerpt in {record}"
    assert len(proc.stderr) < 1 * MiB, "the log holds far more than excerpts"
    assert procs.SIM_APIKEY not in proc.stderr

    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB with a 20 MiB frame"


def test_header_fields_that_cannot_be_amqp_headers_still_route(bridge, topology):
    """Valid events whose `state`, `resource_uri` and `parents` break naive headers:
    lone surrogates (not encodable as UTF-8), huge values, 40,000 parents, and 64
    parent kinds of 1 KB each that together outgrow an AMQP frame. Each must be
    published byte for byte, and must not block the events after it."""
    lone = '"\\ud800"'
    uuid = "u" * 1010
    bomb = {"type": "container", "action": "update", "state": "S" * 1024,
            "resource_uri": "/api/v1/container/" + "r" * 1000 + "/",
            "parents": [f"/api/v1/k{i:02d}/{uuid}/" for i in range(64)]}
    hostile = [
        text("lone surrogate in state", '{"type":"container","action":"update","state":'
             + lone + "}", "container.update"),
        text("lone surrogate in resource_uri and parents",
             '{"type":"service","action":"create","resource_uri":' + lone
             + ',"parents":[' + lone + ',"/api/v1/stack/\\udfff/"]}', "service.create"),
        text("parents that are not strings",
             '{"type":"container","action":"update","parents":[1,null,{"a":[]},'
             '"/api/v1/service/s1/"]}', "container.update"),
        text("parents is an object", '{"type":"container","action":"update","parents":{}}',
             "container.update"),
        text("500 KB state", json.dumps({"type": "container", "action": "update",
                                         "state": "x" * 500_000}), "container.update"),
        text("40,000 parents", json.dumps({"type": "container", "action": "update",
                                           "parents": ["/api/v1/service/s/"] * 40_000}),
             "container.update"),
        text("64 parent kinds of 1 KB each", json.dumps(bomb), "container.update"),
    ]
    cases = [valid(0)]
    for n, case in enumerate(hostile, start=1):
        cases += [case, valid(n)]
    everything = topology.bind("#")
    with HostileServer([Script([c.step for c in cases])]) as server:
        proc = start_bridge(bridge, server)
        events, lifecycle = routed_events(everything, len(cases) + 1, timeout=30)
        assert proc.popen.poll() is None, proc.stderr[-3000:]
    assert [m.routing_key for m in lifecycle] == ["bridge.connected"]
    assert [(m.routing_key, m.body) for m in events] == [(c.route, c.payload) for c in cases]
    assert broker.queue_depth(topology.quarantine) == 0


def test_broken_connections_are_replaced_and_no_event_is_lost(bridge, topology):
    """Half frames, a header claiming 2^63 bytes, RFC 6455 violations: each kills its
    connection (nothing else can be parsed after it), and the bridge reconnects; the
    valid events around them all arrive, in order."""
    scripts = [
        Script([valid(1).step, Truncated(1000, sent=10, label="half a frame")], then="drop"),
        Script([valid(2).step, Truncated(2**63 - 1, sent=1000, label="claims 2^63 bytes")]),
        Script([valid(3).step, Frame(b"{}", opcode=0x3, label="reserved opcode 3")]),
        Script([valid(4).step, Frame(b'{"type":"x"}', opcode=0x0, label="lone continuation")]),
        Script([valid(5).step, Raw(b"\x81\x85abcd\x1a\x1b\x1c\x1d\x1e", label="masked frame")]),
        Script([valid(6).step]),
    ]
    everything = topology.bind("#")
    with HostileServer(scripts) as server:
        # Short pings: the 2^63-byte frame never ends, only silence detection ends it.
        proc = start_bridge(bridge, server, BRIDGE_PING_INTERVAL="1", BRIDGE_PING_TIMEOUT="1")
        events, lifecycle = routed_events(everything, 6 + 6 + 5, timeout=60)
        assert proc.popen.poll() is None, proc.stderr[-3000:]
        assert len(server.connections) == 6
    assert [m.body for m in events] == [valid(n).payload for n in range(1, 7)]
    connected = [json.loads(m.body) for m in lifecycle if m.routing_key == "bridge.connected"]
    assert connected[0]["gap"] is None
    assert all(c["gap"] and c["gap"]["seconds"] >= 0 for c in connected[1:])
    assert "Traceback" not in proc.stderr


GARBAGE_HANDSHAKES = [
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x00\xff\xfe\xfd\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"",                                                          # closed at once
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"  # wrong accept key
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",              # a TLS hello, to ws://
]


def test_garbage_instead_of_a_handshake_is_retried_not_fatal(bridge, topology):
    scripts = [Script(handshake=g) for g in GARBAGE_HANDSHAKES] + [Script([valid(1).step])]
    everything = topology.bind("#")
    with HostileServer(scripts) as server:
        proc = start_bridge(bridge, server, BRIDGE_RECONNECT_MAX="1")
        events, lifecycle = routed_events(everything, 2, timeout=40)
        assert proc.popen.poll() is None, proc.stderr[-3000:]
    assert [m.body for m in events] == [valid(1).payload]
    assert [m.routing_key for m in lifecycle] == ["bridge.connected"]
    assert "Traceback" not in proc.stderr
