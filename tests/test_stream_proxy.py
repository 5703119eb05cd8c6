"""The stream through an HTTP proxy (bridge/proxy.py; README, "Configuration").

A real proxy on a real socket (tests/support/http_proxy.py) that only tunnels, as
egress proxies do. The bridge reads `http_proxy` / `https_proxy` / `no_proxy` as curl
does, asks for a tunnel to the stream, and speaks TLS and the websocket inside it:
events arrive, the stream's own certificate is still the one verified, the proxy's
password never reaches the log, and a proxy that refuses is retried, not fatal.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import pytest

from tests.support import procs
from tests.support.http_proxy import HttpConnectProxy
from tests.support.wait import wait_for
from tests.test_tls import EVENTS, exit_code, pki, simulated_events, wss_simulator  # noqa: F401

PASSWORD = "s3cret-proxy-pw"


@pytest.fixture
def proxy():
    with HttpConnectProxy(credentials=f"bridge:{PASSWORD}") as server:
        yield server


def authority(sim: procs.Proc) -> str:
    parts = urlsplit(sim.info["url"])
    return f"{parts.hostname}:{parts.port}"


def log_lines(proc: procs.Proc, event: str) -> list[dict]:
    return [json.loads(line) for line in proc.stderr.splitlines()
            if line.startswith("{") and json.loads(line).get("event") == event]


def test_the_stream_through_a_proxy_delivers_and_the_log_hides_its_password(
        proxy, simulator, bridge, topology):
    sim = simulator("--sequence", "--rate", "0", "--count", str(EVENTS))
    queue = topology.bind("#")
    proc = bridge(sim, http_proxy=proxy.url(f"bridge:{PASSWORD}@"))
    events = simulated_events(queue)
    assert [e["sim_seq"] for e in events] == list(range(1, EVENTS + 1))
    token = base64.b64encode(f"bridge:{PASSWORD}".encode()).decode()
    assert [(r.authority, r.authorization) for r in proxy.requests] == [
        (authority(sim), f"Basic {token}")]
    assert log_lines(proc, "stream.connecting")[0]["via"] == proxy.url("bridge:***@")
    proc.stop()
    assert PASSWORD not in proc.stderr and token not in proc.stderr


def test_wss_through_a_proxy_still_verifies_the_streams_own_certificate(
        pki, simulator, bridge, topology, tmp_path):
    sim = wss_simulator(simulator, pki, "--rate", "0", "--count", str(EVENTS))
    queue = topology.bind("#")
    with HttpConnectProxy() as proxy:
        bridge(sim, https_proxy=proxy.url(), http_proxy="http://127.0.0.1:9",
               TUTUM_CA_FILE=str(pki.ca))
        assert len(simulated_events(queue)) >= EVENTS
        assert [r.authority for r in proxy.requests] == [authority(sim)]

        untrusting = bridge(sim, name="untrusting", https_proxy=proxy.url(),
                            BRIDGE_SPOOL=str(tmp_path / "untrusting.sqlite3"))
        assert exit_code(untrusting) == 1            # no TUTUM_CA_FILE: as without a proxy
        assert "certificate" in untrusting.stderr.lower()


def test_no_proxy_sends_the_stream_around_the_proxy(proxy, simulator, bridge, topology):
    sim = simulator("--sequence", "--rate", "0", "--count", str(EVENTS))
    queue = topology.bind("#")
    bridge(sim, http_proxy=proxy.url(), no_proxy="localhost, 127.0.0.0/8")
    assert len(simulated_events(queue)) >= EVENTS
    assert proxy.requests == []


def test_a_proxy_that_refuses_is_retried_in_a_log_line_not_fatal(proxy, simulator, bridge):
    sim = simulator()
    proc = bridge(sim, http_proxy=proxy.url("bridge:wrong@"), BRIDGE_RECONNECT_MAX="0.2")

    def refused_twice():
        assert proc.popen.poll() is None, proc.stderr[-2000:]
        return len(log_lines(proc, "stream.connect_failed")) >= 2
    wait_for(refused_twice, 20, 0.1, what="two refused CONNECTs, retried")
    reason = log_lines(proc, "stream.connect_failed")[0]["reason"]
    assert "407 Proxy Authentication Required" in reason, reason
    assert "bridge:***@" in reason and "wrong" not in proc.stderr
    assert proc.stop() == 0
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:1080", "https://127.0.0.1:3128",
                                   "http://127.0.0.1:port"])
def test_a_proxy_url_the_bridge_cannot_use_is_exit_2_in_one_line(value, simulator, bridge):
    sim = simulator()
    proc = bridge(sim, http_proxy=value)
    assert exit_code(proc) == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "http_proxy" in lines[0], proc.stderr
