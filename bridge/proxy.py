"""Reaching the stream through an HTTP proxy: which proxy applies, and the CONNECT
exchange that opens a tunnel through it.

Networks that only let traffic out through a proxy name it the way curl, pip and
requests read it: `https_proxy` for a `wss://` stream, `http_proxy` for `ws://`
(lower case first, then upper case), and `no_proxy` for the hosts to reach directly.
The bridge asks the proxy for a tunnel (`CONNECT host:port`), then speaks TLS and the
websocket through it exactly as it would directly, so the certificate it verifies is
still the stream's own (docs/contract.md section 2, the upstream protocol, unchanged).

This module is sans-IO: `choose` reads a mapping, `connect_request` returns bytes,
and `reply_length` and `parse_reply` read bytes the caller received. The socket, the
deadline and the stop flag are the stream's (bridge/stream.py).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from bridge.redact import redact_url

# Every variable `choose` reads (part of bridge/config.py BRIDGE_ENVIRONMENT).
VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY")
REPLY_MAX = 16 * 1024     # bytes of a CONNECT reply's head; a proxy's is a few hundred
REASON_MAX = 100          # characters of the proxy's reason phrase kept for the log


class ProxyConfigError(ValueError):
    """A proxy variable the bridge cannot use; the message names it, never its secret."""


class ProxyRefused(Exception):
    """The proxy did not open the tunnel, or answered something that is not HTTP."""


@dataclass(frozen=True)
class HttpProxy:
    """An HTTP proxy to tunnel through; `redacted` is its URL safe for a log line."""

    host: str
    port: int
    redacted: str
    authorization: str | None = field(default=None, repr=False)   # Proxy-Authorization
    secrets: tuple[str, ...] = field(default=(), repr=False)      # for the log to hide


def choose(url: str, environ) -> HttpProxy | None:
    """The proxy for the stream at `url`, or None to connect directly.

    Raises ProxyConfigError for a proxy URL that is not `http://` (or has no scheme,
    which means `http://`, as for curl): a bridge that ignored it would try the
    direct route that the proxy exists to replace, and fail in a way that says less.
    """
    target = urlsplit(url)
    names = ("https_proxy", "HTTPS_PROXY") if target.scheme == "wss" else ("http_proxy",
                                                                           "HTTP_PROXY")
    name = next((n for n in names if environ.get(n)), None)
    if name is None:
        return None
    port = target.port or (443 if target.scheme == "wss" else 80)
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if bypassed(target.hostname or "", port, no_proxy):
        return None
    return parse_proxy_url(name, environ[name])


def parse_proxy_url(name: str, text: str) -> HttpProxy:
    """`[http://][user[:password]@]host[:port]`; the port defaults to 80."""
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port or 80
    except ValueError:
        raise ProxyConfigError(f"{name}: not a proxy URL (http://host:port)") from None
    if parts.scheme != "http":
        raise ProxyConfigError(f"{name}: {parts.scheme}:// proxies are not supported; use "
                               f"an http:// proxy, or list the stream host in no_proxy")
    if not parts.hostname:
        raise ProxyConfigError(f"{name}: the proxy URL names no host")
    if parts.username is None:
        return HttpProxy(parts.hostname, port, redact_url(text))
    password = unquote(parts.password or "")
    token = base64.b64encode(f"{unquote(parts.username)}:{password}".encode()).decode()
    return HttpProxy(parts.hostname, port, redact_url(text),
                     f"Basic {token}", tuple(s for s in (token, password) if s))


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether `no_proxy` sends `host:port` around the proxy.

    Entries are comma-separated: `*` (everything), a name that also covers its
    subdomains (`example.com`, `.example.com` and `*.example.com` alike), an address
    or a network (`10.0.0.0/8`, `::1`), each optionally with `:port`
    (`[v6]:port` for an IPv6 address).
    """
    host = host.lower().strip("[]")
    for entry in no_proxy.lower().replace(" ", "").split(","):
        name, entry_port = _split_port(entry)
        if not name or (entry_port is not None and entry_port != port):
            continue
        if name == "*" or _same_host(host, name):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, int(port) if port.isdigit() else None
    return entry, None


def _same_host(host: str, name: str) -> bool:
    try:
        network = ipaddress.ip_network(name, strict=False)
    except ValueError:
        name = name.removeprefix("*").lstrip(".")
        return host == name or host.endswith("." + name)
    try:
        return ipaddress.ip_address(host) in network
    except ValueError:
        return False


def connect_request(host: str, port: int, proxy: HttpProxy) -> bytes:
    """The CONNECT request for a tunnel to `host:port`."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def reply_length(received: bytes) -> int | None:
    """How many of the bytes received so far are the reply's head (up to and including
    its blank line), or None while it is incomplete; what follows is the tunnel's.
    Raises ProxyRefused past REPLY_MAX."""
    end = received.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    if len(received) > REPLY_MAX:
        raise ProxyRefused(f"its reply to CONNECT has no end in {REPLY_MAX} bytes")
    return None


def parse_reply(head: bytes) -> None:
    """Returns if the head says the tunnel is open (any 2xx); else raises ProxyRefused
    with the status and a printable, bounded reason."""
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProxyRefused(f"answered CONNECT with something that is not HTTP: "
                           f"{_printable(status_line)!r}")
    if not code.startswith("2"):
        raise ProxyRefused(f"refused CONNECT: HTTP {code} {_printable(reason)}".rstrip())


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:REASON_MAX])
