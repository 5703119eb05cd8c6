"""The one way a URL reaches a log line, a metric or an error message: `redact_url`.

A URL may carry a secret in its user info (`amqp://user:password@host`) or in its
query (`?token=...`); operators paste URLs with both. Every module that shows a URL
(the settings in bridge/config.py, the proxy in bridge/proxy.py) shows it through
here, so there is one rule to check, not one per module.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_QUERY_KEYS = {"token", "apikey", "api_key", "password"}


def redact_url(url: str) -> str:
    """The URL with any password and token replaced by `***`, safe for logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None or "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
        query = urlencode(
            [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)],
            safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable url>"
