"""Seam 2, the publish backend: what the batch driver needs from a CernVM-FS publisher.

:class:`cvmfs_publisher.publishing.batch.BatchPublisher` sees the
repository only through :class:`PublishBackend`: create the repository, open
a transaction, write and remove paths in it (:meth:`PublishBackend.writer`),
publish or abort it, ingest a tar stream, read the published tree
(:meth:`PublishBackend.reader`) and its revision, and the state recovery
needs (is it in a transaction, is a publish still running). Today's one implementation is
:class:`cvmfs_publisher.publishing.cvmfs_backend.CvmfsBackend`
(``cvmfs_server`` on a gateway-mode publisher). Publishing through the
gateway's HTTP API (the mountless publisher of CernVM-FS 2.14) would be one
new implementation; the driver, the planner and the sync daemon would not
change.

Failures are the :class:`cvmfs_publisher.adapters.cvmfs.CvmfsError` family
(busy lease, refused transaction, not in a transaction, publish in
progress, timeout), which every backend speaks so that the driver's
recovery rules stay the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Protocol


class TreeReader(Protocol):
    """A repository tree, read without following a symlink (a context manager)."""

    def __enter__(self) -> TreeReader: ...

    def __exit__(self, *exc: object) -> None: ...

    def lstat(self, rel: str) -> os.stat_result | None: ...

    def is_dir(self, rel: str) -> bool: ...

    def readlink(self, rel: str) -> str | None: ...

    def same_content(self, rel: str, src_fd: int) -> bool: ...


class TreeWriter(TreeReader, Protocol):
    """The open transaction's tree: paths written and removed."""

    def __enter__(self) -> TreeWriter: ...

    def write_file(self, rel: str, src_fd: int, mode: int) -> None: ...

    def symlink(self, rel: str, target: str) -> None: ...

    def delete(self, rel: str) -> bool: ...

    def makedirs(self, rel: str) -> None: ...


class PublishBackend(Protocol):
    """A publisher of CernVM-FS repositories (see the module docstring)."""

    def exists(self, repo: str) -> bool: ...

    def create_repository(self, repo: str, keys_dir: str) -> bool:
        """Create it (or a failed creation's leftover again); True if created."""
        ...

    def in_transaction(self, repo: str) -> bool: ...

    def transaction(self, repo: str) -> object: ...

    def writer(self, repo: str) -> TreeWriter:
        """The tree of the open transaction (OSError when unusable)."""
        ...

    def publish(self, repo: str, nice: int = 0) -> object:
        """Publish the open transaction; ``nice``: added to its processes' niceness."""
        ...

    def abort(self, repo: str) -> object: ...

    def ingest_tar(self, repo: str, base_dir: str, tar_stream: IO[bytes]) -> object:
        """Replace nothing, add ``base_dir`` from an uncompressed tar stream (own revision)."""
        ...

    def ingest_delete(self, repo: str, path: str) -> object:
        """Remove ``path`` in its own revision."""
        ...

    def reader(self, repo: str) -> TreeReader:
        """The published revision's tree (OSError when unusable)."""
        ...

    def where(self, repo: str) -> Path:
        """Where :meth:`reader` reads: for error messages, and the tree the manifest
        is rebuilt from (:func:`cvmfs_publisher.staging.manifest.ensure`)."""
        ...

    def revision(self, repo: str) -> int | None:
        """The published revision number (None when it cannot be read): the
        manifest of what this host published is trusted only for it, and the
        uploader's receipt reports it."""
        ...

    def publish_lock(self, repo: str) -> Path: ...

    def wait_publish_lock(self, repo: str, timeout: float) -> bool: ...
