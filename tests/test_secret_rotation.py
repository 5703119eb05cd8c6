"""A rotated TUTUM_APIKEY_FILE is read at the next reconnect (docs/contract.md section 5).

Kubernetes Secrets and systemd credentials are rotated under a running process. The
stream side must pick the new key up when it reconnects, or it loops on UNAUTHORIZED
(exit 3) with the new key sitting in the file. (The broker side, AMQP_PASSWORD_FILE, is
in tests/test_broker_faults.py.)
"""

from __future__ import annotations

import json

from tests.support.broker import drain

OLD_KEY, NEW_KEY = "Old-Key-0b5e", "New-Key-d41f"


def test_a_rotated_api_key_file_is_read_at_the_next_reconnect(
        simulator, bridge, topology, tmp_path):
    everything = topology.bind("#")
    key_file = tmp_path / "apikey"
    key_file.write_text(OLD_KEY + "\n")
    first = simulator("--rate", "0", "--count", "10", "--sequence", apikey=OLD_KEY)
    proc = bridge(first, TUTUM_APIKEY="", TUTUM_APIKEY_FILE=str(key_file))
    before = drain(everything, count=12, timeout=30)     # bridge.connected, notices, 10

    key_file.write_text(NEW_KEY + "\n")     # the secret rotates: the server takes only the new key
    assert first.stop() == 0
    simulator("--rate", "0", "--count", "10", "--sequence", "--port", str(first.info["port"]),
              apikey=NEW_KEY, name="simulator-rotated")

    after = drain(everything, count=13, timeout=30)  # disconnected, connected, notices, 10
    assert proc.popen.poll() is None, proc.stderr[-3000:]
    events = [json.loads(m.body) for m in before + after if not m.routing_key.startswith("bridge.")]
    assert sum(1 for e in events if "sim_seq" in e) == 20
    assert [m.routing_key for m in after[:2]] == ["bridge.disconnected", "bridge.connected"]
    assert proc.stop() == 0
    assert OLD_KEY not in proc.stderr and NEW_KEY not in proc.stderr
