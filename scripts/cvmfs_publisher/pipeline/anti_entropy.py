"""Anti-entropy: the consumers reconcile their repositories with their buckets by themselves.

DESIGN §3, Self-healing. RGW's notifications are at-least-once at best: a
new topic delivers its first event about 30 s late, objects uploaded before
a bucket's notification existed raise no event, a crashed radosgw holds its
persistent queue for about 90 s and may lose what it held. So every
repository this process is the *active consumer* of (the one host that
stages and publishes it, :meth:`cvmfs_publisher.pipeline.source.Consumer.active`)
is reconciled (:func:`cvmfs_publisher.pipeline.reconcile.reconcile`, a
listing compared with the manifest):

- when this process becomes its active consumer (start-up, failover, and
  after a broker reconnection, which makes a new subscription);
- ``consumers.reconcile_after_created`` seconds after it was announced
  created (past the new topic's warm-up, so that what was uploaded before
  the notification existed, or in the warm-up, is healed);
- after S3 comes back from an outage (a download failed as transient, then
  one succeeded);
- every ``consumers.reconcile_interval`` seconds, spread by
  ``consumers.reconcile_jitter``;
- again after ``consumers.reconcile_grace`` when it left recent objects to
  their events, or with backoff when it failed.

At most ``consumers.reconcile_parallel`` run at once; requests for one
repository coalesce (the earliest due one wins). What each run found goes
into the status document (``last_reconcile``, ``reconcile_seconds``,
``reconcile_healed``: the differences it staged, i.e. events that were
lost; ``healed_total``; ``reconcile_error``) and one log line.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core.config import ConsumersConfig
from ..core.errors import Transient
from ..core.status import StatusDocument
from .reconcile import ManifestPending

log = logging.getLogger(__name__)

#: Retry of a failed reconcile: first delay and cap (seconds).
RETRY_FIRST, RETRY_MAX = 15.0, 300.0


class AntiEntropy:
    """Schedules and runs the reconciles (see the module docstring).

    ``run(repository, reason)`` does one reconcile and returns its plan
    (:class:`cvmfs_publisher.pipeline.reconcile.Plan`); it raises when the
    reconcile could not run.
    """

    def __init__(self, cfg: ConsumersConfig, status: StatusDocument,
                 run: Callable[[str, str], Any]) -> None:
        self.cfg = cfg
        self.status = status
        self._run = run
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, tuple[float, str]] = {}  # repository -> (due, reason)
        self._active: set[str] = set()
        self._running: set[str] = set()
        self._failures: dict[str, int] = {}
        self._seq = 0
        self._stop = False
        #: set by :meth:`stop`: running reconciles stage nothing more (``run`` reads it)
        self.cancel = threading.Event()
        self._s3_down = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.reconcile_parallel),
                                        thread_name_prefix="reconcile")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="anti-entropy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; running reconciles finish the downloads they started."""
        self.cancel.set()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ triggers

    def activated(self, repository: str, reason: str) -> None:
        """This process became the active consumer: reconcile now."""
        with self._cond:
            self._active.add(repository)
        self.request(repository, reason)

    def deactivated(self, repository: str) -> None:
        """Another host may be active now: no reconcile of it from here."""
        with self._cond:
            self._active.discard(repository)
            self._due.pop(repository, None)

    def created(self, repository: str) -> None:
        """Announced created: reconcile once the new topic delivers (its warm-up)."""
        self.request(repository, "provisioned", self.cfg.reconcile_after_created)

    def s3_failed(self) -> None:
        """A download failed as transient (S3 unreachable or erroring)."""
        self._s3_down = True

    def s3_ok(self, done: str = "") -> None:
        """A download (or the reconcile of ``done``) succeeded: after an S3 outage,
        reconcile every active repository (but ``done``, which just was)."""
        if not self._s3_down:
            return
        self._s3_down = False
        with self._cond:
            active = sorted(self._active - {done})
        for repository in active:
            self.request(repository, "S3 back after an outage")

    def request(self, repository: str, reason: str, delay: float = 0.0) -> None:
        """Reconcile ``repository`` in ``delay`` seconds (an earlier request wins)."""
        due = time.monotonic() + max(0.0, delay)
        with self._cond:
            old = self._due.get(repository)
            if old is not None and old[0] <= due:
                return
            self._due[repository] = (due, reason)
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, repository))
            self._cond.notify_all()

    def pending(self) -> dict[str, tuple[float, str]]:
        """Scheduled reconciles: repository -> (seconds from now, reason) (for tests)."""
        now = time.monotonic()
        with self._cond:
            return {r: (d - now, why) for r, (d, why) in self._due.items()}

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                ready = self._pop_ready(now)
                if ready is None:
                    timeout = (self._heap[0][0] - now) if self._heap else None
                    self._cond.wait(timeout=None if timeout is None else max(0.05, timeout))
                    continue
                repository, reason = ready
                self._running.add(repository)
                self._pool.submit(self._one, repository, reason)

    def _pop_ready(self, now: float) -> tuple[str, str] | None:
        """The next due request that may run now (cond held)."""
        if len(self._running) >= max(1, self.cfg.reconcile_parallel):
            return None
        deferred = []
        found = None
        while self._heap and self._heap[0][0] <= now:
            due, seq, repository = heapq.heappop(self._heap)
            current = self._due.get(repository)
            if current is None or current[0] != due:
                continue  # superseded or cancelled
            if repository in self._running:
                deferred.append((due, seq, repository))  # after the running one
                continue
            del self._due[repository]
            if repository not in self._active:
                continue  # another host reconciles it
            found = (repository, current[1])
            break
        for item in deferred:
            heapq.heappush(self._heap, item)
        return found

    def _one(self, repository: str, reason: str) -> None:
        t0 = time.monotonic()
        try:
            plan = self._run(repository, reason)
        except Exception as exc:
            self._failed(repository, reason, exc, time.monotonic() - t0)
        else:
            self._done(repository, reason, plan)
        finally:
            with self._cond:
                self._running.discard(repository)
                self._cond.notify_all()

    def _done(self, repository: str, reason: str, plan: Any) -> None:
        self._failures.pop(repository, None)
        self.s3_ok(done=repository)
        healed = int(plan.staged)
        self.status.repo(repository, last_reconcile=time.time(),
                         reconcile_seconds=round(plan.seconds, 3), reconcile_healed=healed,
                         reconcile_mode=plan.mode, reconcile_reason=reason,
                         reconcile_error="; ".join(f"{p}: {why}" for p, why in
                                                   plan.failed[:3])[:300])
        if healed:
            self.status.incr(repository, "healed_total", healed)
        log.log(logging.WARNING if healed else logging.INFO,
                "repository=%s step=anti-entropy reason=%r outcome=%s healed=%d failed=%d "
                "in_sync=%d in_flight=%d recent=%d mode=%s hashed=%d took=%.1fs%s", repository,
                reason, "healed" if healed else "in-sync", healed, len(plan.failed),
                plan.in_sync, plan.in_flight, plan.recent, plan.mode, plan.hashed,
                plan.seconds, " (events were lost: RGW did not deliver them)" if healed else "")
        if plan.failed:
            self.request(repository, "retry of failed changes", RETRY_FIRST)
        elif plan.recent:
            self.request(repository, "objects too recent last time",
                         self.cfg.reconcile_grace + 1.0)
        self._periodic(repository)

    def _failed(self, repository: str, reason: str, exc: Exception, took: float) -> None:
        if isinstance(exc, Transient) and not isinstance(exc, ManifestPending):
            # S3 unreachable or erroring (also seen with no event flowing). Not a missing
            # manifest: the next download's success would reconcile at once, fail the
            # same way and mark the "outage" again, one reconcile per event (seen in
            # bench_consumers, where no sync daemon writes the manifest).
            self.s3_failed()
        n = self._failures.get(repository, 0) + 1
        self._failures[repository] = n
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (n - 1))
        self.status.repo(repository, last_reconcile=time.time(),
                         reconcile_seconds=round(took, 3),
                         reconcile_error=f"{type(exc).__name__}: {exc}"[:300])
        log.error("repository=%s step=anti-entropy reason=%r outcome=failed retry_in=%.0fs "
                  "error=%s: %s", repository, reason, delay, type(exc).__name__,
                  str(exc)[:300])
        self.request(repository, f"retry ({reason})", delay)

    def _periodic(self, repository: str) -> None:
        interval = self.cfg.reconcile_interval
        if interval <= 0:
            return
        j = self.cfg.reconcile_jitter
        self.request(repository, "periodic", interval * random.uniform(1 - j, 1 + j))
