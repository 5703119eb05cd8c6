"""The message between the stream and the broker: `Event`, and how a frame becomes one.

`classify` is the one place that decides what a frame is: a routable event (with its
routing key and headers), a handshake frame to skip (`auth`), or something to
quarantine with a machine-readable reason. It never raises for any input, never
re-serialises the body, and bounds everything it puts in headers.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from dataclasses import dataclass, field
from functools import lru_cache

from bridge.routing import routing_key, routing_word

# Header bounds. RabbitMQ refuses a header frame over its frame_max (128 KiB by
# default), so the worst case must fit: 32 parents, each in the list and as a
# `parent-<kind>` header, of 256 characters of up to 4 UTF-8 bytes, is about 66 KB.
HEADER_VALUE_MAX = 256       # characters of any one string header value
PARENTS_MAX = 32             # entries in the `parents` list header
EXCERPT_MAX = 200            # characters of a quarantined frame shown in a log line

# With BRIDGE_HA=on every replica names each event by what it is (bridge/ha/identity.py)
# in this header; the publisher then uses it as the `message_id`, the same on every copy.
IDENTITY_HEADER = "x-event-id"

_PARENT_URI = re.compile(r"/api/v1/([^/]+)/([^/]+)/?\Z")


@dataclass(slots=True)
class Event:
    """One message to publish, from the moment it is received.

    `headers` are the AMQP headers docs/contract.md promises; `quarantined` events go to the
    quarantine queue instead of the topic exchange. The spool adds the sequence
    number, from which the publisher derives `message_id`.
    """

    routing_key: str
    body: bytes
    received_at: float
    headers: dict[str, object] = field(default_factory=dict)
    quarantined: bool = False

    @property
    def size(self) -> int:
        return len(self.body)


class Reason:
    """Machine-readable quarantine reasons (the `x-quarantine-reason` header)."""

    OVERSIZE = "oversize"
    BINARY = "binary-frame"
    INVALID_UTF8 = "invalid-utf8"
    NUL_BYTE = "nul-byte"
    INVALID_JSON = "invalid-json"
    TOO_DEEP = "too-deep"
    DUPLICATE_KEYS = "duplicate-keys"
    NOT_AN_OBJECT = "not-an-object"
    MISSING_TYPE = "missing-type"
    TYPE_NOT_STRING = "type-not-string"


class _Duplicate(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Duplicate
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                            parse_constant=_reject_constant)
# Python refuses to turn more than 4,300 digits into an int (a guard against
# quadratic conversion); such a number is still valid JSON. This slower decoder, which
# keeps big numbers as exact decimals, is only tried when the fast one hit that limit.
_big_number_decoder = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                                       parse_constant=_reject_constant, parse_int=Decimal)
_scan_once = _decoder.scan_once


def _decode(text: str) -> object:
    try:
        return _scan(text)
    except ValueError as exc:
        if "digits" not in str(exc) or isinstance(exc, _Duplicate):
            raise
    return _big_number_decoder.decode(text)


def _scan(text: str) -> object:
    """`_decoder.decode(text)`, without its two Python frames and two regex matches
    for the common frame, a value with no whitespace around it (4% of the bridge's
    busy time in a burst, `py-spy record --gil`). Any other text, valid or not, goes
    through `decode` itself, so what is accepted and every error are the same."""
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration:           # leading whitespace, or no value at all
        return _decoder.decode(text)
    if end != len(text):            # trailing whitespace, or more after the value
        return _decoder.decode(text)
    return obj


def quarantine(body: bytes, received_at: float, reason: str, detail: str,
               *, binary: bool = False, size: int | None = None) -> Event:
    """An event for the quarantine queue; `size` is the frame's size when `body` is cut."""
    headers: dict[str, object] = {
        "x-quarantine-reason": reason,
        "x-quarantine-detail": header_value(detail),
        "x-frame-opcode": "binary" if binary else "text",
        "x-frame-bytes": len(body) if size is None else size,
    }
    if size is not None and size > len(body):
        headers["x-truncated"] = True
    return Event(f"invalid.{reason}", body, received_at, headers, quarantined=True)


def classify(body: bytes, received_at: float, *, binary: bool = False) -> Event | None:
    """The event for one complete frame, or None for a handshake (`auth`) frame."""
    if binary:
        return quarantine(body, received_at, Reason.BINARY, "binary frame", binary=True)
    if b"\x00" in body:
        return quarantine(body, received_at, Reason.NUL_BYTE, "frame contains a NUL byte")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return quarantine(body, received_at, Reason.INVALID_UTF8, str(exc))
    try:
        obj = _decode(text)
    except _Duplicate:
        return quarantine(body, received_at, Reason.DUPLICATE_KEYS, "an object repeats a key")
    except RecursionError:
        return quarantine(body, received_at, Reason.TOO_DEEP, "JSON nested too deeply")
    except ValueError as exc:
        return quarantine(body, received_at, Reason.INVALID_JSON, str(exc))
    if not isinstance(obj, dict):
        return quarantine(body, received_at, Reason.NOT_AN_OBJECT,
                          f"JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        if "type" not in obj:
            return quarantine(body, received_at, Reason.MISSING_TYPE, "no type field")
        return quarantine(body, received_at, Reason.TYPE_NOT_STRING,
                          f"type is a JSON {type(kind).__name__}")
    if kind == "auth":
        return None
    key, type_word, action_word = routing_key(kind, obj.get("action"))
    return Event(key, body, received_at, event_headers(obj, type_word, action_word))


# The routing key of an event whose frame is classified when it is published, not when
# it is received (`defer`): an HA replica spools every frame, but publishes only those
# the leader never did, so a standby that classified on receipt would decode the JSON
# of every event for nothing (a quarter of its CPU in a burst, measured by py-spy).
DEFERRED = ""


def defer(body: bytes, received_at: float) -> Event | None:
    """An event to classify later (`resolve`) for a text frame; None when only
    classifying it now can tell what it is (it may be the `auth` handshake, which is
    dropped, not spooled). A frame is a handshake only if its JSON says `"type":
    "auth"`, so its bytes hold `auth`, or a backslash (a `\\u` escape that spells
    it): without either, deferring is safe. (A backslash, not `\\u`: one byte is a
    memchr, four times faster on a 1 KB body.)"""
    if b"\\" in body or b"auth" in body:
        return None
    return Event(DEFERRED, body, received_at, {})


def resolve(event: Event) -> Event:
    """The classified event of a deferred one, with the headers it was given since
    (the HA identity), after those of its class, as `classify` on receipt would give.
    Any other event is returned as it is."""
    if event.routing_key != DEFERRED:
        return event
    classified = classify(event.body, event.received_at)    # not None: see `defer`
    classified.headers.update(event.headers)
    return classified


def derive_headers(body: bytes) -> dict[str, object]:
    """The headers of a routable event, from its body alone (for the spool's backlog)."""
    event = classify(body, 0.0)
    return event.headers if event is not None else {}


def header_value(text: str) -> str:
    """A string that fits the bounds and that UTF-8 can carry.

    Valid JSON can hold a lone surrogate (`"\\ud800"`), which no AMQP header can.
    """
    text = text[:HEADER_VALUE_MAX]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def event_headers(obj: dict, type_word: str, action_word: str) -> dict[str, object]:
    """`type`, `action`, `state`, `resource_uri`, `parents` and `parent-<kind>` headers."""
    headers: dict[str, object] = {"type": type_word, "action": action_word}
    # `header_value` only for what it would change: a call a value was a fifth of this.
    for name in ("state", "resource_uri"):
        value = obj.get(name)
        if isinstance(value, str):
            headers[name] = value if value.isascii() and len(value) <= HEADER_VALUE_MAX \
                else header_value(value)
    parents = obj.get("parents")
    if isinstance(parents, list) and parents:
        kept = [p if p.isascii() and len(p) <= HEADER_VALUE_MAX else header_value(p)
                for p in parents[:PARENTS_MAX] if isinstance(p, str)]
        headers["parents"] = kept
        for uri in kept:
            parent = _parent_header(uri)
            if parent is not None:
                headers.setdefault(*parent)
    return headers


@lru_cache(maxsize=1024)
def _parent_header(uri: str) -> tuple[str, str] | None:
    """(`parent-<kind>`, id) for a parent's URI. Cached: the same services, stacks and
    nodes are the parents of event after event, and the regex and the routing word
    were most of the cost of an event's headers. An entry is about 350 bytes; over
    300,000 simulated events, 256 entries hit as often as 8,192 (98%: the misses are
    first sightings), and 8,192 took 3 MB that a soak read as growth."""
    match = _PARENT_URI.match(uri)
    if match is None:
        return None
    return "parent-" + routing_word(match.group(1)), match.group(2)


def excerpt(body: bytes) -> str:
    """A short, printable, single-line view of a frame, safe to put in a log."""
    text = body[:EXCERPT_MAX].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if len(body) > EXCERPT_MAX else "")
