"""The bridge a user writes in half an hour from the Stream API docs: the benchmark's baseline.

One websocket, one blocking pika channel, one `basic_publish` per message; with
`--confirm` the channel waits for the broker's confirm of each message before the
next. Deliberately plain -- no batching, no spool, no reconnects, no tricks either
way -- so the comparison says what the real bridge's guarantees cost or save.

    python -m bridge.bench.naive --confirm|--no-confirm STREAM_URL AMQP_URL EXCHANGE
"""

import argparse
import json

import pika
import websocket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--confirm", action=argparse.BooleanOptionalAction, required=True)
    parser.add_argument("stream_url", help="ws://host/v1/events?token=KEY&user=USER")
    parser.add_argument("amqp_url")
    parser.add_argument("exchange")
    args = parser.parse_args()

    channel = pika.BlockingConnection(pika.URLParameters(args.amqp_url)).channel()
    if args.confirm:
        channel.confirm_delivery()

    def on_message(ws, message):
        event = json.loads(message)
        if event.get("type") == "auth":
            return
        channel.basic_publish(args.exchange, routing_key=f"{event['type']}.{event.get('action')}",
                              body=message, properties=pika.BasicProperties(delivery_mode=2))

    websocket.WebSocketApp(args.stream_url, on_message=on_message).run_forever(ping_interval=5)


if __name__ == "__main__":
    main()
