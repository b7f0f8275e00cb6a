"""Group commit: many staged changes made durable by one round of syncs.

Why: staging one change durably costs four fsyncs (the object, ``objects/``,
the entry, ``pending/``), each a journal commit, and on a small host they,
not the downloads, bounded the consumers (bench/bench_consumers.py). Here
the download workers only write: the object is renamed into ``objects/``
unsynced (:meth:`Staging.commit_object` with ``sync=False``) and the entries
are handed over with :meth:`GroupCommit.submit`. One thread commits
whatever was handed over while it was busy with the previous round (no
timer: an idle host commits a single change at once, a busy one groups
them by itself), in that order:

1. every entry of the round is written to ``tmp/``, unsynced
   (:meth:`Staging.prepare`);
2. **one syncfs per file system** (:func:`cvmfs_publisher.core.durable.syncfs`):
   the objects, ``objects/`` and the entry files are durable;
3. each entry is renamed into ``pending/`` (:meth:`Staging.install`), a
   repository's entries of the round under one hold of its staging lock;
   a repository whose lock is busy (the sync daemon taking or setting
   aside a batch) is not waited for: its changes, durable in ``tmp/``
   already, are carried into the next round, which comes when something
   new is submitted or ``BUSY_RETRY`` later, so a hot repository never
   holds a quiet one's change back;
4. **one syncfs per file system** again: the renames are durable;
5. ``on_round`` is told the result of every change the round finished at
   once (the consumers acknowledge the deliveries then, several per AMQP
   call).

So what the one-change path guarantees still holds for each change: an
entry is visible in ``pending/`` only once its object and its own content
are durable, and a change is reported done (its message acknowledged) only
once the rename is durable too. A failed sync (EIO, disk full) fails every
change of its round (the consumers retry those messages): nothing of the
round was reported done, and an entry it may have installed is one a
redelivery stages again. Where syncfs does not exist, step 2 fsyncs each
file and directory, step 4 each ``pending/``.

Per-path order: changes are committed in submission order (a carried
change before any later one of its repository), and an entry prepared in a
round inherits the first staging time of an earlier one of its path that
is not installed yet. :meth:`close` commits what was submitted before it
returns (a shutdown flushes the open group, waiting for busy locks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import durable
from .area import Entry, Staging

log = logging.getLogger(__name__)

#: Changes committed in one round at most (bounds a round's latency after a burst).
MAX_GROUP = 1024

#: Seconds before a change whose repository's lock was busy is tried again, when
#: nothing new comes first (the sync daemon holds it for a rename or a listing).
BUSY_RETRY = 0.02


@dataclass(eq=False)
class Change:
    """Entries of one staging whose objects are written (unsynced), and who asked."""

    staging: Staging
    entries: list[Entry]
    token: Any
    prepared: list[tuple[Entry, Path]] = field(default_factory=list)
    error: BaseException | None = None


#: ``on_round([(token, error or None), ...])``, on the commit thread, once per round.
OnRound = Callable[[list[tuple[Any, BaseException | None]]], None]


class GroupCommit:
    """The commit thread of the module docstring."""

    def __init__(self, on_round: OnRound, max_group: int = MAX_GROUP,
                 name: str = "group-commit") -> None:
        self.on_round = on_round
        self.max_group = max(1, max_group)
        self._name = name
        self._cond = threading.Condition()
        self._queue: list[Change] = []
        #: prepared and synced, not installed: their repository's lock was busy
        self._carried: list[Change] = []
        self._in_round = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        #: rounds done and changes committed (figures for tests and benchmarks)
        self.rounds = 0
        self.committed = 0

    def start(self) -> GroupCommit:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()
        return self

    def submit(self, staging: Staging, entries: list[Entry], token: Any) -> None:
        """Commit ``entries`` (their objects written) in the next round; ``token`` is
        what ``on_round`` gets back. After :meth:`close`: committed on this thread."""
        change = Change(staging, list(entries), token)
        with self._cond:
            if not self._closed:
                self._queue.append(change)
                self._cond.notify_all()
                return
        self._round([change])  # closed: nobody else will commit it (waits for its lock)

    def pending(self) -> int:
        """Changes submitted and not reported yet."""
        with self._cond:
            return len(self._queue) + self._in_round + len(self._carried)

    def close(self, timeout: float | None = None) -> bool:
        """Commit what was submitted, then stop; True once the thread ended."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is None:
            self._drain()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _take(self) -> tuple[list[Change], list[Change]]:
        """The next round: new changes and the carried ones (cond held)."""
        group, self._queue = self._queue[:self.max_group], self._queue[self.max_group:]
        carried, self._carried = self._carried, []
        self._in_round = len(group) + len(carried)
        return group, carried

    def _drain(self) -> None:
        while True:
            with self._cond:
                group, carried = self._take()
            if not group and not carried:
                return
            self._round(group, carried, block=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(BUSY_RETRY if self._carried else None)
                    if not self._queue and not self._carried:
                        continue
                if self._closed and not self._queue and not self._carried:
                    return
                group, carried = self._take()
                block = self._closed  # closing: wait for busy locks, nothing comes later
            self._round(group, carried, block)

    def _round(self, group: list[Change], carried: list[Change] | None = None,
               block: bool = True) -> None:
        carried = carried or []
        busy: list[Change] = []
        try:
            busy = self._commit(group, carried, block)
        except BaseException as exc:  # a sync failed: no change of the round is done
            log.error("step=staging outcome=commit-failed changes=%d reason=%s: %s; their "
                      "messages are retried", len(carried) + len(group), type(exc).__name__,
                      exc)
            busy = []
            for change in carried + group:
                change.error = change.error or exc
                self._undo(change)
        finally:
            with self._cond:
                self._in_round = 0
                self._carried = busy + self._carried
        waiting = {id(c) for c in busy}
        done = [c for c in carried + group if id(c) not in waiting]
        if not done:
            return
        self.rounds += 1
        self.committed += sum(1 for c in done if c.error is None)
        try:
            self.on_round([(c.token, c.error) for c in done])
        except Exception:  # the reporting must never stop the commits
            log.exception("step=staging outcome=report-failed changes=%d", len(done))

    def _commit(self, group: list[Change], carried: list[Change], block: bool
                ) -> list[Change]:
        """Steps 1-4 for ``group`` (new) and ``carried`` (synced before); returns the
        changes whose repository's lock was busy (``block=False``): carried again."""
        earlier: dict[tuple[Path, str], Entry] = {}
        for change in carried:  # not installed yet: later entries of a path follow them
            for entry, _ in change.prepared:
                earlier[(change.staging.root, entry.path)] = entry
        for change in group:  # 1. entries written, unsynced
            try:
                for entry in change.entries:
                    key = (change.staging.root, entry.path)
                    tmp = change.staging.prepare(entry, sync=False, earlier=earlier.get(key))
                    change.prepared.append((entry, tmp))
                    earlier[key] = entry
            except Exception as exc:  # this staging's problem (gone, full): its change only
                change.error = exc
                self._undo(change)
        live = [c for c in group if c.error is None]
        if live:
            self._sync(live, data=True)  # 2.
        drops: list[tuple[Staging, list[str]]] = []
        by_repository: dict[Path, list[Change]] = {}
        for change in carried + live:  # carried first: they were submitted earlier
            by_repository.setdefault(change.staging.root, []).append(change)
        busy: list[Change] = []
        for changes in by_repository.values():  # 3. renamed into pending/
            with changes[0].staging.locked(blocking=block) as got:
                if got:
                    self._install(changes, drops)
                else:
                    busy += changes
        waiting = {id(c) for c in busy}
        installed = [c for c in carried + live if c.error is None and id(c) not in waiting]
        if installed:
            self._sync(installed, data=False)  # 4.
        for staging, drop in drops:
            staging.drop_objects(drop)
        return busy

    def _install(self, changes: list[Change], drops: list[tuple[Staging, list[str]]]) -> None:
        """One repository's changes of the round, in submission order; its lock is held."""
        for change in changes:
            try:
                for entry, tmp in change.prepared:
                    _, drop, _ = change.staging.install(entry, tmp, held=True)
                    drops.append((change.staging, drop))
                change.prepared = []
            except Exception as exc:
                change.error = exc
                self._undo(change)

    @staticmethod
    def _sync(changes: list[Change], data: bool) -> None:
        """One syncfs per file system of ``changes`` (else an fsync per file and directory).

        ``data``: before the renames (objects, ``objects/``, the entry files);
        else after them (``pending/``).
        """
        by_dev: dict[int, list[Change]] = {}
        for change in changes:
            by_dev.setdefault(os.stat(change.staging.root).st_dev, []).append(change)
        for same_fs in by_dev.values():
            if durable.syncfs(same_fs[0].staging.root):
                continue
            for change in same_fs:
                st = change.staging
                if data:
                    for entry, tmp in change.prepared:
                        durable.fsync_file(tmp)
                        if entry.object:
                            durable.fsync_file(st.object_path(entry))
                    durable.fsync_dir(st.objects)
                else:
                    with contextlib.suppress(FileNotFoundError):  # taken as a batch meanwhile
                        durable.fsync_dir(st.pending)
                    if st.batch_dir.is_dir():
                        durable.fsync_dir(st.batch_dir)

    @staticmethod
    def _undo(change: Change) -> None:
        """A change that failed: its prepared entries go, and its objects unless an
        installed entry references them (a sync failed after the renames)."""
        for _, tmp in change.prepared:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        change.prepared = []
        for entry in change.entries:
            if not entry.object:
                continue
            try:
                current = change.staging.staged_get(entry.path)
            except OSError:
                current = None
            if current is None or current.object != entry.object:
                change.staging.discard_object(entry.object)
