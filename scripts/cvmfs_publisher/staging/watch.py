"""Which repositories' staging directories changed: the sync daemon's wake-up.

Three kinds of watches (``adapters/inotify``): the staging root (a new
repository directory), each repository's directory (a new ``pending/``:
``take_batch`` renames the old one to ``batch/`` and creates another) and
each ``pending/`` (an entry staged, replaced or taken). A watch on a
``pending/`` follows its inode when it becomes ``batch/``, so after a new
``pending/`` appears the repository is reported changed and forgotten as
watched: the caller's next :meth:`PendingWatch.watch` of it watches the new
directory *before* it lists it, so no entry can slip between the two.

Without inotify (no kernel support, ``max_user_instances`` reached) every
:meth:`PendingWatch.wait` answers "unknown" after its timeout: the caller
then looks at every repository, as a poll loop would.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..adapters import inotify

log = logging.getLogger(__name__)

_ROOT = ("root", "")

#: How often a staging root that does not exist yet is looked for (seconds).
ROOT_RETRY = 0.5


class PendingWatch:
    """inotify on a staging root; :meth:`wait` returns the repositories that changed."""

    def __init__(self, staging_dir: str | os.PathLike[str]) -> None:
        self.root = Path(staging_dir)
        self._watched: set[str] = set()
        self._woken = threading.Event()  # the stop request, without inotify
        try:
            self._ino: inotify.Inotify | None = inotify.Inotify()
        except (inotify.InotifyUnavailable, OSError) as exc:
            log.warning("inotify unavailable (%s): scanning every staging directory at each "
                        "poll instead (more CPU with many repositories; raise "
                        "fs.inotify.max_user_instances if that is the cause)", exc)
            self._ino = None

    @property
    def available(self) -> bool:
        return self._ino is not None

    def watch(self, repo: str) -> None:
        """Watch ``repo``'s directory and ``pending/`` (idempotent; before listing them)."""
        if self._ino is None or repo in self._watched:
            return
        base = self.root / repo
        try:
            if self._ino.add(base, inotify.IN_CREATE | inotify.IN_MOVED_TO, ("repo", repo)):
                self._ino.add(base / "pending", inotify.CHILDREN, ("pending", repo))
                self._watched.add(repo)
        except OSError as exc:  # ENOSPC: fs.inotify.max_user_watches reached
            log.warning("repository=%s cannot watch its staging directory (%s): it is "
                        "looked at by the periodic scan only; raise "
                        "fs.inotify.max_user_watches", repo, exc)

    def wait(self, timeout: float) -> set[str] | None:
        """Repositories whose staging changed within ``timeout`` s; None: look at all."""
        if self._ino is None:
            self._woken.wait(max(0.0, timeout))
            self._woken.clear()
            return None
        if not self._ino.watching(_ROOT):  # the first wait, or the root was removed
            if not self._ino.add(self.root, inotify.IN_CREATE | inotify.IN_MOVED_TO, _ROOT):
                # no staging root yet: nothing can be pending; look again soon
                self._woken.wait(max(0.0, min(timeout, ROOT_RETRY)))
                self._woken.clear()
                return None
        keys = self._ino.wait(timeout)
        if keys is None:
            self._watched.clear()  # events lost: watch again, look at everything
            return None
        changed: set[str] = set()
        for kind, repo in keys:  # type: ignore[misc]
            if kind == "root":
                return None  # a new repository directory: the caller lists the root
            if kind == "repo":
                self._watched.discard(repo)  # a new pending/ to watch
            changed.add(repo)
        return changed

    def wake(self) -> None:
        """End a wait at once (a stop request; safe from a signal handler)."""
        self._woken.set()
        if self._ino is not None:
            self._ino.wake()

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None


class Wakeups:
    """When the sync loop looks, and at which repositories: :meth:`next` blocks until then.

    Every repository at the first call and every ``scan_interval``; a
    repository that was idle as soon as its staging changes (the leading
    edge); the ``active()`` ones (something pending, in flight, backing off)
    every ``poll_interval`` -- their own changes do not wake the loop sooner,
    so a burst of 1,000 entries costs a look per poll, not per entry.
    Without inotify, every repository every ``poll_interval``.
    """

    def __init__(self, watch: PendingWatch, poll_interval: float, scan_interval: float, *,
                 active: Callable[[], set[str]], stopping: Callable[[], bool]) -> None:
        self.watch = watch
        self.poll_interval = poll_interval
        self.scan_interval = scan_interval
        self.active = active
        self.stopping = stopping
        self.next_scan = 0.0  # the first call scans

    def next(self) -> list[str] | None:
        """The repositories to look at now, the ones that woke up first (None: all of them).

        First, because a hot repository's look (listing its pending entries)
        must not delay a quiet one's leading-edge publish.
        """
        now = time.monotonic()
        if now >= self.next_scan:
            self.next_scan = now + self.scan_interval
            return None
        active = self.active()
        polling = active or not self.watch.available
        deadline = min(self.next_scan, now + self.poll_interval) if polling else self.next_scan
        changed: set[str] = set()
        while not self.stopping():
            got = self.watch.wait(deadline - time.monotonic())
            if got is None:
                return None
            changed |= got
            if changed - active or time.monotonic() >= deadline:
                break  # an idle repository woke up, or the active ones are due
        return sorted(changed - active) + sorted(active)
