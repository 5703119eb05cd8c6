"""Exit codes (docs/contract.md section 6): a supervisor, a deploy script or a person must know why it stopped.

0 clean stop; 2 bad configuration or usage; 3 the stream refused the credentials;
4 the broker refused us; 1 anything else. Every non-zero exit prints one clear line
saying why -- never a traceback, never a retry loop on a mistake retrying cannot fix.
"""

from __future__ import annotations

import json
import uuid

import pika
import pytest

from tests.support import broker, procs

DEADLINE = 30.0


def run(tmp_path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """`python -m bridge run ARGS` to completion: (exit code, stderr)."""
    proc = procs.spawn(["run", *args], tmp_path, f"run-{uuid.uuid4().hex[:6]}", env)
    try:
        code = proc.wait(DEADLINE)
    except Exception:
        proc.popen.kill()
        raise AssertionError(f"still running after {DEADLINE}s:\n{proc.stderr[-2000:]}")
    stderr = proc.stderr
    assert "Traceback" not in stderr, stderr
    return code, stderr


def reason_line(stderr: str) -> str:
    """The one line that is not a JSON log line: the reason the process gives."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not _is_log_line(ln)]
    assert len(lines) == 1, stderr
    return lines[0]


def _is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def only_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def env(simulator, tmp_path, topology):
    """A working configuration against a running simulator and the shared broker."""
    return procs.bridge_env(simulator(), tmp_path, topology.bridge_env())


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# --- 2: configuration and usage ------------------------------------------------------

def test_no_credentials(tmp_path, env):
    code, stderr = run(tmp_path, without(env, "TUTUM_USER", "TUTUM_APIKEY"))
    assert code == 2
    assert "TUTUM_USER" in only_line(stderr)


def test_a_user_without_a_key(tmp_path, env):
    code, stderr = run(tmp_path, without(env, "TUTUM_APIKEY"))
    assert code == 2
    assert "TUTUM_APIKEY" in only_line(stderr)


@pytest.mark.parametrize("variable, value", [("TUTUM_STREAM_HOST", "http://x"),
                                             ("AMQP_URL", "foo"),
                                             ("BRIDGE_INFLIGHT", "many")])
def test_a_malformed_value(tmp_path, env, variable, value):
    code, stderr = run(tmp_path, {**env, variable: value})
    assert code == 2
    assert variable in only_line(stderr)


@pytest.mark.parametrize("args", [("--no-such-option",), ("--inflight",),
                                  ("--log-level", "loud")])
def test_bad_usage(tmp_path, env, args):
    code, stderr = run(tmp_path, env, *args)
    assert code == 2
    assert args[0] in only_line(stderr)


def test_an_unknown_verb(tmp_path):
    proc = procs.spawn(["frobnicate"], tmp_path, "unknown-verb")
    assert proc.wait(DEADLINE) == 2
    assert "frobnicate" in only_line(proc.stderr)
    assert "Traceback" not in proc.stderr


# --- 3: the stream refused the credentials --------------------------------------------

def test_wrong_credentials_are_fatal_not_retried(tmp_path, env):
    code, stderr = run(tmp_path, {**env, "TUTUM_APIKEY": "not-the-key"})
    assert code == 3
    assert "UNAUTHORIZED" in reason_line(stderr)


# --- 4: the broker refused us ----------------------------------------------------------

def test_wrong_amqp_password(tmp_path, env):
    code, stderr = run(tmp_path, {**env, "AMQP_URL": "amqp://guest:wrong@127.0.0.1:5672/%2F"})
    assert code == 4
    assert "refused" in reason_line(stderr).lower()


def test_missing_vhost(tmp_path, env):
    vhost = f"nope-{uuid.uuid4().hex[:10]}"
    code, stderr = run(tmp_path, {**env, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"})
    assert code == 4
    assert vhost in reason_line(stderr)


def test_an_existing_exchange_of_another_type(tmp_path, env, topology):
    with broker.connect() as conn:
        conn.channel().exchange_declare(topology.exchange, "direct", durable=True)
    code, stderr = run(tmp_path, env)
    assert code == 4
    assert topology.exchange in reason_line(stderr)
    # The bridge must not have replaced the operator's exchange.
    with broker.connect() as conn:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            ch.exchange_declare(topology.exchange, "topic", durable=True, passive=False)
