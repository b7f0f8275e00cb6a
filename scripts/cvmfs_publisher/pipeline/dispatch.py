"""Dispatch: a bounded pool of workers shared fairly by many repositories.

cvmfs-repo-consumers serves every repository from one process with a fixed
number of concurrent downloads (``consumers.downloads``). Three rules decide
which waiting job a free worker takes:

1. **Per path, arrival order.** A job names the repository paths it touches.
   It may start only when no earlier job of its repository that touches one
   of those paths is still waiting or running. Two fetches of one path never
   overlap, so an older GET can never overwrite the staged result of a newer
   one (:mod:`cvmfs_publisher.pipeline.fetch` brings a path to what S3 holds *now*;
   that is only order-proof if fetches of one path do not race).
2. **Fair across repositories.** Repositories are served round-robin, one
   job at a time: a repository with 10,000 waiting events does not delay
   another's single event by more than one job.
3. **One slow repository never delays the others.** Round-robin alone cannot
   help when every worker is busy with one repository's large (or hanging)
   downloads. So besides the ``workers`` regular workers, which any
   repository may use up to ``per_repository`` at once (default: all of
   them, so that a single busy repository gets the full concurrency), the
   pool keeps ``reserve`` workers (default 1) that only take a job of a
   repository with *nothing running*: the first event of a quiet repository
   starts at once whatever the others are doing. At most ``workers +
   reserve`` jobs run at the same time.

Jobs are plain objects; the pool calls ``run(job)`` on a worker thread and
never looks inside. Waiting jobs can be withdrawn (``drop``) when their
AMQP channel is gone: the broker delivers them again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One unit of work: ``item`` touches ``paths`` of ``repository``."""

    repository: str
    paths: frozenset[Hashable]
    item: Any
    started: bool = False


@dataclass
class _Repo:
    waiting: deque[Job] = field(default_factory=deque)
    running_paths: dict[Hashable, int] = field(default_factory=dict)
    running: int = 0


class Dispatcher:
    """Fixed worker threads applying the rules of the module docstring."""

    def __init__(self, workers: int, run: Callable[[Job], None],
                 per_repository: int | None = None, reserve: int = 1,
                 name: str = "dispatch") -> None:
        if workers < 1 or reserve < 0:
            raise ValueError("workers must be >= 1 and reserve >= 0")
        self.workers = workers
        self.reserve = reserve
        self.per_repository = per_repository or workers
        self._run = run
        self._name = name
        self._cond = threading.Condition()
        self._repos: dict[str, _Repo] = {}
        self._order: deque[str] = deque()  # round-robin over repositories with waiting jobs
        self._running = 0
        self._closed = False
        self._threads: list[threading.Thread] = []

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> Dispatcher:
        for i in range(self.workers + self.reserve):
            express = i >= self.workers
            t = threading.Thread(target=self._worker, args=(express,), daemon=True,
                                 name=f"{self._name}-{'reserve-' if express else ''}{i}")
            t.start()
            self._threads.append(t)
        return self

    def close(self, timeout: float | None = None) -> bool:
        """Start nothing more; wait up to ``timeout`` for running jobs. True if idle."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return self.wait_idle(timeout)

    # -- submitting and withdrawing -------------------------------------------------------

    def submit(self, repository: str, paths: Iterable[Hashable], item: Any) -> Job:
        job = Job(repository, frozenset(paths), item)
        with self._cond:
            repo = self._repos.setdefault(repository, _Repo())
            if not repo.waiting and repository not in self._order:
                self._order.append(repository)
            repo.waiting.append(job)
            self._cond.notify()
        return job

    def drop(self, predicate: Callable[[Any], bool]) -> list[Any]:
        """Withdraw the waiting (not started) jobs whose item matches; returns the items."""
        dropped: list[Any] = []
        with self._cond:
            for name, repo in list(self._repos.items()):
                keep: deque[Job] = deque()
                for job in repo.waiting:
                    if predicate(job.item):
                        dropped.append(job.item)
                    else:
                        keep.append(job)
                repo.waiting = keep
                self._forget_if_idle(name, repo)
            # Paths freed by withdrawn jobs may unblock later ones.
            self._cond.notify_all()
        return dropped

    # -- introspection ----------------------------------------------------------------

    def waiting(self) -> int:
        with self._cond:
            return sum(len(r.waiting) for r in self._repos.values())

    def running(self) -> int:
        with self._cond:
            return self._running

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs (waiting ones are ignored once closed)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._running == 0 and (self._closed or not any(
                    r.waiting for r in self._repos.values())), timeout)

    # -- the workers ------------------------------------------------------------------

    def _forget_if_idle(self, name: str, repo: _Repo) -> None:
        if not repo.waiting:
            try:
                self._order.remove(name)
            except ValueError:
                pass
            if not repo.running:
                self._repos.pop(name, None)

    def _pick(self, express: bool = False) -> Job | None:
        """The next runnable job, round-robin over repositories (lock held).

        ``express`` (a reserve worker): only repositories with nothing running.
        """
        for _ in range(len(self._order)):
            name = self._order[0]
            self._order.rotate(-1)
            repo = self._repos[name]
            if repo.running >= (1 if express else self.per_repository):
                continue
            blocked: set[Hashable] = set()
            for index, job in enumerate(repo.waiting):
                if job.paths.isdisjoint(repo.running_paths) and job.paths.isdisjoint(blocked):
                    del repo.waiting[index]
                    job.started = True
                    repo.running += 1
                    for p in job.paths:
                        repo.running_paths[p] = repo.running_paths.get(p, 0) + 1
                    self._running += 1
                    self._forget_if_idle(name, repo)
                    return job
                blocked.update(job.paths)
        return None

    def _finish(self, job: Job) -> None:
        with self._cond:
            repo = self._repos.setdefault(job.repository, _Repo())
            repo.running -= 1
            for p in job.paths:
                left = repo.running_paths.get(p, 0) - 1
                if left > 0:
                    repo.running_paths[p] = left
                else:
                    repo.running_paths.pop(p, None)
            self._running -= 1
            if repo.waiting and job.repository not in self._order:
                self._order.append(job.repository)
            self._forget_if_idle(job.repository, repo)
            self._cond.notify_all()

    def _worker(self, express: bool) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed:
                    job = self._pick(express)
                    if job is not None:
                        break
                    self._cond.wait()
                if job is None:
                    return
            try:
                self._run(job)
            except Exception:  # run() must settle its own failures; never lose a worker
                log.exception("dispatch: job of repository=%s raised", job.repository)
            finally:
                self._finish(job)
