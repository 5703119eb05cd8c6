"""A private RabbitMQ node with an amqps:// listener, for the broker-side TLS tests.

The shared broker must not be reconfigured, so TLS gets its own node (see
`rabbit_node.RabbitNode`): the plain listener stays (the tests declare and drain
through it), and a TLS listener is added with the test PKI's server certificate.
`verify_peer` makes the node check any client certificate it is shown against the
test CA; `require_client_cert` sets `fail_if_no_peer_cert`.
"""

from __future__ import annotations

import shutil

from tests.support.rabbit_node import RabbitNode, free_port
from tests.support.tls import Pki


class TlsRabbitNode(RabbitNode):
    """A RabbitNode whose `tls_port` speaks AMQP over TLS."""

    def __init__(self, pki: Pki, *, require_client_cert: bool = False) -> None:
        super().__init__(prefix="tbtls")
        self.tls_port = free_port()
        tls_dir = self.dir / "tls"
        tls_dir.mkdir()
        # The node runs as `rabbitmq` and cannot read the session's root-owned PKI.
        files = {name: shutil.copy(src, tls_dir / name) for name, src in
                 (("ca.pem", pki.ca), ("server.pem", pki.server_cert),
                  ("server.key", pki.server_key))}
        with (self.dir / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {files['ca.pem']}\n"
                f"ssl_options.certfile = {files['server.pem']}\n"
                f"ssl_options.keyfile = {files['server.key']}\n"
                "ssl_options.verify = verify_peer\n"
                f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}\n")
        for path in [tls_dir, *tls_dir.iterdir()]:
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def amqps_url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"

    def peer_cert_subjects(self) -> list[str]:
        """The client-certificate subject of each open AMQP connection ('' if none)."""
        out = self.ctl("list_connections", "--no-table-headers", "peer_cert_subject")
        return [line.split("\t")[0] for line in out.splitlines() if line.strip()]
