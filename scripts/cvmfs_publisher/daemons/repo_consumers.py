"""cvmfs-repo-consumers: stage every repository's S3 events under /data/cvmfs/<repo>.

One process serves every repository (DESIGN §1, §3).

**Which queues.** The broker is the registry: at start-up, after every
reconnection and every ``consumers.refresh_interval`` seconds, the queues
bound to the ``notification`` exchange are listed through the management
API; each one whose name is a repository label (``<label>.<domain>`` is a
valid repository) is consumed. The daemon also listens on the control
exchange (its own exclusive queue bound to ``repository.#``): a repository
announced ``created`` by publisher-consumer is consumed at once, one
announced ``deleted`` is dropped at once, without a restart. A listing
taken before an announcement never undoes it, and a queue missing from a
listing is dropped only once it no longer exists (a listing can be taken
mid-change; an existing queue's messages are still its repository's).

**Threads.** pika's BlockingConnection is not thread-safe, so:

- the *connection thread* (the main thread, in
  :class:`cvmfs_publisher.adapters.amqp.ReconnectingConsumer`) owns the connection
  and every channel: it receives deliveries, validates them (parse, bucket,
  key: cheap), and acks, retries or dead-letters every message;
- ``consumers.downloads`` *worker threads*, plus one reserved for
  repositories that have nothing running
  (:class:`cvmfs_publisher.pipeline.dispatch.Dispatcher`), do the slow part, S3 GET
  streamed into staging (:func:`cvmfs_publisher.pipeline.fetch.fetch_key`), fairly
  across repositories and in arrival order per path, then hand the outcome
  back with ``connection.add_callback_threadsafe``. One busy repository
  gets the full ``downloads`` concurrency; the reserved worker means that
  even when its downloads are slow (large objects, a hanging RGW) the first
  event of another repository starts at once;
- a *housekeeping thread* lists queues through the management API and
  keeps the status document (pending counts, queue depths) fresh, so a
  slow HTTP call never delays an ack.

One channel per repository queue, each with prefetch ``2 x downloads`` (one
job running and one ready per worker, so the pool never waits on the ack
round trip; quorum queues have no channel-wide prefetch): a channel error
on one repository (its queue deleted) never touches the others.

**Ack discipline.** A message is acked only after every record's change is
durable in staging (fsync + atomic rename), or after its retry or
dead-letter copy was confirmed by the broker. If the channel closed in the
meantime the ack is skipped: the broker delivers the message again, which
is harmless (fetching a key twice stages the same state).

**Failures.** Permanent (malformed message, foreign bucket: the event's
bucket must be the queue's label, unsafe key, bad symlink, S3 403):
dead-lettered at once with one log line (repository, key, reason).
Transient (S3 unreachable or 5xx, interrupted download, disk full): the
message goes to the delay queue ``<label>.retry.<N>s`` of its attempt and
comes back into the repository queue after ``amqp.retry_delays[attempt]``,
capped at the last delay, **forever**: an outage must not turn accepted
changes into dead letters that need a manual replay (DESIGN §3). Delay
queues rather than ``nack(requeue)`` because a requeue comes back at once
(no backoff), counts against the quorum queue's delivery limit (the broker
would dead-letter a message after a few requeues during an outage), and
would block the messages behind it; a delay queue keeps the message
durable in the broker, not in our memory. An unexpected exception (a bug)
is retried the same way, and dead-lettered after
``consumers.max_attempts`` attempts so a poison message cannot loop.

**Shutdown.** SIGTERM/SIGINT: stop consuming, withdraw jobs not started,
let running ones finish and settle (at most :data:`DRAIN_SECONDS`), close
the connection (what is still unacked goes back to the queue), exit 0.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from ..adapters import amqp
from ..adapters.rabbitmq_api import ManagementAPI
from ..adapters.rgw import RGW
from ..core import runtime
from ..core.config import Config
from ..core.errors import Permanent, Transient
from ..core.names import InvalidName, repository_of, validate_repository
from ..core.status import StatusDocument
from ..pipeline import fetch
from ..pipeline import object_keys as keymap
from ..pipeline.dispatch import Dispatcher, Job
from ..pipeline.events import BadEvent, parse_message
from ..provisioning.messages import BadMessage, parse_announcement
from ..staging.area import Staging

NAME = "cvmfs-repo-consumers"
log = logging.getLogger(NAME)

#: How long SIGTERM waits for running downloads (below Docker's default 10 s stop timeout).
DRAIN_SECONDS = 8.0
#: Re-subscription backoff for a queue whose consume failed (e.g. 404), capped.
RESUBSCRIBE_MAX = 30.0
_MAX_KEY_SHOWN = 300

OK, RETRY, DEAD, UNEXPECTED = "ok", "retry", "dead", "unexpected"


def shown(key: str) -> str:
    """A key as one bounded log token: JSON-quoted (spaces, UTF-8, control chars safe)."""
    text = json.dumps(key, ensure_ascii=False)
    return text if len(text) <= _MAX_KEY_SHOWN else text[:_MAX_KEY_SHOWN] + '..."'


@dataclass(eq=False)
class RepoQueue:
    """One repository queue and its consumption state (connection thread only)."""

    queue: str
    repository: str
    staging: Staging | None = None
    channel: BlockingChannel | None = None
    tag: str = ""
    failures: int = 0
    retry_at: float = 0.0

    @property
    def label(self) -> str:
        """The bucket whose events this queue may carry."""
        return self.queue


@dataclass(eq=False)
class Work:
    """One delivery on its way through a worker."""

    rq: RepoQueue
    conn: pika.BlockingConnection
    channel: BlockingChannel
    generation: int
    delivery: amqp.Delivery
    targets: list[keymap.Target] = field(default_factory=list)

    @property
    def key(self) -> str:
        more = f" (+{len(self.targets) - 1} more)" if len(self.targets) > 1 else ""
        return (shown(self.targets[0].key) + more) if self.targets else "-"


class RepoConsumers:
    """The daemon: see the module docstring."""

    def __init__(self, cfg: Config, status: StatusDocument, rgw: RGW | None = None,
                 mgmt: ManagementAPI | None = None) -> None:
        self.cfg = cfg
        self.status = status
        downloads = max(1, cfg.consumers.downloads)
        self.rgw = rgw or RGW(cfg.s3, cfg.rgw, max_pool_connections=max(10, downloads * 2))
        self.mgmt = mgmt or ManagementAPI(cfg.amqp)
        self.prefetch = 2 * downloads
        self.dispatcher = Dispatcher(downloads, self._work, name="download")
        self.consumer = amqp.ReconnectingConsumer(
            cfg.amqp, NAME, self._session, tick=self._tick, on_state=self._on_state,
            tick_interval=0.2)
        # Connection-thread state.
        self._conn: pika.BlockingConnection | None = None
        self._generation = 0
        self._pub: BlockingChannel | None = None
        self._queues: dict[str, RepoQueue] = {}
        self._stagings: dict[str, Staging] = {}
        self._announced: dict[str, tuple[str, float]] = {}
        self._draining_since = 0.0
        # Shared between threads.
        self._lock = threading.Lock()
        self._listing: tuple[float, dict[str, str]] | None = None
        self._snapshot: tuple[RepoQueue, ...] = ()
        self._unsettled = 0
        self._drain = threading.Event()
        self._refresh_now = threading.Event()
        self._hk_stop = threading.Event()
        self._hk: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

    def request_stop(self) -> None:
        """Drain and stop (safe from a signal handler: only sets flags)."""
        self._drain.set()
        conn = self.consumer.connection
        if conn is None or not conn.is_open:
            self.consumer.stop()  # nothing to settle on: stop at once

    def run(self) -> None:
        """Serve until :meth:`request_stop`; returns after a clean shutdown."""
        self.status.set(healthy=True)
        self.status.flush(force=True)
        self.dispatcher.start()
        self._hk = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        self._hk.start()
        try:
            self.consumer.run()
        finally:
            self.dispatcher.close(timeout=0)
            self._hk_stop.set()
            self._hk.join(timeout=15)
            self.status.set(healthy=False, broker_connected=False)
            self.status.flush(force=True)
            log.info("%s stopped", NAME)

    def _on_state(self, up: bool) -> None:
        self.status.set(broker_connected=up)
        if not up and self._drain.is_set():
            self.consumer.stop()  # draining and the broker is gone: nothing left to ack

    # ------------------------------------------------------------------ session

    def _session(self, conn: pika.BlockingConnection) -> None:
        """(Re)connect: declare, subscribe to announcements, list and consume queues."""
        a = self.cfg.amqp
        self._generation += 1
        gen = self._generation
        self._conn = conn
        for rq in self._queues.values():
            rq.channel, rq.tag, rq.failures, rq.retry_at = None, "", 0, 0.0
        # Jobs of the old connection that did not start: the broker delivers them again.
        self.dispatcher.drop(lambda w: w.generation != gen)
        pub = conn.channel()
        pub.confirm_delivery()
        amqp.declare_common(pub, a)
        self._pub = pub
        ctl = conn.channel()
        control_queue = ctl.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ctl.queue_bind(control_queue, a.control_exchange, routing_key="repository.#")
        ctl.basic_consume(control_queue, self._on_control, auto_ack=True)
        if self._drain.is_set():
            return
        started = time.time()
        try:
            self._apply_listing(started, self.mgmt.queues_bound_to(a.notification_exchange))
        except Exception as exc:
            log.warning("listing the queues bound to %s failed: %s; consuming the known "
                        "ones, retrying soon", a.notification_exchange, exc)
            self._refresh_now.set()
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

    def _staging_for(self, repository: str) -> Staging:
        """The repository's staging, created and swept once per process."""
        st = self._stagings.get(repository)
        if st is None:
            st = Staging(self.cfg.cvmfs.staging_dir, repository).ensure()
            removed = st.sweep()
            if removed:
                log.info("repository=%s outcome=swept leftovers=%d (an earlier crash)",
                         repository, removed)
            self._stagings[repository] = st
        return st

    def _want(self, queue: str, repository: str) -> None:
        if queue in self._queues:
            return
        self._queues[queue] = RepoQueue(queue, repository)
        self.status.repo(repository)
        self._publish_snapshot()

    def _unwant(self, queue: str, why: str) -> None:
        rq = self._queues.pop(queue, None)
        if rq is None:
            return
        ch, rq.channel = rq.channel, None
        if ch is not None and ch.is_open:
            try:
                ch.close()
            except pika.exceptions.AMQPChannelError as exc:
                log.debug("closing channel of %s: %s", queue, exc)
        self.dispatcher.drop(lambda w: w.rq is rq)
        self._stagings.pop(rq.repository, None)
        with self._lock:  # with the snapshot, so housekeeping cannot add it back
            self.status.drop_repo(rq.repository)
            self._snapshot = tuple(self._queues.values())
        log.info("repository=%s queue=%s outcome=dropped reason=%s", rq.repository, queue, why)

    def _publish_snapshot(self) -> None:
        with self._lock:
            self._snapshot = tuple(self._queues.values())

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
        a = self.cfg.amqp
        gen = self._generation
        ch: BlockingChannel | None = None
        try:
            rq.staging = rq.staging or self._staging_for(rq.repository)
            ch = self._conn.channel()
            amqp.declare_retry_queues(ch, a, rq.queue)
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
        rq.channel, rq.failures = ch, 0
        log.info("repository=%s queue=%s outcome=consuming prefetch=%d", rq.repository,
                 rq.queue, self.prefetch)

    def _on_cancelled(self, rq: RepoQueue, frame: Any) -> None:
        """The broker cancelled our consumer (queue deleted): re-check soon."""
        log.warning("repository=%s queue=%s outcome=cancelled-by-broker", rq.repository, rq.queue)
        ch, rq.channel = rq.channel, None
        rq.failures += 1
        rq.retry_at = time.monotonic() + min(RESUBSCRIBE_MAX, 2.0 ** rq.failures)
        if ch is not None and ch.is_open and self._conn is not None:
            self._conn.add_callback_threadsafe(functools.partial(_close_quietly, ch))
        self._refresh_now.set()

    def _on_control(self, ch: BlockingChannel, method: Basic.Deliver,
                    props: BasicProperties, body: bytes) -> None:
        try:
            doc = parse_announcement(body)
        except BadMessage as exc:
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
        else:
            self._unwant(queue, "announced deleted")

    # ------------------------------------------------------------------ deliveries

    def _targets(self, rq: RepoQueue, d: amqp.Delivery) -> list[keymap.Target]:
        """Validate a message: parse, check the bucket, map every key (Permanent if bad)."""
        try:
            events = parse_message(d.body)
        except BadEvent as exc:
            raise Permanent(f"bad event message: {exc}", rq.repository) from None
        s3c, cv = self.cfg.s3, self.cfg.cvmfs
        out: dict[str, keymap.Target] = {}
        for ev in events:
            if ev.bucket != rq.label:
                raise Permanent(f"foreign bucket: event for bucket {ev.bucket!r} on the queue "
                                f"of bucket {rq.label!r} (key {shown(ev.key)})", rq.repository)
        for ev in events:
            try:
                target = keymap.map_key(ev.key, s3c.prefix, cv.tarball_dir, s3c.decode_keys)
            except keymap.UnsafeKey as exc:
                exc.repository = rq.repository
                raise
            if target is None:
                log.debug("repository=%s key=%s outcome=ignored reason=outside %s or a "
                          "directory marker", rq.repository, shown(ev.key), s3c.prefix)
                continue
            out[target.path] = target  # several records for one path: one fetch
        return list(out.values())

    def _on_message(self, rq: RepoQueue, gen: int, ch: BlockingChannel,
                    method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        d = amqp.delivery_from(rq.queue, method, props, body)
        if self._drain.is_set():
            return  # left unacked: back to the queue when the connection closes
        self.status.repo(rq.repository, last_event=time.time())
        assert self._conn is not None
        work = Work(rq, self._conn, ch, gen, d)
        try:
            work.targets = self._targets(rq, d)
        except Permanent as exc:
            self._settle(work, DEAD, str(exc), _first_key(body))
            return
        except Exception as exc:  # a bug or a configuration error: retried, bounded
            log.exception("repository=%s outcome=error while validating a message", rq.repository)
            self._settle(work, UNEXPECTED, f"{type(exc).__name__}: {exc}", _first_key(body))
            return
        if not work.targets:
            ch.basic_ack(method.delivery_tag)
            return
        self.dispatcher.submit(rq.repository, [t.path for t in work.targets], work)

    def _work(self, job: Job) -> None:
        """Worker thread: fetch every target into staging, then settle on the connection."""
        w: Work = job.item
        rq = w.rq
        outcome, reason, key = OK, "", w.key
        assert rq.staging is not None
        for target in w.targets:
            t0 = time.monotonic()
            try:
                got = fetch.fetch_key(self.rgw, rq.staging, rq.label, target, rq.repository)
            except Permanent as exc:
                outcome, reason, key = DEAD, str(exc), shown(target.key)
                break
            except Transient as exc:
                outcome, reason, key = RETRY, str(exc), shown(target.key)
                break
            except Exception as exc:
                log.exception("repository=%s key=%s outcome=error", rq.repository,
                              shown(target.key))
                outcome, reason, key = UNEXPECTED, f"{type(exc).__name__}: {exc}", \
                    shown(target.key)
                break
            e = got.entry
            log.info("repository=%s key=%s outcome=staged op=%s path=%s mode=%s size=%d "
                     "source=%s took=%.3fs%s", rq.repository, shown(target.key), e.op,
                     shown(e.path), f"{e.mode:o}" if e.op in ("put", "symlink") else "-",
                     e.size, got.source, time.monotonic() - t0,
                     f" note={shown(got.note)}" if got.note else "")
        with self._lock:
            self._unsettled += 1
        try:
            w.conn.add_callback_threadsafe(
                functools.partial(self._settle_callback, w, outcome, reason, key))
        except Exception as exc:  # connection gone: the broker redelivers the message
            with self._lock:
                self._unsettled -= 1
            log.info("repository=%s key=%s outcome=%s-unacked reason=connection closed (%s); "
                     "the broker delivers it again", rq.repository, key, outcome,
                     type(exc).__name__)

    def _settle_callback(self, w: Work, outcome: str, reason: str, key: str) -> None:
        try:
            self._settle(w, outcome, reason, key)
        finally:
            with self._lock:
                self._unsettled -= 1

    def _settle(self, w: Work, outcome: str, reason: str, key: str) -> None:
        """Connection thread: ack, retry or dead-letter ``w`` (see the module docstring)."""
        rq, d, ch = w.rq, w.delivery, w.channel
        tag = d.method.delivery_tag
        if (w.generation != self._generation or rq.channel is not ch or not ch.is_open
                or self._queues.get(rq.queue) is not rq):
            log.info("repository=%s key=%s outcome=%s-unacked reason=channel closed; the broker "
                     "delivers it again", rq.repository, key, outcome)
            return
        a = self.cfg.amqp
        try:
            if outcome == OK:
                ch.basic_ack(tag)
                return
            self.status.incr(rq.repository, "errors")
            self.status.repo(rq.repository, last_error=reason[:300])
            attempt = d.attempts + 1
            if outcome == UNEXPECTED and attempt >= self.cfg.consumers.max_attempts:
                outcome, reason = DEAD, f"gave up after {attempt} attempts: {reason}"
            if outcome == DEAD:
                assert self._pub is not None
                amqp.dead_letter(self._pub, a, d, reason, rq.repository, NAME)
                ch.basic_ack(tag)
                self.status.incr(rq.repository, "dead_lettered")
                log.error("repository=%s key=%s outcome=dead-lettered reason=%s", rq.repository,
                          key, reason)
                return
            assert self._pub is not None
            delay = amqp.retry_later(self._pub, a, d, reason)
            ch.basic_ack(tag)
            log.warning("repository=%s key=%s outcome=retry in=%ds attempt=%d reason=%s",
                        rq.repository, key, delay, attempt, reason)
        except pika.exceptions.AMQPChannelError as exc:
            self._settle_failed(w, key, outcome, exc)

    def _settle_failed(self, w: Work, key: str, outcome: str, exc: Exception) -> None:
        """The copy or the ack failed on a channel: give the message back to the broker."""
        log.warning("repository=%s key=%s outcome=%s-failed reason=%s: %s; returned to the "
                    "queue", w.rq.repository, key, outcome, type(exc).__name__, exc)
        if self._pub is None or not self._pub.is_open:
            assert self._conn is not None
            self._pub = self._conn.channel()
            self._pub.confirm_delivery()
        if w.channel.is_open:
            try:
                w.channel.basic_nack(w.delivery.method.delivery_tag, requeue=True)
            except pika.exceptions.AMQPChannelError:
                pass  # the channel closed: the broker requeues it anyway

    # ------------------------------------------------------------------ timers

    def _tick(self) -> None:
        """Connection thread, every 0.2 s: listings, re-subscriptions, draining."""
        with self._lock:
            listing, self._listing = self._listing, None
        if listing is not None and not self._drain.is_set():
            self._apply_listing(*listing)
        if self._drain.is_set():
            self._drain_step()
            return
        horizon = time.time() - 2 * max(1.0, self.cfg.consumers.refresh_interval)
        for queue in [q for q, (_, t) in self._announced.items() if t < horizon]:
            del self._announced[queue]
        self._sync_consumers()

    def _drain_step(self) -> None:
        if not self._draining_since:
            self._draining_since = time.monotonic()
            log.info("%s stopping: finishing running downloads (at most %.0fs)", NAME,
                     DRAIN_SECONDS)
            for rq in self._queues.values():
                if rq.channel is not None and rq.channel.is_open and rq.tag:
                    try:
                        rq.channel.basic_cancel(rq.tag)
                    except pika.exceptions.AMQPChannelError as exc:
                        log.debug("cancel %s: %s", rq.queue, exc)
            withdrawn = self.dispatcher.drop(lambda w: True)
            self.dispatcher.close(timeout=0)
            if withdrawn:
                log.info("%d messages not started go back to their queues", len(withdrawn))
        with self._lock:
            unsettled = self._unsettled
        idle = self.dispatcher.running() == 0 and unsettled == 0
        if idle or time.monotonic() - self._draining_since > DRAIN_SECONDS:
            if not idle:
                log.warning("%s stopping with downloads still running: their messages go "
                            "back to the queue", NAME)
            self.consumer.stop()

    def _housekeeping(self) -> None:
        """Listing every refresh_interval (or on demand), queue depths, pending counts, status.

        A stale status document is how the container health check sees a stuck
        daemon, so one failed round is logged and the next one tried.
        """
        next_listing = time.monotonic() + self.cfg.consumers.refresh_interval
        interval = max(0.1, min(1.0, self.cfg.status.interval))
        while not self._hk_stop.wait(interval):
            try:
                next_listing = self._housekeeping_round(next_listing)
            except Exception:
                log.exception("housekeeping round failed; retrying")

    def _housekeeping_round(self, next_listing: float) -> float:
        """One round of :meth:`_housekeeping`; returns when the next listing is due."""
        a, c = self.cfg.amqp, self.cfg.consumers
        now = time.monotonic()
        if self._refresh_now.is_set() or now >= next_listing:
            self._refresh_now.clear()
            started = time.time()
            try:
                bound = self.mgmt.queues_bound_to(a.notification_exchange)
            except Exception as exc:
                log.warning("listing the queues bound to %s failed: %s",
                            a.notification_exchange, exc)
                next_listing = now + min(c.refresh_interval, 5.0)
            else:
                with self._lock:
                    self._listing = (started, bound)
                next_listing = now + c.refresh_interval
                self._queue_depths()
        counts = {}
        for rq in self._snapshot:
            if rq.staging is not None:
                try:
                    counts[rq] = rq.staging.pending_count()
                except OSError:
                    pass
        self._report(counts, "pending")
        try:
            self.status.flush()
        except OSError as exc:
            log.warning("cannot write the status document: %s", exc)
        return next_listing

    def _queue_depths(self) -> None:
        depths = {}
        for rq in self._snapshot:
            try:
                depths[rq] = self.mgmt.queue_depth(rq.queue)
            except Exception as exc:
                log.debug("queue depth of %s: %s", rq.queue, exc)
                break
        self._report(depths, "queue_depth")

    def _report(self, values: dict[RepoQueue, int], field_name: str) -> None:
        """Set a per-repository field, only for repositories still served."""
        with self._lock:
            live = set(self._snapshot)
            for rq, value in values.items():
                if rq in live:
                    self.status.repo(rq.repository, **{field_name: value})


def _close_quietly(ch: BlockingChannel) -> None:
    """Close a channel that may already be closing (never a reason to reconnect)."""
    if ch.is_open:
        try:
            ch.close()
        except pika.exceptions.AMQPChannelError as exc:
            log.debug("closing a cancelled channel: %s", exc)


def _first_key(body: bytes) -> str:
    """The first record's key for a log line about a message that may be garbage."""
    try:
        doc = json.loads(body)
        return shown(str(doc["Records"][0]["s3"]["object"]["key"]))
    except Exception:
        return "-"


def main(argv: Sequence[str] | None = None) -> int:
    rt = runtime.start(NAME, "Stage S3 bucket events of every repository under "
                       "the staging directory", argv)
    daemon = RepoConsumers(rt.cfg, rt.status)
    daemon.install_signal_handlers()
    daemon.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
