"""Reconcile: bring a repository back in line with its bucket (DESIGN §3, Self-healing).

Run by the consumers by themselves (:mod:`cvmfs_publisher.pipeline.anti_entropy`:
after provisioning, after an outage, after a failover, periodically) and by
an operator (``cvmfs-publisher reconcile``). Only the differences are
downloaded and staged, and the sync daemon publishes them like any other
change (its locking, coalescing and crash safety apply).

Two ways to know what is published, cheapest first:

1. **The manifest** (:mod:`cvmfs_publisher.staging.manifest`): what this
   host's sync daemon published, with the ETag and Last-Modified of each
   path's source object. When it describes the published revision, the
   bucket listing is compared with it and nothing is read from the
   repository: the cost of an in-sync repository is one listing.
2. **Walk and hash** (when there is no trustworthy manifest: missing,
   unreadable, or of another revision): walk the published tree
   ``<mount_dir>/<repo>`` with ``os.scandir``, never following a symlink,
   descending only into directories the bucket needs; compare type, then
   size, then, only for same-size files, the content hash (the ETag is the
   MD5 of a single-part upload; multipart ETags are checked for the usual
   part sizes; when it cannot be decided the object is staged, which is
   safe). The paths found in sync rebuild the manifest (for the revision
   walked, and only if no publish happened meanwhile), so this happens once.

Either way the bucket's ``cvmfs/`` prefix is listed page by page
(ListObjectsV2: key, size, ETag, Last-Modified; no per-object HEAD) and each
key mapped to its repository path with
:func:`cvmfs_publisher.pipeline.object_keys.map_key` (the consumers' rule),
and every difference is staged with :class:`cvmfs_publisher.staging.area.Staging`:
deletions directly, other changes exactly as the consumers stage an event
(:func:`cvmfs_publisher.pipeline.fetch.stage_key`: a GET streamed to disk,
whose metadata and first bytes decide file mode or symlink).

Not counted as differences: a path whose change is already staged (its
event arrived and waits to be published), and, with ``grace``, an object
modified in the last ``grace`` seconds (its event is probably on its way;
the next reconcile sees it). So :attr:`Plan.staged` counts the events that
were lost.

Kept although absent from the bucket: the directories that tarball
ingestion owns (``<tarball_dir>/<tarball path>`` of every tarball in the
bucket; their content comes from the tarball, not from keys), any
``.cvmfs*`` entry (catalog markers; keys may never create one), and the
``new_repository`` placeholder that ``mkfs`` puts at the root of a new
repository (it is CernVM-FS's, not the user's; nothing is gained by
publishing its removal).

Not compared by the walk without ``check_modes``: the mode of same-content
files (it is in object metadata, which a listing does not return; checking
it costs one HEAD per file). Files whose mode is neither 0644 nor 0755 are
always restaged. Tarball content is not compared (that means reading every
tarball): a tarball whose directory exists is taken as ingested unless
``reingest`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.rgw import RGW, boto3_list_page, classify
from ..core.config import Config
from ..core.errors import Permanent, PublisherError, Transient
from ..core.names import label_of, validate_repository
from ..pipeline import object_keys
from ..pipeline.fetch import stage_key
from ..staging import manifest as manifests
from ..staging.area import Entry, Staging, ancestors
from ..staging.manifest import Manifest, Record

log = logging.getLogger(__name__)

#: Root entries that mkfs creates and the bucket never holds.
KEEP_AT_ROOT = frozenset({manifests.MKFS_PLACEHOLDER})
_MIB = 1 << 20
_COMMON_PART_SIZES = (5, 8, 10, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512)
_CHUNK = 1 << 20


class ReconcileError(PublisherError):
    """Reconcile cannot run (repository not mounted, bucket unreachable...)."""


class ManifestPending(Transient):
    """No manifest yet where the published tree is not visible: the sync daemon writes
    one before its next publish. Transient, but not an S3 failure: the anti-entropy
    must not read it as an outage (whose end reconciles again at once)."""


@dataclass
class Wanted:
    """What the bucket says one repository path should be."""

    kind: str  # keys.FILE / keys.SYMLINK_RCLONE / keys.TARBALL
    key: str
    size: int
    etag: str
    modified: float


@dataclass
class Change:
    """One difference, staged as one entry."""

    op: str  # put | delete | ingest (symlink or file is decided at download)
    path: str
    reason: str
    key: str = ""
    size: int = 0
    kind: str = object_keys.FILE  # map_key: file, rclone symlink, tarball
    etag: str = ""

    def line(self) -> str:
        mark = {"put": "+" if self.reason == "missing" else "~", "delete": "-",
                "ingest": "+" if self.reason == "missing" else "~"}.get(self.op, "?")
        src = f"  <- {self.key}" if self.key else ""
        return f"{mark} {self.op:<7} {self.path}  ({self.reason}){src}"


@dataclass
class Plan:
    """The differences found, and what was done about them (printable)."""

    repository: str
    bucket: str
    prefix: str
    dry_run: bool
    objects: int = 0
    ignored: int = 0
    tree_entries: int = 0
    hashed: int = 0
    in_sync: int = 0
    kept: int = 0
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    staged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "walk"  # "manifest": compared with the manifest; "walk": tree walked
    in_flight: int = 0  # differences already staged (their events arrived)
    recent: int = 0  # objects younger than the grace period (left to their events)
    rebuilt: bool = False  # the walk rebuilt the manifest

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            name = "add" if c.reason == "missing" else "delete" if c.op == "delete" else "update"
            out[name] = out.get(name, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        return not self.failed

    def render(self, limit: int | None = None) -> str:
        """The plan as text: a header, one line per change (at most ``limit``)."""
        c = self.counts()
        head = [
            f"reconcile {self.repository} with s3://{self.bucket}/{self.prefix}"
            f"{' (dry run: nothing staged)' if self.dry_run else ''}",
            f"  listed {self.objects} objects ({self.ignored} not published), "
            + ("compared with the manifest, " if self.mode == "manifest" else
               f"walked {self.tree_entries} repository entries, ")
            + f"hashed {self.hashed} files, in {self.seconds:.1f}s"
            + ("; manifest rebuilt" if self.rebuilt else ""),
            f"  in sync: {self.in_sync}; to add: {c.get('add', 0)}, to update: "
            f"{c.get('update', 0)}, to delete: {c.get('delete', 0)}; kept (CVMFS's own, "
            f"tarball directories): {self.kept}; keys refused: {len(self.skipped)}",
        ]
        if self.in_flight or self.recent:
            head.append(f"  already staged: {self.in_flight}; too recent to tell (left to "
                        f"their events): {self.recent}")
        if not self.dry_run:
            head.append(f"  staged: {self.staged}, failed: {len(self.failed)}"
                        + ("; the sync daemon publishes them" if self.staged else ""))
        lines = [ch.line() for ch in sorted(self.changes, key=lambda x: x.path)]
        lines += [f"! refused {key}  ({why})" for key, why in self.skipped]
        lines += [f"! failed  {path}  ({why})" for path, why in self.failed]
        if limit is not None and len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return "\n".join(head + lines)

    def __str__(self) -> str:
        return self.render()


# --------------------------------------------------------------------------- listing


_DONE = object()


def _page_reader(s3: Any, bucket: str, prefix: str) -> Callable[[str | None], dict[str, Any]]:
    """``read(token)``: one ListObjectsV2 page, through the RGW adapter's lean
    listing (:meth:`~cvmfs_publisher.adapters.rgw.RGW.list_page`) or a plain
    boto3 client's call."""
    if isinstance(s3, RGW):
        return lambda token: s3.list_page(bucket, prefix, token)
    return lambda token: boto3_list_page(s3, bucket, prefix, token)


def _next_token(page: dict[str, Any], seen: set[str]) -> str | None:
    """The page's continuation token; None after the last page.

    A token seen before would list the bucket forever (botocore's paginator
    refuses it too): Transient, listed again later, never a partial listing.
    """
    if not page.get("IsTruncated"):
        return None
    token = page.get("NextContinuationToken")
    if not token or token in seen:
        raise Transient("ListObjectsV2: a truncated page without a new continuation token")
    seen.add(token)
    return token


def _pages(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """ListObjectsV2 pages; from the second on, the next one requested while this
    one is processed.

    Each page costs a round trip to RGW and some CPU here to map its keys;
    overlapping them keeps a large reconcile close to the cost of the bare
    listing. Most buckets fit in one page, which is read on the caller's
    thread: at 1,000 repositories a thread per reconcile is a cost of its own.
    """
    read = _page_reader(s3, bucket, prefix)
    seen: set[str] = set()
    first = read(None)
    token = _next_token(first, seen)
    yield first
    if token is None:
        return
    pages: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce(token: str | None) -> None:
        try:
            while token is not None:
                page = read(token)
                token = _next_token(page, seen)
                while not stop.is_set():
                    try:
                        pages.put(page, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pages.put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            pages.put(exc)

    thread = threading.Thread(target=produce, args=(token,), name="listing", daemon=True)
    thread.start()
    try:
        while True:
            item = pages.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def list_bucket(s3: Any, bucket: str, prefix: str, tarball_dir: str,
                plan: Plan) -> dict[str, Wanted]:
    """Stream the bucket listing into ``{repository path: Wanted}``."""
    wanted: dict[str, Wanted] = {}
    for page in _pages(s3, bucket, prefix):
        for obj in page.get("Contents", []) or []:
            plan.objects += 1
            key = obj["Key"]
            try:
                target = object_keys.map_key(key, prefix, tarball_dir)
            except object_keys.UnsafeKey as exc:
                plan.skipped.append((key, str(exc)))
                continue
            if target is None:
                plan.ignored += 1
                continue
            w = Wanted(target.kind, target.key, int(obj.get("Size", 0)),
                       str(obj.get("ETag", "")).strip('"'),
                       obj["LastModified"].timestamp() if obj.get("LastModified") else 0.0)
            old = wanted.get(target.path)
            if old is not None:
                # Two keys for one path (x.tar and x.tgz, x and x.rclonelink): newest wins.
                loser = old if w.modified >= old.modified else w
                plan.skipped.append((loser.key, f"same repository path {target.path!r} as "
                                     "a newer object"))
                if loser is w:
                    continue
            wanted[target.path] = w
    return wanted


# --------------------------------------------------------------------------- hashing


def _multipart_etag(path: str, part_size: int) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    digests = []
    try:
        while True:
            h = hashlib.md5(usedforsecurity=False)
            left = part_size
            while left:
                chunk = os.read(fd, min(_CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            if left == part_size:
                break
            digests.append(h.digest())
            if left:
                break
    finally:
        os.close(fd)
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def content_matches(path: str, size: int, etag: str) -> bool:
    """Does the file at ``path`` (``size`` bytes) have this S3 ETag?

    A single-part ETag is the MD5 of the content. A multipart one is the MD5
    of the parts' MD5s, ``-<parts>``; the part size is not in the listing, so
    the usual ones that give that many parts are tried. False when it cannot
    be decided: the caller then stages the object, which is always safe.
    """
    etag = etag.lower()
    if len(etag) == 32 and "-" not in etag:
        return manifests.md5_file(path) == etag
    digest, sep, count = etag.partition("-")
    if not sep or not count.isdigit() or len(digest) != 32:
        return False
    n = int(count)
    if n < 1:
        return False
    if n == 1:
        candidates = [max(size, 1)]
    else:
        low = -(-size // n)  # the smallest part size giving n parts
        candidates = [low if low % _MIB == 0 else (low // _MIB + 1) * _MIB]
        candidates += [m * _MIB for m in _COMMON_PART_SIZES]
    tried = 0
    for ps in dict.fromkeys(candidates):
        if ps <= 0 or -(-size // ps) != n:
            continue
        tried += 1
        if _multipart_etag(path, ps) == etag:
            return True
        if tried >= 4:
            break
    return False


# --------------------------------------------------------------------------- diff


@dataclass
class _Walk:
    root: Path
    wanted: dict[str, Wanted]
    wanted_dirs: set[str]
    plan: Plan
    quick: bool
    reingest: bool
    to_hash: list[tuple[str, Wanted, os.stat_result]] = field(default_factory=list)
    synced: dict[str, Record] = field(default_factory=dict)


def _walk(w: _Walk) -> None:
    """Compare the tree with the bucket, directory by directory (no symlink following).

    Iterative (a stack, not recursion): a path may have 2,000 components.
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        _walk_dir(w, rel_dir, stack)


def _walk_dir(w: _Walk, rel_dir: str, stack: list[str]) -> None:
    path = w.root / rel_dir if rel_dir else w.root
    try:
        it = os.scandir(path)
    except OSError as exc:
        w.plan.failed.append((rel_dir or ".", f"cannot list: {exc.strerror}"))
        return
    with it:
        for d in it:
            rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
            w.plan.tree_entries += 1
            if d.name.startswith(object_keys.RESERVED_PREFIX) or (
                    not rel_dir and d.name in KEEP_AT_ROOT and rel not in w.wanted):
                w.plan.kept += 1
                continue
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            want = w.wanted.pop(rel, None)
            if want is not None and want.kind == object_keys.TARBALL:
                # Its content comes from the tarball: never walked, never pruned.
                if not stat.S_ISDIR(st.st_mode):
                    w.plan.changes.append(Change("ingest", rel, "not a directory", want.key,
                                                 want.size, want.kind))
                elif w.reingest:
                    w.plan.changes.append(Change("ingest", rel, "reingest requested",
                                                 want.key, want.size, want.kind))
                else:
                    w.plan.in_sync += 1
                    w.plan.kept += 1
                    w.synced[rel] = Record(manifests.TARBALL, want.size, 0o755, "",
                                           want.etag, want.modified, want.key)
                continue
            if stat.S_ISDIR(st.st_mode):
                if want is not None:
                    w.plan.changes.append(Change("put", rel, "a directory where the bucket "
                                                 "has an object", want.key, want.size,
                                                 want.kind))
                elif rel in w.wanted_dirs:
                    stack.append(rel)
                else:
                    w.plan.changes.append(Change("delete", rel, "directory not in the bucket"))
                continue
            if want is None:
                w.plan.changes.append(Change("delete", rel, "not in the bucket"))
                continue
            _compare(w, rel, str(path / d.name), st, want)


def _compare(w: _Walk, rel: str, full: str, st: os.stat_result, want: Wanted) -> None:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(full).encode("utf-8", "surrogateescape")
        except OSError:
            target = b""
        # A symlink's object body is its target (rclone's .rclonelink, s3fs).
        same = len(target) == want.size and hashlib.md5(
            target, usedforsecurity=False).hexdigest() == want.etag.lower()
        if same:
            w.plan.in_sync += 1
            w.synced[rel] = Record(manifests.SYMLINK, want.size, 0o777,
                                   target.decode("utf-8", "surrogateescape"), want.etag,
                                   want.modified, want.key)
        else:
            w.plan.changes.append(Change("put", rel, "symlink differs", want.key, want.size,
                                         want.kind))
        return
    if not stat.S_ISREG(st.st_mode):
        w.plan.changes.append(Change("put", rel, "not a regular file", want.key, want.size,
                                     want.kind))
        return
    if want.kind == object_keys.SYMLINK_RCLONE:
        w.plan.changes.append(Change("put", rel, "a file where the bucket has a symlink",
                                     want.key, want.size, want.kind))
        return
    if st.st_size != want.size:
        w.plan.changes.append(Change("put", rel, f"size {st.st_size} != {want.size}",
                                     want.key, want.size, want.kind))
        return
    if stat.S_IMODE(st.st_mode) not in (0o644, 0o755):
        w.plan.changes.append(Change("put", rel, f"mode {stat.S_IMODE(st.st_mode):o}",
                                     want.key, want.size, want.kind))
        return
    if w.quick and want.modified and want.modified < st.st_mtime - 2:
        w.plan.in_sync += 1  # published after the object's last change
        w.synced[rel] = _file_record(st, want)
        return
    w.to_hash.append((rel, want, st))


def _file_record(st: os.stat_result, want: Wanted) -> Record:
    return Record(manifests.FILE, st.st_size, stat.S_IMODE(st.st_mode), "", want.etag,
                  want.modified, want.key)


def _directories(wanted: dict[str, Wanted], plan: Plan) -> set[str]:
    """The directories the wanted paths need; a key used as a directory is dropped.

    S3 allows keys "a" and "a/b"; a file system does not: the directory wins.
    """
    wanted_dirs: set[str] = set()
    for path in wanted:
        for a in ancestors(path):
            wanted_dirs.add(a)
    for path in list(wanted):
        if path in wanted_dirs and wanted[path].kind != object_keys.TARBALL:
            w = wanted.pop(path)
            plan.skipped.append((w.key, "other objects use this path as a directory"))
    return wanted_dirs


def diff(root: Path, wanted: dict[str, Wanted], plan: Plan, *, quick: bool = False,
         reingest: bool = False, workers: int = 4) -> dict[str, Record]:
    """Fill ``plan.changes`` with what differs between ``root`` and ``wanted``.

    ``wanted`` is consumed (what is left over is missing from the tree).
    Returns the manifest records of the paths found in sync.
    """
    wanted_dirs = _directories(wanted, plan)
    walk = _Walk(root, wanted, wanted_dirs, plan, quick, reingest)
    _walk(walk)
    # Content hashes, in parallel (I/O bound; hashlib releases the GIL).
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda item: content_matches(str(root / item[0]), item[1].size,
                                                        item[1].etag), walk.to_hash)
        for (rel, want, st), same in zip(walk.to_hash, results, strict=True):
            plan.hashed += 1
            if same:
                plan.in_sync += 1
                walk.synced[rel] = _file_record(st, want)
            else:
                plan.changes.append(Change("put", rel, "content differs", want.key, want.size,
                                           want.kind))
    for path, want in wanted.items():
        op = "ingest" if want.kind == object_keys.TARBALL else "put"
        plan.changes.append(Change(op, path, "missing", want.key, want.size, want.kind))
    return walk.synced


def _same_source(rec: Record, want: Wanted) -> str:
    """Why ``rec`` (published) is not ``want`` (the bucket now); "" when it is."""
    if want.kind == object_keys.TARBALL:
        if rec.type != manifests.TARBALL:
            return f"a {rec.type} where the bucket has a tarball"
    elif rec.type == manifests.TARBALL:
        return "a tarball directory where the bucket has an object"
    elif want.kind == object_keys.SYMLINK_RCLONE and rec.type != manifests.SYMLINK:
        return "a file where the bucket has a symlink"
    if rec.etag.lower() != want.etag.lower():
        return f"ETag {rec.etag or '-'} != {want.etag}"
    if rec.size != want.size:
        return f"size {rec.size} != {want.size}"
    if rec.type == manifests.FILE and rec.mode not in (0o644, 0o755):
        return f"mode {rec.mode:o}"
    return ""


def diff_manifest(m: Manifest, wanted: dict[str, Wanted], plan: Plan, *,
                  reingest: bool = False) -> None:
    """Fill ``plan.changes`` from the manifest and the listing alone (reads no file)."""
    _directories(wanted, plan)
    plan.tree_entries = len(m.entries)
    ingested = {p + "/" for p, w in wanted.items() if w.kind == object_keys.TARBALL}

    def under_tarball(path: str) -> bool:
        return bool(ingested) and any(a + "/" in ingested for a in ancestors(path))

    for path, want in wanted.items():
        rec = m.entries.get(path)
        op = "ingest" if want.kind == object_keys.TARBALL else "put"
        if rec is None and want.kind == object_keys.TARBALL and not reingest and any(
                p.startswith(path + "/") for p in m.entries):
            # Rebuilt from the tree: its directory exists, taken as ingested (as the walk).
            plan.in_sync += 1
            plan.kept += 1
            continue
        if rec is None:
            plan.changes.append(Change(op, path, "missing", want.key, want.size, want.kind))
            continue
        why = _same_source(rec, want)
        if not why and reingest and want.kind == object_keys.TARBALL:
            why = "reingest requested"
        if why:
            plan.changes.append(Change(op, path, why, want.key, want.size, want.kind))
        else:
            plan.in_sync += 1
    for path, rec in m.entries.items():
        if path not in wanted and not under_tarball(path):
            kind = object_keys.TARBALL if rec.type == manifests.TARBALL else object_keys.FILE
            plan.changes.append(Change("delete", path, "not in the bucket", rec.key, 0, kind))


def _already_staged(st: Staging, ch: Change) -> bool:
    """Is ``ch`` already pending or being published (its event arrived)?"""
    try:
        entry = st.staged_get(ch.path)
    except OSError:
        return False
    if entry is None:
        return False
    if ch.op == "delete":
        return entry.op in ("delete", "ingest-delete")
    return entry.op not in ("delete", "ingest-delete") and bool(entry.etag) and bool(
        ch.etag) and entry.etag.lower() == ch.etag.lower()


def _settle_in_flight(st: Staging, plan: Plan, wanted_etags: dict[str, str],
                      recent: set[str]) -> None:
    """Drop the differences that are not lost events (see the module docstring)."""
    kept = []
    for ch in plan.changes:
        ch.etag = wanted_etags.get(ch.path, "")
        if ch.path in recent:
            plan.recent += 1
        elif _already_staged(st, ch):
            plan.in_flight += 1
        else:
            kept.append(ch)
    plan.changes = kept


# --------------------------------------------------------------------------- staging


def _stage_one(s3: Any, bucket: str, st: Staging, ch: Change, repo: str) -> None:
    """A deletion directly; anything else exactly as the consumers stage an event
    (:func:`cvmfs_publisher.pipeline.fetch.stage_key`: GET streamed to disk, mode or symlink
    from metadata and first bytes, a 404 staged as a deletion)."""
    if ch.op == "delete":
        op = "ingest-delete" if ch.kind == object_keys.TARBALL else "delete"
        st.stage(Entry(ch.path, op, key=ch.key, time=time.time()))
        return
    stage_key(s3, st, bucket, object_keys.Target(ch.kind, ch.path, ch.key), repo)


def stage_changes(s3: Any, bucket: str, st: Staging, plan: Plan, workers: int,
                  cancel: threading.Event | None = None) -> None:
    """Stage every change of ``plan`` (downloads in parallel); failures are listed.

    ``cancel`` set: the changes not started are left for the next reconcile.
    """
    st.ensure()

    def one(ch: Change) -> tuple[Change, str]:
        if cancel is not None and cancel.is_set():
            return ch, "cancelled: the daemon is stopping"
        try:
            _stage_one(s3, bucket, st, ch, plan.repository)
            return ch, ""
        except Permanent as exc:
            return ch, str(exc)
        except Exception as exc:
            return ch, f"{type(exc).__name__}: {str(exc)[:200]}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for ch, err in pool.map(one, plan.changes):
            if err:
                plan.failed.append((ch.path, err))
                log.error("repository=%s step=reconcile path=%r key=%r error=%s",
                          plan.repository, ch.path, ch.key, err)
            else:
                plan.staged += 1


# --------------------------------------------------------------------------- entry point


def reconcile(cfg: Config, repo: str, dry_run: bool = False, *, s3: Any = None,
              staging: Staging | None = None, quick: bool = False, reingest: bool = False,
              workers: int | None = None, grace: float = 0.0,
              cancel: threading.Event | None = None) -> Plan:
    """Diff ``repo``'s published state with its bucket and stage the differences.

    ``dry_run``: compute and return the plan only (print it with ``str()``).
    ``quick``: trust a file published after its object's last modification
    when the sizes agree (no content hash). ``reingest``: stage every tarball
    again. ``s3``: an :class:`~cvmfs_publisher.adapters.rgw.RGW` or a boto3 S3
    client (default: from ``cfg.s3``). ``staging``: the repository's staging
    (the consumers pass theirs, which stamps their term on entries).
    ``grace``: leave objects modified in the last ``grace`` seconds to their
    events. ``cancel``: set by a stopping daemon; what is not staged yet is
    left (and listed as failed).
    """
    t0 = time.monotonic()
    validate_repository(repo, cfg.cvmfs.domain)
    bucket = label_of(repo)
    plan = Plan(repo, bucket, cfg.s3.prefix, dry_run)
    st = staging or Staging(cfg.cvmfs.staging_dir, repo)
    revision = manifests.published_revision(cfg.cvmfs.spool_dir, repo)
    known = manifests.load(st.root, repo)
    root = Path(cfg.cvmfs.mount_dir) / repo
    mounted = root.is_dir() and not root.is_symlink()
    # Where the published layer is visible (the sync container, tests) the manifest
    # must be of its revision; where it is not (the consumers' container) the sync
    # daemon keeps it true: it checks it before every publish and rebuilds it.
    trusted = known is not None and (known.trusted(revision) or (
        revision is None and not mounted))
    if not trusted and not mounted:
        if known is None and revision is None and st.root.is_dir():
            raise ManifestPending("no manifest yet and the published tree is not visible here: "
                            "the sync daemon rebuilds it before its next publish", repo)
        why = ("no manifest" if known is None else
               f"the manifest is of revision {known.revision}, the published one is "
               f"{revision if revision is not None else 'unreadable'}")
        raise ReconcileError(f"{root} is not a mounted repository and {why}: provision it "
                             "first (or mount the published tree here)", repo)
    if s3 is None:
        s3 = RGW(cfg.s3, max_pool_connections=max(10, (workers or 0) * 2))
    client = getattr(s3, "s3", s3)
    n = workers or max(4, cfg.consumers.downloads)
    listed_at = time.time()
    try:
        wanted = list_bucket(s3, bucket, cfg.s3.prefix, cfg.cvmfs.tarball_dir, plan)
    except Exception as exc:
        raise classify(exc, f"ListObjectsV2 {bucket}", repo) from None
    etags = {p: w.etag for p, w in wanted.items()}
    recent = {p for p, w in wanted.items() if grace > 0 and w.modified > listed_at - grace}
    if trusted:
        assert known is not None
        plan.mode = "manifest"
        diff_manifest(known, wanted, plan, reingest=reingest)
    else:
        synced = diff(root, wanted, plan, quick=quick, reingest=reingest, workers=n)
        if not dry_run and revision is not None:
            plan.rebuilt = _rebuild(cfg, st, repo, revision, synced)
    _settle_in_flight(st, plan, etags, recent)
    if not dry_run and plan.changes:
        stage_changes(client, bucket, st, plan, n, cancel)
    plan.seconds = time.monotonic() - t0
    log.info("repository=%s step=reconcile outcome=%s mode=%s objects=%d changes=%d staged=%d "
             "failed=%d in_flight=%d recent=%d hashed=%d took=%.1fs", repo,
             "planned" if dry_run else "staged", plan.mode, plan.objects, len(plan.changes),
             plan.staged, len(plan.failed), plan.in_flight, plan.recent, plan.hashed,
             plan.seconds)
    return plan


def _rebuild(cfg: Config, st: Staging, repo: str, revision: int,
             synced: dict[str, Record]) -> bool:
    """Write the manifest the walk found (paths in sync at ``revision``), unless a
    publish happened meanwhile (then the next reconcile walks again)."""
    st.ensure()
    with st.manifest_locked():
        if manifests.published_revision(cfg.cvmfs.spool_dir, repo) != revision:
            log.info("repository=%s step=manifest outcome=not-rebuilt reason=published "
                     "during the walk", repo)
            return False
        current = manifests.load(st.root, repo)
        if current is not None and current.trusted(revision):
            return False  # the sync daemon wrote one meanwhile: it is newer than the walk
        manifests.save(st.root, Manifest(repo, revision, synced))
    log.info("repository=%s step=manifest outcome=rebuilt revision=%d paths=%d", repo,
             revision, len(synced))
    return True
