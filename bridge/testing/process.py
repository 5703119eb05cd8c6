"""`tutum_bridge`: the real bridge, as a child process, between a test's stream and broker.

It runs `python -m bridge run` exactly as deployed, with an exchange (and alternate
exchange and quarantine queue) unique to the test, its spool in the test's directory,
and any further settings given as `env` (`BRIDGE_HISTORY`, ...). `wait_confirmed(n)`
watches a queue of the kit's own, bound `#`, for the bodies the test sent: the broker
routes a persistent message to its queues before it confirms it, so seeing n of them
there means n were confirmed.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika

from bridge.config import BRIDGE_ENVIRONMENT, child_environment
from bridge.testing.stream import ScriptedStream
from bridge.topology import Topology, declare, delete

STOP_SECONDS = 20.0


class BridgeProcess:
    """A running bridge; `exchange` is where it publishes; `stop` ends it."""

    def __init__(self, amqp_url: str, stream: ScriptedStream, directory: Path,
                 env: dict[str, str] | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.amqp_url, self._stream = amqp_url, stream
        self.exchange = f"test.{tag}.events"
        self.topology = Topology(self.exchange, f"test.{tag}.unrouted", f"test.{tag}.invalid")
        self._watch = f"test.{tag}.kit"
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = declare(self._connection.channel(), self.topology.steps())
        self._channel.queue_declare(self._watch, durable=True)
        self._channel.queue_bind(self._watch, self.exchange, "#")
        self._confirmed: collections.Counter[bytes] = collections.Counter()
        self.log_path = directory / f"bridge-{tag}.log"
        child_env = child_environment(BRIDGE_ENVIRONMENT)
        child_env.update({
            "TUTUM_STREAM_HOST": stream.url, "TUTUM_USER": stream.user,
            "TUTUM_APIKEY": stream.apikey, "AMQP_URL": amqp_url,
            "BRIDGE_EXCHANGE": self.exchange, "BRIDGE_UNROUTED": self.topology.unrouted,
            "BRIDGE_QUARANTINE": self.topology.quarantine,
            "BRIDGE_SPOOL": str(directory / f"spool-{tag}.sqlite3"),
            "BRIDGE_METRICS_ADDR": "", "BRIDGE_RECONNECT_MAX": "1", **(env or {})})
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen([sys.executable, "-m", "bridge", "run"],
                                           env=child_env,
                                           stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)

    def wait_confirmed(self, n: int, timeout: float = 30) -> None:
        """Return once `n` of the events the test sent are confirmed; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            sent = self._stream.sent_bodies()
            while True:
                method, _, body = self._channel.basic_get(self._watch, auto_ack=True)
                if method is None:
                    break
                self._confirmed[body] += 1
            done = sum(min(count, self._confirmed[body]) for body, count in sent.items())
            if done >= n:
                return
            if self._popen.poll() is not None:
                raise AssertionError(f"the bridge exited {self._popen.returncode}: "
                                     f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {n} events confirmed in {timeout}s")
            self._connection.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM (it publishes what is pending), then delete what the kit declared."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        code = self._popen.wait()
        try:
            delete(self._channel, self.topology, (self._watch,))
            self._connection.close()
        except pika.exceptions.AMQPError:
            pass
        return code
