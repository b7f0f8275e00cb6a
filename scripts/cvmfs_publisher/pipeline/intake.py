"""Intake: one event message of a repository becomes staged changes (DESIGN §2, §3).

Two steps, split because they run on different threads in the consumers:

1. :func:`targets` (the source's thread, cheap, no I/O): parse the message,
   check that every record is for the repository's own bucket, map every key
   to a repository path; several records for one path give one target.
   Anything wrong is :class:`~cvmfs_publisher.core.errors.Permanent`: the
   whole message is dead-lettered, nothing is staged.
2. :func:`stage` (a download worker): bring each target's staged state to
   what S3 holds now (:func:`cvmfs_publisher.pipeline.fetch.fetch_key`), one
   log line per key. The first failure stops the message; it says which key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from ..core.config import Config
from ..core.errors import Permanent
from ..staging.area import Entry, Staging
from . import fetch, object_keys
from .events import BadEvent, parse_message

log = logging.getLogger(__name__)

_MAX_KEY_SHOWN = 300


def shown(key: str) -> str:
    """A key as one bounded log token: JSON-quoted (spaces, UTF-8, control chars safe)."""
    text = json.dumps(key, ensure_ascii=False)
    return text if len(text) <= _MAX_KEY_SHOWN else text[:_MAX_KEY_SHOWN] + '..."'


def first_key(body: bytes) -> str:
    """The first record's key for a log line about a message that may be garbage."""
    try:
        doc = json.loads(body)
        return shown(str(doc["Records"][0]["s3"]["object"]["key"]))
    except Exception:
        return "-"


def describe(found: list[object_keys.Target]) -> str:
    """The key(s) of a message for its settlement log line."""
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    return (shown(found[0].key) + more) if found else "-"


def targets(body: bytes, bucket: str, repository: str,
            cfg: Config) -> list[object_keys.Target]:
    """Validate a message: parse, check the bucket, map every key (Permanent if bad)."""
    try:
        events = parse_message(body)
    except BadEvent as exc:
        raise Permanent(f"bad event message: {exc}", repository) from None
    s3c, cv = cfg.s3, cfg.cvmfs
    out: dict[str, object_keys.Target] = {}
    for ev in events:
        if ev.bucket != bucket:
            raise Permanent(f"foreign bucket: event for bucket {ev.bucket!r} on the queue "
                            f"of bucket {bucket!r} (key {shown(ev.key)})", repository)
    for ev in events:
        try:
            target = object_keys.map_key(ev.key, s3c.prefix, cv.tarball_dir, s3c.decode_keys)
        except object_keys.UnsafeKey as exc:
            exc.repository = repository
            raise
        if target is None:
            log.debug("repository=%s key=%s outcome=ignored reason=outside %s or a "
                      "directory marker", repository, shown(ev.key), s3c.prefix)
            continue
        out[target.path] = target  # several records for one path: one fetch
    return list(out.values())


class StageFailed(Exception):
    """Staging one target failed: ``error`` says why, ``key`` which one."""

    def __init__(self, error: BaseException, key: str) -> None:
        super().__init__(str(error))
        self.error, self.key = error, key


#: ``fetcher(staging, bucket, target, repository, defer)``: :func:`fetch.fetch_key`
#: without its S3 client, on this thread or in a download process
#: (:mod:`cvmfs_publisher.pipeline.download_processes`).
Fetcher = Callable[[Staging, str, object_keys.Target, str, "list[Entry]"], fetch.Fetched]


def stage(fetcher: Fetcher, staging: Staging, bucket: str,
          found: list[object_keys.Target], repository: str, defer: list[Entry]) -> None:
    """Stage every target in order; raises :class:`StageFailed` at the first failure.

    The entries are appended to ``defer`` for a group commit
    (:func:`cvmfs_publisher.pipeline.fetch.fetch_key`); on a failure, the
    objects of those already appended are dropped and ``defer`` is emptied.
    """
    for target in found:
        t0 = time.monotonic()
        try:
            got = fetcher(staging, bucket, target, repository, defer)
        except Exception as exc:
            for entry in defer:
                if entry.object:
                    staging.discard_object(entry.object)
            defer.clear()
            raise StageFailed(exc, shown(target.key)) from exc
        e = got.entry
        log.info("repository=%s key=%s outcome=staged op=%s path=%s mode=%s size=%d "
                 "source=%s took=%.3fs%s", repository, shown(target.key), e.op,
                 shown(e.path), f"{e.mode:o}" if e.op in ("put", "symlink") else "-",
                 e.size, got.source, time.monotonic() - t0,
                 f" note={shown(got.note)}" if got.note else "")
