"""Routing keys: two safe words, whatever upstream sends.

The key is `<type>.<action>`. Each word is lowercased, every character outside
`[a-z0-9_-]` becomes `_`, and it is cut to 64 characters, so no upstream value can add a
word, a `*` or a `#`, and a key is at most 129 ASCII bytes (AMQP allows 255). A
missing, empty or non-string value is the word `none`, so `*.*` matches every event.
"""

from __future__ import annotations

import re
from functools import lru_cache

WORD_MAX = 64
NONE = "none"

_UNSAFE = re.compile(r"[^a-z0-9_-]")

# Real servers sent `type` in varying case, and the API documentation misspells the
# container type; both must reach the bindings workers actually write.
_TYPE_ALIASES = {"containter": "container"}


def routing_word(value: object) -> str:
    """One key word from an upstream value."""
    if not isinstance(value, str) or not value:
        return NONE
    # Cut before substituting too: lower() of a 10,000-character value is cheap, a
    # regex over it on every event is not. Substitution never changes the length.
    return _UNSAFE.sub("_", value.lower()[:WORD_MAX])


def type_word(value: object) -> str:
    word = routing_word(value)
    return _TYPE_ALIASES.get(word, word)


@lru_cache(maxsize=4096)
def _cached_key(type_: str, action: str) -> tuple[str, str, str]:
    t, a = type_word(type_), routing_word(action)
    return f"{t}.{a}", t, a


def routing_key(type_: object, action: object) -> tuple[str, str, str]:
    """(key, type word, action word) for an event's `type` and `action` values.

    Upstream uses a handful of types and actions, so the common case is a cache hit.
    """
    if isinstance(type_, str) and isinstance(action, str) and len(type_) + len(action) < 256:
        return _cached_key(type_, action)
    t, a = type_word(type_), routing_word(action)
    return f"{t}.{a}", t, a
