"""cvmfs-repo-sync: publishes the changes staged by cvmfs-repo-consumers.

A composition: the scheduler (:class:`cvmfs_publisher.publishing.scheduler.RepoSync`:
when each repository publishes, with its own backoff) drives the batch
driver (:class:`cvmfs_publisher.publishing.batch.BatchPublisher`), which
reaches the repository through the publish backend
(:mod:`cvmfs_publisher.publishing.backend`; today ``cvmfs_server``).

SIGTERM/SIGINT: no new publish starts; the ones in hand finish (published or
aborted); exit 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core import runtime
from ..publishing.scheduler import RepoSync

NAME = "cvmfs-repo-sync"


def main(argv: Sequence[str] | None = None) -> int:
    rt = runtime.start(NAME, "Publish staged changes into CVMFS repositories", argv)
    daemon = RepoSync(rt.cfg, rt.status)
    daemon.install_signal_handlers()
    daemon.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
