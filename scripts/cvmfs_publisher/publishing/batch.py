"""Applying one staged batch to one repository: the sync daemon's unit of work.

How a batch is applied
----------------------
1. The repository must exist locally: ``mkfs`` (gateway mode, keys from
   ``cvmfs.keys_dir``) when ``<repositories_dir>/<repo>`` is absent.
2. A transaction left open (``in_transaction.lock``) can only be a crash's
   leftover (this daemon is the repository's only publisher on this host):
   ``abort -f`` first, and say so in the log.
3. The batch is cut into *phases* (:func:`plan`), in staging order:
   transaction phases (files, symlinks, deletions) and ingest phases (one
   tarball each, because ``cvmfs_server ingest`` opens and publishes its own
   transaction and must run outside ours). Two changes of overlapping paths
   (the same path, or one inside the other) keep their staging order; all
   others share as few transactions as possible, so a batch without
   tarballs is exactly one ``transaction`` + ``publish``.
4. A transaction phase whose changes are all already in the published tree
   (the read-only layer ``<spool>/<repo>/rdonly``, never the union, which
   shows an open transaction's unpublished content) is skipped: a batch is
   never published empty, and replaying a batch that was published just
   before a crash adds no revision.
5. ``transaction`` (16 and 17 are retried with backoff, up to
   ``sync.transaction_retries``); the changes are applied inside
   ``<mount_dir>/<repo>`` only, path by path (never a walk of the
   repository: the cost follows the size of the change), through directory
   file descriptors and ``O_NOFOLLOW`` (:class:`Tree`); ``publish``. Any
   failure after ``transaction`` ends in ``abort -f``; when ``abort`` answers
   5 the repository is still in its transaction, so the abort is retried
   (with backoff) before anything else happens to the repository.
6. Only when every phase is published does the caller drop the batch from
   staging (:meth:`BatchPublisher.publish`): the batch survives every crash
   and failure before that point and is applied again, which is harmless
   because every phase is idempotent.

Crash points (SIGKILL of the daemon) and what the next start does:
- during the copy, or between copy and ``publish``: the transaction is still
  open; it is aborted (its half-written content discarded) and the batch,
  still in ``batch/``, is applied again;
- during ``publish``: the real tool leaves the repository in its transaction
  (or publishes, if it got that far); abort if open, then replay. Killed
  alone, the daemon may leave the upload (``cvmfs_swissknife``) running; it
  holds ``is_publishing.lock`` and ``abort`` answers 22 with the lock
  message, so the abort waits for that lock first (:meth:`BatchPublisher.abort`);
- after ``publish``, before staging is cleaned: the replay finds every
  transaction phase already in place and publishes nothing (ingest phases are
  ingested again: their content cannot be compared cheaply);
- a change staged while a batch was in flight is in ``pending/``, applied by
  the next batch, after the replay: an old batch never overwrites it.
"""

from __future__ import annotations

import bisect
import bz2
import contextlib
import errno
import gzip
import logging
import lzma
import os
import shutil
import stat
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ..adapters.cvmfs import (
    EBUSY,
    CvmfsError,
    CvmfsServer,
    NotInTransaction,
    PublishInProgress,
    TransactionBusy,
    TransactionRefused,
    tool_lines,
)
from ..core.backoff import Backoff
from ..core.config import Config
from ..core.errors import PublisherError
from ..core.logs import redact
from ..pipeline.object_keys import UnsafeKey, validate_path
from ..staging.area import Entry, Staging

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
TXN_OPS = ("put", "symlink", "delete")


class PublishError(PublisherError):
    """A step that failed: the batch stays in staging and is retried with backoff.

    ``rc`` is the tool's exit code, or the errno of a failed file operation.
    ``needs_operator``: True when retrying cannot help until someone acts (the
    detail says what to do); the daemon then retries rarely.
    """

    def __init__(self, repository: str, step: str, rc: int, message: str,
                 needs_operator: bool = False) -> None:
        self.step, self.rc, self.detail = step, rc, redact(message)
        self.needs_operator = needs_operator
        super().__init__(f"step={step} rc={rc} error={self.detail}", repository)

    @classmethod
    def from_cvmfs(cls, exc: CvmfsError) -> PublishError:
        detail = _tool_message(exc)
        return cls(exc.repository, exc.step, exc.rc, detail)


def _tool_message(exc: CvmfsError) -> str:
    """The tool's own words, on one line (stderr first, else stdout).

    The first line (usually the cause, e.g. the gateway's reply) and the last
    ones (the verdict); the ``Executed Command:`` and ``Stacktrace:`` trailers
    are only noise.
    """
    for text in (exc.stderr, exc.stdout):
        lines = tool_lines(text)
        if lines:
            picked = list(dict.fromkeys([lines[0], *lines[-3:]]))
            return " | ".join(picked)[:600]
    return "no output"


class _Skip(Exception):
    """An entry that can never be applied as staged (logged, then dropped)."""


@dataclass
class Outcome:
    """What applying one batch did (for logs, status and benchmarks)."""

    repository: str
    entries: int = 0
    written: int = 0
    symlinks: int = 0
    deleted: int = 0
    ingested: int = 0
    ingest_deleted: int = 0
    skipped: int = 0
    unchanged: int = 0
    publishes: int = 0
    transactions: int = 0
    aborted_stale: int = 0
    replay: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def touched(self) -> int:
        """Repository paths written or removed by this daemon (not by ingest)."""
        return self.written + self.symlinks + self.deleted

    def summary(self) -> str:
        return (f"entries={self.entries} written={self.written} symlinks={self.symlinks} "
                f"deleted={self.deleted} ingested={self.ingested} "
                f"ingest_deleted={self.ingest_deleted} unchanged={self.unchanged} "
                f"skipped={self.skipped} publishes={self.publishes} "
                f"took={self.seconds:.2f}s{' replay' if self.replay else ''}")


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    """One ``transaction``+``publish`` (``kind="txn"``) or one tarball (``"ingest"``).

    ``parents``: directories a later ingest needs (in gateway mode the parent
    of ``--base_dir`` must exist); created at the end of the phase.
    """

    kind: str
    entries: list[Entry] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)


def _ancestors(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b`` (proper ancestors, shortest first)."""
    idx = path.find("/")
    while idx != -1:
        yield path[:idx]
        idx = path.find("/", idx + 1)


def plan(entries: list[Entry], is_dir: Callable[[str], bool]) -> list[Phase]:
    """Cut a batch into phases; staging order is kept between overlapping paths.

    Why: ``ingest`` cannot run inside a transaction, so a batch that mixes
    files and tarballs needs several publishes; the fewest that respect the
    order of changes to the same paths. Two paths overlap when one is equal
    to or inside the other (a deletion of ``a`` and a file ``a/b`` must stay
    in order). Inside a transaction phase entries are applied in staging
    order, so overlapping file changes may share a phase; an entry that
    follows an ingest of an overlapping path goes to a phase after it.

    ``is_dir(path)``: is ``path`` a real directory of the published tree now
    (decides whether an ingest-only batch needs a transaction to create the
    parent of its ingest directory). Runs in O(entries x depth).
    """
    phases: list[Phase] = []
    txn_idx: list[int] = []  # indices of transaction phases, ascending
    at: dict[str, int] = {}  # path -> lowest phase allowed for a later overlapping entry
    below: dict[str, int] = {}  # dir -> same, for entries strictly under it
    below_txn: dict[str, int] = {}  # dir -> same, file changes only (may prune the dir)

    def constraint(path: str) -> int:
        lo = at.get(path, 0)
        for a in _ancestors(path):
            lo = max(lo, at.get(a, 0))
        return max(lo, below.get(path, 0))

    def parent_constraint(path: str) -> tuple[int, bool]:
        """For creating ``path``: what could remove it (itself, an ancestor, a
        deletion below it that prunes it) must come first."""
        hits = [at[a] for a in (*_ancestors(path), path) if a in at]
        if path in below_txn:
            hits.append(below_txn[path])
        return max(hits, default=0), bool(hits)

    def record(path: str, value: int, txn: bool) -> None:
        at[path] = max(at.get(path, 0), value)
        for a in _ancestors(path):
            below[a] = max(below.get(a, 0), value)
            if txn:
                below_txn[a] = max(below_txn.get(a, 0), value)

    def txn_at_or_after(lo: int) -> int | None:
        i = bisect.bisect_left(txn_idx, lo)
        return txn_idx[i] if i < len(txn_idx) else None

    def new_txn() -> int:
        phases.append(Phase("txn"))
        txn_idx.append(len(phases) - 1)
        return len(phases) - 1

    for e in sorted(entries, key=lambda x: x.seq):
        if e.is_ingest:
            parent = e.path.rpartition("/")[0]
            if parent and e.op == "ingest":
                lo, conflict = parent_constraint(parent)
                k = txn_at_or_after(lo)
                if k is None and (conflict or not is_dir(parent)):
                    k = new_txn()
                if k is not None and parent not in phases[k].parents:
                    phases[k].parents.append(parent)
            phases.append(Phase("ingest", [e]))
            # Whatever overlaps an ingest and comes later goes after it.
            record(e.path, len(phases), txn=False)
        else:
            lo = constraint(e.path)
            k = txn_at_or_after(lo)
            if k is None:
                k = new_txn()
            phases[k].entries.append(e)
            record(e.path, k, txn=True)
    return phases


# --------------------------------------------------------------------------- the tree


class Tree:
    """A directory tree reached only through directory fds, never following a symlink.

    Why: paths come from users. Every component is opened with
    ``O_NOFOLLOW`` relative to its parent's fd, so a symlink in the
    repository (``evil -> /etc``) can never redirect a write, a deletion or
    a comparison outside ``root``; where a directory is needed and a symlink
    or a file is found, that entry is replaced by a directory (the newer
    change wins, as in the bucket).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.fd = os.open(self.root, _DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_dir(self, parts: list[str], create: bool) -> int | None:
        """fd of the directory ``parts`` (caller closes), or None when absent."""
        fd = os.dup(self.fd)
        try:
            for name in parts:
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if not create:
                        os.close(fd)
                        return None
                    if exc.errno != errno.ENOENT:
                        _remove_at(fd, name)  # a symlink or a file where a directory goes
                    os.mkdir(name, 0o755, dir_fd=fd)
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def split(rel: str) -> tuple[list[str], str]:
        parts = rel.split("/")
        return parts[:-1], parts[-1]

    def lstat(self, rel: str) -> os.stat_result | None:
        """lstat of ``rel`` (None when it, or a real directory on its way, is absent)."""
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=False)
        if pfd is None:
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(pfd)

    def is_dir(self, rel: str) -> bool:
        fd = self.open_dir(rel.split("/") if rel else [], create=False)
        if fd is None:
            return False
        os.close(fd)
        return True

    def readlink(self, rel: str) -> str | None:
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=False)
        if pfd is None:
            return None
        try:
            return os.readlink(name, dir_fd=pfd)
        except OSError:
            return None
        finally:
            os.close(pfd)

    def same_content(self, rel: str, src_fd: int) -> bool:
        """Does the regular file ``rel`` hold exactly the bytes of ``src_fd``?"""
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=False)
        if pfd is None:
            return False
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=pfd)
        except OSError:
            return False
        finally:
            os.close(pfd)
        try:
            os.lseek(src_fd, 0, os.SEEK_SET)
            while True:
                a = os.read(fd, _CHUNK)
                b = os.read(src_fd, _CHUNK)
                if a != b:
                    return False
                if not a:
                    return True
        finally:
            os.close(fd)

    def write_file(self, rel: str, src_fd: int, mode: int) -> None:
        """Replace ``rel`` (whatever it is) with a regular file copied from ``src_fd``."""
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=True)
        assert pfd is not None
        try:
            _remove_at(pfd, name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                os.lseek(src_fd, 0, os.SEEK_SET)
                _copy_fd(src_fd, fd)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(pfd)

    def symlink(self, rel: str, target: str) -> None:
        """Replace ``rel`` with a symlink to ``target`` (data: never resolved)."""
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=True)
        assert pfd is not None
        try:
            _remove_at(pfd, name)
            os.symlink(target, name, dir_fd=pfd)
        finally:
            os.close(pfd)

    def delete(self, rel: str) -> bool:
        """Remove ``rel`` (a directory with its content) and the parents it left empty."""
        dirs, name = self.split(rel)
        pfd = self.open_dir(dirs, create=False)
        if pfd is None:
            return False
        try:
            removed = _remove_at(pfd, name)
        finally:
            os.close(pfd)
        if removed:
            self._prune(dirs)
        return removed

    def _prune(self, dirs: list[str]) -> None:
        """rmdir the now-empty parents, deepest first (S3 has no empty directories)."""
        for depth in range(len(dirs), 0, -1):
            pfd = self.open_dir(dirs[:depth - 1], create=False)
            if pfd is None:
                return
            try:
                os.rmdir(dirs[depth - 1], dir_fd=pfd)
            except OSError:
                return
            finally:
                os.close(pfd)

    def makedirs(self, rel: str) -> None:
        fd = self.open_dir(rel.split("/"), create=True)
        if fd is not None:
            os.close(fd)


def _remove_at(dir_fd: int, name: str) -> bool:
    """Remove ``name`` in ``dir_fd``, whatever its type, never following a symlink."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: symlink-attack safe on Linux
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def _copy_fd(src: int, dst: int) -> None:
    """Kernel-side copy when possible (sendfile), plain read/write otherwise."""
    try:
        while os.sendfile(dst, src, None, 1 << 30) > 0:
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    while True:
        chunk = os.read(src, _CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def file_mode(mode: int) -> int:
    """Only 0755 or 0644 reach the repository (DESIGN §2), whatever was staged."""
    return 0o755 if mode & stat.S_IXUSR else 0o644


# --------------------------------------------------------------------------- tarballs


_MAGIC: list[tuple[bytes, str]] = [(b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
                                   (b"\xfd7zXZ\x00", "xz")]


def _compression(head: bytes, declared: str) -> str:
    """The compression of a tarball, from its first bytes: a ``.tar`` that is in
    fact gzipped is still ingested, and ``declared`` (from the key) is only a hint."""
    del declared
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "none"


def _decompressing(raw: IO[bytes], kind: str) -> IO[bytes]:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(raw, "rb")  # type: ignore[return-value]
    return raw


def _open_object(path: Path) -> IO[bytes]:
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Skip(f"staged object {path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _kind_of(raw: IO[bytes], declared: str) -> str:
    """pread: the fd's position must stay at 0 (the tool reads the fd itself)."""
    return _compression(os.pread(raw.fileno(), 512, 0), declared)


def check_tarball(path: Path, declared: str = "none") -> str:
    """Why this tarball must not be ingested ("" when it may be).

    Why a full pass before ``ingest``: the tool publishes whatever it could
    read, so a truncated or corrupt upload would become a half-published
    directory; and a member that escapes the base directory (absolute,
    ``..``) or a device node has no business in a repository. Streaming
    (``r|``): constant memory for any size.
    """
    try:
        with _open_object(path) as raw:
            dec = _decompressing(raw, _kind_of(raw, declared))
            with tarfile.open(fileobj=dec, mode="r|") as tf:
                while (m := tf.next()) is not None:
                    tf.members = []  # streaming: do not keep every member in memory
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    parts = [p for p in name.split("/") if p not in ("", ".")]
                    if name.startswith("/") or ".." in parts:
                        return f"member {m.name[:200]!r} escapes the base directory"
                    if m.islnk():
                        link = [p for p in m.linkname.split("/") if p not in ("", ".")]
                        if m.linkname.startswith("/") or ".." in link:
                            return f"hard link {m.name[:200]!r} points outside the tarball"
                    elif not (m.isreg() or m.isdir() or m.issym()):
                        return f"member {m.name[:200]!r} is a device or fifo"
    except FileNotFoundError:
        return "staged object is missing"
    except _Skip as exc:
        return str(exc)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        return f"not a readable tar archive: {type(exc).__name__}: {str(exc)[:200]}"
    return ""


@contextlib.contextmanager
def tar_stream(path: Path, declared: str = "none") -> Iterator[IO[bytes]]:
    """An uncompressed tar stream with a real fd, for the tool's standard input.

    ``cvmfs_server ingest`` reads uncompressed tar only; compressed tarballs
    are decompressed on the fly by a thread writing into a pipe, so nothing
    is written to disk and memory stays constant.
    """
    raw = _open_object(path)
    kind = _kind_of(raw, declared)
    if kind == "none":
        with raw:
            yield raw
        return
    r, w = os.pipe()
    out = os.fdopen(w, "wb")
    reader = os.fdopen(r, "rb")
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            with raw, out:
                shutil.copyfileobj(_decompressing(raw, kind), out, _CHUNK)
        except BrokenPipeError:
            pass  # the tool stopped reading: its exit code tells why
        except BaseException as exc:  # reported after the tool returns
            failure.append(exc)

    t = threading.Thread(target=pump, name="tar-decompress", daemon=True)
    t.start()
    try:
        yield reader
    finally:
        reader.close()
        t.join()
    if failure:
        raise OSError(errno.EIO, f"decompressing the tarball failed: {failure[0]}")


# --------------------------------------------------------------------------- publisher


class PublishObserver(Protocol):
    """Told what reached the published tree and what was dropped (the receipt's source).

    Called on the publishing thread, right after the fact; must not raise.
    """

    def published(self, repo: str, entries: list[Entry]) -> None:
        """``entries`` are in the published tree now (one publish, or found already there)."""

    def skipped(self, repo: str, entry: Entry, why: str) -> None:
        """``entry`` can never be applied as staged and was dropped from its batch."""


class BatchPublisher:
    """Applies staged batches with ``cvmfs_server`` (one repository per call, thread-safe).

    ``stop``: set on SIGTERM; waits (retries) give up early, but a phase in
    hand is finished (published or aborted). ``on_problem(repo, text)`` is
    told about a repository stuck in a failing abort, so the status document
    can show it while the retries go on.
    """

    #: ``transaction`` answering 16 for longer than this is no publish of
    #: another host any more (the real tool took 9.7 s for 200 MB): the lease
    #: is reported as held, with the way out.
    lease_held_after = 120.0

    def __init__(self, cfg: Config, server: CvmfsServer | None = None,
                 stop: threading.Event | None = None,
                 on_problem: Callable[[str, str], None] | None = None,
                 observer: PublishObserver | None = None) -> None:
        self.cfg = cfg
        self.observer = observer
        self.server = server or CvmfsServer(cfg.cvmfs)
        self.stop = stop or threading.Event()
        self.on_problem = on_problem or (lambda repo, text: None)
        self._busy_since: dict[str, float] = {}  # repo -> first 16 of the current streak

    # -- entry points ----------------------------------------------------------------

    def staging(self, repo: str) -> Staging:
        return Staging(self.cfg.cvmfs.staging_dir, repo)

    def publish(self, repo: str, take_pending: bool = True) -> Outcome | None:
        """Apply the leftover batch (or, with ``take_pending``, take a new one).

        Returns None when there was nothing to publish. Raises
        :class:`PublishError`; the batch then stays in staging.
        """
        st = self.staging(repo)
        if not st.root.is_dir():
            return None
        stale = self.server.exists(repo) and self.recover(repo)
        replay = st.has_batch()
        entries = st.take_batch() if (take_pending or replay) else []
        if replay and not entries:
            st.finish_batch()  # an empty leftover would block every later batch
            entries = st.take_batch() if take_pending else []
            replay = False
        if not entries:
            return None
        outcome = self.apply(repo, st, entries)
        outcome.replay = replay
        outcome.aborted_stale += int(stale)
        st.finish_batch()
        return outcome

    def recover(self, repo: str) -> bool:
        """Abort a transaction left open by a crash; True if there was one."""
        if not self.server.in_transaction(repo):
            return False
        log.warning("repository=%s step=recover outcome=stale-transaction: "
                    "in_transaction.lock found, aborting it (abort -f)", repo)
        self.abort(repo)
        return True

    def ensure_repository(self, repo: str) -> bool:
        """mkfs (gateway mode) when absent; True if it was created."""
        if self.server.exists(repo):
            return False
        log.info("repository=%s step=mkfs outcome=creating: absent from %s, keys from %s",
                 repo, self.cfg.cvmfs.repositories_dir, self.cfg.cvmfs.keys_dir)
        try:
            self.server.mkfs_gateway(repo, self.cfg.cvmfs.keys_dir)
        except CvmfsError as exc:
            raise PublishError.from_cvmfs(exc) from None
        return True

    # -- one batch -------------------------------------------------------------------

    def apply(self, repo: str, st: Staging, entries: list[Entry]) -> Outcome:
        """Publish ``entries`` into ``repo`` (does not touch staging)."""
        t0 = time.monotonic()
        out = Outcome(repo, entries=len(entries))
        good = []
        for e in entries:
            try:
                validate_path(e.path)
                if e.op not in (*TXN_OPS, "ingest", "ingest-delete"):
                    raise _Skip(f"unknown op {e.op!r}")
            except (UnsafeKey, _Skip) as exc:
                self._skipped(repo, e, str(exc), out)
                continue
            good.append(e)
        self.ensure_repository(repo)
        if self.recover(repo):
            out.aborted_stale += 1
        with self._tree(repo) as tree:
            phases = plan(good, tree.is_dir)
        for phase in phases:
            if phase.kind == "txn":
                self._txn_phase(repo, st, phase, out)
            else:
                self._ingest_phase(repo, st, phase.entries[0], out)
        out.seconds = time.monotonic() - t0
        return out

    def _tree(self, repo: str, step: str = "open") -> Tree:
        """The published layer (``<spool>/<repo>/rdonly``), as a :class:`Tree`.

        Why not the union ``/cvmfs/<repo>``: while a transaction is open (one
        left by a publish still running as an orphan, say) it shows the
        unpublished content, and "already published" would drop a batch that
        was never published (cvmfs README §10). PublishError if unusable.
        """
        published = self.server.published(repo)
        try:
            return Tree(published)
        except OSError as exc:
            code = exc.errno or -1
            raise PublishError(repo, step, code, f"{errno.errorcode.get(code, code)} "
                               f"{exc.strerror} ({published})") from None

    def _skipped(self, repo: str, e: Entry, why: str, out: Outcome) -> None:
        out.skipped += 1
        out.errors.append(f"{e.path}: {why}")
        if self.observer is not None:
            self.observer.skipped(repo, e, why)
        log.error("repository=%s step=apply path=%r op=%s key=%r rc=- error=%s "
                  "outcome=skipped (the next change of this key, or a reconcile, "
                  "brings it)", repo, e.path[:300], e.op, e.key[:300], why)

    # -- transaction phases ------------------------------------------------------------

    def _in_place(self, tree: Tree, st: Staging, phase: Phase) -> bool:
        """Is every change of the phase already in the published tree?"""
        try:
            return self._all_in_place(tree, st, phase)
        except _Skip:
            return False

    def _all_in_place(self, tree: Tree, st: Staging, phase: Phase) -> bool:
        for p in phase.parents:
            if not tree.is_dir(p):
                return False
        for e in phase.entries:
            cur = tree.lstat(e.path)
            if e.op == "delete":
                if cur is not None:
                    return False
            elif e.op == "symlink":
                if cur is None or not stat.S_ISLNK(cur.st_mode) \
                        or tree.readlink(e.path) != self._link_target(st, e):
                    return False
            else:
                if cur is None or not stat.S_ISREG(cur.st_mode) \
                        or stat.S_IMODE(cur.st_mode) != file_mode(e.mode):
                    return False
                try:
                    with _open_object(st.object_path(e)) as obj:
                        if os.fstat(obj.fileno()).st_size != cur.st_size \
                                or not tree.same_content(e.path, obj.fileno()):
                            return False
                except (OSError, _Skip):
                    return False
        return True

    @staticmethod
    def _link_target(st: Staging, e: Entry) -> str:
        if e.target:
            return e.target
        try:
            with _open_object(st.object_path(e)) as obj:
                return obj.read(4096).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Skip(f"symlink without a readable target: {exc}") from None

    def _txn_phase(self, repo: str, st: Staging, phase: Phase, out: Outcome) -> None:
        with self._tree(repo) as tree:
            if self._in_place(tree, st, phase):
                out.unchanged += len(phase.entries)
                log.info("repository=%s step=apply outcome=already-published entries=%d "
                         "(nothing to publish)", repo, len(phase.entries))
                self._observe(repo, phase.entries)
                return
        self._open_transaction(repo)
        out.transactions += 1
        step = "apply"
        applied = []
        try:
            with Tree(self.server.union(repo)) as tree:
                for e in phase.entries:
                    if self._apply_entry(repo, tree, st, e, out):
                        applied.append(e)
                for p in phase.parents:
                    tree.makedirs(p)
            step = "publish"
            self.server.publish(repo)
        except BaseException as exc:
            # Whatever happened (even KeyboardInterrupt), never leave it open.
            self.abort(repo)
            if isinstance(exc, CvmfsError):
                raise PublishError.from_cvmfs(exc) from None
            if isinstance(exc, OSError):
                code = exc.errno or -1
                where = exc.filename or ""
                raise PublishError(repo, step, code,
                                   f"{errno.errorcode.get(code, code)} {exc.strerror}"
                                   f"{f' ({where})' if where else ''}") from None
            raise
        out.publishes += 1
        self._observe(repo, applied)

    def _observe(self, repo: str, entries: list[Entry]) -> None:
        if self.observer is not None and entries:
            self.observer.published(repo, entries)

    def _apply_entry(self, repo: str, tree: Tree, st: Staging, e: Entry, out: Outcome) -> bool:
        """Apply one entry in the open transaction; False when it was skipped."""
        try:
            if e.op == "delete":
                if tree.delete(e.path):
                    out.deleted += 1
            elif e.op == "symlink":
                target = self._link_target(st, e)
                if not target or "\x00" in target:
                    raise _Skip("empty or NUL-containing symlink target")
                tree.symlink(e.path, target)
                out.symlinks += 1
            else:
                try:
                    obj = _open_object(st.object_path(e))
                except FileNotFoundError:
                    raise _Skip(f"staged object {e.object!r} is missing") from None
                with obj:
                    tree.write_file(e.path, obj.fileno(), file_mode(e.mode))
                out.written += 1
        except _Skip as exc:
            self._skipped(repo, e, str(exc), out)
            return False
        return True

    def _open_transaction(self, repo: str) -> None:
        """``transaction``; 16 (lease busy) and 17 (already open) are retried."""
        retries = max(0, self.cfg.sync.transaction_retries)
        backoff = Backoff(min(0.5, self.cfg.sync.backoff_initial),
                          min(5.0, self.cfg.sync.backoff_max))
        attempt = 0
        while True:
            attempt += 1
            self.recover(repo)
            try:
                self.server.transaction(repo)
                self._busy_since.pop(repo, None)
                return
            except TransactionRefused as exc:
                raise PublishError(
                    repo, exc.step, exc.rc,
                    f"{_tool_message(exc)} | the gateway refuses every transaction of this "
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
                            "attempt=%d/%d in %.2fs", repo, exc.rc, _tool_message(exc),
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
                f"(max_lease_time, 2 h) | {_tool_message(exc)}")

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
                self.server.abort(repo)
                log.info("repository=%s step=abort outcome=aborted", repo)
                return
            except NotInTransaction:
                return
            except PublishInProgress as exc:
                self._wait_for_publish(repo, exc)
            except CvmfsError as exc:
                if not self.server.in_transaction(repo):
                    log.warning("repository=%s step=abort rc=%d error=%s outcome=not in a "
                                "transaction any more", repo, exc.rc, _tool_message(exc))
                    return
                delay = backoff.next()
                msg = _tool_message(exc)
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
        lock = self.server.publish_lock(repo)
        log.warning("repository=%s step=abort rc=%d error=%s outcome=waiting: a publish still "
                    "holds %s (orphaned by a daemon killed alone?), waiting up to %.0fs for "
                    "it to end before aborting", repo, exc.rc, _tool_message(exc), lock, limit)
        self.on_problem(repo, f"abort waits for a running publish ({lock})")
        t0 = time.monotonic()
        while not self.server.wait_publish_lock(repo, timeout=min(1.0, limit)):
            waited = time.monotonic() - t0
            if self.stop.is_set() or waited >= limit:
                why = "shutting down" if self.stop.is_set() else f"still held after {waited:.0f}s"
                raise PublishError(repo, "abort", exc.rc,
                                   f"{_tool_message(exc)} ({why}: the publish holding {lock} "
                                   "has not ended; if no cvmfs_server or cvmfs_swissknife "
                                   "process of this repository runs, the lock is stale and the "
                                   "next try takes it over; retried later)") from None
        log.info("repository=%s step=abort outcome=publish ended after %.1fs, aborting now",
                 repo, time.monotonic() - t0)

    # -- ingest phases ---------------------------------------------------------------

    def _ingest_phase(self, repo: str, st: Staging, e: Entry, out: Outcome) -> None:
        """``ingest -d`` the old directory, then ``ingest -t -`` the tarball (two
        calls: gateway mode refuses ``-d`` with ``-t``)."""
        obj = st.object_path(e)
        if e.op == "ingest":
            why = check_tarball(obj, e.compression)
            if why:
                self._skipped(repo, e, f"tarball refused: {why}", out)
                return
        self.recover(repo)
        with self._tree(repo) as tree:
            present = tree.lstat(e.path) is not None
        if present:
            self._ingest_call(repo, lambda: self.server.ingest_delete(repo, e.path))
            out.publishes += 1
            if e.op == "ingest-delete":
                out.ingest_deleted += 1
        if e.op == "ingest":
            def ingest() -> Any:
                with tar_stream(obj, e.compression) as stream:
                    return self.server.ingest_tar(repo, e.path, stream)
            self._ingest_call(repo, ingest)
            out.publishes += 1
            out.ingested += 1
        self._observe(repo, [e])

    def _ingest_call(self, repo: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except CvmfsError as exc:
            if self.server.in_transaction(repo):  # ingest aborts itself; make sure
                self.abort(repo)
            raise PublishError.from_cvmfs(exc) from None
        except (OSError, _Skip) as exc:
            if self.server.in_transaction(repo):
                self.abort(repo)
            code = getattr(exc, "errno", None) or -1
            raise PublishError(repo, "ingest", code, str(exc)) from None
