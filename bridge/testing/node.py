"""A throwaway, private RabbitMQ node: for the testing kit, and for tests that stop, kill or alarm a broker.

A shared broker must never be stopped, blocked or reconfigured, so a test that needs
its own starts one here (the kit does so when there is no other broker): own node name, own
AMQP and distribution ports, own data and log directories, own config file (the
system `/etc/rabbitmq/rabbitmq.conf` pins the listener to 5672, so it must not be
read), and no plugins (startup is ~5-10 s on this machine; plugins make it slower).

The Erlang cookie: run by root, the node runs as the `rabbitmq` user with
HOME=/var/lib/rabbitmq, so it shares `/var/lib/rabbitmq/.erlang.cookie` with the main
node, and `ctl` runs rabbitmqctl the same way, so root can talk to it without a cookie
of its own (the packaged `rabbitmqctl` wrapper does the same `su`). Run by anyone else,
node and rabbitmqctl run as that user, with that user's cookie.

The directory lives under /tmp (pytest's tmp_path is mode 0700 root-only, which the
`rabbitmq` user cannot enter) and is removed when the node is discarded.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = "/var/lib/rabbitmq"
_LIVE: set["RabbitNode"] = set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available() -> bool:
    """Whether this machine can start a node (the `rabbitmq-server` package is installed)."""
    return (RABBIT_BIN / "rabbitmq-server").exists() or shutil.which("rabbitmq-server") is not None


def _bin(name: str) -> str:
    # Debian's /usr/sbin wrappers send the server's output to a file: use the real ones.
    return str(RABBIT_BIN / name) if (RABBIT_BIN / name).exists() else shutil.which(name) or name


def _as_rabbitmq(*argv: str, env: dict[str, str] | None = None) -> list[str]:
    if os.geteuid() != 0:
        return ["env", *[f"{k}={v}" for k, v in (env or {}).items()], *argv]
    assignments = [f"{k}={v}" for k, v in {"HOME": RABBIT_HOME, **(env or {})}.items()]
    return ["runuser", "-u", "rabbitmq", "--", "env", *assignments, *argv]


class RabbitNode:
    """One RabbitMQ node on its own ports; `start` and `stop` keep its data."""

    def __init__(self, prefix: str = "tbfault", env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(env or {})      # RABBITMQ_* settings of this node's own
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tb-rabbit-"))
        self.pid_file = self.dir / "node.pid"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "vm_memory_high_watermark.relative = 0.4\n"
            "disk_free_limit.absolute = 10MB\n"
            "log.console = false\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")   # not /etc/rabbitmq's NODENAME
        if os.geteuid() == 0:
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
            for path in self.dir.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self._cwd = RABBIT_HOME if os.geteuid() == 0 else str(self.dir)
        self.popen: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.alarmed = False
        _LIVE.add(self)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            **self.extra_env,
        }

    def start(self, timeout: float = 90.0) -> "RabbitNode":
        """Boot (or reboot, on the same data) and return once AMQP accepts a login."""
        if self.running:
            return self
        began = time.monotonic()
        log = (self.dir / "server.out").open("ab")
        self.popen = subprocess.Popen(
            _as_rabbitmq(_bin("rabbitmq-server"), env=self._env()),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self._cwd)
        log.close()
        deadline = began + timeout
        while not self._amqp_ok():
            if self.popen.poll() is not None:
                raise AssertionError(f"node {self.name} exited {self.popen.returncode}:\n"
                                     + self.server_output()[-3000:])
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"node {self.name} not up in {timeout}s:\n"
                                     + self.server_output()[-3000:])
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - began
        return self

    def _amqp_ok(self) -> bool:
        # A plain TCP probe first: pika logs every refused attempt at ERROR level.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        try:
            params = pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=1")
            pika.BlockingConnection(params).close()
            return True
        except (pika.exceptions.AMQPError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """`rabbitmqctl -n <this node> ARGS...`; returns stdout."""
        result = subprocess.run(
            _as_rabbitmq(_bin("rabbitmqctl"), "-q", "-n", self.name, *args),
            capture_output=True, text=True, timeout=timeout, cwd=self._cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} -> {result.returncode}: "
                                 f"{result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def memory_alarm(self, on: bool) -> None:
        """Raise a memory alarm (watermark 0: every publisher is blocked) or clear it."""
        self.ctl("set_vm_memory_high_watermark", "0" if on else "0.4")
        self.alarmed = on

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (data kept for `start`); falls back to `kill`."""
        if not self.running:
            return
        try:
            self.ctl("stop", timeout=timeout)
            self.popen.wait(timeout=timeout)
        except (AssertionError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the Erlang VM and everything in its session, like a crashed host."""
        if self.popen is None:
            return
        pids = []
        try:
            pids.append(int(self.pid_file.read_text().strip()))
        except (OSError, ValueError):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)

    def server_output(self) -> str:
        texts = []
        for path in [self.dir / "server.out", *sorted((self.dir / "log").glob("*.log"))]:
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def discard(self) -> None:
        """Stop the node and delete its directory."""
        try:
            self.stop(timeout=30)
        finally:
            _LIVE.discard(self)
            shutil.rmtree(self.dir, ignore_errors=True)


@atexit.register
def _discard_leftovers() -> None:
    # A test run interrupted between fixture setup and teardown must not leave nodes up.
    for node in list(_LIVE):
        node.discard()
