"""A worker project's integration test, written with the testing kit's three fixtures
(the README shows this file). tests/test_testing_kit.py copies it, as test_inventory.py,
into a directory outside the repository and runs pytest there; named so that the
project's own run does not collect it."""

import json

import pika


def test_the_inventory_queue_gets_container_events_only(amqp_url, tutum_stream, tutum_bridge):
    channel = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
    channel.queue_declare("inventory", durable=True)
    channel.queue_bind("inventory", tutum_bridge.exchange, "container.*")
    tutum_stream.send({"type": "container", "action": "update", "state": "Running",
                       "resource_uri": "/api/v1/container/c1/", "parents": []})
    tutum_stream.send({"type": "service", "action": "create", "state": "Init",
                       "resource_uri": "/api/v1/service/s1/", "parents": []})
    tutum_bridge.wait_confirmed(2)
    method, properties, body = channel.basic_get("inventory", auto_ack=True)
    assert method.routing_key == "container.update" and json.loads(body)["state"] == "Running"
    assert channel.basic_get("inventory", auto_ack=True)[0] is None
