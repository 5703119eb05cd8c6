"""`amqp_url`: a RabbitMQ for a worker's tests, from wherever one can be had (docs/contract.md section 10).

In order: `TUTUM_TEST_AMQP_URL` (with `TUTUM_TEST_MANAGEMENT_URL`, its management API, for
vhosts); else a throwaway broker in a container through
testcontainers (Docker, or podman's Docker-compatible socket via `DOCKER_HOST`; the
image is `TUTUM_TEST_RABBITMQ_IMAGE`, default `rabbitmq:3-management`); else a
throwaway local node of the `rabbitmq-server` package on free ports; else the test is
skipped with one line saying what is missing. A broker the kit started lives for the
test session. On it every test gets its own vhost, deleted afterwards; so does a
broker given by URL with its management API; without one the kit cannot create
vhosts, so a test gets its own exchange and queue names there (the `tutum_bridge`
fixture's) in the URL's vhost.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
import urllib.request
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from bridge.testing import node

DEFAULT_IMAGE = "rabbitmq:3-management"


class Unavailable(Exception):
    """No way to get a broker here; the message says what is missing."""


class Broker:
    """A broker, and `admin(*rabbitmqctl_args)` to make and remove vhosts (None: cannot)."""

    def __init__(self, url: str, admin=None, close=lambda: None, where: str = "") -> None:
        self.url, self._admin, self.close, self.where = url, admin, close, where

    def vhost_url(self) -> tuple[str, str | None]:
        """(URL for one test, the vhost made for it or None)."""
        if self._admin is None:
            return self.url, None
        parts = urlsplit(self.url)
        vhost = f"test-{uuid.uuid4().hex[:10]}"
        self._admin("add_vhost", vhost)
        self._admin("set_permissions", "-p", vhost, unquote(parts.username or "guest"),
                    ".*", ".*", ".*")
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe=""))), vhost

    def delete_vhost(self, vhost: str | None) -> None:
        if vhost is not None:
            self._admin("delete_vhost", vhost)


def _management(amqp_url: str, api: str):
    """The three rabbitmqctl commands the kit needs, done through the management HTTP
    API at `api` with the AMQP URL's credentials; None if that API does not answer."""
    parts = urlsplit(amqp_url)
    token = base64.b64encode(f"{unquote(parts.username or 'guest')}:"
                             f"{unquote(parts.password or 'guest')}".encode()).decode()

    def call(method: str, path: str, body: dict | None = None) -> None:
        request = urllib.request.Request(
            api.rstrip("/") + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    try:
        call("GET", "/api/overview")
    except (OSError, ValueError):
        return None

    def admin(command: str, *args: str) -> None:
        if command == "add_vhost":
            call("PUT", f"/api/vhosts/{quote(args[0], safe='')}")
        elif command == "set_permissions":
            vhost, user, configure, write, read = args[1:]
            call("PUT", f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                 {"configure": configure, "write": write, "read": read})
        else:
            call("DELETE", f"/api/vhosts/{quote(args[0], safe='')}")
    return admin


def from_environment() -> Broker | None:
    """`TUTUM_TEST_AMQP_URL`; with `TUTUM_TEST_MANAGEMENT_URL` (its management API,
    e.g. http://localhost:15672) each test gets a vhost there, else its own names."""
    url = os.environ.get("TUTUM_TEST_AMQP_URL")
    if not url:
        return None
    api = os.environ.get("TUTUM_TEST_MANAGEMENT_URL")
    return Broker(url, _management(url, api) if api else None, where="TUTUM_TEST_AMQP_URL")


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
