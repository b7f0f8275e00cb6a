"""The receipt's state on the shared volume, and the receipt built from it (DESIGN §3).

Who writes what (one writer per file, so no update is ever lost between
two daemons):

- ``<staging_dir>/<repo>/receipt-sync.json``, by cvmfs-repo-sync
  (:class:`SyncRecord`): the published revision and when this host saw it
  appear, the last published changes, the keys it published (with their
  ETag, for ``cvmfs-publisher status --key``), the keys it refused at apply
  time (a tarball that is no tar archive...), and the repository's last
  publish error;
- ``<staging_dir>/<repo>/receipt-rejected.json``, by cvmfs-repo-consumers
  (:class:`RejectedRecord`): the keys dead-lettered (unsafe keys, foreign
  buckets, a message that kept failing), with their reason.

cvmfs-repo-consumers puts :func:`build` of both, plus the pending count and
age read from staging, into the bucket
(:mod:`cvmfs_publisher.pipeline.receipt_upload`); ``cvmfs-publisher status``
shows the same document and :func:`lookup` answers for one key. Why the
consumers are the writer and the sync daemon only feeds them through this
volume: docs/ARCHITECTURE.md, "The receipt".

Both files are small and bounded (``receipts.recent``, ``receipts.rejected``,
``receipts.known_keys``) and replaced atomically (a reader sees the old or
the new one). They are not durable on purpose (no directory fsync): a lost
update costs a line of feedback, never a change. Texts pass the log
redaction rules: no secret reaches a bucket (DESIGN §4).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core import durable
from ..core.config import ReceiptsConfig
from ..core.logs import redact
from . import manifest
from .area import Entry, PendingTimes, Staging

log = logging.getLogger(__name__)

FORMAT = 1
SYNC_FILE = "receipt-sync.json"
REJECTED_FILE = "receipt-rejected.json"
_TEXT = 600  # characters of a reason or an error kept


def iso(ts: float | None) -> str | None:
    """Unix time -> ``2026-12-01T09:30:00Z`` (what an uploader reads), None stays None."""
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("receipt state %s unreadable (%s): starting it afresh", path, exc)
        return {}
    return doc if isinstance(doc, dict) else {}


def _store(path: Path, doc: dict[str, Any]) -> None:
    if not path.parent.is_dir():
        return  # the repository's staging is gone (deprovisioned): nothing to tell
    durable.replace(path, json.dumps(doc, separators=(",", ":")).encode(), mode=0o644,
                    sync_dir=False)


class _StateFile:
    """One daemon's state file of each repository (one writer: the daemon; thread-safe)."""

    NAME = ""

    def __init__(self, staging_dir: str | os.PathLike[str], limits: ReceiptsConfig) -> None:
        self.staging_dir = Path(staging_dir)
        self.limits = limits
        self._lock = threading.Lock()

    def path(self, repo: str) -> Path:
        return Staging(self.staging_dir, repo).root / self.NAME


class SyncRecord(_StateFile):
    """cvmfs-repo-sync's half of the receipt state."""

    NAME = SYNC_FILE

    def published(self, repo: str, entries: Iterable[Entry], revision: int | None,
                  now: float | None = None) -> None:
        """``entries`` are in the published tree now; ``revision`` is the tree's."""
        now = time.time() if now is None else now
        with self._lock:
            doc = _load(self.path(repo))
            if revision is not None and revision != doc.get("revision"):
                doc["revision"], doc["revision_time"] = revision, now
            rev = revision  # None: unreadable (the changes are published all the same)
            recent: list[dict[str, Any]] = doc.get("recent") or []
            known: dict[str, list[Any]] = doc.get("known") or {}
            for e in entries:
                change = "deleted" if e.op in ("delete", "ingest-delete") else "published"
                recent.insert(0, {"key": e.key, "path": e.path, "change": change,
                                  "revision": rev, "time": now})
                if e.key:
                    known.pop(e.key, None)  # re-inserted last: the dict is oldest first
                    known[e.key] = [e.path, change, e.etag, rev, now]
            doc["recent"] = recent[:self.limits.recent]
            while len(known) > self.limits.known_keys:
                known.pop(next(iter(known)))
            doc["known"] = known
            _store(self.path(repo), doc)

    def rejected(self, repo: str, entry: Entry, why: str, now: float | None = None) -> None:
        """The sync daemon refused ``entry`` (it was dropped from its batch)."""
        now = time.time() if now is None else now
        with self._lock:
            doc = _load(self.path(repo))
            doc["rejected"] = _bounded_insert(doc.get("rejected"), {
                "key": entry.key, "path": entry.path, "reason": _text(why), "time": now},
                self.limits.rejected)
            _store(self.path(repo), doc)

    def failed(self, repo: str, message: str, now: float | None = None) -> None:
        """A publish of ``repo`` failed (its batch stays staged and is retried)."""
        now = time.time() if now is None else now
        with self._lock:
            doc = _load(self.path(repo))
            since = doc["error"]["since"] if doc.get("failing") and doc.get("error") else now
            doc["error"] = {"message": _text(message), "time": now, "since": since}
            doc["failing"] = True
            _store(self.path(repo), doc)

    def succeeded(self, repo: str) -> None:
        """A publish (or recovery) of ``repo`` worked: it is not failing any more."""
        with self._lock:
            doc = _load(self.path(repo))
            if doc.get("failing"):
                doc["failing"] = False
                _store(self.path(repo), doc)


class RejectedRecord(_StateFile):
    """cvmfs-repo-consumers' half: the keys it dead-lettered."""

    NAME = REJECTED_FILE

    def add(self, repo: str, key: str, reason: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            doc = _load(self.path(repo))
            doc["rejected"] = _bounded_insert(doc.get("rejected"), {
                "key": key, "reason": _text(reason), "time": now}, self.limits.rejected)
            _store(self.path(repo), doc)


def _text(text: str) -> str:
    return redact(text)[:_TEXT]


def _bounded_insert(items: Any, item: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Newest first; an older rejection of the same key gives way to the new one."""
    kept = [i for i in (items or []) if isinstance(i, dict) and i.get("key") != item["key"]]
    return [item, *kept][:limit]


def version(staging_dir: str | os.PathLike[str], repo: str) -> tuple[int, int]:
    """Changes whenever either state file is replaced (mtime in ns): "is the receipt stale?"."""
    out = []
    root = os.path.join(staging_dir, repo)  # asked for every repository every few seconds
    for name in (SYNC_FILE, REJECTED_FILE):
        try:
            out.append(os.stat(os.path.join(root, name)).st_mtime_ns)
        except OSError:
            out.append(0)
    return out[0], out[1]


def state(staging_dir: str | os.PathLike[str], repo: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the sync daemon's state, the consumers' rejections) of ``repo``."""
    root = Staging(staging_dir, repo).root
    return _load(root / SYNC_FILE), _load(root / REJECTED_FILE)


def waiting_times(st: Staging) -> list[PendingTimes]:
    """The :class:`PendingTimes` of ``st``'s ``pending/`` and ``batch/`` (for :func:`waiting`)."""
    return [PendingTimes(st), PendingTimes(st, st.batch_dir)]


def waiting(times: list[PendingTimes]) -> tuple[int, float | None]:
    """(entries, oldest first staging time) over ``times`` (pending/ and batch/)."""
    count, oldest = 0, None
    for t in times:
        value = t.get()
        count += t.count
        if value is not None and (oldest is None or value[0] < oldest):
            oldest = value[0]
    return count, oldest


def build(staging_dir: str | os.PathLike[str], repo: str, limits: ReceiptsConfig,
          now: float | None = None,
          times: list[PendingTimes] | None = None) -> dict[str, Any]:
    """The receipt of ``repo`` (the document README "Receipts" shows).

    ``times``: the caller's :class:`PendingTimes` of ``pending/`` and
    ``batch/``, kept between calls (the receipt writer: during a burst of
    thousands of changes, parsing every pending entry every few seconds took
    a twentieth of the consumers' CPU); without them, both are read once.
    """
    now = time.time() if now is None else now
    sync, consumers = state(staging_dir, repo)
    if times is None:
        times = waiting_times(Staging(staging_dir, repo))
    pending, oldest = waiting(times)
    rejected = sorted(
        [{"key": r.get("key", ""), "reason": r.get("reason", ""), "time": r.get("time", 0.0),
          "by": "cvmfs-repo-consumers"} for r in consumers.get("rejected") or []]
        + [{"key": r.get("key", ""), "reason": r.get("reason", ""), "time": r.get("time", 0.0),
            "by": "cvmfs-repo-sync"} for r in sync.get("rejected") or []],
        key=lambda r: -float(r["time"] or 0))[:limits.rejected]
    error = sync.get("error")
    return {
        "format": FORMAT,
        "repository": repo,
        "updated": iso(now),
        "published": {"revision": sync.get("revision"), "time": iso(sync.get("revision_time"))},
        "recent": [{"key": r["key"], "path": r["path"], "change": r["change"],
                    "revision": r["revision"], "time": iso(r["time"])}
                   for r in (sync.get("recent") or [])[:limits.recent]],
        "pending": {"count": pending,
                    "oldest_age_seconds": round(now - oldest, 1) if oldest else None},
        "rejected": [{**r, "time": iso(r["time"])} for r in rejected],
        "last_error": None if not error else {
            "message": error.get("message", ""), "time": iso(error.get("time")),
            "since": iso(error.get("since")), "failing": bool(sync.get("failing"))},
    }


def lookup(staging_dir: str | os.PathLike[str], repo: str, key: str,
           path: str | None) -> dict[str, Any]:
    """Where ``key`` stands for the publisher: staged, published, deleted, rejected or unknown.

    ``path``: the repository path the key maps to (None when it maps to
    none). The newest fact wins: a change staged after a rejection is staged,
    a rejection after a publish is a rejection.
    """
    sync, consumers = state(staging_dir, repo)
    facts: list[tuple[float, dict[str, Any]]] = []
    if path is not None:
        e = Staging(staging_dir, repo).staged_get(path)
        if e is not None and (not e.key or e.key == key):
            facts.append((e.time, {"state": "staged", "op": e.op, "path": e.path,
                                   "etag": e.etag, "time": iso(e.time),
                                   "since": iso(e.first_time or e.time)}))
    for by, doc in (("cvmfs-repo-consumers", consumers), ("cvmfs-repo-sync", sync)):
        for r in doc.get("rejected") or []:
            if r.get("key") == key:
                facts.append((float(r.get("time") or 0), {
                    "state": "rejected", "reason": r.get("reason", ""), "by": by,
                    "time": iso(r.get("time"))}))
    known = (sync.get("known") or {}).get(key)
    if known:
        kpath, change, etag, rev, when = known
        facts.append((float(when or 0), {
            "state": "deleted" if change == "deleted" else "published", "path": kpath,
            "etag": etag, "revision": rev, "time": iso(when)}))
    elif path is not None:
        # older than the receipt's list: the manifest knows every published path
        # (its revision is the one it describes; the time is when it was written)
        m = manifest.load(Staging(staging_dir, repo).root, repo)
        rec = m.entries.get(path) if m is not None else None
        if m is not None and rec is not None and (not rec.key or rec.key == key):
            facts.append((m.written, {
                "state": "published", "path": path, "etag": rec.etag,
                "revision": m.revision, "time": iso(m.written), "from": "manifest"}))
    if not facts:
        return {"state": "unknown", "path": path}
    return max(facts, key=lambda f: f[0])[1]
