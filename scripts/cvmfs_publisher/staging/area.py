"""Staging: the pending changes of one repository, on the shared volume.

Layout under ``<staging_dir>/<repo>/`` (``/data/cvmfs/<repo>``), private to
this module: the consumers, the sync daemon, reconciliation and provisioning
use the :class:`Staging` API, never these paths::

    .lock                 flock(2) file, held briefly: to rename an entry into pending/,
                          to take, set aside or sweep a batch (never during a download
                          or an fsync: objects have unique names nobody else writes)
    .manifest.lock        flock(2) file of the manifest's writers (manifest.py)
    pending/<h>.json      one entry per repository path (h = sha256 of the path):
                          the *latest* wanted state of that path
    objects/<id>          content of staged files and tarballs (referenced by entries)
    tmp/                  downloads in progress (never referenced; swept at start-up)
    batch/                the batch the sync daemon is publishing (at most one)
    stale/<h>.json        entries of an ended consumer term, set aside unpublished until
                          the next active consumer checks them against S3 (fencing.py)
    .active               flock(2) file held by the active consumer; holds its term id
    manifest.json         what the sync daemon published (manifest.py)
    receipt-sync.json     the receipt's state, one file per writing daemon: they belong
    receipt-rejected.json to :mod:`cvmfs_publisher.staging.receipts` (never swept)

Why this shape:
- Staging holds pending changes only, never a copy of the repository: a
  path changed twice before a publish keeps one entry and one object.
- A crash at any instruction leaves the old or the new state: objects are
  written to ``tmp/``, fsynced and renamed into ``objects/``; an entry is
  written to ``tmp/``, fsynced and renamed over ``pending/<h>.json``; the
  sync daemon takes a batch with one ``rename(pending, batch)`` under the
  lock. Orphans (objects no entry references) are swept at start-up. The
  consumers' group commit (:mod:`cvmfs_publisher.staging.group_commit`)
  renames objects into ``objects/`` unsynced and syncs a whole group at
  once; an entry is still renamed into ``pending/`` only once its object
  and its own content are durable.
- ``flock`` on a file in the shared volume works across containers on one
  host, so the consumers (writers) and the sync daemon (batch taker) can
  run in different containers.

Entry (JSON)::

    {"path": "tools/bin/run.sh", "op": "put"|"symlink"|"delete"|"ingest"|"ingest-delete",
     "mode": 493, "object": "<id>", "target": "<symlink target>",
     "compression": "none"|"gzip"|"bzip2"|"xz", "key": "cvmfs/tools/bin/run.sh", "size": 12,
     "etag": "...", "modified": 1764129980.0, "activation": "<id>", "seq": 17,
     "time": 1764130000.0, "first_time": 1764129990.0}

``etag`` and ``modified`` (Last-Modified, epoch seconds) are the source
object's, from the GET that staged it: the sync daemon records them in the
manifest (:mod:`cvmfs_publisher.staging.manifest`) so that a reconcile can
compare a bucket listing with what was published without reading a file.
``activation`` names the consumer's term as the repository queue's active
consumer when it staged the entry (:mod:`cvmfs_publisher.staging.fencing`):
an entry of an ended term may be stale and is never published unchecked.

``ingest`` / ``ingest-delete`` entries are keyed by their ingest directory
(``software/<tarball path without extension>``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..core import durable

log = logging.getLogger(__name__)

OPS = ("put", "symlink", "delete", "ingest", "ingest-delete")


class StagingError(Exception):
    """Staging is unusable (not a directory, a symlink where a directory should be...)."""


@dataclass
class Entry:
    """The wanted state of one repository path (or ingest directory)."""

    path: str
    op: str
    mode: int = 0o644
    object: str = ""
    target: str = ""
    compression: str = "none"
    key: str = ""
    size: int = 0
    etag: str = ""
    modified: float = 0.0
    activation: str = ""
    seq: int = 0
    time: float = field(default_factory=time.time)
    first_time: float = 0.0

    @property
    def is_ingest(self) -> bool:
        return self.op in ("ingest", "ingest-delete")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Entry:
        if doc.get("op") not in OPS or not isinstance(doc.get("path"), str):
            raise ValueError(f"invalid staging entry: {doc!r:.200}")
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


def entry_name(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest() + ".json"


def ancestors(path: str) -> Iterator[str]:
    """The proper ancestors of a repository path, shortest first: ``a``, ``a/b`` for
    ``a/b/c``."""
    idx = path.find("/")
    while idx != -1:
        yield path[:idx]
        idx = path.find("/", idx + 1)


class Staging:
    """Staging area of one repository."""

    def __init__(self, staging_dir: str | os.PathLike[str], repo: str) -> None:
        self.repo = repo
        self.root = Path(staging_dir) / repo
        self.pending = self.root / "pending"
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.batch_dir = self.root / "batch"
        self.stale_dir = self.root / "stale"
        #: The consumer term stamped on every staged entry (fencing.Term sets it);
        #: empty for an operator's reconcile, whose entries are never fenced.
        self.term = ""
        self._lock_path = self.root / ".lock"
        self._pending_count: tuple[tuple[int, int], int] | None = None

    # -- set-up and locking ------------------------------------------------------------

    def adopt(self, path: Path) -> None:
        """Give what root creates here to the owner of the repository's staging directory.

        In the containers the consumers write staging as an unprivileged user
        while the sync daemon (root, for cvmfs_server) recreates ``pending/``
        and may create ``.lock``: those must stay usable by the consumers.
        """
        if os.geteuid() != 0:
            return
        try:
            owner = os.stat(self.root)
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)

    def ensure(self) -> Staging:
        """Create the layout (idempotent); refuse symlinks in our own structure."""
        base = self.root.parent
        base.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.pending, self.objects, self.tmp):
            if d.is_symlink():
                raise StagingError(f"{d} is a symlink; refusing to use it")
            if not d.is_dir():
                d.mkdir(mode=0o750)
                if d is self.root:
                    # the repository directory belongs to whoever owns the staging volume
                    parent = os.stat(base)
                    if os.geteuid() == 0 and parent.st_uid != 0:
                        os.chown(d, parent.st_uid, parent.st_gid)
                else:
                    self.adopt(d)
        return self

    @contextlib.contextmanager
    def locked(self, blocking: bool = True) -> Iterator[bool]:
        """Exclusive flock on ``.lock`` (held briefly by every party); yields True.

        ``blocking=False``: yields False at once, holding nothing, when another
        party holds it (the group commit then carries that repository's changes
        into its next round, and serves the other repositories now).
        """
        with self._flock(self._lock_path, blocking) as got:
            yield got

    @contextlib.contextmanager
    def manifest_locked(self) -> Iterator[bool]:
        """Exclusive flock on ``.manifest.lock``: one writer of ``manifest.json`` at a time.

        Not the staging lock: folding a publish into the manifest (a read, an
        update and a durable write of the whole file) took 0.6 s for a
        repository of a few thousand paths (bench_scale), and the consumers'
        installs into ``pending/``, which never touch the manifest, waited
        for it.
        """
        with self._flock(self.root / ".manifest.lock", True) as got:
            yield got

    @contextlib.contextmanager
    def _flock(self, path: Path, blocking: bool) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o660)
        self.adopt(path)
        got = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                got = True
            except BlockingIOError:
                pass
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- writers (consumers) ---------------------------------------------------------------

    def new_download(self) -> tuple[Path, IO[bytes]]:
        """A fresh temporary file in ``tmp/`` for streaming an object into."""
        path = self.tmp / f"dl-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        return path, os.fdopen(fd, "wb")

    def commit_object(self, tmp_path: Path, sync: bool = True) -> str:
        """fsync a finished download and move it into ``objects/``; returns its id.

        ``sync=False`` (the group commit): no fsync of the file nor of
        ``objects/``; the caller makes both durable (one syncfs for a group)
        before an entry referencing the object is installed.
        """
        if sync:
            durable.fsync_file(tmp_path)
        oid = uuid.uuid4().hex
        os.rename(tmp_path, self.objects / oid)
        if sync:
            durable.fsync_dir(self.objects)
        return oid

    def stage(self, entry: Entry) -> Entry:
        """Make ``entry`` the pending state of its path, atomically and durably.

        Replaces an older pending entry of the same path (and drops that
        entry's object); an entry already taken into the batch is not
        touched, so the sync daemon's batch stays consistent.

        The fsyncs happen outside the lock (it is held only for the rename),
        so downloads of several paths commit in parallel. ``seq`` is a
        nanosecond timestamp: it orders entries and stays monotonic across a
        crash without a counter file to fsync. Per-path order is the
        caller's (the consumers serialise changes of one key); when two
        fetches of one path still race (an event's and a reconcile's), the
        entry whose fetch *started* later (``time``) is kept, since it asked
        S3 later. Returns the entry that is pending afterwards.

        :meth:`prepare` and :meth:`install` are its two halves, for the group
        commit, which makes many prepared entries durable at once.
        """
        tmp = self.prepare(entry)
        kept, drop, dfd = self.install(entry, tmp, dir_fd=True)
        assert dfd is not None
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.drop_objects(drop)
        return kept

    def prepare(self, entry: Entry, sync: bool = True, earlier: Entry | None = None) -> Path:
        """Write ``entry`` to a new file in ``tmp/`` (fsynced unless ``sync=False``).

        ``earlier``: an entry of the same path prepared before and not installed
        yet (a group commit), whose first staging time this one inherits.
        Returns the file for :meth:`install`.
        """
        if entry.op not in OPS:
            raise ValueError(f"unknown op {entry.op!r}")
        previous = earlier or self._read(self.pending / entry_name(entry.path))
        if not entry.activation:
            entry.activation = self.term
        entry.seq = time.time_ns()
        entry.first_time = previous.first_time if previous else entry.time
        tmp = self.tmp / f"entry-{uuid.uuid4().hex}"
        durable.write_new(tmp, json.dumps(asdict(entry), sort_keys=True).encode(), sync=sync)
        return tmp

    def install(self, entry: Entry, tmp: Path, dir_fd: bool = False,
                held: bool = False) -> tuple[Entry, list[str], int | None]:
        """Rename a prepared entry over ``pending/<h>.json`` under the lock (no fsync).

        ``held``: the caller holds :meth:`locked` already (the group commit
        installs a round's entries of one repository under one lock).

        Returns the entry pending afterwards (an already pending one whose
        fetch started later wins, see :meth:`stage`), the objects to drop once
        the rename is durable (never before: a crash would leave the old entry
        without its object), and with ``dir_fd`` an fd on ``pending/`` to fsync
        (opened under the lock: still the right directory if the sync daemon
        renames pending/ to batch/ right after).
        """
        name = entry_name(entry.path)
        dfd = None
        with contextlib.nullcontext() if held else self.locked():
            old = self._read(self.pending / name)
            if old is not None and old.time > entry.time:
                # S3 was asked later for the pending one: it is the fresher view (two
                # fetches of one path raced: an event's and a reconcile's).
                os.unlink(tmp)
                kept = old
                drop = [entry.object] if entry.object and entry.object != old.object else []
            else:
                os.replace(tmp, self.pending / name)
                kept = entry
                drop = [old.object] if old and old.object and old.object != entry.object \
                    else []
            if dir_fd:
                dfd = os.open(self.pending, os.O_RDONLY | os.O_DIRECTORY)
        return kept, drop, dfd

    def drop_objects(self, oids: list[str]) -> None:
        """Remove objects no entry references any more (see :meth:`install`)."""
        for oid in oids:
            self.discard_object(oid)

    def discard_download(self, tmp_path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()

    def discard_object(self, oid: str) -> None:
        """Drop a committed object that no entry references (its staging failed)."""
        with contextlib.suppress(FileNotFoundError):
            (self.objects / oid).unlink()

    # -- readers ---------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> Entry | None:
        try:
            return Entry.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None

    def _entries(self, directory: Path) -> list[Entry]:
        out = []
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".json"):
                try:
                    e = self._read(directory / name)
                except (ValueError, TypeError) as exc:
                    self._quarantine(directory / name, exc)
                    continue
                if e is not None:
                    out.append(e)
        return sorted(out, key=lambda e: e.seq)

    def _quarantine(self, path: Path, exc: Exception) -> None:
        """Move an unreadable entry aside (``corrupt/``) so it never blocks the repository.

        Entries are written atomically, so this means outside interference or
        disk corruption: the path it described is lost from staging, and a
        ``cvmfs-publisher reconcile`` brings it back from the bucket.
        """
        corrupt = self.root / "corrupt"
        if not corrupt.is_dir():
            corrupt.mkdir(mode=0o750)
            self.adopt(corrupt)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, corrupt / f"{path.name}.{uuid.uuid4().hex[:8]}")
        log.error(
            "repository=%s step=staging outcome=corrupt-entry file=%s reason=%s; moved to %s, "
            "run 'cvmfs-publisher reconcile %s'", self.repo, path.name, exc, corrupt, self.repo)

    def pending_entries(self) -> list[Entry]:
        """Pending entries in staging order (seq)."""
        return self._entries(self.pending)

    def pending_count(self) -> int:
        """Pending entries; the directory is listed only when it changed.

        The status report and the receipt writer ask for every repository
        every few seconds: with 1,000 idle repositories the listings were most
        of the consumers' idle CPU. An entry added or removed changes the
        directory's mtime; a change within the timestamp granularity of the
        listing would not, so the count is trusted only once the mtime is old.
        """
        try:
            st = os.stat(self.pending)
            key = (st.st_ino, st.st_mtime_ns)
            cached = self._pending_count
            if cached is not None and cached[0] == key:
                return cached[1]
            n = sum(1 for name in os.listdir(self.pending) if name.endswith(".json"))
        except FileNotFoundError:
            return 0
        self._pending_count = (key, n) if time.time() - st.st_mtime > 0.1 else None
        return n

    def pending_get(self, path: str) -> Entry | None:
        return self._read(self.pending / entry_name(path))

    def staged_get(self, path: str) -> Entry | None:
        """The pending entry of ``path``, else the one in the batch being published.

        No lock: each read sees a whole entry (they are replaced by rename),
        and a batch taken meanwhile only moves the entry from one to the other.
        """
        entry = self.pending_get(path)
        if entry is not None:
            return entry
        try:
            return self._read(self.batch_dir / entry_name(path))
        except (NotADirectoryError, ValueError, TypeError):
            return None

    def object_path(self, entry: Entry) -> Path:
        return self.objects / entry.object

    # -- the sync daemon's side ------------------------------------------------------------

    def batch_entries(self) -> list[Entry]:
        """The batch in progress (after a crash: the one to replay)."""
        return self._entries(self.batch_dir)

    def stale_entries(self) -> list[Entry]:
        """Entries set aside by fencing (see :mod:`cvmfs_publisher.staging.fencing`)."""
        return self._entries(self.stale_dir)

    def has_batch(self) -> bool:
        return self.batch_dir.is_dir()

    def batch_count(self) -> int:
        """Entries in the batch in progress (0 without one)."""
        try:
            return sum(1 for n in os.listdir(self.batch_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return 0

    def take_batch(self) -> list[Entry]:
        """Move every pending entry into ``batch/`` in one rename; returns them.

        If a batch already exists (a crash before it was published or
        cleaned), it is returned unchanged: it must be applied first.
        """
        with self.locked():
            if not self.batch_dir.is_dir():
                if self.pending_count() == 0:
                    return []
                os.rename(self.pending, self.batch_dir)
                self.pending.mkdir(mode=0o750)
                self.adopt(self.pending)
                durable.fsync_dir(self.root)
        return self.batch_entries()

    def finish_batch(self) -> None:
        """The batch is published: drop its entries and their objects.

        Under the lock the batch directory is only renamed aside (``.done-*``,
        made durable): the consumers' installs wait for that rename, not for
        the unlinks of a large batch's objects and entries (seconds for a few
        thousand, measured at the end of a hot repository's publish, when
        they held every repository's group commit back). The unlinks need no
        lock: an object id is unique to one download, so no entry installed
        after the rename can reference an object of the batch. A crash
        before they are done leaves a ``.done-*`` directory that
        :meth:`drop_finished` (before the repository's next publish) or
        :meth:`sweep` (the consumers' start-up) completes; a published batch
        is never replayed.
        """
        done = self.root / f".done-{uuid.uuid4().hex}"
        with self.locked():
            if not self.batch_dir.is_dir():
                return
            os.rename(self.batch_dir, done)
            durable.fsync_dir(self.root)
        self._drop_done(done)

    def drop_finished(self) -> int:
        """Complete the clean-up of published batches a crash interrupted; how many."""
        leftovers = list(self.root.glob(".done-*"))
        for done in leftovers:
            self._drop_done(done)
        return len(leftovers)

    def _drop_done(self, done: Path) -> None:
        """A published batch set aside: its objects no entry references, then itself."""
        # pending before stale: an entry that fencing moves between the two listings is
        # seen in one of them
        live = {e.object for e in self.pending_entries() + self.stale_entries() if e.object}
        for e in self._entries(done):
            if e.object and e.object not in live:
                with contextlib.suppress(FileNotFoundError):
                    (self.objects / e.object).unlink()
        shutil.rmtree(done, ignore_errors=True)

    def sweep(self) -> int:
        """Remove leftovers of a crash: tmp files and unreferenced objects."""
        removed = 0
        with self.locked():
            for name in os.listdir(self.tmp):
                with contextlib.suppress(FileNotFoundError):
                    (self.tmp / name).unlink()
                    removed += 1
            for leftover in self.root.glob(".done-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            live = {e.object for e in
                    self.pending_entries() + self.batch_entries() + self.stale_entries()
                    if e.object}
            for name in os.listdir(self.objects):
                if name not in live:
                    with contextlib.suppress(FileNotFoundError):
                        (self.objects / name).unlink()
                        removed += 1
        return removed

    def exists(self) -> bool:
        """Has this repository a staging area (anything ever staged)?"""
        return self.root.is_dir()

    def remove(self) -> bool:
        """Delete the repository's whole staging area (deprovisioned); True if it was there.

        A symlink in its place is left alone: it was never ours.
        """
        if self.root.is_dir() and not self.root.is_symlink():
            shutil.rmtree(self.root)
            return True
        return False

    def timing(self) -> tuple[float, float] | None:
        """(oldest first_time, newest time) of pending entries, or None when empty."""
        entries = self.pending_entries()
        if not entries:
            return None
        return (min(e.first_time or e.time for e in entries), max(e.time for e in entries))


class PendingTimes:
    """(oldest first_time, newest time) of one repository's pending entries (or batch).

    Why not :meth:`Staging.timing` on every poll: it parses every pending entry,
    and after a reconcile there may be 100,000 of them, twice a second. Here
    the directory is listed only when it changed (its inode or mtime), and an
    entry file is parsed only when it is new (an entry is replaced by rename,
    so a new version is a new inode).
    """

    def __init__(self, staging: Staging, directory: Path | None = None) -> None:
        """``directory``: another entry directory of ``staging`` (``batch_dir``)."""
        self.dir = staging.pending if directory is None else directory
        self._key: tuple[int, int] | None = None
        self._files: dict[str, tuple[int, float, float]] = {}
        self._value: tuple[float, float] | None = None

    def get(self) -> tuple[float, float] | None:
        try:
            st = os.stat(self.dir)
        except FileNotFoundError:
            self._key, self._files, self._value = None, {}, None
            return None
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._key:
            return self._value
        files: dict[str, tuple[int, float, float]] = {}
        try:
            with os.scandir(self.dir) as it:
                for d in it:
                    if not d.name.endswith(".json"):
                        continue
                    try:
                        ino = d.inode()
                        old = self._files.get(d.name)
                        if old is not None and old[0] == ino:
                            files[d.name] = old
                            continue
                        with open(d.path, "rb") as fh:
                            e = Entry.from_dict(json.loads(fh.read()))
                        files[d.name] = (ino, e.first_time or e.time, e.time)
                    except (FileNotFoundError, ValueError):
                        continue  # replaced or taken meanwhile, or not an entry
        except FileNotFoundError:
            files = {}
        self._files = files
        self._value = ((min(v[1] for v in files.values()), max(v[2] for v in files.values()))
                       if files else None)
        # A change within the file system's timestamp granularity after this
        # listing would leave the mtime as it is: trust the key only once it is old.
        self._key = key if time.time() - st.st_mtime > 0.1 else None
        return self._value

    @property
    def count(self) -> int:
        return len(self._files)


def repositories(staging_dir: str | os.PathLike[str]) -> list[str]:
    """Repositories that have a staging directory."""
    try:
        return sorted(d.name for d in Path(staging_dir).iterdir()
                      if d.is_dir() and not d.is_symlink() and not d.name.startswith("."))
    except FileNotFoundError:
        return []
