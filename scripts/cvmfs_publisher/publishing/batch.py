"""Applying one staged batch to one repository: the sync daemon's unit of work.

The repository is reached through the publish backend
(:mod:`cvmfs_publisher.publishing.backend`; today ``cvmfs_server``), its
transactions through :mod:`cvmfs_publisher.publishing.transactions`.

How a batch is applied
----------------------
1. The repository must exist locally: created (gateway mode, keys from
   ``cvmfs.keys_dir``) when absent, or when a failed mkfs left it half made
   (:meth:`cvmfs_publisher.adapters.cvmfs.CvmfsServer.create_repository`).
2. A transaction left open (``in_transaction.lock``) can only be a crash's
   leftover (this daemon is the repository's only publisher on this host):
   ``abort -f`` first, once per batch, and say so in the log.
3. The batch is cut into *phases* (:func:`cvmfs_publisher.publishing.plan.plan`), in staging order:
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
   file descriptors and ``O_NOFOLLOW`` (:mod:`cvmfs_publisher.publishing.tree`);
   ``publish``. Any
   failure after ``transaction`` ends in ``abort -f``; when ``abort`` answers
   5 the repository is still in its transaction, so the abort is retried
   (with backoff) before anything else happens to the repository.
6. Around it, the two guarantees of DESIGN §3's self-healing and scale-out
   (:mod:`cvmfs_publisher.staging.fencing`, :mod:`cvmfs_publisher.staging.manifest`):
   before a batch is taken, entries staged in a consumer term that is not
   live are set aside (a host that lost the active-consumer role never
   publishes what it staged unchecked); and the manifest of what this host
   published is kept true: checked against the published revision before
   the batch (rebuilt by walking the published tree when it is not of it,
   while this host is active), and the batch folded into it afterwards.
7. Only when every phase is published does the caller drop the batch from
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

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ..adapters.cvmfs import (
    CvmfsError,
    CvmfsServer,
)
from ..core import tarballs
from ..core.config import Config
from ..pipeline.object_keys import UnsafeKey, validate_path
from ..staging import fencing, manifest
from ..staging.area import Entry, Staging
from .backend import PublishBackend, TreeReader, TreeWriter
from .cvmfs_backend import CvmfsBackend
from .errors import PublishError
from .plan import Phase, plan
from .transactions import Transactions
from .tree import READ_FLAGS, file_mode

log = logging.getLogger(__name__)

TXN_OPS = ("put", "symlink", "delete")
#: Seconds before a manifest rebuild that failed (published tree unreadable) is tried again.
MANIFEST_RETRY = 60.0


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
    skipped_paths: list[str] = field(default_factory=list)
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


def _open_object(path: Path) -> IO[bytes]:
    """A staged object, opened without following a link; _Skip unless a regular file."""
    fd = os.open(path, READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Skip(f"staged object {path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def check_tarball(path: Path) -> str:
    """Why the staged tarball must not be ingested ("" when it may be)."""
    try:
        with _open_object(path) as raw:
            return tarballs.check(raw)
    except FileNotFoundError:
        return "staged object is missing"
    except _Skip as exc:
        return str(exc)


class PublishObserver(Protocol):
    """Told what reached the published tree and what was dropped (the receipt's source).

    Called on the publishing thread, right after the fact; must not raise.
    """

    def published(self, repo: str, entries: list[Entry]) -> None:
        """``entries`` are in the published tree now (one publish, or found already there)."""

    def skipped(self, repo: str, entry: Entry, why: str) -> None:
        """``entry`` can never be applied as staged and was dropped from its batch."""


class BatchPublisher:
    """Applies staged batches through the publish backend (one repository per call, thread-safe).

    ``stop``: set on SIGTERM; waits (retries) give up early, but a phase in
    hand is finished (published or aborted). ``on_problem(repo, text)`` is
    told about a repository stuck in a failing abort, so the status document
    can show it while the retries go on. ``observer`` is told what each
    phase published and what was skipped (the receipt, :mod:`.receipts`).
    """

    def __init__(self, cfg: Config, server: CvmfsServer | None = None,
                 stop: threading.Event | None = None,
                 on_problem: Callable[[str, str], None] | None = None,
                 backend: PublishBackend | None = None,
                 observer: PublishObserver | None = None) -> None:
        self.cfg = cfg
        self.observer = observer
        self.backend = backend or CvmfsBackend(server or CvmfsServer(cfg.cvmfs))
        self.stop = stop or threading.Event()
        self.on_problem = on_problem or (lambda repo, text: None)
        self.transactions = Transactions(cfg, self.backend, self.stop, self._problem)
        self._manifest_retry_at: dict[str, float] = {}  # after a failed rebuild

    def _problem(self, repo: str, text: str) -> None:
        """Through self: a caller may set ``on_problem`` after construction."""
        self.on_problem(repo, text)

    # -- entry points ----------------------------------------------------------------

    def staging(self, repo: str) -> Staging:
        return Staging(self.cfg.cvmfs.staging_dir, repo)

    def publish(self, repo: str, take_pending: bool = True) -> Outcome | None:
        """Apply the leftover batch (or, with ``take_pending``, take a new one).

        Returns None when there was nothing to publish. Raises
        :class:`PublishError`; the batch then stays in staging.
        """
        st = self.staging(repo)
        if not st.exists():
            return None
        # Once per batch, before anything else: a transaction a crash left open.
        checked = self.backend.exists(repo)
        stale = checked and self.transactions.recover(repo)
        st.drop_finished()  # a published batch whose clean-up a crash interrupted
        # Fencing: what a consumer staged in a term that is not live (this host lost
        # the active-consumer role, or died) may be stale: set aside, never published.
        fencing.fence(st)
        replay = st.has_batch()
        entries = st.take_batch() if (take_pending or replay) else []
        if replay and not entries:
            st.finish_batch()  # an empty leftover would block every later batch
            entries = st.take_batch() if take_pending else []
            replay = False
        if not entries:
            self.keep_manifest(repo, st)
            return None
        before = self.backend.revision(repo) if checked else None
        if checked:
            self.keep_manifest(repo, st, before)
        outcome = self.apply(repo, st, entries, recovered=checked)
        outcome.replay = replay
        outcome.aborted_stale += int(stale)
        skipped = set(outcome.skipped_paths)
        manifest.record_publish(st, [e for e in entries if e.path not in skipped], before,
                                self.backend.revision(repo))
        st.finish_batch()
        return outcome

    def keep_manifest(self, repo: str, st: Staging, revision: int | None = None) -> str:
        """Make the manifest describe the published revision while this host is the
        repository's active consumer (walk and hash the published tree once when it
        does not: missing, or another host published since); see
        :func:`cvmfs_publisher.staging.manifest.ensure`. A host that is not active
        leaves it alone (it would rebuild after each of the other host's publishes).
        """
        if fencing.live_term(st) is None or not self.backend.exists(repo):
            return "not active"
        if revision is None:
            revision = self.backend.revision(repo)
        try:
            return manifest.ensure(st, self.backend.where(repo), revision)
        except OSError as exc:
            self._manifest_retry_at[repo] = time.monotonic() + MANIFEST_RETRY
            log.warning("repository=%s step=manifest outcome=not-rebuilt reason=%s; the "
                        "consumers' reconcile waits for it; retry in %.0fs", repo, exc,
                        MANIFEST_RETRY)
            return "failed"

    def manifest_stale(self, repo: str) -> bool:
        """Cheap (every poll): is this host active with no manifest of the published
        revision? (The scheduler then runs :meth:`keep_manifest`.)"""
        if time.monotonic() < self._manifest_retry_at.get(repo, 0.0):
            return False
        st = self.staging(repo)
        if fencing.live_term(st) is None:
            return False
        revision = self.backend.revision(repo)
        return revision is not None and manifest.peek_revision(st.root) != revision

    def ensure_repository(self, repo: str) -> bool:
        """Create the repository when absent (True if it was created).

        Through the one mkfs path, without its leftover check: judging and
        removing a failed mkfs is the provisioner's business (see
        :meth:`CvmfsServer.create_repository`).
        """
        if self.backend.exists(repo):
            return False
        try:
            return self.backend.create_repository(repo, self.cfg.cvmfs.keys_dir)
        except CvmfsError as exc:
            raise PublishError.from_cvmfs(exc) from None

    # -- one batch -------------------------------------------------------------------

    def apply(self, repo: str, st: Staging, entries: list[Entry],
              recovered: bool = False) -> Outcome:
        """Publish ``entries`` into ``repo`` (does not touch staging).

        ``recovered``: the caller already aborted a stale transaction of this
        repository for this batch (:meth:`publish` does), so it is not looked
        for again. Every phase leaves the repository out of its transaction
        (published or aborted), so later phases need no recovery either.
        """
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
        if not recovered and self.transactions.recover(repo):
            out.aborted_stale += 1
        published = _Published(self, repo)
        try:
            phases = plan(good, published.tree().is_dir)
            for phase in phases:
                if phase.kind == "txn":
                    self._txn_phase(repo, st, phase, out, published)
                else:
                    self._ingest_phase(repo, st, phase.entries[0], out, published)
        finally:
            published.close()
        out.seconds = time.monotonic() - t0
        return out

    def _tree(self, repo: str, step: str = "open") -> TreeReader:
        """The published revision's tree (PublishError if unusable)."""
        try:
            return self.backend.reader(repo)
        except OSError as exc:
            code = exc.errno or -1
            raise PublishError(repo, step, code, f"{errno.errorcode.get(code, code)} "
                               f"{exc.strerror} ({self.backend.where(repo)})") from None

    def _skipped(self, repo: str, e: Entry, why: str, out: Outcome) -> None:
        out.skipped += 1
        out.skipped_paths.append(e.path)
        out.errors.append(f"{e.path}: {why}")
        if self.observer is not None:
            self.observer.skipped(repo, e, why)
        log.error("repository=%s step=apply path=%r op=%s key=%r rc=- error=%s "
                  "outcome=skipped (the next change of this key, or a reconcile, "
                  "brings it)", repo, e.path[:300], e.op, e.key[:300], why)

    # -- transaction phases ------------------------------------------------------------

    def _entry_in_place(self, tree: TreeReader, st: Staging, e: Entry) -> bool:
        """Does the published tree hold this change already (same type, mode, content)?"""
        try:
            return self._holds(tree, st, e)
        except _Skip:  # a symlink without a readable target: applying it skips it
            return False

    def _holds(self, tree: TreeReader, st: Staging, e: Entry) -> bool:
        cur = tree.lstat(e.path)
        if e.op == "delete":
            return cur is None
        if cur is None:
            return False
        if e.op == "symlink":
            return stat.S_ISLNK(cur.st_mode) and tree.readlink(e.path) == self._link_target(st, e)
        if not stat.S_ISREG(cur.st_mode) or stat.S_IMODE(cur.st_mode) != file_mode(e.mode):
            return False
        try:
            with _open_object(st.object_path(e)) as obj:
                return (os.fstat(obj.fileno()).st_size == cur.st_size
                        and tree.same_content(e.path, obj.fileno()))
        except (OSError, _Skip):
            return False

    @staticmethod
    def _link_target(st: Staging, e: Entry) -> str:
        if e.target:
            return e.target
        try:
            with _open_object(st.object_path(e)) as obj:
                return obj.read(4096).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Skip(f"symlink without a readable target: {exc}") from None

    def _txn_phase(self, repo: str, st: Staging, phase: Phase, out: Outcome,
                   published: _Published) -> None:
        reader = published.tree()
        in_place = {e.path for e in phase.entries if self._entry_in_place(reader, st, e)}
        if len(in_place) == len(phase.entries) and all(reader.is_dir(p)
                                                       for p in phase.parents):
            out.unchanged += len(phase.entries)
            log.info("repository=%s step=apply outcome=already-published entries=%d "
                     "(nothing to publish)", repo, len(phase.entries))
            self._observe(repo, phase.entries)
            return
        # A change published already (an event delivered again after a lost broker
        # connection, while the rest of the phase is new) is not written again:
        # rewriting it would publish that path a second time.
        out.unchanged += len(in_place)
        published.changed()  # a new revision (or an abort) follows: read it afresh
        self.transactions.open(repo)
        out.transactions += 1
        step = "apply"
        applied = []
        try:
            with self.backend.writer(repo) as tree:
                for e in phase.entries:
                    if e.path not in in_place and self._apply_entry(repo, tree, st, e, out):
                        applied.append(e)
                for p in phase.parents:
                    tree.makedirs(p)
            step = "publish"
            self.backend.publish(repo, nice=self._nice(repo, applied))
        except BaseException as exc:
            # Whatever happened (even KeyboardInterrupt), never leave it open.
            self.transactions.abort(repo)
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
        # with the revision this publish made, as before (the receipt's record)
        self._observe(repo, applied + [e for e in phase.entries if e.path in in_place])

    def _nice(self, repo: str, applied: list[Entry]) -> int:
        """The niceness of this publish: ``sync.bulk_nice`` for a bulk one, else 0.

        Why: on a publisher host every ``cvmfs_server publish`` compresses
        and hashes its files; one of thousands of entries keeps the cores
        busy for seconds, and a one-file publish of another repository that
        overlaps it took two to three times as long (bench_scale's hot/quiet
        trials). Nicer, the bulk publish still gets every idle cycle, and it
        is never starved: the kernel's fair scheduler gives a nice-10
        process about a tenth of a contended core's time.
        """
        c = self.cfg.sync
        size = sum(e.size for e in applied)
        if c.bulk_nice and ((c.bulk_entries and len(applied) > c.bulk_entries)
                            or (c.bulk_bytes and size > c.bulk_bytes)):
            log.info("repository=%s step=publish outcome=bulk entries=%d bytes=%d nice=+%d "
                     "(small publishes of other repositories go first)", repo,
                     len(applied), size, c.bulk_nice)
            return c.bulk_nice
        return 0

    def _observe(self, repo: str, entries: list[Entry]) -> None:
        if self.observer is not None and entries:
            self.observer.published(repo, entries)

    def _apply_entry(self, repo: str, tree: TreeWriter, st: Staging, e: Entry,
                     out: Outcome) -> bool:
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

    # -- ingest phases ---------------------------------------------------------------

    def _ingest_phase(self, repo: str, st: Staging, e: Entry, out: Outcome,
                      published: _Published) -> None:
        """``ingest -d`` the old directory, then ``ingest -t -`` the tarball (two
        calls: gateway mode refuses ``-d`` with ``-t``)."""
        obj = st.object_path(e)
        if e.op == "ingest":
            why = check_tarball(obj)
            if why:
                self._skipped(repo, e, f"tarball refused: {why}", out)
                return
        present = published.tree().lstat(e.path) is not None
        if present or e.op == "ingest":
            published.changed()  # each ingest call is a new revision
        if present:
            self._ingest_call(repo, lambda: self.backend.ingest_delete(repo, e.path))
            out.publishes += 1
            if e.op == "ingest-delete":
                out.ingest_deleted += 1
        if e.op == "ingest":
            def ingest() -> Any:
                with tarballs.stream(_open_object(obj)) as stream:
                    return self.backend.ingest_tar(repo, e.path, stream)
            self._ingest_call(repo, ingest)
            out.publishes += 1
            out.ingested += 1
        self._observe(repo, [e])

    def _ingest_call(self, repo: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except CvmfsError as exc:
            if self.backend.in_transaction(repo):  # ingest aborts itself; make sure
                self.transactions.abort(repo)
            raise PublishError.from_cvmfs(exc) from None
        except (OSError, _Skip) as exc:
            if self.backend.in_transaction(repo):
                self.transactions.abort(repo)
            code = getattr(exc, "errno", None) or -1
            raise PublishError(repo, "ingest", code, str(exc)) from None


class _Published:
    """The published tree of one repository during one batch, opened once per revision.

    Why: it is read before every phase (is it already in place, is the
    ingest directory there), and only a publish changes it: a new revision
    is a new mount, so after :meth:`changed` the next :meth:`tree` opens it
    again; until then every phase reads through the same directory fd.
    """

    def __init__(self, publisher: BatchPublisher, repo: str) -> None:
        self.publisher, self.repo = publisher, repo
        self._tree: TreeReader | None = None

    def tree(self) -> TreeReader:
        if self._tree is None:
            self._tree = self.publisher._tree(self.repo)
        return self._tree

    def changed(self) -> None:
        self.close()

    def close(self) -> None:
        tree, self._tree = self._tree, None
        if tree is not None:
            tree.__exit__(None, None, None)
