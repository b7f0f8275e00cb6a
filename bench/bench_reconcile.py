#!/usr/bin/env python3
"""Reconcile benchmark: an in-sync repository costs a listing (DESIGN §3, Self-healing).

Starts a one-node Ceph RGW (devstack) and, in one run:

1. uploads ``--objects`` small objects (default 100,000) with many threads
   (prints the setup time: this RGW takes a while);
2. lays out the published state those objects give: a tree under
   ``<mount_dir>/<repo>`` with the same content, and the published revision
   as the ``user.revision`` attribute of ``<spool>/<repo>/rdonly``, as
   cvmfs_server leaves them (written by the benchmark, not by cvmfs_server,
   so that setting up 100,000 files does not take a publish through the
   double);
3. reconcile without a manifest: the fallback (walk and hash), which
   rebuilds the manifest;
4. a raw ListObjectsV2 of the same prefix, then reconcile with the manifest,
   three times each, interleaved: reconcile wall time / raw listing time
   (target <= 1.2) and files hashed (target 0);
5. one object changed in S3: found and staged by the next reconcile.

And, with ``--warmup``, the delay of a new RGW topic's first event (Ceph
README item 12): a topic and notification are created (persistent and
not; on a push endpoint RGW has not used yet, then a second topic on the
same one), one object is PUT every 0.5 s, and the first event's arrival is
timed from the topic's creation, on a RabbitMQ node of the benchmark's own.

Figures only, no assertions.

    .venv/bin/python bench/bench_reconcile.py [--objects 100000] [--threads 64] [--warmup]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

import pika  # noqa: E402

from cvmfs_publisher.adapters.rgw import RGW  # noqa: E402
from cvmfs_publisher.core import config  # noqa: E402
from cvmfs_publisher.pipeline.reconcile import reconcile  # noqa: E402
from cvmfs_publisher.staging import manifest  # noqa: E402
from cvmfs_publisher.staging.area import Staging  # noqa: E402
from devstack import ceph as ceph_mod  # noqa: E402
from devstack.common import sigterm_as_interrupt  # noqa: E402
from devstack.rabbitmq import Broker, RabbitNode  # noqa: E402

DOMAIN = "infn.it"
LABEL = "bench-reconcile"
REPO = f"{LABEL}.{DOMAIN}"


def body(i: int) -> bytes:
    return f"object {i:06d}\n".encode()


def key(i: int) -> str:
    return f"cvmfs/d{i % 100:02d}/f{i:06d}.txt"


def make_config(work: Path, ceph: ceph_mod.Ceph) -> config.Config:
    return config.from_mapping({
        "log": {"dir": str(work / "log"), "stdout": False},
        "status": {"dir": str(work / "status")},
        "s3": {"endpoint_url": ceph.endpoint, "max_attempts": 2},
        "cvmfs": {"staging_dir": str(work / "staging"), "mount_dir": str(work / "cvmfs"),
                  "spool_dir": str(work / "spool"), "domain": DOMAIN},
        "consumers": {"downloads": 8},
    }, env={"CVMFS_PUBLISHER_S3__ACCESS_KEY": ceph.access_key,
            "CVMFS_PUBLISHER_S3__SECRET_KEY": ceph.secret_key})


def upload(s3: Any, n: int, threads: int) -> float:
    t0 = time.monotonic()
    s3.create_bucket(Bucket=LABEL)
    done = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        s3.put_object(Bucket=LABEL, Key=key(i), Body=body(i))
        with lock:
            done[0] += 1
            if done[0] % 10000 == 0:
                print(f"  uploaded {done[0]} in {time.monotonic() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return time.monotonic() - t0


def lay_out_published(cfg: config.Config, n: int, revision: int) -> None:
    root = Path(cfg.cvmfs.mount_dir) / REPO
    for i in range(n):
        p = root / key(i).removeprefix("cvmfs/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body(i))
        os.chmod(p, 0o644)
    rdonly = Path(cfg.cvmfs.spool_dir) / REPO / "rdonly"
    rdonly.mkdir(parents=True, exist_ok=True)
    os.setxattr(rdonly, "user.revision", str(revision).encode())


def raw_listing(s3: Any) -> tuple[float, int]:
    t0 = time.monotonic()
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=LABEL, Prefix="cvmfs/", PaginationConfig={"PageSize": 1000}):
        count += len(page.get("Contents", []) or [])
    return time.monotonic() - t0, count


def bench_reconcile(work: Path, ceph: ceph_mod.Ceph, n: int, threads: int) -> None:
    cfg = make_config(work, ceph)
    s3 = RGW(cfg.s3, max_pool_connections=threads + 4).s3
    print(f"setup: uploading {n} objects with {threads} threads ...", flush=True)
    took = upload(s3, n, threads)
    print(f"setup: {n} objects uploaded in {took:.1f}s ({n / took:.0f}/s)")
    t0 = time.monotonic()
    lay_out_published(cfg, n, revision=2)
    print(f"setup: published tree of {n} files laid out in {time.monotonic() - t0:.1f}s")
    st = Staging(cfg.cvmfs.staging_dir, REPO).ensure()

    first = reconcile(cfg, REPO, s3=s3, staging=st)
    print(f"\nno manifest (fallback): mode={first.mode} {first.seconds:.2f}s, hashed "
          f"{first.hashed} files, in sync {first.in_sync}, staged {first.staged}, "
          f"manifest rebuilt: {first.rebuilt}")

    lists, recs, hashed = [], [], []
    for _ in range(3):
        t_list, count = raw_listing(s3)
        lists.append(t_list)
        plan = reconcile(cfg, REPO, s3=s3, staging=st)
        recs.append(plan.seconds)
        hashed.append(plan.hashed)
        assert count == n
    ratio = statistics.median(recs) / statistics.median(lists)
    print(f"in sync, with the manifest: mode={plan.mode}, reconcile "
          f"{statistics.median(recs):.2f}s (runs {', '.join(f'{x:.2f}' for x in recs)}), "
          f"raw ListObjectsV2 {statistics.median(lists):.2f}s (runs "
          f"{', '.join(f'{x:.2f}' for x in lists)})")
    print(f"  reconcile / listing = {ratio:.2f}   (target <= 1.2)")
    print(f"  files hashed = {max(hashed)}   (target 0); in sync {plan.in_sync}, "
          f"staged {plan.staged}")

    changed = 4242
    s3.put_object(Bucket=LABEL, Key=key(changed), Body=b"changed content\n")
    plan = reconcile(cfg, REPO, s3=s3, staging=st)
    entry = st.pending_get(key(changed).removeprefix("cvmfs/"))
    ok = entry is not None and st.object_path(entry).read_bytes() == b"changed content\n"
    print(f"one object changed: {len(plan.changes)} difference(s) found "
          f"({', '.join(c.path for c in plan.changes)}), staged {plan.staged}, "
          f"staged content right: {ok}, hashed {plan.hashed}, took {plan.seconds:.2f}s")
    m = manifest.load(st.root, REPO)
    print(f"manifest: {len(m.entries) if m else 0} paths, "
          f"{manifest.path_of(st.root).stat().st_size / 1e6:.1f} MB")


def _first_event(ceph: ceph_mod.Ceph, broker: Any, vhost: str, name: str,
                 persistent: bool) -> tuple[float | None, int]:
    """Create a topic + notification, PUT every 0.5 s: (seconds to the first event, PUTs)."""
    cfg = config.from_mapping({
        "s3": {"endpoint_url": ceph.endpoint, "max_attempts": 2},
        "rgw": {"push_endpoint": f"amqp://{broker.host}:{broker.port}/{vhost}",
                "amqp_ack_level": "broker", "persistent": persistent, "verify_ssl": False},
        "amqp": {"vhost": vhost}, "cvmfs": {"domain": DOMAIN},
    }, env={"CVMFS_PUBLISHER_S3__ACCESS_KEY": ceph.access_key,
            "CVMFS_PUBLISHER_S3__SECRET_KEY": ceph.secret_key})
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        broker.host, broker.port, virtual_host=vhost,
        credentials=pika.PlainCredentials(broker.user, broker.password)))
    try:
        ch = conn.channel()
        ex = cfg.amqp.notification_exchange
        ch.exchange_declare(ex, "topic", durable=True)
        ch.queue_declare(name, durable=True)
        ch.queue_bind(name, ex, routing_key=name)
        rgw = RGW(cfg.s3, cfg.rgw)
        rgw.s3.create_bucket(Bucket=name)
        created = time.monotonic()
        arn = rgw.create_topic(name, ex)
        rgw.put_notification(name, arn, "cvmfs/")
        puts = 0
        while time.monotonic() - created < 90:
            rgw.s3.put_object(Bucket=name, Key=f"cvmfs/probe-{puts}", Body=b"x")
            puts += 1
            _, _, got = ch.basic_get(name, auto_ack=True)
            if got is not None:
                return time.monotonic() - created, puts
            conn.process_data_events(0.5)
        return None, puts
    finally:
        conn.close()


def bench_warmup(ceph: ceph_mod.Ceph, broker: Broker, rounds: int) -> None:
    """First event of a new topic, timed from its creation: for a push endpoint RGW has
    not used yet (a new virtual host, so a new URL) and for a second topic on it."""
    results: dict[str, list[float | None]] = {}
    for n in range(rounds):
        for persistent in (True, False):
            vhost = f"bench-warmup-{os.getpid()}-{n}-{int(persistent)}"
            quoted = urllib.parse.quote(vhost, safe="")
            broker.api("PUT", f"/api/vhosts/{quoted}", {})
            broker.api("PUT", f"/api/permissions/{quoted}/{broker.user}",
                       {"configure": ".*", "write": ".*", "read": ".*"})
            try:
                for which in ("new URL", "second topic"):
                    name = f"w{n}{'p' if persistent else 'n'}{which[0]}-{int(time.time())}"
                    took, puts = _first_event(ceph, broker, vhost, name, persistent)
                    results.setdefault(f"persistent={persistent}, {which}", []).append(took)
                    print(f"  round {n + 1}: persistent={persistent}, {which}: first event "
                          + (f"{took:.1f}s after CreateTopic ({puts} PUTs)" if took is not None
                             else "not within 90 s"), flush=True)
            finally:
                broker.api("DELETE", f"/api/vhosts/{quoted}", timeout=60)
    print("new topic warm-up (first event after CreateTopic; README item 12 says ~30 s):")
    for what, values in results.items():
        shown = ", ".join("-" if v is None else f"{v:.1f}" for v in values)
        print(f"  {what}: {shown} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--warmup", action="store_true", help="also time a new topic's warm-up")
    ap.add_argument("--no-reconcile", action="store_true")
    ap.add_argument("--warmup-rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp, sigterm_as_interrupt():
        work = Path(tmp)
        ceph = node = None
        try:
            ceph = ceph_mod.Ceph(work / "ceph").start()
            if not args.no_reconcile:
                bench_reconcile(work, ceph, args.objects, args.threads)
            if args.warmup:
                print()
                node = RabbitNode(work / "rabbitmq").start()
                bench_warmup(ceph, node.broker(), args.warmup_rounds)
        finally:
            if ceph is not None:
                ceph.stop()
            if node is not None:
                node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
