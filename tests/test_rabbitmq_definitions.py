"""deploy/rabbitmq/definitions.json, imported into a fresh vhost of the shared broker
(vhost and user renamed for this test, deleted after), is enough for a bridge there:
its least-privilege user publishes events and quarantines, and may do nothing else."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import pika
import pytest

from tests.support.broker import drain, queue_depth
from tests.support.wait import wait_for

DEFINITIONS = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq" / "definitions.json"


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def imported():
    """(vhost, user, password) after importing the definitions under unique names."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (apt-get install rabbitmq-server)")
    if ctl("list_vhosts").returncode != 0:
        pytest.skip("rabbitmqctl cannot reach the shared broker (a broker in a container?)")
    vhost, user = f"t-vh-{uuid.uuid4().hex[:8]}", f"t-bridge-{uuid.uuid4().hex[:8]}"
    definitions = json.loads(DEFINITIONS.read_text())
    for key in ("permissions", "policies", "exchanges", "queues", "bindings"):
        for item in definitions[key]:
            item["vhost"] = vhost
    definitions["vhosts"] = [{"name": vhost}]
    for item in definitions["users"] + definitions["permissions"]:
        item["name" if "name" in item else "user"] = user
    # Hex, not urlsafe: a password that starts with '-' is read by rabbitmqctl as an
    # option (CI drew one once and change_password exited 64).
    password = secrets.token_hex(16)
    try:
        # In /tmp, readable: rabbitmqctl runs as the rabbitmq user, who cannot enter
        # pytest's tmp_path. The file holds no secret (the password is set below).
        with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
            json.dump(definitions, file)
            file.flush()
            os.chmod(file.name, 0o644)
            result = ctl("import_definitions", file.name)
        assert result.returncode == 0, result.stderr
        # The import runs asynchronously: done once the user's permissions are there.
        wait_for(lambda: user in ctl("list_permissions", "-p", vhost).stdout, 30, 0.2,
                 "the definitions imported")
        assert ctl("change_password", user, password).returncode == 0
        # The test's own consumer: guest, in this vhost only.
        assert ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*").returncode == 0
        yield vhost, user, password
    finally:
        ctl("delete_vhost", vhost)
        ctl("delete_user", user)


def test_a_bridge_runs_on_the_definitions_with_least_privilege(imported, simulator, bridge):
    vhost, user, password = imported
    guest_url = f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    bridge_url = f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost, safe='')}"
    with pika.BlockingConnection(pika.URLParameters(guest_url)) as conn:
        conn.channel().queue_declare("t-worker", durable=False, auto_delete=False)
        conn.channel().queue_bind("t-worker", "tutum.events", "container.*")
    sim = simulator("--rate", "50", "--malformed-every", "10")
    proc = bridge(sim, AMQP_URL=bridge_url, BRIDGE_EXCHANGE="tutum.events",
                  BRIDGE_UNROUTED="tutum.unrouted", BRIDGE_QUARANTINE="tutum.invalid")
    assert drain("t-worker", count=5, timeout=30, url=guest_url)
    # Quarantine goes through the default exchange (write on amq.default), routed or not.
    wait_for(lambda: queue_depth("tutum.invalid", url=guest_url) > 0, 30, 0.2, "a quarantined frame")
    wait_for(lambda: queue_depth("tutum.unrouted", url=guest_url) > 0, 30, 0.2, "an unrouted event")
    assert proc.popen.poll() is None, proc.stderr[-2000:]
    assert proc.stop() == 0

    # Nothing beyond what the bridge needs.
    with pika.BlockingConnection(pika.URLParameters(bridge_url)) as conn:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            conn.channel().queue_declare("someone-elses-queue")
        assert refused.value.reply_code == 403
    with pika.BlockingConnection(pika.URLParameters(bridge_url)) as conn:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            conn.channel().basic_get("tutum.invalid")
        assert refused.value.reply_code == 403
