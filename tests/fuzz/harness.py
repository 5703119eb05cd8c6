"""What the fuzz targets check: whatever bytes the stream sends, nothing escapes but a
quarantine or a closed connection.

`frames_target` takes raw socket bytes (its first byte picks how they are cut into
reads) and runs them through the bridge's own path for a connection: the sans-IO
frame parser, then for every complete message the sink's decision (`classify`, or
quarantine for an oversize one), then the publish encoding with the negotiated
frame_max. The only exception allowed out is `ProtocolError` (the stream closes
that connection and reconnects). `classify_target` takes one frame payload.

Every event either way must be publishable: a routing key of two safe words (or
`invalid.<reason>` for a quarantine), and headers whose content-header frame fits
RabbitMQ's default frame_max. Run by tests/unit/test_fuzz_harness.py (hypothesis)
and tests/test_fuzz.py (atheris, coverage-guided); `python -m tests.fuzz --minutes N`.
"""

from __future__ import annotations

import re
import struct

from bridge.amqp_encode import encode_publish
from bridge.event import Event, Reason, classify, quarantine
from bridge.frames import BINARY, TEXT, FrameParser, ProtocolError

MAX_MESSAGE = 4096             # small, so the oversize paths are reached quickly
FRAME_MAX = 131072             # RabbitMQ's default
_SAFE_KEY = re.compile(r"[a-z0-9_-]{1,64}\.[a-z0-9_-]{1,64}\Z")  # docs/contract.md section 3
_REASONS = {v for k, v in vars(Reason).items() if k.isupper()}
_FRAME = struct.Struct(">BHI")


def check_event(event: Event) -> None:
    if event.quarantined:
        kind, _, reason = event.routing_key.partition(".")
        assert kind == "invalid" and reason in _REASONS, event.routing_key
        assert event.headers["x-quarantine-reason"] == reason
    else:
        assert _SAFE_KEY.match(event.routing_key), event.routing_key
    wire = encode_publish(1, "tutum.events", event.routing_key, event.body,
                          message_id="0123456789abcdef-123456789", timestamp=1,
                          headers={**event.headers, "x-republished": True},
                          frame_max=FRAME_MAX)
    method_size = _FRAME.unpack_from(wire)[2]
    header_size = _FRAME.unpack_from(wire, 7 + method_size + 1)[2]
    assert header_size <= FRAME_MAX - 8, f"content header of {header_size} bytes"


def classify_target(payload: bytes) -> None:
    for binary in (False, True):
        event = classify(payload, 0.0, binary=binary)
        if event is None:
            assert not binary
            continue
        check_event(event)


def frames_target(data: bytes) -> None:
    if not data:
        return
    step, stream = data[0] + 1, data[1:]
    parser = FrameParser(MAX_MESSAGE)
    try:
        for start in range(0, len(stream), step):
            parser.feed(stream[start:start + step])
            while (frame := parser.next()) is not None:
                if frame.opcode not in (TEXT, BINARY):
                    assert len(frame.payload) <= 125
                    continue
                if frame.oversize:
                    assert frame.size > MAX_MESSAGE
                    event = quarantine(frame.payload, 0.0, Reason.OVERSIZE, "oversize",
                                       binary=frame.opcode == BINARY, size=frame.size)
                else:
                    assert len(frame.payload) == frame.size <= MAX_MESSAGE
                    event = classify(frame.payload, 0.0, binary=frame.opcode == BINARY)
                if event is not None:
                    check_event(event)
    except ProtocolError:
        pass            # the connection is closed and replaced: allowed
