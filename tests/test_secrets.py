"""Secrets (docs/contract.md section 5): the API key, TUTUM_AUTH and the AMQP password never leave the process.

Logs go to aggregators, metrics to dashboards, `ps` output to anyone on the host. So
every byte the bridge writes -- at debug level, in both log formats, on success and on
each kind of failed login -- plus its metrics, its `--help` and its command line is
searched for each secret in every form it could take on the way out (raw,
URL-encoded, inside a Basic header).
"""

from __future__ import annotations

import base64
import re
import subprocess
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.support import broker, procs

TAG = uuid.uuid4().hex[:8]
# Characters that URL encoding and Basic auth change, so each form is a distinct string.
APIKEY = f"KeyZq{TAG}+/=k3y"
WRONG_APIKEY = f"WrongKeyZq{TAG}+/="
AMQP_PASSWORD = f"PwZq{TAG}+/=@:pw"
WRONG_AMQP_PASSWORD = f"WrongPwZq{TAG}+/="
USER = "alice"


def forms(secret: str) -> set[str]:
    """Every way a secret could be printed."""
    out = {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}
    for text in (secret, f"{USER}:{secret}"):
        out.add(base64.b64encode(text.encode()).decode().rstrip("="))
    return out


def assert_no_secret(text: str | bytes, *secrets: str, where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{where} shows a secret ({form!r})"


def rabbitmqctl(*argsets: tuple[str, ...]) -> None:
    """Run rabbitmqctl commands concurrently (each costs a few seconds of Erlang start)."""
    running = [subprocess.Popen(["rabbitmqctl", "-q", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for args in argsets]
    for proc, args in zip(running, argsets):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"rabbitmqctl {args[0]}: {out.decode()}"


@pytest.fixture(scope="module")
def account():
    """A vhost and a user with a distinctive password, just for these tests."""
    vhost, user = f"t-secrets-{TAG}", f"t-secrets-{TAG}"
    rabbitmqctl(("add_vhost", vhost), ("add_user", user, AMQP_PASSWORD))
    try:
        rabbitmqctl(("set_permissions", "-p", vhost, user, ".*", ".*", ".*"))
        yield {"vhost": vhost, "user": user,
               "url": f"amqp://{user}:{quote(AMQP_PASSWORD, safe='')}@127.0.0.1:5672/{vhost}"}
    finally:
        rabbitmqctl(("delete_user", user), ("delete_vhost", vhost))


ALL_SECRETS = (APIKEY, WRONG_APIKEY, AMQP_PASSWORD, WRONG_AMQP_PASSWORD)


def finished(proc: procs.Proc, code: int) -> None:
    assert proc.wait(30) == code, proc.stderr[-2000:]
    assert_no_secret(proc.stdout_path.read_bytes(), *ALL_SECRETS, where="stdout")
    assert_no_secret(proc.stderr_path.read_bytes(), *ALL_SECRETS, where="stderr")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_debug_run_that_carries_events_shows_no_secret(
        simulator, bridge, topology, account, log_format):
    sim = simulator("--rate", "0", "--count", "20", apikey=APIKEY)
    queue = topology.bind("#", url=account["url"])
    proc = bridge(sim, AMQP_URL=account["url"], TUTUM_APIKEY=APIKEY, LOG_LEVEL="debug",
                  LOG_FORMAT=log_format, BRIDGE_METRICS_ADDR="127.0.0.1:0")
    broker.drain(queue, count=22, timeout=20, url=account["url"])

    pid = proc.popen.pid
    assert_no_secret(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "),
                     *ALL_SECRETS, where="the command line")
    assert_no_secret(Path(f"/proc/{pid}/comm").read_bytes(), *ALL_SECRETS, where="comm")
    for path in ("/metrics", "/healthz"):
        with urllib.request.urlopen(f"http://{procs.metrics_address(proc)}{path}",
                                    timeout=5) as resp:
            assert_no_secret(resp.read(), *ALL_SECRETS, where=path)

    proc.signal(15)
    finished(proc, 0)
    # The stream URL is logged, with its token redacted (it cannot be the key: see above).
    assert re.search(r"/v1/events\?\S*token=", proc.stderr), "the stream URL is never logged"


def test_a_tutum_auth_run_with_an_amqp_password_file_shows_no_secret(
        simulator, bridge, topology, account, tmp_path):
    auth = f"ApiKey {USER}:{APIKEY}"
    sim = simulator("--rate", "0", "--count", "5", apikey=APIKEY)
    queue = topology.bind("#", url=account["url"])
    password_file = tmp_path / "amqp-password"
    password_file.write_text(AMQP_PASSWORD + "\n")
    proc = bridge(sim, TUTUM_APIKEY="", TUTUM_AUTH=auth, LOG_LEVEL="debug",
                  LOG_FORMAT="console", AMQP_PASSWORD_FILE=str(password_file),
                  AMQP_URL=f"amqp://{account['user']}@127.0.0.1:5672/{account['vhost']}")
    broker.drain(queue, count=7, timeout=20, url=account["url"])
    assert_no_secret(Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes(), auth,
                     *ALL_SECRETS, where="the command line")
    proc.signal(15)
    finished(proc, 0)
    assert_no_secret(proc.stderr, auth, where="stderr")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_refused_api_key_is_not_printed(simulator, bridge, account, log_format):
    sim = simulator(apikey=APIKEY)
    proc = bridge(sim, AMQP_URL=account["url"], TUTUM_APIKEY=WRONG_APIKEY, LOG_LEVEL="debug",
                  LOG_FORMAT=log_format)
    finished(proc, 3)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_refused_amqp_password_is_not_printed(simulator, bridge, account, log_format):
    sim = simulator(apikey=APIKEY)
    url = f"amqp://{account['user']}:{quote(WRONG_AMQP_PASSWORD, safe='')}@127.0.0.1:5672/" \
          f"{account['vhost']}"
    proc = bridge(sim, AMQP_URL=url, TUTUM_APIKEY=APIKEY, LOG_LEVEL="debug",
                  LOG_FORMAT=log_format)
    finished(proc, 4)


@pytest.mark.parametrize("args", [("run", "--help"), ("--help",), ("simulate", "--help")])
def test_help_shows_no_secret_from_the_environment(tmp_path, account, args):
    env = {"TUTUM_USER": USER, "TUTUM_APIKEY": APIKEY, "TUTUM_AUTH": f"ApiKey {USER}:{APIKEY}",
           "AMQP_URL": account["url"]}
    proc = procs.spawn(list(args), tmp_path, f"help-{uuid.uuid4().hex[:6]}", env)
    assert proc.wait(30) == 0
    assert "usage" in proc.stdout.lower()
    assert_no_secret(proc.stdout + proc.stderr, *ALL_SECRETS, where=" ".join(args))
