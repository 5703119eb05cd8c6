"""TLS on both sides of the bridge, with a private CA made by the test.

Upstream: the simulator serves wss:// with a certificate from the test CA; the
bridge trusts it only through TUTUM_CA_FILE. Downstream: a private RabbitMQ node
with an amqps:// listener; the bridge trusts it only through AMQP_CA_FILE and can
present a client certificate. A certificate that does not verify is a configuration
problem, not weather: the bridge says so in one line and exits 1 at once, instead of
retrying in a loop (errors.TLSVerificationError).
"""

from __future__ import annotations

import json
import ssl
import subprocess

import pytest

from tests.support import broker, procs
from tests.support.hostile_server import HostileServer, Script
from tests.support.tls import make_pki
from tests.support.tls_rabbit import TlsRabbitNode
from tests.support.wait import wait_for

EVENTS = 5
FAIL_FAST = 20.0      # seconds a verification failure may take to end the process


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(pki):
    """One amqps:// node for the module: a node start costs ~10 s on this machine."""
    node = TlsRabbitNode(pki).start()
    try:
        yield node
    finally:
        node.discard()


def start(bridge, sim, **env: object) -> procs.Proc:
    return bridge(sim, **{k: str(v) for k, v in env.items()})


def simulated_events(queue: str, url: str = broker.AMQP_URL) -> list[dict]:
    """The simulator's sequenced events that reached `queue` (waits for EVENTS)."""
    seen: list[dict] = []

    def arrived():
        for msg in broker.drain(queue, None, timeout=1, idle=0.2, url=url):
            body = json.loads(msg.body)
            if "sim_seq" in body:
                seen.append(body)
        return len(seen) >= EVENTS
    wait_for(arrived, 30, interval=0.2, what=f"{EVENTS} simulated events in {queue}")
    return seen


def exit_code(proc: procs.Proc) -> int:
    """The exit code, if the process ends within FAIL_FAST seconds (a retry loop won't)."""
    try:
        return proc.wait(FAIL_FAST)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {FAIL_FAST}s: {proc.stderr[-2000:]}") from None


def assert_fails_fast_with_one_line(proc: procs.Proc, *words: str) -> str:
    """Exit 1 within FAIL_FAST seconds, one non-log line naming the problem, no traceback."""
    code = exit_code(proc)
    stderr = proc.stderr
    assert code == 1, f"exit {code}: {stderr[-2000:]}"
    assert "Traceback" not in stderr
    plain = [line for line in stderr.splitlines() if line.strip() and not _is_json(line)]
    assert len(plain) == 1, plain
    for word in words:
        assert word in plain[0].lower(), plain[0]
    return plain[0]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


# --- upstream: wss:// ------------------------------------------------------------------


def wss_simulator(simulator, pki, *flags: str) -> procs.Proc:
    sim = simulator("--certfile", str(pki.server_cert), "--keyfile", str(pki.server_key),
                    "--sequence", *flags)
    assert sim.info["url"].startswith("wss://"), sim.info
    return sim


def test_stream_over_wss_verified_by_private_ca_delivers(pki, simulator, bridge, topology):
    sim = wss_simulator(simulator, pki, "--rate", "0", "--count", str(EVENTS))
    queue = topology.bind("#")
    proc = start(bridge, sim, TUTUM_CA_FILE=pki.ca)
    events = simulated_events(queue)
    assert [e["sim_seq"] for e in events] == list(range(1, EVENTS + 1))
    assert proc.popen.poll() is None, proc.stderr[-2000:]


def test_stream_certificate_from_unknown_ca_exits_1_at_once(pki, simulator, bridge):
    sim = wss_simulator(simulator, pki)
    proc = start(bridge, sim)        # no TUTUM_CA_FILE: the system store lacks the test CA
    assert_fails_fast_with_one_line(proc, "certificate", "verif")


def test_stream_certificate_for_another_host_is_refused(pki, bridge):
    """Hostname checking is on: a certificate from the trusted CA for another name
    does not do, and the bridge tries once, not in a loop."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.wrong_name_cert, pki.wrong_name_key)
    with HostileServer([Script()], tls=context) as server:
        proc = start(bridge, server, TUTUM_CA_FILE=pki.ca)
        assert_fails_fast_with_one_line(proc, "certificate")
        assert len(server.connections) == 1


# --- downstream: amqps:// --------------------------------------------------------------


def test_amqps_verified_by_private_ca_delivers(pki, tls_node, simulator, bridge, topology):
    sim = simulator("--rate", "0", "--sequence", "--count", str(EVENTS))
    queue = topology.bind("#", url=tls_node.url)
    proc = start(bridge, sim, AMQP_URL=tls_node.amqps_url(), AMQP_CA_FILE=pki.ca)
    events = simulated_events(queue, url=tls_node.url)
    assert [e["sim_seq"] for e in events] == list(range(1, EVENTS + 1))
    assert proc.popen.poll() is None, proc.stderr[-2000:]


def test_amqps_client_certificate_is_presented_and_accepted(
        pki, tls_node, simulator, bridge, topology):
    sim = simulator("--rate", "0", "--sequence", "--count", str(EVENTS))
    queue = topology.bind("#", url=tls_node.url)
    proc = start(bridge, sim, AMQP_URL=tls_node.amqps_url(), AMQP_CA_FILE=pki.ca,
                 AMQP_CERT_FILE=pki.client_cert, AMQP_KEY_FILE=pki.client_key)
    simulated_events(queue, url=tls_node.url)
    # The node verified the certificate it was shown (verify_peer): it names it.
    assert "CN=client" in tls_node.peer_cert_subjects()
    assert proc.popen.poll() is None, proc.stderr[-2000:]


def test_amqps_broker_certificate_from_unknown_ca_exits_1_at_once(
        pki, tls_node, simulator, bridge):
    sim = simulator()
    proc = start(bridge, sim, AMQP_URL=tls_node.amqps_url(), AMQP_CA_FILE=pki.untrusted_ca)
    assert_fails_fast_with_one_line(proc, "certificate", "verif")


def test_amqps_client_certificate_the_broker_rejects_is_fatal(
        pki, tls_node, simulator, bridge):
    """The broker refuses a client certificate from a CA it does not know: retrying
    cannot fix that, so the bridge must say so and stop, not loop quietly."""
    sim = simulator()
    proc = start(bridge, sim, AMQP_URL=tls_node.amqps_url(), AMQP_CA_FILE=pki.ca,
                 AMQP_CERT_FILE=pki.untrusted_client_cert,
                 AMQP_KEY_FILE=pki.untrusted_client_key)
    code = exit_code(proc)
    assert code in (1, 4), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    plain = [line for line in proc.stderr.splitlines() if line.strip() and not _is_json(line)]
    assert len(plain) == 1 and "certificate" in plain[0].lower(), plain
