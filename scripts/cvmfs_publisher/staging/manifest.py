"""The manifest: what this host's sync daemon published, and from which S3 object (DESIGN §3).

Why: a reconcile must not read the repository to know it is in sync. With
the manifest it compares a bucket listing (key, size, ETag, Last-Modified)
with these records and reads no file; only a difference costs a download.

Where: ``<staging_dir>/<repo>/manifest.json``, on the volume the consumers
and the sync daemon of one host share. It is per host: two publisher hosts
on one repository keep two manifests, each of what *its* sync daemon
published. That is why a manifest carries the revision it describes: one
whose revision is not the published one (another host published since, a
crash between publish and manifest, a repository created again) is not
trusted (:meth:`Manifest.trusted`), and the reconcile then falls back once
to walking and hashing the published tree, which rebuilds it.

Format (JSON, compact: 100,000 paths are a few MB)::

    {"format": 1, "repository": "...", "revision": 42, "written": 1764130000.0,
     "entries": {"<path>": ["file"|"symlink"|"tarball", size, mode, "<link target>",
                            "<etag>", <last-modified>, "<key>"], ...}}

Written atomically and durably (:func:`cvmfs_publisher.core.durable.replace`:
a new file, fsync, rename over the old one, fsync of the directory), so a
reader sees the old or the new manifest, never a mix; its writers (the sync
daemon after a publish, a reconcile's rebuild) take
:meth:`Staging.manifest_locked`, not the staging lock that the consumers'
installs wait for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import durable
from .area import Entry, Staging, ancestors

log = logging.getLogger(__name__)

FORMAT = 1
NAME = "manifest.json"
_CHUNK = 1 << 20
#: Entries of the published tree that no key creates: catalog markers and mkfs's placeholder.
RESERVED_PREFIX = ".cvmfs"
MKFS_PLACEHOLDER = "new_repository"
FILE, SYMLINK, TARBALL = "file", "symlink", "tarball"
TYPES = (FILE, SYMLINK, TARBALL)


@dataclass(frozen=True)
class Record:
    """One published path and the S3 object it came from."""

    type: str
    size: int = 0
    mode: int = 0o644
    target: str = ""
    etag: str = ""
    modified: float = 0.0
    key: str = ""

    def to_json(self) -> list[Any]:
        return [self.type, self.size, self.mode, self.target, self.etag, self.modified,
                self.key]

    @classmethod
    def from_json(cls, doc: Any) -> Record:
        if not isinstance(doc, list) or len(doc) != 7 or doc[0] not in TYPES:
            raise ValueError(f"bad manifest record {doc!r:.120}")
        kind, size, mode, target, etag, modified, key = doc
        if not (isinstance(size, int) and isinstance(mode, int) and isinstance(target, str)
                and isinstance(etag, str) and isinstance(modified, (int, float))
                and isinstance(key, str)):
            raise ValueError(f"bad manifest record {doc!r:.120}")
        return cls(kind, size, mode, target, etag, float(modified), key)


def record_of(entry: Entry) -> Record | None:
    """The record a published staging entry leaves (None for a deletion)."""
    if entry.op == "put":
        return Record(FILE, entry.size, entry.mode, "", entry.etag, entry.modified, entry.key)
    if entry.op == "symlink":
        return Record(SYMLINK, entry.size, entry.mode, entry.target, entry.etag,
                      entry.modified, entry.key)
    if entry.op == "ingest":
        return Record(TARBALL, entry.size, 0o755, "", entry.etag, entry.modified, entry.key)
    return None


@dataclass
class Manifest:
    """The published paths of one repository at ``revision`` (see the module docstring)."""

    repository: str
    revision: int | None
    entries: dict[str, Record] = field(default_factory=dict)
    written: float = 0.0

    def trusted(self, published_revision: int | None) -> bool:
        """Does it describe the published revision? (Unknown revision: no.)"""
        return published_revision is not None and self.revision == published_revision

    def apply(self, entries: Iterable[Entry]) -> None:
        """Fold a published batch in: a path's record replaced, or removed with its subtree.

        Which paths have a subtree is known from the set of every record's
        ancestors, built once per batch: looking for a subtree by scanning
        every record for each entry made a batch of 1,000 onto a manifest of
        19,000 paths cost 1.2 s of the sync daemon's CPU (and its interpreter
        lock, which the other repositories' publishes wait for).
        """
        parents: set[str] | None = None
        for e in entries:
            self.entries.pop(e.path, None)
            if parents is None:
                parents = {a for p in self.entries for a in ancestors(p)}
            if e.path in parents:  # a directory replaced or deleted: its subtree goes
                prefix = e.path + "/"
                for p in [p for p in self.entries if p.startswith(prefix)]:
                    del self.entries[p]
                parents = None  # rare: rebuilt for the next entry
            rec = record_of(e)
            if rec is not None:
                self.entries[e.path] = rec
                if parents is not None:
                    parents.update(ancestors(e.path))

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "repository": self.repository, "revision": self.revision,
            "written": self.written or time.time(),
            "entries": {p: r.to_json() for p, r in self.entries.items()},
        }, separators=(",", ":")).encode()


def published_revision(spool_dir: str | os.PathLike[str], repository: str) -> int | None:
    """The published revision: the ``revision`` attribute of ``<spool>/<repo>/rdonly``.

    The read-only layer is the truth of what is published, on every host of
    a repository (``attr -qg revision``, /work/shared/cvmfs README). An
    attribute read, no process: the consumers may call it (their container
    mounts the spool read-only). None when it cannot be read.
    """
    return revision_of(Path(spool_dir) / repository / "rdonly")


def revision_of(published_root: str | os.PathLike[str]) -> int | None:
    """The ``revision`` attribute of a published tree's root (None when unreadable)."""
    try:
        raw = os.getxattr(published_root, "user.revision")
        return int(raw.decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def md5_file(path: str | os.PathLike[str]) -> str | None:
    """MD5 of a regular file (never following a symlink), or None if unreadable.

    A single-part upload's ETag is this MD5, so it tells whether a published
    file holds an object's content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    h = hashlib.md5(usedforsecurity=False)
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return h.hexdigest()


def rebuild_from_tree(tree: str | os.PathLike[str], repository: str,
                      revision: int) -> tuple[Manifest, int]:
    """A manifest of the published ``tree`` alone (walk and hash): (manifest, files hashed).

    For the sync daemon, which sees the published tree but not S3: each
    file's recorded ETag is its MD5 (what a single-part upload's ETag is), so
    a reconcile finds it in sync when the object is; an object uploaded in
    parts, whose ETag differs, is staged once more and the publish records
    its real ETag. Symlinks record their target (an object's body is its
    target). Tarball content is recorded file by file (the reconcile keeps
    what lies under a tarball's directory). Nothing is followed; catalog
    markers and mkfs's placeholder are left out.
    """
    root = Path(tree)
    m = Manifest(repository, revision)
    hashed = 0
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(root / rel_dir if rel_dir else root)
        except OSError as exc:
            raise OSError(f"cannot list {root / rel_dir}: {exc.strerror}") from None
        with it:
            for d in it:
                rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
                if d.name.startswith(RESERVED_PREFIX) or (not rel_dir
                                                           and d.name == MKFS_PLACEHOLDER):
                    continue
                st = d.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(d.path)
                    raw = target.encode("utf-8", "surrogateescape")
                    m.entries[rel] = Record(SYMLINK, len(raw), 0o777, target,
                                            hashlib.md5(raw, usedforsecurity=False).hexdigest())
                elif stat.S_ISREG(st.st_mode):
                    digest = md5_file(d.path)
                    hashed += 1
                    if digest is not None:
                        m.entries[rel] = Record(FILE, st.st_size, stat.S_IMODE(st.st_mode), "",
                                                digest)
    return m, hashed


_REVISION = re.compile(rb'^\{"format":1,"repository":"[^"]*","revision":(\d+|null),')


def peek_revision(staging_root: str | os.PathLike[str]) -> int | None:
    """The revision in the manifest's header, read from its first bytes only (cheap
    enough for every tick of the sync daemon); None when absent or unreadable."""
    try:
        with open(path_of(staging_root), "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    found = _REVISION.match(head)
    if found is None or found.group(1) == b"null":
        return None
    return int(found.group(1))


def ensure(staging: Staging, tree: str | os.PathLike[str], revision: int | None) -> str:
    """The sync daemon's check before it publishes: the manifest describes ``revision``.

    Returns what was done: ``"trusted"``, ``"rebuilt"`` (missing, unreadable
    or of another revision: walked and hashed once), or ``"unknown"`` (the
    revision cannot be read: nothing is trusted or written).
    """
    repo = staging.repo
    if revision is None:
        return "unknown"
    if peek_revision(staging.root) == revision:
        return "trusted"
    t0 = time.monotonic()
    m, hashed = rebuild_from_tree(tree, repo, revision)
    with staging.manifest_locked():
        current = load(staging.root, repo)
        if current is not None and current.trusted(revision):
            return "trusted"  # a reconcile rebuilt it meanwhile
        save(staging.root, m)
    log.info("repository=%s step=manifest outcome=rebuilt revision=%d paths=%d hashed=%d "
             "took=%.1fs reason=%s", repo, revision, len(m.entries), hashed,
             time.monotonic() - t0, "none" if current is None else
             f"it was of revision {current.revision}")
    return "rebuilt"


def path_of(staging_root: str | os.PathLike[str]) -> Path:
    """The manifest file of the repository whose staging directory is ``staging_root``."""
    return Path(staging_root) / NAME


def load(staging_root: str | os.PathLike[str], repository: str) -> Manifest | None:
    """The manifest, or None when there is none or it cannot be read (logged: a reconcile
    then walks and hashes the tree once, which rebuilds it)."""
    path = path_of(staging_root)
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else '?'}")
        if doc.get("repository") != repository:
            raise ValueError(f"written for {doc.get('repository')!r}")
        revision = doc.get("revision")
        if revision is not None and not isinstance(revision, int):
            raise ValueError(f"revision {revision!r}")
        raw = doc.get("entries")
        if not isinstance(raw, dict):
            raise ValueError("no entries")
        entries = {p: Record.from_json(r) for p, r in raw.items() if isinstance(p, str)}
        return Manifest(repository, revision, entries, float(doc.get("written") or 0.0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("repository=%s step=manifest outcome=unreadable file=%s reason=%s; the "
                    "next reconcile walks the published tree and rebuilds it", repository,
                    path, str(exc)[:200])
        return None


def save(staging_root: str | os.PathLike[str], manifest: Manifest) -> None:
    """Replace the manifest atomically and durably (the caller holds ``manifest_locked``)."""
    manifest.written = time.time()
    durable.replace(path_of(staging_root), manifest.to_bytes(), mode=0o644)


def discard(staging_root: str | os.PathLike[str], repository: str, why: str) -> None:
    """Remove a manifest that no longer describes what is published (says why)."""
    try:
        os.unlink(path_of(staging_root))
    except FileNotFoundError:
        return
    log.info("repository=%s step=manifest outcome=discarded reason=%s; the next reconcile "
             "rebuilds it", repository, why)


def record_publish(staging: Staging, entries: Iterable[Entry], before: int | None,
                   after: int | None) -> bool:
    """The sync daemon published ``entries``, taking the revision from ``before`` to
    ``after``: fold them into the manifest. True when it was written.

    Only a manifest of revision ``before`` is continued; any other one no
    longer says what is published (a publish it missed) and is discarded,
    and none is started from a batch (it would lack every other path): the
    next reconcile walks the tree once and rebuilds it.
    """
    repo = staging.repo
    with staging.manifest_locked():
        m = load(staging.root, repo)
        if m is None:
            return False
        if before is None or after is None or not m.trusted(before):
            discard(staging.root, repo, f"it is of revision {m.revision}, the revision before "
                    f"this publish was {before}")
            return False
        m.apply(entries)
        m.revision = after
        save(staging.root, m)
    return True
