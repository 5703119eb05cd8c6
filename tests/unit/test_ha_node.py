"""A replica's part in HA, in process: offers on the leader, lifecycle annotation."""

from __future__ import annotations

import base64
import json

from bridge.config import AmqpConfig, HaConfig
from bridge.event import Event
from bridge.ha.link import LinkState
from bridge.ha.node import STANDBY_GATHER, HaNode
from bridge.metrics import Metrics
from bridge.publisher import State as PublisherState
from tests.unit.test_ha_witness import FakeSpool


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, kind: str, body: dict, keep: bool = False) -> None:
        self.sent.append((kind, body))


class FakePublisher:
    def __init__(self) -> None:
        self.paused = True
        self.notified = 0
        self.connected = True
        self.state = PublisherState.OPEN
        self.progress_at = 0.0
        self.stream_paces: list[float] = []    # what the node set the stream's pace to

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def notify(self) -> None:
        self.notified += 1


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))

    warning = info


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node(clock=None):
    spool, metrics, log = FakeSpool(), Metrics(), Log()
    ha = HaNode(HaConfig(publish_timeout=4.0), AmqpConfig(urls=("amqp://h/",), exchange="ex"),
                spool, metrics, log, clock=clock or Clock())
    ha.link, publisher = FakeLink(), FakePublisher()
    ha.attach(publisher, publisher.stream_paces.append)
    return ha, spool, publisher, log


def offer_of(ev: Event) -> dict:
    return {"routing_key": ev.routing_key, "received_at": 1.0, "quarantined": False,
            "headers": ev.headers, "body": base64.b64encode(ev.body).decode()}


def standby_event(body: bytes) -> Event:
    """An event as a standby spooled it: with its identity."""
    other = node()[0]
    ev = Event("container.update", body, 1.0, {"type": "container"})
    other.spool.append([ev])
    return ev


def test_a_leader_publishes_an_offered_event_once_and_reports_what_it_already_published():
    ha, spool, publisher, log = node()
    ha.on_state(LinkState.LEADER)
    assert not publisher.paused and ha.is_leader
    missed = standby_event(b'{"type": "container", "n": 1}')
    ha.on_message("offer", {"events": [offer_of(missed)]}, "standby-1")
    ha.on_message("offer", {"events": [offer_of(missed)]}, "standby-2")   # the same again
    assert [ev.body for ev in spool.events.values()] == [missed.body]
    assert spool.events[1].headers["x-event-id"] == missed.headers["x-event-id"]
    assert publisher.notified == 1

    ha.spool.confirm(1)                     # the broker confirmed it; reported
    assert ha.link.sent[-1] == ("confirmed", {"ids": [missed.headers["x-event-id"]]})
    ha.link.sent.clear()
    ha.on_message("offer", {"events": [offer_of(missed)]}, "standby-3")   # missed the report
    assert ha.link.sent == [("confirmed", {"ids": [missed.headers["x-event-id"]]})]
    assert len(spool.events) == 1


def test_a_standby_offers_nothing_when_not_asked_and_losing_the_link_pauses_the_leader():
    ha, _, publisher, log = node()
    ha.on_state(LinkState.LEADER)
    ha.on_state(LinkState.CLOSED)
    assert publisher.paused and not ha.is_leader
    assert ("ha.standby" in [e for e, _ in log.events])
    ha.on_message("offer", {"events": [offer_of(standby_event(b"{}"))]}, "x")
    assert ha.spool.last_seq == 0           # only a leader takes offers


def test_only_the_leader_reads_its_stream_frame_by_frame():
    ha, _spool, publisher, _log = node()
    assert publisher.stream_paces == [STANDBY_GATHER]      # created before any role
    ha.on_state(LinkState.STANDBY)
    ha.on_state(LinkState.LEADER)
    assert publisher.stream_paces[-1] == 0.0 and not publisher.paused
    ha.on_state(LinkState.CLOSED)                            # lost the broker
    assert publisher.stream_paces[-1] == STANDBY_GATHER and publisher.paused


def test_a_leaders_reconnection_says_which_standbys_covered_the_gap():
    ha, spool, _, _ = node()
    ha.on_state(LinkState.LEADER)
    ha.on_message("presence", {"role": "standby", "streaming_since": 100.0}, "b")
    ha.on_message("presence", {"role": "standby", "streaming_since": 250.0}, "c")
    body = {"type": "bridge", "action": "connected", "bridge_id": spool.id,
            "connected_at": 300.0, "gap": {"lost_at": 200.0, "reconnected_at": 300.0}}
    ha.spool.append([Event("bridge.connected", json.dumps(body).encode(), 300.0,
                           {"type": "bridge"})])
    gap = json.loads(spool.events[1].body)["gap"]
    assert gap["covered"] is True and gap["covered_by"] == ["b"]


def test_events_left_by_a_previous_run_are_on_the_books_before_new_ones():
    spool = FakeSpool()
    spool.append([Event("container.update", b"{}", 1.0, {"x-event-id": "left-1"})])
    ha = HaNode(HaConfig(), AmqpConfig(urls=("amqp://h/",), exchange="ex"), spool,
                Metrics(), Log())
    assert ha.witness.holds("left-1")
    ha.spool.append([Event("container.update", b"[]", 2.0, {})])
    new_id = spool.events[2].headers["x-event-id"]
    ha.witness.leader_published([new_id])
    ha.witness.tick()
    assert spool.confirmed == 0             # the old one is a hole now, not forgotten


def test_only_a_replica_whose_publisher_works_may_lead_and_one_that_gave_up_lets_others_first():
    """docs/contract.md section 7: a replica that cannot reach the broker is never leader,
    though its HA link (another connection) can: the link asks `leadership_blocked`."""
    clock = Clock()
    ha, _, publisher, log = node(clock)
    publisher.connected, publisher.state = False, PublisherState.CONNECTING
    assert "not open" in ha.leadership_blocked()        # a standby does not compete
    publisher.connected, publisher.state = True, PublisherState.OPEN
    assert ha.leadership_blocked() is None

    ha.on_state(LinkState.LEADER)
    clock.now = 3.9
    publisher.connected = False           # reconnecting, still within the bound: keeps it
    assert ha.leadership_blocked() is None
    clock.now = 4.1                       # no progress for longer than BRIDGE_HA_PUBLISH_TIMEOUT
    assert "no progress" in ha.leadership_blocked()

    ha.on_state(LinkState.STANDBY)        # the link gave the lock up
    assert publisher.paused and not ha.is_leader
    assert ("ha.standby", {"replica": ha.replica,
                           "detail": "gave up the lock: our publisher does not work"}) \
        in log.events
    publisher.connected, publisher.progress_at = True, 4.5      # open again, idle
    clock.now = 5.0
    assert "another replica first" in ha.leadership_blocked()
    clock.now = 8.2
    assert ha.leadership_blocked() is None
