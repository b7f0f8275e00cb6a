"""The stager: the consumers' side of the event source (DESIGN §2, §3).

Implements :class:`cvmfs_publisher.pipeline.source.Consumer`: it gets each
repository's deliveries from the event source, validates them on the
source's thread (:func:`cvmfs_publisher.pipeline.intake.targets`, cheap),
runs the downloads on the pool (:class:`cvmfs_publisher.pipeline.dispatch.Dispatcher`:
fair across repositories, in arrival order per path) and hands every
delivery back to the source with its verdict, decided by the one policy of
:mod:`cvmfs_publisher.core.delivery`. A change is acknowledged only once it
is durable in staging: the workers write, and the group commit
(:class:`cvmfs_publisher.staging.group_commit.GroupCommit`) makes what they
wrote durable in one round of syncs and hands the round's verdicts to the
source together (:meth:`EventSource.settle_many`: several acks per call).
Transient failures are retried **forever** (an outage must not turn
accepted changes into dead letters, DESIGN §3); a bug at most
``consumers.max_attempts`` times.

It also keeps, per repository, this host's term as the active consumer
(:class:`cvmfs_publisher.staging.fencing.Term`: stamped on every staged
entry, so that the sync daemon publishes nothing staged by a host that lost
the role) and drives the anti-entropy
(:class:`cvmfs_publisher.pipeline.anti_entropy.AntiEntropy`): a repository
is reconciled only by its active consumer, first re-checking against S3
whatever an earlier term left unpublished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import delivery
from ..core.config import Config
from ..core.delivery import Delivery, Verdict
from ..core.errors import Transient
from ..core.names import label_of
from ..core.status import StatusDocument
from ..staging import fencing
from ..staging.area import Entry, Staging
from ..staging.group_commit import GroupCommit
from . import fetch, intake, object_keys, reconcile
from .anti_entropy import AntiEntropy
from .dispatch import Dispatcher, Job
from .download_processes import DownloadProcesses, in_process
from .object_keys import Target
from .source import EventSource

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    """One message on its way through a download worker."""

    repository: str
    delivery: Delivery
    targets: list[Target]


def repository_bucket(repository: str) -> str:
    """The bucket of a repository (its label)."""
    return label_of(repository)


class Stager:
    """Stages the events an :class:`EventSource` delivers (see the module docstring)."""

    def __init__(self, cfg: Config, status: StatusDocument, s3: Any,
                 on_rejected: Callable[[str, str, str], None] | None = None) -> None:
        """``on_rejected(repository, key, reason)``: told of every dead-lettered delivery
        (the receipt lists them); called on the source's thread, must not block."""
        self.cfg = cfg
        self.on_rejected = on_rejected
        self.status = status
        self.s3 = s3
        #: the event path's fetches: in download processes, or on the download threads
        self.downloads = DownloadProcesses(cfg.s3, cfg.rgw, cfg.cvmfs.staging_dir) \
            if cfg.consumers.download_processes else None
        self._fetch = self.downloads.fetch if self.downloads is not None \
            else in_process(s3)
        self.dispatcher = Dispatcher(max(1, cfg.consumers.downloads), self._work,
                                     name="download")
        self.commits = GroupCommit(self._committed)
        self.source: EventSource | None = None
        self._lock = threading.Lock()
        self._stagings: dict[str, Staging] = {}
        self._terms: dict[str, fencing.Term] = {}
        self.anti_entropy = AntiEntropy(cfg.consumers, status, self.reconcile)

    def serve(self, source: EventSource) -> None:
        """Run the download pool, the anti-entropy and ``source`` until the source stops."""
        self.source = source
        self.commits.start()
        self.dispatcher.start()
        self.anti_entropy.start()
        try:
            source.run(self)
        finally:
            self.anti_entropy.stop()
            self.dispatcher.close(timeout=0)
            self.commits.close(timeout=10)  # what it still holds: settled, or redelivered
            if self.downloads is not None:
                self.downloads.close()
            with self._lock:
                terms = list(self._terms.values())
            for term in terms:
                term.end()

    def open(self, repository: str) -> None:
        """The repository's staging, created and swept of an earlier crash's leftovers."""
        st = Staging(self.cfg.cvmfs.staging_dir, repository).ensure()
        removed = st.sweep()
        if removed:
            log.info("repository=%s outcome=swept leftovers=%d (an earlier crash)",
                     repository, removed)
        with self._lock:
            self._stagings[repository] = st
            if repository not in self._terms:
                self._terms[repository] = fencing.Term(st)

    def close(self, repository: str) -> None:
        self.anti_entropy.deactivated(repository)
        with self._lock:  # with the pending counts, so report() cannot add it back
            self._stagings.pop(repository, None)
            term = self._terms.pop(repository, None)
            self.status.drop_repo(repository)
        if term is not None:
            term.end()

    def active(self, repository: str, active: bool, reason: str) -> None:
        """Source's thread: begin or end this host's term; reconcile when it begins."""
        with self._lock:
            term = self._terms.get(repository)
        if term is None:
            return
        if not active:
            term.end()
            self.anti_entropy.deactivated(repository)
            return
        try:
            term.begin()
        except (fencing.FencingError, OSError) as exc:
            log.error("repository=%s step=fence outcome=cannot-take-term reason=%s; nothing "
                      "staged here is published until it is fixed", repository, exc)
            self.status.repo(repository, last_error=str(exc)[:300])
            return
        self.anti_entropy.activated(repository, reason)

    def created(self, repository: str) -> None:
        self.anti_entropy.created(repository)

    def reconcile(self, repository: str, reason: str) -> reconcile.Plan:
        """Anti-entropy worker: re-check an earlier term's leftovers, then reconcile."""
        with self._lock:
            staging = self._stagings.get(repository)
            term = self._terms.get(repository)
        if staging is None or term is None or not term.active:
            raise LookupError(f"{repository}: this host is not its active consumer any more")
        self._recheck(repository, staging)
        c = self.cfg.consumers
        return reconcile.reconcile(self.cfg, repository, s3=self.s3, staging=staging,
                                   grace=c.reconcile_grace, workers=max(1, c.downloads),
                                   cancel=self.anti_entropy.cancel)

    def _recheck(self, repository: str, staging: Staging) -> None:
        """Stage again, from what S3 holds now, every entry an ended term left unpublished."""
        leftovers = fencing.to_check(staging)
        for entry in leftovers:
            if self.anti_entropy.cancel.is_set():
                return  # stopping: the next term checks the rest
            target = None
            if entry.key:
                try:
                    target = object_keys.map_key(entry.key, self.cfg.s3.prefix,
                                                 self.cfg.cvmfs.tarball_dir)
                except object_keys.UnsafeKey:
                    target = None
            if target is not None and target.path == entry.path:
                got = fetch.fetch_key(self.s3, staging, repository_bucket(repository),
                                      target, repository)
                log.info("repository=%s key=%s step=fence outcome=rechecked op=%s "
                         "was=%s", repository, intake.shown(entry.key), got.entry.op, entry.op)
            fencing.checked(staging, entry)

    def deliver(self, repository: str, d: Delivery) -> None:
        """Source's thread: validate (cheap), then queue the downloads."""
        self.status.repo(repository, last_event=time.time())
        try:  # the source is the bucket's queue, named after its label
            found = intake.targets(d.body, d.source, repository, self.cfg)
        except Exception as exc:
            self._settle(d, exc, repository, intake.first_key(d.body))
            return
        if not found:
            self._source().settle(d, delivery.ok(repository))
            return
        self.dispatcher.submit(repository, [t.path for t in found], Work(repository, d, found))

    def served(self) -> list[str]:
        """The repositories opened and not closed (any thread)."""
        with self._lock:
            return list(self._stagings)

    def withdraw(self, which: Callable[[Delivery], bool]) -> int:
        return len(self.dispatcher.drop(lambda w: which(w.delivery)))

    def busy(self) -> bool:
        return self.dispatcher.running() > 0 or self.commits.pending() > 0

    def settled(self, verdict: Verdict) -> None:
        if verdict.action == delivery.ACK:
            return
        self.status.incr(verdict.repository, "errors")
        self.status.repo(verdict.repository, last_error=verdict.reason[:300])
        if verdict.action == delivery.DEAD:
            self.status.incr(verdict.repository, "dead_lettered")
            if self.on_rejected is not None and verdict.repository:
                self.on_rejected(verdict.repository, verdict.key, verdict.reason)

    def _work(self, job: Job) -> None:
        """Download worker: stage every target, then hand the verdict to the source."""
        w: Work = job.item
        with self._lock:
            staging = self._stagings.get(w.repository)
        if staging is None:  # dropped meanwhile: the message is no longer ours
            return
        entries: list[Entry] = []
        try:
            intake.stage(self._fetch, staging, w.delivery.source, w.targets, w.repository,
                         defer=entries)
        except intake.StageFailed as failed:
            if isinstance(failed.error, Transient):
                self.anti_entropy.s3_failed()
            self._settle(w.delivery, failed.error, w.repository, failed.key)
            return
        self.anti_entropy.s3_ok()
        self.commits.submit(staging, entries, w)  # settled once durable (_committed)

    def _committed(self, results: list[tuple[Any, BaseException | None]]) -> None:
        """Commit thread: a round is durable (or failed); its verdicts go out together."""
        verdicts = []
        for w, error in results:
            key = intake.describe(w.targets)
            verdicts.append((w.delivery, delivery.ok(w.repository, key) if error is None
                             else self._verdict(w.delivery, error, w.repository, key)))
        self._source().settle_many(verdicts)

    def _verdict(self, d: Delivery, exc: BaseException, repository: str, key: str) -> Verdict:
        return delivery.verdict_for(exc, d.attempts, self.cfg.consumers.max_attempts,
                                    retry_transient_forever=True, repository=repository,
                                    key=key)

    def _settle(self, d: Delivery, exc: BaseException, repository: str, key: str) -> None:
        self._source().settle(d, self._verdict(d, exc, repository, key))

    def _source(self) -> EventSource:
        assert self.source is not None, "serve() first"
        return self.source

    def report(self) -> None:
        """Pending counts into the status document (for repositories still served)."""
        with self._lock:
            stagings = dict(self._stagings)
        counts = {}
        for repository, st in stagings.items():
            try:
                counts[repository] = st.pending_count()
            except OSError:
                pass
        with self._lock:
            for repository, n in counts.items():
                if self._stagings.get(repository) is stagings[repository]:
                    self.status.repo(repository, pending=n)
