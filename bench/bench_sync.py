#!/usr/bin/env python3
"""Benchmarks of cvmfs-repo-sync (figures printed, nothing asserted).

(a) One changed file in repositories of 1,000 / 10,000 / 100,000 files: the
    sync's publish (transaction, apply the one staged change, publish) beside
    the old way, ``rsync -a --delete`` of a full copy of the tree into
    ``/cvmfs/<repo>``, measured on the same repository in the same run. The
    sync should be flat in repository size; rsync grows with it.
(b) 1,000 changes staged evenly over 10 s while the daemon runs with the
    default windows (quiet 2 s, maximum delay 30 s): how many publishes, and
    are all 1,000 present.
(c) Reconcile of the same repositories, local part: a bucket listing (served
    from memory, as ListObjectsV2 pages of 1,000) diffed with the published
    tree, one object changed with the same size (so every same-size file is
    hashed: the worst case), dry run. RGW's listing itself adds about one
    round trip per 1,000 keys.

Runs against the cvmfs_server test double (tests/cvmfs_server_double.py,
overlay mounts: needs root), whose own start-up (~0.1-0.2 s per call, a
Python interpreter) is part of every "sync" figure and reported apart.

Leaves nothing behind, also on failure, Ctrl-C or SIGTERM (mounts and
temporary directories are removed in ``finally``). As root, like the tests:

    .venv/bin/python bench/bench_sync.py [--sizes 1000,10000,100000] [--skip-burst]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from cvmfs_publisher.adapters.cvmfs import CvmfsServer, Result  # noqa: E402
from cvmfs_publisher.core import config as config_mod  # noqa: E402
from cvmfs_publisher.core.status import StatusDocument  # noqa: E402
from cvmfs_publisher.daemons.repo_sync import NAME  # noqa: E402
from cvmfs_publisher.pipeline.reconcile import reconcile  # noqa: E402
from cvmfs_publisher.publishing.batch import BatchPublisher  # noqa: E402
from cvmfs_publisher.publishing.scheduler import RepoSync  # noqa: E402
from cvmfs_publisher.staging.area import Entry, Staging  # noqa: E402
from devstack.common import sigterm_as_interrupt  # noqa: E402
from tests.cvmfs_server_double import (  # noqa: E402
    DOUBLE_PATH,
    published_tree,
    revisions,
    union_dir,
    unmount_all,
)

REPO = "bench-personalrepo.infn.it"
FILES_PER_DIR = 100


def make_env(base: Path, **sync: Any) -> tuple[config_mod.Config, Path]:
    root = base / "root"
    (root / "bin").mkdir(parents=True)
    cmd = root / "bin" / "cvmfs_server"
    cmd.write_text(f'#!/bin/sh\nCVMFS_DOUBLE_ROOT="{root}" exec "{sys.executable}" '
                   f'"{DOUBLE_PATH}" "$@"\n')
    cmd.chmod(0o755)
    keys = root / "keys-shared"
    keys.mkdir(mode=0o700)
    for ext in ("pub", "crt", "gw"):
        (keys / f"{REPO}.{ext}").write_text("bench key\n")
    raw = {
        "log": {"dir": str(base / "log"), "stdout": False},
        "status": {"dir": str(base / "status")},
        "cvmfs": {"server_command": str(cmd),
                  "repositories_dir": str(root / "etc/cvmfs/repositories.d"),
                  "spool_dir": str(root / "var/spool/cvmfs"), "mount_dir": str(root / "cvmfs"),
                  "keys_dir": str(keys), "staging_dir": str(root / "data/cvmfs"),
                  "stratum0_url": "http://stratum0.bench/cvmfs",
                  "gateway_url": "http://gateway.bench:4929/api/v1"},
        "sync": sync,
    }
    return config_mod.from_mapping(raw, env={}), root


def double(root: Path, *args: str) -> None:
    env = dict(os.environ, CVMFS_DOUBLE_ROOT=str(root))
    subprocess.run([sys.executable, str(DOUBLE_PATH), *args], env=env, check=True,
                   capture_output=True)


def populate(cfg: config_mod.Config, root: Path, n: int) -> float:
    """A repository of ``n`` small files (100 per directory), published once."""
    t0 = time.monotonic()
    BatchPublisher(cfg).ensure_repository(REPO)
    double(root, "transaction", REPO)
    union = union_dir(root, REPO)
    for i in range(n):
        d = union / f"d{i // FILES_PER_DIR:04d}"
        if i % FILES_PER_DIR == 0:
            d.mkdir()
        (d / f"f{i % FILES_PER_DIR:03d}").write_bytes(b"content of file %d\n" % i)
    double(root, "publish", REPO)
    return time.monotonic() - t0


def stage_put(st: Staging, path: str, data: bytes) -> None:
    tmp, fh = st.new_download()
    with fh:
        fh.write(data)
    st.stage(Entry(path, "put", mode=0o644, object=st.commit_object(tmp), size=len(data)))


class TimedServer(CvmfsServer):
    """Adds up the wall time spent in cvmfs_server calls (subprocess included)."""

    seconds = 0.0

    def run(self, *args: Any, **kw: Any) -> Result:
        t0 = time.monotonic()
        try:
            return super().run(*args, **kw)
        finally:
            self.seconds += time.monotonic() - t0


def bench_one_change(n: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix=f"bench-sync-{n}-"))
    cfg, root = make_env(base)
    try:
        setup = populate(cfg, root, n)
        changed = f"d{(n // 2) // FILES_PER_DIR:04d}/f{(n // 2) % FILES_PER_DIR:03d}"

        # -- the sync: one staged change, transaction + apply + publish
        st = Staging(cfg.cvmfs.staging_dir, REPO).ensure()
        stage_put(st, changed, b"changed by the sync\n")
        server = TimedServer(cfg.cvmfs)
        t0 = time.monotonic()
        out = BatchPublisher(cfg, server).publish(REPO)
        sync_total = time.monotonic() - t0
        sync_tool = server.seconds
        assert out is not None
        rev = revisions(root, REPO)[-1]
        sync_rev = len(rev["added"]) + len(rev["changed"]) + len(rev["deleted"])

        # -- rsync -a --delete of a full copy (the old way), same repository
        src = base / "mirror"
        subprocess.run(["cp", "-a", f"{published_tree(root, REPO)}/.", str(src)], check=True)
        (src / changed).write_bytes(b"changed by rsync, v2\n")
        t0 = time.monotonic()
        double(root, "transaction", REPO)
        t1 = time.monotonic()
        res = subprocess.run(["rsync", "-a", "--delete", "--stats", f"{src}/",
                              f"{union_dir(root, REPO)}/"], check=True, capture_output=True,
                             text=True)
        rsync_only = time.monotonic() - t1
        double(root, "publish", REPO)
        rsync_total = time.monotonic() - t0
        m = re.search(r"Number of files: ([\d,]+)", res.stdout)
        scanned = int(m.group(1).replace(",", "")) if m else -1
        m = re.search(r"Number of regular files transferred: ([\d,]+)", res.stdout)
        transferred = int(m.group(1).replace(",", "")) if m else -1
        rec = bench_reconcile(cfg, root, changed)
        return {
            **rec,
            "files": n, "setup_s": setup,
            "sync_total_s": sync_total, "sync_tool_s": sync_tool,
            "sync_own_s": sync_total - sync_tool, "sync_touched": out.touched,
            "sync_revision_paths": sync_rev,
            "rsync_only_s": rsync_only, "rsync_total_s": rsync_total,
            "rsync_scanned": scanned, "rsync_transferred": transferred,
        }
    finally:
        unmount_all(root)
        shutil.rmtree(base, ignore_errors=True)


class FakeS3:
    """Just enough of boto3's S3 client for a reconcile dry run: a paginated listing."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def get_paginator(self, name: str) -> FakeS3:
        assert name == "list_objects_v2"
        return self

    def paginate(self, **kw: Any) -> Any:
        for i in range(0, len(self.objects), 1000):
            yield {"Contents": self.objects[i:i + 1000]}


def bench_reconcile(cfg: config_mod.Config, root: Path, changed: str) -> dict[str, Any]:
    tree = published_tree(root, REPO)
    stamp = datetime.datetime.now(datetime.UTC)
    objects = []
    for dirpath, _, files in os.walk(tree):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(tree).as_posix()
            if rel == "new_repository":
                continue
            data = full.read_bytes()
            if rel == changed:
                data = bytes(len(data))  # same size, other content
            objects.append({"Key": f"cvmfs/{rel}", "Size": len(data), "LastModified": stamp,
                            "ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'})
    objects.sort(key=lambda o: o["Key"])
    t0 = time.monotonic()
    plan = reconcile(cfg, REPO, dry_run=True, s3=FakeS3(objects))
    took = time.monotonic() - t0
    return {"reconcile_s": took, "reconcile_hashed": plan.hashed,
            "reconcile_changes": len(plan.changes)}


def bench_burst(total: int = 1000, seconds: float = 10.0) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    cfg, root = make_env(base)  # default windows: quiet 2 s, max delay 30 s
    try:
        BatchPublisher(cfg).ensure_repository(REPO)
        st = Staging(cfg.cvmfs.staging_dir, REPO).ensure()
        status = StatusDocument(Path(cfg.status.dir) / f"{NAME}.json", NAME)
        daemon = RepoSync(cfg, status)
        thread = threading.Thread(target=daemon.run)
        thread.start()
        t0 = time.monotonic()
        for i in range(total):
            stage_put(st, f"burst/d{i % 10}/f{i:04d}", b"upload %d\n" % i)
            delay = t0 + (i + 1) * seconds / total - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        staged_in = time.monotonic() - t0
        deadline = time.monotonic() + 120
        tree = published_tree(root, REPO) / "burst"
        while time.monotonic() < deadline:
            if st.pending_count() == 0 and not st.has_batch() and tree.is_dir() and sum(
                    len(files) for _, _, files in os.walk(tree)) == total:
                break
            time.sleep(0.05)
        settled = time.monotonic() - t0
        daemon.stop()
        thread.join()
        present = sum(len(files) for _, _, files in os.walk(tree)) if tree.is_dir() else 0
        pubs = [r for r in revisions(root, REPO) if r["command"] == "publish"]
        return {"uploads": total, "staged_over_s": staged_in, "publishes": len(pubs),
                "present": present, "last_published_after_s": settled,
                "per_publish": [len(r["added"]) for r in pubs]}
    finally:
        unmount_all(root)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--json", action="store_true", help="print raw figures as JSON too")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the cvmfs_server double mounts overlays)", file=sys.stderr)
        return 1
    results = []
    print("(a) one changed file")
    print(f"{'files':>8} {'sync s':>8} {'(tool)':>8} {'(own)':>8} {'touched':>8} "
          f"{'rsync s':>8} {'+txn/pub':>9} {'scanned':>8} {'ratio':>7}")
    for n in (int(x) for x in args.sizes.split(",")):
        r = bench_one_change(n)
        results.append(r)
        ratio = r["rsync_only_s"] / r["sync_own_s"] if r["sync_own_s"] > 0 else float("inf")
        print(f"{r['files']:>8} {r['sync_total_s']:>8.3f} {r['sync_tool_s']:>8.3f} "
              f"{r['sync_own_s']:>8.4f} {r['sync_touched']:>8} {r['rsync_only_s']:>8.3f} "
              f"{r['rsync_total_s']:>9.3f} {r['rsync_scanned']:>8} {ratio:>6.0f}x", flush=True)
    print("  sync s = publish() end to end (transaction + apply + publish);"
          " (tool) = time in cvmfs_server (double) calls;\n"
          "  (own) = the sync's own work; rsync s = rsync -a --delete alone;"
          " +txn/pub = with transaction and publish; ratio = rsync s / sync own")
    if not args.skip_burst:
        print("(b) 1,000 uploads staged over 10 s, default windows (quiet 2 s, max delay 30 s)")
        b = bench_burst()
        results.append(b)
        print(f"  publishes: {b['publishes']} (files per publish {b['per_publish']}), "
              f"present: {b['present']}/{b['uploads']}, staged over {b['staged_over_s']:.1f}s, "
              f"all published {b['last_published_after_s']:.1f}s after the first upload")
    print("(c) reconcile dry run, local part (listing from memory, every file hashed)")
    for r in (x for x in results if "files" in x):
        print(f"  {r['files']:>7} files: {r['reconcile_s']:.2f}s, hashed {r['reconcile_hashed']},"
              f" changes found {r['reconcile_changes']}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    with sigterm_as_interrupt():  # the clean-ups in finally blocks run on SIGTERM too
        raise SystemExit(main())
