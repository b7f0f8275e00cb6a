"""The sync daemon's side of the receipt: what was published, refused, or failed.

:class:`PublishRecorder` is the :class:`~cvmfs_publisher.publishing.batch.PublishObserver`
of the batch publisher and is told by the scheduler
(:mod:`cvmfs_publisher.publishing.scheduler`) when a repository's publish
fails or works again. It reads the published revision through the publish
backend (:meth:`~cvmfs_publisher.publishing.backend.PublishBackend.revision`)
right after each publish, and writes the repository's
:class:`~cvmfs_publisher.staging.receipts.SyncRecord` in staging, which
cvmfs-repo-consumers turns into the bucket's receipt. This daemon itself
never talks to S3 (docs/ARCHITECTURE.md, "The receipt").

A receipt is feedback, never a reason to fail a publish: a state file that
cannot be written is logged (once per repository and streak) and the
publish goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..core.config import Config
from ..staging.area import Entry
from ..staging.receipts import SyncRecord
from .backend import PublishBackend

log = logging.getLogger(__name__)


class PublishRecorder:
    """Feeds the receipt state of every repository this daemon publishes."""

    def __init__(self, cfg: Config, backend: PublishBackend) -> None:
        self.backend = backend
        self.record = SyncRecord(cfg.cvmfs.staging_dir, cfg.receipts)
        self._broken: set[str] = set()

    def published(self, repo: str, entries: list[Entry]) -> None:
        revision = self.backend.revision(repo)
        self._safely(repo, lambda: self.record.published(repo, entries, revision))

    def skipped(self, repo: str, entry: Entry, why: str) -> None:
        self._safely(repo, lambda: self.record.rejected(repo, entry, why))

    def failed(self, repo: str, message: str) -> None:
        self._safely(repo, lambda: self.record.failed(repo, message))

    def succeeded(self, repo: str) -> None:
        self._safely(repo, lambda: self.record.succeeded(repo))

    def _safely(self, repo: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            if repo not in self._broken:
                self._broken.add(repo)
                log.warning("repository=%s step=receipt outcome=not-recorded error=%s: the "
                            "uploader's receipt misses this (publishing goes on); check "
                            "that %s is writable", repo, exc, self.record.path(repo).parent)
            return
        self._broken.discard(repo)
