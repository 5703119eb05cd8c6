"""The broker side: publish the spool's events to RabbitMQ, in order, with confirms.

Modelled on pika's asynchronous publisher example: one `SelectConnection` on its own
IOLoop thread, an explicit state machine, and callbacks that each do one step:

    CLOSED -> CONNECTING -> DECLARING -> OPEN -> CLOSING -> CLOSED -> (backoff) ...
                                          \\-> STOPPED (drained, or a fatal refusal)

It knows AMQP and the spool, and nothing of websockets. Publishing is pipelined: up to
`inflight` events are unconfirmed at once. When the connection or channel is lost,
every unconfirmed event is republished first, in the original order, with the same
`message_id` and `x-republished: true`. A nack is treated like a lost channel: the
nacked event and everything after it are republished in order (events behind it that
the broker did accept arrive twice). Only a prefix of events that are all confirmed is
removed from the spool, so nothing is forgotten before the broker has it.
"""

from __future__ import annotations

import enum
import itertools
import ssl
import threading
import time
from typing import Callable

import pika
from pika.adapters.select_connection import IOLoop
from pika import exceptions as pe
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed

from bridge.amqp_encode import encode_publish
from bridge.backoff import Backoff
from bridge.config import AmqpConfig
from bridge.event import IDENTITY_HEADER
from bridge.errors import BridgeError, BrokerRefused, TLSVerificationError
from bridge.spool import Spool
from bridge.topology import Topology, is_other_type, is_stream

READ_BATCH = 512
CONFIRM_FLUSH_DELAY = 0.1     # seconds: confirms are removed from disk in batches
BEAT_EVERY = 1.0              # seconds between the IOLoop's liveness beats


class State(enum.Enum):
    CLOSED = "closed"
    CONNECTING = "connecting"
    DECLARING = "declaring"
    OPEN = "open"
    CLOSING = "closing"
    STOPPED = "stopped"


class Publisher:
    """Drains the spool into the broker; reconnects forever unless refused outright."""

    def __init__(self, amqp: AmqpConfig, topology: Topology, spool: Spool, *,
                 inflight: int, reconnect_max: float, on_fatal, log, metrics,
                 beat: Callable[[], None] = lambda: None, paused: bool = False) -> None:
        self._beat = beat             # liveness: the IOLoop calls it every BEAT_EVERY
        self._amqp = amqp
        self._topology = topology
        self._spool = spool
        self._inflight = inflight
        self._on_fatal = on_fatal
        self._log = log
        self._metrics = metrics
        self._backoff = Backoff(base=0.25, cap=reconnect_max)
        self._ioloop = IOLoop()
        self._urls = itertools.cycle(amqp.urls)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

        self.state = State.CLOSED
        self.blocked = False
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._steps = []          # the topology's declarations, and the one under way
        self._step = 0
        self._ever_opened = False
        self._wakeup_pending = False
        self._draining_until: float | None = None
        # An HA standby connects and declares but publishes nothing (`pause`, `resume`).
        self._paused = paused
        # Publishing position. Every event up to `_confirmed` is confirmed (the spool
        # forgets them a flush later); `_cursor` is the next sequence to publish;
        # `_published_max` the highest ever published, so anything at or below it is a
        # republish. After a restart everything recovered from the spool counts as one.
        self._confirmed = spool.confirmed
        self._confirm_flush_pending = False
        self._cursor = spool.confirmed + 1
        self._published_max = spool.last_seq if spool.recovered else spool.confirmed
        self._next_tag = 1
        self._unconfirmed: dict[int, int] = {}        # delivery tag -> sequence, in order

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
        self._ioloop.add_callback_threadsafe(self._resume)

    def drain_and_stop(self, timeout: float) -> None:
        """Publish and confirm what the spool holds, for at most `timeout`; then stop."""
        self._ioloop.add_callback_threadsafe(lambda: self._begin_drain(timeout))
        self._thread.join(timeout + 5)

    def stop_now(self) -> None:
        self._ioloop.add_callback_threadsafe(self._stop)
        self._thread.join(10)

    @property
    def connected(self) -> bool:
        return self.state is State.OPEN

    # --- the IOLoop thread -----------------------------------------------------------

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.add_callback_threadsafe(self._tick)
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
                self._closed_then_retry()
            except Exception as exc:  # noqa: BLE001 - a bug must stop the bridge, not hang it
                return self._crashed(exc)

    def _tick(self) -> None:
        """Beat from inside the IOLoop: proves the loop runs callbacks, not only that the
        thread exists."""
        self._beat()
        self._ioloop.call_later(BEAT_EVERY, self._tick)

    def _crashed(self, exc: Exception) -> None:
        self._log.exception("publisher.crashed")
        self._on_fatal(BridgeError(f"the publisher failed: {type(exc).__name__}: {exc}"))

    def _connect(self) -> None:
        if self.state is State.STOPPED:
            return
        url = next(self._urls)
        params = self._amqp.parameters(url, self._topology.exchange)
        params.connection_attempts = 1
        self.state = State.CONNECTING
        self._log.info("broker.connecting", url=self._redacted(url))
        self._connection = pika.SelectConnection(
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
        self.state = State.DECLARING
        self._steps = self._topology.steps()
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection, error: Exception) -> None:
        if connection is not self._connection:
            return
        if self.state is State.STOPPED:
            return self._ioloop.stop()
        self.state = State.CLOSED
        reason = _describe(error)
        if _is_tls_failure(error) and not self._ever_opened:
            hint = ("check AMQP_CA_FILE" if self._amqp.ca_file
                    else "set AMQP_CA_FILE to trust a private CA")
            return self._fatal(TLSVerificationError(
                f"TLS with the broker failed ({reason}); {hint}, and AMQP_CERT_FILE if the "
                f"broker requires a client certificate"))
        if _is_refusal(error) and not self._ever_opened:
            return self._fatal(BrokerRefused(f"the broker refused the connection: {reason}"))
        self._log.warning("broker.connect_failed", reason=reason)
        self._closed_then_retry()

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
        self._closed_then_retry()

    def _closed_then_retry(self) -> None:
        self.state = State.CLOSED
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
        self.state = State.OPEN
        self._ever_opened = True
        self._backoff.reset()
        self._next_tag = 1
        self._cursor = self._confirmed + 1
        self._metrics.broker_connected.set(1)
        self._metrics.broker_connects.inc()
        self._log.info("broker.ready", exchange=self._topology.exchange,
                       republishing=max(0, self._published_max - self._confirmed))
        self._pump()

    def _on_channel_closed(self, _channel, reason: Exception) -> None:
        self._channel = None
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        if (self.state is State.DECLARING and self._steps[self._step].keep_existing
                and is_other_type(code, text)):
            return self._keep_existing_queue(text)
        if self.state is State.DECLARING and is_stream(self._steps[self._step]):
            return self._fatal(BrokerRefused(
                f"the broker refused the history stream {self._steps[self._step].name!r} "
                f"({text}): BRIDGE_HISTORY needs RabbitMQ 3.9 or later with the "
                f"stream_queue feature flag enabled, and an existing stream of that name "
                f"must have the same retention"))
        if code in (403, 406) and self.state is State.DECLARING:
            return self._fatal(BrokerRefused(
                f"the broker refused the topology ({text}); an exchange or queue of that "
                f"name exists with another type or arguments"))
        if self.state in (State.CLOSING, State.STOPPED):
            return
        self._log.warning("broker.channel_lost", reason=_describe(reason))
        self._metrics.broker_losses.inc()
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
        self._pump()

    # --- publishing ------------------------------------------------------------------

    def _pump(self) -> None:
        """Publish from the spool until the in-flight window is full or the spool empty.

        Each batch is encoded by `encode_publish` and handed to the connection as one
        write: pika would marshal every frame through several layers and write the
        three frames of each publish separately, each write letting the stream thread in.
        """
        self._wakeup_pending = False
        if (self.state is not State.OPEN or self.blocked or self._paused
                or self._channel is None or not self._channel.is_open):
            return
        exchange, quarantine = self._topology.exchange, self._topology.quarantine
        spool, connection = self._spool, self._connection
        channel_number, frame_max = self._channel.channel_number, connection.params.frame_max
        published = republished = 0
        while not self._paused:
            room = self._inflight - len(self._unconfirmed)
            if room <= 0:
                break
            batch = spool.read(self._cursor, min(room, READ_BATCH))
            if not batch:
                break
            wire = []
            for seq, ev in batch:
                headers = ev.headers
                if seq <= self._published_max:
                    headers = {**headers, "x-republished": True}
                    republished += 1
                wire.append(encode_publish(
                    channel_number, "" if ev.quarantined else exchange,
                    quarantine if ev.quarantined else ev.routing_key, ev.body,
                    message_id=ev.headers.get(IDENTITY_HEADER) or spool.message_id(seq),
                    timestamp=int(ev.received_at),
                    headers=headers, frame_max=frame_max))
                self._unconfirmed[self._next_tag] = seq
                self._next_tag += 1
            connection._output_marshaled_frames([b"".join(wire)])
            self._metrics.confirm_timer.published(batch)
            self._cursor = batch[-1][0] + 1
            self._published_max = max(self._published_max, self._cursor - 1)
            published += len(batch)
        if published:
            self._metrics.published.inc(published - republished)
            self._metrics.republished.inc(republished)
            self._metrics.inflight.set(len(self._unconfirmed))
        self._maybe_finish_drain()

    def _on_confirm(self, frame) -> None:
        if self.state is not State.OPEN:
            # After a nack the channel is being closed, and its later confirms must not
            # count: an ack with `multiple` covers the nacked tag too, and would let an
            # event the broker refused leave the spool. Ignoring an ack costs one
            # duplicate at most.
            return
        method = frame.method
        tag, multiple = method.delivery_tag, method.multiple
        if isinstance(method, pika.spec.Basic.Nack):
            self._metrics.nacks.inc()
            self._log.warning("broker.nack", delivery_tag=tag,
                              detail="republishing from the first unconfirmed event")
            return self._close_connection()
        if multiple:
            done = list(itertools.takewhile(lambda t: t <= tag, self._unconfirmed))
        else:
            done = [tag] if tag in self._unconfirmed else []
        for t in done:
            del self._unconfirmed[t]
        if self._unconfirmed:
            upto = self._unconfirmed[next(iter(self._unconfirmed))] - 1
        else:
            upto = self._cursor - 1
        if upto > self._confirmed:
            self._metrics.confirmed.inc(upto - self._confirmed)
            self._metrics.confirm_timer.confirmed(upto)
            self._confirmed = upto
            if not self._confirm_flush_pending:
                self._confirm_flush_pending = True
                self._ioloop.call_later(CONFIRM_FLUSH_DELAY, self._flush_confirms)
        self._metrics.inflight.set(len(self._unconfirmed))
        self._pump()

    def _flush_confirms(self) -> None:
        """Forget confirmed events on disk; one transaction for many confirms."""
        self._confirm_flush_pending = False
        self._spool.confirm(self._confirmed)
        self._maybe_finish_drain()

    def _forget_unconfirmed(self) -> None:
        """The channel is gone: its delivery tags mean nothing any more."""
        self._unconfirmed.clear()
        self._metrics.confirm_timer.forget()
        self._cursor = self._confirmed + 1
        self._metrics.inflight.set(0)

    # --- stopping --------------------------------------------------------------------

    def _begin_drain(self, timeout: float) -> None:
        self._draining_until = time.monotonic() + timeout
        self._ioloop.call_later(timeout, self._stop)
        self._maybe_finish_drain()

    def _resume(self) -> None:
        if not self._unconfirmed:
            self._confirmed = max(self._confirmed, self._spool.confirmed)
            self._cursor = self._confirmed + 1
        self._published_max = max(self._published_max, self._spool.last_seq)
        self._paused = False
        self._pump()

    def _maybe_finish_drain(self) -> None:
        # Paused (an HA standby), there is nothing of ours to drain.
        if self._draining_until is not None and not self._unconfirmed and (
                self._paused or self._confirmed >= self._spool.last_seq):
            self._stop()

    def _stop(self) -> None:
        if self.state is State.STOPPED:
            return
        previous, self.state = self.state, State.STOPPED
        self._spool.confirm(self._confirmed)
        if previous is State.CONNECTING:
            return  # pika cannot abort a handshake; its open or open-error callback will
        if self._connection is not None and previous is not State.CLOSED \
                and not self._connection.is_closed and not self._connection.is_closing:
            self._connection.close()   # _on_connection_closed stops the loop
        else:
            self._ioloop.stop()

    def _close_connection(self) -> None:
        if self._connection is not None and not (self._connection.is_closing
                                                 or self._connection.is_closed):
            self.state = State.CLOSING
            self._connection.close()

    def _fatal(self, error: Exception) -> None:
        self._log.error("broker.fatal", reason=str(error))
        self._stop()
        self._on_fatal(error)

    def _redacted(self, url: str) -> str:
        return self._amqp.redacted_urls[list(self._amqp.urls).index(url)]


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
