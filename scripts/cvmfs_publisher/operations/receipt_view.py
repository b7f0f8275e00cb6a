"""``cvmfs-publisher status REPO [--key KEY]``: the uploader's receipt, for an operator.

The repository view is the document the bucket's receipt holds
(:func:`cvmfs_publisher.staging.receipts.build`, from the same state files),
plus whether the receipt could be written (the consumers' status document).
The key view says where one S3 key stands: staged, published in revision N
at time T, deleted, rejected with the reason, or unknown to the publisher;
and compares the object S3 holds now (HEAD: its ETag) with what was
published, so "a newer upload that never arrived" (a lost event) shows.

Where published keys come from: the sync daemon's record in the receipt
state (the last ``receipts.known_keys`` published keys, with their ETag and
the revision that published them), then the repository's manifest
(:mod:`cvmfs_publisher.staging.manifest`: every published path with its key
and ETag, as of its revision) for an older key.
Runs where the staging volume is mounted (either CVMFS container).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import PublisherError
from ..core.names import label_of
from ..pipeline import object_keys
from ..staging import receipts


def repository_view(cfg: Config, repo: str, now: float | None = None) -> dict[str, Any]:
    """The receipt of ``repo`` and the state of its upload."""
    doc = receipts.build(cfg.cvmfs.staging_dir, repo, cfg.receipts, now)
    where = f"s3://{label_of(repo)}/{cfg.receipts.key}"
    state = "disabled (receipts.enabled: false)" if not cfg.receipts.enabled else "unknown"
    try:
        status = json.loads((Path(cfg.status.dir) / "cvmfs-repo-consumers.json").read_text())
        entry = (status.get("repositories") or {}).get(repo) or {}
        if cfg.receipts.enabled and entry.get("receipt"):
            state = entry["receipt"]
            if state == "ok" and entry.get("receipt_written"):
                state = f"ok, written {receipts.iso(entry['receipt_written'])}"
    except (OSError, ValueError):
        pass
    return {**doc, "receipt": {"object": where, "state": state}}


def key_view(cfg: Config, repo: str, key: str, s3: Any, no_s3: str = "") -> dict[str, Any]:
    """Where ``key`` stands, and what S3 holds under it now (``s3``: the S3 adapter;
    None where there is none, ``no_s3`` saying why)."""
    reason = ""
    try:
        target = object_keys.map_key(key, cfg.s3.prefix, cfg.cvmfs.tarball_dir,
                                     cfg.s3.decode_keys)
        path = target.path if target is not None else None
    except object_keys.UnsafeKey as exc:
        path, reason = None, str(exc)
    out: dict[str, Any] = {"repository": repo, "key": key,
                           **receipts.lookup(cfg.cvmfs.staging_dir, repo, key, path)}
    if out["state"] == "unknown" and reason:
        out.update(state="rejected", reason=reason, by="key check (never staged)")
    elif out["state"] == "unknown" and path is None:
        out.update(state="ignored", reason=f"outside {cfg.s3.prefix!r} or a directory "
                   "marker: not published by design")
    sync, _ = receipts.state(cfg.cvmfs.staging_dir, repo)
    if out["state"] == "staged" and sync.get("failing") and sync.get("error"):
        out["last_error"] = sync["error"].get("message", "")
    try:
        if s3 is None:
            raise PublisherError(no_s3 or "no S3 client here", repo)
        out["s3"] = s3.head_object(label_of(repo), key, repo)
    except PublisherError as exc:
        out["s3_error"] = str(exc)
    out["in_sync"] = _in_sync(out)
    return out


def _in_sync(view: dict[str, Any]) -> bool:
    """Does the repository hold what S3 holds under this key?"""
    if "s3_error" in view:
        return False
    obj = view.get("s3")
    if view["state"] == "published":
        return obj is not None and (not view.get("etag") or obj["etag"] == view["etag"])
    if view["state"] in ("deleted", "ignored", "unknown"):
        return obj is None or view["state"] == "ignored"
    return False


def format_repository(view: dict[str, Any]) -> str:
    pub, pend, err = view["published"], view["pending"], view["last_error"]
    revision = pub["revision"] if pub["revision"] is not None else "-"
    waiting = (f", oldest waiting {pend['oldest_age_seconds']:.0f}s"
               if pend["oldest_age_seconds"] is not None else "")
    error = "-"
    if err:
        when = f"failing since {err['since']}" if err["failing"] else "recovered"
        error = f"{err['time']} ({when}): {err['message']}"
    lines = [f"repository  {view['repository']}",
             f"published   revision {revision} at {pub['time'] or '-'}",
             f"pending     {pend['count']} change(s){waiting}",
             f"last error  {error}",
             f"receipt     {view['receipt']['object']}: {view['receipt']['state']}",
             f"recent changes ({len(view['recent'])}):"]
    lines += [f"  revision {r['revision']!s:<5} {r['change']:9} {r['key']} ({r['path']}) "
              f"{r['time']}" for r in view["recent"]] or ["  -"]
    lines.append(f"rejected keys ({len(view['rejected'])}):")
    lines += [f"  {r['time']}  {r['key']}: {r['reason']}" for r in view["rejected"]] or ["  -"]
    return "\n".join(lines)


def format_key(view: dict[str, Any]) -> str:
    state, key, repo = view["state"], view["key"], view["repository"]
    obj = view.get("s3")
    s3_text = (f"S3 cannot be asked: {view['s3_error']}" if "s3_error" in view else
               "S3 holds no object under this key" if obj is None else
               f"S3 holds ETag {obj['etag']} ({obj['size']} bytes, uploaded "
               f"{receipts.iso(obj['modified'])})")
    if state == "staged":
        head = (f"{key}: staged ({view['op']} of {view['path']}, waiting since "
                f"{view['since']}): it goes out with the next publish of {repo}")
        if view.get("last_error"):
            head += f"; the last publish attempt failed: {view['last_error']}"
    elif state == "published" and view.get("from") == "manifest":
        head = (f"{key}: published, present in revision {_rev(view)} (the manifest of "
                f"{view['time']}; path {view['path']}, ETag {view['etag'] or '-'})")
    elif state == "published":
        head = (f"{key}: published in revision {_rev(view)} at {view['time']} "
                f"(path {view['path']}, ETag {view['etag'] or '-'})")
    elif state == "deleted":
        head = f"{key}: deleted in revision {_rev(view)} at {view['time']} ({view['path']})"
    elif state == "rejected":
        head = f"{key}: rejected{' at ' + view['time'] if view.get('time') else ''} " \
               f"by {view['by']}: {view['reason']}"
    elif state == "ignored":
        head = f"{key}: ignored: {view['reason']}"
    else:
        head = f"{key}: unknown to the publisher (never staged, published or rejected here)"
    verdict = "in sync" if view["in_sync"] else _advice(view)
    return f"{head}\n{s3_text}\n{verdict}"


def _rev(view: dict[str, Any]) -> str:
    return "?" if view.get("revision") is None else str(view["revision"])


def _advice(view: dict[str, Any]) -> str:
    state, obj, repo = view["state"], view.get("s3"), view["repository"]
    if "s3_error" in view:
        return "cannot compare with S3"
    if state in ("staged", "rejected"):
        return "not published yet" if state == "staged" else \
            "not published: fix the key (or the object) and upload again"
    if state == "published" and obj is None:
        return ("S3 no longer holds it but the repository does: the deletion has not "
                f"arrived; if this lasts, run 'cvmfs-publisher reconcile {repo}'")
    if state == "deleted":
        return ("S3 holds it again: the new upload has not arrived; if this lasts, run "
                f"'cvmfs-publisher reconcile {repo}'")
    if state == "published":
        return (f"S3 holds a different object (published ETag {view['etag']}): the newer "
                f"upload has not arrived; if this lasts, run 'cvmfs-publisher reconcile {repo}'")
    return ("S3 holds it but the publisher never saw it (a lost event, or older than the "
            f"publisher's record): run 'cvmfs-publisher reconcile {repo}'")
