"""High availability (`BRIDGE_HA=on`, docs/contract.md section 7): replicas that cover
for each other, with the broker as the only coordinator.

- `identity`: what an event IS, the same on every replica's copy (`x-event-id`, also
  the `message_id`), so copies can be matched and workers can drop a second one;
- `witness`: a standby's books: which of its events the leader has published (and may
  be forgotten), which the leader missed (offered to it), what to publish on takeover;
- `link`: the replica's own AMQP connection: the lock that makes one leader, the
  leader's reports of what it confirmed, presence, offers of missed events;
- `node`: the roles (leader, standby), the takeover, the gate that lets the
  publisher publish only on the leader, and the rule that only a replica whose
  publisher works may be (or stay) the leader.

The publisher and the stream know nothing of this: the wiring hands the sink and the
publisher a `WitnessedSpool` and the publisher a gate (`may_publish`).
"""
