"""The bytes bridge.amqp_encode writes are a publish the real broker accepts, confirms
and delivers intact (the byte-for-byte comparison with pika is in tests/unit)."""

from __future__ import annotations

import pika

from bridge.amqp_encode import encode_publish
from tests.support.broker import AMQP_URL, connect, unique
from tests.support.wait import wait_for
from tests.unit.test_amqp_encode import TYPICAL_HEADERS


def test_broker_accepts_and_delivers_encoded_bytes():
    """Written to a live connection the way pika writes its own frames, the bytes are
    one confirmed publish in step with pika's, and come back with the body, routing
    key and every property intact."""
    exchange, queue = unique("t-encode-x"), unique("t-encode-q")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL + "?frame_max=4096"))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic")
        channel.queue_declare(queue)
        channel.queue_bind(queue, exchange, "container.*")
        impl = channel._impl            # the async channel, to see every confirm
        acks, selected = [], []
        impl.confirm_delivery(ack_nack_callback=acks.append, callback=selected.append)
        wait_for(lambda: connection.process_data_events(0.05) or selected, what="SelectOk")

        frame_max = connection._impl.params.frame_max       # negotiated: 3 body frames
        body = ('{"type":"container","action":"update","pad":"%s"}' % ("é" * 5000)).encode()
        headers = {**TYPICAL_HEADERS, "x-republished": True, "x-frame-bytes": len(body)}
        connection._impl._output_marshaled_frames([encode_publish(
            impl.channel_number, exchange, "container.update", body, message_id="msg-é-1",
            timestamp=1_700_000_123, headers=headers, frame_max=frame_max)])
        impl.basic_publish(exchange, "container.create", b"{}")   # pika's own, after ours

        wait_for(lambda: connection.process_data_events(0.05) or
                 (acks and acks[-1].method.delivery_tag == 2), what="both confirmed")
        assert all(isinstance(a.method, pika.spec.Basic.Ack) for a in acks)  # one may be multiple
        method, props, got = channel.basic_get(queue, auto_ack=True)
        second = channel.basic_get(queue, auto_ack=True)[0]
    finally:
        if connection.is_open:          # a malformed frame makes the broker close it
            connection.close()
        with connect() as cleanup:
            cleanup.channel().queue_delete(queue)
            cleanup.channel().exchange_delete(exchange)
    assert frame_max == 4096 and len(body) > 2 * frame_max
    assert got == body
    assert (method.exchange, method.routing_key) == (exchange, "container.update")
    assert (props.content_type, props.delivery_mode, props.message_id, props.timestamp,
            props.app_id) == ("application/json", 2, "msg-é-1", 1_700_000_123, "tutum-bridge")
    assert props.headers == headers
    assert second.routing_key == "container.create"
