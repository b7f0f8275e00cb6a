"""The RabbitMQ event source: one quorum queue per repository (DESIGN §1, §3).

Implements :class:`cvmfs_publisher.pipeline.source.EventSource`; the
consumers daemon knows nothing else about RabbitMQ.

**Which queues.** The broker is the registry: at start-up, after every
reconnection and every ``consumers.refresh_interval`` seconds, the queues
bound to the ``notification`` exchange are listed through the management
API; each one whose name is a repository label (``<label>.<domain>`` is a
valid repository) is consumed. The source also listens on the control
exchange (its own exclusive queue bound to ``repository.#``): a repository
announced ``created`` by publisher-consumer is consumed at once, one
announced ``deleted`` is dropped at once, without a restart. A listing
taken before an announcement never undoes it, and a queue missing from a
listing is dropped only once it no longer exists (a listing can be taken
mid-change; an existing queue's messages are still its repository's).

**Threads.** pika's BlockingConnection is not thread-safe, so the
*connection thread* (:meth:`run`, in
:class:`cvmfs_publisher.adapters.amqp.ReconnectingConsumer`) owns the
connection and every channel: it receives deliveries, and every ack, retry
and dead-letter happens there (:meth:`settle` from another thread hands the
verdict over with ``add_callback_threadsafe``). A *discovery thread* lists
queues and reads their depths through the management API, so a slow HTTP
call never delays an ack.

**Which queues are ours.** Repository queues have a single active consumer
(several publisher hosts may subscribe; the broker delivers to one). The
broker does not tell an AMQP 0-9-1 consumer that it became the active one,
so the source learns it two ways, whichever comes first: the first delivery
on a subscription (only the active consumer gets any), and the management
API's consumer list (``single_active``), read every
:data:`ACTIVITY_POLL` seconds while some subscription waits. It then calls
``Consumer.active(repository, True, reason)``; when the subscription ends
(its channel or the connection is gone, the queue is dropped) it calls
``Consumer.active(repository, False, reason)``. A subscription, once
active, stays active until it ends (RabbitMQ 3.10 never moves the role
while the active consumer is alive).

One channel per repository queue, each with prefetch ``prefetch`` (quorum
queues have no channel-wide prefetch): a channel error on one repository
(its queue deleted) never touches the others.

**Settlement.** A verdict whose delivery's channel has closed since (or
whose connection was replaced) is not applied: the broker delivers the
message again, which the pipeline makes harmless. If the retry or
dead-letter copy, or the ack, fails on a channel, the message is given back
(``nack``, requeue). Transient failures go to the shared delay queue
``<retry_prefix>.<N>s.quorum`` of their attempt (:func:`amqp.declare_delay_queues`),
which returns them to their queue, rather than ``nack(requeue)``: a requeue
comes back at once (no backoff), counts against the quorum queue's delivery
limit and would block the messages behind it. The per-queue retry queues
``<label>.retry.<N>s`` of earlier releases are deleted once empty (found by
the discovery thread's depth listing), and so are the classic shared delay
queues ``<retry_prefix>.<N>s`` of the release before the quorum ones.

**Shutdown.** :meth:`request_stop`: stop consuming, withdraw deliveries not
started, let running ones finish and settle (at most ``drain_seconds``),
close the connection (what is still unacked goes back to the queue).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from ..core import delivery as settlement
from ..core.announcements import BadAnnouncement, parse_announcement
from ..core.config import Config
from ..core.delivery import Verdict
from ..core.names import InvalidName, repository_of, validate_repository
from ..core.status import StatusDocument
from . import amqp
from .rabbitmq_api import ManagementAPI

log = logging.getLogger(__name__)

#: Re-subscription backoff for a queue whose consume failed (e.g. 404), capped.
RESUBSCRIBE_MAX = 30.0

#: Seconds between the ticks' scans of every subscription (is its channel still
#: open, which ones wait to become active). At every 0.2 s tick, 1,000 idle
#: repositories cost the connection thread about 1 % of a core. A new listing
#: is scanned at once; a new connection and a ``created`` announcement subscribe
#: without waiting for a scan.
SCAN_INTERVAL = 1.0

#: How often the management API is asked which waiting subscriptions became active
#: (its consumer statistics are refreshed about every 5 s).
ACTIVITY_POLL = 5.0
#: Depths and quorum of the served queues are read this often (one API call), besides
#: after each listing: a queue without quorum shows in status and logs within that time.
DEPTHS_POLL = 10.0


@dataclass(eq=False)
class RepoQueue:
    """One repository queue and its consumption state (connection thread only)."""

    queue: str
    repository: str
    opened: bool = False
    channel: BlockingChannel | None = None
    tag: str = ""
    failures: int = 0
    retry_at: float = 0.0
    active: bool = False
    #: delivery tags received on ``channel`` and not settled yet (a ``multiple`` ack
    #: may cover only these)
    unacked: set[int] = field(default_factory=set)


@dataclass(eq=False)
class QueueDelivery(amqp.Delivery):
    """A delivery with the session it belongs to (void once the connection is replaced)."""

    generation: int = 0
    rq: RepoQueue | None = None
    #: while :meth:`RepositoryQueues.settle_many` applies a round: its ack goes here,
    #: to be sent with the others of its channel
    acks: list[QueueDelivery] | None = None

    def ack(self) -> None:
        if self.acks is not None:
            self.acks.append(self)
            return
        super().ack()
        self.settled()

    def give_back(self) -> None:
        super().give_back()
        self.settled()

    def settled(self) -> None:
        if self.rq is not None and self.rq.channel is self.channel:
            self.rq.unacked.discard(self.method.delivery_tag)


class RepositoryQueues:
    """The event source of the module docstring."""

    def __init__(self, cfg: Config, status: StatusDocument, name: str, *,
                 prefetch: int, drain_seconds: float,
                 mgmt: ManagementAPI | None = None) -> None:
        self.cfg = cfg
        self.status = status
        self.name = name
        self.prefetch = prefetch
        self.drain_seconds = drain_seconds
        self.mgmt = mgmt or ManagementAPI(cfg.amqp)
        self.consumer = amqp.ReconnectingConsumer(
            cfg.amqp, name, self._session, tick=self._tick, on_state=self._on_state,
            tick_interval=0.2)
        self._target: Any = None  # the pipeline.source.Consumer being served
        # Connection-thread state.
        self._conn: pika.BlockingConnection | None = None
        self._generation = 0
        self._pub: BlockingChannel | None = None
        self._queues: dict[str, RepoQueue] = {}
        self._announced: dict[str, tuple[str, float]] = {}
        self._next_scan = 0.0
        self._draining_since = 0.0
        self._thread = 0
        # Shared between threads.
        self._lock = threading.Lock()
        self._unsettled = 0
        self._drain = threading.Event()
        self.discovery = Discovery(cfg, status, self.mgmt, self._lock)

    # ------------------------------------------------------------------ EventSource

    def run(self, consumer: Any) -> None:
        """Serve ``consumer`` until :meth:`request_stop` (see the module docstring)."""
        self._target = consumer
        self._thread = threading.get_ident()
        self.discovery.start()
        try:
            self.consumer.run()
        finally:
            self.discovery.stop()

    def request_stop(self) -> None:
        """Drain and stop (safe from a signal handler: only sets flags)."""
        self._drain.set()
        conn = self.consumer.connection
        if conn is None or not conn.is_open:
            self.consumer.stop()  # nothing to settle on: stop at once

    def settle(self, delivery: Any, verdict: Verdict) -> None:
        """Apply ``verdict`` on the connection thread (from any thread)."""
        d: QueueDelivery = delivery
        if threading.get_ident() == self._thread:
            self._apply(d, verdict)
            return
        with self._lock:
            self._unsettled += 1
        try:
            self._conn_of(d).add_callback_threadsafe(
                functools.partial(self._apply_callback, d, verdict))
        except Exception as exc:  # connection gone: the broker redelivers the message
            with self._lock:
                self._unsettled -= 1
            log.info("repository=%s key=%s outcome=%s-unacked reason=connection closed (%s); "
                     "the broker delivers it again", verdict.repository, verdict.key,
                     verdict.action, type(exc).__name__)

    def settle_many(self, verdicts: Sequence[tuple[Any, Verdict]]) -> None:
        """:meth:`settle` for each pair, in one hand-over per connection (from any thread).

        On the connection thread the acks of one channel go out together: one
        ``basic_ack(multiple=True)`` for the longest run of that channel's
        oldest unsettled deliveries that the round acknowledges (only those:
        a multiple ack covers every earlier tag), single acks for the rest.
        """
        if threading.get_ident() == self._thread:
            self._apply_many(list(verdicts))
            return
        by_conn: dict[int, tuple[Any, list[tuple[QueueDelivery, Verdict]]]] = {}
        for d, verdict in verdicts:
            try:
                conn = self._conn_of(d)
            except ConnectionError:
                self._unsent([(d, verdict)], "no connection")
                continue
            by_conn.setdefault(id(conn), (conn, []))[1].append((d, verdict))
        for conn, items in by_conn.values():
            with self._lock:
                self._unsettled += len(items)
            try:
                conn.add_callback_threadsafe(functools.partial(self._apply_many_callback, items))
            except Exception as exc:  # connection gone: the broker redelivers them
                with self._lock:
                    self._unsettled -= len(items)
                self._unsent(items, type(exc).__name__)

    def _unsent(self, items: list[tuple[QueueDelivery, Verdict]], why: str) -> None:
        for _, verdict in items:
            log.info("repository=%s key=%s outcome=%s-unacked reason=connection closed (%s); "
                     "the broker delivers it again", verdict.repository, verdict.key,
                     verdict.action, why)

    def queues(self) -> list[str]:
        """The queues served now (connection-thread state; for tests and logs)."""
        return list(self._queues)

    # ------------------------------------------------------------------ settlement

    def _conn_of(self, d: QueueDelivery) -> pika.BlockingConnection:
        conn = d.channel.connection
        if conn is None:
            raise ConnectionError("channel without a connection")
        return conn

    def _apply_callback(self, d: QueueDelivery, verdict: Verdict) -> None:
        try:
            self._apply(d, verdict)
        finally:
            with self._lock:
                self._unsettled -= 1

    def _apply_many_callback(self, items: list[tuple[QueueDelivery, Verdict]]) -> None:
        try:
            self._apply_many(items)
        finally:
            with self._lock:
                self._unsettled -= len(items)

    def _apply_many(self, items: list[tuple[QueueDelivery, Verdict]]) -> None:
        """Connection thread: every verdict (:meth:`_apply`), the acks held back and sent
        per channel at the end (see :meth:`settle_many`)."""
        acks: list[QueueDelivery] = []
        for d, verdict in items:
            d.acks = acks
            try:
                self._apply(d, verdict)
            finally:
                d.acks = None
        by_channel: dict[int, list[QueueDelivery]] = {}
        for d in acks:
            by_channel.setdefault(id(d.channel), []).append(d)
        for group in by_channel.values():
            try:
                _ack_together(group)
            except pika.exceptions.AMQPChannelError as exc:  # the broker requeues them
                log.warning("queue=%s outcome=ack-failed messages=%d reason=%s: %s; they are "
                            "delivered again", group[0].queue, len(group), type(exc).__name__,
                            exc)

    def _apply(self, d: QueueDelivery, verdict: Verdict) -> None:
        """Connection thread: the verdict, unless its channel or connection is gone."""
        rq = d.rq
        if (d.generation != self._generation or rq is None or rq.channel is not d.channel
                or not d.channel.is_open or self._queues.get(rq.queue) is not rq):
            log.info("repository=%s key=%s outcome=%s-unacked reason=channel closed; the "
                     "broker delivers it again", verdict.repository, verdict.key,
                     verdict.action)
            return
        try:
            settlement.apply(d, verdict)
        except pika.exceptions.AMQPChannelError as exc:
            log.warning("repository=%s key=%s outcome=%s-failed reason=%s: %s; returned to "
                        "the queue", verdict.repository, verdict.key, verdict.action,
                        type(exc).__name__, exc)
            d.give_back()
            return
        self._target.settled(verdict)

    def _publisher(self) -> BlockingChannel:
        """The confirm-mode channel for retry and dead-letter copies (reopened if closed)."""
        if self._pub is None or not self._pub.is_open:
            assert self._conn is not None
            self._pub = self._conn.channel()
            self._pub.confirm_delivery()
        return self._pub

    # ------------------------------------------------------------------ session

    def _on_state(self, up: bool) -> None:
        self.status.set(broker_connected=up, **self.consumer.broker_state())
        if not up:
            for rq in self._queues.values():
                self._deactivate(rq, "broker connection lost")
        if not up and self._drain.is_set():
            self.consumer.stop()  # draining and the broker is gone: nothing left to ack

    def _session(self, conn: pika.BlockingConnection) -> None:
        """(Re)connect: declare, subscribe to announcements, list and consume queues."""
        a = self.cfg.amqp
        self._generation += 1
        gen = self._generation
        self._conn = conn
        for rq in self._queues.values():
            self._deactivate(rq, "broker connection replaced")
            rq.channel, rq.tag, rq.failures, rq.retry_at = None, "", 0, 0.0
        # Deliveries of the old connection that did not start: the broker delivers them again.
        self._target.withdraw(lambda d: getattr(d, "generation", gen) != gen)
        self._pub = None
        amqp.declare_common(self._publisher(), a)
        amqp.declare_delay_queues(self._publisher(), a)
        ctl = conn.channel()
        control_queue = ctl.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ctl.queue_bind(control_queue, a.control_exchange, routing_key="repository.#")
        ctl.basic_consume(control_queue, self._on_control, auto_ack=True)
        if self._drain.is_set():
            return
        started = time.time()
        try:
            self._apply_listing(started, self.discovery.list_now())
        except Exception as exc:
            log.warning("listing the queues bound to %s failed: %s; consuming the known "
                        "ones, retrying soon", a.notification_exchange, exc)
            self.discovery.refresh()
        self._sync_consumers()

    def _repository_for(self, queue: str, repository: str = "") -> str | None:
        """The repository a queue serves, or None when it is not a repository queue."""
        name = repository or repository_of(queue, self.cfg.cvmfs.domain)
        try:
            validate_repository(name, self.cfg.cvmfs.domain)
        except InvalidName as exc:
            log.debug("queue=%s is not a repository queue (%s): ignored", queue, exc)
            return None
        return name

    def _apply_listing(self, fetched_at: float, bound: dict[str, str]) -> None:
        """Consume the listed queues, drop the vanished ones (unless announced since)."""
        listed = set()
        for queue in bound:
            repo = self._repository_for(queue)
            if repo is None:
                continue
            listed.add(queue)
            event = self._announced.get(queue)
            if event and event[0] == "deleted" and event[1] >= fetched_at:
                continue
            self._want(queue, repo)
        for queue in list(self._queues):
            if queue in listed:
                continue
            event = self._announced.get(queue)
            if event and event[0] == "created" and event[1] >= fetched_at:
                continue
            if self._conn is not None and amqp.queue_exists(self._conn, queue):
                # Unbound but still there (a listing taken mid-change, an operator
                # pausing a repository): its messages are still this repository's.
                log.debug("queue=%s not bound to %s but exists: still consumed", queue,
                          self.cfg.amqp.notification_exchange)
                continue
            self._unwant(queue, "queue deleted")

    def _want(self, queue: str, repository: str) -> None:
        if queue in self._queues:
            return
        self._queues[queue] = RepoQueue(queue, repository)
        self.status.repo(repository)
        with self._lock:
            self.discovery.served = tuple(self._queues.values())

    def _unwant(self, queue: str, why: str) -> None:
        rq = self._queues.pop(queue, None)
        if rq is None:
            return
        self._deactivate(rq, why)
        ch, rq.channel = rq.channel, None
        if ch is not None and ch.is_open:
            try:
                ch.close()
            except pika.exceptions.AMQPChannelError as exc:
                log.debug("closing channel of %s: %s", queue, exc)
        self._target.withdraw(lambda d: getattr(d, "rq", None) is rq)
        with self._lock:  # with the served set, so discovery cannot report it again
            self.discovery.served = tuple(self._queues.values())
            self._target.close(rq.repository)
        log.info("repository=%s queue=%s outcome=dropped reason=%s", rq.repository, queue, why)

    def _sync_consumers(self) -> None:
        """Consume every wanted queue that is not consumed (with per-queue backoff)."""
        if self._drain.is_set() or self._conn is None:
            return
        now = time.monotonic()
        for rq in list(self._queues.values()):
            if rq.channel is not None and rq.channel.is_open:
                continue
            if now >= rq.retry_at:
                self._start(rq)

    def _start(self, rq: RepoQueue) -> None:
        assert self._conn is not None
        gen = self._generation
        ch: BlockingChannel | None = None
        try:
            if not rq.opened:
                self._target.open(rq.repository)
                rq.opened = True
            ch = self._conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.add_on_cancel_callback(functools.partial(self._on_cancelled, rq))
            rq.tag = ch.basic_consume(rq.queue, functools.partial(self._on_message, rq, gen))
        except Exception as exc:
            # One repository's problem (queue missing, staging unusable...) must not
            # stop the others; only a lost connection ends the session.
            if isinstance(exc, (pika.exceptions.AMQPConnectionError, ConnectionError)):
                raise
            rq.failures += 1
            delay = min(RESUBSCRIBE_MAX, 2.0 ** rq.failures)
            rq.retry_at = time.monotonic() + delay
            if ch is not None and ch.is_open:
                ch.close()
            self.status.repo(rq.repository, last_error=f"cannot consume: {exc}"[:300])
            log.warning("repository=%s queue=%s outcome=not-consuming retry_in=%.0fs reason=%s",
                        rq.repository, rq.queue, delay, exc)
            return
        rq.channel, rq.failures, rq.unacked = ch, 0, set()
        log.info("repository=%s queue=%s outcome=consuming prefetch=%d", rq.repository,
                 rq.queue, self.prefetch)
        with self._lock:
            self.discovery.waiting = self._waiting()

    def _on_cancelled(self, rq: RepoQueue, frame: Any) -> None:
        """The broker cancelled our consumer (queue deleted): re-check soon."""
        log.warning("repository=%s queue=%s outcome=cancelled-by-broker", rq.repository, rq.queue)
        self._deactivate(rq, "cancelled by the broker")
        ch, rq.channel = rq.channel, None
        rq.failures += 1
        rq.retry_at = time.monotonic() + min(RESUBSCRIBE_MAX, 2.0 ** rq.failures)
        if ch is not None and ch.is_open and self._conn is not None:
            self._conn.add_callback_threadsafe(functools.partial(_close_quietly, ch))
        self.discovery.refresh()

    def _on_control(self, ch: BlockingChannel, method: Basic.Deliver,
                    props: BasicProperties, body: bytes) -> None:
        try:
            doc = parse_announcement(body)
        except BadAnnouncement as exc:
            log.warning("control message ignored: %s", exc)
            return
        queue = doc["queue"]
        repo = self._repository_for(queue, doc["repository"])
        if repo is None:
            return
        self._announced[queue] = (doc["event"], time.time())
        if doc["event"] == "created":
            log.info("repository=%s queue=%s outcome=announced-created", repo, queue)
            self._want(queue, repo)
            self._sync_consumers()
            self._target.created(repo)
        else:
            self._unwant(queue, "announced deleted")

    def _on_message(self, rq: RepoQueue, gen: int, ch: BlockingChannel,
                    method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        if rq.channel is ch:
            rq.unacked.add(method.delivery_tag)
        if self._drain.is_set():
            return  # left unacked: back to the queue when the connection closes
        if not rq.active and rq.channel is ch:
            self._activate(rq, "first delivery")
        d = QueueDelivery(rq.queue, method, props, body, ch, self._publisher, self.cfg.amqp,
                          self.name, dict(props.headers or {}), gen, rq)
        self._target.deliver(rq.repository, d)

    # ------------------------------------------------------------------ active consumer

    def _activate(self, rq: RepoQueue, how: str) -> None:
        """Connection thread: this subscription is the queue's active consumer."""
        rq.active = True
        reason = "active consumer" if self._generation == 1 else \
            "active consumer again after a broker reconnection"
        log.info("repository=%s queue=%s outcome=active-consumer detected_by=%s", rq.repository,
                 rq.queue, how)
        self.status.repo(rq.repository, active_consumer=True)
        with self._lock:
            self.discovery.waiting = self._waiting()
        self._target.active(rq.repository, True, reason)

    def _deactivate(self, rq: RepoQueue, why: str) -> None:
        """Connection thread: the subscription ended; another host may be active now."""
        if not rq.active:
            return
        rq.active = False
        log.info("repository=%s queue=%s outcome=not-active-consumer reason=%s", rq.repository,
                 rq.queue, why)
        self.status.repo(rq.repository, active_consumer=False)
        self._target.active(rq.repository, False, why)

    def _waiting(self) -> tuple[tuple[RepoQueue, str], ...]:
        """Subscriptions that are not (known to be) active: (queue, consumer tag)."""
        return tuple((rq, rq.tag) for rq in self._queues.values()
                     if rq.tag and not rq.active and rq.channel is not None)

    # ------------------------------------------------------------------ timers

    def _tick(self) -> None:
        """Connection thread, every 0.2 s: listings, re-subscriptions, draining."""
        listing = self.discovery.take()
        if listing is not None and not self._drain.is_set():
            self._apply_listing(*listing)
            self._next_scan = 0.0
        legacy = self.discovery.take_legacy()
        if legacy and self._conn is not None and not self._drain.is_set():
            self._drop_legacy(legacy)
        for rq, tag in self.discovery.take_activated():
            if (not rq.active and rq.tag == tag and rq.channel is not None
                    and rq.channel.is_open and self._queues.get(rq.queue) is rq):
                self._activate(rq, "management API")
        if self._drain.is_set():
            self._drain_step()
            return
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + SCAN_INTERVAL
        with self._lock:
            self.discovery.waiting = self._waiting()
        horizon = time.time() - 2 * max(1.0, self.cfg.consumers.refresh_interval)
        for queue in [q for q, (_, t) in self._announced.items() if t < horizon]:
            del self._announced[queue]
        self._sync_consumers()

    def _drop_legacy(self, names: list[str]) -> None:
        """Delete the empty retry queues of earlier releases (the upgrade): per-queue
        ones, and the classic shared delay queues (unbound at the session start)."""
        assert self._conn is not None
        a = self.cfg.amqp
        classic = {amqp.classic_delay_queue_name(a, d): d for d in a.retry_delays}
        for name in names:
            if name in classic:
                amqp.retire_classic_delay_queue(self._conn, a, classic[name])
            elif amqp.delete_if_empty(self._conn, name):
                log.info("queue=%s outcome=deleted reason=per-queue retry queue of an earlier "
                         "release, replaced by the shared delay queues %s.<N>s", name,
                         self.cfg.amqp.retry_prefix)

    def _drain_step(self) -> None:
        if not self._draining_since:
            self._draining_since = time.monotonic()
            log.info("%s stopping: finishing running downloads (at most %.0fs)", self.name,
                     self.drain_seconds)
            for rq in self._queues.values():
                if rq.channel is not None and rq.channel.is_open and rq.tag:
                    try:
                        rq.channel.basic_cancel(rq.tag)
                    except pika.exceptions.AMQPChannelError as exc:
                        log.debug("cancel %s: %s", rq.queue, exc)
            withdrawn = self._target.withdraw(lambda d: True)
            if withdrawn:
                log.info("%d messages not started go back to their queues", withdrawn)
        with self._lock:
            unsettled = self._unsettled
        idle = not self._target.busy() and unsettled == 0
        if idle or time.monotonic() - self._draining_since > self.drain_seconds:
            if not idle:
                log.warning("%s stopping with downloads still running: their messages go "
                            "back to the queue", self.name)
            self.consumer.stop()


class Discovery:
    """The discovery thread: which queues exist, and how deep the served ones are.

    Every ``consumers.refresh_interval`` seconds (or soon after
    :meth:`refresh`) it lists the queues bound to the notification exchange
    and hands the listing to the connection thread (:meth:`take`); after
    each listing it reads the depth of every served queue into the status
    document. ``lock`` is the source's: ``served`` changes under it, so a
    queue dropped meanwhile never gets its depth reported again.
    """

    def __init__(self, cfg: Config, status: StatusDocument, mgmt: ManagementAPI,
                 lock: threading.Lock) -> None:
        self.cfg = cfg
        self.status = status
        self.mgmt = mgmt
        self.lock = lock
        self.served: tuple[RepoQueue, ...] = ()
        #: subscriptions not yet known to be active (set by the connection thread)
        self.waiting: tuple[tuple[RepoQueue, str], ...] = ()
        self._activated: list[tuple[RepoQueue, str]] = []
        self._next_activity = 0.0
        self._listing: tuple[float, dict[str, str]] | None = None
        self._legacy: list[str] = []
        self._quorum_lost = ""  # what was last reported (a warning per change)
        self._next_depths = 0.0
        self._refresh_now = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def list_now(self) -> dict[str, str]:
        """The queues bound to the notification exchange (raises when the API fails)."""
        return self.mgmt.queues_bound_to(self.cfg.amqp.notification_exchange)

    def refresh(self) -> None:
        """List again soon (safe from any thread)."""
        self._refresh_now.set()

    def take(self) -> tuple[float, dict[str, str]] | None:
        """The latest listing and when it was started, once; None when there is none."""
        with self.lock:
            listing, self._listing = self._listing, None
        return listing

    def take_legacy(self) -> list[str]:
        """Per-queue retry queues of an earlier release found since the last call, once."""
        with self.lock:
            legacy, self._legacy = self._legacy, []
        return legacy

    def take_activated(self) -> list[tuple[RepoQueue, str]]:
        """Waiting subscriptions the management API reported active, once."""
        with self.lock:
            out, self._activated = self._activated, []
        return out

    def _activity(self) -> None:
        """Which waiting subscriptions the broker made active (one API call)."""
        with self.lock:
            waiting = self.waiting
        if not waiting:
            return
        try:
            active = self.mgmt.active_consumers()
        except Exception as exc:
            log.debug("reading the active consumers failed: %s", exc)
            return
        found = [(rq, tag) for rq, tag in waiting if tag in active]
        if found:
            with self.lock:
                self._activated.extend(found)

    def _run(self) -> None:
        """Listing every refresh_interval (or on demand) and queue depths.

        One failed round is logged and the next one tried.
        """
        next_listing = time.monotonic() + self.cfg.consumers.refresh_interval
        interval = max(0.1, min(1.0, self.cfg.status.interval))
        while not self._stop.wait(interval):
            try:
                next_listing = self._round(next_listing)
            except Exception:
                log.exception("discovery round failed; retrying")

    def _round(self, next_listing: float) -> float:
        """One round of :meth:`_run`; returns when the next listing is due."""
        a, c = self.cfg.amqp, self.cfg.consumers
        now = time.monotonic()
        if now >= self._next_activity:
            self._next_activity = now + ACTIVITY_POLL
            self._activity()
        if now >= self._next_depths and not self._refresh_now.is_set() and now < next_listing:
            self._next_depths = now + DEPTHS_POLL
            self._queue_depths()
        if self._refresh_now.is_set() or now >= next_listing:
            self._refresh_now.clear()
            started = time.time()
            try:
                bound = self.list_now()
            except Exception as exc:
                log.warning("listing the queues bound to %s failed: %s",
                            a.notification_exchange, exc)
                return now + min(c.refresh_interval, 5.0)
            with self.lock:
                self._listing = (started, bound)
            self._queue_depths()
            self._next_depths = now + DEPTHS_POLL
            return now + c.refresh_interval
        return next_listing

    def _queue_depths(self) -> None:
        """Depths and quorum of the served queues (one API call), and the legacy retry
        queues among them."""
        try:
            overview = self.mgmt.queue_overview()
        except Exception as exc:
            log.debug("queue depths: %s", exc)
            return
        with self.lock:  # only for repositories still served
            lost = []
            for rq in self.served:
                q = overview.get(rq.queue, {})
                members, online = q.get("members") or [], q.get("online") or []
                quorum = not members or 2 * len(online) > len(members)
                self.status.repo(rq.repository, queue_depth=q.get("messages", 0),
                                 queue_quorum=quorum)
                if not quorum:
                    lost.append(f"{rq.queue} ({len(online)} of {len(members)} nodes online)")
            self._report_quorum(lost)
            served = {rq.queue for rq in self.served}  # the publisher queue's: its daemon's
            a = self.cfg.amqp
            classic = {amqp.classic_delay_queue_name(a, d) for d in a.retry_delays}
            self._legacy = [name for name in overview
                            if _legacy_of(name) in served or name in classic]

    def _report_quorum(self, lost: list[str]) -> None:
        """Say when queues lose their quorum (nothing flows: events wait), and when back."""
        text = ", ".join(sorted(lost))
        self.status.set(quorum_lost=sorted(lost))
        if text and text != self._quorum_lost:
            log.warning("outcome=waiting reason=no quorum: %s; their events wait in RabbitMQ "
                        "until a majority of the nodes is back", text)
        elif not text and self._quorum_lost:
            log.info("outcome=resumed reason=quorum back for every served queue")
        self._quorum_lost = text


def _legacy_of(name: str) -> str:
    """The work queue of a per-queue retry queue ``<queue>.retry.<N>s``, else ""."""
    queue, sep, tail = name.rpartition(".retry.")
    return queue if sep and tail.endswith("s") and tail[:-1].isdigit() else ""


def _ack_together(group: list[QueueDelivery]) -> None:
    """Acknowledge ``group`` (deliveries of one channel) in as few frames as is safe."""
    rq = group[0].rq
    ch = group[0].channel
    tags = {d.method.delivery_tag for d in group}
    covered = 0
    if rq is not None and rq.channel is ch:
        for tag in sorted(rq.unacked):
            if tag not in tags:
                break
            covered = tag
    if covered:
        ch.basic_ack(covered, multiple=True)
    for tag in sorted(t for t in tags if t > covered):
        ch.basic_ack(tag)
    for d in group:
        d.settled()


def _close_quietly(ch: BlockingChannel) -> None:
    """Close a channel that may already be closing (never a reason to reconnect)."""
    if ch.is_open:
        try:
            ch.close()
        except pika.exceptions.AMQPChannelError as exc:
            log.debug("closing a cancelled channel: %s", exc)

