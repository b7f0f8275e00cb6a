"""Fencing: a change staged by a consumer that lost its role is never published unchecked.

DESIGN §3, Scale-out: several publisher hosts consume one repository's queue
(RabbitMQ single-active-consumer); each has its own staging directory and
sync daemon, and they publish into the same repository (the gateway). The
published layer is the truth of what is published; S3 is the truth of what
is wanted. The danger: host A stages key K version 1 and dies before
publishing; host B becomes the active consumer, stages and publishes K
version 2; A comes back and its sync daemon publishes version 1 over it.
The same holds for a deletion racing an upload across the two hosts.

The fence is the consumer's *term*: the span during which this host's
consumers daemon is the active consumer of the repository's queue.

- When the consumers become active for a repository (:meth:`Term.begin`)
  they draw a new term id, write it to ``<staging>/<repo>/.active`` and hold
  an exclusive ``flock`` on that file for as long as they stay active; the
  kernel drops the lock the instant the process dies. Every entry staged
  meanwhile carries the id (``Entry.activation``).
- Before it takes a batch, the sync daemon calls :func:`fence`: under the
  staging lock it reads the live term (the id in ``.active`` if a process
  holds the lock, else none) and moves every entry of another term from
  ``pending/`` and ``batch/`` to ``stale/``. Those are never published as
  they are.
- The next time this host's consumers become active, they check each
  entry set aside (and each pending one of an older term) against S3
  (:func:`cvmfs_publisher.pipeline.fetch.fetch_key`: what S3 holds *now*
  is staged in the new term) before they reconcile.

So A's version 1 stays in ``stale/`` while B is active, and becomes
whatever S3 holds when A is active again. The term is read and written
under the staging lock, so an entry of a term that began after a fence read
the live term is never set aside by it. An entry with no term (an
operator's ``cvmfs-publisher reconcile``, or staged before fencing existed)
is not fenced: it was checked against S3 when it was staged.

A lost broker connection ends the term too (the broker may hand the role
to another host meanwhile): what was staged and not yet published is
fetched again once this host is active again, usually a handful of keys,
since the sync daemon publishes within seconds.

Not covered: a host that loses its role while its sync daemon is already
inside a publish; that publish completes. Its content was what S3 held when
it was staged, and the new active host's reconcile after the failover
compares the bucket with the published revision again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
import uuid
from pathlib import Path

from .area import Entry, Staging, entry_name

log = logging.getLogger(__name__)

ACTIVE = ".active"

#: How long :meth:`Term.begin` waits for the lock. The sync daemon's probe
#: (:func:`live_term`) holds a shared lock for two system calls, many times a
#: second; a live consumer holds its exclusive one for as long as it is active.
#: Without the wait, 2 of 1,000 repositories failed to begin their term in a
#: benchmark run (and stayed without one: nothing of theirs was published).
BEGIN_WAIT = 2.0


class Term:
    """This process's terms as the active consumer of one repository (see the docstring)."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self._fd: int | None = None
        # Until the first activation, entries carry a term that was never live.
        staging.term = f"waiting-{uuid.uuid4().hex}"

    @property
    def active(self) -> bool:
        return self._fd is not None

    def begin(self) -> str:
        """Become active: a new term id, written to ``.active`` and held with flock."""
        if self._fd is not None:
            return self.staging.term
        term = uuid.uuid4().hex
        path = self.staging.root / ACTIVE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            with self.staging.locked():
                if not _lock_within(fd, BEGIN_WAIT):
                    raise FencingError(
                        f"{path} is held by another process: two consumers daemons "
                        "share this staging directory", self.staging.repo)
                os.ftruncate(fd, 0)
                os.pwrite(fd, term.encode(), 0)
                os.fsync(fd)
                self.staging.term = term
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return term

    def end(self) -> None:
        """No longer active: release the lock (entries of this term become stale)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def _lock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on ``fd``, trying for ``seconds``; False if still held."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class FencingError(Exception):
    """The term cannot be taken (another process of this host holds it)."""

    def __init__(self, message: str, repository: str = "") -> None:
        super().__init__(message)
        self.repository = repository


def live_term(staging: Staging) -> str | None:
    """The term id of the process holding ``.active`` now, or None when nobody does."""
    path = staging.root / ACTIVE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody held it: no live term
        return None
    finally:
        os.close(fd)


def _stale(entry: Entry, live: str | None) -> bool:
    return bool(entry.activation) and entry.activation != live


def fence(staging: Staging) -> int:
    """Set aside every pending or batched entry of a term that is not live; how many.

    The sync daemon calls it before it takes or replays a batch.
    """
    moved = 0
    with staging.locked():
        live = live_term(staging)
        for directory in (staging.pending, staging.batch_dir):
            for entry in staging._entries(directory):
                if not _stale(entry, live):
                    continue
                staging.stale_dir.mkdir(mode=0o750, exist_ok=True)
                # the sync daemon (root) makes it; the consumers (another user in the
                # containers) list and empty it (also mends one an older release made)
                staging.adopt(staging.stale_dir)
                name = entry_name(entry.path)
                old = Staging._read(staging.stale_dir / name)
                if old is not None and old.seq > entry.seq:
                    # an even later stale entry of the path is already set aside
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(directory / name)
                    if entry.object and entry.object != old.object:
                        staging.discard_object(entry.object)
                    continue
                os.replace(directory / name, staging.stale_dir / name)
                if old is not None and old.object and old.object != entry.object:
                    staging.discard_object(old.object)
                moved += 1
                log.warning("repository=%s path=%s key=%s step=fence outcome=set-aside "
                            "term=%s live=%s reason=staged by a consumer that is no longer "
                            "active; checked against S3 when this host is active again",
                            staging.repo, entry.path, entry.key, entry.activation[:12],
                            (live or "none")[:12])
        if moved and staging.batch_dir.is_dir() and not any(
                n.endswith(".json") for n in os.listdir(staging.batch_dir)):
            os.rmdir(staging.batch_dir)
    return moved


def to_check(staging: Staging) -> list[Entry]:
    """What a consumer that just became active must check against S3 first:
    the entries set aside, and pending ones of an older term."""
    live = staging.term
    out = {e.path: e for e in staging.stale_entries()}
    for e in staging.pending_entries():
        if _stale(e, live):
            out.setdefault(e.path, e)
    return sorted(out.values(), key=lambda e: e.seq)


def checked(staging: Staging, entry: Entry) -> None:
    """``entry`` was checked (its path staged again in this term): forget the stale copy."""
    path = Path(staging.stale_dir) / entry_name(entry.path)
    with staging.locked():
        old = Staging._read(path) if path.exists() else None
        if old is None or old.seq != entry.seq:
            return
        os.unlink(path)
        current = staging.staged_get(entry.path)
        if old.object and (current is None or current.object != old.object):
            staging.discard_object(old.object)
