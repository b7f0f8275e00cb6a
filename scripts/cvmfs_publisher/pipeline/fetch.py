"""Fetch: bring the staged state of one key to what S3 holds *now* (DESIGN §3).

An S3 event only says "key K changed"; by the time it is handled, K may
have changed again, been deleted, or (multipart ``ObjectCreated:Post``)
not exist yet. So the event is never trusted for content: S3 is asked.

- the object exists: it is streamed in 1 MiB chunks into a fresh file under
  the staging ``tmp/`` directory (constant memory for any size), fsynced and
  renamed into ``objects/`` (:meth:`Staging.commit_object`), then one entry
  makes it the pending state of its path (:meth:`Staging.stage`);
- S3 answers 404: the deletion of the path is staged (``ingest-delete`` for
  a tarball's directory).

Duplicates, retries, reordered events and the early multipart event all
converge to the same final staged state, provided the caller does not run
two fetches of the same path at the same time (the consumers serialise
them per path, see :mod:`cvmfs_publisher.pipeline.dispatch`).

What the object becomes (DESIGN §2): its metadata and first bytes decide
(:func:`cvmfs_publisher.pipeline.modes.decide`): a file (0644/0755) or a symlink
(s3fs ``mode`` with S_IFLNK, rclone ``.rclonelink``) whose body, at most
4095 bytes and read into memory, is the link target. Tarballs
(:mod:`cvmfs_publisher.core.tarballs`) are staged for ``cvmfs_server
ingest`` with the compression their content shows, not their name.

Staging holds entries, never a tree: nothing here creates a path from the
key, so a user's symlink can never be followed when writing. As defence in
depth, a path that would go *through* a symlink or file still pending in
staging (``cvmfs/evil`` -> ``/etc`` then ``cvmfs/evil/passwd``) is refused
(:class:`PathConflict`, permanent) when S3 still holds that ancestor.

Errors speak :mod:`cvmfs_publisher.core.errors`: S3 unreachable, 5xx, an
interrupted download and any local I/O error (disk full, ...) are
:class:`Transient`; a refusal from S3 (403) and an object that cannot be
published (bad symlink target) are :class:`Permanent`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..adapters.rgw import RGW, classify, object_missing
from ..core import tarballs
from ..core.errors import Permanent, PublisherError, Transient
from ..staging.area import Entry, Staging, ancestors
from . import modes, object_keys

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read: the only buffer, whatever the object size
HEAD_BYTES = 4096  # first bytes kept for the content sniffing of modes.decide


class PathConflict(Permanent):
    """The path goes through an ancestor that is (pending as) a symlink or a file."""


class _S3Client(Protocol):
    def get_object(self, **kwargs: Any) -> dict[str, Any]: ...

    def head_object(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_key` staged, with what the log line needs.

    ``source`` names the convention that decided the mode
    (:class:`cvmfs_publisher.pipeline.modes.Decision`; ``"s3"`` for deletions and
    tarballs); ``note`` explains metadata that was present but ignored.
    """

    entry: Entry
    source: str = "s3"
    note: str = ""


def _client(s3: Any) -> Any:
    """Accept an :class:`cvmfs_publisher.adapters.rgw.RGW` or a boto3 S3 client."""
    return getattr(s3, "s3", s3)


def _s3_error(exc: Exception, what: str, repository: str) -> PublisherError:
    """Transient or Permanent; anything unknown from the S3 stack is Transient.

    ``NoSuchBucket`` is Permanent (a 4xx): an event for a bucket that does not
    exist is for a repository that is not provisioned (DESIGN §4), and must
    not be read as "every key was deleted".
    """
    out = classify(exc, what, repository)
    if isinstance(out, PublisherError):
        return out
    # urllib3 / socket errors that botocore did not wrap: the connection broke.
    return Transient(f"S3 {what} failed: {type(exc).__name__}", repository)


def check_ancestors(s3: Any, staging: Staging, bucket: str, path: str,
                    repository: str = "") -> None:
    """Refuse ``path`` if an ancestor is staged as a symlink or file that S3 still holds.

    A key ``cvmfs/evil/passwd`` after ``cvmfs/evil`` (a symlink to
    ``/etc``) must never be written through the link. Staging itself never
    follows anything (entries are files named by hash), and the sync daemon
    opens every component without following symlinks; this check keeps such
    a change out of staging altogether, with a clear reason. It costs one
    ``stat`` per ancestor, and one HEAD only when a conflict is pending, to
    tell a conflict from an ancestor that was since deleted in S3 (its own
    event will stage that deletion; reordered events must not be refused).
    """
    client = _client(s3)
    for ancestor in ancestors(path):
        entry = staging.staged_get(ancestor)
        if entry is None or entry.op not in ("symlink", "put"):
            continue
        key = entry.key
        if not key:
            raise PathConflict(f"path {path!r} goes through {ancestor!r}, staged as a "
                               f"{'symlink' if entry.op == 'symlink' else 'file'}", repository)
        try:
            client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if object_missing(exc):
                continue
            raise _s3_error(exc, f"HEAD {key!r}", repository) from None
        what = f"a symlink to {entry.target!r}" if entry.op == "symlink" else "a file"
        raise PathConflict(f"path {path!r} goes through {ancestor!r}, which is {what} "
                           f"(object {key!r})", repository)


def _last_modified(resp: dict[str, Any]) -> float:
    """The GET's Last-Modified as epoch seconds (0.0 when S3 did not say)."""
    value = resp.get("LastModified")
    try:
        return float(value.timestamp()) if value is not None else 0.0
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0.0


def _stream(body: Any, first: bytes, staging: Staging, sync: bool = True) -> tuple[str, int]:
    """Write ``first`` then the rest of ``body`` to a new staged object; (id, size).

    ``sync=False``: not fsynced (a group commit makes it durable later)."""
    tmp, fh = staging.new_download()
    try:
        size = 0
        with fh:
            if first:
                fh.write(first)
                size += len(first)
            while True:
                try:
                    chunk = body.read(CHUNK)
                except Exception as exc:
                    raise Transient(f"download interrupted: {type(exc).__name__}") from None
                if not chunk:
                    break
                fh.write(chunk)
                size += len(chunk)
        return staging.commit_object(tmp, sync=sync), size
    except BaseException:
        staging.discard_download(tmp)
        raise


def _read_head(body: Any, n: int) -> bytes:
    """Up to ``n`` first bytes (a short read is retried until EOF or ``n``)."""
    out = b""
    while len(out) < n:
        try:
            chunk = body.read(n - len(out))
        except Exception as exc:
            raise Transient(f"download interrupted: {type(exc).__name__}") from None
        if not chunk:
            break
        out += chunk
    return out


def _stage_object(staging: Staging, entry: Entry, defer: list[Entry] | None) -> Entry:
    """Stage an entry whose object is committed; drop the object if staging fails."""
    if defer is not None:
        return _stage(staging, entry, defer)
    try:
        return staging.stage(entry)
    except BaseException:
        staging.discard_object(entry.object)
        raise


def _stage(staging: Staging, entry: Entry, defer: list[Entry] | None) -> Entry:
    """Stage ``entry`` now, or hand it to the caller's group commit (``defer``)."""
    if defer is None:
        return staging.stage(entry)
    defer.append(entry)
    return entry


def _get(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    """GET through the RGW adapter (its lean path), or a plain boto3 client's call."""
    if isinstance(s3, RGW):
        return s3.get_object(bucket, key)
    return s3.get_object(Bucket=bucket, Key=key)


def _fetch(s3: Any, staging: Staging, bucket: str, target: object_keys.Target,
           repository: str, defer: list[Entry] | None) -> Fetched:
    client = _client(s3)
    sync = defer is None
    started = time.time()
    tarball = target.kind == object_keys.TARBALL
    try:
        resp = _get(s3, bucket, target.key)
    except Exception as exc:
        if object_missing(exc):
            op = "ingest-delete" if tarball else "delete"
            return Fetched(_stage(staging, Entry(target.path, op, key=target.key,
                                                 time=started), defer))
        raise _s3_error(exc, f"GET {target.key!r}", repository) from None
    body = resp["Body"]
    try:
        etag = str(resp.get("ETag", "")).strip('"')
        modified = _last_modified(resp)
        length = int(resp.get("ContentLength", 0) or 0)
        head = _read_head(body, HEAD_BYTES)
        decision = modes.decide(resp.get("Metadata") or {}, head, target.key)
        if tarball:
            if decision.kind == modes.SYMLINK:
                raise object_keys.UnsafeKey(f"tarball key {target.key!r} holds a symlink "
                                       "(mode S_IFLNK): not ingested", repository)
            check_ancestors(client, staging, bucket, target.path, repository)
            oid, size = _stream(body, head, staging, sync)
            compression = tarballs.compression_of(head)
            entry = Entry(target.path, "ingest", object=oid, compression=compression,
                          key=target.key, size=size, etag=etag,
                          modified=modified, time=started)
            return Fetched(_stage_object(staging, entry, defer), "content")
        if decision.kind == modes.SYMLINK:
            if length > modes.MAX_TARGET_BYTES or len(head) > modes.MAX_TARGET_BYTES:
                raise modes.BadSymlinkTarget(
                    f"symlink object of {max(length, len(head))} bytes: a target is "
                    f"at most {modes.MAX_TARGET_BYTES} bytes", repository)
            link = modes.valid_symlink_target(head)
            check_ancestors(client, staging, bucket, target.path, repository)
            entry = Entry(target.path, "symlink", mode=decision.mode, target=link,
                          key=target.key, size=len(head), etag=etag,
                          modified=modified, time=started)
            return Fetched(_stage(staging, entry, defer), decision.source, decision.note)
        check_ancestors(client, staging, bucket, target.path, repository)
        oid, size = _stream(body, head, staging, sync)
        entry = Entry(target.path, "put", mode=decision.mode, object=oid, key=target.key,
                      size=size, etag=etag,
                          modified=modified, time=started)
        return Fetched(_stage_object(staging, entry, defer), decision.source, decision.note)
    finally:
        with contextlib.suppress(Exception):
            body.close()


def fetch_key(s3: Any, staging: Staging, bucket: str, target: object_keys.Target,
              repository: str = "", defer: list[Entry] | None = None) -> Fetched:
    """Stage what S3 holds now for ``target`` (see the module docstring).

    Like :func:`stage_key`, with the deciding convention and notes for logs.
    ``defer`` (the consumers' group commit,
    :mod:`cvmfs_publisher.staging.group_commit`): the object is written but
    not fsynced, and the entry is appended to ``defer`` instead of staged;
    the caller submits them, and nothing is durable before that commit.
    """
    try:
        return _fetch(s3, staging, bucket, target, repository, defer)
    except PublisherError as exc:
        if not exc.repository:
            exc.repository = repository
        raise
    except OSError as exc:
        # Disk full, I/O error, a staging directory gone: may work later.
        raise Transient(f"staging {target.path!r} failed: "
                        f"{exc.strerror or type(exc).__name__}", repository) from None


def stage_key(s3: Any, staging: Staging, bucket: str, target: object_keys.Target,
              repository: str = "") -> Entry:
    """Bring the staged state of ``target`` to what S3 holds now; return the staged entry.

    ``s3`` is an :class:`cvmfs_publisher.adapters.rgw.RGW` or a boto3 S3 client;
    ``target`` comes from :func:`cvmfs_publisher.pipeline.object_keys.map_key`. Raises
    :class:`Transient` (retry later) or :class:`Permanent` (never works).
    Not safe to run twice at once for the same path (last writer wins).
    """
    return fetch_key(s3, staging, bucket, target, repository).entry
