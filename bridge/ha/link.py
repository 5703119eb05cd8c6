"""The replica's own AMQP connection for HA: the leader's lock, and the replicas' talk.

Election: the leader is the replica whose connection holds the *exclusive* queue
`<exchange>.ha.leader`. RabbitMQ guarantees one owner at a time, and frees it only
when the owning connection is gone: closed, its TCP socket reset (a killed process, a
cut link), its heartbeats missed (a silent link: 2-3 `heartbeat`s), or its node
lost. A standby tries to declare it every `LOCK_RETRY` seconds and gets
RESOURCE_LOCKED (405) while a leader lives. A replica that cannot reach the broker
cannot hold it, so it can never be leader.

Only a replica that can publish competes (`leadership_blocked`, the node's rule): a
standby whose publisher cannot open does not try for the lock, and a leader whose
publisher stops making progress gives it up (`_release`: deletes the lock queue and
stays a standby on the same connection, so it keeps hearing the new leader).

Lease: the leader re-declares its lock (passively) every `PROBE_EVERY` seconds, and
steps down as soon as no answer came for `heartbeat` seconds, before the broker can
give the lock to someone else: RabbitMQ closes a silent connection after two
heartbeat intervals without a byte from it (measured here: 2-3 intervals).

Talk: every replica binds an exclusive, bounded queue to the fanout exchange
`<exchange>.ha` and publishes small JSON messages there, `type` naming the kind and
`app_id` the sender: the leader's `confirmed` reports, `presence`, and `offer`s of
events the leader missed. Nothing here is durable, and the exchange is auto-deleted
with the last replica's queue: it is about the present.

    CLOSED -> CONNECTING -> SETTING_UP -> STANDBY <-> LEADER
      ^---------- (lost, lease expired, backoff) ---------'      any -> STOPPED
"""

from __future__ import annotations

import enum
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass

import pika
from pika.adapters.select_connection import IOLoop

from bridge.backoff import Backoff

LOCK_RETRY = 0.5         # seconds between a standby's attempts to take the lock
PROBE_EVERY = 0.5        # seconds between the leader's checks that it holds the lock
TICK = 0.2               # seconds between the node's housekeeping calls
QUEUE_MAX = 10_000       # messages a replica's talk queue holds (oldest dropped first)
BACKLOG_MAX = 1000       # reports kept while the link is down, sent once it is back


class LinkState(enum.Enum):
    CLOSED = "closed"
    CONNECTING = "connecting"
    SETTING_UP = "setting_up"
    STANDBY = "standby"
    LEADER = "leader"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Names:
    exchange: str
    lock: str

    @classmethod
    def for_exchange(cls, exchange: str) -> "Names":
        return cls(f"{exchange}.ha", f"{exchange}.ha.leader")


class HaLink:
    """One connection on its own IOLoop thread; `listener` is called on that thread:
    `on_state(LinkState)`, `on_message(kind, body, sender)`, `on_tick()`, and
    `leadership_blocked()` (why this replica may not lead now, or None)."""

    def __init__(self, amqp, names: Names, replica: str, heartbeat: float, log,
                 listener) -> None:
        self._amqp = amqp
        self._names = names
        self._replica = replica
        self._heartbeat = heartbeat
        self._lease = heartbeat
        self._log = log
        self._listener = listener
        self._urls = itertools.cycle(amqp.urls)
        self._backoff = Backoff(base=0.25, cap=2.0)
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name="ha-link", daemon=True)
        self.state = LinkState.CLOSED
        self._conn = None
        self._channel = None
        self._lock_channel = None
        self._lock_opening = False      # a lock channel was asked for, not yet open
        self._lock_timer = None         # the next attempt, if one is due
        self._releasing = False         # the lock queue's delete is under way
        self._declining: str | None = None    # why we do not compete now (said once)
        self._last_probe_ok = 0.0
        # Reports of confirms that came while the link was down: a standby that never
        # hears them would hold those events, and offer them, forever.
        self._backlog: deque[tuple[str, dict]] = deque(maxlen=BACKLOG_MAX)

    # --- control, from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._ioloop.add_callback_threadsafe(self._stop)
        self._thread.join(timeout)

    def send(self, kind: str, body: dict, keep: bool = False) -> None:
        """Publish to the other replicas; `keep`: if the link is down, once it is back."""
        self._ioloop.add_callback_threadsafe(lambda: self._publish(kind, body, keep))

    # --- the IOLoop thread ------------------------------------------------------------

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.call_later(TICK, self._tick)
        while True:
            try:
                self._ioloop.start()
                return
            except (ValueError, OSError) as exc:   # pika's reset race, as in publisher.py
                self._log.warning("ha.link_failed", reason=f"{type(exc).__name__}: {exc}")
                self._conn = None
                self._closed()

    def _set(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            self._listener.on_state(state)

    def _tick(self) -> None:
        if self.state is LinkState.STOPPED:
            return
        self._listener.on_tick()
        self._ioloop.call_later(TICK, self._tick)

    def _connect(self) -> None:
        if self.state is LinkState.STOPPED:
            return
        params = self._amqp.parameters(next(self._urls), f"{self._names.exchange} {self._replica}")
        params.connection_attempts = 1
        params.heartbeat = self._heartbeat
        params.socket_timeout = self._heartbeat
        self._set(LinkState.CONNECTING)
        self._conn = pika.SelectConnection(
            params, on_open_callback=self._on_open, on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed, custom_ioloop=self._ioloop)

    def _on_open(self, conn) -> None:
        if conn is not self._conn or self.state is LinkState.STOPPED:
            return conn.close()
        self._set(LinkState.SETTING_UP)
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn, error) -> None:
        if conn is not self._conn:
            return
        self._log.warning("ha.link_failed", reason=str(error) or type(error).__name__)
        self._closed()

    def _on_closed(self, conn, reason) -> None:
        if conn is not self._conn:
            return
        if self.state in (LinkState.STANDBY, LinkState.LEADER):
            self._log.warning("ha.link_lost", reason=str(reason), was=self.state.value)
        self._closed()

    def _closed(self) -> None:
        self._channel = self._lock_channel = None
        self._lock_opening = self._releasing = False
        if self.state is LinkState.STOPPED:
            return self._ioloop.stop()
        self._set(LinkState.CLOSED)
        self._ioloop.call_later(self._backoff.next(), self._connect)

    def _on_channel(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        names = self._names

        def declared(_frame) -> None:
            channel.queue_declare("", exclusive=True, arguments={"x-max-length": QUEUE_MAX},
                                  callback=queue_ready)

        def queue_ready(frame) -> None:
            queue = frame.method.queue
            channel.queue_bind(queue, names.exchange, "", callback=lambda _f: consume(queue))

        def consume(queue: str) -> None:
            channel.basic_consume(queue, self._on_message, auto_ack=True)
            self._backoff.reset()
            self._set(LinkState.STANDBY)
            while self._backlog:
                self._publish(*self._backlog.popleft(), keep=False)
            self._try_lock()

        # Auto-delete: it goes with the last replica's queue, leaving nothing behind.
        channel.exchange_declare(names.exchange, "fanout", durable=False, auto_delete=True,
                                 callback=declared)

    def _going(self) -> bool:
        """The connection is closing or closed: its close callback takes it from here."""
        conn = self._conn
        return conn is None or conn.is_closing or conn.is_closed

    def _on_channel_closed(self, _channel, reason) -> None:
        if self.state is LinkState.STOPPED or self._going():
            return
        self._log.warning("ha.link_lost", reason=str(reason), was=self.state.value)
        self._abandon()

    # --- the lock ---------------------------------------------------------------------

    def _try_lock(self) -> None:
        if (self.state is not LinkState.STANDBY or self._lock_channel is not None
                or self._lock_opening):
            return
        blocked = self._listener.leadership_blocked()
        if blocked:
            if blocked != self._declining:
                self._log.info("ha.not_competing", reason=blocked,
                               detail="not trying for the lock until the publisher works")
            self._declining = blocked
            return self._lock_later()
        if self._declining:
            self._log.info("ha.competing", detail="the publisher works: trying for the lock")
        self._declining = None
        self._lock_opening = True
        self._conn.channel(on_open_callback=self._on_lock_channel)

    def _lock_later(self) -> None:
        """One attempt due at a time, whatever asked for it."""
        if self._lock_timer is None:
            self._lock_timer = self._ioloop.call_later(LOCK_RETRY, self._lock_due)

    def _lock_due(self) -> None:
        self._lock_timer = None
        self._try_lock()

    def _on_lock_channel(self, channel) -> None:
        self._lock_opening = False
        if self.state is not LinkState.STANDBY:
            return channel.close()
        self._lock_channel = channel
        channel.add_on_close_callback(self._on_lock_closed)
        channel.queue_declare(self._names.lock, exclusive=True, auto_delete=True,
                              callback=self._on_locked)

    def _on_locked(self, _frame) -> None:
        if self.state is not LinkState.STANDBY:
            return
        self._last_probe_ok = time.monotonic()
        self._set(LinkState.LEADER)
        self._ioloop.call_later(PROBE_EVERY, self._probe)

    def _on_lock_closed(self, channel, reason) -> None:
        if channel is not self._lock_channel:
            return
        self._lock_channel = None
        if self._going():
            return
        if self._releasing:
            # The delete failed: the queue, ours until the connection goes, may be held.
            self._releasing = False
            self._log.warning("ha.link_lost", reason=f"releasing the lock: {reason}",
                              was=self.state.value)
            return self._abandon()
        if self.state is LinkState.STANDBY:
            # 405 RESOURCE_LOCKED: there is a leader. Anything else: try again too.
            self._lock_later()
        elif self.state is LinkState.LEADER:
            self._step_down(f"the lock's channel closed: {reason}")

    def _probe(self) -> None:
        if self.state is not LinkState.LEADER:
            return
        if time.monotonic() - self._last_probe_ok > self._lease:
            return self._step_down(f"the broker did not answer for {self._lease:g} s")
        blocked = self._listener.leadership_blocked()
        if blocked:
            return self._release(blocked)
        self._lock_channel.queue_declare(self._names.lock, passive=True,
                                         callback=self._on_probe_ok)
        self._ioloop.call_later(PROBE_EVERY, self._probe)

    def _on_probe_ok(self, _frame) -> None:
        self._last_probe_ok = time.monotonic()

    def _step_down(self, reason: str) -> None:
        self._log.warning("ha.lease_lost", reason=reason)
        self._abandon()

    def _release(self, reason: str) -> None:
        """Give up the lock, stay a standby: paused first (`_set`), then the queue is
        deleted, which lets the next replica take it within `LOCK_RETRY`."""
        self._log.warning("ha.step_down", reason=reason,
                          detail="giving up the lock; a standby whose publisher works leads")
        self._set(LinkState.STANDBY)
        channel = self._lock_channel
        if not channel.is_open:      # closing already: only the connection's end frees it
            return self._abandon()
        self._releasing = True

        def deleted(_frame) -> None:
            self._releasing = False
            channel.close()
        channel.queue_delete(self._names.lock, callback=deleted)

    def _abandon(self) -> None:
        """Stop being anything now, and drop the connection; `_closed` reconnects."""
        self._set(LinkState.CLOSED)
        if not self._going():
            self._conn.close()

    # --- talk -------------------------------------------------------------------------

    def _publish(self, kind: str, body: dict, keep: bool) -> None:
        channel = self._channel
        if channel is None or not channel.is_open or self.state not in (LinkState.STANDBY,
                                                                         LinkState.LEADER):
            if keep:
                self._backlog.append((kind, body))
            return
        channel.basic_publish(self._names.exchange, "", json.dumps(body).encode(),
                              pika.BasicProperties(type=kind, app_id=self._replica))

    def _on_message(self, _channel, _method, props, body: bytes) -> None:
        if props.app_id == self._replica:
            return
        try:
            message = json.loads(body)
        except ValueError:
            return
        self._listener.on_message(props.type, message, props.app_id)

    def _stop(self) -> None:
        previous, self.state = self.state, LinkState.STOPPED
        self._listener.on_state(LinkState.STOPPED)
        conn = self._conn
        if previous is LinkState.CONNECTING or conn is None:
            return self._ioloop.stop()
        if conn.is_closing or conn.is_closed:
            return self._ioloop.stop()
        conn.close()
