// An example worker in another language: Node.js with amqplib, reading container.*
// events from the bridge's exchange. Nothing in it is specific to tutum-bridge beyond
// the message contract (docs/contract.md section 3): any AMQP 0-9-1 client can be a worker.
//
// Run it next to the bridge, or next to `tutum-bridge demo` for made-up events:
//
//     npm install amqplib
//     AMQP_URL=amqp://guest:guest@localhost:5672 node examples/worker.js
//
// It prints one line per event on stdout: routing key, state, resource URI. Other
// settings: BRIDGE_EXCHANGE and BRIDGE_UNROUTED as given to the bridge, WORKER_QUEUE.
//
// Its queue, `example.containers-js`, is durable: events wait there while the worker
// is down. Delete it when you are done: `rabbitmqctl delete_queue example.containers-js`.

'use strict';

const amqp = require('amqplib');

const URL = process.env.AMQP_URL || 'amqp://guest:guest@localhost:5672';
const EXCHANGE = process.env.BRIDGE_EXCHANGE || 'tutum.events';
const UNROUTED = process.env.BRIDGE_UNROUTED || 'tutum.unrouted';
const QUEUE = process.env.WORKER_QUEUE || 'example.containers-js';
const DEDUPE = 10000; // message ids remembered; the bridge republishes with the same id

async function main() {
  const connection = await amqp.connect(URL);
  const channel = await connection.createChannel();
  // Declared exactly as the bridge declares it; any other way the broker refuses.
  await channel.assertExchange(EXCHANGE, 'topic', { durable: true, alternateExchange: UNROUTED });
  await channel.assertQueue(QUEUE, { durable: true });
  await channel.bindQueue(QUEUE, EXCHANGE, 'container.*');
  await channel.prefetch(20);

  // Message ids are `<spool id>-<sequence>`. A repeat is skipped unless an older event
  // was handled since (a nack lets N+1 through before N's republish): handling it again
  // keeps the last word on every event in the bridge's order.
  const seen = new Set(); // insertion-ordered, so the oldest id is the first one
  const lastSeq = new Map(); // spool id -> sequence handled last
  const position = (id) => {
    const m = /^(.+)-(\d+)$/.exec(id);
    return m ? [m[1], Number(m[2])] : [id, null];
  };
  await channel.consume(QUEUE, (msg) => {
    if (msg === null) return; // the broker cancelled us (queue deleted)
    const id = msg.properties.messageId;
    const [spool, seq] = id ? position(id) : [null, null];
    if (id && seen.has(id) && (seq === null || seq <= (lastSeq.get(spool) || 0))) {
      channel.ack(msg); // a republished duplicate: already handled
      return;
    }
    try {
      const event = JSON.parse(msg.content.toString('utf8')); // the frame, byte for byte
      const headers = msg.properties.headers || {};
      console.log(`${msg.fields.routingKey.padEnd(18)} ${(headers.state || '-').padEnd(12)} ` +
                  `${headers.resource_uri || event.resource_uri || ''}`);
    } catch (err) {
      // Requeue once; the second failure drops it (or dead-letters it, per queue policy).
      console.error(`cannot handle message ${id}: ${err.message}`);
      channel.nack(msg, false, !msg.fields.redelivered);
      return;
    }
    if (id) {
      seen.delete(id);
      seen.add(id);
      if (seen.size > DEDUPE) seen.delete(seen.values().next().value);
      if (seq !== null) lastSeq.set(spool, seq);
    }
    channel.ack(msg); // only now: a crash before this line means redelivery, not loss
  });

  const stop = async () => {
    await connection.close(); // unacked messages go back to the queue
    process.exit(0);
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  // On stderr, so stdout stays one line per event; from here on nothing is missed.
  console.error(`worker: consuming ${QUEUE} (container.* on ${EXCHANGE})`);
}

main().catch((err) => {
  console.error(`worker: ${err.message}`);
  process.exit(1);
});
