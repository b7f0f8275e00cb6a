"""The ``cvmfs_server`` publish backend (gateway-mode publisher, union mount).

Implements :class:`cvmfs_publisher.publishing.backend.PublishBackend` with
:class:`cvmfs_publisher.adapters.cvmfs.CvmfsServer` (the only module that
runs the tool) and :class:`cvmfs_publisher.publishing.tree.Tree` on its two
trees: the union mount ``/cvmfs/<repo>``, written inside a transaction, and
the read-only layer ``<spool>/<repo>/rdonly``, the published revision. Why
not read the union: while a transaction is open (one left by a publish still
running as an orphan, say) it shows the unpublished content, and "already
published" would drop a batch that was never published (cvmfs README §10).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from ..adapters.cvmfs import CvmfsServer, Result
from ..staging import manifest
from .tree import Tree


class CvmfsBackend:
    """``cvmfs_server`` behind the publish-backend protocol."""

    def __init__(self, server: CvmfsServer) -> None:
        self.server = server

    def exists(self, repo: str) -> bool:
        return self.server.exists(repo)

    def create_repository(self, repo: str, keys_dir: str) -> bool:
        """mkfs when absent; a leftover is the provisioner's to judge (see the adapter)."""
        return self.server.create_repository(repo, keys_dir, leftovers=False)

    def in_transaction(self, repo: str) -> bool:
        return self.server.in_transaction(repo)

    def transaction(self, repo: str) -> Result:
        return self.server.transaction(repo)

    def writer(self, repo: str) -> Tree:
        return Tree(self.server.union(repo))

    def publish(self, repo: str, nice: int = 0) -> Result:
        return self.server.publish(repo, nice=nice)

    def abort(self, repo: str) -> Result:
        return self.server.abort(repo)

    def ingest_tar(self, repo: str, base_dir: str, tar_stream: IO[bytes]) -> Result:
        return self.server.ingest_tar(repo, base_dir, tar_stream)

    def ingest_delete(self, repo: str, path: str) -> Result:
        return self.server.ingest_delete(repo, path)

    def reader(self, repo: str) -> Tree:
        return Tree(self.server.published(repo))

    def where(self, repo: str) -> Path:
        return self.server.published(repo)

    def revision(self, repo: str) -> int | None:
        """``attr -qg revision <spool>/<repo>/rdonly`` (cvmfs README), without a process."""
        return manifest.revision_of(self.server.published(repo))

    def publish_lock(self, repo: str) -> Path:
        return self.server.publish_lock(repo)

    def wait_publish_lock(self, repo: str, timeout: float) -> bool:
        return self.server.wait_publish_lock(repo, timeout=timeout)
