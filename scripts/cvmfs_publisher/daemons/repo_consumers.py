"""cvmfs-repo-consumers: stage every repository's S3 events under /data/cvmfs/<repo>.

One process serves every repository (DESIGN §1, §3), composed of:

- the event source (:class:`cvmfs_publisher.pipeline.source.EventSource`;
  today :class:`cvmfs_publisher.adapters.amqp_source.RepositoryQueues`):
  which repositories, their messages, and every ack, retry and dead-letter,
  decided by the one policy of :mod:`cvmfs_publisher.core.delivery`
  (transient failures are retried **forever**: an outage must not turn
  accepted changes into dead letters; a bug at most ``consumers.max_attempts``
  times);
- the intake (:mod:`cvmfs_publisher.pipeline.intake`): a message becomes
  targets on the source's thread (cheap), then changes made durable in
  staging on a download worker; only then is it acknowledged;
- the download pool (:class:`cvmfs_publisher.pipeline.dispatch.Dispatcher`):
  ``consumers.downloads`` workers plus one for repositories with nothing
  running, fair across repositories and in arrival order per path;
- a housekeeping thread for the status document (a stale one is how the
  container health check sees a stuck daemon);
- the receipt writer (:class:`cvmfs_publisher.pipeline.receipt_upload.ReceiptWriter`,
  unless ``receipts.enabled`` is false), on its own thread: each served
  repository's bucket gets its receipt (docs/ARCHITECTURE.md, "The receipt").

SIGTERM/SIGINT: the source stops taking messages and waits for running
downloads to settle (at most :data:`DRAIN_SECONDS`); exit 0.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..adapters.amqp_source import RepositoryQueues
from ..adapters.rabbitmq_api import ManagementAPI
from ..adapters.rgw import RGW
from ..core import runtime
from ..core.config import Config
from ..core.status import StatusDocument
from ..pipeline.receipt_upload import ReceiptWriter
from ..pipeline.source import EventSource
from ..pipeline.stager import Stager

NAME = "cvmfs-repo-consumers"
log = logging.getLogger(__name__)

#: How long SIGTERM waits for running downloads (below Docker's default 10 s stop timeout).
DRAIN_SECONDS = 8.0


class RepoConsumers:
    """The daemon: an event source feeding the stager (see the module docstring)."""

    def __init__(self, cfg: Config, status: StatusDocument, rgw: RGW | None = None,
                 mgmt: ManagementAPI | None = None, source: EventSource | None = None) -> None:
        self.cfg = cfg
        self.status = status
        downloads = max(1, cfg.consumers.downloads)
        s3 = rgw or RGW(cfg.s3, cfg.rgw, max_pool_connections=max(10, downloads * 2))
        self.stager = Stager(cfg, status, s3)
        self.receipts = ReceiptWriter(cfg, status, s3, self.stager.served) \
            if cfg.receipts.enabled else None
        if self.receipts is not None:
            self.stager.on_rejected = self.receipts.rejected
        # prefetch: per worker one job running, one ready, one in the group commit's
        # round and one in the ack's round trip, so the pool never waits on either.
        self.source = source or RepositoryQueues(cfg, status, NAME, prefetch=4 * downloads,
                                                 drain_seconds=DRAIN_SECONDS, mgmt=mgmt)
        self._hk_stop = threading.Event()

    def install_signal_handlers(self) -> None:
        runtime.stop_on_signals(self.request_stop)

    def request_stop(self) -> None:
        """Drain and stop (safe from a signal handler)."""
        self.source.request_stop()

    def run(self) -> None:
        """Serve until :meth:`request_stop`; returns after a clean shutdown."""
        self.status.set(healthy=True)
        self.status.flush(force=True)
        threads = [threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)]
        if self.receipts is not None:
            threads.append(threading.Thread(target=self.receipts.run, args=(self._hk_stop,),
                                            name="receipts", daemon=True))
        for t in threads:
            t.start()
        try:
            self.stager.serve(self.source)
        finally:
            self._hk_stop.set()
            for t in threads:
                t.join(timeout=15)
            self.status.set(healthy=False, broker_connected=False)
            self.status.flush(force=True)
            log.info("%s stopped", NAME)

    def _housekeeping(self) -> None:
        """Pending counts and the status document, every ``status.interval``.

        Counted only when written (a count nobody sees costs a stat per repository).
        One failed round is logged and the next one tried.
        """
        interval = max(0.1, self.cfg.status.interval)
        while not self._hk_stop.wait(interval):
            try:
                self.stager.report()
                self.status.flush(force=True)  # this loop is the pace
            except OSError as exc:
                log.warning("cannot write the status document: %s", exc)
            except Exception:
                log.exception("housekeeping round failed; retrying")


def main(argv: Sequence[str] | None = None) -> int:
    rt = runtime.start(NAME, "Stage S3 bucket events of every repository under "
                       "the staging directory", argv)
    daemon = RepoConsumers(rt.cfg, rt.status)
    daemon.install_signal_handlers()
    daemon.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
