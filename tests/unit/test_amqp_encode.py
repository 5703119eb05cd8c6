"""bridge.amqp_encode writes exactly what pika writes for a bridge publish.

The reference is pika's own path, unchanged: `Channel.basic_publish` -> the
connection's `_send_method` -> `_send_message` (which cuts the body into frames) ->
frame marshalling; only the socket below it is replaced by a list. The last test
is in tests/test_amqp_encode_live.py: it sends the encoded bytes to the
real broker and reads the message back.
"""

from __future__ import annotations

import string
from types import SimpleNamespace

import pika
import pytest
from hypothesis import given, settings, strategies as st
from pika.connection import Connection
from pika.exceptions import ShortStringTooLong

from bridge.amqp_encode import encode_publish

MIN_FRAME, MAX_FRAME = pika.spec.FRAME_MIN_SIZE, pika.spec.FRAME_MAX_SIZE


class _Wire:
    """Stands in for a connection under a channel: pika's own `_send_method` and
    `_send_message` run, and the frames they would write are collected."""

    callbacks = None
    _send_method = Connection._send_method
    _send_message = Connection._send_message
    _get_body_frame_max_length = Connection._get_body_frame_max_length

    def __init__(self, frame_max: int) -> None:
        self.params = SimpleNamespace(frame_max=frame_max)
        self._body_max_length = self._get_body_frame_max_length()
        self.frames: list[bytes] = []

    def _output_marshaled_frames(self, frames) -> None:
        self.frames.extend(frames)


def pika_bytes(channel_number, exchange, routing_key, body, *, message_id, timestamp,
               headers, frame_max) -> bytes:
    wire = _Wire(frame_max)
    channel = pika.channel.Channel(wire, channel_number, None)
    channel._set_state(channel.OPEN)          # as if Channel.OpenOk had arrived
    channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=message_id,
        timestamp=timestamp, app_id="tutum-bridge", headers=headers))
    return b"".join(wire.frames)


def both(*args, **kwargs) -> tuple[bytes, bytes]:
    return encode_publish(*args, **kwargs), pika_bytes(*args, **kwargs)


TYPICAL_HEADERS = {
    "type": "container", "action": "update", "state": "Running",
    "resource_uri": "/api/v1/container/0c5a1b2e-6f1d-4c8e-9b0a-3f2e1d4c5b6a/",
    "parents": ["/api/v1/service/7d3c2b1a-0f9e-4d8c-b7a6-5e4d3c2b1a0f/",
                "/api/v1/stack/1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d/",
                "/api/v1/node/9f8e7d6c-5b4a-4c2d-8e0f-1a2b3c4d5e6f/"],
}


@pytest.mark.parametrize("body", [b"", b"{}", b"x" * (MIN_FRAME - 8),
                                  b"y" * (MIN_FRAME - 7), b"z" * (3 * MIN_FRAME + 5)])
def test_body_sizes_and_frame_splits(body):
    ours, theirs = both(1, "tutum.events", "container.update", body, message_id="m-1",
                        timestamp=1_700_000_000, headers=TYPICAL_HEADERS, frame_max=MIN_FRAME)
    assert ours == theirs


@pytest.mark.parametrize("headers", [
    {},
    {"x-republished": True, "x-false": False},
    {"n": 0, "neg": -1, "i32max": 2**31 - 1, "i32min": -2**31, "big": 2**31, "small": -2**31 - 1,
     "i64max": 2**63 - 1},
    {"parents": [], "nested": [["a"], [1, True]], "unicode": "état ☃ 𝄞"},
    {"ключ": "значение", "x-frame-bytes": 1_048_577, "x-truncated": True},
    # types the bridge does not send take pika's own encoder, with the same result
    {"none": None, "raw": b"\x00\xff", "table": {"a": 1}, "list-of-none": [None],
     "long": pika.compat.long(5)},
    {b"bytes-key": "v"},
])
def test_header_value_types(headers):
    ours, theirs = both(7, "", "tutum.invalid", b"frame", message_id="id", timestamp=0,
                        headers=headers, frame_max=MAX_FRAME)
    assert ours == theirs


def test_method_frame_cache_keeps_destinations_apart():
    args = dict(message_id="m", timestamp=1, headers={}, frame_max=MAX_FRAME)
    for channel, exchange, key in [(1, "a", "b"), (2, "a", "b"), (1, "a", "c"),
                                   (1, "", "b"), (1, "a", "b")]:
        ours, theirs = both(channel, exchange, key, b"{}", **args)
        assert ours == theirs


@pytest.mark.parametrize("where", ["exchange", "routing_key", "message_id", "header key"])
def test_names_over_255_bytes_raise_like_pika(where):
    long_name = "é" * 128                      # 256 bytes in UTF-8
    args = dict(exchange="e", routing_key="k", message_id="m", headers={})
    if where == "header key":
        args["headers"] = {long_name: "v"}
    else:
        args[where] = long_name
    for encode in (encode_publish, pika_bytes):
        with pytest.raises(ShortStringTooLong):
            encode(1, args["exchange"], args["routing_key"], b"{}",
                   message_id=args["message_id"], timestamp=1, headers=args["headers"],
                   frame_max=MAX_FRAME)


_names = st.text(string.ascii_letters + string.digits + "._-", max_size=255)
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)   # no lone surrogates
_header_values = st.one_of(_text, st.booleans(), st.integers(-2**63, 2**63 - 1),
                           st.lists(_text, max_size=5))
_headers = st.dictionaries(st.text(min_size=1, max_size=40), _header_values, max_size=8)
# bodies of one to four frames at the smallest frame_max: a short pattern repeated to a size
_large_bodies = st.tuples(st.binary(min_size=1, max_size=16),
                          st.integers(MIN_FRAME - 10, 3 * MIN_FRAME + 100)).map(
                              lambda t: (t[0] * (t[1] // len(t[0]) + 1))[:t[1]])


@settings(max_examples=300, deadline=None)
@given(channel=st.integers(1, 2047), exchange=_names, routing_key=_names,
       body=st.one_of(st.binary(max_size=600), _large_bodies),
       message_id=st.text(max_size=100), timestamp=st.integers(0, 2**64 - 1),
       headers=_headers, frame_max=st.sampled_from([MIN_FRAME, MIN_FRAME + 1, MAX_FRAME]))
def test_identical_to_pika(channel, exchange, routing_key, body, message_id, timestamp,
                           headers, frame_max):
    kwargs = dict(message_id=message_id, timestamp=timestamp, headers=headers,
                  frame_max=frame_max)
    try:
        expected = pika_bytes(channel, exchange, routing_key, body, **kwargs)
    except (ShortStringTooLong, UnicodeEncodeError) as error:   # over 255 bytes; a surrogate
        with pytest.raises(type(error)):
            encode_publish(channel, exchange, routing_key, body, **kwargs)
        return
    assert encode_publish(channel, exchange, routing_key, body, **kwargs) == expected
