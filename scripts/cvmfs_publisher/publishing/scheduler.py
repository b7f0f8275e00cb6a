"""The sync daemon's scheduler: when each repository publishes (DESIGN §3).

It publishes a repository when changes are pending and either the first of
them came after ``sync.quiet_seconds`` without a publish started (leading
edge: a single upload to a quiet repository is published at once), or
nothing was staged for ``sync.quiet_seconds`` (a burst is over: one more
publish for the rest of the burst), or the oldest pending change has waited
``sync.max_delay_seconds`` (a never-ending trickle still gets published).
The work itself is :class:`cvmfs_publisher.publishing.batch.BatchPublisher`;
what it publishes, refuses or fails at goes into the uploader's receipt
through :class:`cvmfs_publisher.publishing.receipts.PublishRecorder`.

When it looks: the kernel says which staging directories changed
(:class:`cvmfs_publisher.staging.watch.PendingWatch`, inotify); a repository
with something pending, in flight or backing off is looked at every
``sync.poll_interval`` until it is idle again, and every repository once
every ``sync.scan_interval`` (a safety net: a file system without inotify
events). An idle host with 1,000 repositories costs no polling.

Repositories are independent: each publish runs in a small thread pool, one
at a time per repository, and a failing repository backs off alone (capped
exponential backoff) while the others keep publishing. At start-up every
repository is first recovered: a transaction left open by a crash is
aborted and a leftover ``batch/`` is applied again before anything new.

Why it never calls ``Staging.sweep``: it would delete the downloads in
progress of the consumers, which run at the same time in another container;
sweeping is the consumers' start-up business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..adapters.cvmfs import CvmfsServer, kill_children
from ..core import runtime
from ..core.backoff import Backoff
from ..core.config import Config
from ..core.names import InvalidName, validate_repository
from ..core.status import StatusDocument
from ..staging.area import PendingTimes, Staging, repositories
from ..staging.watch import PendingWatch, Wakeups
from .batch import BatchPublisher, Outcome
from .cvmfs_backend import CvmfsBackend
from .errors import PublishError
from .receipts import PublishRecorder

log = logging.getLogger(__name__)

#: Publishes running at once (each is mostly waiting for cvmfs_server).
WORKERS = 4

#: Retry interval of a repository whose failure needs an operator (transaction
#: 22: expired whitelist, layout mismatch): retrying sooner cannot help.
OPERATOR_BACKOFF = 900.0


@dataclass
class RepoState:
    """The daemon's memory of one repository."""

    name: str
    backoff: Backoff
    times: PendingTimes
    recovered: bool = False
    next_attempt: float = 0.0
    future: Future | None = None
    failures: int = 0
    publishes: int = 0
    #: when the last publish that took pending changes started (leading edge)
    last_start: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class RepoSync:
    """The scheduling loop; :meth:`tick` is one poll (tests drive it with a fake clock).

    ``inline=True`` runs publishes in the calling thread (deterministic tests).
    """

    def __init__(self, cfg: Config, status: StatusDocument, server: CvmfsServer | None = None,
                 clock: Callable[[], float] = time.time, inline: bool = False,
                 workers: int = WORKERS) -> None:
        self.cfg = cfg
        self.status = status
        self.clock = clock
        self._stop = threading.Event()
        backend = CvmfsBackend(server or CvmfsServer(cfg.cvmfs))
        self.receipts = PublishRecorder(cfg, backend)  # the uploader's receipt, fed here
        self.publisher = BatchPublisher(cfg, stop=self._stop, on_problem=self._problem,
                                        backend=backend, observer=self.receipts)
        self.executor = None if inline else ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="publish")
        self.repos: dict[str, RepoState] = {}
        self._refused: set[str] = set()
        #: changes staged before the daemon started follow their windows, not the edge
        self.started = clock()
        self.watch: PendingWatch | None = None

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end after the publishes in hand (safe from a signal handler)."""
        self._stop.set()
        if self.watch is not None:
            self.watch.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        runtime.stop_on_signals(self.stop)

    def run(self) -> None:
        """Poll until :meth:`stop`; never raises for a repository's problem."""
        self.status.set(healthy=True)
        self.status.flush(force=True)
        self.watch = PendingWatch(self.cfg.cvmfs.staging_dir)
        log.info("watching %s (%s; quiet %.1fs, max delay %.1fs, scan every %.0fs)",
                 self.cfg.cvmfs.staging_dir,
                 "inotify" if self.watch.available else
                 f"no inotify: polling every {self.cfg.sync.poll_interval:.2f}s",
                 self.cfg.sync.quiet_seconds, self.cfg.sync.max_delay_seconds,
                 self.cfg.sync.scan_interval)
        wakeups = Wakeups(self.watch, self.cfg.sync.poll_interval, self.cfg.sync.scan_interval,
                          active=lambda: self.active(self.clock()), stopping=lambda: self.stopping)
        while not self._stop.is_set():
            try:
                self.tick(only=wakeups.next())
            except Exception:  # a bug must not stop every repository
                log.exception("poll failed")
            self.status.flush()
        self.watch.close()
        log.info("stopping: waiting for the publishes in hand")
        self.close()
        self.status.set(healthy=False)
        self.status.flush(force=True)
        log.info("stopped")

    def close(self) -> None:
        """Wait for the publishes in hand; those queued but not started are dropped
        (their changes stay staged for the next start)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        kill_children()  # none is left normally; a command must not outlive the daemon

    # -- scheduling --------------------------------------------------------------------

    def _state(self, repo: str) -> RepoState | None:
        state = self.repos.get(repo)
        if state is not None:
            return state
        if repo in self._refused:
            return None
        try:
            validate_repository(repo, self.cfg.cvmfs.domain)
        except InvalidName as exc:
            self._refused.add(repo)
            log.error("repository=%r step=poll error=%s outcome=ignored: staging directory "
                      "%s is not a repository's", repo, exc, self.cfg.cvmfs.staging_dir)
            return None
        st = Staging(self.cfg.cvmfs.staging_dir, repo)
        state = RepoState(repo, Backoff(self.cfg.sync.backoff_initial, self.cfg.sync.backoff_max),
                          PendingTimes(st))
        self.repos[repo] = state
        return state

    def pending(self, state: RepoState, cached: bool = True) -> int:
        """Changes not yet published: pending entries plus the batch in flight.

        ``cached``: from the poll loop's :class:`PendingTimes` (main thread
        only); a worker thread lists the directory itself.
        """
        st = Staging(self.cfg.cvmfs.staging_dir, state.name)
        if cached:
            state.times.get()
            pending = state.times.count
        else:
            pending = st.pending_count()
        return pending + st.batch_count()

    def due(self, state: RepoState, now: float) -> tuple[bool, bool, str]:
        """(publish now?, take the pending changes too?, why) for ``state``'s repository.

        The first run of a repository is its recovery (stale transaction,
        leftover batch), due at once; it takes the pending changes as well
        only when their own window says so.
        """
        st = Staging(self.cfg.cvmfs.staging_dir, state.name)
        if state.recovered and st.has_batch():
            return True, True, "leftover batch"
        timing = state.times.get()
        why = ""
        if timing is not None:
            oldest, newest = timing
            # before its first publish here, a repository counts as quiet up to the start
            last = state.last_start or self.started - self.cfg.sync.quiet_seconds
            if oldest - last >= self.cfg.sync.quiet_seconds:
                why = "leading edge"
            elif now - newest >= self.cfg.sync.quiet_seconds:
                why = "quiet"
            elif now - oldest >= self.cfg.sync.max_delay_seconds:
                why = "max delay"
        if not state.recovered:
            return True, bool(why), "start-up recovery" + (f", {why}" if why else "")
        return bool(why), True, why

    def tick(self, now: float | None = None, only: list[str] | None = None) -> list[str]:
        """One poll: start the publishes that are due; returns their repositories.

        ``only``: look at these repositories only, in this order (None: every one there is).
        """
        now = self.clock() if now is None else now
        started = []
        repos = repositories(self.cfg.cvmfs.staging_dir) if only is None else only
        for repo in repos:
            if self._stop.is_set():
                break
            state = self._state(repo)
            if state is None:
                continue
            if self.watch is not None:
                self.watch.watch(repo)  # before its directory is listed below
            with state.lock:
                busy = state.future is not None and not state.future.done()
            if busy:
                self.status.repo(repo, pending=self.pending(state))
                continue
            due, take, why = self.due(state, now)
            self.status.repo(repo, pending=self.pending(state))
            if not due and now >= state.next_attempt and self.publisher.manifest_stale(repo):
                # This host is active and its manifest is not of the published revision:
                # rebuild it now, so the consumers' reconcile can compare a listing with it.
                due, take, why = True, False, "manifest of another revision"
            if not due or now < state.next_attempt:
                continue
            started.append(repo)
            if take:
                state.last_start = now
            log.debug("repository=%s publishing (%s)", repo, why)
            if self.executor is None:
                self._job(state, now, take)
            else:
                with state.lock:
                    state.future = self.executor.submit(self._job, state, now, take)
        return started

    # -- one publish -------------------------------------------------------------------

    def _job(self, state: RepoState, now: float, take_pending: bool) -> None:
        repo = state.name
        t0 = time.monotonic()
        try:
            outcome = self.publisher.publish(repo, take_pending=take_pending)
        except PublishError as exc:
            self._failed(state, now, exc.step, exc.rc, exc.detail, exc.needs_operator)
            return
        except Exception as exc:  # a bug or an unusable staging area: back off, say why
            log.exception("repository=%s step=publish unexpected error", repo)
            self._failed(state, now, "internal", -1, f"{type(exc).__name__}: {exc}")
            return
        state.recovered = True
        if outcome is None:
            if state.failures:
                self._succeeded(state, None, time.monotonic() - t0)
            return
        self._succeeded(state, outcome, time.monotonic() - t0)

    def _succeeded(self, state: RepoState, outcome: Outcome | None, took: float) -> None:
        repo = state.name
        self.receipts.succeeded(repo)
        with state.lock:
            state.failures = 0
            state.backoff.reset()
            state.next_attempt = 0.0
        fields: dict[str, object] = {"consecutive_failures": 0, "backoff": 0.0,
                                     "last_error": "",
                                     "pending": self.pending(state, cached=False)}
        if outcome is not None:
            state.publishes += outcome.publishes
            log.info("repository=%s step=publish outcome=%s %s", repo,
                     "published" if outcome.publishes else "nothing-to-publish",
                     outcome.summary())
            fields.update(last_result="ok" if not outcome.skipped else "ok-with-skipped",
                          publishes=state.publishes)
            if outcome.publishes:
                fields.update(last_publish=time.time(), last_publish_duration=round(took, 3))
            if outcome.skipped:
                fields["last_error"] = "; ".join(outcome.errors)[:300]
                self.status.incr(repo, "errors", outcome.skipped)
        self.status.repo(repo, **fields)
        self.status.flush(force=True)

    def _failed(self, state: RepoState, now: float, step: str, rc: int, detail: str,
                needs_operator: bool = False) -> None:
        repo = state.name
        with state.lock:
            state.failures += 1
            delay = state.backoff.next()
            if needs_operator:
                delay = max(delay, OPERATOR_BACKOFF)
            # From the failure, not from the poll that started it (a publish may
            # have spent minutes retrying an abort).
            state.next_attempt = max(now, self.clock()) + delay
            failures = state.failures
        log.error("repository=%s step=%s rc=%s error=%s outcome=%sretry in %.1fs "
                  "(failure %d in a row; the batch stays staged)", repo, step, rc,
                  detail, "needs-operator, " if needs_operator else "", delay, failures)
        self.status.repo(repo, last_result="needs-operator" if needs_operator else "failed",
                         consecutive_failures=failures,
                         pending=self.pending(state, cached=False),
                         backoff=round(delay, 3),
                         last_error=f"step={step} rc={rc} {detail}"[:300])
        self.status.incr(repo, "errors")
        self.status.flush(force=True)
        self.receipts.failed(repo, f"step={step} rc={rc} {detail}")

    def active(self, now: float) -> set[str]:
        """Repositories to look at every poll: something pending, in flight or backing off."""
        out = set()
        for repo, state in self.repos.items():
            with state.lock:
                busy = state.future is not None and not state.future.done()
            if (busy or not state.recovered or state.times.count or state.failures
                    or now < state.next_attempt):
                out.add(repo)
        return out

    def _problem(self, repo: str, text: str) -> None:
        self.status.repo(repo, last_result="aborting", last_error=text[:300])
        self.status.flush(force=True)
