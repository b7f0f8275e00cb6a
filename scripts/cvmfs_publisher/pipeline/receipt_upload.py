"""The receipt upload: each repository's bucket tells its uploader what happened (DESIGN §3).

cvmfs-repo-consumers runs one :class:`ReceiptWriter` thread. For every
repository it serves it PUTs ``receipts.key`` (default
``cvmfs-publisher/status.json``) into the repository's bucket: the document
of :func:`cvmfs_publisher.staging.receipts.build` (published revision,
recent changes, pending work, rejected keys, last error).

When: after each publish and each rejection (the state files in staging
changed) and, while something is pending or failing, again so the pending
age stays true; never more than once per ``receipts.interval`` per
repository (what happens in between is coalesced into the next write), and
not at all while nothing changes or before anything happened on this host
(a repository nobody uploaded to yet, a standby host of a repository).
The key is outside ``s3.prefix`` (checked by the configuration), so a
write raises no bucket event.

A write that S3 refuses (403 from a bucket policy, no such bucket) is
logged once per repository, shown in the status document
(``receipt``), and tried again only after :data:`DENIED_RETRY`, quietly;
nothing else depends on it. A transient failure (RGW down) is logged once
per streak and tried at the next interval.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.config import Config
from ..core.errors import Permanent, PublisherError
from ..core.names import label_of
from ..core.status import StatusDocument
from ..staging import receipts
from ..staging.area import PendingTimes, Staging
from ..staging.watch import PendingWatch

log = logging.getLogger(__name__)

#: After a refused write, the next try (a bucket policy is not changed in a minute).
DENIED_RETRY = 900.0

#: Every repository is looked at this often (seconds) even when no inotify event said
#: it changed: a file system without events, a watch that could not be added.
FULL_SCAN = 60.0


@dataclass
class _RepoReceipt:
    """What the writer remembers of one repository's receipt."""

    written: tuple[int, int] | None = None  # state version last written
    last_try: float = 0.0
    denied_until: float = 0.0
    denied: str = ""  # why the last write was refused ("" when it was not)
    failing: str = ""  # the current transient failure ("" when none)


def raw_key(shown: str) -> str:
    """A verdict's key back to the S3 key (verdicts carry it JSON-quoted for log lines)."""
    try:
        value = json.loads(shown)
    except ValueError:
        return shown  # "-" (no key) or a key cut for the log line
    return value if isinstance(value, str) else shown


class ReceiptWriter:
    """Writes the receipts of the repositories ``repositories()`` names (see the module)."""

    def __init__(self, cfg: Config, status: StatusDocument, s3: Any,
                 repositories: Callable[[], list[str]],
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.limits = cfg.receipts
        self.status = status
        self.s3 = s3
        self.repositories = repositories
        self.clock = clock
        self.record = receipts.RejectedRecord(cfg.cvmfs.staging_dir, cfg.receipts)
        self._queue: deque[tuple[str, str, str, float]] = deque()
        self._repos: dict[str, _RepoReceipt] = {}
        self._stagings: dict[str, Staging] = {}
        self._times: dict[str, list[PendingTimes]] = {}  # pending/, batch/: parsed once
        self._busy: set[str] = set()  # looked at every tick (see _due)
        self._next_scan = 0.0  # monotonic time of the next look at every repository

    def rejected(self, repository: str, key: str, reason: str) -> None:
        """A key of ``repository`` was dead-lettered (any thread; never blocks on I/O)."""
        self._queue.append((repository, raw_key(key), reason, self.clock()))

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop``; a failed round is logged and the next one tried.

        Which repositories a tick looks at: the kernel says whose staging
        changed (:class:`PendingWatch`: an entry staged or taken, a state file
        replaced); the busy ones are looked at every tick, every one every
        :data:`FULL_SCAN` s. Looking at all of 1,000 idle repositories every
        second took 24-32 ms of CPU a second, the consumers' largest idle cost.
        """
        period = max(0.2, min(1.0, self.limits.interval / 2))
        watch = PendingWatch(self.cfg.cvmfs.staging_dir)
        try:
            while not stop.is_set():
                try:
                    changed = self._changed(watch, stop, period)
                    if stop.is_set():
                        return
                    self.tick(changed=changed, watch=watch)
                except Exception:
                    log.exception("receipt round failed; retrying")
                    stop.wait(period)
        finally:
            watch.close()

    @staticmethod
    def _changed(watch: PendingWatch, stop: threading.Event, period: float) -> set[str] | None:
        """The repositories whose staging changed within ``period`` s (None: look at all)."""
        deadline = time.monotonic() + period
        changed: set[str] | None = set()
        while changed is not None and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = watch.wait(min(left, 0.5))  # 0.5: the stop request's latency
            changed = None if got is None else changed | got
        return changed

    def tick(self, now: float | None = None, changed: set[str] | None = None,
             watch: PendingWatch | None = None) -> list[str]:
        """Persist queued rejections, then write the receipts that are due; which.

        ``changed``: the repositories whose staging changed since the last
        tick (None: unknown, look at every one); ``watch``: told of every
        repository before it is looked at.
        """
        now = self.clock() if now is None else now
        scan = time.monotonic()
        if changed is None or scan >= self._next_scan:
            changed, self._next_scan = None, scan + FULL_SCAN
        while self._queue:
            repo, key, reason, when = self._queue.popleft()
            try:
                self.record.add(repo, key, reason, when)
            except OSError as exc:
                log.warning("repository=%s key=%s step=receipt outcome=not-recorded "
                            "error=%s (the rejection stays in the log and the dead letters)",
                            repo, key[:300], exc)
        written = []
        for repo in self.repositories():
            if watch is not None:
                watch.watch(repo)  # before it is looked at: no change slips in between
            if (changed is not None and repo not in changed and repo not in self._busy
                    and repo in self._repos):  # (a repository never looked at is looked at)
                continue
            if self._due(repo, now) and self._write(repo, now):
                written.append(repo)
        return written

    def _due(self, repo: str, now: float) -> bool:
        """Is ``repo``'s receipt to be written now? Keeps :attr:`_busy` (looked at every
        tick): a repository with something pending, failing, refused or not yet told."""
        r = self._repos.setdefault(repo, _RepoReceipt())
        self._busy.add(repo)
        if now < r.denied_until or now - r.last_try < self.limits.interval:
            return False
        version = receipts.version(self.cfg.cvmfs.staging_dir, repo)
        st = self._stagings.get(repo)
        if st is None:  # kept: its pending count is cached (Staging.pending_count)
            st = self._stagings[repo] = Staging(self.cfg.cvmfs.staging_dir, repo)
        waiting = st.pending_count() > 0 or st.has_batch()
        if version == (0, 0) and not waiting:
            self._busy.discard(repo)
            return False  # nothing happened here yet (a new repository, a standby host)
        if version != r.written:
            return True
        sync, _ = receipts.state(self.cfg.cvmfs.staging_dir, repo)
        if waiting or sync.get("failing"):
            return True
        self._busy.discard(repo)  # told everything: quiet until its staging changes
        return False

    def _write(self, repo: str, now: float) -> bool:
        r = self._repos[repo]
        r.last_try = now
        version = receipts.version(self.cfg.cvmfs.staging_dir, repo)
        times = self._times.get(repo)
        if times is None:
            times = self._times[repo] = receipts.waiting_times(self._stagings[repo])  # (_due)
        doc = receipts.build(self.cfg.cvmfs.staging_dir, repo, self.limits, now, times)
        body = json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n"
        bucket = label_of(repo)
        where = f"s3://{bucket}/{self.limits.key}"
        try:
            self.s3.put_object(bucket, self.limits.key, body, "application/json", repo)
        except Permanent as exc:
            if not r.denied:
                log.error("repository=%s step=receipt outcome=refused receipt=%s error=%s: the "
                          "uploader gets no receipt; allow this daemon's S3 user s3:PutObject "
                          "on that key (or set receipts.enabled: false); retried every %.0fs, "
                          "quietly", repo, where, exc, DENIED_RETRY)
            r.denied, r.denied_until = str(exc), now + DENIED_RETRY
            self.status.repo(repo, create=False, receipt=f"refused: {exc}"[:300])
            return False
        except PublisherError as exc:
            if not r.failing:
                log.warning("repository=%s step=receipt outcome=retry receipt=%s error=%s "
                            "(tried again every %.0fs)", repo, where, exc, self.limits.interval)
            r.failing = str(exc)
            self.status.repo(repo, create=False, receipt=f"failing: {exc}"[:300])
            return False
        if r.denied or r.failing:
            log.info("repository=%s step=receipt outcome=written-again receipt=%s", repo, where)
        r.denied = r.failing = ""
        r.written = version
        self.status.repo(repo, create=False, receipt="ok", receipt_written=now)
        log.debug("repository=%s step=receipt outcome=written revision=%s pending=%s "
                  "rejected=%d", repo, doc["published"]["revision"], doc["pending"]["count"],
                  len(doc["rejected"]))
        return True
