"""Exit codes and the exceptions that map to them.

Every way the process can end on purpose is here, so `cli.main` can turn any of
them into one line on stderr and the exit code docs/contract.md promises.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_UNAUTHORIZED = 3
EXIT_BROKER_REFUSED = 4


class BridgeError(Exception):
    """An error that ends the process with `exit_code` and a one-line message."""

    exit_code = EXIT_FAILURE


class ConfigError(BridgeError):
    """Bad configuration or usage: exit 2."""

    exit_code = EXIT_CONFIG


class UpstreamUnauthorized(BridgeError):
    """The stream server refused the credentials: exit 3."""

    exit_code = EXIT_UNAUTHORIZED


class BrokerRefused(BridgeError):
    """The broker refused us (access, vhost, exchange type): exit 4."""

    exit_code = EXIT_BROKER_REFUSED


class TLSVerificationError(BridgeError):
    """A peer's certificate did not verify: exit 1, never retried silently."""

    exit_code = EXIT_FAILURE
