"""The bench of an HA test: the fault rig, plus a leader and a standby of one account.

`HaRig.pair` starts replica A and waits until it leads, then replica B and waits until
it is a standby, each with its own spool; either link can go through a proxy, so a
test can cut the leader's stream or its broker and nothing else.
"""

from __future__ import annotations

from bridge.event import classify
from tests.support.fault_rig import Rig
from tests.support.tcp_proxy import TcpProxy


class HaRig(Rig):
    """The fault rig with replicas (`replica`, `pair`)."""

    def replica(self, sim, name: str, *, stream: TcpProxy | None = None,
                via: TcpProxy | None = None, **env: str):
        env.setdefault("BRIDGE_HA", "on")
        env.setdefault("BRIDGE_SPOOL", str(self.tmp_path / f"{name}.sqlite3"))
        if stream is not None:
            env["TUTUM_STREAM_HOST"] = stream.url("ws")
        return self.bridge(sim, via=via, name=name, **env)

    def pair(self, sim, *, leader_stream: TcpProxy | None = None,
             leader_via: TcpProxy | None = None, leader_env: dict | None = None,
             standby_env: dict | None = None):
        leader = self.replica(sim, "replica-a", stream=leader_stream, via=leader_via,
                              **(leader_env or {}))
        leader.info["replica"] = self.wait_log(leader, "ha.leader", timeout=30)["replica"]
        standby = self.replica(sim, "replica-b", **(standby_env or {}))
        standby.info["replica"] = self.wait_log(standby, "ha.standby", timeout=30)["replica"]
        return leader, standby


def same_identity(messages) -> bool:
    """Every copy of an event carries the message_id (= x-event-id) of its first copy."""
    first: dict[int, str | None] = {}
    for msg in messages:
        if msg.seq is None:
            continue
        ident = msg.headers.get("x-event-id")
        if ident is None or ident != msg.message_id:
            raise AssertionError(f"sim_seq {msg.seq}: message_id {msg.message_id} but "
                                 f"x-event-id {ident}")
        if first.setdefault(msg.seq, ident) != ident:
            raise AssertionError(f"sim_seq {msg.seq}: {ident} after {first[msg.seq]}")
    return True


def as_classified_on_receipt(messages) -> bool:
    """Every event carries the routing key and headers its body calls for, whichever
    replica published it: a replica spools frames unclassified (bridge/event.py
    `defer`) and classifies them only when it publishes them."""
    for msg in messages:
        if msg.seq is None:
            continue
        expected = classify(msg.body, 0.0)
        headers = {k: v for k, v in msg.headers.items() if k not in ("x-event-id", "x-republished")}
        # pika decodes header strings as str and lists as lists, as classify builds them.
        if (msg.routing_key, headers) != (expected.routing_key, expected.headers):
            raise AssertionError(f"sim_seq {msg.seq}: {msg.routing_key} {headers}, but its "
                                 f"body calls for {expected.routing_key} {expected.headers}")
    return True
