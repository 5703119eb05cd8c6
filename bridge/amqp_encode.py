"""The wire bytes of one bridge publish, encoded in one pass.

Why: pika marshals each publish in pure Python through several layers (Method, Header
and Body frame objects, `BasicProperties.encode` testing fourteen optional fields,
`encode_table` dispatching per value), about a third of the publisher thread's time.
The bridge's property set is fixed, so most bytes are constants: the method frame
depends only on (channel, exchange, routing key) and is cached, and the content header
is a constant prefix around the headers table, the message id and the timestamp.

Promise: `encode_publish` returns exactly the bytes pika writes for `basic_publish(
exchange, routing_key, body, BasicProperties(content_type="application/json",
delivery_mode=2, message_id=..., timestamp=..., app_id="tutum-bridge", headers=...))`
with that negotiated frame_max, and raises what pika raises (`ShortStringTooLong`), and
ValueError for a content header larger than frame_max (which pika would send, for the
broker to close the connection on).
Header values other than str, bool, int and lists of them go through pika's own
`encode_table`. tests/test_amqp_encode.py checks this against pika and a broker.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pika import data, spec
from pika.exceptions import ShortStringTooLong

CONTENT_TYPE = "application/json"
APP_ID = "tutum-bridge"

_END = b"\xce"
_FRAME = struct.Struct(">BHI")             # frame type, channel, payload size
_HEADER = struct.Struct(">BHIHxxQ")        # the same, then class id, weight, body size
_FIELD = struct.Struct(">BI")              # field type, 32-bit length ('S', 'A')
_INT, _LONG = struct.Struct(">Bi"), struct.Struct(">Bq")
_MODE_AND_ID_SIZE, _U32, _U64 = struct.Struct(">BB"), struct.Struct(">I"), struct.Struct(">Q")


def _short(value) -> bytes:
    pieces: list[bytes] = []
    data.encode_short_string(pieces, value)
    return b"".join(pieces)


_P = spec.BasicProperties
# Fields follow the flag word in this order: content_type, headers, delivery_mode,
# message_id, timestamp, app_id.
_FLAGS_AND_TYPE = struct.pack(">H", _P.FLAG_CONTENT_TYPE | _P.FLAG_HEADERS
                              | _P.FLAG_DELIVERY_MODE | _P.FLAG_MESSAGE_ID
                              | _P.FLAG_TIMESTAMP | _P.FLAG_APP_ID) + _short(CONTENT_TYPE)
_APP_ID = _short(APP_ID)
# Header payload besides the table and the message id's bytes: class id, weight and
# body size (12), flags and type, delivery mode and id length (2), timestamp (8), app id.
_HEADER_FIXED = 12 + len(_FLAGS_AND_TYPE) + 2 + 8 + len(_APP_ID)
_PUBLISH = struct.pack(">IH", spec.Basic.Publish.INDEX, 0)      # method id, ticket


def properties(message_id: str, timestamp: int, headers: dict) -> spec.BasicProperties:
    """The properties of every bridge publish (docs/contract.md section 3), as pika's
    object: for pika's own `basic_publish`, when `encode_publish` is not used."""
    return spec.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2,
                                message_id=message_id, timestamp=timestamp, app_id=APP_ID,
                                headers=headers)


@lru_cache(maxsize=1024)
def _method_frame(channel_number: int, exchange: str, routing_key: str) -> bytes:
    """Basic.Publish with mandatory and immediate off: constant per destination."""
    payload = _PUBLISH + _short(exchange) + _short(routing_key) + b"\x00"
    return _FRAME.pack(spec.FRAME_METHOD, channel_number, len(payload)) + payload + _END


@lru_cache(maxsize=256)
def _name(key) -> bytes | None:
    """A header name as a short string (names repeat); None for a name left to pika."""
    return _short(key) if type(key) is str else None


def _value(value) -> bytes | None:
    """A field value as pika's `encode_value` writes it; None for a type left to pika."""
    kind = type(value)
    if kind is str:
        raw = value.encode()
        return _FIELD.pack(83, len(raw)) + raw                           # 'S'
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:     # pika: 'I' if it fits 32 bits, else 'l'; past 64 bits both raise
        return _INT.pack(73, value) if -0x80000000 <= value <= 0x7FFFFFFF \
            else _LONG.pack(108, value)
    if kind is list:
        items = [_value(item) for item in value]
        if None in items:
            return None
        raw = b"".join(items)
        return _FIELD.pack(65, len(raw)) + raw                           # 'A'
    return None


def _table(headers: dict) -> bytes:
    pieces = []
    for key, value in headers.items():
        name = _name(key)
        if type(value) is str:                 # most values; inlined for speed
            raw = value.encode()
            encoded = _FIELD.pack(83, len(raw)) + raw
        else:
            encoded = _value(value)
        if name is None or encoded is None:
            pieces = []
            data.encode_table(pieces, headers)
            return b"".join(pieces)
        pieces.append(name + encoded)
    raw = b"".join(pieces)
    return _U32.pack(len(raw)) + raw


def encode_publish(channel_number: int, exchange: str, routing_key: str, body: bytes, *,
                   message_id: str, timestamp: int, headers: dict, frame_max: int) -> bytes:
    """Method, content header and body frame(s) of one persistent JSON publish.

    `frame_max` is the connection's negotiated maximum (`connection.params.frame_max`
    once open); the body is cut into frames of `frame_max - 8` bytes, as pika does.
    """
    table = _table(headers)
    mid = message_id.encode()
    if len(mid) > 255:
        raise ShortStringTooLong(mid)
    size = len(body)
    header = _HEADER_FIXED + len(table) + len(mid)
    if header + spec.FRAME_HEADER_SIZE + spec.FRAME_END_SIZE > frame_max:
        # pika would send it, and the broker would close the connection (frame error).
        raise ValueError(f"its content header ({header} bytes) does not fit in "
                         f"frame_max {frame_max}")
    out = [_method_frame(channel_number, exchange, routing_key),
           _HEADER.pack(spec.FRAME_HEADER, channel_number,
                        header, _P.INDEX, size),
           _FLAGS_AND_TYPE, table, _MODE_AND_ID_SIZE.pack(2, len(mid)), mid,
           _U64.pack(timestamp), _APP_ID, _END]
    chunk = frame_max - spec.FRAME_HEADER_SIZE - spec.FRAME_END_SIZE
    for start in range(0, size, chunk):
        fragment = body[start:start + chunk] if size > chunk else body
        out += (_FRAME.pack(spec.FRAME_BODY, channel_number, len(fragment)), fragment, _END)
    return b"".join(out)
