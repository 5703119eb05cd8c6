"""Which handshakes carry good credentials, in every form Tutum accepted.

1. query `?token=<apikey>&user=<username>` (the documented form);
2. `Authorization: Basic base64(<username>:<apikey>)` (the official Python client);
3. `Authorization: ApiKey <username>:<apikey>`, or any verbatim value given with
   `--auth`.

Every comparison is constant-time over bytes, and nothing here logs or returns a
credential: the caller learns only the accepted user name, or None.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


class Credentials:
    """The accepted user and API key, plus an optional verbatim Authorization value."""

    def __init__(self, user: str, apikey: str, verbatim: str | None = None):
        self.user = user
        self._apikey = apikey
        self._verbatim = verbatim

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r})"

    def check(self, path: str, headers: Headers) -> str | None:
        """The user name if any form in the request is good, else None."""
        query = parse_qs(urlsplit(path).query, keep_blank_values=True)
        tokens, users = query.get("token", []), query.get("user", [])
        if len(tokens) == 1 and len(users) == 1 and self._pair(users[0], tokens[0]):
            return self.user
        for value in headers.get_all("Authorization"):
            if self._header(value.strip()):
                return self.user
        return None

    def _pair(self, user: str, apikey: str) -> bool:
        # Both comparisons always run: the time taken says nothing about which failed.
        return _same(user, self.user) & _same(apikey, self._apikey)

    def _header(self, value: str) -> bool:
        verbatim = self._verbatim is not None and _same(value, self._verbatim)
        scheme, _, rest = value.partition(" ")
        scheme, rest = scheme.lower(), rest.strip()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(rest, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return verbatim
            user, sep, apikey = decoded.partition(":")
            return verbatim | (bool(sep) & self._pair(user, apikey))
        if scheme == "apikey":
            user, sep, apikey = rest.partition(":")
            return verbatim | (bool(sep) & self._pair(user, apikey))
        return verbatim
