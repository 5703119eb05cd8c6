"""The broker side: publish the spool's events to RabbitMQ, in order, with confirms.

Modelled on pika's asynchronous publisher example: one `SelectConnection` on its own
IOLoop thread, callbacks that each do one step, and the connection's lifecycle as an
explicit table (`TRANSITIONS`, below). It knows AMQP and the spool, nothing of
websockets. What it promises (docs/contract.md section 4):

- Publishing is pipelined: up to a window of events are unconfirmed at once. Only a
  prefix of events that are all confirmed leaves the spool.
- Connection or channel lost: every unconfirmed event is republished first, in the
  original order, same `message_id`, `x-republished: true`.
- A silent link (no byte from the broker for the heartbeat timeout, or no confirm for
  `confirm_timeout` while not blocked) is dropped, not waited on, and the next URL is
  tried. A close that does not complete is dropped too.
- Nack (a queue refused the message): the channel stays open. The nacked event and
  everything published after it are republished, in order, after a backoff, with the
  window shrunk to one event and doubled on each confirm (slow start), so a queue
  that stays full costs one copy per retry in the other queues, not a window's worth.
  The backoff is reset only when everything nacked has been confirmed.
- The reconnect backoff is reset when the broker confirms something, not when a
  connection opens: a broker that accepts connections and then refuses the work is
  retried ever more slowly.
- An event the broker refuses alone (a channel closed by the broker while it was the
  only one in flight), `MAX_REFUSALS` times, or that cannot be encoded at all, is set
  aside in the dead letters (bridge/dead_letters.py), counted and logged; the rest go on.
- A refusal (403/406, a wrong password) is fatal (exit 4) only before the bridge has
  ever been connected; afterwards it is logged as an error and retried with backoff.
"""

from __future__ import annotations

import enum
import itertools
import sqlite3
import ssl
import threading
import time
from typing import Callable

import pika
from pika.adapters.select_connection import IOLoop
from pika import exceptions as pe
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed

from bridge import log as logging_
from bridge.amqp_acks import Acks, AckReadingConnection
from bridge.amqp_encode import encode_publish, properties
from bridge.backoff import Backoff
from bridge.config import AmqpConfig
from bridge.confirms import Position
from bridge.dead_letters import DeadLetters
from bridge.event import DEFERRED, IDENTITY_HEADER, Event, resolve
from bridge.errors import BridgeError, BrokerRefused, ConfigError, TLSVerificationError
from bridge.spool import Spool
from bridge.topology import Topology, is_other_type, is_stream

READ_BATCH = 512
CONFIRM_FLUSH_DELAY = 0.1     # seconds: confirms are removed from disk in batches
WATCH_EVERY = 1.0             # seconds between checks of the link's liveness, and beats
CLOSE_TIMEOUT = 5.0           # seconds a close handshake may take before the socket goes
MAX_REFUSALS = 3              # times the broker refuses one event alone before it is set aside
# Reply codes with which the broker refuses one message rather than the whole link:
# PRECONDITION_FAILED (a body above max_message_size), and the frame errors of a
# header larger than frame_max.
MESSAGE_REFUSALS = {406, 501, 502, 505}


class State(enum.Enum):
    CLOSED = "closed"
    CONNECTING = "connecting"
    DECLARING = "declaring"
    OPEN = "open"
    CLOSING = "closing"
    STOPPED = "stopped"


class Input(enum.Enum):
    CONNECT = "connect"     # an attempt starts
    OPENED = "opened"       # the AMQP connection is open: declare the topology
    READY = "ready"         # declared, confirms enabled: publish
    CLOSE = "close"         # we end the connection (lost channel, refusal, silence)
    CLOSED = "closed"       # the connection is gone, or the attempt failed
    STOP = "stop"           # drained, timed out or fatal: from any state, for good


TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.CLOSED, Input.CONNECT): State.CONNECTING,
    (State.CONNECTING, Input.OPENED): State.DECLARING,
    (State.CONNECTING, Input.CLOSED): State.CLOSED,
    (State.DECLARING, Input.READY): State.OPEN,
    (State.DECLARING, Input.CLOSE): State.CLOSING,
    (State.DECLARING, Input.CLOSED): State.CLOSED,
    (State.OPEN, Input.CLOSE): State.CLOSING,
    (State.OPEN, Input.CLOSED): State.CLOSED,
    (State.CLOSING, Input.CLOSE): State.CLOSING,
    (State.CLOSING, Input.CLOSED): State.CLOSED,
}


class IllegalTransition(Exception):
    """A callback arrived in a state the table does not expect: a bug, so it stops the
    bridge (exit 1) rather than leave the publisher in a state nobody designed."""


class Publisher:
    """Drains the spool into the broker; reconnects forever unless refused at the start.

    The publishing position and its invariants are `bridge.confirms.Position`'s: this
    class does the I/O around it.
    """

    def __init__(self, amqp: AmqpConfig, topology: Topology, spool: Spool,
                 dead_letters: DeadLetters, *, inflight: int, reconnect_max: float,
                 confirm_timeout: float, on_fatal, log, metrics,
                 beat: Callable[[], None] = lambda: None, paused: bool = False,
                 resolve: Callable[[Event], Event] = resolve) -> None:
        self._beat = beat             # liveness: the IOLoop calls it every WATCH_EVERY
        self._resolve = resolve       # a spooled event as published (bridge/event.py `defer`)
        self._amqp = amqp
        self._topology = topology
        self._spool = spool
        self._dead_letters = dead_letters
        self._confirm_timeout = confirm_timeout
        self._on_fatal = on_fatal
        self._log = log
        self._metrics = metrics
        self._backoff = Backoff(base=0.25, cap=reconnect_max)
        self._nack_backoff = Backoff(base=0.25, cap=reconnect_max)
        self._ioloop = IOLoop()
        self._attempts = itertools.count()
        self._urls = amqp.urls
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

        self.state = State.CLOSED
        self.blocked = False
        self._connection: AckReadingConnection | None = None
        self._channel = None
        self._steps = []          # the topology's declarations, and the one under way
        self._step = 0
        self._write = None        # pika's private batch write, if this pika has it
        self._ever_opened = False
        self._wakeup_pending = False
        self._draining_until: float | None = None
        # An HA standby connects and declares but publishes nothing (`pause`, `resume`).
        self._paused = paused
        self._closing_since = 0.0
        self._heard = (0, 0.0)    # (bytes received from the broker, when that changed)
        # When the publishing connection last proved that it works: a confirm (an ack,
        # or a nack: the broker took the work), or open with nothing owed. HA leadership
        # needs it recent (bridge/ha/node.py); a connection that opens and is then
        # refused every publish never sets it.
        self.progress_at = 0.0

        # After a restart, all that the spool recovered may have been published.
        self._pos = Position(spool.confirmed,
                             spool.last_seq if spool.recovered else spool.confirmed,
                             inflight, dead_letters.seqs_after(spool.confirmed))
        self._confirm_flush_pending = False
        self._nack_wait = False   # waiting out the backoff after a nack
        self._refusals: dict[int, int] = {}   # sequence -> refusals of it alone

    # --- control, from any thread ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """New events are in the spool. Cheap, coalesced, thread-safe."""
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._ioloop.add_callback_threadsafe(self._pump)

    def pause(self) -> None:
        """Publish nothing more until `resume` (HA: this replica stopped being leader).

        From any thread, effective at the next batch; what is in flight may still be
        confirmed."""
        self._paused = True

    def resume(self) -> None:
        """Publish again from the spool's first unconfirmed event (HA: now leader).

        While paused, a standby's witness confirmed in the spool what the leader
        published, so the position is taken from the spool again; and every event held
        now may have been published by the old leader, so each is flagged
        `x-republished`."""
        self._ioloop.add_callback_threadsafe(self._take_over)

    def drain_and_stop(self, timeout: float) -> None:
        """Publish and confirm what the spool holds, for at most `timeout`; then stop."""
        self._ioloop.add_callback_threadsafe(lambda: self._begin_drain(timeout))
        self._thread.join(timeout + CLOSE_TIMEOUT)

    def stop_now(self) -> None:
        self._ioloop.add_callback_threadsafe(self._stop)
        self._thread.join(10)

    @property
    def connected(self) -> bool:
        return self.state is State.OPEN

    # --- the state table -------------------------------------------------------------

    def _fire(self, event: Input) -> State:
        if event is Input.STOP:
            self.state = State.STOPPED
            return self.state
        following = TRANSITIONS.get((self.state, event))
        if following is None:
            raise IllegalTransition(f"{event.value} in state {self.state.value}")
        self.state = following
        return following

    # --- the IOLoop thread -----------------------------------------------------------

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.call_later(WATCH_EVERY, self._watch)
        while True:
            try:
                self._ioloop.start()
                return
            except (ValueError, OSError) as exc:
                if self.state is not State.CONNECTING:
                    return self._crashed(exc)
                # pika raises out of the IOLoop when a socket is reset between connect
                # and its first use (as a proxy in front of a dead broker does): for us
                # that is one failed attempt like any other.
                self._log.warning("broker.connect_failed", reason=f"{type(exc).__name__}: {exc}")
                self._connection = None
                self._fire(Input.CLOSED)
                self._retry_later()
            except Exception as exc:  # noqa: BLE001 - a bug must stop the bridge, not hang it
                return self._crashed(exc)

    def _crashed(self, exc: Exception) -> None:
        self._log.exception("publisher.crashed")
        self._on_fatal(BridgeError(f"the publisher failed: {type(exc).__name__}: {exc}"))

    def _connect(self) -> None:
        if self.state is State.STOPPED:
            return
        # Fresh each time: a rotated AMQP_PASSWORD_FILE is picked up at the next attempt.
        # Unreadable for a moment (mid-rotation): the last password read is used.
        try:
            self._urls, secrets = self._amqp.current_urls()
            logging_.add_secrets(secrets)
        except ConfigError as exc:
            self._log.warning("broker.password_file_unreadable", reason=str(exc))
        index = next(self._attempts) % len(self._urls)
        params = self._amqp.parameters(self._urls[index], self._topology.exchange)
        params.connection_attempts = 1
        # The bridge's own heartbeat, not the broker's (60 s by default): a silent link
        # must be noticed within BRIDGE_AMQP_HEARTBEAT (see `_watch`).
        params.heartbeat = self._amqp.heartbeat
        self._fire(Input.CONNECT)
        self._log.info("broker.connecting", url=self._amqp.redacted_urls[index])
        self._connection = AckReadingConnection(
            params, on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed, custom_ioloop=self._ioloop)

    def _on_connection_open(self, connection) -> None:
        if connection is not self._connection:   # an attempt abandoned after a pika error
            return connection.close()
        if self.state is State.STOPPED:      # stopped while the handshake was under way
            return connection.close()
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._fire(Input.OPENED)
        self._heard = (connection.bytes_received, time.monotonic())
        self._steps = self._topology.steps()
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error: Exception) -> None:
        if connection is not self._connection:
            return
        if self.state is State.STOPPED:
            return self._ioloop.stop()
        self._fire(Input.CLOSED)
        reason = _describe(error)
        if _is_tls_failure(error) and not self._ever_opened:
            hint = ("check AMQP_CA_FILE" if self._amqp.ca_file
                    else "set AMQP_CA_FILE to trust a private CA")
            return self._fatal(TLSVerificationError(
                f"TLS with the broker failed ({reason}); {hint}, and AMQP_CERT_FILE if the "
                f"broker requires a client certificate"))
        if _is_refusal(error):
            if not self._ever_opened:
                return self._fatal(BrokerRefused(f"the broker refused the connection: {reason}"))
            self._log.error("broker.refused", reason=reason,
                            detail="retrying with backoff; the stream is still read into "
                                   "the spool (check AMQP_PASSWORD_FILE and the user)")
        else:
            self._log.warning("broker.connect_failed", reason=reason)
        self._retry_later()

    def _on_connection_closed(self, connection, reason: Exception) -> None:
        if connection is not self._connection:
            return
        self._channel = None
        if self.state is State.STOPPED:
            self._ioloop.stop()
            return
        if self.state is not State.CLOSING:
            self._log.warning("broker.lost", reason=_describe(reason))
            self._metrics.broker_losses.inc()
            if self.state is State.OPEN:
                self._maybe_refused_alone(getattr(reason, "reply_code", 0), _describe(reason))
        self._fire(Input.CLOSED)
        self._retry_later()

    def _retry_later(self) -> None:
        """The connection is gone (CLOSED): forget its channel's tags, then back off."""
        self.blocked = False
        self._metrics.broker_connected.set(0)
        self._forget_unconfirmed()
        if self._draining_until is not None and time.monotonic() >= self._draining_until:
            return self._stop()
        delay = self._backoff.next()
        self._ioloop.call_later(delay, self._connect)

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        self._declare(0)

    def _declare(self, index: int) -> None:
        """Apply the topology's steps one callback at a time, then enable confirms."""
        self._step = index
        if index < len(self._steps):
            self._steps[index].apply(self._channel, callback=lambda _f: self._declare(index + 1))
        else:
            self._channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._on_ready())

    def _keep_existing_queue(self, reply_text: str) -> None:
        """A queue of the bridge's exists with another type: keep it, on a new channel."""
        step = self._steps[self._step]
        self._log.warning("broker.queue_kept", queue=step.name, detail=reply_text)
        self._steps[self._step] = step.passive()

        def reopened(channel) -> None:
            self._channel = channel
            channel.add_on_close_callback(self._on_channel_closed)
            self._declare(self._step)
        self._connection.channel(on_open_callback=reopened)

    def _on_ready(self) -> None:
        if self.state is not State.DECLARING:
            return
        self._fire(Input.READY)
        self._ever_opened = True
        # Checked once per connection: pika's private batch write is fast, and if a
        # pika release no longer has it, publishing falls back to `basic_publish`.
        write = getattr(self._connection, "_output_marshaled_frames", None)
        self._write = write if callable(write) else None
        self._connection.watch_acks(self._channel.channel_number, self._on_acks)
        self._pos.new_channel()
        self._metrics.broker_connected.set(1)
        self._metrics.broker_connects.inc()
        self._log.info("broker.ready", exchange=self._topology.exchange,
                       republishing=max(0, self._pos.published_max - self._pos.confirmed),
                       window=self._pos.window)
        self._pump()
        self._progress_if_idle(time.monotonic())

    def _on_channel_closed(self, _channel, reason: Exception) -> None:
        self._channel = None
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        if self.state is State.DECLARING:
            step = self._steps[self._step]
            if step.keep_existing and is_other_type(code, text):
                return self._keep_existing_queue(text)
            if is_stream(step) and not self._ever_opened:
                return self._fatal(BrokerRefused(
                    f"the broker refused the history stream {step.name!r} ({text}): "
                    f"BRIDGE_HISTORY needs RabbitMQ 3.9 or later with the stream_queue "
                    f"feature flag enabled, and an existing stream of that name must have "
                    f"the same retention"))
            if code in (403, 406):
                what = step.describe()
                if not self._ever_opened:
                    return self._fatal(BrokerRefused(
                        f"the broker refused to {what}: {text}; an exchange or queue of "
                        f"that name exists with another type or arguments"))
                self._log.error("broker.refused", reason=f"{code} {text}", step=what,
                                detail="retrying with backoff; the stream is still read "
                                       "into the spool")
                return self._close_connection()
        if self.state in (State.CLOSING, State.STOPPED):
            return
        self._log.warning("broker.channel_lost", reason=_describe(reason))
        self._metrics.broker_losses.inc()
        if self.state is State.OPEN:
            self._maybe_refused_alone(code, text)
        self._close_connection()

    def _on_blocked(self, _connection, _frame) -> None:
        self.blocked = True
        self._metrics.broker_blocked.set(1)
        self._log.warning("broker.blocked", detail="the broker raised a resource alarm; "
                          "events wait in the spool")

    def _on_unblocked(self, _connection, _frame) -> None:
        self.blocked = False
        self._metrics.broker_blocked.set(0)
        self._log.info("broker.unblocked")
        # The confirms held back by the alarm are due from now, not from their publish.
        self._pos.restart_clocks(time.monotonic())
        self._pump()

    # --- liveness --------------------------------------------------------------------

    def _watch(self) -> None:
        """Once a second: beat (from inside the IOLoop: proves the loop runs callbacks,
        not only that the thread exists), and drop a link that went silent or a close
        that never ends."""
        self._beat()
        self._ioloop.call_later(WATCH_EVERY, self._watch)
        connection, now = self._connection, time.monotonic()
        self._progress_if_idle(now)
        if connection is None or self.state not in (State.DECLARING, State.OPEN, State.CLOSING):
            return
        received, since = self._heard
        if connection.bytes_received != received:
            self._heard = (connection.bytes_received, now)
        elif now - since > self._amqp.heartbeat:
            return self._abort(f"no byte from the broker for {now - since:.0f} s "
                               f"(heartbeat {self._amqp.heartbeat} s)")
        if self.state is State.CLOSING and now - self._closing_since > CLOSE_TIMEOUT:
            return self._abort(f"the close handshake took over {CLOSE_TIMEOUT:.0f} s")
        sent = self._pos.oldest_sent()
        if self.state is State.OPEN and sent is not None and not self.blocked:
            if now - sent > self._confirm_timeout:
                self._abort(f"no confirm for {now - sent:.0f} s (BRIDGE_CONFIRM_TIMEOUT "
                            f"{self._confirm_timeout:g} s)")

    def _progress_if_idle(self, now: float) -> None:
        """Open with nothing in flight (or held back by a resource alarm, which no
        other connection would escape): as good as a confirm."""
        if self.state is State.OPEN and (self.blocked or not self._pos.live):
            self.progress_at = now

    def _abort(self, reason: str) -> None:
        """End the connection without a handshake: the link cannot carry one."""
        self._log.warning("broker.silent", reason=reason, detail="dropping the connection; "
                          "trying the next broker URL")
        if self.state is not State.CLOSING:
            self._fire(Input.CLOSE)
        terminate = getattr(self._connection, "_terminate_stream", None)
        if callable(terminate):
            terminate(pe.StreamLostError(reason))
        else:   # a pika without it: forget the connection, its callbacks are ignored
            self._connection = None
            self._fire(Input.CLOSED)
            self._retry_later()

    # --- publishing ------------------------------------------------------------------

    def _pump(self) -> None:
        """Publish from the spool until the window is full or the spool empty, once
        the window has room for a refill (`Position.ready`).

        Each batch is encoded by `encode_publish` and handed to the connection as one
        write: pika would marshal every frame through several layers and write the
        three frames of each publish separately, each write letting the stream thread in.
        """
        self._wakeup_pending = False
        if (self.state is not State.OPEN or self.blocked or self._nack_wait or self._paused
                or self._channel is None or not self._channel.is_open):
            return
        pos = self._pos
        published = republished = 0
        ready = pos.ready()     # if not, a confirm of what is in flight calls this again
        while ready and not self._paused and pos.room > 0:
            batch = self._spool.read(pos.cursor, min(pos.room, READ_BATCH))
            if not batch:
                break
            wire, sent = [], []
            now = time.monotonic()
            for seq, ev in batch:
                if pos.skip(seq):
                    continue
                if ev.routing_key == DEFERRED:      # spooled unclassified (HA)
                    ev = self._resolve(ev)
                republish = pos.is_republish(seq)
                try:
                    frames = self._encode(seq, ev, republish)
                except (ValueError, TypeError, pe.ShortStringTooLong) as exc:
                    self._set_aside_event(seq, ev, f"cannot be encoded: {exc}")
                    continue
                wire.append(frames)
                sent.append((seq, ev))
                pos.published(seq, now)
                published += 1
                republished += republish
            self._send(wire)
            if sent:
                self._metrics.confirm_timer.published(sent)
        if published:
            self._metrics.published.inc(published - republished)
            self._metrics.republished.inc(republished)
            self._metrics.inflight.set(len(pos.live))
        self._advance_confirmed()

    def _encode(self, seq: int, ev, republish: bool):
        headers = {**ev.headers, "x-republished": True} if republish else ev.headers
        exchange, routing_key = self._topology.destination(ev.routing_key, ev.quarantined)
        message_id = self._message_id(seq, ev)
        if self._write is None:
            return (exchange, routing_key, ev.body,
                    properties(message_id, int(ev.received_at), headers))
        return encode_publish(self._channel.channel_number, exchange, routing_key, ev.body,
                              message_id=message_id, timestamp=int(ev.received_at),
                              headers=headers, frame_max=self._connection.params.frame_max)

    def _message_id(self, seq: int, ev) -> str:
        """HA replicas share an event's identity, kept in a header; else the spool's."""
        return ev.headers.get(IDENTITY_HEADER) or self._spool.message_id(seq)

    def _send(self, wire: list) -> None:
        if not wire:
            return
        if self._write is not None:
            self._write([b"".join(wire)])
            return
        for exchange, routing_key, body, properties in wire:
            self._channel.basic_publish(exchange, routing_key, body, properties)

    def _on_confirm(self, frame) -> None:
        """A Basic.Nack, or an ack pika dispatched (bridge/amqp_acks.py reads the rest)."""
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Nack):
            self._on_acks([(method.delivery_tag, method.multiple)])
        elif self._answer_counts():
            tags = self._pos.tags(method.delivery_tag, method.multiple)
            if tags:        # else: copies already superseded by a republish
                self._on_nack(tags)

    def _on_acks(self, acks: Acks) -> None:
        """Basic.Acks, in the order they came: the window is refilled once after them."""
        if not self._answer_counts():
            return
        pos, counted = self._pos, False
        for tag, multiple in acks:
            tags = pos.tags(tag, multiple)
            if tags:        # else: copies already superseded by a republish
                pos.acked(tags)
                counted = True
        if not counted:
            return
        self._backoff.reset()           # the broker takes work again
        self._advance_confirmed()
        self._metrics.inflight.set(len(pos.live))
        self._pump()

    def _on_nack(self, tags: list[int]) -> None:
        """Republish from the first nacked event on, after a backoff, one at first."""
        first = self._pos.nacked(tags)
        self._metrics.nacks.inc(len(tags))
        delay = self._nack_backoff.next()
        read = self._spool.read(first, 1)
        ev = resolve(read[0][1]) if read else None
        self._log.warning(
            "broker.nack", message_id=self._message_id(first, ev) if ev else None,
            routing_key=ev.routing_key if ev else None, nacked=len(tags),
            retry_in=round(delay, 2),
            detail="a queue refused it (x-overflow reject-publish, or a quorum queue's "
                   "limit; the broker does not say which); republishing from it in order")
        self._metrics.confirm_timer.forget()     # timed again from the republish
        self._metrics.inflight.set(len(self._pos.live))
        if not self._nack_wait:
            self._nack_wait = True
            self._ioloop.call_later(delay, self._end_nack_wait)

    def _end_nack_wait(self) -> None:
        self._nack_wait = False
        self._pump()

    def _answer_counts(self) -> bool:
        """A confirm arrived: it counts (as progress) only on an open channel; on one
        that is going, republishes supersede its confirms."""
        if self.state is not State.OPEN:
            return False
        self.progress_at = time.monotonic()
        return True

    def _advance_confirmed(self) -> None:
        moved, nacks_settled = self._pos.advance()
        if not moved:
            return
        self._metrics.confirmed.inc(moved)
        self._metrics.confirm_timer.confirmed(self._pos.confirmed)
        if nacks_settled:
            self._nack_backoff.reset()
        if not self._confirm_flush_pending:
            self._confirm_flush_pending = True
            self._ioloop.call_later(CONFIRM_FLUSH_DELAY, self._flush_confirms)

    def _flush_confirms(self) -> None:
        """Forget confirmed events on disk; one transaction for many confirms."""
        self._confirm_flush_pending = False
        self._spool.confirm(self._pos.confirmed)
        self._maybe_finish_drain()

    def _forget_unconfirmed(self) -> None:
        """The channel is gone: its delivery tags mean nothing any more."""
        self._pos.new_channel()
        self._metrics.confirm_timer.forget()
        self._metrics.inflight.set(0)

    # --- events the broker will not take ---------------------------------------------

    def _maybe_refused_alone(self, code: int, text: str) -> None:
        """The broker ended the channel or connection while we published. If one event
        was in flight, it is the cause; after MAX_REFUSALS it is set aside. If several
        were, the next connection publishes one at a time to find out."""
        if code not in MESSAGE_REFUSALS or not self._pos.live:
            return
        seq = self._pos.alone()
        if seq is None:
            self._pos.window = 1
            return
        self._refusals[seq] = self._refusals.get(seq, 0) + 1
        if self._refusals[seq] >= MAX_REFUSALS:
            del self._refusals[seq]
            ev = resolve(self._spool.read(seq, 1)[0][1])
            self._set_aside_event(seq, ev, f"refused by the broker {MAX_REFUSALS} times: "
                                           f"{code} {text}")

    def _set_aside_event(self, seq: int, ev, reason: str) -> None:
        message_id = self._message_id(seq, ev)
        try:
            self._dead_letters.add(seq, message_id, ev, reason)
        except sqlite3.Error as exc:
            # Not set aside, so not skipped: it is retried, and nothing is lost.
            self._log.error("broker.set_aside_failed", message_id=message_id,
                            reason=f"{type(exc).__name__}: {exc}")
            return
        self._pos.not_publishable(seq)
        self._metrics.set_aside.inc()
        self._log.error("broker.set_aside", message_id=message_id, seq=seq,
                        routing_key=ev.routing_key, size=len(ev.body), reason=reason,
                        dead_letters=str(self._dead_letters.path))

    # --- stopping --------------------------------------------------------------------

    def _begin_drain(self, timeout: float) -> None:
        self._draining_until = time.monotonic() + timeout
        self._ioloop.call_later(timeout, self._stop)
        self._maybe_finish_drain()

    def _take_over(self) -> None:
        self._pos.take_over(self._spool.confirmed, self._spool.last_seq)
        self._paused = False
        self._pump()

    def _maybe_finish_drain(self) -> None:
        # Paused (an HA standby), there is nothing of ours to drain.
        if self._draining_until is not None and not self._pos.live and (
                self._paused or self._pos.confirmed >= self._spool.last_seq):
            self._stop()

    def _stop(self) -> None:
        if self.state is State.STOPPED:
            return
        previous = self.state
        self._fire(Input.STOP)
        self._spool.confirm(self._pos.confirmed)
        if previous is State.CONNECTING:
            return  # pika cannot abort a handshake; its open or open-error callback will
        if self._connection is not None and previous is not State.CLOSED \
                and not self._connection.is_closed and not self._connection.is_closing:
            self._connection.close()   # _on_connection_closed stops the loop
            self._ioloop.call_later(CLOSE_TIMEOUT, self._ioloop.stop)
        else:
            self._ioloop.stop()

    def _close_connection(self) -> None:
        if self._connection is not None and not (self._connection.is_closing
                                                 or self._connection.is_closed):
            self._fire(Input.CLOSE)
            self._closing_since = time.monotonic()
            self._connection.close()

    def _fatal(self, error: Exception) -> None:
        self._log.error("broker.fatal", reason=str(error))
        self._stop()
        self._on_fatal(error)


def _causes(error: BaseException):
    """The error and what it wraps (pika nests connector errors several levels deep)."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(getattr(current, "exceptions", None) or [])
        stack.append(getattr(current, "exception", None))
        stack.append(current.__cause__)
        stack.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))


def _is_refusal(error: Exception) -> bool:
    for cause in _causes(error):
        if isinstance(cause, (pe.AuthenticationError, pe.ProbableAuthenticationError,
                              pe.ProbableAccessDeniedError)):
            return True
        if isinstance(cause, pe.ConnectionClosedByBroker) and cause.reply_code in (403, 530):
            return True
    return False


def _is_tls_failure(error: Exception) -> bool:
    """A certificate problem on either side: configuration, not a passing fault."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        if isinstance(cause, ssl.SSLError) and not isinstance(
                cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)):
            return True
        # pika sometimes keeps only the text of the SSL error it wrapped.
        text = str(cause)
        if "CERTIFICATE_VERIFY_FAILED" in text or ("[SSL: " in text and "EOF" not in text):
            return True
    return False


def _describe(error: BaseException) -> str:
    """One line for the deepest cause that says something (pika's wrappers don't)."""
    best = f"{type(error).__name__}: {error}"
    for cause in _causes(error):
        text = getattr(cause, "reply_text", None)
        if text:
            return f"{getattr(cause, 'reply_code', '')} {text}".strip()
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
            return f"certificate verify failed: {cause.verify_message}"
        message = str(cause).strip()
        if message and not isinstance(cause, AMQPConnectionWorkflowFailed):
            best = f"{type(cause).__name__}: {message}"
    return best.replace("\n", " ")
