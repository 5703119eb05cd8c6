"""The rules of docs/contract.md, written out independently of the bridge, for tests to compare against.

Routing words, header sets, quarantine reasons and topic-pattern matching, each as the
docs/contract.md states them (section 3) rather than as `bridge.routing`/`bridge.event` implement it, so
a test that uses these checks the bridge against the contract, not against itself.
"""

from __future__ import annotations

import json
import re

WORD = re.compile(r"[a-z0-9_-]{1,64}")
QUARANTINE_REASONS = frozenset({
    "oversize", "binary-frame", "invalid-utf8", "nul-byte", "invalid-json", "too-deep",
    "duplicate-keys", "not-an-object", "missing-type", "type-not-string"})
_PARENT = re.compile(r"/api/v1/([^/]+)/([^/]+)/\Z")


def spec_word(value: object) -> str:
    """Lowercase, replace unsafe characters, cut to 64; `none` if missing or empty."""
    if not isinstance(value, str) or value == "":
        return "none"
    return re.sub(r"[^a-z0-9_-]", "_", value.lower())[:64]


def spec_type_word(value: object) -> str:
    word = spec_word(value)
    return "container" if word == "containter" else word


def spec_key(obj: dict) -> str:
    return f"{spec_type_word(obj.get('type'))}.{spec_word(obj.get('action'))}"


def spec_headers(obj: dict) -> dict[str, object]:
    """The headers docs/contract.md section 3 promises for an ordinary event (short, well-formed values)."""
    headers: dict[str, object] = {"type": spec_type_word(obj.get("type")),
                                  "action": spec_word(obj.get("action"))}
    for name in ("state", "resource_uri"):
        if isinstance(obj.get(name), str):
            headers[name] = obj[name]
    parents = obj.get("parents")
    if isinstance(parents, list) and parents:
        headers["parents"] = parents
        for uri in parents:
            match = _PARENT.match(uri)
            if match:
                headers.setdefault(f"parent-{match.group(1)}", match.group(2))
    return headers


INVALID = object()


def parsed(payload: bytes) -> object:
    """The frame as strict JSON (no duplicate keys, no NaN), or INVALID."""
    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(name)
    try:
        return json.loads(payload.decode("utf-8"), object_pairs_hook=no_duplicates,
                          parse_constant=no_constants)
    except (ValueError, RecursionError):
        return INVALID


def quarantine_reasons(payload: bytes, binary: bool) -> set[str]:
    """The reasons a frame may be quarantined for (several can apply); empty if valid."""
    if binary:
        return {"binary-frame"}
    reasons = set()
    if b"\x00" in payload:
        reasons.add("nul-byte")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        reasons.add("invalid-utf8")
        return reasons
    if reasons:
        return reasons
    obj = parsed(payload)
    if obj is INVALID:
        try:
            json.loads(text, object_pairs_hook=dict)
        except RecursionError:
            return {"too-deep"}
        except ValueError:
            return {"invalid-json"}
        return {"duplicate-keys", "invalid-json"}     # duplicates, or NaN/Infinity
    if not isinstance(obj, dict):
        return {"not-an-object"}
    if "type" not in obj:
        return {"missing-type"}
    if not isinstance(obj["type"], str):
        return {"type-not-string"}
    return set()


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])
    return match(pattern.split("."), key.split("."))
