"""Download processes: the consumers' fetches run outside the daemon's GIL.

Why (bench/bench_consumers.py, measured): one consumers process is bound by
its own interpreter lock, not by S3 nor the disk. botocore spends about
3 ms of CPU on one GET, and the rest of the pipeline (the AMQP delivery,
the entry files, the group commit, the ack, the log line) about as much
again, so with the downloads on threads the daemon reached only 0.55 of
the raw S3 GET rate of the same threads on a 2-core host. Here each
download thread of :class:`cvmfs_publisher.pipeline.dispatch.Dispatcher`
hands its fetch to a worker process of its own and waits on a pipe,
without holding the GIL: the GETs and the object writes of several
threads run truly in parallel, the daemon keeps only the bookkeeping.

What a worker does is exactly :func:`cvmfs_publisher.pipeline.fetch.fetch_key`
with the group commit's ``defer``: it writes the object under the
repository's ``tmp/`` and renames it into ``objects/``, *unsynced*, and
returns the entries. Nothing is durable nor acknowledged before the
daemon's group commit (one ``syncfs`` covers files written by any
process), so "ack only after durable" holds unchanged. The worker never
stages an entry, never takes the staging lock, never logs: the daemon
writes the log line (:func:`cvmfs_publisher.pipeline.intake.stage`) and
settles the delivery.

Failure:
- the fetch raises (Transient, Permanent, ...): the exception itself comes
  back over the pipe and is raised in the daemon, as on a thread;
- the worker dies (OOM killer, a crash): its thread sees the pipe closed,
  the fetch is :class:`~cvmfs_publisher.core.errors.Transient` (retried
  like any outage), and the next fetch of that thread starts a new worker.
  A half-written download it leaves in ``tmp/`` is swept when the
  repository is next opened (:meth:`Staging.sweep`);
- the daemon dies, even by SIGKILL: the worker's end of its pipe reads
  end-of-file and it exits (after the download at hand, if any);
- the daemon stops: :meth:`DownloadProcesses.close` ends every worker.

The workers are started by the ``forkserver`` method: forked from a clean
single-threaded server process, never from the daemon (forking a process
with threads can copy a lock held by another thread, e.g. logging's), with
the S3 stack imported once in that server. The server's socket lives in
the temporary directory (the containers give a ``tmpfs`` ``/tmp``).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from ..core.config import RgwConfig, S3Config
from ..core.errors import Transient
from ..staging.area import Entry, Staging
from . import fetch, intake, object_keys

log = logging.getLogger(__name__)

#: Imported once in the fork server, so that a new worker starts in milliseconds and
#: shares the S3 models with the others.
PRELOAD = ["cvmfs_publisher.pipeline.download_preload"]

_CONTEXT = multiprocessing.get_context("forkserver")


def _serve(conn: Connection, s3cfg: S3Config, rgwcfg: RgwConfig, staging_dir: str) -> None:
    """A worker's loop: one request at a time from its pipe until end-of-file.

    SIGINT is ignored (a Ctrl-C on the terminal reaches the whole process
    group; the daemon decides when its workers stop) and SIGTERM ends the
    worker at once (what :meth:`DownloadProcesses.close` sends).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from ..adapters.rgw import RGW  # noqa: PLC0415 (the worker's own client)

    s3 = RGW(s3cfg, rgwcfg, max_pool_connections=2)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the daemon closed its end, or died
        repository, bucket, target = request
        entries: list[Entry] = []
        try:
            staging = Staging(staging_dir, repository)
            got = fetch.fetch_key(s3, staging, bucket, target, repository, entries)
            reply: tuple[Any, ...] = ("ok", got, entries)
        except Exception as exc:
            reply = ("error", exc)
        try:
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError):
                # an exception that does not pickle: a bug, told by its text
                conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: "
                                                 f"{str(reply[1])[:300]}")))
        except (OSError, ValueError):
            return  # the daemon is gone


class _Worker:
    """One worker process and the daemon's end of its pipe."""

    def __init__(self, s3cfg: S3Config, rgwcfg: RgwConfig, staging_dir: str,
                 name: str) -> None:
        self.conn, child = _CONTEXT.Pipe(duplex=True)
        self.process = _CONTEXT.Process(target=_serve, name=name, daemon=True,
                                        args=(child, s3cfg, rgwcfg, staging_dir))
        self.process.start()
        child.close()

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """End the worker: SIGTERM (a download at hand is abandoned), then SIGKILL."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()
        self.process.close()


class DownloadProcesses:
    """Each calling thread's fetches in a worker process of its own (see the module docstring).

    A drop-in for :func:`cvmfs_publisher.pipeline.fetch.fetch_key` with a
    group commit's ``defer`` (the only way the consumers call it on the
    event path).
    """

    def __init__(self, s3cfg: S3Config, rgwcfg: RgwConfig, staging_dir: str) -> None:
        self.s3cfg, self.rgwcfg, self.staging_dir = s3cfg, rgwcfg, staging_dir
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._closed = False
        _CONTEXT.set_forkserver_preload(PRELOAD)

    def _worker(self) -> _Worker:
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is not None and worker.alive():
            return worker
        if worker is not None:
            self._forget(worker)
        with self._lock:
            if self._closed:
                raise Transient("the consumers are stopping")
            name = f"download-{threading.current_thread().name}"
            worker = _Worker(self.s3cfg, self.rgwcfg, self.staging_dir, name)
            self._workers.add(worker)
        self._local.worker = worker
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        self._local.worker = None
        code = worker.process.exitcode
        worker.stop()
        log.warning("download worker %s ended (exit code %s); a new one takes its next "
                    "download", worker.process.name, code)

    def fetch(self, staging: Staging, bucket: str, target: object_keys.Target,
              repository: str, defer: list[Entry]) -> fetch.Fetched:
        """:func:`fetch.fetch_key` in this thread's worker; entries appended to ``defer``."""
        worker = self._worker()
        try:
            worker.conn.send((repository, bucket, target))
            reply = worker.conn.recv()
        except (EOFError, OSError) as exc:
            self._forget(worker)
            raise Transient(f"the download worker of {target.key!r} died "
                            f"({type(exc).__name__}); retried", repository) from None
        except Exception as exc:  # an answer that does not unpickle: a bug
            raise RuntimeError(f"the download worker's answer for {target.key!r} is "
                               f"unreadable: {type(exc).__name__}: {exc}") from None
        if reply[0] == "error":
            raise reply[1]
        _, got, entries = reply
        defer.extend(entries)
        return got

    def close(self) -> None:
        """Stop every worker (a download at hand is abandoned: its delivery is redelivered)."""
        with self._lock:
            self._closed = True
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()


def in_process(s3: Any) -> intake.Fetcher:
    """The same call as :meth:`DownloadProcesses.fetch`, on the calling thread."""
    def run(staging: Staging, bucket: str, target: object_keys.Target, repository: str,
            defer: list[Entry]) -> fetch.Fetched:
        return fetch.fetch_key(s3, staging, bucket, target, repository, defer)
    return run

