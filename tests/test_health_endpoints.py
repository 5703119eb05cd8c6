"""/livez, /readyz and /healthz of a running bridge (docs/contract.md section 9): a
broker outage and a stream outage make it unready and never un-live, and it is ready
again once both come back. The broker is reached through a TCP proxy, so the outage
is real for the bridge while the shared broker is untouched."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from tests.support.broker import drain
from tests.support.procs import metric, metrics_address
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for


def probe(bridge, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{metrics_address(bridge)}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_outages_make_the_bridge_unready_never_unlive(simulator, bridge, topology):
    queue = topology.bind("#")
    sim = simulator("--rate", "20")
    with TcpProxy("127.0.0.1", 5672) as proxy:
        proc = bridge(sim, AMQP_URL=proxy.url("amqp", "guest:guest@", "/%2F"),
                      BRIDGE_METRICS_ADDR="127.0.0.1:0", BRIDGE_RECONNECT_MAX="1")
        wait_for(lambda: probe(proc, "/readyz")[0] == 200, 30, 0.2, "ready")
        assert probe(proc, "/healthz")[0] == 200
        status, body = probe(proc, "/livez")
        assert status == 200 and set(body["seconds_since_progress"]) == {
            "main", "stream", "publisher"}

        proxy.pause("refuse")
        status, body = wait_for(lambda: (s := probe(proc, "/readyz"))[0] == 503 and s,
                                30, 0.2, "unready in the broker outage")
        assert "broker" in body["failing"] and "stream" not in body["failing"]
        assert probe(proc, "/healthz")[0] == 503
        # Still spooling what the stream sends: live, whatever the outage's length.
        spooled = metric(proc, "tutum_bridge_spool_events")
        wait_for(lambda: metric(proc, "tutum_bridge_spool_events") > spooled + 20, 30, 0.2,
                 "events spooled during the outage")
        status, body = probe(proc, "/livez")
        assert (status, body["ok"]) == (200, True)

        proxy.resume()
        wait_for(lambda: probe(proc, "/readyz")[0] == 200, 30, 0.2, "ready after the outage")
        assert metric(proc, "tutum_bridge_broker_losses_total") >= 1
        assert metric(proc, "tutum_bridge_broker_connects_total") >= 2

        sim.stop()
        status, body = wait_for(lambda: (s := probe(proc, "/readyz"))[0] == 503 and s,
                                30, 0.2, "unready without a stream")
        assert "stream" in body["failing"] and "broker" not in body["failing"]
        assert probe(proc, "/livez")[0] == 200
        wait_for(lambda: metric(proc, "tutum_bridge_spool_events") == 0, 30, 0.2,
                 "the spool drained")
        assert metric(proc, "tutum_bridge_stream_disconnected_seconds_total") > 0
        assert metric(proc, "tutum_bridge_receive_to_confirm_seconds_count") > 0
        assert proc.stop() == 0
    assert drain(queue)


def test_under_systemd_the_bridge_says_ready_keeps_the_watchdog_and_says_stopping(
        simulator, bridge, tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        proc = bridge(simulator(), NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
        assert sock.recv(64) == b"READY=1"
        assert sock.recv(64) == b"WATCHDOG=1"
        assert sock.recv(64) == b"WATCHDOG=1"        # again, a second later
        assert proc.stop() == 0
        messages = [sock.recv(64)]
        while messages[-1] == b"WATCHDOG=1":
            messages.append(sock.recv(64))
        assert messages[-1] == b"STOPPING=1"
