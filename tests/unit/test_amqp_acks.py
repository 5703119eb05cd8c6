"""bridge.amqp_acks reads the Basic.Ack frames pika writes, and nothing else (sans-IO;
tests/test_amqp_acks_live.py reads them from a real broker)."""

from __future__ import annotations

from hypothesis import given, strategies as st
from pika import frame, spec

from bridge.amqp_acks import ACK_FRAME_BYTES, leading_acks


def ack(tag: int, multiple: bool = False, channel: int = 1) -> bytes:
    return frame.Method(channel, spec.Basic.Ack(delivery_tag=tag, multiple=multiple)).marshal()


def nack(tag: int, channel: int = 1) -> bytes:
    return frame.Method(channel, spec.Basic.Nack(delivery_tag=tag)).marshal()


def test_a_run_of_acks_is_read_up_to_the_first_other_frame():
    buffer = ack(1) + ack(3, multiple=True) + nack(4) + ack(5)
    acks, used = leading_acks(buffer, channel=1)
    assert acks == [(1, False), (3, True)]
    assert used == 2 * ACK_FRAME_BYTES and buffer[used:] == nack(4) + ack(5)


def test_frames_for_pika_are_left_whole():
    for first in (frame.Heartbeat().marshal(), nack(1), ack(1, channel=2),
                  frame.Method(1, spec.Channel.Close(406, "PRECONDITION_FAILED", 0, 0)).marshal(),
                  frame.Method(1, spec.Basic.Ack(delivery_tag=1)).marshal()[:-1] + b"\x00"):
        assert leading_acks(first + ack(2), channel=1) == ([], 0)


def test_an_incomplete_ack_waits_for_the_rest_of_its_bytes():
    whole = ack(7) + ack(8, multiple=True)
    for cut in range(len(whole) + 1):
        acks, used = leading_acks(whole[:cut], channel=1)
        assert acks == [(7, False), (8, True)][:cut // ACK_FRAME_BYTES]
        assert used == ACK_FRAME_BYTES * len(acks)


@given(st.lists(st.tuples(st.integers(1, 2**64 - 1), st.booleans()), max_size=50),
       st.integers(1, 65535))
def test_any_tags_pika_writes_are_read_back(acks, channel):
    buffer = b"".join(ack(tag, multiple, channel) for tag, multiple in acks)
    assert leading_acks(buffer + frame.Heartbeat().marshal(), channel) == (acks, len(buffer))
