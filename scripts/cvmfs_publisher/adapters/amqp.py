"""RabbitMQ on pika: connections, topology, retry/dead-letter, reconnecting consumer.

Reconnect discipline follows pika's asynchronous-consumer example, on a
``BlockingConnection`` (one connection per consumer thread): any connection
or channel loss ends the session, the loop waits a capped exponential
backoff with jitter and starts over, re-declaring its topology. Nothing is
acked before its effect is durable, so a lost connection means the broker
redelivers the message in hand.

What the daemons publish (retries, dead letters, announcements) goes out on
a channel in confirm mode, so a publish that returns was accepted by the
broker.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from ..core import runtime
from ..core.backoff import Backoff
from ..core.config import AmqpConfig
from ..core.logs import redact

log = logging.getLogger(__name__)

#: Errors that mean "the connection or channel is gone": reconnect. pika wraps
#: its socket errors (StreamLostError, AMQPConnectionError); a bare OSError is a
#: local failure of the message in hand (disk full, permissions, a ``requests``
#: exception), classified by :func:`errors.from_os_error`, not a lost broker.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosedByBroker,
)

ATTEMPTS_HEADER = "x-attempts"

#: The connection and channel types callers hold (so that they need not import pika).
Connection = pika.BlockingConnection
Channel = BlockingChannel


def connection_parameters(cfg: AmqpConfig, name: str, host: str | None = None,
                          port: int | None = None) -> pika.ConnectionParameters:
    """Parameters of one node (default: the first configured), TLS verified by default.

    The TLS context checks the certificate against ``host``, the name the
    node is reached by: a node of a cluster is verified under its own name.
    """
    if host is None or port is None:
        host, port = cfg.addresses()[0]
    password = cfg.password.get() if cfg.password else ""
    ssl_options = None
    if cfg.tls:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        if not cfg.verify:
            log.warning("AMQP TLS certificate verification is DISABLED (amqp.verify: false)")
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ssl_options = pika.SSLOptions(ctx, server_hostname=host)
    return pika.ConnectionParameters(
        host=host,
        port=port,
        virtual_host=cfg.vhost,
        credentials=pika.PlainCredentials(cfg.user, password),
        heartbeat=cfg.heartbeat,
        connection_attempts=cfg.connection_attempts,
        retry_delay=1,
        socket_timeout=cfg.socket_timeout,
        blocked_connection_timeout=max(30.0, cfg.socket_timeout * 3),
        ssl_options=ssl_options,
        client_properties={"connection_name": name},
    )


class NoBrokerNode(pika.exceptions.AMQPConnectionError):
    """No configured node accepted the connection; the message names each and why."""


def reason(exc: BaseException) -> str:
    """What went wrong, from pika's wrapped exceptions (the TLS or socket error inside)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    found: BaseException | None = None
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted: {e.verify_message or e.reason}"
        if isinstance(e, ssl.SSLError):
            found = e if not isinstance(found, ssl.SSLError) else found
        elif isinstance(e, OSError) and found is None:
            found = e
        todo.extend(e.args)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    if isinstance(found, ssl.SSLError):
        return f"TLS handshake failed: {found.reason or found}"
    if found is not None:
        return f"{type(found).__name__}: {found.strerror or found}"
    text = redact(str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NodeRotation:
    """Which node to try first: the one in use, or the next after it was lost.

    A daemon stays on the node it reached; when that connection is lost it
    starts with the following node, so a node that died costs one backoff
    delay, not a timeout per attempt.
    """

    def __init__(self, cfg: AmqpConfig) -> None:
        self.addresses = cfg.addresses()
        self.first = 0
        self.current: tuple[str, int] | None = None

    def order(self) -> list[tuple[str, int]]:
        return self.addresses[self.first:] + self.addresses[:self.first]

    def connected(self, address: tuple[str, int]) -> None:
        self.current = address
        self.first = self.addresses.index(address)

    def lost(self) -> None:
        if self.current is not None:
            self.first = (self.addresses.index(self.current) + 1) % len(self.addresses)
        self.current = None


def connect(cfg: AmqpConfig, name: str, rotation: NodeRotation | None = None
            ) -> pika.BlockingConnection:
    """One blocking connection to the first node that accepts it, in rotation order.

    Raises :class:`NoBrokerNode` naming every node and its error when none
    does. A TLS failure is a failure of that node: there is no second try
    in plain AMQP.
    """
    rotation = rotation or NodeRotation(cfg)
    errors = []
    for host, port in rotation.order():
        try:
            conn = pika.BlockingConnection(connection_parameters(cfg, name, host, port))
        except (*CONNECTION_ERRORS, OSError) as exc:
            errors.append(f"{host}:{port}: {reason(exc)}")
            continue
        rotation.connected((host, port))
        return conn
    tls = "amqps" if cfg.tls else "amqp"
    raise NoBrokerNode(f"no RabbitMQ node reachable over {tls} ({'; '.join(errors)})")


# --------------------------------------------------------------------- topology


def declare_common(ch: BlockingChannel, cfg: AmqpConfig) -> None:
    """Exchanges and the dead-letter queue every daemon relies on (idempotent)."""
    ch.exchange_declare(cfg.notification_exchange, exchange_type="topic", durable=True)
    ch.exchange_declare(cfg.control_exchange, exchange_type="topic", durable=True)
    ch.exchange_declare(cfg.dead_letter_exchange, exchange_type="topic", durable=True)
    ch.queue_declare(cfg.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(cfg.dead_letter_queue, cfg.dead_letter_exchange, routing_key="#")


def work_queue_arguments(cfg: AmqpConfig, queue: str, single_active: bool) -> dict[str, Any]:
    """Arguments of a durable quorum work queue with poison-message protection."""
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": cfg.delivery_limit,
        "x-dead-letter-exchange": cfg.dead_letter_exchange,
        "x-dead-letter-routing-key": queue,
    }
    if single_active:
        args["x-single-active-consumer"] = True
    return args


class _ExpectedMiss(logging.Filter):
    """Drops pika's warning for a 404 we asked for, and nothing else.

    A passive declare of a queue that does not exist is answered with
    ``Channel.Close (404)``, which pika logs as ``WARNING pika.channel:
    Received remote Channel.Close (404) ...`` before our code sees the
    exception. For :func:`passive_declare` that miss is the expected answer,
    not an event for operators; any other channel close (another code, or a
    channel we did not mark) still reaches the logs.
    """

    def __init__(self) -> None:
        super().__init__("cvmfs_publisher.adapters.amqp.expected_miss")
        self.channels: set[int] = set()  # id() of pika's channel objects awaiting a 404
        self._lock = threading.Lock()

    def expect(self, impl: object) -> None:
        with self._lock:
            self.channels.add(id(impl))

    def done(self, impl: object) -> None:
        with self._lock:
            self.channels.discard(id(impl))

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) == 3 and args[0] == 404
                    and id(args[2]) in self.channels)


_EXPECTED_MISS = _ExpectedMiss()
logging.getLogger("pika.channel").addFilter(_EXPECTED_MISS)


def passive_declare(conn: pika.BlockingConnection, queue: str) -> Any | None:
    """``Queue.DeclareOk`` of an existing queue (message and consumer counts), or None.

    On a throw-away channel, since a 404 closes the channel. The 404 of a
    missing queue is an answer here, so pika's warning about it is dropped.
    """
    ch = conn.channel()
    impl = ch._impl  # the pika.channel.Channel that pika's warning names
    _EXPECTED_MISS.expect(impl)
    try:
        return ch.queue_declare(queue, passive=True).method
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    finally:
        _EXPECTED_MISS.done(impl)
        if ch.is_open:
            ch.close()


def queue_exists(conn: pika.BlockingConnection, queue: str) -> bool:
    """Whether ``queue`` exists (a passive declare; a miss is not logged)."""
    return passive_declare(conn, queue) is not None


def ready_count(conn: pika.BlockingConnection, queue: str) -> int | None:
    """Messages ready in ``queue`` now, None if it does not exist.

    Exact at the moment of the call, unlike the management API's figures,
    which are samples refreshed every few seconds (for a quorum queue it can
    show 0 for ~20 s after a message arrived). Unacknowledged messages, in a
    consumer's hands, are not counted.
    """
    declared = passive_declare(conn, queue)
    return None if declared is None else declared.message_count


def delay_exchange_name(cfg: AmqpConfig, delay: int) -> str:
    """The fanout exchange a retry of ``delay`` seconds is published to: ``<prefix>.<N>s``."""
    return f"{cfg.retry_prefix}.{delay}s"


def delay_queue_name(cfg: AmqpConfig, delay: int) -> str:
    """The shared delay queue of one retry delay: ``<prefix>.<N>s.quorum``."""
    return f"{delay_exchange_name(cfg, delay)}.quorum"


def classic_delay_queue_name(cfg: AmqpConfig, delay: int) -> str:
    """The classic delay queue of the release before quorum ones (the upgrade only)."""
    return delay_exchange_name(cfg, delay)


def legacy_retry_queue_name(queue: str, delay: int) -> str:
    """A per-queue retry queue of releases before the shared delay queues (migration only)."""
    return f"{queue}.retry.{delay}s"


def delay_queue_arguments(delay: int) -> dict[str, Any]:
    """A quorum queue that holds each message ``delay`` seconds, then sends it home.

    ``at-least-once`` dead-lettering (which needs ``reject-publish``): the
    message leaves the delay queue only once its work queue confirmed it, so
    a node lost during the hand-over loses no retry (``at-most-once``, the
    default, would).
    """
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": delay * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_delay_queues(ch: BlockingChannel, cfg: AmqpConfig) -> None:
    """One delay queue per configured delay, shared by every work queue (idempotent).

    A retried message is published to the fanout exchange ``<prefix>.<N>s``
    with its work queue's name as routing key; the queue bound to it holds
    it for N seconds (a fixed TTL per queue keeps FIFO order, so a message
    never waits behind a longer delay) and then dead-letters it to the
    default exchange. No ``x-dead-letter-routing-key``: the message keeps
    its routing key, which the default exchange routes to the work queue it
    came from. So 1,000 repositories need 4 delay queues, not 4,000.

    Quorum queues, like the work queues: on a cluster a classic queue lives
    on one node, and the retries in it are gone with that node (four Raft
    groups are a negligible cost next to one per repository). The classic
    delay queue of the previous release (same name as the exchange) is
    unbound, so that no new retry goes there, and deleted once empty; the
    retries still in it come home by its own dead-letter arguments.
    """
    for delay in cfg.retry_delays:
        exchange, queue = delay_exchange_name(cfg, delay), delay_queue_name(cfg, delay)
        ch.exchange_declare(exchange, exchange_type="fanout", durable=True)
        ch.queue_declare(queue, durable=True, arguments=delay_queue_arguments(delay))
        ch.queue_bind(queue, exchange)
        retire_classic_delay_queue(ch.connection, cfg, delay)


def retire_classic_delay_queue(conn: pika.BlockingConnection, cfg: AmqpConfig,
                               delay: int) -> bool:
    """Unbind the previous release's classic delay queue, delete it if empty; True if gone."""
    old = classic_delay_queue_name(cfg, delay)
    if passive_declare(conn, old) is None:
        return True
    ch = conn.channel()
    try:
        ch.queue_unbind(old, delay_exchange_name(cfg, delay))
    finally:
        if ch.is_open:
            ch.close()
    gone = delete_if_empty(conn, old)
    if gone:
        log.info("queue=%s outcome=deleted reason=classic delay queue of an earlier release, "
                 "replaced by the quorum queue %s", old, delay_queue_name(cfg, delay))
    return gone


def delete_if_empty(conn: pika.BlockingConnection, queue: str) -> bool:
    """Delete ``queue`` unless messages wait in it; True when it is gone (or never was).

    For the per-queue retry queues of earlier releases: one still holding
    messages keeps them flowing back to their work queue (its own
    dead-letter arguments) and is deleted by a later call.
    """
    ch = conn.channel()  # a refusal (406) closes the channel: a throw-away one
    try:
        ch.queue_delete(queue, if_empty=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:  # PRECONDITION_FAILED: not empty
            return False
        raise
    finally:
        if ch.is_open:
            ch.close()


# --------------------------------------------------------------------- deliveries


@dataclass(eq=False)
class Delivery:
    """One received message: the AMQP side of :class:`cvmfs_publisher.core.delivery.Delivery`.

    Settled on the connection thread only (pika is not thread-safe): the
    retry or dead-letter copy goes out on ``publisher`` (a confirm-mode
    channel), and only once the broker confirmed it is the original acked
    on ``channel``, the channel it came on.
    """

    queue: str
    method: Basic.Deliver
    properties: BasicProperties
    body: bytes
    channel: BlockingChannel
    publisher: Callable[[], BlockingChannel]
    cfg: AmqpConfig
    daemon: str
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.queue

    @property
    def attempts(self) -> int:
        """How many times it failed before (our header) or was redelivered (quorum)."""
        ours = int(self.headers.get(ATTEMPTS_HEADER, 0) or 0)
        redelivered = int(self.headers.get("x-delivery-count", 0) or 0)
        return max(ours, redelivered)

    def ack(self) -> None:
        self.channel.basic_ack(self.method.delivery_tag)

    def retry_later(self, reason: str) -> int:
        delay = retry_later(self.publisher(), self.cfg, self, reason)
        self.ack()
        return delay

    def dead_letter(self, reason: str, repository: str) -> None:
        dead_letter(self.publisher(), self.cfg, self, reason, repository, self.daemon)
        self.ack()

    def give_back(self) -> None:
        """Return the message to its queue now (its settlement failed)."""
        if self.channel.is_open:
            try:
                self.channel.basic_nack(self.method.delivery_tag, requeue=True)
            except pika.exceptions.AMQPChannelError:
                pass  # the channel closed: the broker requeues it anyway


def publish_confirmed(ch: BlockingChannel, exchange: str, routing_key: str, body: bytes,
                      headers: dict[str, Any] | None = None,
                      content_type: str = "application/octet-stream",
                      mandatory: bool = True) -> None:
    """Publish a persistent message on a confirm-mode channel; raises on nack.

    ``mandatory`` (the default) also raises when no queue takes the message:
    right for work (a retry, a dead letter), wrong for a broadcast such as an
    announcement that may have no listener at that moment.
    """
    ch.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        properties=BasicProperties(delivery_mode=2, headers=headers or None,
                                   content_type=content_type),
        mandatory=mandatory,
    )


def dead_letter(ch: BlockingChannel, cfg: AmqpConfig, d: Delivery, reason: str,
                repository: str = "", daemon: str = "") -> None:
    """Copy the message to the dead-letter exchange with the reason in headers."""
    headers = dict(d.headers)
    headers.update({
        "x-original-queue": d.queue,
        "x-error": redact(reason)[:1000],
        "x-repository": repository,
        "x-failed-at": int(time.time()),
        "x-daemon": daemon,
        ATTEMPTS_HEADER: d.attempts + 1,
    })
    publish_confirmed(ch, cfg.dead_letter_exchange, d.queue, d.body, headers,
                      d.properties.content_type or "application/octet-stream")


def retry_later(ch: BlockingChannel, cfg: AmqpConfig, d: Delivery, reason: str) -> int:
    """Send the message to the delay queue of its next attempt; returns the delay."""
    attempt = d.attempts + 1
    delay = cfg.retry_delays[min(attempt, len(cfg.retry_delays)) - 1]
    headers = dict(d.headers)
    headers.update({ATTEMPTS_HEADER: attempt, "x-last-error": redact(reason)[:1000]})
    headers.pop("x-delivery-count", None)
    publish_confirmed(ch, delay_exchange_name(cfg, delay), d.queue, d.body, headers,
                      d.properties.content_type or "application/octet-stream")
    return delay


# --------------------------------------------------------------------- consumer loop


class ReconnectingConsumer:
    """Run ``session(connection)`` forever, reconnecting after any connection loss.

    ``session`` declares its topology, starts consuming and returns; the
    loop then drives I/O with ``process_data_events`` and calls ``tick``
    between events (timers, status). ``stop()`` (or SIGTERM/SIGINT after
    :meth:`install_signal_handlers`) lets the message in hand finish, then
    closes the connection: unacked messages go back to the queue.
    """

    def __init__(self, cfg: AmqpConfig, name: str,
                 session: Callable[[pika.BlockingConnection], None],
                 tick: Callable[[], None] | None = None,
                 on_state: Callable[[bool], None] | None = None,
                 tick_interval: float = 0.5) -> None:
        self.cfg = cfg
        self.name = name
        self.session = session
        self.tick = tick or (lambda: None)
        self.on_state = on_state or (lambda connected: None)
        self.tick_interval = tick_interval
        self.backoff = Backoff(cfg.reconnect_initial, cfg.reconnect_max)
        self.rotation = NodeRotation(cfg)
        self.connection: pika.BlockingConnection | None = None
        #: ``host:port`` of the node in use ("" when none), the last error (for status)
        self.node = ""
        self.last_error = ""
        self._stop = threading.Event()

    def install_signal_handlers(self) -> None:
        runtime.stop_on_signals(self.stop)

    def stop(self) -> None:
        """Ask the loop to end after the message in hand (safe from signal handlers)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def broker_state(self) -> dict[str, str]:
        """For the status document: the node in use, or why there is none."""
        return {"broker_node": self.node, "broker_error": self.last_error}

    def run(self) -> None:
        """Loop until :meth:`stop`; never raises for connection problems."""
        while not self._stop.is_set():
            try:
                self.connection = connect(self.cfg, self.name, self.rotation)
                host, port = self.rotation.current or ("", 0)
                self.node, self.last_error = f"{host}:{port}", ""
                self.session(self.connection)
                self.on_state(True)
                log.info("connected to amqp %s:%s as %s", host, port, self.name)
                self.backoff.reset()
                while not self._stop.is_set():
                    self.connection.process_data_events(time_limit=self.tick_interval)
                    self.tick()
            except (*CONNECTION_ERRORS, OSError) as exc:  # OSError: TLS files, DNS
                lost_node = self.node
                self.rotation.lost()
                self.node = ""
                if isinstance(exc, NoBrokerNode):  # it names every node already
                    self.last_error = redact(str(exc))
                else:
                    self.last_error = f"{lost_node or 'amqp'}: {reason(exc)}"
                self.on_state(False)
                if self._stop.is_set():
                    break
                delay = self.backoff.next()
                log.warning("amqp connection lost (%s); reconnecting in %.1fs",
                            self.last_error or "no detail", delay)
                self._close()
                self._stop.wait(delay)
                continue
            finally:
                if self._stop.is_set():
                    self._close()
        self.on_state(False)
        log.info("%s stopped", self.name)

    def _close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as exc:  # closing a dead connection: nothing to do
                log.debug("closing amqp connection: %s", exc)


def delivery_from(queue: str, channel: BlockingChannel, method: Basic.Deliver,
                  props: BasicProperties, body: bytes, *, cfg: AmqpConfig, daemon: str,
                  publisher: Callable[[], BlockingChannel] | None = None) -> Delivery:
    """Build a :class:`Delivery` from pika's callback arguments.

    ``publisher`` gives the confirm-mode channel for retry and dead-letter
    copies (default: ``channel`` itself, which must then be in confirm mode).
    """
    return Delivery(queue, method, props, body, channel, publisher or (lambda: channel), cfg,
                    daemon, dict(props.headers or {}))
