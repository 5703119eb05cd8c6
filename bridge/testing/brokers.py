"""`amqp_url`: a RabbitMQ for a worker's tests, from wherever one can be had (docs/contract.md section 10).

In order: `TUTUM_TEST_AMQP_URL`; else a throwaway broker in a container through
testcontainers (Docker, or podman's Docker-compatible socket via `DOCKER_HOST`; the
image is `TUTUM_TEST_RABBITMQ_IMAGE`, default `rabbitmq:3-management`); else a
throwaway local node of the `rabbitmq-server` package on free ports; else the test is
skipped with one line saying what is missing. A broker the kit started lives for the
test session. On it every test gets its own vhost, deleted afterwards; on a broker
given by URL the kit cannot create vhosts, so a test gets its own exchange and queue
names there (the `tutum_bridge` fixture's) and the URL's vhost.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

from bridge.testing import node

DEFAULT_IMAGE = "rabbitmq:3-management"


class Unavailable(Exception):
    """No way to get a broker here; the message says what is missing."""


class Broker:
    """A broker and how to make and remove a vhost on it (None: it cannot)."""

    def __init__(self, url: str, ctl=None, close=lambda: None, where: str = "") -> None:
        self.url, self._ctl, self.close, self.where = url, ctl, close, where

    def vhost_url(self) -> tuple[str, str | None]:
        """(URL for one test, the vhost made for it or None)."""
        if self._ctl is None:
            return self.url, None
        vhost = f"test-{uuid.uuid4().hex[:10]}"
        self._ctl("add_vhost", vhost)
        self._ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe=""))), vhost

    def delete_vhost(self, vhost: str | None) -> None:
        if vhost is not None:
            self._ctl("delete_vhost", vhost)


def from_environment() -> Broker | None:
    url = os.environ.get("TUTUM_TEST_AMQP_URL")
    return Broker(url, where="TUTUM_TEST_AMQP_URL") if url else None


def from_container() -> Broker | None:
    """A container through testcontainers, if it is installed and a Docker API answers."""
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return None
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:
        try:
            from testcontainers.rabbitmq import RabbitMqContainer
        except ImportError:
            return None
    # The reaper container would be pulled from a registry; the session removes ours.
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    container = RabbitMqContainer(os.environ.get("TUTUM_TEST_RABBITMQ_IMAGE", DEFAULT_IMAGE))
    container.start()
    try:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
    except Exception:
        container.stop()
        raise
    if host in ("localhost", "::1"):
        host = "127.0.0.1"

    def ctl(*args: str) -> None:
        code, output = container.exec(["rabbitmqctl", "-q", *args])
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {args[0]} in the container: {output!r}")
    return Broker(f"amqp://guest:guest@{host}:{port}/%2F", ctl, container.stop,
                  "a RabbitMQ container")


def from_local_node() -> Broker | None:
    if not node.available():
        return None
    local = node.RabbitNode(prefix="tutum-test").start()
    return Broker(local.url, lambda *args: local.ctl(*args), local.discard,
                  "a local rabbitmq-server node")


def find() -> Broker:
    for source in (from_environment, from_container, from_local_node):
        broker = source()
        if broker is not None:
            return broker
    raise Unavailable("no RabbitMQ for the tests: set TUTUM_TEST_AMQP_URL, or run Docker "
                      "(or podman's socket via DOCKER_HOST) with testcontainers installed, "
                      "or install rabbitmq-server")
