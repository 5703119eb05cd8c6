"""The simulator as a client of the Tutum Stream API sees it (docs/contract.md section 2), over real sockets.

Every other test trusts the simulator to behave like Tutum and to inject exactly the
faults it is asked for; these tests hold it to that. The simulator runs as a real
subprocess; clients are websocket-client, raw sockets and urllib, never the bridge.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import websocket

from tests.support.procs import SIM_APIKEY, SIM_USER, Proc, simulator_stats
from tests.support.stream_client import events_url
from tests.support.wait import wait_for

FAST = ("--rate", "0")
DATETIME = re.compile(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                      r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                      r"\d\d:\d\d:\d\d \+0000\Z")
URI = re.compile(r"/api/v1/([a-z]+)/([0-9a-f-]{36})/\Z")


# --- helpers ------------------------------------------------------------------------

@pytest.fixture
def connect():
    """Factory: connect(sim, url=None, header=None) -> an open websocket-client socket.

    Closed at teardown, before the simulator stops, so no test pays for a client that
    would never answer the server's closing handshake.
    """
    opened: list[websocket.WebSocket] = []

    def open_(sim: Proc, url: str | None = None,
              header: list[str] | None = None) -> websocket.WebSocket:
        ws = websocket.create_connection(url or events_url(sim), header=header or [],
                                         timeout=10, skip_utf8_validation=True)
        opened.append(ws)
        return ws
    yield open_
    for ws in opened:
        ws.close(timeout=1)


def recv(ws: websocket.WebSocket, n: int) -> list[tuple[int, bytes]]:
    """The next `n` data frames as (opcode, payload); fails on a close frame."""
    out = []
    while len(out) < n:
        opcode, data = ws.recv_data()
        assert opcode != websocket.ABNF.OPCODE_CLOSE, f"closed after {len(out)} of {n}"
        out.append((opcode, bytes(data)))
    return out


def recv_json(ws: websocket.WebSocket, n: int) -> list[dict]:
    return [json.loads(data) for _, data in recv(ws, n)]


def greeted(ws: websocket.WebSocket) -> list[dict]:
    """The handshake frames: `auth`, then the `user-notifications` batch."""
    auth, batch = recv_json(ws, 2)
    assert auth == {"type": "auth", "user": SIM_USER}
    assert batch["type"] == "user-notifications" and isinstance(batch["data"], list)
    return [auth, batch]


def expect_close(ws: websocket.WebSocket, code: int) -> None:
    """The server closes with `code`; websocket-client has answered, so just hang up."""
    opcode, data = ws.recv_data()
    assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
    assert struct.unpack("!H", data[:2])[0] == code
    ws.shutdown()


def expect_silence(ws: websocket.WebSocket, seconds: float) -> None:
    ws.settimeout(seconds)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv_data()


def http_get(sim: Proc, path: str) -> tuple[int, str, bytes]:
    url = f"http://127.0.0.1:{sim.info['port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def basic(user: str, apikey: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{apikey}".encode()).decode()


# --- authentication -----------------------------------------------------------------

def test_every_tutum_auth_form_is_accepted(simulator, connect):
    sim = simulator(*FAST, "--count", "8", "--auth", "Bearer verbatim-token-42")
    port = sim.info["port"]
    forms = [
        dict(url=f"ws://127.0.0.1:{port}/v1/events?token={SIM_APIKEY}&user={SIM_USER}"),
        dict(url=f"ws://127.0.0.1:{port}/v1/events", header=[basic(SIM_USER, SIM_APIKEY)]),
        dict(url=f"ws://127.0.0.1:{port}/v1/events",
             header=[f"Authorization: ApiKey {SIM_USER}:{SIM_APIKEY}"]),
        dict(url=f"ws://127.0.0.1:{port}/v1/events",
             header=["Authorization: Bearer verbatim-token-42"]),
    ]
    for form in forms:
        ws = connect(sim, **form)
        greeted(ws)
        ws.close()
    stats = simulator_stats(sim)
    assert (stats["connections"], stats["rejected"]) == (4, 0)


BAD_LOGINS = [
    (f"token=wrong&user={SIM_USER}", None),
    (f"token={SIM_APIKEY}&user=mallory", None),
    (f"token={SIM_APIKEY}", None),
    ("", None),
    ("", basic(SIM_USER, "wrong")),
    ("", f"Authorization: ApiKey {SIM_USER}:wrong"),
    ("", "Authorization: Basic !!not-base64!!"),
    ("", "Authorization: Bearer verbatim-token-42"),      # not given with --auth
]


def test_bad_credentials_get_unauthorized_then_close(simulator, connect):
    sim = simulator(*FAST, "--count", "5")
    for query, header in BAD_LOGINS:
        ws = connect(sim, url=f"{sim.info['url']}/v1/events?{query}",
                     header=[header] if header else None)
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_TEXT
        assert json.loads(data) == {"type": "error", "data": {"errorMessage": "UNAUTHORIZED"}}
        expect_close(ws, 1008)
    assert simulator_stats(sim) == {"sent": 0, "malformed": 0, "connections": 0,
                                    "active": 0, "rejected": len(BAD_LOGINS), "last_seq": 0,
                                    "per_connection": {}}
    # The key never reaches the log, in any form a client might have sent it.
    for secret in (SIM_APIKEY, base64.b64encode(f"{SIM_USER}:{SIM_APIKEY}".encode()).decode()):
        assert secret not in sim.stderr


# --- the stream -----------------------------------------------------------------------

def test_auth_then_notifications_then_well_formed_events(simulator, connect):
    sim = simulator("--rate", "200", "--count", "20")
    ws = connect(sim)
    _, batch = greeted(ws)
    assert 1 <= len(batch["data"]) <= 3
    for note in batch["data"]:
        assert note["type"] == "user-notification" and DATETIME.match(note["datetime"])
    for event in recv_json(ws, 20):
        assert set(event) == {"type", "action", "parents", "resource_uri", "state", "uuid",
                              "datetime"}
        assert event["action"] in ("create", "update", "delete")
        assert URI.match(event["resource_uri"]).groups() == (event["type"], event["uuid"])
        assert DATETIME.match(event["datetime"])


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(simulator, connect):
    def first_frames(*flags: str, name: str) -> list[tuple[int, bytes]]:
        ws = connect(simulator(*FAST, "--count", "300", *flags, name=name))
        frames = recv(ws, 302)
        ws.close()
        return frames

    one = first_frames("--seed", "11", name="one")
    assert first_frames("--seed", "11", name="two") == one
    assert first_frames("--seed", "12", name="three")[2:] != one[2:]
    # A stream built before listening is the same stream (the greeting's datetimes are
    # the world's time at the end of it).
    assert first_frames("--seed", "11", "--prebuild", name="four")[2:] == one[2:]


def test_parents_exist_before_their_children_and_outlive_them(simulator, connect):
    """Over a long stretch of a world: creates come first, deletes last, parents hold."""
    sim = simulator(*FAST, "--count", "3000", "--seed", "5")
    ws = connect(sim)
    greeted(ws)
    events = recv_json(ws, 3000)
    ws.close()

    alive: dict[str, str] = {}          # resource_uri -> type, for objects not deleted
    seen_kinds, action_states = set(), set()
    for i, event in enumerate(events):
        uri, kind = event["resource_uri"], event["type"]
        seen_kinds.add((kind, event["action"]))
        parents = event["parents"]
        if kind == "action":
            action_states.add(event["state"])
            assert len(parents) == 1
            if event["action"] == "create":
                assert parents[0] in alive, (i, event)
            continue
        if event["action"] == "create":
            assert uri not in alive, (i, event)
            alive[uri] = kind
        else:
            assert alive.get(uri) == kind, ("event for an unknown object", i, event)
        parent_kinds = [alive.get(p) for p in parents]
        assert None not in parent_kinds, ("parent not alive", i, event)
        expected = {"container": (["service", "node"], ["service", "stack", "node"]),
                    "service": ([], ["stack"]), "node": (["nodecluster"],),
                    "stack": ([],), "nodecluster": ([],)}[kind]
        assert parent_kinds in expected, (i, event)
        if event["action"] == "delete":
            assert event["state"] == "Terminated"
            del alive[uri]
            assert not any(uri in e["parents"] for e in events[i + 1:] if e["type"] != "action")
    for kind in ("container", "service", "stack", "node", "nodecluster"):
        assert (kind, "create") in seen_kinds and (kind, "update") in seen_kinds, kind
    assert ("container", "delete") in seen_kinds and ("service", "delete") in seen_kinds
    assert {"In progress", "Success"} <= action_states


def test_count_then_the_connection_stays_open_and_answers_pings(simulator, connect):
    sim = simulator(*FAST, "--count", "25")
    ws = connect(sim)
    greeted(ws)
    recv(ws, 25)
    expect_silence(ws, 0.5)
    ws.settimeout(5)
    ws.ping(b"still there?")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"still there?")
    stats = simulator_stats(sim)
    assert (stats["sent"], stats["last_seq"], stats["active"]) == (25, 25, 1)
    ws.close()
    wait_for(lambda: simulator_stats(sim)["active"] == 0, 5, what="active back to 0")


def test_concurrent_connections_share_one_stream_each_event_once(simulator, connect):
    sim = simulator("--rate", "150", "--count", "120", "--sequence")
    clients = [connect(sim) for _ in range(2)]
    got: list[list[int]] = [[], []]

    def read(i: int) -> None:
        greeted(clients[i])
        clients[i].settimeout(0.1)
        deadline = time.monotonic() + 10
        while len(got[0]) + len(got[1]) < 120 and time.monotonic() < deadline:
            try:
                got[i].append(json.loads(clients[i].recv())["sim_seq"])
            except websocket.WebSocketTimeoutException:
                pass

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert got[0] and got[1]
    assert sorted(got[0] + got[1]) == list(range(1, 121))
    assert all(seq == sorted(seq) for seq in got)


def test_a_fixed_rate_is_kept(simulator, connect):
    sim = simulator("--rate", "300", "--count", "301")
    ws = connect(sim)
    greeted(ws)
    recv(ws, 1)
    t0 = time.monotonic()
    recv(ws, 300)
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed <= 1.25, elapsed


# --- HTTP routes ----------------------------------------------------------------------

def test_http_routes_stats_health_and_404(simulator, connect):
    sim = simulator(*FAST, "--count", "10", "--malformed-every", "5")
    assert http_get(sim, "/healthz")[0] == 200
    for path in ("/", "/v1/event", "/v2/events", "/stats/more", "/v1/events/x"):
        assert http_get(sim, path)[0] == 404, path
    # A plain GET of the events path is not a websocket: refused, not served.
    assert http_get(sim, "/v1/events")[0] == 426

    ws = connect(sim)
    greeted(ws)
    recv(ws, 12)
    bad = connect(sim, url=f"{sim.info['url']}/v1/events?token=x&user=y")
    bad.recv_data()
    status, content_type, body = http_get(sim, "/stats")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"sent": 10, "malformed": 2, "connections": 1, "active": 1,
                                "rejected": 1, "last_seq": 10,
                                "per_connection": {"1": {"sent": 10, "open": True}}}


def test_wss_with_a_certificate(simulator, connect, tmp_path):
    import ssl

    from tests.support.tls import make_pki
    pki = make_pki(tmp_path / "pki")
    sim = simulator(*FAST, "--count", "3", "--certfile", str(pki.server_cert),
                    "--keyfile", str(pki.server_key))
    assert sim.info["url"] == f"wss://127.0.0.1:{sim.info['port']}"
    ws = websocket.create_connection(events_url(sim), timeout=10,
                                     sslopt={"ca_certs": str(pki.ca),
                                             "cert_reqs": ssl.CERT_REQUIRED})
    try:
        assert json.loads(ws.recv()) == {"type": "auth", "user": SIM_USER}
    finally:
        ws.close()


# --- faults -----------------------------------------------------------------------------

def test_drop_every_closes_cleanly_and_the_next_connection_continues(simulator, connect):
    sim = simulator(*FAST, "--count", "25", "--drop-every", "10", "--sequence")
    seqs = []
    for expected in (range(1, 11), range(11, 21)):
        ws = connect(sim)
        greeted(ws)
        events = recv_json(ws, 10)
        assert [e["sim_seq"] for e in events] == list(expected)
        assert all(isinstance(e["sim_sent_at"], float) for e in events)
        expect_close(ws, 1000)
        seqs += [e["sim_seq"] for e in events]
    ws = connect(sim)
    greeted(ws)
    assert [e["sim_seq"] for e in recv_json(ws, 5)] == list(range(21, 26))
    expect_silence(ws, 0.5)
    assert time.time() - 60 < events[-1]["sim_sent_at"] <= time.time()
    assert simulator_stats(sim)["connections"] == 3


def test_malformed_every_cycles_through_every_kind(simulator, connect):
    sim = simulator(*FAST, "--count", "12", "--malformed-every", "2", "--sequence")
    ws = connect(sim)
    greeted(ws)
    frames = recv(ws, 12 + 6)
    valid = [f for i, f in enumerate(frames) if i % 3 != 2]
    malformed = [f for i, f in enumerate(frames) if i % 3 == 2]
    assert [json.loads(data)["sim_seq"] for _, data in valid] == list(range(1, 13))

    opcode, data = malformed[0]
    with pytest.raises(ValueError):
        json.loads(data)                                    # invalid JSON
    assert isinstance(json.loads(malformed[1][1]), list)    # a JSON array
    assert malformed[2][0] == websocket.ABNF.OPCODE_BINARY  # a binary frame
    assert not isinstance(json.loads(malformed[3][1])["type"], str)
    with pytest.raises(UnicodeDecodeError):
        malformed[4][1].decode("utf-8")                     # invalid UTF-8, text frame
    assert malformed[4][0] == websocket.ABNF.OPCODE_TEXT
    assert malformed[5] == malformed[0]                     # and round again
    assert all(op == websocket.ABNF.OPCODE_TEXT for op, _ in valid)
    stats = simulator_stats(sim)
    assert (stats["sent"], stats["malformed"], stats["last_seq"]) == (12, 6, 12)


def test_stall_goes_silent_without_pongs_then_resumes(simulator, connect):
    sim = simulator("--rate", "100", "--count", "12", "--stall-after", "5",
                    "--stall-seconds", "1.5")
    ws = connect(sim)
    greeted(ws)
    recv(ws, 5)
    t0 = time.monotonic()
    ws.ping(b"anyone?")
    ws.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv_data_frame(control_frame=True)          # neither events nor a pong
    ws.settimeout(5)
    events = 0
    while True:                 # the pong and the events resume together, in any order
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            break
        events += opcode == websocket.ABNF.OPCODE_TEXT
    assert frame.data == b"anyone?"
    assert time.monotonic() - t0 >= 1.3
    recv(ws, 7 - events)


def test_replay_sends_each_line_verbatim(simulator, tmp_path, connect):
    lines = [b'{"type": "container", "action": "update", "state": "Running"}',
             b'{"type":"Service","action":"create","extra":{"nested":[1,2,3]}}',
             b'{"type": "containter", "action": "delete"}  ',
             '{"type": "node", "state": "Déployé ✓"}'.encode(),
             b'not json at all']
    replay = tmp_path / "replay.jsonl"
    replay.write_bytes(b"\n".join(lines[:2]) + b"\r\n" + b"\n".join(lines[2:]) + b"\n\n")
    sim = simulator(*FAST, "--replay", str(replay), "--sequence")
    ws = connect(sim)
    greeted(ws)
    assert recv(ws, len(lines)) == [(websocket.ABNF.OPCODE_TEXT, line) for line in lines]
    expect_silence(ws, 0.5)
    assert simulator_stats(sim)["sent"] == len(lines)


# --- robustness -------------------------------------------------------------------------

def raw_exchange(port: int, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


def handshake_request(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "\r\n").encode()


def test_misbehaving_clients_do_not_hurt_the_server(simulator, connect):
    sim = simulator(*FAST, "--count", "10000000", "--sequence")
    port = sim.info["port"]
    good_path = f"/v1/events?token={SIM_APIKEY}&user={SIM_USER}"

    # Not HTTP, too long, half a request, gone right after the handshake, garbage
    # frames straight after it: each ends that connection, and only that one.
    assert not raw_exchange(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 101")
    assert raw_exchange(port, b"\x00" * 70000).startswith(b"HTTP/1.1 4")
    raw_exchange(port, b"GET /v1/events HTTP/1.1\r\nHost:", read=False)
    raw_exchange(port, handshake_request(good_path), read=False)
    raw_exchange(port, handshake_request(good_path) + b"\xff" * 200)

    # A client sending data of its own, and pinging, while reading.
    ws = connect(sim)
    greeted(ws)
    for i in range(100):
        ws.send(json.dumps({"from": "client", "i": i}))
    ws.ping(b"p")
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            break
    ws.close()

    # A client that vanishes (RST) in the middle of a fast stream.
    for _ in range(3):
        quitter = connect(sim)
        recv(quitter, 500)
        quitter.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        quitter.sock.close()

    # Still serving, and the stream still continuous for the next client.
    wait_for(lambda: simulator_stats(sim)["active"] == 0, 10, what="dead sessions to end")
    before = simulator_stats(sim)["last_seq"]
    ws = connect(sim)
    greeted(ws)
    assert json.loads(ws.recv())["sim_seq"] == before + 1
    ws.close()
    assert http_get(sim, "/healthz")[0] == 200
    assert sim.popen.poll() is None
    assert "Traceback" not in sim.stderr


def test_sigterm_stops_promptly_with_exit_0_even_with_a_stalled_client(simulator, connect):
    sim = simulator("--rate", "100", "--stall-after", "1", "--stall-seconds", "60")
    ws = connect(sim)
    greeted(ws)
    recv(ws, 1)
    wait_for(lambda: "stalled" in sim.stderr, 5, what="the stall to start")
    t0 = time.monotonic()
    assert sim.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    assert "Traceback" not in sim.stderr


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port"),
    (["--rate", "-1"], "--rate"),
    (["--count", "0"], "--count"),
    (["--keyfile", __file__], "--keyfile needs --certfile"),
    (["--stall-seconds", "3"], "--stall-seconds needs --stall-after"),
    (["--replay", "/nonexistent/file.jsonl"], "--replay"),
    (["--prebuild"], "--prebuild needs --count"),
])
def test_bad_options_are_one_line_and_exit_2(flags, message):
    result = subprocess.run([sys.executable, "-m", "bridge", "simulate", *flags],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
