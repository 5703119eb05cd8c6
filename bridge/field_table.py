"""AMQP 0-9-1 field-table entries: the form an event's headers travel in.

Why: `classify` knows every header of a routable event the moment it reads the frame,
so it writes them once, as table entries (bytes), instead of a dict that the spool
marshals, reads back and the publisher encodes again. Written from the values in
hand, with the entries of recurring parents cached (bridge/event.py), that took a
third off classifying plus encoding an event, and marshal stores and reads bytes
faster than a dict (the README, "The benchmark"). This module is the encoding alone:
no pika, so the stream's side of the bridge can use it.

Promise: `entry(name, value)` is exactly what pika's `encode_table` writes for that
(name, value) pair, for str, bool, int (64 bits at most) and lists of those, and None
for a value of any other type or a name over 255 bytes, which the caller leaves to
pika. `entries(headers)` is that for a whole dict, in its order. `table(raw)` puts the
length in front. `decode(raw)` reads back what `entry` writes.
tests/unit/test_field_table.py checks all of it against pika.
"""

from __future__ import annotations

import struct
from functools import lru_cache

_FIELD = struct.Struct(">BI")              # field type, 32-bit length ('S', 'A')
_INT, _LONG = struct.Struct(">Bi"), struct.Struct(">Bq")
_U32 = struct.Struct(">I")


@lru_cache(maxsize=256)
def name(key) -> bytes | None:
    """A header name as a short string (names repeat); None for one pika must judge."""
    if type(key) is not str:
        return None
    raw = key.encode()
    return bytes((len(raw),)) + raw if len(raw) <= 255 else None


def string(value: str) -> bytes:
    """A str value ('S', a long string)."""
    raw = value.encode()
    return _FIELD.pack(83, len(raw)) + raw


def strings(values: list) -> bytes:
    """An array of already encoded values ('A')."""
    raw = b"".join(values)
    return _FIELD.pack(65, len(raw)) + raw


def value(item) -> bytes | None:
    """A field value as pika's `encode_value` writes it; None for a type left to pika."""
    kind = type(item)
    if kind is str:
        return string(item)
    if kind is bool:
        return b"t\x01" if item else b"t\x00"
    if kind is int:     # pika: 'I' if it fits 32 bits, else 'l'; past 64 bits both raise
        if -0x80000000 <= item <= 0x7FFFFFFF:
            return _INT.pack(73, item)
        return _LONG.pack(108, item) if -2**63 <= item < 2**63 else None
    if kind is list:
        items = [value(element) for element in item]
        return None if None in items else strings(items)
    return None


def entry(key, item) -> bytes | None:
    encoded_name = name(key)
    if encoded_name is None:
        return None
    encoded = string(item) if type(item) is str else value(item)
    return None if encoded is None else encoded_name + encoded


def entries(headers: dict) -> bytes | None:
    """Every pair of `headers`, in order; None if any must be left to pika."""
    pieces = []
    for key, item in headers.items():
        encoded = entry(key, item)
        if encoded is None:
            return None
        pieces.append(encoded)
    return b"".join(pieces)


def table(raw: bytes) -> bytes:
    """A field table of encoded entries: their length, then them."""
    return _U32.pack(len(raw)) + raw


def decode(raw: bytes) -> dict[str, object]:
    """The headers of entries `entry` wrote (for the few readers that need a dict: the
    dead-letter file, an HA offer); raises ValueError on anything else."""
    headers: dict[str, object] = {}
    at = 0
    while at < len(raw):
        size = raw[at]
        key = raw[at + 1:at + 1 + size].decode()
        headers[key], at = _decode_value(raw, at + 1 + size)
    return headers


def _decode_value(raw: bytes, at: int) -> tuple[object, int]:
    kind = raw[at]
    if kind in (83, 65):                                         # 'S', 'A'
        size = _U32.unpack_from(raw, at + 1)[0]
        start, end = at + 5, at + 5 + size
        if kind == 83:
            return raw[start:end].decode(), end
        items = []
        while start < end:
            item, start = _decode_value(raw, start)
            items.append(item)
        return items, end
    if kind == 116:                                              # 't'
        return raw[at + 1] != 0, at + 2
    if kind == 73:                                               # 'I'
        return _INT.unpack_from(raw, at)[1], at + 5
    if kind == 108:                                              # 'l'
        return _LONG.unpack_from(raw, at)[1], at + 9
    raise ValueError(f"field type {chr(kind)!r} is not one this module writes")
