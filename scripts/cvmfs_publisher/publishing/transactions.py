"""Transactions of one repository: opened with retries, aborted with insistence.

A repository in its transaction holds the gateway lease: nothing else may
be done to it until it is published or aborted. This module is the one that
opens (16 and 17 retried, a lease held too long reported with the way out),
aborts (until it is out, waiting for a publish still running) and recovers
(aborts a transaction a crash left open).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..adapters.cvmfs import (
    EBUSY,
    CvmfsError,
    NotInTransaction,
    PublishInProgress,
    TransactionBusy,
    TransactionRefused,
    tool_message,
)
from ..core.backoff import Backoff
from ..core.config import Config
from .backend import PublishBackend
from .errors import PublishError

log = logging.getLogger(__name__)


class Transactions:
    """Transaction control through a :class:`PublishBackend` (thread-safe per repository)."""

    #: ``transaction`` answering 16 for longer than this is no publish of
    #: another host any more (the real tool took 9.7 s for 200 MB): the lease
    #: is reported as held, with the way out.
    lease_held_after = 120.0

    def __init__(self, cfg: Config, backend: PublishBackend, stop: threading.Event,
                 on_problem: Callable[[str, str], None]) -> None:
        self.cfg = cfg
        self.backend = backend
        self.stop = stop
        self.on_problem = on_problem
        self._busy_since: dict[str, float] = {}  # repo -> first 16 of the current streak

    def recover(self, repo: str) -> bool:
        """Abort a transaction left open by a crash; True if there was one."""
        if not self.backend.in_transaction(repo):
            return False
        log.warning("repository=%s step=recover outcome=stale-transaction: "
                    "in_transaction.lock found, aborting it (abort -f)", repo)
        self.abort(repo)
        return True

    def open(self, repo: str) -> None:
        """``transaction``; 16 (lease busy) and 17 (already open) are retried."""
        retries = max(0, self.cfg.sync.transaction_retries)
        backoff = Backoff(min(0.5, self.cfg.sync.backoff_initial),
                          min(5.0, self.cfg.sync.backoff_max))
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1:
                self.recover(repo)  # a 17 (already open) is a leftover: abort it first
            try:
                self.backend.transaction(repo)
                self._busy_since.pop(repo, None)
                return
            except TransactionRefused as exc:
                raise PublishError(
                    repo, exc.step, exc.rc,
                    f"{tool_message(exc)} | the gateway refuses every transaction of this "
                    "repository until an operator acts (expired whitelist: re-sign it on the "
                    "stratum 0; layout mismatch: migrate the repository); the batch stays "
                    "staged and is retried rarely", needs_operator=True) from None
            except TransactionBusy as exc:
                held = self._lease_held(repo, exc)
                if held:
                    raise PublishError(repo, exc.step, exc.rc, held) from None
                if attempt > retries or self.stop.is_set():
                    raise PublishError.from_cvmfs(exc) from None
                delay = backoff.next()
                log.warning("repository=%s step=transaction rc=%d error=%s outcome=retry "
                            "attempt=%d/%d in %.2fs", repo, exc.rc, tool_message(exc),
                            attempt, retries, delay)
                self.stop.wait(delay)
            except CvmfsError as exc:
                raise PublishError.from_cvmfs(exc) from None

    def _lease_held(self, repo: str, exc: CvmfsError) -> str:
        """For a 16 (lease busy) lasting longer than a publish: what to tell the operator."""
        if exc.rc != EBUSY:
            return ""
        now = time.monotonic()
        since = self._busy_since.setdefault(repo, now)
        if now - since < self.lease_held_after:
            return ""
        gateway = self.cfg.cvmfs.gateway_url.rstrip("/")
        # The way out first: the status document keeps the first 300 characters.
        return (f"lease {repo}/ busy for {now - since:.0f}s, longer than a publish: leaked? "
                f"Way out: `cvmfs_server abort -f {repo}` on its publisher, or "
                f"DELETE {gateway}/leases-by-path/{repo}/ (gateway admin key); else it expires "
                f"(max_lease_time, 2 h) | {tool_message(exc)}")

    def abort(self, repo: str) -> None:
        """``abort -f`` until the repository is out of its transaction.

        Why insist: after a failed abort (5: gateway unreachable) the
        repository is still in its transaction and holds its lease; nothing
        else may be done to it first. Only a shutdown interrupts the retries;
        the next start aborts the transaction it finds. A publish still
        running (22 with the lock message: one orphaned by a killed daemon) is
        waited for through its lock, then aborted.
        """
        backoff = Backoff(self.cfg.sync.backoff_initial, self.cfg.sync.backoff_max)
        while True:
            try:
                self.backend.abort(repo)
                log.info("repository=%s step=abort outcome=aborted", repo)
                return
            except NotInTransaction:
                return
            except PublishInProgress as exc:
                self._wait_for_publish(repo, exc)
            except CvmfsError as exc:
                if not self.backend.in_transaction(repo):
                    log.warning("repository=%s step=abort rc=%d error=%s outcome=not in a "
                                "transaction any more", repo, exc.rc, tool_message(exc))
                    return
                delay = backoff.next()
                msg = tool_message(exc)
                log.error("repository=%s step=abort rc=%d error=%s outcome=still in its "
                          "transaction, retrying in %.1fs", repo, exc.rc, msg, delay)
                self.on_problem(repo, f"abort rc={exc.rc}: {msg}")
                if self.stop.wait(delay):
                    raise PublishError(repo, "abort", exc.rc,
                                       f"{msg} (shutting down in a transaction: the next "
                                       "start aborts it)") from None

    def _wait_for_publish(self, repo: str, exc: CvmfsError) -> None:
        """Wait (bounded by ``cvmfs.command_timeout``, logged) until the publish
        holding ``is_publishing.lock`` ends; PublishError when it does not."""
        limit = self.cfg.cvmfs.command_timeout
        lock = self.backend.publish_lock(repo)
        log.warning("repository=%s step=abort rc=%d error=%s outcome=waiting: a publish still "
                    "holds %s (orphaned by a daemon killed alone?), waiting up to %.0fs for "
                    "it to end before aborting", repo, exc.rc, tool_message(exc), lock, limit)
        self.on_problem(repo, f"abort waits for a running publish ({lock})")
        t0 = time.monotonic()
        while not self.backend.wait_publish_lock(repo, timeout=min(1.0, limit)):
            waited = time.monotonic() - t0
            if self.stop.is_set() or waited >= limit:
                why = "shutting down" if self.stop.is_set() else f"still held after {waited:.0f}s"
                raise PublishError(repo, "abort", exc.rc,
                                   f"{tool_message(exc)} ({why}: the publish holding {lock} "
                                   "has not ended; if no cvmfs_server or cvmfs_swissknife "
                                   "process of this repository runs, the lock is stale and the "
                                   "next try takes it over; retried later)") from None
        log.info("repository=%s step=abort outcome=publish ended after %.1fs, aborting now",
                 repo, time.monotonic() - t0)
