"""All configuration, in one place.

Each setting has an environment variable and a matching command-line flag; the flag
wins. `load` validates everything at start, so a bad value is one clear line and exit
code 2 before anything connects anywhere. Nothing else in the bridge reads
`os.environ`: settings come through `load` or `from_environment`, and the verbs that
start child processes (demo, bench, the secret-flag re-exec) copy the environment
with `child_environment`. The one exception is the pytest plugin `bridge.testing`,
which runs in a worker's test session, not in the bridge, and reads its own
`TUTUM_TEST_*` variables (docs/contract.md section 10).

Secrets (the API key, `TUTUM_AUTH`, the AMQP password, a proxy's password) are kept in the returned
`Config` but never in its `repr`, and `redact_url` (bridge/redact.py) is the only way a URL reaches a log.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import pika

from bridge.errors import ConfigError
from bridge.redact import redact_url
from bridge import proxy
from bridge.proxy import HttpProxy, ProxyConfigError, choose as choose_proxy
from bridge.topology import HISTORY_QUEUE, QUEUE_TYPES, Topology, history_spec

DEFAULT_STREAM_HOST = "wss://stream.tutum.co"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


# --- value parsers: each raises ValueError with a short reason ----------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """`512MiB`, `2GB`, `1048576` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 1048576, 512MiB or 2GB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def parse_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number of seconds")
    return value


def parse_positive_int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("must be a positive whole number")
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def parse_heartbeat(text: str) -> int:
    value = parse_positive_int(text)
    if value > 60:
        raise ValueError("must be 1 to 60 seconds")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text.lower()
    return parse


def parse_addr(text: str) -> tuple[str, int] | None:
    """`127.0.0.1:9120` -> (host, port); empty -> None (off)."""
    if not text.strip():
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, or empty to turn it off")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_stream_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a ws:// or wss:// URL")
    return text


def parse_stream_host(text: str) -> str:
    parse_stream_url(text)
    return text.rstrip("/")


def parse_amqp_urls(text: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    if not urls:
        raise ValueError("expected at least one amqp:// or amqps:// URL")
    for number, url in enumerate(urls, 1):
        # The URL itself is never echoed: a malformed one may hide its password anywhere.
        which = f"URL {number} of {len(urls)}" if len(urls) > 1 else "the URL"
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"{which} is not of the form amqp://user:password@host:port/vhost")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{which} has a bad port") from None
    return urls


def parse_exchange_name(text: str) -> str:
    if not text or len(text.encode()) > 255 or text.startswith("amq."):
        raise ValueError("expected a name of 1 to 255 bytes not starting with amq.")
    return text


_RETENTION_UNITS = {"s": "s", "m": "m", "h": "h", "d": "D"}


def parse_retention(text: str) -> str | None:
    """`7d`, `12h`, `30m` -> RabbitMQ's `x-max-age` (`7D`, `12h`, `30m`); empty or `off` -> None."""
    text = text.strip()
    if text.lower() in ("", "off"):
        return None
    match = re.fullmatch(r"(\d+)([smhdD])", text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError("expected a retention such as 7d, 12h or 30m, or off")
    return match.group(1) + _RETENTION_UNITS[match.group(2).lower()]


def parse_existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError("is not a file")
    return path


# --- the settings table --------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One configuration value: its variable, its flag, its default, how to parse it."""

    name: str                      # attribute on Config
    env: str | None
    help: str
    default: str | None = None     # as text, parsed like any other value
    parse: Callable[[str], object] = str
    secret: bool = False
    flag_value: bool = False       # a flag that takes no argument (sets "true")
    echo: bool = True              # a bad value may be quoted in the error message
    empty_means_off: bool = False  # an empty variable is a value, not "unset"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


STREAM_SETTINGS = (
    Setting("user", "TUTUM_USER", "Tutum user name"),
    Setting("apikey", "TUTUM_APIKEY", "Tutum API key (prefer --apikey-file)", secret=True),
    Setting("apikey_file", "TUTUM_APIKEY_FILE", "file holding the Tutum API key",
            parse=parse_existing_file),
    Setting("auth", "TUTUM_AUTH", "verbatim Authorization header, instead of user and key",
            secret=True),
    Setting("stream_host", "TUTUM_STREAM_HOST", "stream host; events are at /v1/events",
            DEFAULT_STREAM_HOST, parse_stream_host, echo=False),
    Setting("stream_url", "TUTUM_STREAM_URL", "full events URL; overrides the host",
            parse=parse_stream_url, echo=False),
    Setting("ca_file", "TUTUM_CA_FILE", "CA bundle to verify the stream's TLS certificate",
            parse=parse_existing_file),
    Setting("ping_interval", "BRIDGE_PING_INTERVAL", "seconds of silence before a websocket ping",
            "5", parse_seconds),
    Setting("ping_timeout", "BRIDGE_PING_TIMEOUT", "seconds to wait for a pong",
            "5", parse_seconds),
    Setting("max_frame_bytes", "BRIDGE_MAX_FRAME_BYTES",
            "largest frame accepted; larger ones are quarantined", "1MiB", parse_size),
    Setting("retry_unauthorized", "BRIDGE_RETRY_UNAUTHORIZED",
            "keep retrying when the stream says UNAUTHORIZED instead of exiting 3",
            "false", parse_bool, flag_value=True),
)

AMQP_SETTINGS = (
    Setting("amqp_url", "AMQP_URL", "broker URL; a comma-separated list for a cluster",
            DEFAULT_AMQP_URL, parse_amqp_urls, secret=True),
    Setting("amqp_password_file", "AMQP_PASSWORD_FILE",
            "file holding the AMQP password (replaces the one in the URL)",
            parse=parse_existing_file),
    Setting("amqp_ca_file", "AMQP_CA_FILE", "CA bundle to verify the broker (amqps://)",
            parse=parse_existing_file),
    Setting("amqp_cert_file", "AMQP_CERT_FILE", "client certificate for amqps://",
            parse=parse_existing_file),
    Setting("amqp_key_file", "AMQP_KEY_FILE", "client certificate key for amqps://",
            parse=parse_existing_file),
    Setting("exchange", "BRIDGE_EXCHANGE", "topic exchange events are published to",
            "tutum.events", parse_exchange_name),
)

TOPOLOGY_SETTINGS = (
    Setting("unrouted", "BRIDGE_UNROUTED",
            "alternate exchange and queue for events no binding matches",
            "tutum.unrouted", parse_exchange_name),
    Setting("quarantine", "BRIDGE_QUARANTINE", "queue for frames that are not valid events",
            "tutum.invalid", parse_exchange_name),
    Setting("queue_type", "BRIDGE_QUEUE_TYPE",
            "type of the bridge's own queues (unrouted, quarantine); quorum replicates them "
            "on a cluster; an existing queue keeps its type",
            "classic", parse_choice(*QUEUE_TYPES)),
    Setting("history", "BRIDGE_HISTORY",
            "keep every event this long on the stream queue BRIDGE_HISTORY_QUEUE, for replay "
            "(7d, 12h; off: none)", "off", parse_retention, empty_means_off=True),
    Setting("history_queue", "BRIDGE_HISTORY_QUEUE", "the history stream queue",
            HISTORY_QUEUE, parse_exchange_name),
)

RUN_SETTINGS = (
    Setting("state_dir", "BRIDGE_STATE_DIR", "directory for the spool",
            parse=lambda t: Path(t).expanduser()),
    Setting("spool", "BRIDGE_SPOOL", "on-disk spool path (default: STATE_DIR/spool.sqlite3)",
            parse=lambda t: Path(t).expanduser()),
    Setting("spool_max_bytes", "BRIDGE_SPOOL_MAX_BYTES",
            "spool capacity; when full the bridge stops reading the stream", "2GiB", parse_size),
    Setting("spool_sync", "BRIDGE_SPOOL_SYNC",
            "normal: survives a process crash; full: survives power loss too",
            "normal", parse_choice("normal", "full")),
    Setting("inflight", "BRIDGE_INFLIGHT", "most published events awaiting a confirm",
            "2000", parse_positive_int),
    Setting("reconnect_max", "BRIDGE_RECONNECT_MAX", "cap of the reconnect backoff, seconds",
            "30", parse_seconds),
    Setting("amqp_heartbeat", "BRIDGE_AMQP_HEARTBEAT",
            "AMQP heartbeat, seconds; a broker link silent for that long is dropped",
            "10", parse_heartbeat),
    Setting("confirm_timeout", "BRIDGE_CONFIRM_TIMEOUT",
            "seconds a publish may wait for its confirm (unless the broker blocks us) "
            "before the connection is dropped and the next URL tried", "15", parse_seconds),
    Setting("shutdown_timeout", "BRIDGE_SHUTDOWN_TIMEOUT",
            "seconds allowed on SIGTERM to publish and confirm what is pending", "10",
            parse_seconds),
    Setting("metrics_addr", "BRIDGE_METRICS_ADDR", "metrics and health listener, empty: off",
            "127.0.0.1:9120", parse_addr, empty_means_off=True),
)

HA_SETTINGS = (
    Setting("ha", "BRIDGE_HA",
            "on: one of several replicas; the leader publishes, standbys cover for it "
            "(README, High availability)", "off", parse_bool),
    Setting("ha_heartbeat", "BRIDGE_HA_HEARTBEAT",
            "AMQP heartbeat of the HA connection, whole seconds: the broker frees a silent "
            "leader's lock after 2-3 of them; the leader steps down after one", "2",
            parse_heartbeat),
    Setting("ha_fill_grace", "BRIDGE_HA_FILL_GRACE",
            "seconds a standby waits before offering the leader an event it missed", "1",
            parse_seconds),
    Setting("ha_publish_timeout", "BRIDGE_HA_PUBLISH_TIMEOUT",
            "seconds a leader's publisher may go without a confirm (and not idle) before "
            "the leader gives up the lock; default twice BRIDGE_HA_HEARTBEAT",
            parse=parse_seconds),
)

LOG_SETTINGS = (
    Setting("log_level", "LOG_LEVEL", "debug, info, warning or error",
            "info", parse_choice("debug", "info", "warning", "error")),
    Setting("log_format", "LOG_FORMAT", "json or console",
            "json", parse_choice("json", "console")),
)


def add_arguments(parser: argparse.ArgumentParser, settings: tuple[Setting, ...]) -> None:
    """Add one flag per setting. Defaults stay None so the environment can fill them."""
    for s in settings:
        env = f" [env {s.env}]" if s.env else ""
        default = f" (default {s.default})" if s.default is not None and not s.secret else ""
        if s.flag_value:
            parser.add_argument(s.flag, dest=s.name, action="store_const", const="true",
                                default=None, help=s.help + env)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(),
                                help=s.help + env + default)


def resolve(args: argparse.Namespace, environ: Mapping[str, str],
            settings: tuple[Setting, ...]) -> dict[str, object]:
    """Flag, else environment, else default; each value parsed or ConfigError."""
    values: dict[str, object] = {}
    for s in settings:
        text = getattr(args, s.name, None)
        source = s.flag
        if text is None and s.env and (environ.get(s.env, "") != ""
                                       or (s.empty_means_off and s.env in environ)):
            text, source = environ[s.env], s.env
        if text is None:
            text, source = s.default, "default"
        if text is None:
            values[s.name] = None
            continue
        try:
            values[s.name] = s.parse(text)
        except ValueError as exc:
            shown = f" {text!r}" if s.echo and not s.secret else ""
            raise ConfigError(f"{source}:{shown} {exc}") from None
    return values


def from_environment(args: argparse.Namespace,
                     settings: tuple[Setting, ...]) -> dict[str, object]:
    """`resolve` against this process's environment."""
    return resolve(args, os.environ, settings)


# What configures a bridge from its environment: the settings' prefixes and the proxy
# variables. A verb that starts a bridge against its own local simulator (demo, bench,
# the testing kit) passes none of its own on: they were meant for itself, and a proxy
# set for the outside world would stand between that bridge and 127.0.0.1.
BRIDGE_ENVIRONMENT = ("TUTUM_", "BRIDGE_", "AMQP_", "LOG_") + proxy.VARIABLES


def child_environment(drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """A copy of this process's environment for a child, minus variables with these
    prefixes (settings meant for this process, not for its children)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


# --- the configuration of the `run` verb ---------------------------------------------

@dataclass(frozen=True)
class AmqpConfig:
    """Where and how to reach the broker; shared by run, tail, bind and bench."""

    urls: tuple[str, ...] = field(repr=False)
    exchange: str = "tutum.events"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    heartbeat: int = 10            # the bridge's publisher only: a tool keeps the broker's
    password_file: Path | None = None

    def current_urls(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The URLs with the password file as it is now, and the secrets they hold;
        ConfigError if the file cannot be read at this moment.

        The publisher asks at every connection attempt, so a rotated Kubernetes Secret
        or systemd credential is used at the next reconnect."""
        if self.password_file is None:
            return self.urls, ()
        password = read_secret_file(self.password_file, "AMQP password")
        return tuple(_with_password(u, password) for u in self.urls), (password,)

    @property
    def redacted_urls(self) -> list[str]:
        return [redact_url(u) for u in self.urls]

    def parameters(self, url: str, connection_name: str) -> pika.URLParameters:
        """pika's parameters for one of `urls`: TLS verified by `ssl_context`, and a
        connection name that tells operators (and `rabbitmqctl`) which client it is."""
        params = pika.URLParameters(url)
        if urlsplit(url).scheme == "amqps":
            params.ssl_options = pika.SSLOptions(self.ssl_context(), urlsplit(url).hostname)
        params.client_properties = {"connection_name": f"tutum-bridge {connection_name}",
                                    "product": "tutum-bridge"}
        return params

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying context for amqps:// (None for amqp://)."""
        if not any(u.startswith("amqps:") for u in self.urls):
            return None
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.cert_file:
            context.load_cert_chain(str(self.cert_file),
                                    str(self.key_file) if self.key_file else None)
        return context


@dataclass(frozen=True)
class StreamConfig:
    """Where the stream is and how to authenticate; the websocket side sees only this."""

    url: str = field(repr=False)              # may carry ?token=...: never log it raw
    headers: tuple[str, ...] = field(repr=False, default=())
    ca_file: Path | None = None
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    max_frame_bytes: int = 1024 * 1024
    retry_unauthorized: bool = False
    reconnect_max: float = 30.0
    secrets: tuple[str, ...] = field(repr=False, default=())
    apikey_file: Path | None = None
    proxy: HttpProxy | None = None            # from https_proxy / http_proxy, no_proxy

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    def current_url(self) -> tuple[str, tuple[str, ...]]:
        """The URL with TUTUM_APIKEY_FILE as it is now, and the secret it holds.

        The stream asks at every connection attempt, so a rotated key is used at the
        next reconnect; a file unreadable at that moment leaves the key read at start."""
        if self.apikey_file is None or "token=" not in self.url:
            return self.url, ()
        try:
            apikey = read_secret_file(self.apikey_file, "TUTUM_APIKEY")
        except ConfigError:
            return self.url, ()
        parts = urlsplit(self.url)
        query = [(k, apikey if k == "token" else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        return urlunsplit(parts._replace(query=urlencode(query))), (apikey,)


@dataclass(frozen=True)
class HaConfig:
    """BRIDGE_HA=on: how replicas elect and watch each other (bridge/ha)."""

    heartbeat: int = 2
    fill_grace: float = 1.0
    publish_timeout: float = 4.0    # BRIDGE_HA_PUBLISH_TIMEOUT, unset: 2 x heartbeat


@dataclass(frozen=True)
class Notify:
    """systemd's notify socket (Type=notify), and the watchdog interval if WatchdogSec=."""

    socket: str
    watchdog_seconds: float | None


def systemd_notify(environ: Mapping[str, str], pid: int | None = None) -> Notify | None:
    """NOTIFY_SOCKET and WATCHDOG_USEC as systemd sets them; a watchdog meant for
    another process (WATCHDOG_PID) is not ours."""
    socket_path = environ.get("NOTIFY_SOCKET")
    if not socket_path:
        return None
    watchdog = None
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0 and (not owner or owner == str(pid or os.getpid())):
        watchdog = int(usec) / 1e6
    return Notify(socket_path, watchdog)


@dataclass(frozen=True)
class Config:
    """Everything `tutum-bridge run` needs, validated."""

    stream: StreamConfig
    amqp: AmqpConfig
    unrouted: str
    quarantine: str
    queue_type: str
    history: str | None
    history_queue: str
    spool_path: Path
    spool_max_bytes: int
    spool_sync: str
    inflight: int
    reconnect_max: float
    confirm_timeout: float
    shutdown_timeout: float
    metrics_addr: tuple[str, int] | None
    log_level: str
    log_format: str
    secrets: tuple[str, ...] = field(repr=False, default=())
    ha: "HaConfig | None" = None          # None: BRIDGE_HA=off
    notify: Notify | None = None          # None: not started by systemd with Type=notify

    @property
    def topology(self) -> Topology:
        topology = Topology(self.amqp.exchange, self.unrouted, self.quarantine, self.queue_type)
        if self.history:
            topology = topology.with_queues(history_spec(self.history_queue,
                                                         self.amqp.exchange, self.history))
        return topology


def read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


def amqp_config(values: Mapping[str, object]) -> tuple[AmqpConfig, tuple[str, ...]]:
    """The broker settings, with the password file applied; also the secrets to hide."""
    urls = values["amqp_url"]
    if values.get("amqp_password_file"):
        password = read_secret_file(values["amqp_password_file"], "AMQP password")
        urls = tuple(_with_password(u, password) for u in urls)
    secrets = tuple(unquote(p) for p in (urlsplit(u).password for u in urls) if p)
    if values.get("amqp_key_file") and not values.get("amqp_cert_file"):
        raise ConfigError("AMQP_KEY_FILE is set without AMQP_CERT_FILE")
    return AmqpConfig(urls=urls, exchange=values["exchange"],
                      ca_file=values.get("amqp_ca_file"),
                      cert_file=values.get("amqp_cert_file"),
                      key_file=values.get("amqp_key_file"),
                      heartbeat=values.get("amqp_heartbeat") or 10,
                      password_file=values.get("amqp_password_file")), secrets


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "guest"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def stream_config(values: Mapping[str, object], reconnect_max: float = 30.0,
                  environ: Mapping[str, str] | None = None,
                  ) -> tuple[StreamConfig, tuple[str, ...]]:
    """The stream settings with authentication and the proxy resolved; also the
    secrets to hide.

    A verbatim `TUTUM_AUTH` wins; otherwise user and key go in the query string, the
    documented form. The proxy comes from the variables curl reads (bridge/proxy.py).
    """
    apikey = values.get("apikey")
    if values.get("apikey_file"):
        apikey = read_secret_file(values["apikey_file"], "TUTUM_APIKEY")
    auth, user = values.get("auth"), values.get("user")
    url = values.get("stream_url") or f"{values['stream_host']}/v1/events"
    headers: tuple[str, ...] = ()
    if auth:
        headers = (f"Authorization: {auth}",)
        secrets: tuple[str, ...] = (auth,) + ((apikey,) if apikey else ())
    elif user and apikey:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True) + [("token", apikey), ("user", user)]
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        secrets = (apikey,)
    else:
        missing = "TUTUM_APIKEY (or TUTUM_APIKEY_FILE)" if user else "TUTUM_USER"
        raise ConfigError(f"missing credentials: set {missing}, or TUTUM_AUTH")
    try:
        proxy = choose_proxy(url, environ or {})
    except ProxyConfigError as exc:
        raise ConfigError(str(exc)) from None
    if proxy is not None:
        secrets += proxy.secrets
    return StreamConfig(
        url=url, headers=headers, ca_file=values.get("ca_file"),
        ping_interval=values["ping_interval"], ping_timeout=values["ping_timeout"],
        max_frame_bytes=values["max_frame_bytes"],
        retry_unauthorized=values["retry_unauthorized"], reconnect_max=reconnect_max,
        secrets=secrets, apikey_file=None if auth else values.get("apikey_file"),
        proxy=proxy), secrets


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """systemd's STATE_DIRECTORY, else XDG's state home, else ~/.local/state."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tutum-bridge"


ALL_RUN_SETTINGS = (STREAM_SETTINGS + AMQP_SETTINGS + TOPOLOGY_SETTINGS + RUN_SETTINGS
                    + HA_SETTINGS + LOG_SETTINGS)


# systemd credentials (LoadCredential=, systemd 247 and later) by the names the unit
# file gives them, and the settings they stand in for when those are not set.
CREDENTIAL_FILES = {"apikey_file": "tutum-apikey", "amqp_password_file": "amqp-password"}


def apply_credentials(values: dict[str, object], environ: Mapping[str, str]) -> None:
    """Files in systemd's $CREDENTIALS_DIRECTORY fill TUTUM_APIKEY_FILE and
    AMQP_PASSWORD_FILE where neither the flag nor the variable gave them: the unit
    needs no `%d` specifier, which systemd before 251 does not know."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    for setting, name in CREDENTIAL_FILES.items():
        path = Path(directory) / name
        if values.get(setting) is None and path.is_file():
            values[setting] = path


def spool_path(values: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Path:
    """BRIDGE_SPOOL, else in the state directory (this process's environment if no
    `environ` is given: a tool that opens the files beside the spool)."""
    environ = os.environ if environ is None else environ
    return values["spool"] or (values["state_dir"] or default_state_dir(environ)) / "spool.sqlite3"


def metrics_address_file(spool: Path) -> Path:
    """Where `run` writes the address its listener bound (port 0 picks one), beside
    the spool, so the health check finds it."""
    return spool.with_name(spool.name + ".metrics-address")


def bound_metrics_address(spool: Path) -> tuple[str, int] | None:
    """The (host, port) `run` bound its listener to, from the file beside `spool`;
    None while it has not written it (not started, or still starting)."""
    try:
        host, _, port = metrics_address_file(spool).read_text().strip().rpartition(":")
        return host, int(port)
    except (OSError, ValueError):
        return None


def probe_address(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """Where a health check reaches the bridge configured by `environ`; None when its
    listener is off (BRIDGE_METRICS_ADDR empty)."""
    environ = os.environ if environ is None else environ
    names = ("state_dir", "spool", "metrics_addr")
    values = resolve(argparse.Namespace(), environ,
                     tuple(s for s in RUN_SETTINGS if s.name in names))
    address = values["metrics_addr"]
    if address is None:
        return None
    host, port = address
    if port == 0:
        spool = spool_path(values, environ)
        bound = bound_metrics_address(spool)
        if bound is None:
            raise ConfigError(f"BRIDGE_METRICS_ADDR has port 0 and "
                              f"{metrics_address_file(spool)} does not say which port "
                              f"the bridge bound (not started yet?)")
        host, port = bound
    # A wildcard address is reached on the loopback of the same host or container.
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host), port


def ha_config(values: Mapping[str, object]) -> HaConfig:
    """Leadership needs a publisher that works (bridge/ha/node.py): a leader whose
    publisher stalls for twice the HA heartbeat gives up the lock, long enough for a
    reconnect to succeed, short enough for the standby to lead within 10 s."""
    heartbeat = values["ha_heartbeat"]
    return HaConfig(heartbeat, values["ha_fill_grace"],
                    values["ha_publish_timeout"] or 2.0 * heartbeat)


def load(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The validated `run` configuration, or ConfigError with one clear line."""
    environ = os.environ if environ is None else environ
    values = resolve(args, environ, ALL_RUN_SETTINGS)
    apply_credentials(values, environ)
    stream, stream_secrets = stream_config(values, values["reconnect_max"], environ)
    amqp, amqp_secrets = amqp_config(values)
    return Config(
        stream=stream, amqp=amqp,
        unrouted=values["unrouted"], quarantine=values["quarantine"],
        queue_type=values["queue_type"],
        history=values["history"], history_queue=values["history_queue"],
        spool_path=spool_path(values, environ),
        spool_max_bytes=values["spool_max_bytes"], spool_sync=values["spool_sync"],
        inflight=values["inflight"], reconnect_max=values["reconnect_max"],
        confirm_timeout=values["confirm_timeout"], shutdown_timeout=values["shutdown_timeout"], metrics_addr=values["metrics_addr"],
        log_level=values["log_level"], log_format=values["log_format"],
        secrets=stream_secrets + amqp_secrets,
        ha=ha_config(values) if values["ha"] else None,
        notify=systemd_notify(environ))
